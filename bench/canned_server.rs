//! A stand-in for PostgreSQL that does no work: it speaks just enough of the protocol to answer
//! pgbench's select-only transactions (and the cache bench's point select) with one canned row,
//! from a blocking thread per connection. bench/run.sh times it at one client to show the
//! floor under every latency on this machine for a server that sleeps while it waits: the
//! loopback round trip, the wake-ups of two halted CPUs, and pgbench itself. A server that
//! polls instead of sleeping (pgwarp's `busy_poll`) saves one of those wake-ups.
//!
//! Usage: `canned_server --listen ADDR`
//!
//! It accepts any user without a password, answers SSLRequest with `N`, and for each client
//! message answers what a server would for `SELECT abalance FROM pgbench_accounts WHERE aid = $1`:
//! ParseComplete, BindComplete, a one-column RowDescription, a DataRow `0`, `SELECT 1`. Simple
//! queries get the same row, except pgbench's start-up queries (the `count(*)` of branches for
//! the scale, the partitioning probe), which get answers pgbench accepts.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;

const INT4: u32 = 23;
const INT8: u32 = 20;
const CHAR: u32 = 18;
/// Cap on one client message: pgbench's are tiny.
const MAX_MESSAGE: usize = 1 << 20;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let listen = match (args.next().as_deref(), args.next()) {
        (Some("--listen"), Some(addr)) => addr,
        _ => {
            eprintln!("usage: canned_server --listen ADDR");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("canned_server: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = serve(stream);
        });
    }
    ExitCode::SUCCESS
}

fn serve(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    startup(&mut stream)?;
    let mut out = Vec::with_capacity(512);
    let mut buf = vec![0u8; 64 * 1024];
    let (mut start, mut end) = (0usize, 0usize);
    loop {
        while end - start >= 5 {
            let len = be_u32(&buf[start + 1..start + 5]) as usize;
            if !(4..=MAX_MESSAGE).contains(&len) {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "bad message length"));
            }
            if end - start < len + 1 {
                break;
            }
            let tag = buf[start];
            let body = &buf[start + 5..start + 1 + len];
            match tag {
                b'P' => message(&mut out, b'1', &[]),
                b'B' => message(&mut out, b'2', &[]),
                b'D' => {
                    if body.first() == Some(&b'S') {
                        // ParameterDescription: one int4 parameter.
                        message(&mut out, b't', &[0, 1, 0, 0, 0, 23]);
                    }
                    row_description(&mut out, &[("abalance", INT4)]);
                }
                b'E' => {
                    data_row(&mut out, &[Some("0")]);
                    message(&mut out, b'C', b"SELECT 1\0");
                }
                b'S' => {
                    message(&mut out, b'Z', b"I");
                    stream.write_all(&out)?;
                    out.clear();
                }
                b'H' => {
                    stream.write_all(&out)?;
                    out.clear();
                }
                b'Q' => {
                    simple_query(&mut out, body);
                    stream.write_all(&out)?;
                    out.clear();
                }
                b'X' => return Ok(()),
                _ => {}
            }
            start += len + 1;
        }
        if start == end {
            (start, end) = (0, 0);
        } else if start > 0 {
            buf.copy_within(start..end, 0);
            (start, end) = (0, end - start);
        }
        if end == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match stream.read(&mut buf[end..])? {
            0 => return Ok(()),
            n => end += n,
        }
    }
}

/// Answers SSLRequest with `N` until the StartupMessage, then logs the client in.
fn startup(stream: &mut TcpStream) -> io::Result<()> {
    let mut head = [0u8; 4];
    loop {
        stream.read_exact(&mut head)?;
        let len = be_u32(&head) as usize;
        if !(8..=10_000).contains(&len) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bad startup length"));
        }
        let mut body = vec![0u8; len - 4];
        stream.read_exact(&mut body)?;
        if len == 8 {
            // SSLRequest or GSSENCRequest.
            stream.write_all(b"N")?;
            continue;
        }
        break;
    }
    let mut out = Vec::new();
    message(&mut out, b'R', &0u32.to_be_bytes());
    for (name, value) in [
        ("server_version", "15.0"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        let mut body = Vec::new();
        for s in [name, value] {
            body.extend_from_slice(s.as_bytes());
            body.push(0);
        }
        message(&mut out, b'S', &body);
    }
    message(&mut out, b'K', &[0, 0, 0, 1, 0, 0, 0, 2]);
    message(&mut out, b'Z', b"I");
    stream.write_all(&out)
}

fn simple_query(out: &mut Vec<u8>, sql: &[u8]) {
    let sql = String::from_utf8_lossy(sql).to_ascii_lowercase();
    if sql.contains("partstrat") {
        // pgbench's partitioning probe: one partition-less pgbench_accounts.
        row_description(out, &[("n", INT4), ("partstrat", CHAR), ("count", INT8)]);
        data_row(out, &[Some("1"), None, Some("0")]);
    } else if sql.contains("count") {
        // pgbench's scale probe: count(*) of pgbench_branches.
        row_description(out, &[("count", INT8)]);
        data_row(out, &[Some("10")]);
    } else {
        row_description(out, &[("abalance", INT4)]);
        data_row(out, &[Some("0")]);
    }
    message(out, b'C', b"SELECT 1\0");
    message(out, b'Z', b"I");
}

fn message(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
}

fn row_description(out: &mut Vec<u8>, columns: &[(&str, u32)]) {
    let mut body = (columns.len() as u16).to_be_bytes().to_vec();
    for (name, oid) in columns {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(&[0; 6]); // table oid, column number
        body.extend_from_slice(&oid.to_be_bytes());
        body.extend_from_slice(&[0, 4, 255, 255, 255, 255, 0, 0]); // size, typmod -1, text
    }
    message(out, b'T', &body);
}

fn data_row(out: &mut Vec<u8>, values: &[Option<&str>]) {
    let mut body = (values.len() as u16).to_be_bytes().to_vec();
    for value in values {
        match value {
            Some(v) => {
                body.extend_from_slice(&(v.len() as u32).to_be_bytes());
                body.extend_from_slice(v.as_bytes());
            }
            None => body.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    message(out, b'D', &body);
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
