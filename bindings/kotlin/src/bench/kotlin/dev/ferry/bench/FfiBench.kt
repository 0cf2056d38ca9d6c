// What crossing the FFI costs from Kotlin: the same inserts and reads through Ferry (JNA)
// and through SQLite's JDBC driver (Debian's libxerial-sqlite-jdbc-java) in the same JVM and
// run, as ratios, after a warm-up round at 5,000 rows that JIT-compiles both sides. Run with
// scripts/bench-kotlin [ROWS]. Both sides: a file in a temporary
// folder, WAL, synchronous=NORMAL; Ferry also captures every write into its change log.
package dev.ferry.bench

import dev.ferry.ColumnType
import dev.ferry.Replica
import dev.ferry.Schema
import dev.ferry.SqlValue
import dev.ferry.column
import dev.ferry.newId
import dev.ferry.exec
import dev.ferry.query
import dev.ferry.table
import dev.ferry.write
import java.io.File
import java.nio.file.Files
import java.sql.DriverManager

const val SQL = "INSERT INTO notes(id, folder, title, body, likes) VALUES (?, ?, ?, ?, ?)"

data class Row(val id: String, val folder: String, val title: String, val body: String, val likes: Long)

fun rows(n: Int) = List(n) { Row(newId(), "f${it % 10}", "title $it", "body ".repeat(8), it.toLong()) }

fun Row.values() = listOf(SqlValue.Text(id), SqlValue.Text(folder), SqlValue.Text(title), SqlValue.Text(body), SqlValue.Integer(likes))

fun time(f: () -> Unit): Double {
    val t = System.nanoTime()
    f()
    return (System.nanoTime() - t) / 1e9
}

/** The plain side: a JDBC connection to [file] with the notes table, WAL, synchronous=NORMAL. */
fun plainDb(file: File): java.sql.Connection {
    val jdbc = DriverManager.getConnection("jdbc:sqlite:" + file.path)
    jdbc.createStatement().use {
        it.execute("PRAGMA journal_mode=WAL")
        it.execute("PRAGMA synchronous=NORMAL")
        it.execute("CREATE TABLE notes(id TEXT PRIMARY KEY NOT NULL, folder TEXT, title TEXT, body TEXT, likes INTEGER)")
    }
    return jdbc
}

/** Inserts [rs] through JDBC in one transaction, as a batch or one statement each. */
fun insert(jdbc: java.sql.Connection, rs: List<Row>, batch: Boolean) {
    jdbc.autoCommit = false
    jdbc.prepareStatement(SQL).use { st ->
        for (r in rs) {
            st.setString(1, r.id); st.setString(2, r.folder); st.setString(3, r.title); st.setString(4, r.body); st.setLong(5, r.likes)
            if (batch) st.addBatch() else st.executeUpdate()
        }
        if (batch) st.executeBatch()
    }
    jdbc.commit()
    jdbc.autoCommit = true
}

fun main(args: Array<String>) {
    val n = args.firstOrNull()?.toInt() ?: 50_000
    if (args.getOrNull(1) != "--no-warmup") {
        run(5_000, print = false) // JIT-compile both sides before measuring
    }
    run(n, print = true)
}

fun run(n: Int, print: Boolean) {
    val small = maxOf(n / 10, 1)
    val dir = Files.createTempDirectory("ferry-bench").toFile()
    val schema = Schema(1, listOf(table("notes", "id", column("id"), column("folder"), column("title"), column("body"),
        column("likes", ColumnType.INTEGER), scopeColumn = "folder")), emptyList())
    val jdbc = plainDb(File(dir, "plain.db"))
    val db = Replica.open(File(dir, "ferry.db").path, schema)
    fun jdbcInsert(rs: List<Row>, batch: Boolean) = insert(jdbc, rs, batch)
    val workloads = listOf<Triple<String, Pair<() -> Unit, () -> Unit>, Int>>(
        rows(n).let { a -> rows(n).let { b ->
            Triple("$n inserts, one transaction", Pair({ jdbcInsert(a, false) }, { db.write { tx -> for (r in b) tx.exec(SQL, r.id, r.folder, r.title, r.body, r.likes) } }), n)
        } },
        rows(n).let { a -> rows(n).let { b ->
            Triple("$n inserts, batch / executeMany", Pair({ jdbcInsert(a, true) }, { db.write { tx -> tx.executeMany(SQL, b.map { it.values() }) } }), n)
        } },
        rows(small).let { a -> rows(small).let { b ->
            Triple("$small inserts, one transaction each", Pair({ for (r in a) jdbcInsert(listOf(r), false) }, { for (r in b) db.exec(SQL, r.id, r.folder, r.title, r.body, r.likes) }), small)
        } },
        Triple("read ${2 * n + small} rows", Pair({
            jdbc.createStatement().use { st -> st.executeQuery("SELECT id, folder, title, body, likes FROM notes").use { rs ->
                var c = 0; while (rs.next()) { rs.getString(1); rs.getString(2); rs.getString(3); rs.getString(4); rs.getLong(5); c++ }
                check(c == 2 * n + small)
            } }
        }, {
            val all = db.query("SELECT id, folder, title, body, likes FROM notes") { r ->
                Row(r.getString("id"), r.getString("folder"), r.getString("title"), r.getString("body"), r.getLong("likes"))
            }
            check(all.size == 2 * n + small)
        }), 2 * n + small),
        pointReads(dir, schema, small),
    )
    if (print) println(String.format("%-42s %16s %16s %7s", "workload", "jdbc (rows/s)", "ferry (rows/s)", "ratio"))
    for ((name, fns, count) in workloads) {
        val tp = time(fns.first)
        val tf = time(fns.second)
        if (print) println(String.format("%-42s %,16.0f %,16.0f %6.2fx", name, count / tp, count / tf, tf / tp))
    }
    db.close()
    jdbc.close()
    dir.deleteRecursively()
}

const val POINT = "SELECT id, folder, title, body, likes FROM notes WHERE id = ?"

/**
 * [count] point reads by key, one call each, rows mapped to [Row]: on files of their own (in
 * [dir]), written when the list of workloads is made, so the other workloads' counts stay.
 */
fun pointReads(dir: File, schema: Schema, count: Int): Triple<String, Pair<() -> Unit, () -> Unit>, Int> {
    val keys = rows(count)
    val jdbc = plainDb(File(dir, "plain-points.db"))
    insert(jdbc, keys, batch = false)
    val db = Replica.open(File(dir, "ferry-points.db").path, schema)
    db.write { tx -> tx.executeMany(SQL, keys.map { it.values() }) }
    val viaJdbc = {
        jdbc.prepareStatement(POINT).use { st ->
            for (k in keys) {
                st.setString(1, k.id)
                st.executeQuery().use { rs ->
                    check(rs.next())
                    check(Row(rs.getString(1), rs.getString(2), rs.getString(3), rs.getString(4), rs.getLong(5)) == k)
                }
            }
        }
        jdbc.close()
    }
    val viaFerry = {
        for (k in keys) {
            val got = db.query(POINT, listOf(k.id)) { r ->
                Row(r.getString("id"), r.getString("folder"), r.getString("title"), r.getString("body"), r.getLong("likes"))
            }
            check(got.single() == k)
        }
        db.close()
    }
    return Triple("$count point reads by key, typed rows", Pair(viaJdbc, viaFerry), count)
}
