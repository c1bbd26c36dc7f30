// postgres.js (the npm package `postgres`) through pgwarp with its default settings
// (`prepare: true`: every query becomes a named prepared statement, described with
// Parse/Describe/Flush before it is bound), many clients on a tiny pool.
//
// Usage: node postgres_js_check.mjs URL [CLIENTS [ITERATIONS]]
//
// Each client is its own `postgres()` instance holding one connection. Per iteration it runs
// several distinct parameterized SELECT shapes, one of them failing with division by zero every
// other time, `sql.unsafe` with explicit parameters, a transaction (`sql.begin`) that INSERTs a
// row and reads it back, a pipelined transaction, and now and then a cursor inside a
// transaction, a transaction aborted by a unique violation and a rolled-back transaction;
// halfway, more distinct statements than pgwarp's per-connection statement LRU holds. Every
// result and every expected error is checked exactly. With a
// pool far smaller than the number of clients, statements prepared on one origin connection are
// reused on others. Exits non-zero with a message on the first wrong result or error; prints one
// summary line on success. Invoked by tests/drivers.rs.

import { createHash } from 'node:crypto';
import { isDeepStrictEqual, inspect } from 'node:util';
import postgres from 'postgres';

const DRIVER = 'postgres.js';
const TIMEOUT_MS = Number(process.env.PGWARP_DRIVER_TIMEOUT || 100) * 1000;

class Mismatch extends Error {}
class RollbackNow extends Error {}

function expect(what, got, want) {
  if (!isDeepStrictEqual(got, want)) {
    throw new Mismatch(`${what}: got ${inspect(got)}, expected ${inspect(want)}`);
  }
}

// Awaits a query that must fail with `sqlstate`; any other outcome is a failure.
async function expectError(what, sqlstate, promise) {
  let got;
  try {
    got = await promise;
  } catch (error) {
    if (error instanceof Mismatch) throw error;
    if (error.code !== sqlstate) {
      throw new Mismatch(`${what}: failed with ${error.code} (${error.message}), expected SQLSTATE ${sqlstate}`);
    }
    return;
  }
  throw new Mismatch(`${what}: returned ${inspect(got)}, expected an error with SQLSTATE ${sqlstate}`);
}

const md5Hex = (text) => createHash('md5').update(text).digest('hex');
const plain = (rows) => rows.map((row) => ({ ...row }));

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${typeof what === 'function' ? what() : what} timed out after ${ms / 1000}s`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function connectClient(url) {
  return postgres(url, { max: 1, connect_timeout: 30, idle_timeout: 0, onnotice: () => {} });
}

// Statement shapes every client shares, and shapes only one client uses, in manyStatements.
const SHARED_SHAPES = 130;
const OWN_SHAPES = 12;

// More distinct statements than one origin connection keeps (200, with every client's own
// shapes), so pgwarp evicts and later replays. The loop's statements are reused afterwards.
async function manyStatements(sql, client, where) {
  for (let n = 0; n < SHARED_SHAPES; n++) {
    const rows = await sql.unsafe(`SELECT $1::int + ${n} AS v`, [client], { prepare: true });
    expect(`${where}: shared shape ${n}`, plain(rows), [{ v: client + n }]);
  }
  for (let n = 0; n < OWN_SHAPES; n++) {
    const rows = await sql.unsafe(`SELECT $1::int * ${n} + ${client * 1000} AS v`, [client], { prepare: true });
    expect(`${where}: own shape ${n}`, plain(rows), [{ v: client * n + client * 1000 }]);
  }
}

async function runClient(url, table, client, iterations, progress) {
  const sql = connectClient(url);
  const t = sql(table);
  try {
    let inserted = 0;
    for (let it = 0; it < iterations; it++) {
      const where = `client ${client} iteration ${it}`;

      expect(`${where}: sum`, plain(await sql`SELECT ${client}::int + ${it}::int AS sum`), [{ sum: client + it }]);
      expect(
        `${where}: concat`,
        plain(await sql`SELECT ${'c' + client}::text || ':' || ${String(it)}::text AS label`),
        [{ label: `c${client}:${it}` }],
      );
      const big = BigInt(client) * 1_000_000_000n + BigInt(it);
      const [typed] = await sql`
        SELECT ${big}::bigint * 2 AS doubled, ${it}::float8 / 4 AS quarter, NOT ${it % 2 === 0}::bool AS negated,
               length(${Buffer.from([...Array(it % 7).keys()])}::bytea) AS len`;
      expect(`${where}: typed row`, { ...typed }, {
        doubled: String(big * 2n),
        quarter: it / 4,
        negated: it % 2 !== 0,
        len: it % 7,
      });
      // One prepared statement that fails for some parameters: the error must reach the client
      // and leave its statements usable, on whichever origin connection it ran.
      if (it % 2 === 1) {
        await expectError(`${where}: division by zero`, '22012', sql`SELECT 100 / ${0}::int AS q`);
      } else {
        expect(`${where}: division`, plain(await sql`SELECT 100 / ${it + 1}::int AS q`), [
          { q: Math.floor(100 / (it + 1)) },
        ]);
      }
      const k = (it % 5) + 1;
      expect(
        `${where}: unsafe series`,
        plain(await sql.unsafe('SELECT n, n * $2::int AS m FROM generate_series(1, $1::int) AS n', [k, client], {
          prepare: true,
        })),
        [...Array(k).keys()].map((i) => ({ n: i + 1, m: (i + 1) * client })),
      );

      // A transaction that writes and reads its own row, reusing prepared statements.
      const payload = `postgres.js-${client}-${it}-${md5Hex(String(it)).slice(0, 8)}`;
      await sql.begin(async (tx) => {
        const [{ id }] = await tx`
          INSERT INTO ${t} (client, iter, k, payload) VALUES (${client}, ${it}, 0, ${payload}) RETURNING id`;
        expect(
          `${where}: row read back in its transaction`,
          plain(await tx`SELECT client, iter, payload FROM ${t} WHERE id = ${id}`),
          [{ client, iter: it, payload }],
        );
        expect(
          `${where}: sum in transaction`,
          plain(await tx`SELECT ${client}::int + ${it}::int AS sum`),
          [{ sum: client + it }],
        );
      });
      // Queries returned as an array from sql.begin are pipelined: all sent before any reply.
      const [second, readBoth] = await sql.begin((tx) => [
        tx`INSERT INTO ${t} (client, iter, k, payload) VALUES (${client}, ${it}, 1, ${payload + '/1'}) RETURNING k`,
        tx`SELECT k, payload FROM ${t} WHERE client = ${client} AND iter = ${it} ORDER BY k`,
      ]);
      expect(`${where}: pipelined insert`, plain(second), [{ k: 1 }]);
      expect(`${where}: pipelined read`, plain(readBoth), [
        { k: 0, payload },
        { k: 1, payload: `${payload}/1` },
      ]);
      inserted += 2;
      expect(
        `${where}: committed row count`,
        plain(await sql`SELECT count(*)::int AS n FROM ${t} WHERE client = ${client}`),
        [{ n: inserted }],
      );

      // A cursor inside a transaction: several Execute round trips with a row limit.
      if (it % 3 === 0) {
        const got = [];
        await sql.begin(async (tx) => {
          const query = tx`
            SELECT n, md5(n::text || ${'c' + client}::text) AS h FROM generate_series(1, ${120}::int) AS n`;
          for await (const rows of query.cursor(25)) {
            got.push(...plain(rows));
          }
        });
        expect(
          `${where}: cursor rows`,
          got,
          [...Array(120).keys()].map((i) => ({ n: i + 1, h: md5Hex(`${i + 1}c${client}`) })),
        );
      }

      // A statement failing inside a transaction aborts it; sql.begin rolls it back.
      if (it % 10 === 7) {
        await expectError(
          `${where}: duplicate insert in transaction`,
          '23505',
          sql.begin(async (tx) => {
            await tx`INSERT INTO ${t} (client, iter, k, payload) VALUES (${client}, ${it + 1000}, 9, 'new')`;
            await tx`INSERT INTO ${t} (client, iter, k, payload) VALUES (${client}, ${it}, 0, 'dup')`;
          }),
        );
        expect(
          `${where}: row count after failed transaction`,
          plain(await sql`SELECT count(*)::int AS n FROM ${t} WHERE client = ${client}`),
          [{ n: inserted }],
        );
      }

      // A rolled-back transaction leaves nothing behind.
      if (it % 10 === 5) {
        try {
          await sql.begin(async (tx) => {
            await tx`INSERT INTO ${t} (client, iter, k, payload) VALUES (${client}, ${-it}, 0, 'rollback')`;
            throw new RollbackNow();
          });
        } catch (error) {
          if (!(error instanceof RollbackNow)) throw error;
        }
        expect(
          `${where}: rolled-back row`,
          plain(await sql`SELECT count(*)::int AS n FROM ${t} WHERE client = ${client} AND iter = ${-it}`),
          [{ n: 0 }],
        );
      }
      if (it === Math.floor(iterations / 2)) await manyStatements(sql, client, where);
      progress[client] = it + 1;
    }
  } finally {
    await sql.end({ timeout: 5 });
  }
}

function describe(error) {
  if (error instanceof Mismatch) return `wrong result: ${error.message}`;
  const code = error && error.code ? ` [${error.code}]` : '';
  return `${error && error.stack ? error.stack : String(error)}${code}`;
}

async function main() {
  const [url, clientsArg, iterationsArg] = process.argv.slice(2);
  if (!url) throw new Error('usage: node postgres_js_check.mjs URL [CLIENTS [ITERATIONS]]');
  const clients = Number(clientsArg || 24);
  const iterations = Number(iterationsArg || 50);
  const table = `pgwarp_drv_postgres_js_${process.pid}`;

  const admin = connectClient(url);
  await admin`CREATE TABLE ${admin(table)} (id serial PRIMARY KEY, client int NOT NULL, iter int NOT NULL,
    k int NOT NULL, payload text NOT NULL, UNIQUE (client, iter, k))`;
  const progress = new Array(clients).fill(0);
  const started = Date.now();
  try {
    const failures = [];
    const runs = [...Array(clients).keys()].map((c) =>
      runClient(url, table, c, iterations, progress).catch((error) => {
        failures.push(error);
        throw error;
      }),
    );
    try {
      await withTimeout(Promise.all(runs), TIMEOUT_MS, () => `${clients} clients (iterations done per client: ${progress})`);
    } catch (error) {
      console.error(`${DRIVER}: FAILED: ${Math.max(failures.length, 1)} client(s) failed; first error:`);
      console.error(describe(error));
      for (const other of failures.filter((f) => f !== error).slice(0, 4)) {
        console.error(`${DRIVER}: also: ${other && other.message}`);
      }
      return 1;
    }
    const [{ n }] = await admin`SELECT count(*)::int AS n FROM ${admin(table)}`;
    expect('total rows', n, clients * iterations * 2);
  } finally {
    try {
      await withTimeout(admin`DROP TABLE IF EXISTS ${admin(table)}`, 30_000, 'DROP TABLE');
      await admin.end({ timeout: 5 });
    } catch (error) {
      console.error(`${DRIVER}: warning: cleanup failed: ${error.message}`);
    }
  }
  console.log(`${DRIVER}: ${clients} clients x ${iterations} iterations ok (${((Date.now() - started) / 1000).toFixed(1)}s)`);
  return 0;
}

main().then(
  (code) => process.exit(code),
  (error) => {
    console.error(`${DRIVER}: FAILED: ${describe(error)}`);
    process.exit(1);
  },
);
