//! Test harness shared by every integration test (`mod common;`).
//!
//! `PgCluster` is a real PostgreSQL server started for one test: its own temporary directory,
//! its own free TCP port on 127.0.0.1, SCRAM authentication by default. Clusters are fully
//! independent, so tests run in parallel. initdb and postgres refuse to run as root, so when the
//! tests run as root every server binary is started as the `postgres` user through `setpriv`
//! (not `su`/`runuser`: those go through PAM and reset the open-files limit).
//!
//! `PgwarpProcess` is the built `pgwarp` binary, started on a free port with its output captured
//! in a log file that is shown whenever start-up fails.
//!
//! Everything here except `connect` is synchronous and uses only std + tempfile, so it can be
//! called from a `#[tokio::test]` as well as from a plain `#[test]`.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Password of the `postgres` superuser in every test cluster.
pub const SUPERUSER_PASSWORD: &str = "postgres";

/// How many times `PgCluster::start_with` picks a new port when another process took the one it
/// picked between choosing it and the server binding it.
const PORT_ATTEMPTS: usize = 5;

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is released before returning, so another process may take it; callers that bind it
/// later should be ready to retry with a new one. It is never a port this test process was
/// handed before: the kernel may give the same ephemeral port to two binds in a row, and a test
/// asking for two ports (a listener and an admin endpoint, say) must get two.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        if handed_out.insert(port) {
            return port;
        }
    }
}

/// True when the effective user id is 0, read from /proc so no libc binding is needed.
pub fn running_as_root() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .map(|euid| euid == "0")
        .unwrap_or(false)
}

/// Directory holding the PostgreSQL server binaries: the highest version under
/// /usr/lib/postgresql/*/bin, or `None` to fall back to PATH.
fn postgres_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let version: Option<Vec<u32>> = name.split('.').map(|part| part.parse().ok()).collect();
            let bin = entry.path().join("bin");
            match version {
                Some(version) if bin.join("initdb").exists() => Some((version, bin)),
                _ => None,
            }
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// Finds `name` on PATH.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|candidate| candidate.is_file())
}

/// Connects with tokio-postgres (no TLS) and drives the connection on a background task, so the
/// returned client is ready to use. Must be called inside a tokio runtime.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Percent-encodes everything but unreserved characters, for the user-info part of a URL.
fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Builds a `postgres://` URL for a server on 127.0.0.1.
pub fn postgres_url(port: u16, user: &str, password: &str, db: &str) -> String {
    format!("postgres://{}:{}@127.0.0.1:{port}/{}", url_encode(user), url_encode(password), url_encode(db))
}

/// Quotes an SQL identifier.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Quotes an SQL string literal (standard_conforming_strings is on by default).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Runs a command and panics with its output when it fails.
fn run_checked(command: &mut Command, what: &str) -> Output {
    let output =
        command.stdin(Stdio::null()).output().unwrap_or_else(|err| panic!("{what}: could not run {command:?}: {err}"));
    if !output.status.success() {
        panic!(
            "{what} failed ({}): {command:?}\nstdout:\n{}\nstderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    output
}

/// How a test cluster is configured beyond the defaults.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// pg_hba.conf method for `host all all 127.0.0.1/32`: "scram-sha-256", "md5", "password"
    /// or "trust". With "md5", users whose password is stored as SCRAM still log in (Postgres
    /// then uses SCRAM); with "scram-sha-256", users with an md5-stored password cannot.
    pub hba_method: &'static str,
    /// pg_hba.conf method for `local all all` (the Unix-domain socket): "trust" by default, so
    /// `psql -h <dir>` works for debugging.
    pub local_method: &'static str,
    /// Extra postgresql.conf lines, appended after the harness's own settings.
    pub extra_conf: Vec<String>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions { hba_method: "scram-sha-256", local_method: "trust", extra_conf: Vec::new() }
    }
}

/// A PostgreSQL server owned by one test. Dropping it stops the server (immediate mode) and
/// removes its directory.
pub struct PgCluster {
    /// Removed on drop; holds the data directory, the socket, the log and the password file.
    dir: TempDir,
    bin_dir: Option<PathBuf>,
    port: u16,
    as_postgres_user: bool,
    /// Stops the server and removes `dir` if this process dies without dropping the cluster.
    watchdog: Option<Watchdog>,
}

impl PgCluster {
    /// Starts a cluster with SCRAM authentication on a free port.
    pub fn start() -> PgCluster {
        PgCluster::start_with(PgOptions::default())
    }

    /// Starts a cluster configured by `options`.
    pub fn start_with(options: PgOptions) -> PgCluster {
        let valid = ["scram-sha-256", "md5", "password", "trust"];
        for method in [options.hba_method, options.local_method] {
            assert!(valid.contains(&method), "hba methods must be one of {valid:?}, got {method:?}");
        }
        let as_postgres_user = running_as_root();
        // The postgres user must be able to reach the directory; $TMPDIR may not allow that.
        let parent = if as_postgres_user { PathBuf::from("/tmp") } else { std::env::temp_dir() };
        let dir =
            tempfile::Builder::new().prefix("pgwarp-pg-").tempdir_in(parent).expect("create temp dir for the cluster");
        set_mode(dir.path(), 0o755);
        let mut cluster = PgCluster { dir, bin_dir: postgres_bin_dir(), port: 0, as_postgres_user, watchdog: None };
        cluster.watchdog = Some(cluster.spawn_watchdog());
        cluster.init(&options);

        let base_conf = fs::read_to_string(cluster.conf_path()).expect("read postgresql.conf");
        for attempt in 1..=PORT_ATTEMPTS {
            cluster.port = free_port();
            let conf = format!("{base_conf}\n{}", cluster.harness_conf(&options));
            fs::write(cluster.conf_path(), conf).expect("write postgresql.conf");
            let output = cluster.pg_ctl_start();
            if output.status.success() {
                return cluster;
            }
            let log = cluster.log();
            let port_taken = log.contains("could not bind") || log.contains("already in use");
            if !(port_taken && attempt < PORT_ATTEMPTS) {
                panic!(
                    "pg_ctl start failed ({}):\nstdout:\n{}\nstderr:\n{}\nserver log:\n{log}",
                    output.status,
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            // Another process took the port: forget the old log and try a fresh one.
            let _ = fs::remove_file(cluster.log_path());
        }
        unreachable!("the loop either returns or panics")
    }

    /// A watchdog that, once this process is gone, stops the server and removes the directory.
    fn spawn_watchdog(&self) -> Watchdog {
        let stop = self.pg_ctl(&["-w", "-m", "immediate", "stop"]);
        let mut args = vec![self.dir.path().as_os_str(), stop.get_program()];
        args.extend(stop.get_args());
        Watchdog::spawn(r#"dir=$1; shift; cd "$dir" && "$@"; cd / && rm -rf "$dir""#, &args)
    }

    /// Runs initdb and writes pg_hba.conf.
    fn init(&self, options: &PgOptions) {
        let pwfile = self.dir.path().join("pwfile");
        fs::write(&pwfile, format!("{SUPERUSER_PASSWORD}\n")).expect("write pwfile");
        if self.as_postgres_user {
            run_checked(
                Command::new("chown").args(["-R", "postgres:postgres"]).arg(self.dir.path()),
                "chown the cluster directory to postgres",
            );
        }
        let mut initdb = self.server_command("initdb");
        initdb
            .arg("-D")
            .arg(self.data_dir())
            .args(["--auth=scram-sha-256", "--username=postgres", "-E", "UTF8", "--locale=C", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()));
        run_checked(&mut initdb, "initdb");
        let _ = fs::remove_file(&pwfile);

        // The socket lives in the temp dir, reachable only from this machine, so by default it
        // is trusted: handy for debugging with `psql -h <dir>`.
        let hba = format!("local all all {}\nhost all all 127.0.0.1/32 {}\n", options.local_method, options.hba_method);
        fs::write(self.data_dir().join("pg_hba.conf"), hba).expect("write pg_hba.conf");
    }

    /// The settings every test cluster gets, followed by `options.extra_conf`.
    fn harness_conf(&self, options: &PgOptions) -> String {
        let mut conf = vec![
            "# added by the pgwarp test harness".to_string(),
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("port = {}", self.port),
            format!("unix_socket_directories = '{}'", self.dir.path().display()),
            "max_connections = 300".to_string(),
            "fsync = off".to_string(),
            "synchronous_commit = off".to_string(),
            "full_page_writes = off".to_string(),
            "shared_buffers = 32MB".to_string(),
            "password_encryption = 'scram-sha-256'".to_string(),
        ];
        conf.extend(options.extra_conf.iter().cloned());
        conf.join("\n") + "\n"
    }

    fn conf_path(&self) -> PathBuf {
        self.data_dir().join("postgresql.conf")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// A command running server binary `name` as the `postgres` user when we are root.
    fn server_command(&self, name: &str) -> Command {
        let program = self.bin(name);
        let mut command = if self.as_postgres_user {
            let mut command = Command::new("setpriv");
            command.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        // The postgres user may not be allowed into the test's working directory.
        command.current_dir(self.dir.path());
        for var in ["PGDATA", "PGPORT", "PGHOST", "PGUSER", "PGDATABASE", "PGOPTIONS"] {
            command.env_remove(var);
        }
        command
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut command = self.server_command("pg_ctl");
        command.arg("-D").arg(self.data_dir()).args(args);
        command
    }

    fn pg_ctl_start(&self) -> Output {
        // -l is essential: without it the postmaster inherits pg_ctl's stdout and `output()`
        // would wait for it forever.
        let mut command = self.pg_ctl(&["-w", "-t", "60", "start", "-l"]);
        command.arg(self.log_path()).stdin(Stdio::null());
        command.output().expect("run pg_ctl start")
    }

    /// Path of PostgreSQL binary `name` (initdb, pg_ctl, psql, pgbench, ...).
    pub fn bin(&self, name: &str) -> PathBuf {
        if let Some(dir) = &self.bin_dir {
            let candidate = dir.join(name);
            if candidate.exists() {
                return candidate;
            }
        }
        find_on_path(name).unwrap_or_else(|| PathBuf::from(name))
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory of the server's Unix-domain socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's Unix-domain socket.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join(format!(".s.PGSQL.{}", self.port))
    }

    /// The TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// URL of the `postgres` superuser for database `db`.
    pub fn superuser_url(&self, db: &str) -> String {
        self.url("postgres", SUPERUSER_PASSWORD, db)
    }

    /// URL of `user` with `password` for database `db`.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        postgres_url(self.port, user, password, db)
    }

    /// Runs `sql` with psql as the superuser in database `postgres`; returns trimmed stdout
    /// (unaligned, tuples only, no command tags). Panics with stderr when psql fails.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_db("postgres", sql)
    }

    /// Like `psql`, in database `db`. Statements are read from stdin, so several may be given
    /// and each runs in its own transaction (CREATE DATABASE works).
    pub fn psql_db(&self, db: &str, sql: &str) -> String {
        let mut child = Command::new(self.bin("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"])
            .arg("-d")
            .arg(self.superuser_url(db))
            .env("PGPASSWORD", SUPERUSER_PASSWORD)
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn psql");
        let mut stdin = child.stdin.take().expect("psql stdin");
        stdin.write_all(sql.as_bytes()).expect("write sql to psql");
        drop(stdin);
        let output = child.wait_with_output().expect("wait for psql");
        if !output.status.success() {
            panic!(
                "psql failed ({}) running:\n{sql}\nstderr:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// Creates a login role whose password is stored as a SCRAM-SHA-256 secret.
    pub fn create_user(&self, name: &str, password: &str) {
        self.psql(&format!(
            "SET password_encryption = 'scram-sha-256';\nCREATE ROLE {} LOGIN PASSWORD {};",
            quote_ident(name),
            quote_literal(password)
        ));
    }

    /// Creates a login role whose password is stored as an md5 hash. It can log in only when the
    /// cluster's hba_method is "md5" or "password".
    pub fn create_md5_user(&self, name: &str, password: &str) {
        self.psql(&format!(
            "SET password_encryption = 'md5';\nCREATE ROLE {} LOGIN PASSWORD {};",
            quote_ident(name),
            quote_literal(password)
        ));
    }

    /// Creates database `name` owned by `owner` (who may then create tables in its public schema).
    pub fn create_database(&self, name: &str, owner: &str) {
        self.psql(&format!("CREATE DATABASE {} OWNER {};", quote_ident(name), quote_ident(owner)));
    }

    /// Stops the server (fast mode: sessions are terminated, a checkpoint is written).
    pub fn stop(&self) {
        run_checked(&mut self.pg_ctl(&["-w", "-m", "fast", "stop"]), "pg_ctl stop");
    }

    /// Starts a stopped server again on the same port with the same data.
    pub fn start_again(&self) {
        let output = self.pg_ctl_start();
        if !output.status.success() {
            panic!(
                "pg_ctl start failed ({}):\nstderr:\n{}\nserver log:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr),
                self.log()
            );
        }
    }

    /// Restarts the server (fast mode); every open session is terminated.
    pub fn restart(&self) {
        let mut command = self.pg_ctl(&["-w", "-t", "60", "-m", "fast", "restart", "-l"]);
        command.arg(self.log_path());
        run_checked(&mut command, "pg_ctl restart");
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .pg_ctl(&["-w", "-m", "immediate", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // The server is down and `dir` is removed right after this; the watchdog has nothing
        // left to do.
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.disarm();
        }
    }
}

/// Cleans up after a test process that dies without running destructors (killed by a timeout
/// or a signal, aborted, `process::exit`), so no orphaned server keeps running.
///
/// It is a `sh` in its own process group (so Ctrl-C reaches only the tests) that waits for
/// end-of-file on a pipe whose write end only this process holds (std opens pipes close-on-exec,
/// so no other child inherits it). The kernel closes that end however this process ends; the
/// script then runs its cleanup. `disarm` is the normal path: it kills the script unused.
struct Watchdog {
    child: Child,
}

impl Watchdog {
    /// Spawns `sh -c "cat >/dev/null; <script>"` with `args` as `$1...`.
    fn spawn<S: AsRef<std::ffi::OsStr>>(script: &str, args: &[S]) -> Watchdog {
        use std::os::unix::process::CommandExt;
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("cat >/dev/null; {script}"))
            .arg("pgwarp-test-watchdog")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn test watchdog");
        Watchdog { child }
    }

    /// Stops the watchdog without running its cleanup.
    fn disarm(mut self) {
        // Kill the shell first: once it is gone, closing the pipe (when `child` is dropped)
        // only ends `cat`, and the cleanup never runs.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod temp dir");
}

/// The built `pgwarp` binary running as a child process. Dropping it kills the process.
pub struct PgwarpProcess {
    child: Child,
    port: u16,
    /// Holds the log file; removed on drop.
    dir: TempDir,
    /// Kills pgwarp if this process dies without dropping it.
    watchdog: Option<Watchdog>,
}

impl PgwarpProcess {
    /// How long `start` waits for the listening port to accept connections.
    pub const START_TIMEOUT: Duration = Duration::from_secs(15);

    /// Starts pgwarp with `args`, adding `--listen 127.0.0.1:<free port>` unless `args` contain
    /// `--listen`. stdout and stderr go to a log file. Returns once the port accepts TCP
    /// connections; panics with the log if the process exits first or does not listen in time.
    pub fn start(args: &[&str]) -> PgwarpProcess {
        PgwarpProcess::start_with_env(args, &[])
    }

    /// `start`, with `env` added to the process's environment.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> PgwarpProcess {
        let dir = tempfile::Builder::new().prefix("pgwarp-proc-").tempdir().expect("create temp dir for pgwarp");
        let log_path = dir.path().join("pgwarp.log");
        let log = fs::File::create(&log_path).expect("create pgwarp log");

        let mut args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
        let port = match listen_port_in(&args) {
            Some(port) => port,
            None => {
                let port = free_port();
                args.push("--listen".to_string());
                args.push(format!("127.0.0.1:{port}"));
                port
            }
        };

        let child = Command::new(env!("CARGO_BIN_EXE_pgwarp"))
            .args(&args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn pgwarp");
        let watchdog = Watchdog::spawn(r#"kill -9 "$1""#, &[child.id().to_string()]);
        let mut process = PgwarpProcess { child, port, dir, watchdog: Some(watchdog) };

        let deadline = Instant::now() + Self::START_TIMEOUT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        loop {
            if let Some(status) = process.child.try_wait().expect("poll pgwarp") {
                panic!("pgwarp {args:?} exited before listening ({status}); log:\n{}", process.log());
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return process;
            }
            if Instant::now() >= deadline {
                panic!(
                    "pgwarp {args:?} did not listen on {addr} within {:?}; log:\n{}",
                    Self::START_TIMEOUT,
                    process.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The port pgwarp listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// URL of `user` with `password` for database `db`, through pgwarp.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        postgres_url(self.port, user, password, db)
    }

    /// Everything pgwarp wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("pgwarp.log")).unwrap_or_default()
    }

    /// Sends signal `sig` ("TERM", "INT", "HUP", "KILL", ...) to the process.
    pub fn signal(&self, sig: &str) {
        run_checked(Command::new("kill").args(["-s", sig]).arg(self.child.id().to_string()), "kill");
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll pgwarp") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PgwarpProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.disarm();
        }
    }
}

/// The port of a `--listen ADDR` / `--listen=ADDR` argument, if there is one.
fn listen_port_in(args: &[String]) -> Option<u16> {
    let addr = args.iter().enumerate().find_map(|(i, arg)| {
        if arg == "--listen" {
            args.get(i + 1).cloned()
        } else {
            arg.strip_prefix("--listen=").map(str::to_string)
        }
    })?;
    let port = addr.rsplit(':').next()?;
    Some(port.parse().unwrap_or_else(|_| panic!("cannot read a port in --listen {addr:?}")))
}
