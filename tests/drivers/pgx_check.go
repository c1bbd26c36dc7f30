// pgx (v4, Go) through pgwarp with its default settings, many clients on a tiny pool.
//
// Usage: pgx_check URL [CLIENTS [ITERATIONS]]
//
// By default pgx prepares every query it runs under a name of its own (a per-connection
// statement cache, statement names "lrupsc_..."): Parse and Describe in one round trip, then
// Bind/Execute/Sync in the next, and later only Bind. Through a transaction pooler those land
// on origin connections that never saw the Parse; without pgwarp's replay, "prepared statement
// ... does not exist". Each client is its own pgx.Conn. Per iteration it runs parameterized
// SELECTs (int, text, a bytea round trip), one failing with division by zero every other time,
// a transaction with a pipelined Batch of INSERTs and an INSERT ... RETURNING, read back
// exactly, and now and then a rolled-back transaction, one aborted by a unique violation and a
// statement whose text changes, and a CopyFrom (which sends its rows before the origin's
// CopyInResponse). Every result and expected error is checked. Exits non-zero on
// the first wrong result or error; prints one summary line on success. Invoked by
// tests/drivers.rs, which builds it in GOPATH mode against Debian's golang-github-jackc-pgx-v4-dev.
package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgconn"
	"github.com/jackc/pgx/v4"
)

const table = "pgx_items"

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: pgx_check URL [CLIENTS [ITERATIONS]]")
		os.Exit(2)
	}
	url := os.Args[1]
	clients, iterations := 24, 50
	if len(os.Args) > 2 {
		clients, _ = strconv.Atoi(os.Args[2])
	}
	if len(os.Args) > 3 {
		iterations, _ = strconv.Atoi(os.Args[3])
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Second)
	defer cancel()

	setup, err := pgx.Connect(ctx, url)
	if err != nil {
		fail(fmt.Errorf("connect: %w", err))
	}
	for _, sql := range []string{
		"DROP TABLE IF EXISTS " + table,
		"CREATE TABLE " + table + " (client int, iter int, k int, payload text, PRIMARY KEY (client, iter, k))",
	} {
		if _, err := setup.Exec(ctx, sql); err != nil {
			fail(fmt.Errorf("%s: %w", sql, err))
		}
	}
	setup.Close(ctx)

	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for client := 0; client < clients; client++ {
		wg.Add(1)
		go func(client int) {
			defer wg.Done()
			if err := runClient(ctx, url, client, iterations); err != nil {
				errs <- fmt.Errorf("client %d: %w", client, err)
			}
		}(client)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		fail(err)
	}
	fmt.Printf("pgx: %d clients x %d iterations ok\n", clients, iterations)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "pgx check failed:", err)
	os.Exit(1)
}

func runClient(ctx context.Context, url string, client, iterations int) error {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(ctx)
	for it := 0; it < iterations; it++ {
		where := fmt.Sprintf("iteration %d", it)

		var sum int
		var text string
		if err := conn.QueryRow(ctx, "SELECT $1::int + $2::int, $3::text || 'x'", client, it, fmt.Sprintf("c%d", client)).Scan(&sum, &text); err != nil {
			return fmt.Errorf("%s: sum: %w", where, err)
		}
		if sum != client+it || text != fmt.Sprintf("c%dx", client) {
			return fmt.Errorf("%s: sum: got %d %q", where, sum, text)
		}

		blob := []byte{0, 1, 2, byte(client), byte(it), 255}
		var back []byte
		if err := conn.QueryRow(ctx, "SELECT $1::bytea", blob).Scan(&back); err != nil || !bytes.Equal(back, blob) {
			return fmt.Errorf("%s: bytea: got %v (%v)", where, back, err)
		}

		var q int
		if it%2 == 0 {
			err := conn.QueryRow(ctx, "SELECT 10 / $1::int", 0).Scan(&q)
			if err := expectCode(err, "22012"); err != nil {
				return fmt.Errorf("%s: division by zero: %w", where, err)
			}
		} else if err := conn.QueryRow(ctx, "SELECT 10 / $1::int", 5).Scan(&q); err != nil || q != 2 {
			return fmt.Errorf("%s: division: got %d (%v)", where, q, err)
		}

		tx, err := conn.Begin(ctx)
		if err != nil {
			return fmt.Errorf("%s: begin: %w", where, err)
		}
		batch := &pgx.Batch{}
		for k := 0; k < 3; k++ {
			batch.Queue("INSERT INTO "+table+" (client, iter, k, payload) VALUES ($1, $2, $3, $4)", client, it, k, fmt.Sprintf("p%d", k))
		}
		results := tx.SendBatch(ctx, batch)
		for k := 0; k < 3; k++ {
			if tag, err := results.Exec(); err != nil || tag.RowsAffected() != 1 {
				return fmt.Errorf("%s: batch insert %d: %v %v", where, k, tag, err)
			}
		}
		if err := results.Close(); err != nil {
			return fmt.Errorf("%s: batch close: %w", where, err)
		}
		var k int
		var payload string
		if err := tx.QueryRow(ctx, "INSERT INTO "+table+" (client, iter, k, payload) VALUES ($1, $2, 100, $3) RETURNING k, payload", client, it, fmt.Sprintf("r%d", it)).Scan(&k, &payload); err != nil || k != 100 || payload != fmt.Sprintf("r%d", it) {
			return fmt.Errorf("%s: returning: got %d %q (%v)", where, k, payload, err)
		}
		if err := tx.Commit(ctx); err != nil {
			return fmt.Errorf("%s: commit: %w", where, err)
		}
		if err := expectCount(ctx, conn, client, it, 4, 103); err != nil {
			return fmt.Errorf("%s: after commit: %w", where, err)
		}

		if it%5 == 4 {
			tx, err := conn.Begin(ctx)
			if err != nil {
				return fmt.Errorf("%s: begin: %w", where, err)
			}
			if _, err := tx.Exec(ctx, "INSERT INTO "+table+" (client, iter, k, payload) VALUES ($1, $2, $3, $4)", client, it, 50, "gone"); err != nil {
				return fmt.Errorf("%s: insert to roll back: %w", where, err)
			}
			if err := expectCount(ctx, tx, client, it, 5, 153); err != nil {
				return fmt.Errorf("%s: inside the transaction: %w", where, err)
			}
			if err := tx.Rollback(ctx); err != nil {
				return fmt.Errorf("%s: rollback: %w", where, err)
			}
			if err := expectCount(ctx, conn, client, it, 4, 103); err != nil {
				return fmt.Errorf("%s: after rollback: %w", where, err)
			}
		}

		if it%7 == 6 {
			tx, err := conn.Begin(ctx)
			if err != nil {
				return fmt.Errorf("%s: begin: %w", where, err)
			}
			_, err = tx.Exec(ctx, "INSERT INTO "+table+" (client, iter, k, payload) VALUES ($1, $2, $3, $4)", client, it, 0, "duplicate")
			if err := expectCode(err, "23505"); err != nil {
				return fmt.Errorf("%s: unique violation: %w", where, err)
			}
			err = expectCount(ctx, tx, client, it, 4, 103)
			if err := expectCode(errors.Unwrap(err), "25P02"); err != nil {
				return fmt.Errorf("%s: aborted transaction: %w", where, err)
			}
			if err := tx.Rollback(ctx); err != nil {
				return fmt.Errorf("%s: rollback of the aborted transaction: %w", where, err)
			}
			if err := expectCount(ctx, conn, client, it, 4, 103); err != nil {
				return fmt.Errorf("%s: after the aborted transaction: %w", where, err)
			}
		}

		// A statement whose text changes: a new entry in pgx's statement cache each time.
		var shaped int
		if err := conn.QueryRow(ctx, fmt.Sprintf("SELECT $1::int * %d + %d", it%9, client), it).Scan(&shaped); err != nil || shaped != it*(it%9)+client {
			return fmt.Errorf("%s: shape: got %d (%v)", where, shaped, err)
		}

		// CopyFrom sends its rows right behind the COPY, before the CopyInResponse.
		if it%4 == 3 {
			rows := [][]interface{}{{client, it, 200, "copied"}, {client, it, 201, "copied"}}
			n, err := conn.CopyFrom(ctx, pgx.Identifier{table}, []string{"client", "iter", "k", "payload"}, pgx.CopyFromRows(rows))
			if err != nil || n != 2 {
				return fmt.Errorf("%s: copy from: %d rows (%v)", where, n, err)
			}
			if err := expectCount(ctx, conn, client, it, 6, 504); err != nil {
				return fmt.Errorf("%s: after copy from: %w", where, err)
			}
		}
	}
	return nil
}

type querier interface {
	QueryRow(ctx context.Context, sql string, args ...interface{}) pgx.Row
}

func expectCount(ctx context.Context, q querier, client, it, rows, sum int) error {
	var n, s int
	if err := q.QueryRow(ctx, "SELECT count(*), coalesce(sum(k), 0) FROM "+table+" WHERE client = $1 AND iter = $2", client, it).Scan(&n, &s); err != nil {
		return fmt.Errorf("count: %w", err)
	}
	if n != rows || s != sum {
		return fmt.Errorf("count: got %d rows summing to %d, expected %d and %d", n, s, rows, sum)
	}
	return nil
}

func expectCode(err error, code string) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		if pgErr.Code == code {
			return nil
		}
		return fmt.Errorf("failed with %s (%s), expected SQLSTATE %s", pgErr.Code, pgErr.Message, code)
	}
	return fmt.Errorf("got %v, expected an error with SQLSTATE %s", err, code)
}
