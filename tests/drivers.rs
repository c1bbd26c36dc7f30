//! Real client drivers, with the default settings that make them prepare statements, through the
//! built pgwarp binary: 24 clients on a pool of 3 origin connections, so a statement a client
//! prepared on one origin connection is reused on another. Python (asyncpg, psycopg), Node.js
//! (postgres.js, node-postgres), Java (pgjdbc), Go (pgx v4) and pgbench; tokio-postgres runs
//! through the other test files.
//!
//! Each driver has a script in tests/drivers/ that takes the pgwarp URL, runs 24 concurrent
//! clients with exactly checked results and exits non-zero on any wrong result or error (such as
//! "prepared statement ... does not exist"). The scripts need their packages installed:
//! `python3 -m pip install -r tests/drivers/requirements.txt` and `npm ci --prefix tests/drivers`
//! (.ci/run does both); the Java and Go checks are compiled by the tests, against Debian's
//! libpostgresql-jdbc-java and golang-github-jackc-pgx-v4-dev (.ci/run installs them). A
//! missing package fails the test with that advice; nothing is skipped.
//! `pgbench -M prepared` is checked the same way, with its own reports of failed transactions.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{PgCluster, PgwarpProcess};

/// How long one driver script or pgbench run may take before it is killed and the test fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Far fewer origin connections than clients, so statements move between connections.
const POOL_SIZE: usize = 3;

/// Concurrent clients in every script and pgbench run.
const CLIENTS: usize = 24;

/// Iterations per client in every script.
const ITERATIONS: usize = 50;

/// A test's own origin cluster and the pgwarp in front of it. pgwarp is declared first so it is
/// dropped (killed) before the cluster stops under it.
struct Stack {
    pgwarp: PgwarpProcess,
    origin: PgCluster,
    /// postgres://app:secret@127.0.0.1:PORT/app through pgwarp.
    url: String,
}

impl Stack {
    fn start() -> Stack {
        let origin = PgCluster::start();
        origin.create_user("app", "secret");
        origin.create_database("app", "app");
        let origin_url = origin.url("app", "secret", "app");
        let pool_size = POOL_SIZE.to_string();
        let pgwarp = PgwarpProcess::start(&["--origin", &origin_url, "--pool-size", &pool_size]);
        let url = pgwarp.url("app", "secret", "app");
        Stack { pgwarp, origin, url }
    }

    /// Fails if the origin has more than `POOL_SIZE` connections of user app open after a run:
    /// the small pool is what makes the run a test of statements moving between connections.
    fn assert_pool_stayed_small(&self) {
        let backends = self.origin.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'");
        let backends: usize = backends.parse().unwrap_or_else(|_| panic!("count of origin backends: {backends:?}"));
        assert!(backends <= POOL_SIZE, "a pool of {POOL_SIZE} used {backends} origin connections");
    }

    /// The end of pgwarp's log, for failure messages. Nothing in these tests signals pgwarp, so
    /// a shutdown in the log means something outside the test stopped it; that is said first.
    fn pgwarp_log_tail(&self) -> String {
        let log = self.pgwarp.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        if log.contains("shutting down") {
            format!("NOTE: pgwarp was told to shut down by a signal from outside this test\n{tail}")
        } else {
            tail
        }
    }
}

/// What a child process did: its exit status (`None` when it was killed for running too long),
/// its output and how long it ran.
struct Run {
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Run {
    fn succeeded(&self) -> bool {
        self.status.is_some_and(|status| status.success())
    }

    fn describe(&self) -> String {
        let status = match self.status {
            Some(status) => status.to_string(),
            None => format!("killed after {RUN_TIMEOUT:?}"),
        };
        format!("{status} after {:.1?}\n--- stdout ---\n{}\n--- stderr ---\n{}", self.elapsed, self.stdout, self.stderr)
    }
}

/// Reads a child's pipe to the end on its own thread, so a full pipe never blocks the child.
fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs `command` with no stdin, capturing its output, and kills it after `RUN_TIMEOUT`.
fn run(command: &mut Command) -> Run {
    for var in ["PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "PGOPTIONS", "PGSERVICE"] {
        command.env_remove(var);
    }
    let started = Instant::now();
    let mut child: Child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll child") {
            break Some(status);
        }
        if started.elapsed() >= RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let elapsed = started.elapsed();
    Run {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
        elapsed,
    }
}

fn drivers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("drivers")
}

/// The language runtime a driver script runs on.
#[derive(Clone, Copy)]
enum Runtime {
    Python,
    Node,
}

impl Runtime {
    fn program(self) -> &'static str {
        match self {
            Runtime::Python => "python3",
            Runtime::Node => "node",
        }
    }

    fn install_hint(self) -> &'static str {
        match self {
            Runtime::Python => "python3 -m pip install -r tests/drivers/requirements.txt",
            Runtime::Node => "npm ci --prefix tests/drivers",
        }
    }

    /// A command that exits 0 only if `package` can be loaded the way the scripts load it.
    fn import_check(self, package: &str) -> Command {
        let mut command = Command::new(self.program());
        match self {
            Runtime::Python => command.args(["-c", &format!("import {package}")]),
            // ESM resolution of --eval code starts at the working directory, like the scripts'.
            Runtime::Node => command
                .args(["--input-type=module", "-e", &format!("await import('{package}')")])
                .current_dir(drivers_dir()),
        };
        command
    }
}

/// Fails the test, saying how to install it, unless `package` is importable. Never skips: a
/// test that passes without running its driver proves nothing. On CI (env CI set) the message
/// points at .ci/run, which must have installed it.
fn require_package(runtime: Runtime, package: &str) {
    let check = run(&mut runtime.import_check(package));
    if check.succeeded() {
        return;
    }
    let hint = runtime.install_hint();
    if std::env::var_os("CI").is_some() {
        panic!(
            "CI must provide the {package} driver ({} package), but it cannot be loaded; .ci/run installs it with \
             `{hint}`:\n{}",
            runtime.program(),
            check.describe()
        );
    }
    panic!(
        "the {package} driver cannot be loaded by {}; install it with `{hint}` (the driver checks need \
         both `python3 -m pip install -r tests/drivers/requirements.txt` and `npm ci --prefix tests/drivers`):\n{}",
        runtime.program(),
        check.describe()
    );
}

/// Runs `tests/drivers/<script>` against a fresh origin and pgwarp, and asserts it succeeded and
/// printed `<label>: 24 clients x 50 iterations ok`.
fn check_driver(runtime: Runtime, package: &str, script: &str, label: &str) {
    require_package(runtime, package);
    let mut command = Command::new(runtime.program());
    command.arg(drivers_dir().join(script));
    run_check(command, label);
}

#[test]
fn asyncpg_default_statement_cache_with_24_clients_on_pool_of_3() {
    check_driver(Runtime::Python, "asyncpg", "asyncpg_check.py", "asyncpg");
}

#[test]
fn psycopg_prepare_threshold_0_with_24_clients_on_pool_of_3() {
    check_driver(Runtime::Python, "psycopg", "psycopg_check.py", "psycopg");
}

#[test]
fn postgres_js_default_prepare_with_24_clients_on_pool_of_3() {
    check_driver(Runtime::Node, "postgres", "postgres_js_check.mjs", "postgres.js");
}

#[test]
fn node_postgres_named_queries_with_24_clients_on_pool_of_3() {
    check_driver(Runtime::Node, "pg", "node_pg_check.mjs", "node-postgres");
}

/// Where pgjdbc's jar is: Debian's libpostgresql-jdbc-java, or PGWARP_PGJDBC_JAR.
fn pgjdbc_jar() -> PathBuf {
    std::env::var_os("PGWARP_PGJDBC_JAR").map_or_else(|| PathBuf::from("/usr/share/java/postgresql.jar"), PathBuf::from)
}

/// Where Go finds pgx v4 in GOPATH mode: Debian's golang-github-jackc-pgx-v4-dev, or
/// PGWARP_GOPATH.
fn pgx_gopath() -> PathBuf {
    std::env::var_os("PGWARP_GOPATH").map_or_else(|| PathBuf::from("/usr/share/gocode"), PathBuf::from)
}

/// A directory of this test process's own for a compiled driver check.
fn build_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pgwarp-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|err| panic!("create {}: {err}", dir.display()));
    dir
}

/// Builds a driver check with `command`; a missing toolchain or library fails the test with
/// how to install it (never a skip).
fn build_check(what: &str, command: &mut Command, install: &str) {
    let built = run(command);
    let place =
        if std::env::var_os("CI").is_some() { "CI must provide it (.ci/run installs it)" } else { "install it" };
    assert!(built.succeeded(), "cannot build the {what} check; {place}: `{install}`:\n{}", built.describe());
}

/// Runs a driver check (`command` then the URL, clients and iterations) against a fresh origin
/// and pgwarp, and asserts it succeeded and printed `<label>: 24 clients x 50 iterations ok`.
fn run_check(mut command: Command, label: &str) {
    let stack = Stack::start();
    command.arg(&stack.url).arg(CLIENTS.to_string()).arg(ITERATIONS.to_string());
    let outcome = run(&mut command);
    let summary = format!("{label}: {CLIENTS} clients x {ITERATIONS} iterations ok");
    assert!(
        outcome.succeeded() && outcome.stdout.contains(&summary),
        "the {label} check through pgwarp failed: {}\n--- pgwarp log (tail) ---\n{}",
        outcome.describe(),
        stack.pgwarp_log_tail()
    );
    stack.assert_pool_stayed_small();
    println!("{} [{:.1?}]", outcome.stdout.trim(), outcome.elapsed);
}

/// pgjdbc names a statement from its fifth execution (prepareThreshold 5; half the clients
/// use 1): the JDBC driver PgBouncer before 1.21 breaks with "prepared statement S_1 already
/// exists / does not exist".
#[test]
fn pgjdbc_default_prepare_threshold_with_24_clients_on_pool_of_3() {
    let classes = build_dir("pgjdbc");
    let jar = pgjdbc_jar();
    let mut javac = Command::new("javac");
    javac.arg("-cp").arg(&jar).arg("-d").arg(&classes).arg(drivers_dir().join("PgjdbcCheck.java"));
    build_check("pgjdbc", &mut javac, "apt-get install default-jdk-headless libpostgresql-jdbc-java");
    let mut java = Command::new("java");
    java.arg("-cp").arg(format!("{}:{}", classes.display(), jar.display())).arg("PgjdbcCheck");
    run_check(java, "pgjdbc");
    let _ = std::fs::remove_dir_all(&classes);
}

/// pgx prepares every query under a name of its own by default (its statement cache).
#[test]
fn pgx_default_statement_cache_with_24_clients_on_pool_of_3() {
    let dir = build_dir("pgx");
    let binary = dir.join("pgx_check");
    let mut go = Command::new("go");
    go.args(["build", "-o"])
        .arg(&binary)
        .arg("pgx_check.go")
        .current_dir(drivers_dir())
        .env("GO111MODULE", "off")
        .env("GOPATH", pgx_gopath())
        .env("GOCACHE", dir.join("cache"))
        .env("GOFLAGS", "");
    build_check("pgx", &mut go, "apt-get install golang-go golang-github-jackc-pgx-v4-dev");
    run_check(Command::new(&binary), "pgx");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs pgbench with `args` and then the pgwarp URL; asserts it succeeded with no failed
/// transaction and no missing prepared statement, and returns its output.
fn pgbench(stack: &Stack, args: &[&str]) -> String {
    let mut command = Command::new(stack.origin.bin("pgbench"));
    command.args(args).arg(&stack.url);
    let outcome = run(&mut command);
    let output = format!("{}{}", outcome.stdout, outcome.stderr);
    let failed_none = args.contains(&"-i") || output.contains("number of failed transactions: 0 (");
    // `pgbench -i` drops its tables IF EXISTS first; those NOTICEs are not errors.
    let missing_object = output.lines().any(|line| line.contains("does not exist") && !line.starts_with("NOTICE:"));
    assert!(
        outcome.succeeded() && failed_none && !missing_object,
        "pgbench {args:?} through pgwarp failed: {}\n--- pgwarp log (tail) ---\n{}",
        outcome.describe(),
        stack.pgwarp_log_tail()
    );
    println!("pgbench {} [{:.1?}]", args.join(" "), outcome.elapsed);
    output
}

/// The number in pgbench's "number of transactions actually processed: N" line.
fn processed_transactions(report: &str) -> u64 {
    report
        .lines()
        .find_map(|line| line.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no count of processed transactions in pgbench's report:\n{report}"))
}

/// pgbench prepares with a synchronous PQprepare per client. When one pgbench thread drives
/// several clients, a client waiting for a pool slot blocks the thread, and with it the clients
/// holding the slots: a deadlock of pgbench's making under any transaction pooler. So `-j`
/// always equals `-c` here.
#[test]
fn pgbench_prepared_select_only_and_tpcb_with_24_clients_on_pool_of_3() {
    let stack = Stack::start();
    let clients = CLIENTS.to_string();
    pgbench(&stack, &["-i", "-s", "1"]);
    for script in [&["-S"][..], &[][..]] {
        let mut args = vec!["-n", "-M", "prepared", "-c", &clients, "-j", &clients, "-T", "5"];
        args.extend_from_slice(script);
        let report = pgbench(&stack, &args);
        assert!(processed_transactions(&report) > 0, "pgbench {args:?} processed no transaction:\n{report}");
    }
    stack.assert_pool_stayed_small();
}

/// sqlx (Rust) prepares every query under a name of its own by default ("sqlx_s_N", cached
/// per connection): Parse/Describe/Sync, then Bind/Execute/Sync, later only Bind. Each client
/// is its own PgConnection; per iteration: a reused parameterized SELECT, one failing with
/// division by zero every other time, a transaction of INSERTs and an INSERT ... RETURNING read
/// back exactly, a rolled-back and an aborted transaction now and then, an unprepared
/// (`persistent(false)`, unnamed statement) query and one whose text changes.
#[test]
fn sqlx_default_statement_cache_with_24_clients_on_pool_of_3() {
    use sqlx::{Connection, Row};

    async fn count(conn: &mut sqlx::PgConnection, client: i32, it: i32) -> Result<(i64, i64), sqlx::Error> {
        let row =
            sqlx::query("SELECT count(*), coalesce(sum(k), 0)::int8 FROM sqlx_items WHERE client = $1 AND iter = $2")
                .bind(client)
                .bind(it)
                .fetch_one(conn)
                .await?;
        Ok((row.get(0), row.get(1)))
    }

    fn code(result: Result<impl std::fmt::Debug, sqlx::Error>) -> String {
        match result {
            Err(sqlx::Error::Database(e)) => e.code().map(|c| c.into_owned()).unwrap_or_default(),
            other => format!("not a database error: {other:?}"),
        }
    }

    async fn client(url: String, client: i32) -> Result<(), String> {
        let mut conn = sqlx::PgConnection::connect(&url).await.map_err(|e| format!("connect: {e}"))?;
        for it in 0..ITERATIONS as i32 {
            let at = |what: &str, e: &dyn std::fmt::Debug| format!("client {client} iteration {it}: {what}: {e:?}");
            let row = sqlx::query("SELECT $1::int + $2::int, $3::text || 'x'")
                .bind(client)
                .bind(it)
                .bind(format!("c{client}"))
                .fetch_one(&mut conn)
                .await
                .map_err(|e| at("sum", &e))?;
            let (sum, text): (i32, String) = (row.get(0), row.get(1));
            if sum != client + it || text != format!("c{client}x") {
                return Err(at("sum", &(sum, text)));
            }
            if it % 2 == 0 {
                let got = code(sqlx::query("SELECT 10 / $1::int").bind(0).fetch_one(&mut conn).await);
                if got != "22012" {
                    return Err(at("division by zero", &got));
                }
            } else {
                let row = sqlx::query("SELECT 10 / $1::int").bind(5).fetch_one(&mut conn).await;
                let q: i32 = row.map_err(|e| at("division", &e))?.get(0);
                if q != 2 {
                    return Err(at("division", &q));
                }
            }
            let mut tx = conn.begin().await.map_err(|e| at("begin", &e))?;
            for k in 0..3 {
                sqlx::query("INSERT INTO sqlx_items (client, iter, k, payload) VALUES ($1, $2, $3, $4)")
                    .bind(client)
                    .bind(it)
                    .bind(k)
                    .bind(format!("p{k}"))
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| at("insert", &e))?;
            }
            let row = sqlx::query(
                "INSERT INTO sqlx_items (client, iter, k, payload) VALUES ($1, $2, 100, $3) RETURNING k, payload",
            )
            .bind(client)
            .bind(it)
            .bind(format!("r{it}"))
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| at("returning", &e))?;
            let (k, payload): (i32, String) = (row.get(0), row.get(1));
            if k != 100 || payload != format!("r{it}") {
                return Err(at("returning", &(k, payload)));
            }
            tx.commit().await.map_err(|e| at("commit", &e))?;
            let got = count(&mut conn, client, it).await.map_err(|e| at("count", &e))?;
            if got != (4, 103) {
                return Err(at("after commit", &got));
            }
            if it % 5 == 4 {
                let mut tx = conn.begin().await.map_err(|e| at("begin", &e))?;
                sqlx::query("INSERT INTO sqlx_items (client, iter, k, payload) VALUES ($1, $2, 50, 'gone')")
                    .bind(client)
                    .bind(it)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| at("insert", &e))?;
                let inside = count(&mut tx, client, it).await.map_err(|e| at("count", &e))?;
                tx.rollback().await.map_err(|e| at("rollback", &e))?;
                let after = count(&mut conn, client, it).await.map_err(|e| at("count", &e))?;
                if inside != (5, 153) || after != (4, 103) {
                    return Err(at("rolled back", &(inside, after)));
                }
            }
            if it % 7 == 6 {
                let mut tx = conn.begin().await.map_err(|e| at("begin", &e))?;
                let duplicate = code(
                    sqlx::query("INSERT INTO sqlx_items (client, iter, k, payload) VALUES ($1, $2, 0, 'dup')")
                        .bind(client)
                        .bind(it)
                        .execute(&mut *tx)
                        .await,
                );
                let aborted = code(count(&mut tx, client, it).await);
                tx.rollback().await.map_err(|e| at("rollback", &e))?;
                let after = count(&mut conn, client, it).await.map_err(|e| at("count", &e))?;
                if duplicate != "23505" || aborted != "25P02" || after != (4, 103) {
                    return Err(at("aborted transaction", &(duplicate, aborted, after)));
                }
            }
            let row = sqlx::query("SELECT $1::int * 3").bind(it).persistent(false).fetch_one(&mut conn).await;
            let unnamed: i32 = row.map_err(|e| at("unprepared", &e))?.get(0);
            let shape = format!("SELECT $1::int * {} + {client}", it % 9);
            let row = sqlx::query(&shape).bind(it).fetch_one(&mut conn).await;
            let shaped: i32 = row.map_err(|e| at("shape", &e))?.get(0);
            if unnamed != it * 3 || shaped != it * (it % 9) + client {
                return Err(at("unprepared and shape", &(unnamed, shaped)));
            }
        }
        conn.close().await.map_err(|e| format!("close: {e}"))
    }

    let stack = Stack::start();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let url = stack.url.clone();
    let outcome = runtime.block_on(async move {
        let mut setup = sqlx::PgConnection::connect(&url).await.map_err(|e| format!("connect: {e}"))?;
        for sql in [
            "DROP TABLE IF EXISTS sqlx_items",
            "CREATE TABLE sqlx_items (client int, iter int, k int, payload text, PRIMARY KEY (client, iter, k))",
        ] {
            sqlx::query(sql).execute(&mut setup).await.map_err(|e| format!("{sql}: {e}"))?;
        }
        let clients: Vec<_> = (0..CLIENTS as i32).map(|c| tokio::spawn(client(url.clone(), c))).collect();
        for c in clients {
            tokio::time::timeout(RUN_TIMEOUT, c)
                .await
                .map_err(|_| "timed out".to_string())?
                .map_err(|e| e.to_string())??;
        }
        Ok::<(), String>(())
    });
    assert!(
        outcome.is_ok(),
        "sqlx through pgwarp failed: {outcome:?}\n--- pgwarp log (tail) ---\n{}",
        stack.pgwarp_log_tail()
    );
    stack.assert_pool_stayed_small();
}
