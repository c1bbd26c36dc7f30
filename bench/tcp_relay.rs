//! The cheapest extra hop: a TCP relay that copies bytes both ways and does nothing else, on the
//! same runtime layout as `pgwarp tunnel` (one single-threaded tokio runtime per core).
//! bench/run.sh puts it where the tunnel goes (pgwarp -> relay -> PostgreSQL) to show what any
//! far-end process costs on this machine before a WebSocket frame is built: the tunnel can only
//! get as close to plain TCP as this does.
//!
//! Usage: `tcp_relay --listen ADDR --target ADDR`

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::{Builder, Handle};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, target) = match args.as_slice() {
        [l, listen, t, target] if l == "--listen" && t == "--target" => (listen.clone(), target.clone()),
        _ => {
            eprintln!("usage: tcp_relay --listen ADDR --target ADDR");
            return ExitCode::from(2);
        }
    };
    match run(&listen, target) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcp_relay: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(listen: &str, target: String) -> std::io::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut workers: Vec<Handle> = Vec::with_capacity(cores);
    for _ in 0..cores {
        let runtime = Builder::new_current_thread().enable_all().build()?;
        workers.push(runtime.handle().clone());
        std::thread::spawn(move || runtime.block_on(std::future::pending::<()>()));
    }
    let next = AtomicUsize::new(0);
    let acceptor = Builder::new_current_thread().enable_all().build()?;
    acceptor.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        loop {
            let (client, _) = listener.accept().await?;
            let client = client.into_std()?;
            let target = target.clone();
            let worker = &workers[next.fetch_add(1, Ordering::Relaxed) % workers.len()];
            worker.spawn(async move {
                let _ = relay(client, &target).await;
            });
        }
    })
}

async fn relay(client: std::net::TcpStream, target: &str) -> std::io::Result<()> {
    let mut client = TcpStream::from_std(client)?;
    let mut server = TcpStream::connect(target).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}
