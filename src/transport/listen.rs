//! Listening sockets, bound as `TcpListener::bind` binds them (SO_REUSEADDR, a backlog of
//! 1024), and with SO_REUSEPORT when asked: then another process may listen on the same port,
//! and the kernel spreads new connections over every listener until one closes. That is how a
//! new pgwarp takes over from an old one without refusing anyone (`so_reuseport`).

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

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
}
