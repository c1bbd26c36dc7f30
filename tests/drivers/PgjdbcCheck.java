// pgjdbc (the PostgreSQL JDBC driver) through pgwarp, many clients on a tiny pool.
//
// Usage: java -cp <classes>:postgresql.jar PgjdbcCheck URL [CLIENTS [ITERATIONS]]
//
// pgjdbc runs a PreparedStatement unnamed for its first executions and, from the fifth on
// (prepareThreshold, default 5), as a named server-side statement (S_1, S_2, ...) that it
// Parses once per connection and then only Binds. Through a transaction pooler, that Bind
// regularly lands on an origin connection that never saw the Parse: without pgwarp's replay,
// "prepared statement S_1 does not exist". Even clients use the default threshold; odd ones
// use prepareThreshold=1, so every statement is named from its first use. Per iteration each
// client runs a reused parameterized SELECT (text and int), one that fails with division by zero
// every other time, a transaction with a batch INSERT (pipelined Bind/Execute, one Sync) and an
// INSERT ... RETURNING, read back exactly; now and then a rolled-back transaction, one aborted by
// a unique violation, a cursor read in slices (setFetchSize: a named portal, Execute with a row
// limit), and a statement whose text changes. Every result and expected error is checked.
// Exits non-zero on the first wrong result or error; prints one summary line on success.
// Invoked by tests/drivers.rs.

import java.net.URI;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;

public class PgjdbcCheck {
    static final String TABLE = "pgjdbc_items";

    static final class Mismatch extends Exception {
        Mismatch(String message) {
            super(message);
        }
    }

    public static void main(String[] args) throws Exception {
        URI uri = new URI(args[0]);
        int clients = args.length > 1 ? Integer.parseInt(args[1]) : 24;
        int iterations = args.length > 2 ? Integer.parseInt(args[2]) : 50;
        String[] userInfo = uri.getUserInfo().split(":", 2);
        String jdbc = "jdbc:postgresql://" + uri.getHost() + ":" + uri.getPort() + uri.getPath();

        try (Connection c = DriverManager.getConnection(jdbc, props(userInfo, 5)); Statement s = c.createStatement()) {
            s.execute("DROP TABLE IF EXISTS " + TABLE);
            s.execute("CREATE TABLE " + TABLE + " (client int, iter int, k int, payload text, PRIMARY KEY (client, iter, k))");
        }

        ExecutorService pool = Executors.newFixedThreadPool(clients);
        List<Future<?>> done = new ArrayList<>();
        for (int client = 0; client < clients; client++) {
            final int id = client;
            final Properties p = props(userInfo, id % 2 == 0 ? 5 : 1);
            done.add(pool.submit(() -> {
                runClient(jdbc, p, id, iterations);
                return null;
            }));
        }
        try {
            for (Future<?> f : done) {
                f.get(100, TimeUnit.SECONDS);
            }
        } catch (Exception e) {
            Throwable cause = e.getCause() != null ? e.getCause() : e;
            System.err.println("pgjdbc check failed: " + cause);
            cause.printStackTrace();
            System.exit(1);
        } finally {
            pool.shutdownNow();
        }
        System.out.println("pgjdbc: " + clients + " clients x " + iterations + " iterations ok");
    }

    static Properties props(String[] userInfo, int prepareThreshold) {
        Properties p = new Properties();
        p.setProperty("user", userInfo[0]);
        p.setProperty("password", userInfo[1]);
        p.setProperty("prepareThreshold", Integer.toString(prepareThreshold));
        return p;
    }

    static void runClient(String jdbc, Properties props, int client, int iterations) throws Exception {
        try (Connection c = DriverManager.getConnection(jdbc, props)) {
            PreparedStatement add = c.prepareStatement("SELECT ?::int + ?::int, ? || 'x'");
            PreparedStatement div = c.prepareStatement("SELECT 10 / ?::int");
            PreparedStatement ins =
                    c.prepareStatement("INSERT INTO " + TABLE + " (client, iter, k, payload) VALUES (?, ?, ?, ?)");
            PreparedStatement ret = c.prepareStatement(
                    "INSERT INTO " + TABLE + " (client, iter, k, payload) VALUES (?, ?, 100, ?) RETURNING k, payload");
            PreparedStatement count = c.prepareStatement(
                    "SELECT count(*), coalesce(sum(k), 0) FROM " + TABLE + " WHERE client = ? AND iter = ?");
            for (int it = 0; it < iterations; it++) {
                String where = "client " + client + " iteration " + it;

                add.setInt(1, client);
                add.setInt(2, it);
                add.setString(3, "c" + client);
                try (ResultSet rs = add.executeQuery()) {
                    expect(where + ": sum", rs.next() && rs.getInt(1) == client + it && rs.getString(2).equals("c" + client + "x"));
                }

                if (it % 2 == 0) {
                    div.setInt(1, 0);
                    expectError(where + ": division by zero", "22012", () -> div.executeQuery().close());
                } else {
                    div.setInt(1, 5);
                    try (ResultSet rs = div.executeQuery()) {
                        expect(where + ": division", rs.next() && rs.getInt(1) == 2);
                    }
                }

                c.setAutoCommit(false);
                for (int k = 0; k < 3; k++) {
                    ins.setInt(1, client);
                    ins.setInt(2, it);
                    ins.setInt(3, k);
                    ins.setString(4, "p" + k);
                    ins.addBatch();
                }
                int[] counts = ins.executeBatch();
                expect(where + ": batch of 3", counts.length == 3 && counts[0] == 1 && counts[1] == 1 && counts[2] == 1);
                ret.setInt(1, client);
                ret.setInt(2, it);
                ret.setString(3, "r" + it);
                try (ResultSet rs = ret.executeQuery()) {
                    expect(where + ": returning", rs.next() && rs.getInt(1) == 100 && rs.getString(2).equals("r" + it));
                }
                c.commit();
                c.setAutoCommit(true);
                expectCount(count, client, it, 4, 103, where + ": after commit");

                if (it % 5 == 4) {
                    c.setAutoCommit(false);
                    ins.setInt(1, client);
                    ins.setInt(2, it);
                    ins.setInt(3, 50);
                    ins.setString(4, "gone");
                    ins.executeUpdate();
                    expectCount(count, client, it, 5, 153, where + ": inside the transaction");
                    c.rollback();
                    c.setAutoCommit(true);
                    expectCount(count, client, it, 4, 103, where + ": after rollback");
                }

                if (it % 7 == 6) {
                    c.setAutoCommit(false);
                    ins.setInt(1, client);
                    ins.setInt(2, it);
                    ins.setInt(3, 0);
                    ins.setString(4, "duplicate");
                    expectError(where + ": unique violation", "23505", ins::executeUpdate);
                    expectError(where + ": aborted transaction", "25P02", () -> count.executeQuery().close());
                    c.rollback();
                    c.setAutoCommit(true);
                    expectCount(count, client, it, 4, 103, where + ": after the aborted transaction");
                }

                if (it % 10 == 9) {
                    c.setAutoCommit(false);
                    try (PreparedStatement series = c.prepareStatement("SELECT g FROM generate_series(1, ?) g")) {
                        series.setFetchSize(3);
                        series.setInt(1, 10 + client);
                        long sum = 0;
                        int rows = 0;
                        try (ResultSet rs = series.executeQuery()) {
                            while (rs.next()) {
                                sum += rs.getInt(1);
                                rows++;
                            }
                        }
                        int n = 10 + client;
                        expect(where + ": cursor", rows == n && sum == (long) n * (n + 1) / 2);
                    }
                    c.commit();
                    c.setAutoCommit(true);
                }

                // A statement whose text changes: a new unnamed, then named, statement each time.
                try (PreparedStatement shape = c.prepareStatement("SELECT ?::int * " + (it % 9) + " + " + client)) {
                    for (int rep = 0; rep < 6; rep++) {
                        shape.setInt(1, rep);
                        try (ResultSet rs = shape.executeQuery()) {
                            expect(where + ": shape", rs.next() && rs.getInt(1) == rep * (it % 9) + client);
                        }
                    }
                }
            }
        }
    }

    interface Action {
        void run() throws SQLException;
    }

    static void expect(String what, boolean ok) throws Mismatch {
        if (!ok) {
            throw new Mismatch(what + ": wrong result");
        }
    }

    static void expectError(String what, String sqlState, Action action) throws Mismatch {
        try {
            action.run();
        } catch (SQLException e) {
            if (!sqlState.equals(e.getSQLState())) {
                throw new Mismatch(what + ": failed with " + e.getSQLState() + " (" + e.getMessage() + "), expected " + sqlState);
            }
            return;
        }
        throw new Mismatch(what + ": succeeded, expected an error with SQLSTATE " + sqlState);
    }

    static void expectCount(PreparedStatement count, int client, int it, int rows, int sum, String what)
            throws SQLException, Mismatch {
        count.setInt(1, client);
        count.setInt(2, it);
        try (ResultSet rs = count.executeQuery()) {
            expect(what + " (count " + rows + ", sum " + sum + ")", rs.next() && rs.getInt(1) == rows && rs.getInt(2) == sum);
        }
    }
}
