//! Just enough HTTP/1.1 for the admin endpoints: one request per connection, answered and closed.
//!
//! Pure functions: `parse_head` reads a request head out of the bytes received so far (capped at
//! `MAX_HEAD` before anything is kept), and `Response::encode` writes an answer. The socket code
//! in `admin` only moves bytes. Request bodies are never read: every route is a GET.

/// Longest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    /// Any other method: answered 405 on a known path.
    Other,
}

/// What an admin request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Method,
    /// The path without its query string.
    pub path: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("request head longer than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("malformed request line")]
    Malformed,
}

impl HttpError {
    /// The answer a client that sent this gets.
    pub fn response(self) -> Response {
        match self {
            HttpError::TooLarge => Response::text(431, "request head too large\n"),
            HttpError::Malformed => Response::text(400, "malformed request\n"),
        }
    }
}

/// The request head in `received`, once its blank line has arrived (`None` until then).
pub fn parse_head(received: &[u8]) -> Result<Option<RequestHead>, HttpError> {
    let Some(end) = find(received, b"\r\n\r\n") else {
        return if received.len() >= MAX_HEAD { Err(HttpError::TooLarge) } else { Ok(None) };
    };
    if end + 4 > MAX_HEAD {
        return Err(HttpError::TooLarge);
    }
    let line_end = find(received, b"\r\n").unwrap_or(end);
    let line = std::str::from_utf8(&received[..line_end]).map_err(|_| HttpError::Malformed)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed);
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err(HttpError::Malformed);
    }
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => Method::Other,
        _ => return Err(HttpError::Malformed),
    };
    let path = target.split_once('?').map_or(target, |(path, _)| path).to_owned();
    Ok(Some(RequestHead { method, path }))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// An answer, always with `Connection: close`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(status: u16, body: &str) -> Response {
        Response { status, content_type: "text/plain; charset=utf-8", body: body.as_bytes().to_vec() }
    }

    /// The bytes to send; a HEAD request gets the headers only.
    pub fn encode(&self, method: Method) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Error",
        };
        let allow = if self.status == 405 { "Allow: GET, HEAD\r\n" } else { "" };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Cache-Control: no-store\r\nConnection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if method != Method::Head {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: Method, path: &str) -> Option<RequestHead> {
        Some(RequestHead { method, path: path.to_owned() })
    }

    #[test]
    fn a_complete_get_is_parsed_without_its_query_string() {
        let req = b"GET /metrics?name[]=x HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n";
        assert_eq!(parse_head(req), Ok(head(Method::Get, "/metrics")));
        assert_eq!(parse_head(b"HEAD /healthz HTTP/1.0\r\n\r\n"), Ok(head(Method::Head, "/healthz")));
        assert_eq!(parse_head(b"POST /healthz HTTP/1.1\r\n\r\n"), Ok(head(Method::Other, "/healthz")));
    }

    #[test]
    fn an_incomplete_head_waits_for_more() {
        assert_eq!(parse_head(b""), Ok(None));
        assert_eq!(parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), Ok(None));
    }

    #[test]
    fn an_over_long_head_is_refused_before_its_end_arrives() {
        let mut req = b"GET / HTTP/1.1\r\nX: ".to_vec();
        req.resize(MAX_HEAD, b'a');
        assert_eq!(parse_head(&req), Err(HttpError::TooLarge));
        req.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_head(&req), Err(HttpError::TooLarge));
    }

    #[test]
    fn malformed_request_lines_are_refused() {
        for bad in [
            &b"GET /metrics\r\n\r\n"[..],
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics SPDY/3\r\n\r\n",
            b"get /metrics HTTP/1.1\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        ] {
            assert_eq!(parse_head(bad), Err(HttpError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn responses_carry_length_and_close_and_head_has_no_body() {
        let r = Response::text(200, "ok\n");
        let get = String::from_utf8(r.encode(Method::Get)).expect("utf-8");
        assert!(get.starts_with("HTTP/1.1 200 OK\r\n"), "{get}");
        assert!(get.contains("Content-Length: 3\r\n") && get.contains("Connection: close\r\n"), "{get}");
        assert!(get.ends_with("\r\n\r\nok\n"), "{get}");
        let head = String::from_utf8(r.encode(Method::Head)).expect("utf-8");
        assert!(head.ends_with("Connection: close\r\n\r\n"), "{head}");
        let not_allowed = String::from_utf8(Response::text(405, "").encode(Method::Other)).expect("utf-8");
        assert!(not_allowed.contains("Allow: GET, HEAD\r\n"), "{not_allowed}");
    }
}
