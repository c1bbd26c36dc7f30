//! A client's prepared statements: its names mapped to what it prepared (query text and
//! parameter types), independent of which origin connection will run them.
//!
//! The server-side name is derived from the content, so the same SQL prepared by many clients is
//! one statement per origin connection, and two clients using one name for different SQL never
//! collide.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};

use crate::protocol::build;
use crate::sql::inspect::{session_hints, SessionHints};

#[derive(Debug, PartialEq, Eq)]
pub struct Statement {
    /// Content-derived server-side name: `pgwarp_` + 24 hex digits of SHA-256(kind, types, text).
    pub id: Arc<str>,
    pub sql: Box<str>,
    pub param_types: Box<[u32]>,
    /// How to create it on an origin connection that lacks it.
    pub replay: Replay,
    /// What its SQL means for the session, worked out once rather than at every use.
    pub hints: SessionHints,
}

/// How a statement is created on an origin connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Replay {
    /// A protocol-level Parse (named with the content id, or unnamed).
    Parse(Bytes),
    /// A SQL-level `PREPARE <id> [(types)] AS ...`, sent as a simple query.
    Prepare(Box<str>),
}

impl Statement {
    /// `named`: prepared under `id` on the origin; otherwise it lives in the unnamed slot.
    pub fn new(named: bool, sql: &str, param_types: &[u32]) -> Statement {
        let id = content_id(b'P', param_types, "", sql);
        let mut parse = BytesMut::new();
        build::parse_into(&mut parse, if named { &id } else { "" }, sql, param_types);
        Statement {
            id,
            sql: sql.into(),
            param_types: param_types.into(),
            replay: Replay::Parse(parse.freeze()),
            hints: session_hints(sql),
        }
    }

    /// A statement from SQL `PREPARE name <types> AS <body>`; `types` as written, or "".
    pub fn sql_prepared(types: &str, body: &str) -> Statement {
        let id = content_id(b'S', &[], types, body);
        let prepare = format!("PREPARE {id} {types} AS {body}");
        Statement {
            id,
            sql: body.into(),
            param_types: Box::new([]),
            replay: Replay::Prepare(prepare.into()),
            hints: session_hints(body),
        }
    }

    /// Whether `frame` is this unnamed statement's own Parse, byte for byte.
    pub fn is_unnamed_parse(&self, frame: &[u8]) -> bool {
        matches!(&self.replay, Replay::Parse(parse) if parse[..] == *frame)
    }

    pub fn same_content(&self, sql: &str, param_types: &[u32]) -> bool {
        &*self.sql == sql && &*self.param_types == param_types
    }

    /// Memory charged to the client for keeping it.
    fn weight(&self) -> usize {
        let replay = match &self.replay {
            Replay::Parse(b) => b.len(),
            Replay::Prepare(s) => s.len(),
        };
        self.sql.len() + replay + self.param_types.len() * 4 + 96
    }
}

/// The server-side name for a statement's content. `kind` keeps protocol-level and SQL-level
/// statements apart; `type_text` is SQL PREPARE's type list as written.
pub fn content_id(kind: u8, param_types: &[u32], type_text: &str, sql: &str) -> Arc<str> {
    let mut h = Sha256::new();
    h.update([kind]);
    h.update((param_types.len() as u32).to_be_bytes());
    for t in param_types {
        h.update(t.to_be_bytes());
    }
    h.update((type_text.len() as u32).to_be_bytes());
    h.update(type_text.as_bytes());
    h.update(sql.as_bytes());
    let digest = h.finalize();
    let mut id = String::with_capacity(31);
    id.push_str("pgwarp_");
    for b in &digest[..12] {
        id.push_str(&format!("{b:02x}"));
    }
    id.into()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("prepared statements of this client exceed the limit of {limit} bytes")]
pub struct OverLimit {
    pub limit: usize,
}

#[derive(Debug, Default)]
pub struct StatementMap {
    /// The unnamed statement, kept apart: it is replaced by nearly every extended-protocol
    /// batch, so it should not cost a hash lookup each time.
    unnamed: Option<Arc<Statement>>,
    /// Hashed with foldhash (seeded per process): SipHash was a measurable part of each Bind.
    by_name: HashMap<String, Arc<Statement>, foldhash::fast::RandomState>,
    bytes: usize,
    max_bytes: usize,
}

impl StatementMap {
    pub fn new(max_bytes: usize) -> Self {
        StatementMap { unnamed: None, by_name: HashMap::default(), bytes: 0, max_bytes }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Statement>> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.by_name.get(name)
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Saves a statement under a name, replacing any previous one (the unnamed statement is
    /// replaced by every unnamed Parse).
    pub fn insert(&mut self, name: &str, stmt: Arc<Statement>) -> Result<(), OverLimit> {
        let old = self.get(name).map_or(0, |s| s.weight());
        let new_total = self.bytes - old + stmt.weight();
        if new_total > self.max_bytes {
            return Err(OverLimit { limit: self.max_bytes });
        }
        self.bytes = new_total;
        if name.is_empty() {
            self.unnamed = Some(stmt);
        } else {
            self.by_name.insert(name.to_owned(), stmt);
        }
        Ok(())
    }

    pub fn remove(&mut self, name: &str) -> Option<Arc<Statement>> {
        let removed = if name.is_empty() { self.unnamed.take() } else { self.by_name.remove(name) };
        if let Some(s) = &removed {
            self.bytes -= s.weight();
        }
        removed
    }

    /// Removes `name` only if it still holds the statement with `id`.
    pub fn remove_if(&mut self, name: &str, id: &str) {
        if self.get(name).is_some_and(|s| &*s.id == id) {
            self.remove(name);
        }
    }

    pub fn clear(&mut self) {
        self.unnamed = None;
        self.by_name.clear();
        self.by_name.shrink_to_fit();
        self.bytes = 0;
    }

    pub fn len(&self) -> usize {
        self.by_name.len() + usize::from(self.unnamed.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Named statements only (what `SHOW CLIENTS` counts).
    pub fn named_len(&self) -> usize {
        self.by_name.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_content_not_client_names() {
        let a = Statement::new(true, "select 1", &[]);
        let b = Statement::new(true, "select 1", &[]);
        let c = Statement::new(true, "select 1", &[23]);
        let d = Statement::new(true, "select 2", &[]);
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_ne!(a.id, d.id);
        assert!(a.id.starts_with("pgwarp_") && a.id.len() == 31);
    }

    #[test]
    fn sql_prepared_statements_have_their_own_names() {
        let p = Statement::new(true, "select $1", &[]);
        let s = Statement::sql_prepared("(int)", "select $1");
        let t = Statement::sql_prepared("(text)", "select $1");
        assert_ne!(p.id, s.id);
        assert_ne!(s.id, t.id);
        assert_eq!(s.replay, Replay::Prepare(format!("PREPARE {} (int) AS select $1", s.id).into()));
    }

    #[test]
    fn memory_limit_is_enforced_and_released() {
        let mut m = StatementMap::new(400);
        m.insert("a", Arc::new(Statement::new(true, "select 1", &[]))).unwrap();
        let big = "x".repeat(300);
        assert_eq!(m.insert("b", Arc::new(Statement::new(true, &big, &[]))), Err(OverLimit { limit: 400 }));
        assert!(!m.contains("b"));
        m.remove("a");
        assert_eq!(m.bytes(), 0);
        m.insert("b", Arc::new(Statement::new(true, "select 2", &[]))).unwrap();
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn remove_if_checks_identity() {
        let mut m = StatementMap::new(1 << 20);
        let s = Arc::new(Statement::new(true, "select 1", &[]));
        m.insert("a", s.clone()).unwrap();
        m.remove_if("a", "pgwarp_other");
        assert!(m.contains("a"));
        m.remove_if("a", &s.id);
        assert!(!m.contains("a"));
    }
}
