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
    /// The list's end once the open transaction commits (a graft was written in it).
    staged: Option<(ObjId, usize)>,
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

    /// A graft was written at the end of `list`, which will hold `len` items once it commits.
    pub fn stage(&mut self, list: ObjId, len: usize) {
        self.staged = Some((list, len));
    }

    /// Forgets what the last write staged: it did not commit.
    pub fn unstage(&mut self) {
        self.staged = None;
    }

    /// The open transaction committed and the document is now at `heads`: what it staged is
    /// known there. Nothing staged: nothing is learnt (what was known is for older heads).
    pub fn committed(&mut self, heads: Vec<ChangeHash>) {
        if let Some((list, len)) = self.staged.take() {
            self.known = Some(End { heads, list, len });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u8) -> ChangeHash {
        ChangeHash([n; 32])
    }

    #[test]
    fn known_only_at_the_heads_of_the_commit_that_staged_it() {
        let mut end = GraftsEnd::default();
        assert!(end.at(&[hash(1)]).is_none(), "nothing known at first");
        end.stage(ObjId::Root, 4);
        assert!(end.at(&[hash(1)]).is_none(), "staged is not known yet");
        end.committed(vec![hash(2)]);
        assert_eq!(end.at(&[hash(2)]), Some((ObjId::Root, 4)));
        assert!(end.at(&[hash(3)]).is_none(), "other heads: unknown");
        assert!(end.at(&[hash(2), hash(3)]).is_none(), "a merge moved them");
    }

    #[test]
    fn a_write_that_did_not_commit_teaches_nothing() {
        let mut end = GraftsEnd::default();
        end.stage(ObjId::Root, 1);
        end.committed(vec![hash(1)]);
        end.stage(ObjId::Root, 2);
        end.unstage();
        // A later commit of something else (a prune) must not claim the unstaged graft.
        end.committed(vec![hash(2)]);
        assert!(end.at(&[hash(2)]).is_none());
        assert_eq!(end.at(&[hash(1)]), Some((ObjId::Root, 1)));
    }
}
