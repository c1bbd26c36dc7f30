// node-postgres (`pg`) through pgwarp with named queries (`{ name, text, values }`), many clients
// on a tiny pool.
//
// Usage: node node_pg_check.mjs URL [CLIENTS [ITERATIONS]]
//
// node-postgres sends the Parse of a named query only the first time that connection runs it;
// later runs send just Bind/Describe/Execute/Sync. With a pool far smaller than the number of
// clients those later runs land on origin connections that never saw the Parse. Each client is
// its own `pg.Client`. Per iteration it runs several distinct named SELECT shapes, one of them
// failing with division by zero every other time, an unnamed parameterized query, a
// BEGIN/COMMIT transaction that INSERTs a row and reads it back with named queries, and now and
// then a transaction aborted by a unique violation and a rolled-back transaction; halfway, more
// distinct named statements than pgwarp's per-connection statement LRU holds. Every result and
// every expected error is checked exactly.
// Exits non-zero with a message on the first wrong result or error; prints one summary line on
// success. Invoked by tests/drivers.rs.

import { createHash } from 'node:crypto';
import { isDeepStrictEqual, inspect } from 'node:util';
import pg from 'pg';

const DRIVER = 'node-postgres';
const TIMEOUT_MS = Number(process.env.PGWARP_DRIVER_TIMEOUT || 100) * 1000;

class Mismatch extends Error {}

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
  throw new Mismatch(`${what}: returned ${inspect(got && got.rows)}, expected an error with SQLSTATE ${sqlstate}`);
}

const md5Hex = (text) => createHash('md5').update(text).digest('hex');
const plain = (result) => result.rows.map((row) => ({ ...row }));

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`${typeof what === 'function' ? what() : what} timed out after ${ms / 1000}s`)),
      ms,
    );
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function connectClient(url) {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 30_000 });
  // An error on an idle client (the connection dropped) must fail the run, not crash silently.
  client.on('error', (error) => {
    console.error(`${DRIVER}: FAILED: connection error: ${error.stack || error}`);
    process.exit(1);
  });
  await client.connect();
  return client;
}

// The named statements every client uses; each name is prepared once per client connection.
function statements(table) {
  return {
    sum: 'SELECT $1::int + $2::int AS sum',
    concat: "SELECT $1::text || ':' || $2::text AS label",
    typed:
      'SELECT $1::bigint * 2 AS doubled, $2::float8 / 4 AS quarter, NOT $3::bool AS negated, length($4::bytea) AS len',
    divide: 'SELECT 100 / $1::int AS q',
    series: 'SELECT n, n * $2::int AS m FROM generate_series(1, $1::int) AS n',
    insert: `INSERT INTO ${table} (client, iter, payload) VALUES ($1, $2, $3) RETURNING id`,
    readBack: `SELECT client, iter, payload FROM ${table} WHERE id = $1`,
    count: `SELECT count(*)::int AS n FROM ${table} WHERE client = $1`,
    countIter: `SELECT count(*)::int AS n FROM ${table} WHERE client = $1 AND iter = $2`,
  };
}

// Statement shapes every client shares, and shapes only one client uses, in manyStatements.
const SHARED_SHAPES = 130;
const OWN_SHAPES = 12;

// More distinct named statements than one origin connection keeps (200, with every client's
// own shapes), so pgwarp evicts and later replays. The loop's statements are reused afterwards.
async function manyStatements(db, client, where) {
  for (let n = 0; n < SHARED_SHAPES; n++) {
    const result = await db.query({ name: `shared_${n}`, text: `SELECT $1::int + ${n} AS v`, values: [client] });
    expect(`${where}: shared shape ${n}`, plain(result), [{ v: client + n }]);
  }
  for (let n = 0; n < OWN_SHAPES; n++) {
    const text = `SELECT $1::int * ${n} + ${client * 1000} AS v`;
    const result = await db.query({ name: `own_${n}`, text, values: [client] });
    expect(`${where}: own shape ${n}`, plain(result), [{ v: client * n + client * 1000 }]);
  }
}

async function runClient(url, table, client, iterations, progress) {
  const db = await connectClient(url);
  const text = statements(table);
  const named = (name, values) => db.query({ name, text: text[name], values });
  try {
    let inserted = 0;
    for (let it = 0; it < iterations; it++) {
      const where = `client ${client} iteration ${it}`;

      expect(`${where}: sum`, plain(await named('sum', [client, it])), [{ sum: client + it }]);
      expect(`${where}: concat`, plain(await named('concat', [`c${client}`, String(it)])), [
        { label: `c${client}:${it}` },
      ]);
      const big = BigInt(client) * 1_000_000_000n + BigInt(it);
      expect(
        `${where}: typed row`,
        plain(await named('typed', [String(big), it, it % 2 === 0, Buffer.from([...Array(it % 7).keys()])])),
        [{ doubled: String(big * 2n), quarter: it / 4, negated: it % 2 !== 0, len: it % 7 }],
      );
      // One named statement that fails for some parameters: the error must reach the client and
      // leave its statements usable, on whichever origin connection it ran.
      if (it % 2 === 1) {
        await expectError(`${where}: division by zero`, '22012', named('divide', [0]));
      } else {
        expect(`${where}: division`, plain(await named('divide', [it + 1])), [{ q: Math.floor(100 / (it + 1)) }]);
      }
      const k = (it % 5) + 1;
      const series = [...Array(k).keys()].map((i) => ({ n: i + 1, m: (i + 1) * client }));
      expect(`${where}: series`, plain(await named('series', [k, client])), series);
      // The same statement text, unnamed: Parse and Bind travel together.
      expect(`${where}: unnamed series`, plain(await db.query(text.series, [k, client])), series);

      // A transaction that writes and reads its own row, reusing named statements.
      const payload = `node-postgres-${client}-${it}-${md5Hex(String(it)).slice(0, 8)}`;
      await db.query('BEGIN');
      const [{ id }] = plain(await named('insert', [client, it, payload]));
      expect(`${where}: row read back in its transaction`, plain(await named('readBack', [id])), [
        { client, iter: it, payload },
      ]);
      expect(`${where}: sum in transaction`, plain(await named('sum', [it, client])), [{ sum: client + it }]);
      await db.query('COMMIT');
      inserted += 1;
      expect(`${where}: committed row count`, plain(await named('count', [client])), [{ n: inserted }]);

      // A statement failing inside a transaction aborts it until ROLLBACK.
      if (it % 10 === 7) {
        await db.query('BEGIN');
        await named('insert', [client, it + 1000, 'new']);
        await expectError(`${where}: duplicate insert in transaction`, '23505', named('insert', [client, it, 'dup']));
        await expectError(`${where}: statement in aborted transaction`, '25P02', named('sum', [1, 2]));
        await db.query('ROLLBACK');
        expect(`${where}: row count after failed transaction`, plain(await named('count', [client])), [
          { n: inserted },
        ]);
      }

      // A rolled-back transaction leaves nothing behind.
      if (it % 10 === 5) {
        await db.query('BEGIN');
        await named('insert', [client, -it, 'rollback']);
        await db.query('ROLLBACK');
        expect(`${where}: rolled-back row`, plain(await named('countIter', [client, -it])), [{ n: 0 }]);
      }
      if (it === Math.floor(iterations / 2)) await manyStatements(db, client, where);
      progress[client] = it + 1;
    }
  } finally {
    await db.end();
  }
}

function describe(error) {
  if (error instanceof Mismatch) return `wrong result: ${error.message}`;
  const code = error && error.code ? ` [${error.code}]` : '';
  return `${error && error.stack ? error.stack : String(error)}${code}`;
}

async function main() {
  const [url, clientsArg, iterationsArg] = process.argv.slice(2);
  if (!url) throw new Error('usage: node node_pg_check.mjs URL [CLIENTS [ITERATIONS]]');
  const clients = Number(clientsArg || 24);
  const iterations = Number(iterationsArg || 50);
  const table = `pgwarp_drv_node_pg_${process.pid}`;

  const admin = await connectClient(url);
  await admin.query(`CREATE TABLE ${table} (id serial PRIMARY KEY, client int NOT NULL, iter int NOT NULL,
    payload text NOT NULL, UNIQUE (client, iter))`);
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
      await withTimeout(
        Promise.all(runs),
        TIMEOUT_MS,
        () => `${clients} clients (iterations done per client: ${progress})`,
      );
    } catch (error) {
      console.error(`${DRIVER}: FAILED: ${Math.max(failures.length, 1)} client(s) failed; first error:`);
      console.error(describe(error));
      for (const other of failures.filter((f) => f !== error).slice(0, 4)) {
        console.error(`${DRIVER}: also: ${other && other.message}`);
      }
      return 1;
    }
    const { rows } = await admin.query(`SELECT count(*)::int AS n FROM ${table}`);
    expect('total rows', rows[0].n, clients * iterations);
  } finally {
    try {
      await withTimeout(admin.query(`DROP TABLE IF EXISTS ${table}`), 30_000, 'DROP TABLE');
      await admin.end();
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
