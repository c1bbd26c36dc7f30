//! Reading SQL text just far enough to make pooling and caching decisions.
//!
//! `lexer` turns text into tokens the way Postgres' scanner would (comments, string literals,
//! quoted identifiers and dollar quotes are never mistaken for code); `inspect` answers the
//! questions the session asks of a statement.

pub mod inspect;
pub mod lexer;
pub mod prepared;
