//! TLS with BoringSSL: the acceptor for clients (reloadable, for SIGHUP) and the connector for
//! the origin with libpq's sslmode semantics.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use boring::nid::Nid;
use boring::ssl::{SslAcceptor, SslConnector, SslFiletype, SslMethod, SslVerifyMode};
use boring::x509::X509Name;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_boring::SslStream;

use crate::config::SslMode;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
}

fn config_error(what: &str, path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(format!("{what} {}: {e}", path.display()))
}

/// The server side for clients. Holds the certificate paths so it can be reloaded in place.
pub struct ClientTls {
    cert: PathBuf,
    key: PathBuf,
    /// The CAs client certificates must chain to, when clients must present one.
    client_ca: Option<PathBuf>,
    acceptor: RwLock<Arc<SslAcceptor>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientTls({})", self.cert.display())
    }
}

impl ClientTls {
    /// `client_ca`: ask every client for a certificate, and refuse the handshake unless one
    /// of these CAs signed it.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ClientTls, TlsError> {
        let acceptor = build_acceptor(cert, key, client_ca)?;
        Ok(ClientTls {
            cert: cert.to_owned(),
            key: key.to_owned(),
            client_ca: client_ca.map(Path::to_owned),
            acceptor: RwLock::new(Arc::new(acceptor)),
        })
    }

    /// Re-reads the certificate, key and client CAs; on failure the old ones stay in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let acceptor = build_acceptor(&self.cert, &self.key, self.client_ca.as_deref())?;
        *self.acceptor.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(acceptor);
        Ok(())
    }

    pub async fn accept<S>(&self, stream: S) -> Result<SslStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = self.acceptor.read().unwrap_or_else(|e| e.into_inner()).clone();
        tokio_boring::accept(&acceptor, stream).await.map_err(|e| TlsError::Handshake(e.to_string()))
    }
}

fn build_acceptor(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<SslAcceptor, TlsError> {
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).map_err(|e| TlsError::Config(e.to_string()))?;
    b.set_certificate_chain_file(cert).map_err(|e| config_error("cannot use certificate", cert, e))?;
    b.set_private_key_file(key, SslFiletype::PEM).map_err(|e| config_error("cannot use key", key, e))?;
    b.check_private_key().map_err(|e| config_error("key does not match certificate", key, e))?;
    if let Some(ca) = client_ca {
        let cannot = |e| config_error("cannot use client CA file", ca, e);
        b.set_ca_file(ca).map_err(cannot)?;
        // Named in the certificate request, so a client with several certificates picks the
        // right one.
        let names = X509Name::load_client_ca_file(ca).map_err(cannot)?;
        b.set_client_ca_list(names);
        b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    }
    Ok(b.build())
}

/// The common name in the certificate a TLS peer presented, if it presented one with a
/// UTF-8 common name.
pub fn peer_common_name<S>(stream: &SslStream<S>) -> Option<String> {
    let cert = stream.ssl().peer_certificate()?;
    let entry = cert.subject_name().entries_by_nid(Nid::COMMONNAME).next()?;
    entry.data().as_utf8().ok().map(|name| name.to_string())
}

/// How pgwarp speaks TLS to the origin, from the origin URL's ssl parameters.
pub struct OriginTls {
    pub mode: SslMode,
    connector: Option<SslConnector>,
    verify_hostname: bool,
}

impl std::fmt::Debug for OriginTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OriginTls({:?})", self.mode)
    }
}

impl OriginTls {
    /// libpq semantics: `require` encrypts without checking the certificate (unless a root
    /// certificate is given, as libpq does), `verify-ca` checks the chain, `verify-full` the
    /// chain and the host name. `sslrootcert=system` uses the system's roots.
    pub fn new(
        mode: SslMode,
        rootcert: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<OriginTls, TlsError> {
        if mode == SslMode::Disable {
            return Ok(OriginTls { mode, connector: None, verify_hostname: false });
        }
        let mut b = SslConnector::builder(SslMethod::tls()).map_err(|e| TlsError::Config(e.to_string()))?;
        let verify_chain =
            matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) || (mode == SslMode::Require && rootcert.is_some());
        match rootcert {
            Some(p) if p.as_os_str() == "system" => {
                b.set_default_verify_paths().map_err(|e| TlsError::Config(e.to_string()))?
            }
            Some(p) => b.set_ca_file(p).map_err(|e| config_error("cannot read sslrootcert", p, e))?,
            None if verify_chain => {
                return Err(TlsError::Config(format!(
                    "sslmode={} needs sslrootcert (a CA file, or \"system\")",
                    mode.as_str()
                )))
            }
            None => {}
        }
        b.set_verify(if verify_chain { SslVerifyMode::PEER } else { SslVerifyMode::NONE });
        if let Some(cert) = cert {
            b.set_certificate_chain_file(cert).map_err(|e| config_error("cannot use sslcert", cert, e))?;
            let key = key.ok_or_else(|| TlsError::Config("sslcert needs sslkey".into()))?;
            b.set_private_key_file(key, SslFiletype::PEM).map_err(|e| config_error("cannot use sslkey", key, e))?;
        }
        Ok(OriginTls { mode, connector: Some(b.build()), verify_hostname: mode == SslMode::VerifyFull })
    }

    /// Whether to ask the origin for TLS at all.
    pub fn wanted(&self) -> bool {
        self.connector.is_some()
    }

    /// Whether a refusal ('N') is fatal.
    pub fn required(&self) -> bool {
        matches!(self.mode, SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull)
    }

    pub async fn connect<S>(&self, host: &str, stream: S) -> Result<SslStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let connector = self.connector.as_ref().ok_or_else(|| TlsError::Config("TLS is disabled".into()))?;
        let mut config = connector.configure().map_err(|e| TlsError::Config(e.to_string()))?;
        config.set_verify_hostname(self.verify_hostname);
        // SNI only makes sense for names, not addresses.
        config.set_use_server_name_indication(host.parse::<std::net::IpAddr>().is_err());
        tokio_boring::connect(config, host, stream).await.map_err(|e| {
            let reason = e
                .ssl()
                .and_then(|ssl| ssl.verify_result().err())
                .map(|r| format!("certificate verify failed: {}", r.error_string()));
            TlsError::Handshake(reason.unwrap_or_else(|| e.to_string()))
        })
    }
}
