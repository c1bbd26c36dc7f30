//! `pgwarp`: parse flags and config, start the server, turn signals into shutdown.

use std::process::ExitCode;

use clap::Parser;
use pgwarp::cli::{Cli, Command, ConfigSource, TunnelArgs};
use pgwarp::server::{ReloadHandle, Server, ShutdownHandle, ShutdownMode};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Tunnel(args)) = cli.command {
        return run_tunnel(args);
    }
    let source = ConfigSource::new(cli.run, std::env::var("DATABASE_URL").ok());
    let config = match source.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgwarp: {e}");
            return ExitCode::from(2);
        }
    };
    // Clients run on the server's worker threads; this runtime only accepts and handles signals.
    let Some(runtime) = start(&config.log_level) else { return ExitCode::FAILURE };
    runtime.block_on(async move {
        let server = match Server::bind(config).await {
            Ok(s) => s.with_source(source),
            Err(e) => {
                eprintln!("pgwarp: {e}");
                return ExitCode::from(2);
            }
        };
        tokio::spawn(shutdown_on_signal(server.shutdown_handle()));
        tokio::spawn(reload_on_sighup(server.reload_handle()));
        server.run().await;
        ExitCode::SUCCESS
    })
}

/// Logging to stderr at `level`, and a runtime on the calling thread (the work itself runs on
/// `workers`); None (after saying why) if it cannot start.
fn start(level: &str) -> Option<tokio::runtime::Runtime> {
    let filter =
        tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: escape codes in a log file or a container's log are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("pgwarp: cannot start the runtime: {e}");
            None
        }
    }
}

/// `pgwarp tunnel`: the far end, next to a private database.
fn run_tunnel(args: TunnelArgs) -> ExitCode {
    // Sessions run on the tunnel's worker threads; this runtime only accepts and handles signals.
    let Some(runtime) = start(&args.log_level) else { return ExitCode::FAILURE };
    let config = pgwarp::tunnel::TunnelConfig {
        listen: args.listen,
        target: args.target,
        client_id: args.client_id,
        client_secret: args.client_secret,
        tls: args.tls_cert.zip(args.tls_key),
        max_sessions: args.max_sessions,
        workers: args.workers,
        busy_poll: args.busy_poll.0,
        ws: pgwarp::transport::websocket::WsConfig::default(),
    };
    runtime.block_on(async move {
        let tunnel = match pgwarp::tunnel::Tunnel::bind(config).await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("pgwarp: {e}");
                return ExitCode::from(2);
            }
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let signal_stop = stop.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            signal_stop.cancel();
        });
        let term_stop = stop.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            if let Ok(mut term) = signal(SignalKind::terminate()) {
                term.recv().await;
                term_stop.cancel();
            }
        });
        tunnel.run(stop).await;
        ExitCode::SUCCESS
    })
}

async fn reload_on_sighup(handle: ReloadHandle) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the configuration");
        handle.reload().await;
    }
}

async fn shutdown_on_signal(handle: ShutdownHandle) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    // A signal drains; one while draining already (after another, or the console's SHUTDOWN
    // WAIT_FOR_SERVERS) closes whoever is left at once.
    loop {
        let signal = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        let mode = if handle.draining() { ShutdownMode::Now } else { ShutdownMode::Drain };
        tracing::info!(?mode, "{signal}: shutting down");
        handle.shutdown(mode);
    }
}
