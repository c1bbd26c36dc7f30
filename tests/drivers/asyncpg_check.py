#!/usr/bin/env python3
"""asyncpg through pgwarp with its default settings (statement cache on, so every parameterized
query becomes a named prepared statement), many clients on a tiny pool.

Usage: asyncpg_check.py URL [CLIENTS [ITERATIONS]]

Each client is its own connection and, per iteration, runs several distinct parameterized SELECT
shapes (cached statements), one of them failing with division by zero every other time, an
explicit `conn.prepare()` statement reused across transactions, a transaction that INSERTs rows
(one with RETURNING, more with the pipelined `executemany`) and reads them back, and now and then
a cursor iterated inside a transaction, a transaction aborted by a unique violation, and a
rolled-back transaction; halfway, more distinct statements than asyncpg's cache and pgwarp's
per-connection statement LRU hold. Every result and every expected error is checked exactly. Since the pool is far
smaller than the number of clients, a statement prepared on one origin connection is reused on
another, which is what pgwarp must handle. Exits non-zero with a message on the first wrong
result or error; prints one summary line on success. Invoked by tests/drivers.rs.
"""

import asyncio
import hashlib
import os
import sys
import time
import traceback

import asyncpg

DRIVER = "asyncpg"
# Statement shapes every client shares, and shapes only one client uses, in many_statements.
SHARED_SHAPES = 130
OWN_SHAPES = 12
TIMEOUT_S = float(os.environ.get("PGWARP_DRIVER_TIMEOUT", "100"))


class Mismatch(Exception):
    """A query returned something other than what it must."""


def expect(what, got, want):
    if got != want:
        raise Mismatch(f"{what}: got {got!r}, expected {want!r}")


async def expect_error(what, sqlstate, awaitable):
    """Awaits a query that must fail with `sqlstate`; any other outcome is a failure."""
    try:
        got = await awaitable
    except asyncpg.PostgresError as error:
        if error.sqlstate != sqlstate:
            raise Mismatch(f"{what}: failed with {error.sqlstate} ({error}), expected SQLSTATE {sqlstate}") from error
        return
    raise Mismatch(f"{what}: returned {got!r}, expected an error with SQLSTATE {sqlstate}")


def md5_hex(text):
    return hashlib.md5(text.encode()).hexdigest()


class Progress:
    def __init__(self, clients):
        self.done = [0] * clients


async def run_client(url, table, client, iterations, progress):
    conn = await asyncpg.connect(url, timeout=30)
    try:
        # Explicitly prepared once, reused in every iteration, inside and outside transactions,
        # so it must follow the client from one origin connection to another.
        series = await conn.prepare("SELECT n, n * $2::int AS m FROM generate_series(1, $1::int) AS n")
        inserted = 0
        for it in range(iterations):
            where = f"client {client} iteration {it}"

            # Several parameterized shapes: each goes through asyncpg's statement cache.
            expect(f"{where}: sum", await conn.fetchval("SELECT $1::int + $2::int", client, it), client + it)
            expect(
                f"{where}: concat",
                await conn.fetchval("SELECT $1::text || ':' || $2::text", f"c{client}", str(it)),
                f"c{client}:{it}",
            )
            row = await conn.fetchrow(
                "SELECT $1::bigint * 2 AS doubled, $2::float8 / 4 AS quarter, NOT $3::bool AS negated, "
                "length($4::bytea) AS len",
                client * 1_000_000_000 + it,
                float(it),
                it % 2 == 0,
                bytes(range(it % 7)),
            )
            expect(
                f"{where}: typed row",
                tuple(row),
                ((client * 1_000_000_000 + it) * 2, it / 4, it % 2 != 0, it % 7),
            )

            # One cached statement that fails for some parameters: the error must reach the client
            # and leave its statements usable, on whichever origin connection it ran.
            if it % 2 == 1:
                await expect_error(f"{where}: division by zero", "22012", conn.fetchval("SELECT 100 / $1::int", 0))
            else:
                expect(f"{where}: division", await conn.fetchval("SELECT 100 / $1::int", it + 1), 100 // (it + 1))

            k = it % 5 + 1
            rows = await series.fetch(k, client)
            expect(f"{where}: prepared series", [tuple(r) for r in rows], [(n, n * client) for n in range(1, k + 1)])

            # A transaction that writes and reads its own row, reusing cached statements.
            payload = f"asyncpg-{client}-{it}-{md5_hex(str(it))[:8]}"
            async with conn.transaction():
                row_id = await conn.fetchval(
                    f"INSERT INTO {table} (client, iter, k, payload) VALUES ($1, $2, 0, $3) RETURNING id",
                    client,
                    it,
                    payload,
                )
                row = await conn.fetchrow(f"SELECT client, iter, payload FROM {table} WHERE id = $1", row_id)
                expect(f"{where}: row read back in its transaction", tuple(row), (client, it, payload))
                rows = await series.fetch(2, it)
                expect(f"{where}: prepared series in transaction", [tuple(r) for r in rows], [(1, it), (2, 2 * it)])
                # executemany pipelines Bind/Execute for every row before one Sync.
                await conn.executemany(
                    f"INSERT INTO {table} (client, iter, k, payload) VALUES ($1, $2, $3, $4)",
                    [(client, it, extra, f"{payload}/{extra}") for extra in (1, 2)],
                )
                rows = await conn.fetch(
                    f"SELECT k, payload FROM {table} WHERE client = $1 AND iter = $2 ORDER BY k", client, it
                )
                expect(
                    f"{where}: executemany rows in transaction",
                    [tuple(r) for r in rows],
                    [(0, payload), (1, f"{payload}/1"), (2, f"{payload}/2")],
                )
            inserted += 3
            expect(
                f"{where}: committed row count",
                await conn.fetchval(f"SELECT count(*) FROM {table} WHERE client = $1", client),
                inserted,
            )

            # A cursor inside a transaction: several Execute round trips with a row limit.
            if it % 3 == 0:
                count = 0
                async with conn.transaction():
                    async for r in conn.cursor(
                        "SELECT n, md5(n::text || $2::text) AS h FROM generate_series(1, $1::int) AS n",
                        120,
                        f"c{client}",
                        prefetch=25,
                    ):
                        count += 1
                        expect(f"{where}: cursor row {count}", (r["n"], r["h"]), (count, md5_hex(f"{count}c{client}")))
                expect(f"{where}: cursor row count", count, 120)

            # A statement failing inside a transaction aborts it; the driver rolls it back.
            if it % 10 == 7:
                await expect_error(
                    f"{where}: duplicate insert in transaction",
                    "23505",
                    duplicate_insert(conn, table, client, it),
                )
                expect(
                    f"{where}: row count after failed transaction",
                    await conn.fetchval(f"SELECT count(*) FROM {table} WHERE client = $1", client),
                    inserted,
                )

            # A rolled-back transaction leaves nothing behind.
            if it % 10 == 5:
                try:
                    async with conn.transaction():
                        await conn.execute(
                            f"INSERT INTO {table} (client, iter, k, payload) VALUES ($1, $2, 0, $3)",
                            client,
                            -it,
                            "rollback",
                        )
                        raise RollbackNow()
                except RollbackNow:
                    pass
                expect(
                    f"{where}: rolled-back row",
                    await conn.fetchval(f"SELECT count(*) FROM {table} WHERE client = $1 AND iter = $2", client, -it),
                    0,
                )
            if it == iterations // 2:
                await many_statements(conn, client, where)
            progress.done[client] = it + 1
    finally:
        await conn.close()


class RollbackNow(Exception):
    pass


async def many_statements(conn, client, where):
    """More distinct statements than asyncpg's statement cache holds (100), so it closes the
    oldest, and, with every client's own shapes, more than one origin connection keeps (200), so
    pgwarp evicts and later replays. The loop's statements are reused afterwards."""
    for n in range(SHARED_SHAPES):
        expect(f"{where}: shared shape {n}", await conn.fetchval(f"SELECT $1::int + {n}", client), client + n)
    for n in range(OWN_SHAPES):
        got = await conn.fetchval(f"SELECT $1::int * {n} + {client * 1000}", client)
        expect(f"{where}: own shape {n}", got, client * n + client * 1000)


async def duplicate_insert(conn, table, client, it):
    async with conn.transaction():
        await conn.execute(
            f"INSERT INTO {table} (client, iter, k, payload) VALUES ($1, $2, 9, 'new')", client, it + 1000
        )
        await conn.execute(f"INSERT INTO {table} (client, iter, k, payload) VALUES ($1, $2, 0, 'dup')", client, it)


async def main():
    if len(sys.argv) < 2:
        sys.exit(f"usage: {sys.argv[0]} URL [CLIENTS [ITERATIONS]]")
    url = sys.argv[1]
    clients = int(sys.argv[2]) if len(sys.argv) > 2 else 24
    iterations = int(sys.argv[3]) if len(sys.argv) > 3 else 50
    table = f"pgwarp_drv_asyncpg_{os.getpid()}"

    admin = await asyncpg.connect(url, timeout=30)
    await admin.execute(
        f"CREATE TABLE {table} (id serial PRIMARY KEY, client int NOT NULL, iter int NOT NULL, k int NOT NULL, "
        f"payload text NOT NULL, UNIQUE (client, iter, k))"
    )
    progress = Progress(clients)
    started = time.monotonic()
    try:
        tasks = [asyncio.ensure_future(run_client(url, table, c, iterations, progress)) for c in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=TIMEOUT_S, return_when=asyncio.FIRST_EXCEPTION)
        failures = [t.exception() for t in done if t.exception() is not None]
        for t in pending:
            t.cancel()
        if failures:
            first = failures[0]
            print(f"{DRIVER}: FAILED: {len(failures)} client(s) failed; first error:", file=sys.stderr)
            traceback.print_exception(type(first), first, first.__traceback__, file=sys.stderr)
            for other in failures[1:5]:
                print(f"{DRIVER}: also: {type(other).__name__}: {other}", file=sys.stderr)
            return 1
        if pending:
            print(
                f"{DRIVER}: FAILED: timed out after {TIMEOUT_S:.0f}s; iterations done per client: {progress.done}",
                file=sys.stderr,
            )
            return 1
        total = await admin.fetchval(f"SELECT count(*) FROM {table}")
        expect("total rows", total, clients * iterations * 3)
    finally:
        try:
            await asyncio.wait_for(admin.execute(f"DROP TABLE IF EXISTS {table}"), 30)
            await admin.close()
        except Exception as error:  # the verdict above matters more than the cleanup
            print(f"{DRIVER}: warning: cleanup failed: {error}", file=sys.stderr)
    print(f"{DRIVER}: {clients} clients x {iterations} iterations ok ({time.monotonic() - started:.1f}s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except Exception as error:
        print(f"{DRIVER}: FAILED: {type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(1)
