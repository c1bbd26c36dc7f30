//! A client's first moments: the untagged startup packets, protocol version, password check,
//! and the ParameterStatus / BackendKeyData / ReadyForQuery that make it a session.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use tokio::sync::OwnedSemaphorePermit;

use super::Session;
use crate::admin::console;
use crate::auth::lookup::LookupError;
use crate::auth::{random_bytes, ClientSecret, UserEntry};
use crate::config::{AuthMethod, ClientCertCheck};
use crate::origin::settings::{is_reserved, Settings};
use crate::origin::Credentials;
use crate::pool::{Pool, PoolError, StartupParamsError};
use crate::protocol::error::{Severity, SqlState};
use crate::protocol::frontend::PASSWORD;
use crate::protocol::scram::{ScramError, ScramExchange, ScramKeys};
use crate::protocol::startup::{self, StartupPacket};
use crate::protocol::{build, Fields, Message, MessageReader};
use crate::roster::{ClientEntry, ClientFacts, Listed};
use crate::server::ServerContext;
use crate::transport::{ClientStream, Peer};

/// The whole handshake must finish within this, so a silent client cannot hold a slot.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Password and SASL messages are small.
const MAX_AUTH_MESSAGE: usize = 8 * 1024;

/// A handshake that ended without a session: what to tell the client, if anything.
struct Refusal {
    code: String,
    message: String,
}

impl Refusal {
    fn new(code: SqlState, message: impl Into<String>) -> Self {
        Refusal { code: code.code().to_owned(), message: message.into() }
    }
}

/// What a successful handshake leads to.
pub enum Admitted {
    /// On the heap: the task's own state stays what an idle wait needs.
    Session(Box<Session>),
    /// An admin user asked for the admin console's database.
    Console {
        ctx: Arc<ServerContext>,
        stream: ClientStream,
        reader: MessageReader,
        listing: Listed<ClientEntry>,
        _permit: OwnedSemaphorePermit,
    },
}

pub async fn handshake(ctx: Arc<ServerContext>, mut stream: ClientStream, peer: Peer) -> Option<Admitted> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, run(&ctx, &mut stream)).await {
        Ok(Ok(Some(Login::Pooled(parts)))) => {
            ctx.clients.logged_in();
            let cancel = ctx.cancels.register(parts.pool.target());
            let listing = ctx.client_roster.add(ClientEntry::new(ClientFacts {
                user: parts.user.clone(),
                database: parts.database.clone(),
                peer,
                tls: stream.is_tls(),
                application_name: parts.settings.get("application_name").cloned().unwrap_or_default(),
                stop: Some(cancel.slot.clone()),
            }));
            Some(Admitted::Session(Box::new(Session::new(ctx, stream, parts, listing, cancel))))
        }
        Ok(Ok(Some(Login::Console { reader, permit, user, application_name }))) => {
            ctx.clients.logged_in();
            let listing = ctx.client_roster.add(ClientEntry::new(ClientFacts {
                user,
                database: console::DATABASE.to_owned(),
                peer,
                tls: stream.is_tls(),
                application_name,
                stop: None,
            }));
            Some(Admitted::Console { ctx, stream, reader, listing, _permit: permit })
        }
        Ok(Ok(None)) => None,
        Ok(Err(refusal)) => {
            tracing::info!(code = %refusal.code, "refused client: {}", refusal.message);
            ctx.clients.refused(&refusal.code);
            let msg = build::error_with_code(Severity::Fatal, &refusal.code, &refusal.message);
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                let _ = stream.write_all(&msg).await;
                let _ = stream.shutdown().await;
            })
            .await;
            None
        }
        Err(_) => {
            tracing::info!("client did not finish the handshake in time");
            None
        }
    }
}

/// What a finished handshake hands to the session.
pub struct Established {
    pub user: String,
    pub database: String,
    /// The pool of the origin role and database this client's work runs on.
    pub pool: Arc<Pool>,
    /// Shared with every client that logged in with the same settings.
    pub settings: Arc<Settings>,
    /// The origin has accepted these settings (else the session checks them on first use).
    pub settings_validated: bool,
    pub reader: MessageReader,
    pub permit: tokio::sync::OwnedSemaphorePermit,
}

/// A login that passed: to the pool, or to the admin console.
enum Login {
    Pooled(Established),
    Console { reader: MessageReader, permit: OwnedSemaphorePermit, user: String, application_name: String },
}

async fn run(ctx: &Arc<ServerContext>, stream: &mut ClientStream) -> Result<Option<Login>, Refusal> {
    let protocol_error =
        |e: &dyn std::fmt::Display| Refusal::new(SqlState::PROTOCOL_VIOLATION, format!("invalid startup packet: {e}"));
    let mut negotiations = 0;
    let (major, minor, params) = loop {
        let packet = match startup::read_packet(stream).await {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(None),
            Err(e) => return Err(protocol_error(&e)),
        };
        match packet {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                negotiations += 1;
                if negotiations > 2 || stream.is_tls() {
                    return Err(Refusal::new(SqlState::PROTOCOL_VIOLATION, "unexpected encryption request"));
                }
                let io = |_| Refusal::new(SqlState::CONNECTION_FAILURE, "");
                match (&packet, &ctx.tls) {
                    // Postgres offers no TLS on its Unix-domain socket, and neither does pgwarp.
                    (StartupPacket::SslRequest, Some(tls)) if !stream.is_unix() => {
                        stream.write_all(b"S").await.map_err(io)?;
                        if let Err(e) = stream.upgrade(tls).await {
                            tracing::info!(error = %e, "client TLS handshake failed");
                            return Ok(None);
                        }
                    }
                    // GSSAPI encryption is not offered; neither is TLS without a certificate.
                    _ => stream.write_all(b"N").await.map_err(io)?,
                }
            }
            StartupPacket::Cancel { pid, secret } => {
                ctx.cancels.cancel(pid, secret);
                return Ok(None);
            }
            StartupPacket::Startup { major, minor, params } => break (major, minor, params),
        }
    };
    if major != 3 {
        return Err(Refusal::new(
            SqlState::FEATURE_NOT_SUPPORTED,
            format!("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"),
        ));
    }
    let unsupported: Vec<String> =
        params.iter().filter(|(k, _)| k.starts_with("_pq_.")).map(|(k, _)| k.clone()).collect();
    if minor > 0 || !unsupported.is_empty() {
        stream
            .write_all(&build::negotiate_protocol_version(3 << 16, &unsupported))
            .await
            .map_err(|_| Refusal::new(SqlState::CONNECTION_FAILURE, ""))?;
    }
    // On the Unix-domain socket neither TLS nor a certificate is asked for, as in Postgres.
    let cert_check = ctx.config().client_cert_check();
    if !stream.is_tls() && !stream.is_unix() {
        if cert_check.is_some() {
            return Err(Refusal::new(
                SqlState::INVALID_AUTHORIZATION,
                "pgwarp requires a client certificate: connect with sslmode=require, sslcert and sslkey",
            ));
        }
        if ctx.config().tls_required {
            return Err(Refusal::new(
                SqlState::INVALID_AUTHORIZATION,
                "pgwarp requires an encrypted connection: connect with sslmode=require",
            ));
        }
    }
    let startup = StartupParams::from_packet(params)?;
    // The handshake checked the certificate's signature; verify-full also checks whose it is,
    // before any password is asked for.
    if cert_check == Some(ClientCertCheck::VerifyFull)
        && stream.is_tls()
        && stream.peer_common_name().as_deref() != Some(startup.user.as_str())
    {
        return Err(Refusal::new(
            SqlState::INVALID_AUTHORIZATION,
            format!("certificate authentication failed for user \"{}\"", startup.user),
        ));
    }
    let permit = ctx
        .client_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| Refusal::new(SqlState::TOO_MANY_CONNECTIONS, "sorry, too many clients already"))?;

    let mut reader = MessageReader::new(MAX_AUTH_MESSAGE);
    let console = startup.database == console::DATABASE && !ctx.config().admin_users.is_empty();
    let entry = find_user(ctx, &startup.user).await?;
    let keys = authenticate(ctx, stream, &mut reader, &startup.user, entry.as_ref().map(|e| &e.secret)).await?;
    let entry = entry.ok_or_else(|| password_failed(&startup.user))?;
    if console && !ctx.config().admin_users.contains(&startup.user) {
        let message = format!("user \"{}\" may not use the admin console (see admin_users)", startup.user);
        return Err(Refusal::new(SqlState::INVALID_AUTHORIZATION, message));
    }
    if !console && ctx.pools.is_disabled(&startup.database) {
        let message = format!(
            "database \"{}\" is not currently accepting connections (DISABLE in pgwarp's console)",
            startup.database
        );
        return Err(Refusal::new(SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, message));
    }
    stream.write_all(&build::auth_ok()).await.map_err(|_| Refusal::new(SqlState::CONNECTION_FAILURE, ""))?;
    if console {
        let reader = MessageReader::with_buffered(MAX_AUTH_MESSAGE, reader.into_buffer());
        tracing::info!(user = %startup.user, "admin console login");
        let application_name = startup.settings.get("application_name").cloned().unwrap_or_default();
        return Ok(Some(Login::Console { reader, permit, user: startup.user, application_name }));
    }

    let secret = entry.origin_secret(keys).ok_or_else(|| {
        // Pass-through needs the keys of a SCRAM login; a client admitted without one (trust)
        // cannot be carried to the origin.
        Refusal::new(SqlState::CONNECTION_REJECTED, "pgwarp has no way to log in to the origin as this user")
    })?;
    let creds = Credentials { user: entry.origin_user.clone(), secret, database: startup.database.clone() };
    let pool = ctx.pools.get(&creds);
    let (params, validated, settings) = pool.startup_params(startup.settings).await.map_err(|e| match e {
        StartupParamsError::Rejected(f) => Refusal { code: f.code, message: f.message },
        StartupParamsError::Pool(PoolError::Timeout(t)) => {
            Refusal::new(SqlState::TOO_MANY_CONNECTIONS, format!("no origin connection became free within {t:?}"))
        }
        StartupParamsError::Pool(PoolError::Origin(e)) => {
            tracing::warn!(error = %e, "origin unavailable during client startup");
            let (code, message) = e.client_facing();
            Refusal { code, message }
        }
        StartupParamsError::Pool(PoolError::Closed) => {
            Refusal::new(SqlState::ADMIN_SHUTDOWN, "pgwarp is shutting down")
        }
    })?;
    let mut hello = BytesMut::new();
    for (k, v) in params.iter() {
        hello.extend_from_slice(&build::parameter_status(k, v));
    }
    // BackendKeyData and ReadyForQuery are written by the session, which owns the cancel key.
    stream.write_all(&hello).await.map_err(|_| Refusal::new(SqlState::CONNECTION_FAILURE, ""))?;
    let leftover = reader.into_buffer();
    let reader = MessageReader::with_buffered(ctx.config().max_message_size, leftover);
    if ctx.config().log_connections {
        tracing::info!(user = %startup.user, database = %startup.database, tls = stream.is_tls(), "client logged in");
    } else {
        tracing::debug!(user = %startup.user, database = %startup.database, "client logged in");
    }
    Ok(Some(Login::Pooled(Established {
        user: startup.user,
        database: startup.database,
        pool,
        settings,
        settings_validated: validated,
        reader,
        permit,
    })))
}

fn password_failed(user: &str) -> Refusal {
    Refusal::new(SqlState::INVALID_PASSWORD, format!("password authentication failed for user \"{user}\""))
}

/// The startup packet's parameters, sorted into identity and session settings.
struct StartupParams {
    user: String,
    database: String,
    settings: Settings,
}

impl StartupParams {
    fn from_packet(params: Vec<(String, String)>) -> Result<StartupParams, Refusal> {
        let mut user = None;
        let mut database = None;
        let mut settings = Settings::new();
        for (k, v) in params {
            match k.as_str() {
                "user" => user = Some(v),
                "database" => database = Some(v),
                "replication" if v != "false" && v != "0" && v != "off" => {
                    return Err(Refusal::new(
                        SqlState::FEATURE_NOT_SUPPORTED,
                        "pgwarp does not support replication connections",
                    ));
                }
                "replication" => {}
                "options" => {
                    let parsed = startup::parse_options(&v)
                        .map_err(|e| Refusal::new(SqlState::PROTOCOL_VIOLATION, format!("invalid options: {e}")))?;
                    settings.extend(parsed);
                }
                k if k.starts_with("_pq_.") => {}
                _ => {
                    settings.insert(k, v);
                }
            }
        }
        if let Some(reserved) = settings.keys().find(|k| is_reserved(k)) {
            return Err(Refusal::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                format!("pgwarp does not allow setting {reserved} at startup"),
            ));
        }
        let user = user.filter(|u| !u.is_empty()).ok_or_else(|| {
            Refusal::new(SqlState::INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet")
        })?;
        let database = database.filter(|d| !d.is_empty()).unwrap_or_else(|| user.clone());
        Ok(StartupParams { user, database, settings })
    }
}

/// The user's entry: from the directory, else from `auth_query` when it is on.
async fn find_user(ctx: &Arc<ServerContext>, user: &str) -> Result<Option<Arc<UserEntry>>, Refusal> {
    let users = ctx.users();
    if let Some(entry) = users.get(user) {
        return Ok(Some(entry));
    }
    let Some(lookup) = users.lookup() else {
        return Ok(None);
    };
    match lookup.find(&ctx.pools, user).await {
        Ok(entry) => Ok(entry.map(Arc::new)),
        Err(e) => {
            tracing::warn!(user, error = %e, "auth_query could not look the user up");
            // The client has proven nothing yet: the reason goes to the log only.
            let reason = match &e {
                LookupError::Pool(PoolError::Timeout(t)) => format!("no origin connection became free within {t:?}"),
                _ => "see pgwarp's log".to_owned(),
            };
            Err(Refusal::new(SqlState::CONNECTION_REJECTED, format!("pgwarp could not look the user up: {reason}")))
        }
    }
}

/// Runs the password exchange. Unknown users go through a SCRAM exchange that cannot succeed,
/// so a client cannot tell a wrong user from a wrong password. A SCRAM login returns the keys
/// the client's proof revealed (what logging in to the origin as this user takes).
async fn authenticate(
    ctx: &ServerContext,
    stream: &mut ClientStream,
    reader: &mut MessageReader,
    user: &str,
    secret: Option<&ClientSecret>,
) -> Result<Option<ScramKeys>, Refusal> {
    let io_err = |_| Refusal::new(SqlState::CONNECTION_FAILURE, "");
    let scram_secret = match (secret, ctx.config().auth_method) {
        (Some(ClientSecret::Trust), _) => return Ok(None),
        (Some(ClientSecret::Md5(stored)), _) => {
            let salt = md5_salt();
            stream.write_all(&build::auth_md5(salt)).await.map_err(io_err)?;
            let msg = read_password(stream, reader).await?;
            let answer = Fields::new(PASSWORD, msg.body()).cstr().map_err(|_| password_failed(user))?;
            return if crate::protocol::md5::verify(stored, salt, answer) {
                Ok(None)
            } else {
                Err(password_failed(user))
            };
        }
        (Some(ClientSecret::Scram(s)), _) => s.clone(),
        (None, AuthMethod::Md5) => {
            let salt = md5_salt();
            stream.write_all(&build::auth_md5(salt)).await.map_err(io_err)?;
            read_password(stream, reader).await?;
            return Err(password_failed(user));
        }
        (None, AuthMethod::ScramSha256) => ctx.users().decoy_for(user),
    };
    stream.write_all(&build::auth_sasl(&["SCRAM-SHA-256"])).await.map_err(io_err)?;
    let msg = read_password(stream, reader).await?;
    let mut f = Fields::new(PASSWORD, msg.body());
    let mechanism = f.cstr().map_err(|e| Refusal::new(SqlState::PROTOCOL_VIOLATION, e.to_string()))?;
    if mechanism != "SCRAM-SHA-256" {
        return Err(Refusal::new(
            SqlState::PROTOCOL_VIOLATION,
            "client selected an invalid SASL authentication mechanism",
        ));
    }
    let len = f.i32().map_err(|e| Refusal::new(SqlState::PROTOCOL_VIOLATION, e.to_string()))?;
    let data = f.rest();
    // SCRAM starts with the client's first message: the length must say exactly what follows.
    if usize::try_from(len).ok() != Some(data.len()) {
        return Err(Refusal::new(SqlState::PROTOCOL_VIOLATION, "invalid SASLInitialResponse length"));
    }
    let nonce = base64_nonce();
    let (exchange, server_first) = ScramExchange::start(scram_secret, nonce, data)
        .map_err(|e| Refusal::new(SqlState::PROTOCOL_VIOLATION, e.to_string()))?;
    stream.write_all(&build::auth_sasl_continue(server_first.as_bytes())).await.map_err(io_err)?;
    let msg = read_password(stream, reader).await?;
    // A wrong proof is a wrong password; a message that is not SCRAM is a protocol violation,
    // as Postgres has it (neither depends on the secret, so neither tells whether the user exists).
    let (server_final, keys) = exchange.finish(msg.body()).map_err(|e| match e {
        ScramError::BadProof => password_failed(user),
        other => Refusal::new(SqlState::PROTOCOL_VIOLATION, other.to_string()),
    })?;
    if secret.is_none() {
        return Err(password_failed(user));
    }
    stream.write_all(&build::auth_sasl_final(server_final.as_bytes())).await.map_err(io_err)?;
    Ok(Some(keys))
}

/// A fresh salt for an md5 challenge.
fn md5_salt() -> [u8; 4] {
    let mut salt = [0u8; 4];
    salt.copy_from_slice(&random_bytes(4));
    salt
}

async fn read_password(stream: &mut ClientStream, reader: &mut MessageReader) -> Result<Message, Refusal> {
    match reader.read(stream).await {
        Ok(Some(m)) if m.tag() == PASSWORD => Ok(m),
        Ok(Some(m)) => Err(Refusal::new(
            SqlState::PROTOCOL_VIOLATION,
            format!("expected password response, got message type {}", m.tag()),
        )),
        Ok(None) => {
            Err(Refusal::new(SqlState::CONNECTION_FAILURE, "client closed the connection during authentication"))
        }
        Err(e) => Err(Refusal::new(SqlState::PROTOCOL_VIOLATION, format!("invalid password message: {e}"))),
    }
}

fn base64_nonce() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(random_bytes(18))
}
