//! The statements one origin connection has prepared, by content-derived name, in an LRU.

use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;

#[derive(Debug)]
pub struct ServerStatements {
    lru: LruCache<Arc<str>, ()>,
    /// Statements the origin still has but that must not be reused (their cached plan went
    /// stale): closed before the next batch.
    stale: Vec<Arc<str>>,
    /// Content id of the statement in the unnamed slot, if pgwarp knows it.
    pub unnamed: Option<Arc<str>>,
}

impl ServerStatements {
    pub fn new(capacity: usize) -> Self {
        let cap = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        ServerStatements { lru: LruCache::new(cap), stale: Vec::new(), unnamed: None }
    }

    /// Whether the statement is prepared here; marks it recently used.
    pub fn has(&mut self, id: &Arc<str>) -> bool {
        self.lru.get(id).is_some()
    }

    /// Records a statement as prepared; returns the one evicted to make room, which the caller
    /// must close on the connection.
    pub fn add(&mut self, id: Arc<str>) -> Option<Arc<str>> {
        match self.lru.push(id.clone(), ()) {
            Some((evicted, ())) if evicted != id => Some(evicted),
            _ => None,
        }
    }

    /// Forgets a statement that was never prepared (its Parse failed or was skipped).
    pub fn forget(&mut self, id: &Arc<str>) {
        self.lru.pop(id);
    }

    /// Marks a prepared statement unusable: it is closed before the next batch and re-prepared
    /// on next use.
    pub fn invalidate(&mut self, id: &Arc<str>) {
        if self.lru.pop(id).is_some() {
            self.stale.push(id.clone());
        }
    }

    /// Marks every prepared statement unusable: some SQL dropped one by name behind pgwarp's
    /// back. Each is closed before the next batch (closing a missing one is no error) and
    /// re-prepared on next use.
    pub fn invalidate_all(&mut self) {
        while let Some((id, ())) = self.lru.pop_lru() {
            self.stale.push(id);
        }
    }

    pub fn take_stale(&mut self) -> Vec<Arc<str>> {
        std::mem::take(&mut self.stale)
    }

    /// The origin dropped every statement (DISCARD ALL, DEALLOCATE ALL).
    pub fn clear(&mut self) {
        self.lru.clear();
        self.stale.clear();
        self.unnamed = None;
    }

    pub fn len(&self) -> usize {
        self.lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lru.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut s = ServerStatements::new(2);
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        assert_eq!(s.add(a.clone()), None);
        assert_eq!(s.add(b.clone()), None);
        assert!(s.has(&a));
        assert_eq!(s.add(c.clone()), Some(b.clone()));
        assert!(!s.has(&b));
        assert!(s.has(&a) && s.has(&c));
    }

    #[test]
    fn invalidated_statements_are_closed_once() {
        let mut s = ServerStatements::new(2);
        let a: Arc<str> = "a".into();
        s.add(a.clone());
        s.invalidate(&a);
        assert!(!s.has(&a));
        assert_eq!(s.take_stale(), vec![a.clone()]);
        assert!(s.take_stale().is_empty());
        s.invalidate(&a);
        assert!(s.take_stale().is_empty(), "only statements the origin has are closed");
    }

    #[test]
    fn invalidating_all_closes_each_named_statement() {
        let mut s = ServerStatements::new(4);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        s.add(a.clone());
        s.add(b.clone());
        s.invalidate_all();
        assert!(s.is_empty());
        let mut stale = s.take_stale();
        stale.sort();
        assert_eq!(stale, vec![a, b]);
    }
}
