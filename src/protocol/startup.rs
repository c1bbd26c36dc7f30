//! The untagged packets a connection opens with: SSLRequest, GSSENCRequest, CancelRequest and
//! StartupMessage. They are read with exact reads (never past the packet), because after an
//! SSLRequest the next bytes belong to a TLS handshake.

use tokio::io::{AsyncRead, AsyncReadExt};

use super::codec::FrameError;
use super::{DecodeError, Fields};

/// Startup packets are small; Postgres itself caps them at 10,000 bytes.
pub const MAX_STARTUP_PACKET: usize = 10_000;

const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;

#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: i32 },
    Startup { major: u16, minor: u16, params: Vec<(String, String)> },
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("startup packet is malformed: {0}")]
    Malformed(&'static str),
}

/// Reads one startup-phase packet. `Ok(None)` when the peer closed before sending anything.
pub async fn read_packet<R: AsyncRead + Unpin + ?Sized>(stream: &mut R) -> Result<Option<StartupPacket>, StartupError> {
    let mut len_buf = [0u8; 4];
    match stream.read_exact(&mut len_buf).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(FrameError::Io(e).into()),
    }
    let len = i32::from_be_bytes(len_buf);
    if !(8..=MAX_STARTUP_PACKET as i32).contains(&len) {
        return Err(if len > 0 {
            FrameError::TooLong { len: len as usize, max: MAX_STARTUP_PACKET }.into()
        } else {
            FrameError::BadLength { len: len.into() }.into()
        });
    }
    let mut body = vec![0u8; len as usize - 4];
    stream.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })?;
    decode(&body).map(Some)
}

/// Decodes a startup packet body (everything after the length).
pub fn decode(body: &[u8]) -> Result<StartupPacket, StartupError> {
    let mut f = Fields::new(0, body);
    let code = f.i32()?;
    match code {
        SSL_REQUEST if body.len() == 4 => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST if body.len() == 4 => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST if body.len() == 12 => Ok(StartupPacket::Cancel { pid: f.i32()?, secret: f.i32()? }),
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => Err(StartupError::Malformed("bad request length")),
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            let mut params = Vec::new();
            if major != 3 {
                // Another protocol's layout: refuse by version, without reading further.
                return Ok(StartupPacket::Startup { major, minor, params });
            }
            loop {
                let key = f.cstr()?;
                if key.is_empty() {
                    break;
                }
                let value = f.cstr()?;
                params.push((key.to_owned(), value.to_owned()));
            }
            if !f.is_empty() {
                return Err(StartupError::Malformed("trailing bytes after parameters"));
            }
            Ok(StartupPacket::Startup { major, minor, params })
        }
    }
}

/// Splits the `options` startup parameter into `name=value` settings, the way the postmaster
/// does: words separated by spaces (a backslash escapes the next character), each either
/// `-c name=value` / `-cname=value` or `--name=value`.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, &'static str> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    word.push(n);
                    in_word = true;
                }
            }
            c if c.is_ascii_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next().ok_or("-c without a setting")?
        } else if let Some(rest) = w.strip_prefix("-c") {
            rest.to_owned()
        } else if let Some(rest) = w.strip_prefix("--") {
            rest.to_owned()
        } else {
            return Err("only -c name=value and --name=value options are supported");
        };
        let (name, value) = setting.split_once('=').ok_or("option without '='")?;
        out.push((name.replace('-', "_"), value.to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::build;

    #[tokio::test]
    async fn reads_startup_message_params() {
        let pkt = build::startup(&[("user", "alice"), ("database", "db")]);
        let mut src: &[u8] = &pkt;
        match read_packet(&mut src).await.unwrap().unwrap() {
            StartupPacket::Startup { major, minor, params } => {
                assert_eq!((major, minor), (3, 0));
                assert_eq!(params[0], ("user".into(), "alice".into()));
                assert_eq!(params[1], ("database".into(), "db".into()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn reads_ssl_and_cancel_requests() {
        let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        let mut src: &[u8] = &ssl;
        assert_eq!(read_packet(&mut src).await.unwrap(), Some(StartupPacket::SslRequest));
        let cancel = build::cancel_request(42, 7);
        let mut src: &[u8] = &cancel;
        assert_eq!(read_packet(&mut src).await.unwrap(), Some(StartupPacket::Cancel { pid: 42, secret: 7 }));
    }

    #[tokio::test]
    async fn oversized_startup_packet_is_refused() {
        let pkt = 1_000_000i32.to_be_bytes();
        let mut src: &[u8] = &pkt;
        assert!(matches!(read_packet(&mut src).await, Err(StartupError::Frame(FrameError::TooLong { .. }))));
        let pkt = 2i32.to_be_bytes();
        let mut src: &[u8] = &pkt;
        assert!(read_packet(&mut src).await.is_err());
    }

    #[tokio::test]
    async fn unterminated_parameters_are_refused() {
        let mut body = 196_608i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0alice");
        let mut pkt = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        pkt.extend(body);
        let mut src: &[u8] = &pkt;
        assert!(read_packet(&mut src).await.is_err());
    }

    #[test]
    fn options_follow_postmaster_rules() {
        assert_eq!(
            parse_options("-c search_path=a,b --statement-timeout=5s -cwork_mem=4MB").unwrap(),
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "4MB".into())
            ]
        );
        assert_eq!(
            parse_options(r"-c application_name=my\ app").unwrap(),
            vec![("application_name".into(), "my app".into())]
        );
        assert!(parse_options("-x").is_err());
        assert!(parse_options("-c").is_err());
    }
}
