//! The admin endpoint: a small HTTP listener (`admin_listen`) beside the Postgres one, for the
//! things that watch pgwarp rather than query through it.
//!
//! - `GET /metrics`: pools, clients and the query cache in the OpenMetrics text format
//!   (`metrics`), for Prometheus.
//! - `GET /healthz`: `200 ok` while pgwarp accepts clients, `503 draining` once shutdown began
//!   (in any mode: also while `SHUTDOWN WAIT_FOR_CLIENTS` serves the clients it has),
//!   for container health checks and load balancers (liveness).
//! - `GET /readyz`: `200 ok` while the origin is reachable, `503` with the reason when it is
//!   not (readiness; see `ready`).
//!
//! One request per connection, each read with a deadline and a size cap, and a cap on how many
//! are served at once, so a slow or hostile scraper cannot hold resources the pooler needs. The
//! listener runs until the server's `run` ends, so health checks see the drain.

pub mod console;
pub mod http;
pub mod listing;
pub mod metrics;
pub mod ready;
pub mod stats_log;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::server::ServerContext;
use http::{HttpError, Method, RequestHead, Response};

/// Admin connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;
/// Deadline for a request to arrive and its answer to be written.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[error("cannot listen for admin requests on {addr}: {source}")]
pub struct AdminError {
    addr: String,
    source: std::io::Error,
}

/// The bound admin listener.
pub struct AdminListener {
    listener: TcpListener,
}

impl AdminListener {
    /// Listens on `addr` (an IP address and port), with SO_REUSEPORT when `reuse_port`.
    pub fn bind(addr: &str, reuse_port: bool) -> Result<AdminListener, AdminError> {
        let error = |source| AdminError { addr: addr.to_owned(), source };
        let parsed = addr.parse().map_err(|e| error(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
        let listener = crate::transport::listen::listen(parsed, reuse_port).map_err(error)?;
        Ok(AdminListener { listener })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves admin requests until the task running it is dropped.
    pub async fn run(self, ctx: Arc<ServerContext>) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let readiness = Arc::new(ready::Readiness::default());
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            match self.listener.accept().await {
                Ok((socket, _)) => {
                    let (ctx, readiness) = (ctx.clone(), readiness.clone());
                    tokio::spawn(async move {
                        let _permit = permit;
                        if tokio::time::timeout(REQUEST_TIMEOUT, serve(&ctx, &readiness, socket)).await.is_err() {
                            tracing::debug!("admin request timed out");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Reads one request head, answers it, and closes the connection.
async fn serve(ctx: &ServerContext, readiness: &ready::Readiness, mut socket: TcpStream) {
    let (method, response, unread) = match read_head(&mut socket).await {
        // The one answer that may need I/O (a probe of the origin).
        Some(Ok(head)) if head.path == "/readyz" && head.method != Method::Other => {
            (head.method, readiness.check(ctx).await, false)
        }
        Some(Ok(head)) => (head.method, respond(ctx, &head), false),
        Some(Err(e)) => (Method::Get, e.response(), true),
        None => return,
    };
    let _ = socket.write_all(&response.encode(method)).await;
    let _ = socket.shutdown().await;
    if unread {
        // Closing with unread input would reset the connection, and the peer could lose the
        // answer: read on (bounded by the request deadline) until it stops sending.
        let mut sink = [0u8; 4096];
        while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
    }
}

/// The request head, or why it is refused; `None` when the peer left first.
async fn read_head(socket: &mut TcpStream) -> Option<Result<RequestHead, HttpError>> {
    let mut received = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        match http::parse_head(&received) {
            Ok(Some(head)) => return Some(Ok(head)),
            Err(e) => return Some(Err(e)),
            // parse_head refuses anything past MAX_HEAD, so `received` stays bounded.
            Ok(None) => match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            },
        }
    }
}

/// The answer to a well-formed request.
fn respond(ctx: &ServerContext, head: &RequestHead) -> Response {
    match (head.path.as_str(), head.method) {
        ("/metrics", Method::Get | Method::Head) => Response {
            status: 200,
            content_type: metrics::CONTENT_TYPE,
            body: metrics::encode(metrics::Snapshot::take(ctx)).into_bytes(),
        },
        ("/healthz", Method::Get | Method::Head) => health(!ctx.accepting()),
        ("/metrics" | "/healthz" | "/readyz", Method::Other) => Response::text(405, "method not allowed\n"),
        _ => Response::text(404, "not found: try /metrics, /healthz or /readyz\n"),
    }
}

/// `/healthz`: healthy until shutdown begins.
fn health(draining: bool) -> Response {
    if draining {
        Response::text(503, "draining\n")
    } else {
        Response::text(200, "ok\n")
    }
}
