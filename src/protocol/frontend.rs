//! Views of the client messages pgwarp looks inside (Query, Parse, Bind, Describe, Close,
//! Execute), and re-encoders for those it renames. A view borrows the message; re-encoding copies
//! only when a name actually changes.

use bytes::{BufMut, BytesMut};

use super::build::{frame_into, put_cstr};
use super::{DecodeError, Fields};

pub const QUERY: u8 = b'Q';
pub const PARSE: u8 = b'P';
pub const BIND: u8 = b'B';
pub const DESCRIBE: u8 = b'D';
pub const EXECUTE: u8 = b'E';
pub const CLOSE: u8 = b'C';
pub const SYNC: u8 = b'S';
pub const FLUSH: u8 = b'H';
pub const TERMINATE: u8 = b'X';
pub const FUNCTION_CALL: u8 = b'F';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const PASSWORD: u8 = b'p';

/// A simple Query: the SQL text.
pub fn query_text(body: &[u8]) -> Result<&str, DecodeError> {
    Fields::new(QUERY, body).cstr()
}

/// A simple Query's text as well as it reads when it is not UTF-8 (a LATIN1 client's): for
/// looking at, never for sending on.
pub fn query_text_lossy(body: &[u8]) -> String {
    let text = body.split(|&b| b == 0).next().unwrap_or_default();
    String::from_utf8_lossy(text).into_owned()
}

#[derive(Debug, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a str,
    pub sql: &'a str,
    pub param_types: Vec<u32>,
}

impl<'a> Parse<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self, DecodeError> {
        let mut f = Fields::new(PARSE, body);
        let name = f.cstr()?;
        let sql = f.cstr()?;
        let n = f.count()?;
        // Each type is four bytes: check the count against what is there before allocating.
        if f.rest().len() < n * 4 {
            return Err(f.invalid("parameter type count exceeds the message"));
        }
        let param_types = (0..n).map(|_| f.u32()).collect::<Result<Vec<_>, _>>()?;
        Ok(Parse { name, sql, param_types })
    }
}

/// The head of a Bind: the portal and statement names, and where the rest of the body starts.
#[derive(Debug, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    /// Parameter formats, values and result formats, untouched.
    pub rest: &'a [u8],
}

impl<'a> Bind<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self, DecodeError> {
        let mut f = Fields::new(BIND, body);
        let portal = f.cstr()?;
        let statement = f.cstr()?;
        Ok(Bind { portal, statement, rest: f.rest() })
    }

    /// Whether `test` holds for any parameter value (NULLs skipped). A malformed message
    /// answers false: the origin will refuse it.
    pub fn any_value(&self, mut test: impl FnMut(&[u8]) -> bool) -> bool {
        let mut r = self.rest;
        let Some(nformats) = take_i16(&mut r) else { return false };
        let Some((_, mut r)) = r.split_at_checked(usize::try_from(nformats).unwrap_or(0) * 2) else { return false };
        let Some(nparams) = take_i16(&mut r) else { return false };
        for _ in 0..nparams.max(0) {
            let Some((len, rest)) = r.split_first_chunk::<4>() else { return false };
            r = rest;
            let Ok(len) = usize::try_from(i32::from_be_bytes(*len)) else { continue }; // NULL
            let Some((value, rest)) = r.split_at_checked(len) else { return false };
            r = rest;
            if test(value) {
                return true;
            }
        }
        false
    }

    /// Writes this Bind naming `statement` instead.
    pub fn encode_renamed(&self, out: &mut BytesMut, statement: &str) {
        frame_into(out, BIND, |b| {
            put_cstr(b, self.portal);
            put_cstr(b, statement);
            b.put_slice(self.rest);
        });
    }
}

fn take_i16(r: &mut &[u8]) -> Option<i16> {
    let (n, rest) = r.split_first_chunk::<2>()?;
    *r = rest;
    Some(i16::from_be_bytes(*n))
}

/// The target of a Describe or Close: a prepared statement or a portal.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Target {
    Statement,
    Portal,
}

/// A Describe or a Close: both are a target kind byte and a name.
#[derive(Debug, PartialEq, Eq)]
pub struct Named<'a> {
    pub target: Target,
    pub name: &'a str,
}

impl<'a> Named<'a> {
    pub fn decode(tag: u8, body: &'a [u8]) -> Result<Self, DecodeError> {
        let mut f = Fields::new(tag, body);
        let target = match f.u8()? {
            b'S' => Target::Statement,
            b'P' => Target::Portal,
            _ => return Err(f.invalid("target must be 'S' or 'P'")),
        };
        let name = f.cstr()?;
        Ok(Named { target, name })
    }

    pub fn encode_renamed(&self, out: &mut BytesMut, tag: u8, name: &str) {
        frame_into(out, tag, |b| {
            b.put_u8(match self.target {
                Target::Statement => b'S',
                Target::Portal => b'P',
            });
            put_cstr(b, name);
        });
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Execute<'a> {
    pub portal: &'a str,
    pub max_rows: i32,
}

impl<'a> Execute<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self, DecodeError> {
        let mut f = Fields::new(EXECUTE, body);
        let portal = f.cstr()?;
        let max_rows = f.i32()?;
        Ok(Execute { portal, max_rows })
    }
}

/// Whether a tag is copy input: CopyData, CopyDone or CopyFail.
pub fn is_copy_input(tag: u8) -> bool {
    matches!(tag, COPY_DATA | COPY_DONE | COPY_FAIL)
}

/// Whether a tag is a message a client may send after startup.
pub fn is_known(tag: u8) -> bool {
    matches!(
        tag,
        QUERY
            | PARSE
            | BIND
            | DESCRIBE
            | EXECUTE
            | CLOSE
            | SYNC
            | FLUSH
            | TERMINATE
            | FUNCTION_CALL
            | COPY_DATA
            | COPY_DONE
            | COPY_FAIL
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::build;
    use crate::protocol::codec::Message;

    #[test]
    fn parse_round_trips() {
        let mut out = BytesMut::new();
        build::parse_into(&mut out, "s1", "select $1", &[23]);
        let msg = Message::from_frame(out.freeze());
        let p = Parse::decode(msg.body()).unwrap();
        assert_eq!(p, Parse { name: "s1", sql: "select $1", param_types: vec![23] });
    }

    #[test]
    fn parse_with_lying_type_count_is_rejected() {
        let mut body = b"s\0select 1\0".to_vec();
        body.extend_from_slice(&1000i16.to_be_bytes());
        assert!(Parse::decode(&body).is_err());
        let mut body = b"s\0select 1\0".to_vec();
        body.extend_from_slice(&(-1i16).to_be_bytes());
        assert!(Parse::decode(&body).is_err());
    }

    #[test]
    fn bind_rename_keeps_everything_after_the_names() {
        let body = b"p\0s1\0\x00\x00\x00\x01\x00\x00\x00\x01x\x00\x00";
        let bind = Bind::decode(body).unwrap();
        assert_eq!((bind.portal, bind.statement), ("p", "s1"));
        let mut out = BytesMut::new();
        bind.encode_renamed(&mut out, "pgwarp_abc");
        let msg = Message::from_frame(out.freeze());
        let again = Bind::decode(msg.body()).unwrap();
        assert_eq!(again.statement, "pgwarp_abc");
        assert_eq!(again.rest, bind.rest);
    }

    #[test]
    fn describe_and_close_targets() {
        assert_eq!(Named::decode(DESCRIBE, b"Sfoo\0").unwrap(), Named { target: Target::Statement, name: "foo" });
        assert_eq!(Named::decode(CLOSE, b"P\0").unwrap(), Named { target: Target::Portal, name: "" });
        assert!(Named::decode(CLOSE, b"Xfoo\0").is_err());
        assert!(Named::decode(CLOSE, b"Sfoo").is_err());
    }

    #[test]
    fn execute_reads_row_limit() {
        let e = Execute::decode(b"\0\x00\x00\x00\x0a").unwrap();
        assert_eq!(e, Execute { portal: "", max_rows: 10 });
    }
}
