//! Reading the document now, or as it was at some heads, through one interface: Automerge's
//! `_at` reads filter its op set by the heads' clock, so a point of history is read in place
//! instead of forking a copy of the document (which replays every operation up to it).

use automerge::{
    iter::{Keys, ListRange, MapRange},
    AutoCommit, AutomergeError, ChangeHash, ObjId, Prop, ReadDoc, Value,
};

#[derive(Clone, Copy)]
pub(super) struct At<'a> {
    pub doc: &'a AutoCommit,
    /// None: now.
    pub heads: Option<&'a [ChangeHash]>,
}

type Found<'a> = Result<Option<(Value<'a>, ObjId)>, AutomergeError>;

impl<'a> At<'a> {
    pub fn now(doc: &'a AutoCommit) -> Self {
        At { doc, heads: None }
    }

    /// The document as it was at `heads`.
    pub fn point(doc: &'a AutoCommit, heads: &'a [ChangeHash]) -> Self {
        At {
            doc,
            heads: Some(heads),
        }
    }

    pub fn get(&self, obj: &ObjId, prop: impl Into<Prop>) -> Found<'a> {
        match self.heads {
            Some(h) => self.doc.get_at(obj, prop, h),
            None => self.doc.get(obj, prop),
        }
    }

    pub fn get_all(
        &self,
        obj: &ObjId,
        prop: impl Into<Prop>,
    ) -> Result<Vec<(Value<'a>, ObjId)>, AutomergeError> {
        match self.heads {
            Some(h) => self.doc.get_all_at(obj, prop, h),
            None => self.doc.get_all(obj, prop),
        }
    }

    pub fn keys(&self, obj: &ObjId) -> Keys<'a> {
        match self.heads {
            Some(h) => self.doc.keys_at(obj, h),
            None => self.doc.keys(obj),
        }
    }

    pub fn map_range(&self, obj: &ObjId) -> MapRange<'a> {
        match self.heads {
            Some(h) => self.doc.map_range_at(obj, .., h),
            None => self.doc.map_range(obj, ..),
        }
    }

    pub fn list_range(&self, obj: &ObjId) -> ListRange<'a> {
        match self.heads {
            Some(h) => self.doc.list_range_at(obj, .., h),
            None => self.doc.list_range(obj, ..),
        }
    }

    pub fn text(&self, obj: &ObjId) -> Result<String, AutomergeError> {
        match self.heads {
            Some(h) => self.doc.text_at(obj, h),
            None => self.doc.text(obj),
        }
    }
}
