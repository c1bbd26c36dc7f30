//! Who is connected right now: one entry per client and one per origin connection, for the
//! admin console's `SHOW CLIENTS` and `SHOW SERVERS`.
//!
//! An entry is added and removed under a lock, at connect and disconnect only. What changes per
//! transaction (the state and since when, which client an origin connection serves) lives in
//! the entry itself as relaxed atomics that only the entry's owner writes: a checkout costs a
//! store or two into a cache line the owner already has, and no lock. The console reads the
//! entries without stopping anyone, so a listing is each row's state at about the same moment,
//! not one consistent snapshot.

pub mod clock;
mod entries;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

pub use entries::{ClientEntry, ClientFacts, ClientState, ServerEntry, ServerFacts, ServerState};

/// Entries of one kind, by id.
#[derive(Debug)]
pub struct Roster<E> {
    entries: Mutex<BTreeMap<u64, Arc<Item<E>>>>,
}

impl<E> Default for Roster<E> {
    fn default() -> Self {
        Roster { entries: Mutex::new(BTreeMap::new()) }
    }
}

/// Something a roster can list: it knows its own id.
pub trait Listable {
    fn id(&self) -> u64;
}

/// An entry as the roster holds it: with the way back to its roster, so the guard that lists
/// it is one pointer (it lives in every session).
#[derive(Debug)]
pub struct Item<E> {
    entry: E,
    roster: Weak<Roster<E>>,
}

impl<E> std::ops::Deref for Item<E> {
    type Target = E;
    fn deref(&self) -> &E {
        &self.entry
    }
}

impl<E: Listable> Roster<E> {
    /// Lists `entry` until the returned guard is dropped.
    pub fn add(self: &Arc<Self>, entry: E) -> Listed<E> {
        let item = Arc::new(Item { entry, roster: Arc::downgrade(self) });
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).insert(item.id(), item.clone());
        Listed(item)
    }

    /// Every entry now, in id order (that is, in order of arrival).
    pub fn list(&self) -> Vec<Arc<Item<E>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An entry in a roster; taken off it when this is dropped.
#[derive(Debug)]
pub struct Listed<E: Listable>(Arc<Item<E>>);

impl<E: Listable> std::ops::Deref for Listed<E> {
    type Target = E;
    fn deref(&self) -> &E {
        &self.0.entry
    }
}

impl<E: Listable> Drop for Listed<E> {
    fn drop(&mut self) {
        if let Some(roster) = self.0.roster.upgrade() {
            roster.entries.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.0.id());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Thing(u64);
    impl Listable for Thing {
        fn id(&self) -> u64 {
            self.0
        }
    }

    #[test]
    fn entries_are_listed_in_id_order_until_their_guard_drops() {
        let roster = Arc::new(Roster::default());
        let b = roster.add(Thing(2));
        let a = roster.add(Thing(1));
        assert_eq!(roster.list().iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        drop(b);
        assert_eq!(roster.list().iter().map(|t| t.0).collect::<Vec<_>>(), vec![1]);
        assert_eq!(a.id(), 1);
        drop(a);
        assert!(roster.is_empty());
    }
}
