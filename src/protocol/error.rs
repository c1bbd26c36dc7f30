//! ErrorResponse: the SQLSTATE codes pgwarp uses and the fields it reads from the origin's errors.

use super::{DecodeError, Fields};

/// A SQLSTATE code, as Postgres spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SqlState(pub &'static str);

impl SqlState {
    pub const PROTOCOL_VIOLATION: SqlState = SqlState("08P01");
    pub const CONNECTION_FAILURE: SqlState = SqlState("08006");
    pub const CONNECTION_REJECTED: SqlState = SqlState("08004");
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState("53300");
    pub const OUT_OF_MEMORY: SqlState = SqlState("53200");
    pub const ADMIN_SHUTDOWN: SqlState = SqlState("57P01");
    pub const IDLE_SESSION_TIMEOUT: SqlState = SqlState("57P05");
    pub const IDLE_IN_TRANSACTION_TIMEOUT: SqlState = SqlState("25P03");
    pub const QUERY_CANCELED: SqlState = SqlState("57014");
    pub const CANNOT_CONNECT_NOW: SqlState = SqlState("57P03");
    pub const INVALID_PASSWORD: SqlState = SqlState("28P01");
    pub const INVALID_AUTHORIZATION: SqlState = SqlState("28000");
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState("0A000");
    pub const DUPLICATE_PREPARED_STATEMENT: SqlState = SqlState("42P05");
    pub const UNDEFINED_PREPARED_STATEMENT: SqlState = SqlState("26000");
    pub const INVALID_PARAMETER_VALUE: SqlState = SqlState("22023");
    pub const CHARACTER_NOT_IN_REPERTOIRE: SqlState = SqlState("22021");
    pub const SYNTAX_ERROR: SqlState = SqlState("42601");
    pub const INTERNAL_ERROR: SqlState = SqlState("XX000");
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: SqlState = SqlState("55000");
    pub const UNDEFINED_OBJECT: SqlState = SqlState("42704");
    pub const CONFIG_FILE_ERROR: SqlState = SqlState("F0000");

    pub fn code(&self) -> &'static str {
        self.0
    }
}

/// How bad an error is: `Error` ends the current query, `Fatal` ends the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// The fields of an ErrorResponse or NoticeResponse that pgwarp looks at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl ErrorFields {
    /// Reads an ErrorResponse body (a list of code byte + C string, ended by a zero byte).
    pub fn parse(body: &[u8]) -> Result<ErrorFields, DecodeError> {
        let mut f = Fields::new(b'E', body);
        let mut out = ErrorFields::default();
        loop {
            let kind = f.u8()?;
            if kind == 0 {
                return Ok(out);
            }
            let value = f.cstr()?;
            match kind {
                // 'V' is the non-localized severity; prefer it over 'S' when present.
                b'V' => out.severity = value.to_owned(),
                b'S' if out.severity.is_empty() => out.severity = value.to_owned(),
                b'C' => out.code = value.to_owned(),
                b'M' => out.message = value.to_owned(),
                _ => {}
            }
        }
    }

    /// FATAL and PANIC errors end the connection that sent them.
    pub fn is_fatal(&self) -> bool {
        self.severity == "FATAL" || self.severity == "PANIC"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::build;

    #[test]
    fn parses_what_the_builder_writes() {
        let msg = build::error(Severity::Fatal, SqlState::ADMIN_SHUTDOWN, "going away");
        let fields = ErrorFields::parse(&msg[5..]).unwrap();
        assert_eq!(fields.severity, "FATAL");
        assert_eq!(fields.code, "57P01");
        assert_eq!(fields.message, "going away");
        assert!(fields.is_fatal());
    }

    #[test]
    fn truncated_error_is_rejected() {
        assert!(ErrorFields::parse(b"SERROR").is_err());
    }
}
