//! Who views each run: this node's sessions, and what other nodes announced over the mesh.
//! Shared by the rooms (which own the local part), the hub (remote part) and the HTTP runs
//! list (viewer counts).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Instant;

use uuid::Uuid;

use crate::presence::{PresenceUser, PRESENCE_TTL};
use run_wire::browser::Viewer;

struct Remote {
    region: String,
    users: Vec<PresenceUser>,
    /// The announcement's `(epoch, seq)`: an older one arriving late is ignored.
    stamp: (u64, u64),
    expires: Instant,
}

#[derive(Default)]
struct RunPresence {
    /// user → open sessions on this node, as the room of generation `room` last set it.
    local: BTreeMap<String, u32>,
    room: u64,
    /// origin node → its announcement.
    remote: HashMap<String, Remote>,
}

impl RunPresence {
    fn is_empty(&self) -> bool {
        self.local.is_empty() && self.remote.is_empty()
    }
}

#[derive(Default)]
pub struct PresenceBook {
    runs: Mutex<HashMap<Uuid, RunPresence>>,
}

impl PresenceBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, RunPresence>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces this node's viewers of a run, as room generation `room` sees them. A room
    /// older than the one that last wrote (one closing while its successor opens) is ignored.
    pub fn set_local(&self, run: Uuid, room: u64, users: BTreeMap<String, u32>) {
        let mut runs = self.lock();
        let entry = runs.entry(run).or_default();
        if room >= entry.room {
            entry.room = room;
            entry.local = users;
        }
        if entry.is_empty() {
            runs.remove(&run);
        }
    }

    /// This node's viewers of a run, at most `limit` of them (the most sessions first).
    pub fn local_users(&self, run: Uuid, limit: usize) -> Vec<PresenceUser> {
        let runs = self.lock();
        let mut users: Vec<PresenceUser> = runs.get(&run).map_or_else(Vec::new, |p| {
            p.local
                .iter()
                .map(|(user, &sessions)| PresenceUser {
                    user: user.clone(),
                    sessions,
                })
                .collect()
        });
        if users.len() > limit {
            users.sort_by(|a, b| b.sessions.cmp(&a.sessions).then(a.user.cmp(&b.user)));
            users.truncate(limit);
        }
        users
    }

    /// Records a node's announcement stamped `(epoch, seq)`; false if it changed nothing (or
    /// is older than the one held).
    pub fn set_remote(
        &self,
        run: Uuid,
        origin: &str,
        region: &str,
        stamp: (u64, u64),
        mut users: Vec<PresenceUser>,
    ) -> bool {
        users.sort_by(|a, b| a.user.cmp(&b.user));
        let mut runs = self.lock();
        let entry = runs.entry(run).or_default();
        let expires = Instant::now() + PRESENCE_TTL;
        let changed = match entry.remote.get_mut(origin) {
            Some(r) if r.stamp >= stamp => false,
            Some(r) if r.users == users && r.region == region => {
                r.stamp = stamp;
                r.expires = expires;
                false
            }
            _ if users.is_empty() => entry.remote.remove(origin).is_some(),
            _ => {
                entry.remote.insert(
                    origin.to_string(),
                    Remote {
                        region: region.to_string(),
                        users,
                        stamp,
                        expires,
                    },
                );
                true
            }
        };
        if entry.is_empty() {
            runs.remove(&run);
        }
        changed
    }

    /// Forgets what `origin` announced; returns the runs that changed.
    pub fn forget_node(&self, origin: &str) -> Vec<Uuid> {
        self.retain_remote(|node, _| node != origin)
    }

    /// Drops announcements past their time; returns the runs that changed.
    pub fn expire(&self, now: Instant) -> Vec<Uuid> {
        self.retain_remote(|_, r| r.expires > now)
    }

    fn retain_remote(&self, keep: impl Fn(&str, &Remote) -> bool) -> Vec<Uuid> {
        let mut changed = Vec::new();
        let mut runs = self.lock();
        runs.retain(|run, p| {
            let before = p.remote.len();
            p.remote.retain(|node, r| keep(node, r));
            if p.remote.len() != before {
                changed.push(*run);
            }
            !p.is_empty()
        });
        changed
    }

    /// Everyone viewing the run, in every region, sorted.
    pub fn viewers(&self, run: Uuid, region: &str) -> Vec<Viewer> {
        let runs = self.lock();
        let Some(p) = runs.get(&run) else {
            return Vec::new();
        };
        let mut all: Vec<Viewer> = p
            .local
            .iter()
            .map(|(user, &sessions)| Viewer {
                user: user.clone(),
                region: region.to_string(),
                sessions,
            })
            .chain(p.remote.values().flat_map(|r| {
                r.users.iter().map(|u| Viewer {
                    user: u.user.clone(),
                    region: r.region.clone(),
                    sessions: u.sessions,
                })
            }))
            .collect();
        all.sort();
        all
    }

    /// Open sessions on the run, in every region.
    pub fn count(&self, run: Uuid) -> u64 {
        let runs = self.lock();
        runs.get(&run).map_or(0, |p| {
            p.local.values().map(|&n| u64::from(n)).sum::<u64>()
                + p.remote
                    .values()
                    .flat_map(|r| r.users.iter())
                    .map(|u| u64::from(u.sessions))
                    .sum::<u64>()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, sessions: u32) -> PresenceUser {
        PresenceUser {
            user: name.into(),
            sessions,
        }
    }

    #[test]
    fn local_and_remote_viewers_merge_and_expire() {
        let book = PresenceBook::default();
        let run = Uuid::new_v4();
        book.set_local(run, 1, BTreeMap::from([("ana".to_string(), 2)]));
        assert!(book.set_remote(run, "n2", "eu-central-1", (1, 1), vec![user("bo", 1)]));
        let again = book.set_remote(run, "n2", "eu-central-1", (1, 2), vec![user("bo", 1)]);
        assert!(!again, "a refresh");
        let late = book.set_remote(run, "n2", "eu-central-1", (1, 1), vec![]);
        assert!(!late, "a late, older one");
        let v = book.viewers(run, "us-east-1");
        assert_eq!(v.len(), 2);
        assert_eq!(
            (v[0].user.as_str(), v[0].region.as_str()),
            ("ana", "us-east-1")
        );
        assert_eq!(
            (v[1].user.as_str(), v[1].region.as_str()),
            ("bo", "eu-central-1")
        );
        assert_eq!(book.count(run), 3);
        assert_eq!(book.expire(Instant::now()), Vec::<Uuid>::new());
        assert_eq!(book.expire(Instant::now() + PRESENCE_TTL * 2), vec![run]);
        assert_eq!(book.count(run), 2);
        assert!(book.set_remote(run, "n3", "ap-southeast-1", (1, 1), vec![user("cy", 1)]));
        assert_eq!(book.forget_node("n3"), vec![run]);
        // A closing room (generation 1) does not erase what its successor (2) set.
        book.set_local(run, 2, BTreeMap::from([("dee".to_string(), 1)]));
        book.set_local(run, 1, BTreeMap::new());
        assert_eq!(book.local_users(run, 10).len(), 1);
        book.set_local(run, 2, BTreeMap::new());
        assert!(book.viewers(run, "x").is_empty());
    }
}
