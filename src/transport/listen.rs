//! Listening sockets, bound as `TcpListener::bind` binds them (SO_REUSEADDR, a backlog of
//! 1024), and with SO_REUSEPORT when asked: then another process may listen on the same port,
//! and the kernel spreads new connections over every listener until one closes. That is how a
//! new pgwarp takes over from an old one without refusing anyone (`so_reuseport`).
//!
//! Also the Unix-domain socket (`unix_socket_dir`), named as Postgres names its own,
//! `.s.PGSQL.<port>`, so `psql -h DIR -p PORT` finds it.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, TcpSocket, UnixListener};

/// Pending connections the kernel queues before `accept` (what `TcpListener::bind` uses).
const BACKLOG: u32 = 1024;

/// Listens on `addr`, an IP address and port.
pub fn listen(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// A listening Unix-domain socket. Its file is removed when this is dropped, unless another
/// process has put its own socket there since (a pgwarp taking over with `so_reuseport`).
pub struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file this process made.
    identity: (u64, u64),
}

impl UnixSocket {
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.identity {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// The longest path a Unix-domain socket may have (`sun_path` less its terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// How long the probe of an existing socket waits for an answer before taking the listener
/// for alive (a full backlog leaves a connect hanging).
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Listens on the Unix-domain socket `path` with permissions `mode`.
///
/// A socket file already there that nobody listens on (left by a process that died) is
/// replaced. One that a live process listens on is an error, unless `take_over`: then new
/// connections go to this process from now on, while the other keeps the ones it accepted.
/// A PostgreSQL server's socket (it keeps a `.lock` file beside it) is never touched.
/// The socket is bound under a temporary name and renamed into place, so a client never finds
/// the path missing or with the wrong permissions.
pub async fn listen_unix(path: &Path, mode: u32, take_over: bool) -> io::Result<UnixSocket> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        let message = format!("a socket path may have at most {MAX_SOCKET_PATH} bytes");
        return Err(io::Error::new(io::ErrorKind::InvalidInput, message));
    }
    let mut lock = path.as_os_str().to_owned();
    lock.push(".lock");
    if Path::new(&lock).exists() {
        let message = format!("{} exists: a PostgreSQL server owns this socket", Path::new(&lock).display());
        return Err(io::Error::new(io::ErrorKind::AddrInUse, message));
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "a file that is not a socket is in the way"));
        }
        Ok(_) => match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::UnixStream::connect(path)).await {
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Ok(Err(e)) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
            // Accepted, or so busy that its backlog is full: alive.
            _ if take_over => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process listens on it (so_reuseport lets a new pgwarp take it over)",
                ));
            }
        },
    }
    let (listener, staging) = bind_staging(path)?;
    // The identity is the staging file's: once renamed, the path may already be another's.
    let placed = std::fs::symlink_metadata(&staging).and_then(|meta| {
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&staging, path)?;
        Ok((meta.dev(), meta.ino()))
    });
    match placed {
        Ok(identity) => Ok(UnixSocket { listener, path: path.to_owned(), identity }),
        Err(e) => {
            let _ = std::fs::remove_file(&staging);
            Err(e)
        }
    }
}

/// Binds a socket beside `path` under a random name no longer than `path`'s own (so it fits
/// wherever `path` fits), retrying while the name is taken; never removes anything.
fn bind_staging(path: &Path) -> io::Result<(UnixListener, PathBuf)> {
    use std::hash::{BuildHasher, Hasher};
    let name_len = path.file_name().map_or(0, |n| n.len()).max(10);
    let mut last = io::Error::new(io::ErrorKind::AddrInUse, "no free staging name");
    for _ in 0..8 {
        let random = std::hash::RandomState::new().build_hasher().finish();
        let mut name = format!(".{random:016x}{random:016x}");
        name.truncate(name_len);
        let staging = path.with_file_name(name);
        match UnixListener::bind(&staging) {
            Ok(listener) => return Ok((listener, staging)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_listener_shares_the_port_only_when_both_reuse_it() {
        let first = listen("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = first.local_addr().unwrap();
        let second = listen(addr, true).expect("SO_REUSEPORT lets a second socket bind");
        assert_eq!(second.local_addr().unwrap(), addr);
        assert!(listen(addr, false).is_err(), "without it the port is taken");

        let plain = listen("127.0.0.1:0".parse().unwrap(), false).unwrap();
        assert!(listen(plain.local_addr().unwrap(), true).is_err(), "the first listener must allow it too");

        // Once the first closes, every new connection reaches the second.
        drop(first);
        for _ in 0..5 {
            let client = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (accepted, peer) = second.accept().await.unwrap();
            assert_eq!(peer, client.local_addr().unwrap());
            drop(accepted);
        }
    }

    #[tokio::test]
    async fn a_unix_socket_replaces_a_dead_one_and_refuses_a_live_one_unless_taking_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".s.PGSQL.6432");

        // Left behind by a process that died: bound, never removed.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let first = listen_unix(&path, 0o770, false).await.expect("a dead socket is replaced");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o770);
        let client = tokio::net::UnixStream::connect(&path).await.unwrap();
        drop(first.listener().accept().await.unwrap());
        drop(client);

        let refused = listen_unix(&path, 0o777, false).await.err().expect("a live socket is not taken");
        assert_eq!(refused.kind(), io::ErrorKind::AddrInUse);

        // Taking over: new connections reach the second; the first leaves its file alone.
        let second = listen_unix(&path, 0o777, true).await.expect("so_reuseport takes a live socket over");
        drop(first);
        assert!(path.exists(), "the first must not remove the second's socket");
        let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
        drop(second.listener().accept().await.unwrap());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 1, "no staging file left: {leftovers:?}");
        drop(second);
        assert!(!path.exists(), "the last listener removes its socket");

        std::fs::write(&path, "not a socket").unwrap();
        let in_the_way = listen_unix(&path, 0o777, true).await.err().expect("a plain file is never removed");
        assert_eq!(in_the_way.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
    }

    #[tokio::test]
    async fn a_postgres_servers_socket_is_never_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".s.PGSQL.5432");
        let _postgres = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::fs::write(dir.path().join(".s.PGSQL.5432.lock"), "4242\n").unwrap();
        let refused = listen_unix(&path, 0o777, true).await.err().expect("Postgres keeps its socket");
        assert!(refused.to_string().contains("PostgreSQL"), "{refused}");
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok(), "still Postgres's");
    }

    #[tokio::test]
    async fn the_staging_name_fits_where_the_socket_fits() {
        let dir = tempfile::tempdir().unwrap();
        let name = "s".repeat(MAX_SOCKET_PATH - dir.path().as_os_str().len() - 1);
        let path = dir.path().join(name);
        assert_eq!(path.as_os_str().len(), MAX_SOCKET_PATH);
        let socket = listen_unix(&path, 0o777, false).await.expect("a path of the longest length binds");
        assert!(path.exists());
        drop(socket);
        let longer = dir.path().join("s".repeat(MAX_SOCKET_PATH));
        let refused = listen_unix(&longer, 0o777, false).await.err().expect("too long");
        assert!(refused.to_string().contains("at most 107 bytes"), "{refused}");
    }
}
