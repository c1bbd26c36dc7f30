//! Views of the origin's messages that pgwarp has to look inside.

use super::{DecodeError, Fields};

pub const AUTHENTICATION: u8 = b'R';
pub const PARAMETER_STATUS: u8 = b'S';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const ERROR_RESPONSE: u8 = b'E';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const NOTIFICATION_RESPONSE: u8 = b'A';
pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const PARAMETER_DESCRIPTION: u8 = b't';
pub const ROW_DESCRIPTION: u8 = b'T';
pub const NO_DATA: u8 = b'n';
pub const DATA_ROW: u8 = b'D';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
pub const PORTAL_SUSPENDED: u8 = b's';
pub const COPY_IN_RESPONSE: u8 = b'G';
pub const COPY_OUT_RESPONSE: u8 = b'H';
pub const COPY_BOTH_RESPONSE: u8 = b'W';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';

/// The transaction status a ReadyForQuery carries: `I`, `T` or `E`.
pub fn ready_status(body: &[u8]) -> Result<u8, DecodeError> {
    let status = Fields::new(READY_FOR_QUERY, body).u8()?;
    match status {
        b'I' | b'T' | b'E' => Ok(status),
        _ => Err(DecodeError::Invalid { tag: 'Z', what: "unknown transaction status" }),
    }
}

pub fn command_tag(body: &[u8]) -> Result<&str, DecodeError> {
    Fields::new(COMMAND_COMPLETE, body).cstr()
}

pub fn parameter_status(body: &[u8]) -> Result<(&str, &str), DecodeError> {
    let mut f = Fields::new(PARAMETER_STATUS, body);
    Ok((f.cstr()?, f.cstr()?))
}

pub fn backend_key_data(body: &[u8]) -> Result<(i32, i32), DecodeError> {
    let mut f = Fields::new(BACKEND_KEY_DATA, body);
    Ok((f.i32()?, f.i32()?))
}

/// An Authentication request from the origin.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthRequest<'a> {
    Ok,
    Cleartext,
    Md5 { salt: [u8; 4] },
    Sasl { mechanisms: Vec<&'a str> },
    SaslContinue { data: &'a [u8] },
    SaslFinal { data: &'a [u8] },
    Other(i32),
}

pub fn auth_request(body: &[u8]) -> Result<AuthRequest<'_>, DecodeError> {
    let mut f = Fields::new(AUTHENTICATION, body);
    Ok(match f.i32()? {
        0 => AuthRequest::Ok,
        3 => AuthRequest::Cleartext,
        5 => {
            let s = f.bytes(4)?;
            AuthRequest::Md5 { salt: [s[0], s[1], s[2], s[3]] }
        }
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let m = f.cstr()?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(m);
            }
            AuthRequest::Sasl { mechanisms }
        }
        11 => AuthRequest::SaslContinue { data: f.rest() },
        12 => AuthRequest::SaslFinal { data: f.rest() },
        other => AuthRequest::Other(other),
    })
}

/// The columns of a DataRow as text (None for NULL). Used only for pgwarp's own small queries.
pub fn data_row_text(body: &[u8]) -> Result<Vec<Option<String>>, DecodeError> {
    let mut f = Fields::new(DATA_ROW, body);
    let n = f.count()?;
    let mut out = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let len = f.i32()?;
        if len < 0 {
            out.push(None);
        } else {
            let raw = f.bytes(len as usize)?;
            out.push(Some(String::from_utf8_lossy(raw).into_owned()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ready_status() {
        assert_eq!(ready_status(b"T").unwrap(), b'T');
        assert!(ready_status(b"X").is_err());
        assert!(ready_status(b"").is_err());
    }

    #[test]
    fn reads_sasl_mechanisms() {
        let mut body = 10i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"SCRAM-SHA-256\0SCRAM-SHA-256-PLUS\0\0");
        assert_eq!(
            auth_request(&body).unwrap(),
            AuthRequest::Sasl { mechanisms: vec!["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"] }
        );
    }

    #[test]
    fn reads_data_row_with_null() {
        let mut body = 2i16.to_be_bytes().to_vec();
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(data_row_text(&body).unwrap(), vec![Some("abc".into()), None]);
    }

    #[test]
    fn data_row_with_lying_length_is_rejected() {
        let mut body = 1i16.to_be_bytes().to_vec();
        body.extend_from_slice(&100i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        assert!(data_row_text(&body).is_err());
    }
}
