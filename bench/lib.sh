# shellcheck shell=bash
# Reusable pieces of the pgwarp benchmarks, sourced by bench/run.sh (and by later benches):
# a scratch directory, cleanup on exit, starting PostgreSQL / PgBouncer / pgwarp on free
# ports, running pgbench and taking medians, reading a process's resident memory.
#
# Everything started here registers its own cleanup with `on_exit`; `bench_init` installs the
# trap that runs those cleanups in reverse order, whatever way the script ends.
#
# As root, initdb/postgres and pgbouncer refuse to run, so they are started as the `postgres`
# user through setpriv, which (unlike su/runuser, which go through PAM) keeps the raised
# open-files limit that thousands of idle clients need.

# ---------------------------------------------------------------------------------------------
# Logging, cleanup, scratch space

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

CLEANUPS=()
on_exit() { CLEANUPS+=("$*"); }

run_cleanups() {
    local i
    for ((i = ${#CLEANUPS[@]} - 1; i >= 0; i--)); do
        eval "${CLEANUPS[$i]}" >/dev/null 2>&1 || true
    done
    CLEANUPS=()
}

# bench_init: scratch dir in $BENCH_DIR, cleanup trap, open-files limit, binary locations.
bench_init() {
    trap run_cleanups EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    BENCH_DIR=$(mktemp -d /tmp/pgwarp-bench.XXXXXX)
    chmod 755 "$BENCH_DIR"
    on_exit "rm -rf '$BENCH_DIR'"
    if is_root; then
        chown postgres:postgres "$BENCH_DIR"
    fi

    raise_open_files_limit 20000
    PG_BIN=$(pg_bin_dir)
    USED_PORTS=" "
}

is_root() { [[ $(id -u) -eq 0 ]]; }

# run_as_pg CMD...: run CMD as the postgres user when root, otherwise as ourselves.
run_as_pg() {
    if is_root; then
        setpriv --reuid=postgres --regid=postgres --init-groups "$@"
    else
        "$@"
    fi
}

# spawn_as_pg LOGFILE CMD...: start CMD in the background (as postgres when root) with output
# appended to LOGFILE; its pid (setpriv execs CMD, so it is CMD's own) goes to SPAWNED_PID.
spawn_as_pg() {
    local logfile=$1
    shift
    if is_root; then
        setpriv --reuid=postgres --regid=postgres --init-groups "$@" >>"$logfile" 2>&1 </dev/null &
    else
        "$@" >>"$logfile" 2>&1 </dev/null &
    fi
    SPAWNED_PID=$!
}

# alive PID: the process exists and is not a zombie.
alive() { [[ -r /proc/$1/stat && $(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) != Z ]]; }

# stop_pid PID: SIGTERM, then SIGKILL if it is still there after 5 seconds.
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        alive "$pid" || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

raise_open_files_limit() {
    local want=$1 hard
    hard=$(ulimit -Hn)
    if [[ $hard != unlimited && $hard -lt $want ]]; then
        ulimit -Hn "$want" 2>/dev/null || die "open-files hard limit is $hard, need $want (run as root or raise it)"
    fi
    if [[ $(ulimit -Sn) != unlimited && $(ulimit -Sn) -lt $want ]]; then
        ulimit -Sn "$want"
    fi
    log "open files limit: $(ulimit -Sn)"
}

# Highest /usr/lib/postgresql/<version>/bin, else the directory of initdb on PATH.
pg_bin_dir() {
    local dir
    dir=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
    if [[ -n $dir && -x $dir/initdb ]]; then
        echo "$dir"
    elif command -v initdb >/dev/null; then
        dirname "$(command -v initdb)"
    else
        die "PostgreSQL server binaries not found (install postgresql)"
    fi
}

# port_open PORT: true if something accepts TCP connections on 127.0.0.1:PORT.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# free_port VAR: stores in VAR a port below the ephemeral range (so outgoing connections cannot
# take it before the server binds it) that nothing listens on and this run has not handed out
# before. Call it directly, not in $(...), or the record of handed-out ports is lost.
free_port() {
    local port tries
    for ((tries = 0; tries < 200; tries++)); do
        port=$((20000 + RANDOM % 12000))
        if [[ $USED_PORTS != *" $port "* ]] && ! port_open "$port"; then
            USED_PORTS+="$port "
            printf -v "$1" '%s' "$port"
            return 0
        fi
    done
    die "no free port found"
}

# wait_for_port PORT PID SECONDS NAME LOGFILE: wait until PORT accepts connections; fail with
# the log if process PID dies first or time runs out.
wait_for_port() {
    local port=$1 pid=$2 secs=$3 name=$4 logfile=$5 deadline
    deadline=$((SECONDS + secs))
    until port_open "$port"; do
        if ! alive "$pid"; then
            cat "$logfile" >&2 || true
            die "$name exited before listening on $port"
        fi
        if ((SECONDS >= deadline)); then
            cat "$logfile" >&2 || true
            die "$name did not listen on $port within ${secs}s"
        fi
        sleep 0.1
    done
}

# rss_kib PID: resident set size of a process in KiB.
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# cpu_ticks PID...: user + system CPU time of the processes (all their threads) so far, in clock
# ticks; a process that is gone counts 0.
cpu_ticks() {
    local pid ticks total=0
    for pid in "$@"; do
        ticks=$(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null) || ticks=0
        total=$((total + ${ticks:-0}))
    done
    echo "$total"
}

# machine_ticks: "BUSY ALL" clock ticks of every CPU since boot (/proc/stat): busy is user, nice,
# system, irq and softirq; all adds idle, iowait and steal.
machine_ticks() {
    awk '/^cpu / { busy = $2 + $3 + $4 + $7 + $8; print busy, busy + $5 + $6 + $9; exit }' /proc/stat
}

# us_per_txn TICKS TPS SECS: TICKS of CPU time over a run of SECS at TPS, in microseconds per
# transaction.
us_per_txn() {
    awk -v t="$1" -v tps="$2" -v s="$3" -v hz="$(getconf CLK_TCK)" \
        'BEGIN { if (tps + 0 == 0) print "-"; else printf "%.1f\n", t * 1e6 / hz / (tps * s) }'
}

# ---------------------------------------------------------------------------------------------
# PostgreSQL

# start_postgres: initdb + start a server on a free port. Sets PG_PORT, PG_DATA, PG_SOCKET_DIR,
# PG_LOG. Superuser `postgres` logs in over the socket without a password; TCP uses SCRAM.
start_postgres() {
    local dir=$BENCH_DIR/postgres
    mkdir -p "$dir"
    PG_DATA=$dir/data
    PG_SOCKET_DIR=$dir
    PG_LOG=$dir/postgres.log
    free_port PG_PORT
    if is_root; then
        chown postgres:postgres "$dir"
    fi

    log "initdb in $PG_DATA"
    echo postgres >"$dir/pwfile"
    if is_root; then
        chown postgres:postgres "$dir/pwfile"
    fi
    (cd "$dir" && run_as_pg "$PG_BIN/initdb" -D "$PG_DATA" --auth=scram-sha-256 \
        --username=postgres --pwfile="$dir/pwfile" -E UTF8 --locale=C --no-sync) \
        >"$dir/initdb.log" 2>&1 || {
        cat "$dir/initdb.log" >&2
        die "initdb failed"
    }
    cat >>"$PG_DATA/postgresql.conf" <<EOF
# added by bench/lib.sh
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_SOCKET_DIR'
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 256MB
password_encryption = 'scram-sha-256'
EOF
    cat >"$PG_DATA/pg_hba.conf" <<EOF
local all all trust
host all all 127.0.0.1/32 scram-sha-256
EOF
    (cd "$dir" && run_as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -w -t 60 -l "$PG_LOG" start) \
        >"$dir/pg_ctl.log" 2>&1 || {
        cat "$dir/pg_ctl.log" "$PG_LOG" >&2
        die "postgres did not start"
    }
    on_exit "cd '$dir' && run_as_pg '$PG_BIN/pg_ctl' -D '$PG_DATA' -m immediate -w stop"
    log "postgres $("$PG_BIN/postgres" --version | awk '{ print $3 }') listening on 127.0.0.1:$PG_PORT"
}

# pg_admin [DB] SQL: run SQL as superuser over the socket, unaligned tuples-only output.
pg_admin() {
    local db=postgres
    if [[ $# -gt 1 ]]; then
        db=$1
        shift
    fi
    "$PG_BIN/psql" -X -A -t -q -v ON_ERROR_STOP=1 -h "$PG_SOCKET_DIR" -p "$PG_PORT" -U postgres -d "$db" -c "$1"
}

# create_bench_db USER PASSWORD DB: login role with a SCRAM secret owning database DB.
create_bench_db() {
    local user=$1 password=$2 db=$3
    pg_admin "CREATE ROLE \"$user\" LOGIN PASSWORD '$password'"
    pg_admin "CREATE DATABASE \"$db\" OWNER \"$user\""
}

# scram_secret USER: the stored password secret, as PgBouncer's auth_file wants it.
scram_secret() { pg_admin "SELECT rolpassword FROM pg_authid WHERE rolname = '$1'"; }

# pgbench_init SCALE USER PASSWORD DB
pgbench_init() {
    local scale=$1 user=$2 password=$3 db=$4
    log "pgbench -i -s $scale"
    PGPASSWORD=$password "$PG_BIN/pgbench" -i -q -s "$scale" -h 127.0.0.1 -p "$PG_PORT" \
        -U "$user" "$db" >"$BENCH_DIR/pgbench-init.log" 2>&1 || {
        cat "$BENCH_DIR/pgbench-init.log" >&2
        die "pgbench -i failed"
    }
    pg_admin "$db" "VACUUM ANALYZE"
}

# ---------------------------------------------------------------------------------------------
# PgBouncer

# start_pgbouncer USER DB POOL_SIZE [EXTRA INI LINES...]: transaction pooling in front of the
# Postgres above, SCRAM auth with the user's secret copied from pg_authid (PgBouncer then logs in
# to Postgres with the keys the client's SCRAM exchange proves). Sets PGBOUNCER_PORT/_PID/_LOG.
# With PGBOUNCER_UNIX=1, it reaches Postgres on its Unix-domain socket and listens on one of its
# own in PGBOUNCER_DIR (beside TCP).
start_pgbouncer() {
    local user=$1 db=$2 pool_size=$3
    shift 3
    command -v pgbouncer >/dev/null || die "pgbouncer not installed (apt-get install -y pgbouncer)"
    local dir=$BENCH_DIR/pgbouncer${PGBOUNCER_UNIX:+-unix} origin_host=127.0.0.1 socket_dir=
    if [[ ${PGBOUNCER_UNIX:-} == 1 ]]; then
        origin_host=$PG_SOCKET_DIR
        socket_dir=$dir
    fi
    PGBOUNCER_DIR=$dir
    mkdir -p "$dir"
    free_port PGBOUNCER_PORT
    PGBOUNCER_LOG=$dir/pgbouncer.log
    printf '"%s" "%s"\n' "$user" "$(scram_secret "$user")" >"$dir/userlist.txt"
    chmod 600 "$dir/userlist.txt"
    {
        cat <<EOF
[databases]
$db = host=$origin_host port=$PG_PORT dbname=$db

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGBOUNCER_PORT
unix_socket_dir = $socket_dir
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = $pool_size
max_client_conn = 10000
max_db_connections = 0
ignore_startup_parameters = extra_float_digits,options
log_connections = 0
log_disconnections = 0
logfile = $PGBOUNCER_LOG
pidfile = $dir/pgbouncer.pid
EOF
        printf '%s\n' "$@"
    } >"$dir/pgbouncer.ini"
    if is_root; then
        chown -R postgres:postgres "$dir"
    fi

    spawn_as_pg "$dir/stderr.log" pgbouncer "$dir/pgbouncer.ini"
    PGBOUNCER_PID=$SPAWNED_PID
    on_exit "stop_pid $PGBOUNCER_PID"
    wait_for_port "$PGBOUNCER_PORT" "$PGBOUNCER_PID" 15 pgbouncer "$dir/stderr.log"
    log "pgbouncer $(pgbouncer --version | awk 'NR==1 {print $2}') listening on 127.0.0.1:$PGBOUNCER_PORT (pid $PGBOUNCER_PID)"
}

# ---------------------------------------------------------------------------------------------
# pgwarp

# start_pgwarp BINARY ORIGIN_URL POOL_SIZE [EXTRA FLAGS...]: sets PGWARP_PORT/_PID/_LOG.
start_pgwarp() {
    local binary=$1 origin=$2 pool_size=$3
    shift 3
    free_port PGWARP_PORT
    PGWARP_LOG=$BENCH_DIR/pgwarp.log
    "$binary" --listen "127.0.0.1:$PGWARP_PORT" --origin "$origin" --pool-size "$pool_size" \
        --max-client-conn 10000 --log-level warn "$@" >"$PGWARP_LOG" 2>&1 </dev/null &
    PGWARP_PID=$!
    on_exit "stop_pid $PGWARP_PID"
    wait_for_port "$PGWARP_PORT" "$PGWARP_PID" 15 pgwarp "$PGWARP_LOG"
    log "pgwarp listening on 127.0.0.1:$PGWARP_PORT (pid $PGWARP_PID)"
}

# ---------------------------------------------------------------------------------------------
# pgbench and statistics

# pgbench_once ENDPOINT USER PASSWORD DB SECS [PGBENCH ARGS...]: one timed run against
# ENDPOINT, a port on 127.0.0.1 or DIR:PORT for the Unix-domain socket DIR/.s.PGSQL.PORT.
# Prints "TPS LATENCY_MS"; on failure prints the pgbench output to stderr and returns 1.
pgbench_once() {
    local port=$1 user=$2 password=$3 db=$4 secs=$5 host=127.0.0.1
    shift 5
    if [[ $port == */* ]]; then
        host=${port%:*}
        port=${port##*:}
    fi
    local out=$BENCH_DIR/pgbench-last.log tps lat
    if ! PGPASSWORD=$password "$PG_BIN/pgbench" -h "$host" -p "$port" -U "$user" \
        -n -T "$secs" "$@" "$db" >"$out" 2>&1; then
        log "pgbench -p $port $* failed:"
        tail -n 20 "$out" >&2
        return 1
    fi
    tps=$(awk '/^tps = / { print $3; exit }' "$out")
    lat=$(awk '/^latency average = / { print $4; exit }' "$out")
    if [[ -z $tps || -z $lat ]] || grep -q '^number of failed transactions: [1-9]' "$out"; then
        log "pgbench -p $port $* reported errors:"
        tail -n 20 "$out" >&2
        return 1
    fi
    echo "$tps $lat"
}

# median NUMBERS...: the median (mean of the middle two for an even count); "-" for none.
median() {
    if [[ $# -eq 0 ]]; then
        echo -
        return
    fi
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 }
        END { if (NR % 2) printf "%.3f\n", v[(NR + 1) / 2];
              else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# ratio A B [FORMAT]: A / B, or "-" when either is missing or B is zero.
ratio() {
    awk -v a="$1" -v b="$2" -v f="${3:-%.2fx}" 'BEGIN {
        if (a == "-" || b == "-" || a == "" || b == "" || b + 0 == 0) print "-";
        else printf f "\n", a / b }'
}

# paired_ratio "A VALUES" "B VALUES": the median over runs of A[i] / B[i], where A[i] and B[i] ran
# in the same round of an interleaved grid; "-" when the lists are empty or of different lengths
# (a failed run). A slow spell of a shared machine hits both members of a pair, so on a noisy
# machine this moves less than the ratio of the two medians.
paired_ratio() {
    local -a a b r=()
    local i
    read -ra a <<<"$1"
    read -ra b <<<"$2"
    if ((${#a[@]} == 0 || ${#a[@]} != ${#b[@]})); then
        echo -
        return
    fi
    for ((i = 0; i < ${#a[@]}; i++)); do
        r+=("$(ratio "${a[i]}" "${b[i]}" %.4f)")
    done
    if [[ " ${r[*]} " == *" - "* ]]; then
        echo -
        return
    fi
    printf '%.2fx\n' "$(median "${r[@]}")"
}

# difference A B: A - B with 3 decimals, or "-".
difference() {
    awk -v a="$1" -v b="$2" 'BEGIN {
        if (a == "-" || b == "-" || a == "" || b == "") print "-";
        else printf "%+.3f\n", a - b }'
}

# ---------------------------------------------------------------------------------------------
# Report: everything printed with `report` goes to stdout and to $REPORT_FILE.

report_start() {
    REPORT_FILE=$1
    mkdir -p "$(dirname "$REPORT_FILE")"
    : >"$REPORT_FILE"
}

report() { printf '%s\n' "$*" | tee -a "$REPORT_FILE"; }
reportf() {
    # shellcheck disable=SC2059
    printf "$@" | tee -a "$REPORT_FILE"
}

# ---------------------------------------------------------------------------------------------
# Comparing targets

# Targets are named endpoints on 127.0.0.1 that pgbench can be pointed at.
TARGET_NAMES=()
declare -A TARGET_PORT=() TARGET_PID=()
FAILURES=0

# add_target NAME PORT [PID]: PID is the serving process, for memory measurements.
add_target() {
    TARGET_NAMES+=("$1")
    TARGET_PORT[$1]=$2
    TARGET_PID[$1]=${3:-}
}

has_target() { [[ -n ${TARGET_PORT[$1]:-} ]]; }

# warm_up SECS USER PASSWORD DB [PGBENCH ARGS...]: one untimed run per target, so caches and
# pools are warm before the first measured run.
warm_up() {
    local secs=$1 user=$2 password=$3 db=$4 target
    shift 4
    for target in "${TARGET_NAMES[@]}"; do
        log "warm-up $target"
        pgbench_once "${TARGET_PORT[$target]}" "$user" "$password" "$db" "$secs" "$@" >/dev/null ||
            log "warm-up against $target failed"
    done
}

# pgbench_compare TITLE "MODES" "CLIENT COUNTS" USER PASSWORD DB RUNS SECS -- PGBENCH ARGS...
#
# For every mode (-M) and client count, runs pgbench RUNS times against every target,
# interleaving the targets so slow drift of the machine hits all of them alike, and reports the
# median TPS and latency per target, then the TPS ratios and, at 1 client, the latency each
# pooler adds over direct. Failed runs are counted in FAILURES and left out of the medians.
pgbench_compare() {
    local title=$1 modes=$2 client_counts=$3 user=$4 password=$5 db=$6 runs=$7 secs=$8
    shift 8
    [[ ${1:-} == -- ]] && shift
    local -A tps=() lat=()
    local mode clients jobs run target key result

    for mode in $modes; do
        for clients in $client_counts; do
            jobs=$((clients > 1 ? 2 : 1))
            for ((run = 1; run <= runs; run++)); do
                for target in "${TARGET_NAMES[@]}"; do
                    key="$target|$mode|$clients"
                    log "$title: $target -M $mode -c $clients run $run/$runs"
                    if result=$(pgbench_once "${TARGET_PORT[$target]}" "$user" "$password" "$db" \
                        "$secs" -M "$mode" -c "$clients" -j "$jobs" "$@"); then
                        log "$title: $target -M $mode -c $clients: tps ${result% *}, latency ${result#* } ms"
                        tps[$key]+="${result% *} "
                        lat[$key]+="${result#* } "
                    elif [[ " ${EXPECTED_FAILURES:-} " == *" $target|$mode "* ]]; then
                        log "$title: $target -M $mode failed, as expected (see the report)"
                    else
                        FAILURES=$((FAILURES + 1))
                    fi
                done
            done
        done
    done

    report ""
    report "== $title: pgbench $* (median of $runs runs x ${secs}s; -j 2 when clients > 1) =="
    reportf '%-10s %-9s %7s %12s %10s %6s\n' target mode clients tps lat_ms runs
    local -A med_tps=() med_lat=()
    for mode in $modes; do
        for clients in $client_counts; do
            for target in "${TARGET_NAMES[@]}"; do
                key="$target|$mode|$clients"
                # shellcheck disable=SC2086
                med_tps[$key]=$(median ${tps[$key]:-})
                # shellcheck disable=SC2086
                med_lat[$key]=$(median ${lat[$key]:-})
                MEDIAN_TPS[$title|$key]=${med_tps[$key]}
                local n
                n=$(wc -w <<<"${tps[$key]:-}")
                reportf '%-10s %-9s %7s %12s %10s %6s\n' "$target" "$mode" "$clients" \
                    "${med_tps[$key]}" "${med_lat[$key]}" "$n/$runs"
            done
        done
    done

    report ""
    report "-- TPS ratios; added latency = avg latency minus direct's (ms), at 1 client --"
    reportf '%-9s %7s %14s %17s %17s %13s %16s\n' mode clients pgwarp/direct pgbouncer/direct \
        pgwarp/pgbouncer +lat_pgwarp +lat_pgbouncer
    local d w b wl bl
    for mode in $modes; do
        for clients in $client_counts; do
            d=${med_tps[direct|$mode|$clients]:--}
            w=${med_tps[pgwarp|$mode|$clients]:--}
            b=${med_tps[pgbouncer|$mode|$clients]:--}
            wl=- bl=-
            if [[ $clients == 1 ]]; then
                wl=$(difference "${med_lat[pgwarp|$mode|$clients]:--}" "${med_lat[direct|$mode|$clients]:--}")
                bl=$(difference "${med_lat[pgbouncer|$mode|$clients]:--}" "${med_lat[direct|$mode|$clients]:--}")
            fi
            reportf '%-9s %7s %14s %17s %17s %13s %16s\n' "$mode" "$clients" \
                "$(ratio "$w" "$d")" "$(ratio "$b" "$d")" "$(ratio "$w" "$b")" "$wl" "$bl"
        done
    done
}

# idle_memory IDLE_CLIENTS_BIN URL_USER PASSWORD DB COUNT TARGET...: for each target (which must
# have a PID), opens COUNT idle authenticated clients and reports the growth of the serving
# process's resident memory per client.
idle_memory() {
    local binary=$1 user=$2 password=$3 db=$4 count=$5
    shift 5
    local target pid port before after out err holder deadline connected
    report ""
    report "== memory per idle client: $count authenticated clients, each ran SELECT 1 once =="
    reportf '%-10s %8s %15s %15s %15s\n' target clients rss_before_kib rss_after_kib kib_per_client
    for target in "$@"; do
        has_target "$target" || continue
        pid=${TARGET_PID[$target]}
        port=${TARGET_PORT[$target]}
        out=$BENCH_DIR/idle-$target.out
        err=$BENCH_DIR/idle-$target.err
        sleep 1
        before=$(rss_kib "$pid")
        log "opening $count idle clients against $target"
        : >"$out"
        "$binary" --url "postgres://$user:$password@127.0.0.1:$port/$db" --count "$count" \
            --hold-secs 3600 >"$out" 2>"$err" </dev/null &
        holder=$!
        on_exit "stop_pid $holder"
        deadline=$((SECONDS + 600))
        while ! grep -q '^connected ' "$out" && alive "$holder" && ((SECONDS < deadline)); do
            sleep 0.5
        done
        connected=$(awk '/^connected / { print $2 }' "$out")
        if [[ ${connected:-0} != "$count" ]]; then
            log "idle clients against $target: only ${connected:-0} of $count connected"
            cat "$err" >&2
            FAILURES=$((FAILURES + 1))
            stop_pid "$holder"
            reportf '%-10s %8s %15s %15s %15s\n' "$target" "${connected:-0}" "$before" - FAILED
            continue
        fi
        sleep 2
        after=$(rss_kib "$pid")
        stop_pid "$holder"
        reportf '%-10s %8s %15s %15s %15s\n' "$target" "$count" "$before" "$after" \
            "$(ratio "$((after - before))" "$count" %.2f)"
    done
}
