//! Encoders for the messages pgwarp writes itself, on either side of the proxy.

use bytes::{BufMut, Bytes, BytesMut};

use super::error::{Severity, SqlState};

/// Writes one tagged message: the tag, a length placeholder, the body, then the real length.
pub fn frame_into(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn frame(tag: u8, body: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut out = BytesMut::new();
    frame_into(&mut out, tag, body);
    out.freeze()
}

pub fn put_cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

/// An ErrorResponse with severity, SQLSTATE and message.
pub fn error(severity: Severity, code: SqlState, message: &str) -> Bytes {
    error_with_code(severity, code.code(), message)
}

/// An ErrorResponse with a SQLSTATE that came from elsewhere (the origin).
pub fn error_with_code(severity: Severity, code: &str, message: &str) -> Bytes {
    frame(b'E', |b| {
        b.put_u8(b'S');
        put_cstr(b, severity.as_str());
        b.put_u8(b'V');
        put_cstr(b, severity.as_str());
        b.put_u8(b'C');
        put_cstr(b, code);
        b.put_u8(b'M');
        put_cstr(b, message);
        b.put_u8(0);
    })
}

pub fn ready_for_query(status: u8) -> Bytes {
    frame(b'Z', |b| b.put_u8(status))
}

pub fn parameter_status(name: &str, value: &str) -> Bytes {
    frame(b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    })
}

pub fn backend_key_data(pid: i32, secret: i32) -> Bytes {
    frame(b'K', |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    })
}

pub fn auth_ok() -> Bytes {
    frame(b'R', |b| b.put_i32(0))
}

pub fn auth_md5(salt: [u8; 4]) -> Bytes {
    frame(b'R', |b| {
        b.put_i32(5);
        b.put_slice(&salt);
    })
}

pub fn auth_sasl(mechanisms: &[&str]) -> Bytes {
    frame(b'R', |b| {
        b.put_i32(10);
        for m in mechanisms {
            put_cstr(b, m);
        }
        b.put_u8(0);
    })
}

pub fn auth_sasl_continue(data: &[u8]) -> Bytes {
    frame(b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    })
}

pub fn auth_sasl_final(data: &[u8]) -> Bytes {
    frame(b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    })
}

/// NegotiateProtocolVersion: the newest protocol version we speak, as `major << 16 | minor`
/// (what Postgres sends, and libpq 18 reads, despite older docs saying "minor version"), and
/// the options we ignored.
pub fn negotiate_protocol_version(version: i32, unsupported: &[String]) -> Bytes {
    frame(b'v', |b| {
        b.put_i32(version);
        b.put_i32(unsupported.len() as i32);
        for opt in unsupported {
            put_cstr(b, opt);
        }
    })
}

pub fn parse_complete() -> Bytes {
    frame(b'1', |_| {})
}

pub fn close_complete() -> Bytes {
    frame(b'3', |_| {})
}

/// A RowDescription of text-format columns, each `(name, type oid)`.
pub fn row_description_into(out: &mut BytesMut, columns: &[(&str, u32)]) {
    frame_into(out, b'T', |b| {
        b.put_i16(columns.len().min(i16::MAX as usize) as i16);
        for (name, oid) in columns {
            put_cstr(b, name);
            b.put_i32(0); // table oid
            b.put_i16(0); // column number
            b.put_u32(*oid);
            b.put_i16(-1); // type size: variable
            b.put_i32(-1); // type modifier
            b.put_i16(0); // text format
        }
    });
}

/// A DataRow of text values; `None` is NULL.
pub fn data_row_into(out: &mut BytesMut, values: &[Option<String>]) {
    frame_into(out, b'D', |b| put_values(b, values.iter().map(Option::as_deref)));
}

/// A count, then each value with its length (-1 for NULL), as DataRow and Bind carry them.
fn put_values<'a>(b: &mut BytesMut, values: impl ExactSizeIterator<Item = Option<&'a str>>) {
    b.put_i16(values.len().min(i16::MAX as usize) as i16);
    for v in values {
        match v {
            Some(v) => {
                b.put_i32(v.len() as i32);
                b.put_slice(v.as_bytes());
            }
            None => b.put_i32(-1),
        }
    }
}

/// A NoticeResponse (severity NOTICE, SQLSTATE 00000).
pub fn notice(message: &str) -> Bytes {
    frame(b'N', |b| {
        for (field, value) in [(b'S', "NOTICE"), (b'V', "NOTICE"), (b'C', "00000"), (b'M', message)] {
            b.put_u8(field);
            put_cstr(b, value);
        }
        b.put_u8(0);
    })
}

pub fn command_complete(tag: &str) -> Bytes {
    frame(b'C', |b| put_cstr(b, tag))
}

// ---- frontend messages pgwarp sends to the origin ----

pub fn query(sql: &str) -> Bytes {
    frame(b'Q', |b| put_cstr(b, sql))
}

pub fn sync() -> Bytes {
    frame(b'S', |_| {})
}

pub fn flush() -> Bytes {
    frame(b'H', |_| {})
}

pub fn terminate() -> Bytes {
    frame(b'X', |_| {})
}

pub fn password(data: &[u8]) -> Bytes {
    frame(b'p', |b| b.put_slice(data))
}

pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Bytes {
    frame(b'p', |b| {
        put_cstr(b, mechanism);
        b.put_i32(data.len() as i32);
        b.put_slice(data);
    })
}

/// Parse with the given statement name, query text and parameter type OIDs.
pub fn parse_into(out: &mut BytesMut, name: &str, sql: &str, param_types: &[u32]) {
    frame_into(out, b'P', |b| {
        put_cstr(b, name);
        put_cstr(b, sql);
        b.put_i16(param_types.len() as i16);
        for t in param_types {
            b.put_u32(*t);
        }
    });
}

/// Bind of the unnamed portal to statement `statement`, with text parameters (None: NULL) and
/// text results.
pub fn bind_text_into(out: &mut BytesMut, statement: &str, params: &[Option<&str>]) {
    frame_into(out, b'B', |b| {
        put_cstr(b, "");
        put_cstr(b, statement);
        b.put_i16(0);
        put_values(b, params.iter().copied());
        b.put_i16(0);
    });
}

/// Execute of the unnamed portal, all rows.
pub fn execute_into(out: &mut BytesMut) {
    frame_into(out, b'E', |b| {
        put_cstr(b, "");
        b.put_i32(0);
    });
}

/// Close of a prepared statement by name.
pub fn close_statement_into(out: &mut BytesMut, name: &str) {
    frame_into(out, b'C', |b| {
        b.put_u8(b'S');
        put_cstr(b, name);
    });
}

/// The untagged StartupMessage for protocol 3.0.
pub fn startup(params: &[(&str, &str)]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i32(0);
    b.put_i32(196_608);
    for (k, v) in params {
        put_cstr(&mut b, k);
        put_cstr(&mut b, v);
    }
    b.put_u8(0);
    let len = b.len() as i32;
    b[0..4].copy_from_slice(&len.to_be_bytes());
    b.freeze()
}

pub fn cancel_request(pid: i32, secret: i32) -> Bytes {
    let mut b = BytesMut::with_capacity(16);
    b.put_i32(16);
    b.put_i32(80_877_102);
    b.put_i32(pid);
    b.put_i32(secret);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_length_counts_itself_but_not_the_tag() {
        let m = ready_for_query(b'I');
        assert_eq!(&m[..], &[b'Z', 0, 0, 0, 5, b'I']);
    }

    #[test]
    fn startup_packet_has_version_and_terminator() {
        let s = startup(&[("user", "u")]);
        assert_eq!(i32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize, s.len());
        assert_eq!(&s[4..8], &196_608i32.to_be_bytes());
        assert_eq!(s[s.len() - 1], 0);
    }
}
