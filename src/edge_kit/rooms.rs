//! The registry of rooms: one per run, started on first join over a few threads, closed when
//! its last member leaves. Kept by one hub actor, so a session joining a run never meets a
//! room that is stopping. The runs with a room are also kept in a [`Watched`] set, which the
//! runtime reads to tell the hub only of their commits.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use uuid::Uuid;

use crate::runs::Watched;

/// Rooms by run; `R` is a room's handle (an actor's address).
pub struct Rooms<R> {
    rooms: HashMap<Uuid, (R, usize)>,
    generation: u64,
    watched: Watched,
}

impl<R> Default for Rooms<R> {
    fn default() -> Self {
        Self::watching(Watched::default())
    }
}

impl<R> Rooms<R> {
    /// A registry that keeps `watched` to the runs it holds a room for.
    pub fn watching(watched: Watched) -> Self {
        Rooms {
            rooms: HashMap::new(),
            generation: 0,
            watched,
        }
    }

    /// One more member of the run's room, started by `start(generation)` if there is none.
    /// Each room is a new generation: a closing room never overwrites its successor's state,
    /// and the generation spreads rooms over threads.
    pub fn join(&mut self, run_id: Uuid, start: impl FnOnce(u64) -> R) -> &R {
        let (room, members) = match self.rooms.entry(run_id) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                self.generation += 1;
                self.watched.insert(run_id);
                e.insert((start(self.generation), 0))
            }
        };
        *members += 1;
        room
    }

    /// A member left the run's room: the room, and whether it was the last (the caller closes
    /// the room, which the registry has already forgotten).
    pub fn leave(&mut self, run_id: Uuid) -> Option<(R, bool)>
    where
        R: Clone,
    {
        let Entry::Occupied(mut e) = self.rooms.entry(run_id) else {
            return None;
        };
        let members = &mut e.get_mut().1;
        *members = members.saturating_sub(1);
        if *members == 0 {
            self.watched.remove(run_id);
            return Some((e.remove().0, true));
        }
        Some((e.get().0.clone(), false))
    }

    pub fn get(&self, run_id: Uuid) -> Option<&R> {
        self.rooms.get(&run_id).map(|(room, _)| room)
    }

    pub fn all(&self) -> impl Iterator<Item = &R> {
        self.rooms.values().map(|(room, _)| room)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_room_lives_from_its_first_join_to_its_last_leave() {
        let run = Uuid::new_v4();
        let watched = Watched::default();
        let mut rooms: Rooms<u64> = Rooms::watching(watched.clone());
        assert_eq!(*rooms.join(run, |g| g * 10), 10);
        assert!(watched.contains(run), "a run with a room is watched");
        assert_eq!(*rooms.join(run, |_| unreachable!("started once")), 10);
        assert_eq!(rooms.leave(run), Some((10, false)));
        assert_eq!(
            rooms.leave(run),
            Some((10, true)),
            "the last member closes it"
        );
        assert_eq!(rooms.get(run), None);
        assert!(!watched.contains(run), "its last member gone, it is not");
        assert_eq!(rooms.leave(run), None);
        assert_eq!(*rooms.join(run, |g| g * 10), 20, "a new generation");
        let other = Uuid::new_v4();
        rooms.join(other, |g| g * 10);
        assert_eq!(rooms.all().count(), 2);
    }
}
