//! Keepalive and the user timeout on pgwarp's TCP connections: clients' and the origin's (or
//! the tunnel's), as PgBouncer's `tcp_*` settings set them.
//!
//! A peer that vanishes without a word (a host powered off, a NAT or firewall that forgot the
//! connection) sends no reset. Without keepalive, an idle origin connection in the pool looks
//! alive until a client's query is sent on it, and a client waiting for a long query's answer
//! waits forever. Keepalive probes an idle connection and closes it when the peer stops
//! answering; the user timeout closes one whose sent data stays unacknowledged that long.
//! A zero means the operating system's own value.

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

use crate::config::Config;

/// What to set on each TCP connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpOptions {
    /// SO_KEEPALIVE. Off leaves the other keepalive values unused.
    pub keepalive: bool,
    /// Idle time before the first probe (TCP_KEEPIDLE); zero: the system's (2h on Linux).
    pub idle: Duration,
    /// Time between probes (TCP_KEEPINTVL); zero: the system's (75s).
    pub interval: Duration,
    /// Unanswered probes before the connection is closed (TCP_KEEPCNT); zero: the system's (9).
    pub probes: u32,
    /// How long sent data may stay unacknowledged (TCP_USER_TIMEOUT); zero: the system's
    /// retransmission limit (about 15 minutes).
    pub user_timeout: Duration,
}

impl Default for TcpOptions {
    /// PgBouncer's defaults: keepalive on, with the system's timings.
    fn default() -> TcpOptions {
        TcpOptions {
            keepalive: true,
            idle: Duration::ZERO,
            interval: Duration::ZERO,
            probes: 0,
            user_timeout: Duration::ZERO,
        }
    }
}

impl From<&Config> for TcpOptions {
    fn from(c: &Config) -> TcpOptions {
        TcpOptions {
            keepalive: c.tcp_keepalive,
            idle: c.tcp_keepidle,
            interval: c.tcp_keepintvl,
            probes: c.tcp_keepcnt,
            user_timeout: c.tcp_user_timeout,
        }
    }
}

impl TcpOptions {
    /// Sets these options on a connected TCP socket.
    pub fn apply(&self, socket: &impl AsFd) -> io::Result<()> {
        let socket = SockRef::from(socket);
        socket.set_keepalive(self.keepalive)?;
        if self.keepalive {
            let mut params = TcpKeepalive::new();
            let mut any = false;
            if !self.idle.is_zero() {
                params = params.with_time(self.idle);
                any = true;
            }
            if !self.interval.is_zero() {
                params = params.with_interval(self.interval);
                any = true;
            }
            if self.probes != 0 {
                params = params.with_retries(self.probes);
                any = true;
            }
            if any {
                socket.set_tcp_keepalive(&params)?;
            }
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if !self.user_timeout.is_zero() {
            socket.set_tcp_user_timeout(Some(self.user_timeout))?;
        }
        Ok(())
    }

    /// Sets these options, and on failure (a kernel without one of them) logs a warning, once
    /// per process, and leaves the connection as it is: it works without them.
    pub fn apply_or_warn(&self, socket: &impl AsFd, side: &'static str) {
        static WARNED: AtomicBool = AtomicBool::new(false);
        if let Err(e) = self.apply(socket) {
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, side, "cannot set the tcp_* options on a connection; going on without them");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ends of a loopback TCP connection.
    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn every_setting_reaches_the_socket() {
        let (socket, _peer) = pair();
        let options = TcpOptions {
            keepalive: true,
            idle: Duration::from_secs(61),
            interval: Duration::from_secs(7),
            probes: 4,
            user_timeout: Duration::from_millis(25_500),
        };
        options.apply(&socket).unwrap();
        let s = SockRef::from(&socket);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(61));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(7));
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 4);
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(Duration::from_millis(25_500)));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn zeros_leave_the_system_values_and_off_turns_keepalive_off() {
        let (socket, _peer) = pair();
        let s = SockRef::from(&socket);
        let system = (s.tcp_keepalive_time().unwrap(), s.tcp_keepalive_interval().unwrap());
        TcpOptions::default().apply(&socket).unwrap();
        assert!(s.keepalive().unwrap());
        assert_eq!((s.tcp_keepalive_time().unwrap(), s.tcp_keepalive_interval().unwrap()), system);
        assert_eq!(s.tcp_user_timeout().unwrap(), None);

        TcpOptions { keepalive: false, ..TcpOptions::default() }.apply(&socket).unwrap();
        assert!(!s.keepalive().unwrap());
    }
}
