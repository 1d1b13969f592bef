//! The run's grafts, kept read: by object and by graft id, brought up to date from Automerge's
//! incremental diff so that a read or a retried graft costs what changed, not the whole list
//! (reading 50,000 grafts from the document takes seconds).
//!
//! Graft ids are unique in what readers see: a client that retries a graft with the same id in
//! another region during a partition leaves two list entries after the heal. Every node keeps
//! the same one — the first by (lamport, region, user, id, object id), all of which are the
//! same on every replica — so every region shows one graft per id.

use std::collections::{BTreeMap, HashMap, HashSet};

use automerge::{
    AutoCommit, ChangeHash, ObjId, ObjType, Patch, PatchAction, Prop, ReadDoc, Value, ValueRef,
};

use super::authorship::entry_of;
use super::genesis::GRAFTS;
use super::projection::{ListEntry, Projection};
use super::reader::At;
use super::state::{read_graft, read_graft_in, root_obj, root_obj_in, Graft};

/// Changes the patch log may gather between reads before it is dropped (and the next read
/// rebuilds): a run written and never read must not grow it without end.
const MAX_UNREAD_CHANGES: usize = 20_000;

#[derive(Default, Clone)]
pub(super) struct GraftIndex {
    /// The heads the index reflects; empty when it must be rebuilt.
    heads: Vec<ChangeHash>,
    /// The grafts list object the index was built from.
    list: Option<ObjId>,
    by_obj: HashMap<ObjId, Graft>,
    /// Per graft id, the object whose graft readers see.
    by_id: HashMap<String, ObjId>,
    /// The grafts readers see, in display order.
    shown: BTreeMap<OrderKey, ObjId>,
    /// Entries that break the schema, from the last rebuild; while any is left, every refresh
    /// rebuilds (rare: only a foreign client writes such entries).
    errors: Vec<String>,
    unread: usize,
}

/// Display order: (lamport, region, user, id), then the object id, which tells apart two
/// grafts with the same id and is the same on every replica.
type OrderKey = (u64, String, String, String, String);

fn order_key(graft: &Graft, obj: &ObjId) -> OrderKey {
    (
        graft.lamport,
        graft.region.clone(),
        graft.user.clone(),
        graft.id.clone(),
        obj.to_string(),
    )
}

impl GraftIndex {
    /// Notes that `n` changes were applied; past a bound the incremental log is dropped.
    pub fn note_changes(&mut self, doc: &mut AutoCommit, n: usize) {
        self.unread += n;
        if self.unread > MAX_UNREAD_CHANGES && !self.heads.is_empty() {
            doc.reset_diff_cursor();
            self.heads.clear();
        }
    }

    /// The graft readers see under `id`, if any.
    pub fn find(&mut self, doc: &mut AutoCommit, id: &str) -> Option<Graft> {
        self.refresh(doc);
        let obj = self.by_id.get(id)?;
        self.by_obj.get(obj).cloned()
    }

    /// Every graft once per id, in display order, and the schema errors of the list.
    pub fn grafts(&mut self, doc: &mut AutoCommit) -> (Vec<Graft>, Vec<String>) {
        self.refresh(doc);
        let grafts = self
            .shown
            .values()
            .filter_map(|obj| self.by_obj.get(obj).cloned())
            .collect();
        (grafts, self.errors.clone())
    }

    /// Every graft once per id, in display order, and the schema errors of the list, as the
    /// document was at some point: read whole, as a fresh index would (no patches back).
    pub fn read(doc: At<'_>) -> (Vec<Graft>, Vec<String>) {
        let mut index = GraftIndex::default();
        index.rebuild(doc, root_obj_in(doc, GRAFTS, ObjType::List).ok());
        index.shown_grafts()
    }

    /// [`GraftIndex::read`] at `heads`, for a point near now: the list walked at the point,
    /// and each graft taken from this index (brought up to date) unless Automerge's diff from
    /// the point to now touched it, so only those are read at the point.
    pub fn read_near(
        &mut self,
        doc: &mut AutoCommit,
        heads: &[ChangeHash],
    ) -> (Vec<Graft>, Vec<String>) {
        self.refresh(doc);
        let list = root_obj_in(At::point(doc, heads), GRAFTS, ObjType::List).ok();
        let list = match list {
            Some(list) if self.errors.is_empty() && self.list.as_ref() == Some(&list) => list,
            _ => return Self::read(At::point(doc, heads)),
        };
        let now = doc.get_heads();
        let changed: HashSet<ObjId> = doc
            .diff(heads, &now)
            .iter()
            .filter_map(|patch| match touched_graft(patch, &list) {
                Touch::Graft(obj) => Some(obj),
                _ => None,
            })
            .collect();
        let at = At::point(doc, heads);
        let items = entries(at, &list);
        if let Some(grafts) = self.shown_among(&items, &changed) {
            return (grafts, Vec::new());
        }
        let mut index = GraftIndex {
            list: Some(list),
            ..GraftIndex::default()
        };
        index.fill(items, |obj| match self.by_obj.get(obj) {
            Some(g) if !changed.contains(obj) => Some(g.clone()),
            _ => read_graft_in(at, obj),
        });
        index.shown_grafts()
    }

    /// The grafts shown now, kept to the list `items` of a point, when that is the point's
    /// display: every entry there is a graft this index holds unchanged since, and for each
    /// of their ids the entry shown now is among them (else None: a fresh index decides).
    fn shown_among(
        &self,
        items: &[(usize, bool, ObjId)],
        changed: &HashSet<ObjId>,
    ) -> Option<Vec<Graft>> {
        let mut ids: HashSet<&str> = HashSet::with_capacity(items.len());
        for (_, is_map, obj) in items {
            let graft = self
                .by_obj
                .get(obj)
                .filter(|_| *is_map && !changed.contains(obj))?;
            ids.insert(graft.id.as_str());
        }
        let present: HashSet<&ObjId> = items.iter().map(|(_, _, obj)| obj).collect();
        let grafts: Vec<Graft> = self
            .shown
            .values()
            .filter(|obj| present.contains(obj))
            .filter_map(|obj| self.by_obj.get(obj).cloned())
            .collect();
        (grafts.len() == ids.len()).then_some(grafts)
    }

    fn shown_grafts(mut self) -> (Vec<Graft>, Vec<String>) {
        let grafts = self
            .shown
            .values()
            .filter_map(|obj| self.by_obj.remove(obj))
            .collect();
        (grafts, self.errors)
    }

    /// Whether the index has been built (it is kept up to date from then on).
    pub fn in_use(&self) -> bool {
        !self.heads.is_empty()
    }

    /// Follows a change this node just made on `built_on`, without a diff, when the index was
    /// up to date with those heads: the change grafted `graft` (as object `obj`), or touched
    /// no graft at all (a prune or a flag).
    pub fn local_change(
        &mut self,
        doc: &mut AutoCommit,
        built_on: &[ChangeHash],
        graft: Option<(ObjId, Graft)>,
    ) {
        if self.heads.is_empty() || self.heads != built_on || !self.errors.is_empty() {
            self.note_changes(doc, 1);
            return;
        }
        if let Some((obj, graft)) = graft {
            self.insert(obj, graft);
        }
        doc.update_diff_cursor();
        self.heads = doc.get_heads();
        self.unread = 0;
    }

    /// The list in document order for a projection: each entry's position among the grafts
    /// shown, or the graft hidden behind another with its id. None while the list breaks the
    /// schema (a rebuild reports it). Call after a read, with the index up to date.
    pub fn export(&mut self, doc: &mut AutoCommit) -> Option<Vec<ListEntry>> {
        self.refresh(doc);
        let list = self.list.as_ref().filter(|_| self.errors.is_empty())?;
        let shown: HashMap<&ObjId, u32> = self.shown.values().zip(0..).collect();
        doc.list_range(list, ..)
            .map(|item| {
                let obj = item.id();
                match shown.get(&obj) {
                    Some(i) => Some(ListEntry::Shown(*i)),
                    None => self.by_obj.get(&obj).cloned().map(ListEntry::Hidden),
                }
            })
            .collect()
    }

    /// Builds the index from a projection of the document at its current heads, without
    /// reading a graft: one walk of the list. False (and the index left to rebuild) when the
    /// projection does not match the document.
    pub fn seed(&mut self, doc: &mut AutoCommit, projection: &Projection) -> bool {
        let Some((list, objects)) = projection.graft_objects(doc) else {
            return false;
        };
        self.by_obj.clear();
        self.by_id.clear();
        self.shown.clear();
        self.errors.clear();
        self.list = Some(list);
        for (obj, graft) in objects {
            self.insert(obj, graft);
        }
        doc.update_diff_cursor();
        self.heads = doc.get_heads();
        self.unread = 0;
        true
    }

    fn refresh(&mut self, doc: &mut AutoCommit) {
        let heads = doc.get_heads();
        if !self.heads.is_empty() && heads == self.heads {
            return;
        }
        self.unread = 0;
        let list = root_obj(doc, GRAFTS, ObjType::List).ok();
        let incremental = !self.heads.is_empty()
            && self.errors.is_empty()
            && list.is_some()
            && list == self.list
            && doc.diff_cursor() == self.heads;
        if !(incremental && self.apply_patches(doc, &heads)) {
            self.rebuild(At::now(doc), list);
        }
        doc.update_diff_cursor();
        self.heads = heads;
    }

    /// Brings the index up to date from the diff since its heads; false if only a rebuild can.
    fn apply_patches(&mut self, doc: &mut AutoCommit, heads: &[ChangeHash]) -> bool {
        let Some(list) = self.list.clone() else {
            return false;
        };
        let patches = doc.diff(&self.heads, heads);
        let mut touched = Vec::new();
        for patch in &patches {
            match touched_graft(patch, &list) {
                Touch::Nothing => {}
                Touch::Graft(obj) => touched.push(obj),
                Touch::Grafts(objs) => touched.extend(objs),
                Touch::Rebuild => return false,
            }
        }
        for obj in touched {
            let Some(graft) = read_graft(doc, &obj) else {
                return false;
            };
            if let Some(old) = self.by_obj.get(&obj) {
                if old.id != graft.id || old.order_key() != graft.order_key() {
                    return false;
                }
            }
            self.insert(obj, graft);
        }
        true
    }

    fn rebuild(&mut self, doc: At<'_>, list: Option<ObjId>) {
        self.by_obj.clear();
        self.by_id.clear();
        self.shown.clear();
        self.errors.clear();
        self.list = list.clone();
        let Some(list) = list else {
            self.errors
                .push(match root_obj_in(doc, GRAFTS, ObjType::List) {
                    Err(e) => e,
                    Ok(_) => format!("{GRAFTS} is missing"),
                });
            return;
        };
        self.fill(entries(doc, &list), |obj| read_graft_in(doc, obj));
    }

    /// Indexes the list's `items`, each graft as `read` gives it, noting the entries that
    /// break the schema.
    fn fill(
        &mut self,
        items: Vec<(usize, bool, ObjId)>,
        mut read: impl FnMut(&ObjId) -> Option<Graft>,
    ) {
        for (i, is_map, obj) in items {
            if !is_map {
                self.errors.push(format!("grafts[{i}] is not a map"));
                continue;
            }
            match read(&obj) {
                Some(g) => self.insert(obj, g),
                None => self.errors.push(format!("grafts[{i}] lacks a field")),
            }
        }
    }

    fn insert(&mut self, obj: ObjId, graft: Graft) {
        let key = order_key(&graft, &obj);
        let held = self
            .by_id
            .get(&graft.id)
            .and_then(|o| Some(order_key(self.by_obj.get(o)?, o)));
        match held {
            Some(held) if held <= key => {}
            held => {
                if let Some(held) = held {
                    self.shown.remove(&held);
                }
                self.by_id.insert(graft.id.clone(), obj.clone());
                self.shown.insert(key, obj.clone());
            }
        }
        self.by_obj.insert(obj, graft);
    }
}

/// The grafts list's entries (index, whether a map, object), in one pass: a look-up by index
/// walks the list from its start, which made a rebuild quadratic (2.5 s for 50,000 grafts).
fn entries(doc: At<'_>, list: &ObjId) -> Vec<(usize, bool, ObjId)> {
    doc.list_range(list)
        .map(|item| {
            let is_map = matches!(item.value, ValueRef::Object(ObjType::Map));
            (item.index, is_map, item.id())
        })
        .collect()
}

enum Touch {
    Nothing,
    Graft(ObjId),
    Grafts(Vec<ObjId>),
    Rebuild,
}

/// Which graft a patch changed, if any.
fn touched_graft(patch: &Patch, list: &ObjId) -> Touch {
    if patch.obj == automerge::ROOT {
        let key = match &patch.action {
            PatchAction::PutMap { key, .. } | PatchAction::DeleteMap { key } => Some(key.as_str()),
            PatchAction::Conflict {
                prop: Prop::Map(key),
            } => Some(key.as_str()),
            _ => None,
        };
        return if key == Some(GRAFTS) {
            Touch::Rebuild
        } else {
            Touch::Nothing
        };
    }
    if patch.obj == *list {
        return match &patch.action {
            PatchAction::Insert { values, .. } => {
                let objs: Option<Vec<ObjId>> = values
                    .iter()
                    .map(|(value, obj, _)| {
                        matches!(value, Value::Object(ObjType::Map)).then(|| obj.clone())
                    })
                    .collect();
                objs.map_or(Touch::Rebuild, Touch::Grafts)
            }
            // Replaced or deleted entries: rare, foreign writes.
            _ => Touch::Rebuild,
        };
    }
    // Inside a graft: the path runs root → grafts list → the graft → deeper.
    match entry_of(patch, list) {
        Some(graft) => Touch::Graft(graft),
        None => Touch::Nothing,
    }
}
