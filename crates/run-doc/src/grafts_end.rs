//! Where the next graft goes: the grafts list's id and length, remembered at the document's
//! heads.
//!
//! A graft appends to the list, and Automerge counts a list's length by walking the list, so
//! asking it on every graft cost a run of n grafts O(n) per graft (with one run of about
//! 30,000 grafts under load, 29% of the node's CPU went to counting). What is remembered holds
//! only while the document is at exactly those heads: a document at given heads has one state,
//! and every change, this node's or another replica's, moves them.

use automerge::{ChangeHash, ObjId};

#[derive(Clone, Default)]
pub(crate) struct GraftsEnd {
    known: Option<End>,
}

#[derive(Clone)]
struct End {
    heads: Vec<ChangeHash>,
    list: ObjId,
    len: usize,
}

impl GraftsEnd {
    /// The list's id and length, if they are known at `heads`.
    pub fn at(&self, heads: &[ChangeHash]) -> Option<(ObjId, usize)> {
        self.known
            .as_ref()
            .filter(|end| end.heads == heads)
            .map(|end| (end.list.clone(), end.len))
    }

    /// A graft committed: the document is at `heads`, where `list` holds `len` items.
    pub fn remember(&mut self, heads: Vec<ChangeHash>, list: ObjId, len: usize) {
        self.known = Some(End { heads, list, len });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u8) -> ChangeHash {
        ChangeHash([n; 32])
    }

    #[test]
    fn known_only_at_the_heads_it_was_remembered_at() {
        let mut end = GraftsEnd::default();
        assert!(end.at(&[hash(1)]).is_none(), "nothing known at first");
        end.remember(vec![hash(2)], ObjId::Root, 4);
        assert_eq!(end.at(&[hash(2)]), Some((ObjId::Root, 4)));
        assert!(end.at(&[hash(3)]).is_none(), "other heads: unknown");
        assert!(end.at(&[hash(2), hash(3)]).is_none(), "a merge moved them");
    }
}
