//! A TCP proxy that holds every chunk of bytes for a fixed time before passing it on, each way:
//! a far-away database on loopback. bench/run.sh puts it between the clients (or pgwarp) and
//! PostgreSQL to compare a cache hit with a round trip to a database in another data centre.
//!
//! Usage: `delay_proxy --listen ADDR --target ADDR --delay-us MICROSECONDS`
//!
//! The delay is one way, so a request and its answer take twice it on top of the real round
//! trip. Each direction of each connection has a reader thread that stamps what it reads with
//! the time it is due and a writer thread that sends it then (sleeping to the microsecond, not
//! to a runtime's millisecond timer), so a pipelined stream stays pipelined.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct Args {
    listen: String,
    target: String,
    delay: Duration,
}

fn parse_args() -> Result<Args, String> {
    let (mut listen, mut target, mut delay) = (None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = Some(value),
            "--target" => target = Some(value),
            "--delay-us" => {
                let us = value.parse::<u64>().map_err(|e| format!("--delay-us {value}: {e}"))?;
                delay = Some(Duration::from_micros(us));
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    match (listen, target, delay) {
        (Some(listen), Some(target), Some(delay)) => Ok(Args { listen, target, delay }),
        _ => Err("usage: delay_proxy --listen ADDR --target ADDR --delay-us MICROSECONDS".into()),
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("delay_proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(&args.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("delay_proxy: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    for client in listener.incoming().flatten() {
        let (target, delay) = (args.target.clone(), args.delay);
        std::thread::spawn(move || {
            if let Err(e) = proxy(client, &target, delay) {
                eprintln!("delay_proxy: {e}");
            }
        });
    }
    ExitCode::SUCCESS
}

/// Connects to the target and starts both directions.
fn proxy(client: TcpStream, target: &str, delay: Duration) -> io::Result<()> {
    let server = TcpStream::connect(target)?;
    for s in [&client, &server] {
        s.set_nodelay(true)?;
    }
    let (client2, server2) = (client.try_clone()?, server.try_clone()?);
    std::thread::spawn(move || one_way(client2, server2, delay));
    std::thread::spawn(move || one_way(server, client, delay));
    Ok(())
}

/// Copies `from` to `to`, each chunk `delay` after it was read; closes `to`'s write side at the end.
fn one_way(mut from: TcpStream, to: TcpStream, delay: Duration) {
    let (due, pending) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        let mut to = to;
        while let Ok((at, bytes)) = pending.recv() {
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if due.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(due);
    let _ = writer.join();
}
