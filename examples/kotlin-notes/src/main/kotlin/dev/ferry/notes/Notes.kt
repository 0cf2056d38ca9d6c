// kotlin-notes: a JVM command-line notes app on Ferry's Kotlin layer. Works offline; `sync`
// exchanges changes with a relay (FERRY_RELAY, FERRY_TOKEN). The tests run it end to end.
//
//   notes --db notes.db add <folder> <title> [body]
//   notes --db notes.db list
//   notes --db notes.db like <id>
//   notes --db notes.db sync
package dev.ferry.notes

import dev.ferry.ColumnType
import dev.ferry.FerryException
import dev.ferry.Policy
import dev.ferry.Replica
import dev.ferry.Schema
import dev.ferry.TableMode
import dev.ferry.column
import dev.ferry.connect
import dev.ferry.exec
import dev.ferry.query
import dev.ferry.statusFlow
import dev.ferry.table
import dev.ferry.write
import kotlinx.coroutines.flow.first
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
import kotlin.system.exitProcess

val schema = Schema(
    version = 1,
    tables = listOf(
        table(
            "notes", "id",
            column("id"),
            column("folder", notNull = true),
            column("title"),
            column("body", policy = Policy.CUSTOM),
            column("likes", ColumnType.INTEGER, Policy.COUNTER),
            scopeColumn = "folder",
        ),
        table("announcements", "id", column("id"), column("text"), mode = TableMode.READ_ONLY),
    ),
    migrations = emptyList(),
)

/** A note as the app sees it (typed rows: `Replica.query(sql) { row -> Note(...) }`). */
data class Note(val id: String, val folder: String, val title: String?, val body: String?, val likes: Long)

fun usage(): Nothing {
    System.err.println("usage: notes --db PATH (add FOLDER TITLE [BODY] | list | like ID | sync)")
    exitProcess(2)
}

fun main(args: Array<String>) {
    if (args.size < 3 || args[0] != "--db") usage()
    val cmd = args.drop(2)
    try {
        Replica.open(args[1], schema).use { db -> run(db, cmd) }
    } catch (e: FerryException) {
        System.err.println("notes: ${e::class.simpleName}: ${e.message}")
        exitProcess(1)
    }
}

fun run(db: Replica, cmd: List<String>) {
    when (cmd.firstOrNull()) {
        "add" -> {
            if (cmd.size < 3) usage()
            val id = db.newId()
            db.write { tx ->
                tx.exec("INSERT INTO notes(id, folder, title, body) VALUES (?, ?, ?, ?)", id, cmd[1], cmd[2], cmd.getOrNull(3))
            }
            println("added $id")
        }
        "list" -> {
            val notes = db.query("SELECT id, folder, title, body, likes FROM notes ORDER BY folder, title, id") { row ->
                Note(row.getString("id"), row.getString("folder"), row.getStringOrNull("title"), row.getStringOrNull("body"), row.getLong("likes"))
            }
            for (n in notes) println("${n.id}  [${n.folder}] ${n.title}  ${n.body ?: ""}  (${n.likes} likes)")
        }
        "like" -> {
            if (cmd.size < 2) usage()
            if (db.exec("UPDATE notes SET likes = likes + 1 WHERE id = ?", cmd[1]) == 0L) {
                System.err.println("notes: no note ${cmd[1]}")
                exitProcess(1)
            }
        }
        "sync" -> {
            val url = System.getenv("FERRY_RELAY") ?: "ws://127.0.0.1:7070/sync"
            val token = System.getenv("FERRY_TOKEN") ?: run { System.err.println("notes: set FERRY_TOKEN"); exitProcess(2) }
            db.connect(url) { token }.use { session ->
                runBlocking {
                    withTimeout(30_000) { session.syncNow() }
                    val s = session.statusFlow().first()
                    println("synced: cursor ${s.cursor}, pending ${s.pending}")
                }
            }
        }
        else -> usage()
    }
}
