//! Opens many authenticated, idle client connections and holds them, so bench/run.sh can
//! measure how much memory a pooler spends per idle client.
//!
//! Usage: `idle_clients --url URL --count N [--hold-secs S] [--concurrency C]`
//!
//! Connections are opened at most C at a time (default 200) so the target sees a burst of
//! logins, not an unbounded flood. Each connection runs `SELECT 1` once, proving it is fully
//! usable, then sits idle. When all are open the program prints `connected N` on stdout and
//! holds them for S seconds (default 60). If any connection fails it reports the first error
//! on stderr, still prints how many connected, and exits with status 1.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_postgres::{Client, NoTls};

struct Args {
    url: String,
    count: usize,
    hold_secs: u64,
    concurrency: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut url = None;
    let mut count = None;
    let mut hold_secs = 60;
    let mut concurrency = 200;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        let number = |text: String| text.parse::<u64>().map_err(|err| format!("{flag}: {text:?}: {err}"));
        match flag.as_str() {
            "--url" => url = Some(value()?),
            "--count" => count = Some(number(value()?)? as usize),
            "--hold-secs" => hold_secs = number(value()?)?,
            "--concurrency" => concurrency = number(value()?)?.max(1) as usize,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args {
        url: url.ok_or("--url is required")?,
        count: count.ok_or("--count is required")?,
        hold_secs,
        concurrency,
    })
}

/// Connects, runs `SELECT 1`, and returns the client (the connection task keeps running).
async fn open_one(url: String) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client.simple_query("SELECT 1").await?;
    Ok(client)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(err) => {
            eprintln!("idle_clients: {err}");
            eprintln!("usage: idle_clients --url URL --count N [--hold-secs S] [--concurrency C]");
            return ExitCode::from(2);
        }
    };

    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let mut tasks = JoinSet::new();
    for _ in 0..args.count {
        let permit = Arc::clone(&permits).acquire_owned().await.expect("semaphore is never closed");
        let url = args.url.clone();
        tasks.spawn(async move {
            let result = open_one(url).await;
            drop(permit);
            result
        });
    }

    let mut clients = Vec::with_capacity(args.count);
    let mut failures = 0usize;
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined.map_err(|err| err.to_string()) {
            Ok(Ok(client)) => clients.push(client),
            Ok(Err(err)) => {
                failures += 1;
                first_error.get_or_insert_with(|| format!("{err:?}"));
            }
            Err(err) => {
                failures += 1;
                first_error.get_or_insert(err);
            }
        }
    }

    println!("connected {}", clients.len());
    eprintln!(
        "idle_clients: {} connected, {failures} failed in {:.1}s",
        clients.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some(err) = first_error {
        eprintln!("idle_clients: first error: {err}");
        return ExitCode::FAILURE;
    }

    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    drop(clients);
    ExitCode::SUCCESS
}
