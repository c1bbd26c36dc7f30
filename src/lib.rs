//! pgwarp: a PostgreSQL wire-protocol connection pooler (transaction mode) with named prepared
//! statements that survive pooling. See DESIGN.md for the layers: protocol and transport at the
//! bottom, then origin, pool, session, and server on top.

pub mod admin;
pub mod auth;
pub mod cache;
pub mod cancel;
pub mod cli;
pub mod config;
pub mod origin;
pub mod pool;
pub mod protocol;
pub mod roster;
pub mod server;
pub mod session;
pub mod sql;
pub mod transport;
pub mod tunnel;
pub mod workers;
