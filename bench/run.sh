#!/usr/bin/env bash
# pgwarp benchmarks: pgwarp against direct PostgreSQL and PgBouncer, in one run, on one
# freshly started PostgreSQL. Run from the repository root:
#
#   bash bench/run.sh [--quick] [--skip-pgwarp] [--runs N] [--secs S] [--idle-clients N]
#                     [--far-delay-us US] [--only BENCH[,BENCH...]]
#
# Benches (each is a bench_<name> function below; add new ones the same way and list them in
# ALL_BENCHES): select_only (pgbench -S, simple and extended protocol, 1 and 32 clients),
# prepared (pgbench -S -M prepared vs -M extended at 32 clients), cache (hot point selects
# with and without updates, cache on vs off vs direct), far_origin (the same hot reads with
# PostgreSQL behind a delay proxy, as if it were in another data centre), tunnel (pgwarp over
# pgwarp tunnel vs over TCP), unix_socket (pgbench -S with Unix-domain sockets on both sides,
# direct vs pgwarp vs PgBouncer, beside TCP) and idle_memory (resident memory per idle
# authenticated client, pgwarp vs PgBouncer).
#
# The report goes to stdout and to bench/results/latest.txt; progress goes to stderr.
# Exits non-zero if any measurement failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh

ALL_BENCHES=(select_only prepared cache far_origin tunnel unix_socket idle_memory)
# Median TPS of every pgbench_compare run, keyed "title|target|mode|clients".
declare -A MEDIAN_TPS=()

RUNS=3
SECS=10
IDLE_CLIENTS=5000
FAR_DELAY_US=1000
SKIP_PGWARP=0
ONLY=""
SCALE=10
POOL_SIZE=20
BENCH_USER=bench
BENCH_PASSWORD=bench
BENCH_DB=bench
RESULTS=bench/results/latest.txt

usage() {
    sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [[ $# -gt 0 ]]; do
    case $1 in
    --quick)
        RUNS=1
        SECS=3
        ;;
    --skip-pgwarp) SKIP_PGWARP=1 ;;
    --runs)
        RUNS=$2
        shift
        ;;
    --secs)
        SECS=$2
        shift
        ;;
    --idle-clients)
        IDLE_CLIENTS=$2
        shift
        ;;
    --far-delay-us)
        FAR_DELAY_US=$2
        shift
        ;;
    --only)
        ONLY=${2//,/ }
        shift
        ;;
    -h | --help) usage 0 ;;
    *)
        echo "unknown argument: $1" >&2
        usage 2 >&2
        ;;
    esac
    shift
done

# ---------------------------------------------------------------------------------------------
# Benches

bench_select_only() {
    pgbench_compare select-only "simple extended" "1 32" \
        "$BENCH_USER" "$BENCH_PASSWORD" "$BENCH_DB" "$RUNS" "$SECS" -- -S
}

# Named prepared statements: -M prepared against -M extended through pgwarp (target: prepared
# >= 1.15x extended), against direct Postgres, and against PgBouncer, whose Debian 1.18 has no
# prepared-statement support in transaction mode and is expected to fail -M prepared.
bench_prepared() {
    EXPECTED_FAILURES="pgbouncer|prepared" pgbench_compare prepared "extended prepared" "32" \
        "$BENCH_USER" "$BENCH_PASSWORD" "$BENCH_DB" "$RUNS" "$SECS" -- -S
    local p=${MEDIAN_TPS[prepared|pgwarp|prepared|32]:--} e=${MEDIAN_TPS[prepared|pgwarp|extended|32]:--}
    report "pgwarp -M prepared / pgwarp -M extended at 32 clients: $(ratio "$p" "$e") (target >= 1.15x)"
    if [[ ${MEDIAN_TPS[prepared|pgbouncer|prepared|32]:--} == - ]]; then
        report "pgbouncer -M prepared: failed (no prepared statements in transaction mode before PgBouncer 1.21)"
    fi
}

# The query cache: point selects over 1,000 hot keys (read-only), the same with one update in
# ten (read-mostly), and pgbench -S over every row (no-reuse, the cache's worst case), directly,
# through pgwarp without the cache, and with it. Targets: with
# the cache, read-only TPS >= 2x direct, and cache-hit latency at 1 client <= 50% of direct.
bench_cache() {
    ((SKIP_PGWARP)) && return 0
    local read=$BENCH_DIR/cache-read.sql write=$BENCH_DIR/cache-write.sql
    printf '\\set aid random(1, 1000)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n' >"$read"
    printf '\\set aid random(1, 1000)\nUPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n' >"$write"
    # The round trip with next to no server work: Postgres answering SELECT 1, and a stand-in
    # server that answers the same point select from a canned row (bench/canned_server.rs). No
    # server that sleeps while it waits answers a client on this machine faster than the latter;
    # pgwarp's cache hits can, because its workers poll (busy_poll) instead of sleeping.
    local select1=$BENCH_DIR/cache-floor.sql canned_port canned_log=$BENCH_DIR/canned.log floor
    printf 'SELECT 1;\n' >"$select1"
    free_port canned_port
    target/release/examples/canned_server --listen "127.0.0.1:$canned_port" >"$canned_log" 2>&1 </dev/null &
    local canned_pid=$!
    on_exit "stop_pid $canned_pid"
    wait_for_port "$canned_port" "$canned_pid" 15 canned_server "$canned_log"
    local -A floor_port=([select1]=$PG_PORT [canned]=$canned_port) floor_script=([select1]=$select1 [canned]=$read)
    local -A floor_lat=()
    local plain_port=${TARGET_PORT[pgwarp]}
    start_pgwarp target/release/pgwarp \
        "postgres://$BENCH_USER:$BENCH_PASSWORD@127.0.0.1:$PG_PORT/$BENCH_DB" "$POOL_SIZE"
    local -A port=([direct]=$PG_PORT [nocache]=$plain_port [cache]=$PGWARP_PORT)
    local -A tps=() lat=()
    local targets=(direct nocache cache) workloads=(read-only read-mostly no-reuse)
    local workload clients run target key result args
    # Warm the cache (and the catalog it needs) untimed.
    pgbench_once "${port[cache]}" "$BENCH_USER" "$BENCH_PASSWORD" "$BENCH_DB" 3 -M prepared -c 8 -j 2 \
        -f "$read" >/dev/null || true
    for workload in "${workloads[@]}"; do
        case $workload in
            read-only) args=(-f "$read") ;;
            read-mostly) args=(-f "$read@9" -f "$write@1") ;;
            # pgbench -S over all 1,000,000 rows: nearly every read a miss that is recorded and
            # stored, what the cache costs where answers are not reused.
            no-reuse) args=(-b select-only) ;;
        esac
        for clients in 1 32; do
            for ((run = 1; run <= RUNS; run++)); do
                for target in "${targets[@]}"; do
                    key="$workload|$clients|$target"
                    log "cache: $target $workload -c $clients run $run/$RUNS"
                    if result=$(pgbench_once "${port[$target]}" "$BENCH_USER" "$BENCH_PASSWORD" "$BENCH_DB" \
                        "$SECS" -M prepared -c "$clients" -j "$((clients > 1 ? 2 : 1))" "${args[@]}"); then
                        tps[$key]+="${result% *} "
                        lat[$key]+="${result#* } "
                    else
                        FAILURES=$((FAILURES + 1))
                    fi
                done
                if [[ $workload == read-only && $clients == 1 ]]; then
                    for floor in select1 canned; do
                        log "cache: floor ($floor) -c 1 run $run/$RUNS"
                        if result=$(pgbench_once "${floor_port[$floor]}" "$BENCH_USER" "$BENCH_PASSWORD" \
                            "$BENCH_DB" "$SECS" -M prepared -c 1 -j 1 -f "${floor_script[$floor]}"); then
                            floor_lat[$floor]+="${result#* } "
                        else
                            FAILURES=$((FAILURES + 1))
                        fi
                    done
                fi
            done
        done
    done
    report ""
    report "== cache: point selects over 1000 hot keys (no-reuse: pgbench -S over all rows), pgbench -M prepared (median of $RUNS runs x ${SECS}s) =="
    reportf '%-12s %7s %-8s %12s %10s\n' workload clients target tps lat_ms
    local -A mt=() ml=()
    for workload in "${workloads[@]}"; do
        for clients in 1 32; do
            for target in "${targets[@]}"; do
                key="$workload|$clients|$target"
                # shellcheck disable=SC2086
                mt[$key]=$(median ${tps[$key]:-})
                # shellcheck disable=SC2086
                ml[$key]=$(median ${lat[$key]:-})
                reportf '%-12s %7s %-8s %12s %10s\n' "$workload" "$clients" "$target" "${mt[$key]}" "${ml[$key]}"
            done
        done
    done
    report ""
    reportf '%-12s %7s %14s %15s %20s\n' workload clients cache/direct cache/nocache latency_cache/direct
    for workload in "${workloads[@]}"; do
        for clients in 1 32; do
            reportf '%-12s %7s %14s %15s %20s\n' "$workload" "$clients" \
                "$(ratio "${mt[$workload|$clients|cache]}" "${mt[$workload|$clients|direct]}")" \
                "$(ratio "${mt[$workload|$clients|cache]}" "${mt[$workload|$clients|nocache]}")" \
                "$(percent "${ml[$workload|$clients|cache]}" "${ml[$workload|$clients|direct]}")"
        done
    done
    # shellcheck disable=SC2086
    local canned_med
    # shellcheck disable=SC2086
    canned_med=$(median ${floor_lat[canned]:-})
    # shellcheck disable=SC2086
    report "loopback round-trip floor at 1 client, median latency: direct SELECT 1 $(median ${floor_lat[select1]:-}) ms;" \
        "a canned-answer server (no work, sleeps between messages) $canned_med ms, $(percent "$canned_med" "${ml[read-only|1|direct]}") of direct"
    report "targets: read-only cache/direct >= 2x at 32 clients; read-only latency cache/direct <= 50% at 1 client"
}

# run_grid LABEL "CLIENT COUNTS" "TARGETS" [PGBENCH ARGS...]: RUNS rounds of one pgbench run
# per target (its port in the caller's associative array `port`) at each client count, targets
# interleaved within a round. Appends each run's TPS and latency to the caller's `tps` and `lat`,
# keyed "clients|target". A caller that also declares the associative arrays `cpu`, `idle`,
# `pids` and `proc_cpu` gets each run's CPU time: the whole machine's per transaction in `cpu`,
# the share of the machine left idle in `idle`, and, for a target whose processes `pids` names,
# theirs per transaction in `proc_cpu`.
run_grid() {
    local label=$1 count_list=$2 target_list=$3 clients run target key result measure=0
    local machine_before procs procs_before
    shift 3
    declare -p cpu idle pids proc_cpu >/dev/null 2>&1 && measure=1
    for clients in $count_list; do
        for ((run = 1; run <= RUNS; run++)); do
            for target in $target_list; do
                key="$clients|$target"
                log "$label: $target -c $clients run $run/$RUNS"
                if ((measure)); then
                    procs=${pids[$target]:-}
                    machine_before=$(machine_ticks)
                    # shellcheck disable=SC2086
                    procs_before=$(cpu_ticks $procs)
                fi
                if result=$(pgbench_once "${port[$target]}" "$BENCH_USER" "$BENCH_PASSWORD" "$BENCH_DB" \
                    "$SECS" "$@" -c "$clients" -j "$((clients > 1 ? 2 : 1))"); then
                    tps[$key]+="${result% *} "
                    lat[$key]+="${result#* } "
                    if ((measure)); then
                        run_cpu "$key" "${result% *}" "$machine_before" "$procs_before" "$procs"
                    fi
                    log "$label: $target -c $clients run $run/$RUNS: ${result% *} tps, ${result#* } ms"
                else
                    FAILURES=$((FAILURES + 1))
                fi
            done
        done
    done
}

# run_cpu KEY TPS "MACHINE TICKS BEFORE" "PROCESS TICKS BEFORE" "PIDS": appends the run that just
# ended to the caller's `cpu`, `idle` and (with PIDS) `proc_cpu` (see run_grid).
run_cpu() {
    local key=$1 run_tps=$2 before=$3 procs_before=$4 procs=$5 after busy all
    after=$(machine_ticks)
    busy=$((${after% *} - ${before% *}))
    all=$((${after#* } - ${before#* }))
    cpu[$key]+="$(us_per_txn "$busy" "$run_tps" "$SECS") "
    idle[$key]+="$(ratio "$((all - busy))" "$all" %.3f) "
    if [[ -n $procs ]]; then
        # shellcheck disable=SC2086
        proc_cpu[$key]+="$(us_per_txn "$(($(cpu_ticks $procs) - procs_before))" "$run_tps" "$SECS") "
    fi
}

# warm_grid "TARGETS": a short untimed run against each of the caller's `port` targets, so the
# poolers started for a bench have their connections open before the first measured run.
warm_grid() {
    local target
    for target in $1; do
        pgbench_once "${port[$target]}" "$BENCH_USER" "$BENCH_PASSWORD" "$BENCH_DB" 2 -S -c 8 -j 2 >/dev/null || true
    done
}

# report_grid "CLIENT COUNTS" "TARGETS" TARGET_COLUMN: the medians of the caller's `tps` and `lat`
# into its `mt` and `ml`, and a table of them.
report_grid() {
    local count_list=$1 target_list=$2 clients target key
    reportf '%7s %-14s %12s %10s\n' clients "$3" tps lat_ms
    for clients in $count_list; do
        for target in $target_list; do
            key="$clients|$target"
            # shellcheck disable=SC2086
            mt[$key]=$(median ${tps[$key]:-})
            # shellcheck disable=SC2086
            ml[$key]=$(median ${lat[$key]:-})
            reportf '%7s %-14s %12s %10s\n' "$clients" "$target" "${mt[$key]}" "${ml[$key]}"
        done
    done
}

# The cache where it is meant to be used: PostgreSQL far away. A delay proxy
# (bench/delay_proxy.rs) holds every chunk FAR_DELAY_US each way between the clients, or pgwarp,
# and PostgreSQL; pgwarp runs next to the clients. Hot point selects (read-only), directly over
# the proxy, through pgwarp without the cache and with it. A miss pays the long round trip; a
# hit does not.
bench_far_origin() {
    ((SKIP_PGWARP)) && return 0
    local read=$BENCH_DIR/far-read.sql proxy_port proxy_log=$BENCH_DIR/delay-proxy.log
    printf '\\set aid random(1, 1000)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n' >"$read"
    free_port proxy_port
    target/release/examples/delay_proxy --listen "127.0.0.1:$proxy_port" --target "127.0.0.1:$PG_PORT" \
        --delay-us "$FAR_DELAY_US" >"$proxy_log" 2>&1 </dev/null &
    local proxy_pid=$!
    on_exit "stop_pid $proxy_pid"
    wait_for_port "$proxy_port" "$proxy_pid" 15 delay_proxy "$proxy_log"
    local origin="postgres://$BENCH_USER:$BENCH_PASSWORD@127.0.0.1:$proxy_port/$BENCH_DB"
    start_pgwarp target/release/pgwarp "$origin" "$POOL_SIZE" --no-cache
    local nocache_port=$PGWARP_PORT
    start_pgwarp target/release/pgwarp "$origin" "$POOL_SIZE"
    local -A port=([direct]=$proxy_port [nocache]=$nocache_port [cache]=$PGWARP_PORT)
    local -A tps=() lat=() mt=() ml=()
    local clients
    # Warm the cache untimed: every hot key once, at the far round trip.
    pgbench_once "${port[cache]}" "$BENCH_USER" "$BENCH_PASSWORD" "$BENCH_DB" 5 -M prepared -c 16 -j 2 \
        -f "$read" >/dev/null || true
    run_grid "far origin" "1 32" "direct nocache cache" -M prepared -f "$read"
    report ""
    report "== far origin: PostgreSQL behind a ${FAR_DELAY_US}us-each-way delay proxy, point selects over 1000 hot keys, pgbench -M prepared (median of $RUNS runs x ${SECS}s) =="
    report_grid "1 32" "direct nocache cache" target
    for clients in 1 32; do
        report "far origin, $clients clients: cache/direct TPS $(ratio "${mt[$clients|cache]}" "${mt[$clients|direct]}"), latency cache/direct $(percent "${ml[$clients|cache]}" "${ml[$clients|direct]}")"
    done
}

# The WebSocket tunnel: pgbench -S through pgwarp over `pgwarp tunnel` (ws://, loopback) against
# pgwarp over plain TCP. Target: the tunnel costs <= 15% TPS at 32 clients. The floor beside
# them: pgwarp through a bare TCP relay process (bench/tcp_relay.rs), the cost of any far end
# before it frames a byte. And the tunnel as it runs on the database's own host, reaching
# PostgreSQL on its Unix-domain socket (`--target /dir/.s.PGSQL.PORT`).
bench_tunnel() {
    ((SKIP_PGWARP)) && return 0
    local tunnel_pgwarp tunnel_pid socket_pgwarp socket_pid relay_port relay_log=$BENCH_DIR/tcp_relay.log
    start_tunnel_pgwarp tunnel "127.0.0.1:$PG_PORT"
    tunnel_pgwarp=$PGWARP_PORT tunnel_pid=$TUNNEL_PID
    start_tunnel_pgwarp tunnel_socket "$PG_SOCKET_DIR/.s.PGSQL.$PG_PORT"
    socket_pgwarp=$PGWARP_PORT socket_pid=$TUNNEL_PID
    free_port relay_port
    target/release/examples/tcp_relay --listen "127.0.0.1:$relay_port" --target "127.0.0.1:$PG_PORT" \
        >"$relay_log" 2>&1 </dev/null &
    local relay_pid=$!
    on_exit "stop_pid $relay_pid"
    wait_for_port "$relay_port" "$relay_pid" 15 tcp_relay "$relay_log"
    start_pgwarp target/release/pgwarp \
        "postgres://$BENCH_USER:$BENCH_PASSWORD@127.0.0.1:$relay_port/$BENCH_DB" "$POOL_SIZE" --no-cache
    local -A port=([tcp]=${TARGET_PORT[pgwarp]} [relay]=$PGWARP_PORT [tunnel]=$tunnel_pgwarp
        [tunnel_socket]=$socket_pgwarp)
    local -A tps=() lat=() mt=() ml=() cpu=() idle=() proc_cpu=()
    local -A pids=([relay]=$relay_pid [tunnel]=$tunnel_pid [tunnel_socket]=$socket_pid)
    local targets="tcp relay tunnel tunnel_socket"
    warm_grid "relay tunnel tunnel_socket"
    run_grid tunnel "1 32" "$targets" -S -M extended
    report ""
    report "== tunnel: pgbench -S -M extended through pgwarp, origin over plain TCP, over a bare TCP relay process (the floor for any far end), over pgwarp tunnel (ws://), and over pgwarp tunnel reaching PostgreSQL on its Unix-domain socket =="
    report_grid "1 32" "$targets" origin
    report "tunnel/tcp TPS at 32 clients: $(ratio "${mt[32|tunnel]}" "${mt[32|tcp]}") of the medians, $(paired_ratio "${tps[32|tunnel]:-}" "${tps[32|tcp]:-}") paired by round (target >= 0.85x; the bare relay: $(ratio "${mt[32|relay]}" "${mt[32|tcp]}"), paired $(paired_ratio "${tps[32|relay]:-}" "${tps[32|tcp]:-}"); tunnel/relay: $(ratio "${mt[32|tunnel]}" "${mt[32|relay]}") for what WebSocket framing costs beyond the bare hop); added latency at 1 client: $(difference "${ml[1|tunnel]}" "${ml[1|tcp]}") ms (relay: $(difference "${ml[1|relay]}" "${ml[1|tcp]}") ms)"
    report "tunnel on the database's host (PostgreSQL on its socket)/tcp TPS at 32 clients: $(ratio "${mt[32|tunnel_socket]}" "${mt[32|tcp]}") of the medians, $(paired_ratio "${tps[32|tunnel_socket]:-}" "${tps[32|tcp]:-}") paired; added latency at 1 client: $(difference "${ml[1|tunnel_socket]}" "${ml[1|tcp]}") ms"
    # Where the hop's cost goes. With every CPU busy, TPS is the machine's CPU divided by the CPU
    # each transaction takes (pgbench, pgwarp, PostgreSQL and the far end together), so the TPS
    # ratio is the ratio of those CPU times and the far end's own share is what the hop adds.
    # shellcheck disable=SC2086
    report "CPU at 32 clients, medians: machine idle $(median ${idle[32|tcp]:-}) tcp, $(median ${idle[32|relay]:-}) relay, $(median ${idle[32|tunnel]:-}) tunnel (share of all CPU time);" \
        "machine CPU per transaction $(median ${cpu[32|tcp]:-}) us tcp, $(median ${cpu[32|relay]:-}) us relay, $(median ${cpu[32|tunnel]:-}) us tunnel, $(median ${cpu[32|tunnel_socket]:-}) us tunnel to the socket;" \
        "the far end's own $(median ${proc_cpu[32|relay]:-}) us relay, $(median ${proc_cpu[32|tunnel]:-}) us pgwarp tunnel, $(median ${proc_cpu[32|tunnel_socket]:-}) us pgwarp tunnel to the socket" \
        "(0.85x needs the whole hop within $(awk -v c="$(median ${cpu[32|tcp]:-})" 'BEGIN { if (c == "-") print "-"; else printf "%.1f", c / 0.85 - c }') us)"
}

# start_tunnel_pgwarp NAME TARGET: a `pgwarp tunnel` (ws://) in front of TARGET and a pure-pooler
# pgwarp whose origin connections go through it; sets TUNNEL_PID and PGWARP_PORT/_PID/_LOG.
start_tunnel_pgwarp() {
    local name=$1 target=$2 listen log=$BENCH_DIR/$1.log
    free_port listen
    target/release/pgwarp tunnel --listen "127.0.0.1:$listen" --target "$target" \
        --client-id bench --client-secret bench-secret --log-level warn >"$log" 2>&1 </dev/null &
    TUNNEL_PID=$!
    on_exit "stop_pid $TUNNEL_PID"
    wait_for_port "$listen" "$TUNNEL_PID" 15 "pgwarp tunnel ($name)" "$log"
    start_pgwarp target/release/pgwarp \
        "postgres://$BENCH_USER:$BENCH_PASSWORD@127.0.0.1:$PG_PORT/$BENCH_DB" "$POOL_SIZE" --no-cache \
        --tunnel-url "ws://127.0.0.1:$listen/" --tunnel-client-id bench --tunnel-client-secret bench-secret
}

# Unix-domain sockets on both sides, as a pooler next to the database (or a sidecar sharing a
# socket with the app) uses them: pgbench -S with pgbench on each one's socket and every pooler
# reaching Postgres on its socket, for direct Postgres, pgwarp and PgBouncer, beside the same
# three over TCP (the select-only runs' targets).
bench_unix_socket() {
    ((SKIP_PGWARP)) && return 0
    local dir=$BENCH_DIR/pgwarp-unix
    mkdir -p "$dir"
    start_pgwarp target/release/pgwarp \
        "postgres://$BENCH_USER:$BENCH_PASSWORD@/$BENCH_DB?host=$PG_SOCKET_DIR&port=$PG_PORT" "$POOL_SIZE" \
        --no-cache --unix-socket-dir "$dir"
    local pgwarp_unix=$dir:$PGWARP_PORT
    PGBOUNCER_UNIX=1 start_pgbouncer "$BENCH_USER" "$BENCH_DB" "$POOL_SIZE"
    local -A port=([direct]=$PG_PORT [pgwarp]=${TARGET_PORT[pgwarp]} [pgbouncer]=${TARGET_PORT[pgbouncer]}
        [direct_unix]=$PG_SOCKET_DIR:$PG_PORT [pgwarp_unix]=$pgwarp_unix
        [pgbouncer_unix]=$PGBOUNCER_DIR:$PGBOUNCER_PORT)
    local -A tps=() lat=() mt=() ml=()
    local targets="direct pgwarp pgbouncer direct_unix pgwarp_unix pgbouncer_unix"
    warm_grid "pgwarp_unix pgbouncer_unix"
    run_grid unix_socket "1 32" "$targets" -S -M extended
    report ""
    report "== unix_socket: pgbench -S -M extended over TCP (127.0.0.1) and over Unix-domain sockets (client and origin side) =="
    report_grid "1 32" "$targets" target
    local clients
    for clients in 1 32; do
        report "$clients clients over sockets: pgwarp/direct $(ratio "${mt[$clients|pgwarp_unix]}" "${mt[$clients|direct_unix]}"), pgbouncer/direct $(ratio "${mt[$clients|pgbouncer_unix]}" "${mt[$clients|direct_unix]}"), pgwarp/pgbouncer $(ratio "${mt[$clients|pgwarp_unix]}" "${mt[$clients|pgbouncer_unix]}"); pgwarp socket/TCP $(ratio "${mt[$clients|pgwarp_unix]}" "${mt[$clients|pgwarp]}")"
    done
}

# percent A B: A as a percentage of B, or "-".
percent() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b + 0 == 0) print "-"; else printf "%.0f%%\n", 100 * a / b }'
}

bench_idle_memory() {
    idle_memory target/release/examples/idle_clients "$BENCH_USER" "$BENCH_PASSWORD" "$BENCH_DB" \
        "$IDLE_CLIENTS" pgwarp pgbouncer
}

# ---------------------------------------------------------------------------------------------
# Setup

build() {
    log "building (release)"
    if ((SKIP_PGWARP)); then
        cargo build --release --quiet --example idle_clients
    else
        cargo build --release --quiet --bin pgwarp --example idle_clients --example canned_server \
            --example delay_proxy --example tcp_relay
    fi
}

report_header() {
    report "pgwarp benchmark $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    local commit head
    if head=$(git rev-parse --short --verify -q HEAD 2>/dev/null); then
        commit=$head
        git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || commit+=" (src modified)"
    else
        commit="none (no commits yet)"
    fi
    report "commit:    $commit"
    report "machine:   $(nproc) cpus, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    report "postgres:  $("$PG_BIN/postgres" --version | awk '{ print $3 }') (fsync off, shared_buffers 256MB), pgbench -s $SCALE"
    report "pgbouncer: $(pgbouncer --version | awk 'NR == 1 { print $2 }') transaction mode, default_pool_size $POOL_SIZE, scram-sha-256"
    if ((SKIP_PGWARP)); then
        report "pgwarp:    skipped (--skip-pgwarp)"
    else
        report "pgwarp:    --pool-size $POOL_SIZE --max-client-conn 10000 --log-level warn, busy_poll auto (default) (--no-cache, a pure pooler, except in the cache bench)"
    fi
    report "runs:      $RUNS x ${SECS}s per configuration, targets interleaved; pgbench on the same machine"
}

main() {
    read -r -a BENCHES <<<"${ONLY:-${ALL_BENCHES[*]}}"
    local bench
    for bench in "${BENCHES[@]}"; do
        declare -F "bench_$bench" >/dev/null || die "unknown bench: $bench (have: ${ALL_BENCHES[*]})"
    done
    bench_init
    build
    report_start "$RESULTS"

    start_postgres
    create_bench_db "$BENCH_USER" "$BENCH_PASSWORD" "$BENCH_DB"
    pgbench_init "$SCALE" "$BENCH_USER" "$BENCH_PASSWORD" "$BENCH_DB"
    add_target direct "$PG_PORT"

    if ((!SKIP_PGWARP)); then
        # The pooler comparisons run pgwarp as a pure pooler; bench_cache starts its own with the
        # cache on.
        start_pgwarp target/release/pgwarp \
            "postgres://$BENCH_USER:$BENCH_PASSWORD@127.0.0.1:$PG_PORT/$BENCH_DB" "$POOL_SIZE" --no-cache
        add_target pgwarp "$PGWARP_PORT" "$PGWARP_PID"
    fi

    start_pgbouncer "$BENCH_USER" "$BENCH_DB" "$POOL_SIZE"
    add_target pgbouncer "$PGBOUNCER_PORT" "$PGBOUNCER_PID"

    report_header
    warm_up "$((SECS < 5 ? 1 : 3))" "$BENCH_USER" "$BENCH_PASSWORD" "$BENCH_DB" -S -c 8 -j 2

    local bench
    for bench in "${BENCHES[@]}"; do
        "bench_$bench"
    done

    report ""
    if ((FAILURES > 0)); then
        report "FAILED measurements: $FAILURES (see the log above)"
        log "results written to $RESULTS"
        exit 1
    fi
    log "results written to $RESULTS"
}

main
