#!/usr/bin/env python3
"""psycopg 3 through pgwarp, preparing every statement on its first use (prepare_threshold=0),
many clients on a tiny pool.

Usage: psycopg_check.py URL [CLIENTS [ITERATIONS]]

psycopg prepares in one round trip (Parse, Sync) and executes in the next (Bind, Describe,
Execute, Sync), so with a pool far smaller than the number of clients the Bind regularly lands
on an origin connection that never saw the Parse. Each client is its own AsyncConnection; half
of them run in autocommit mode, half in psycopg's default implicit-transaction mode. Per
iteration a client runs several distinct parameterized SELECT shapes (text and binary), one of
them failing with division by zero every other time, a transaction that INSERTs rows (one with
RETURNING, more with `executemany`, which psycopg runs in pipeline mode) and reads them back, and
now and then a server-side cursor, a transaction aborted by a unique violation and a rolled-back
transaction; halfway, more distinct statements than psycopg's prepared_max and pgwarp's
per-connection statement LRU hold. Every result and every expected error is checked exactly. Exits non-zero with a
message on the first wrong result or error; prints one summary line on success. Invoked by
tests/drivers.rs.
"""

import asyncio
import hashlib
import os
import sys
import time
import traceback

import psycopg

DRIVER = "psycopg"
# Statement shapes every client shares, and shapes only one client uses, in many_statements.
SHARED_SHAPES = 130
OWN_SHAPES = 12
TIMEOUT_S = float(os.environ.get("PGWARP_DRIVER_TIMEOUT", "100"))


class Mismatch(Exception):
    """A query returned something other than what it must."""


class RollbackNow(Exception):
    pass


async def many_statements(conn, client, where):
    """More distinct statements than psycopg keeps prepared (prepared_max, 100), so it DEALLOCATEs
    the oldest, and, with every client's own shapes, more than one origin connection keeps (200),
    so pgwarp evicts and later replays. The loop's statements are reused afterwards."""
    for n in range(SHARED_SHAPES):
        expect(f"{where}: shared shape {n}", await one(conn, f"SELECT %s::int + {n}", (client,)), (client + n,))
    for n in range(OWN_SHAPES):
        got = await one(conn, f"SELECT %s::int * {n} + {client * 1000}", (client,))
        expect(f"{where}: own shape {n}", got, (client * n + client * 1000,))


async def duplicate_insert(conn, table, client, it):
    async with conn.transaction():
        await conn.execute(
            f"INSERT INTO {table} (client, iter, k, payload) VALUES (%s, %s, 9, 'new')", (client, it + 1000)
        )
        await conn.execute(f"INSERT INTO {table} (client, iter, k, payload) VALUES (%s, %s, 0, 'dup')", (client, it))


def expect(what, got, want):
    if got != want:
        raise Mismatch(f"{what}: got {got!r}, expected {want!r}")


async def expect_error(what, sqlstate, awaitable):
    """Awaits a query that must fail with `sqlstate`; any other outcome is a failure."""
    try:
        got = await awaitable
    except psycopg.Error as error:
        if error.sqlstate != sqlstate:
            raise Mismatch(f"{what}: failed with {error.sqlstate} ({error}), expected SQLSTATE {sqlstate}") from error
        return
    raise Mismatch(f"{what}: returned {got!r}, expected an error with SQLSTATE {sqlstate}")


def md5_hex(text):
    return hashlib.md5(text.encode()).hexdigest()


async def one(conn, query, params, binary=False):
    cur = await conn.execute(query, params, binary=binary)
    return await cur.fetchone()


async def run_client(url, table, client, iterations, progress):
    autocommit = client % 2 == 0
    conn = await psycopg.AsyncConnection.connect(url, prepare_threshold=0, autocommit=autocommit, connect_timeout=30)
    try:
        expected_rows = 0
        for it in range(iterations):
            where = f"client {client} iteration {it}"

            expect(f"{where}: sum", await one(conn, "SELECT %s::int + %s::int", (client, it)), (client + it,))
            expect(
                f"{where}: concat",
                await one(conn, "SELECT %s::text || ':' || %s::text", (f"c{client}", str(it))),
                (f"c{client}:{it}",),
            )
            expect(
                f"{where}: typed row (binary)",
                await one(
                    conn,
                    "SELECT %s::bigint * 2, %s::float8 / 4, NOT %s::bool, length(%s::bytea)",
                    (client * 1_000_000_000 + it, float(it), it % 2 == 0, bytes(range(it % 7))),
                    binary=True,
                ),
                ((client * 1_000_000_000 + it) * 2, it / 4, it % 2 != 0, it % 7),
            )
            # One prepared statement that fails for some parameters: the error must reach the client
            # and leave its statements usable, on whichever origin connection it ran.
            if it % 2 == 1:
                await expect_error(f"{where}: division by zero", "22012", one(conn, "SELECT 100 / %s::int", (0,)))
                if not autocommit:
                    await conn.rollback()
            else:
                expect(f"{where}: division", await one(conn, "SELECT 100 / %s::int", (it + 1,)), (100 // (it + 1),))
            k = it % 5 + 1
            cur = await conn.execute("SELECT n, n * %s::int FROM generate_series(1, %s::int) AS n", (client, k))
            expect(f"{where}: series", await cur.fetchall(), [(n, n * client) for n in range(1, k + 1)])
            if not autocommit:
                await conn.commit()

            # A transaction that writes and reads its own rows, reusing prepared statements.
            payload = f"psycopg-{client}-{it}-{md5_hex(str(it))[:8]}"
            async with conn.transaction():
                (row_id,) = await one(
                    conn,
                    f"INSERT INTO {table} (client, iter, k, payload) VALUES (%s, %s, 0, %s) RETURNING id",
                    (client, it, payload),
                )
                expect(
                    f"{where}: row read back in its transaction",
                    await one(conn, f"SELECT client, iter, payload FROM {table} WHERE id = %s", (row_id,)),
                    (client, it, payload),
                )
                async with conn.cursor() as cur:
                    await cur.executemany(
                        f"INSERT INTO {table} (client, iter, k, payload) VALUES (%s, %s, %s, %s)",
                        [(client, it, extra, f"{payload}/{extra}") for extra in (1, 2, 3)],
                    )
                cur = await conn.execute(
                    f"SELECT k, payload FROM {table} WHERE client = %s AND iter = %s ORDER BY k", (client, it)
                )
                expect(
                    f"{where}: executemany rows in transaction",
                    await cur.fetchall(),
                    [(0, payload)] + [(extra, f"{payload}/{extra}") for extra in (1, 2, 3)],
                )
            expected_rows += 4
            expect(
                f"{where}: committed row count",
                await one(conn, f"SELECT count(*) FROM {table} WHERE client = %s", (client,)),
                (expected_rows,),
            )
            if not autocommit:
                await conn.commit()

            # A statement failing inside a transaction aborts it; psycopg rolls it back.
            if it % 10 == 7:
                await expect_error(
                    f"{where}: duplicate insert in transaction", "23505", duplicate_insert(conn, table, client, it)
                )
                expect(
                    f"{where}: row count after failed transaction",
                    await one(conn, f"SELECT count(*) FROM {table} WHERE client = %s", (client,)),
                    (expected_rows,),
                )
                if not autocommit:
                    await conn.commit()

            # A server-side (named) cursor inside a transaction, fetched in several rounds.
            if it % 3 == 0:
                async with conn.transaction():
                    async with conn.cursor(name=f"drv_cur_{client}") as cur:
                        await cur.execute(
                            "SELECT n, md5(n::text || %s::text) FROM generate_series(1, %s::int) AS n",
                            (f"c{client}", 120),
                        )
                        got = []
                        while True:
                            batch = await cur.fetchmany(25)
                            if not batch:
                                break
                            got.extend(batch)
                expect(f"{where}: server-side cursor", got, [(n, md5_hex(f"{n}c{client}")) for n in range(1, 121)])
                if not autocommit:
                    await conn.commit()

            # A rolled-back transaction leaves nothing behind.
            if it % 10 == 5:
                try:
                    async with conn.transaction():
                        await conn.execute(
                            f"INSERT INTO {table} (client, iter, k, payload) VALUES (%s, %s, 0, %s)",
                            (client, -it, "rollback"),
                        )
                        raise RollbackNow()
                except RollbackNow:
                    pass
                expect(
                    f"{where}: rolled-back row",
                    await one(conn, f"SELECT count(*) FROM {table} WHERE client = %s AND iter = %s", (client, -it)),
                    (0,),
                )
                if not autocommit:
                    await conn.commit()
            if it == iterations // 2:
                await many_statements(conn, client, where)
                if not autocommit:
                    await conn.commit()
            progress[client] = it + 1
    finally:
        await conn.close()


async def main():
    if len(sys.argv) < 2:
        sys.exit(f"usage: {sys.argv[0]} URL [CLIENTS [ITERATIONS]]")
    url = sys.argv[1]
    clients = int(sys.argv[2]) if len(sys.argv) > 2 else 24
    iterations = int(sys.argv[3]) if len(sys.argv) > 3 else 50
    table = f"pgwarp_drv_psycopg_{os.getpid()}"

    admin = await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=30)
    await admin.execute(
        f"CREATE TABLE {table} (id serial PRIMARY KEY, client int NOT NULL, iter int NOT NULL, k int NOT NULL, "
        f"payload text NOT NULL, UNIQUE (client, iter, k))"
    )
    progress = [0] * clients
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
                f"{DRIVER}: FAILED: timed out after {TIMEOUT_S:.0f}s; iterations done per client: {progress}",
                file=sys.stderr,
            )
            return 1
        cur = await admin.execute(f"SELECT count(*) FROM {table}")
        expect("total rows", await cur.fetchone(), (clients * iterations * 4,))
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
