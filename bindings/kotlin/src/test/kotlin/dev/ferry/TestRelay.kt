// A real ferry-relay process on 127.0.0.1 (random port) for the binding tests, with the
// notes schema from bindings/tests/notes-schema.json. Paths come from the environment that
// scripts/test-kotlin sets: FERRY_RELAY_BIN and FERRY_NOTES_SCHEMA.
package dev.ferry

import java.io.File
import java.nio.file.Files
import java.util.concurrent.TimeUnit

class TestRelay : AutoCloseable {
    val dir: File = Files.createTempDirectory("ferry-kt-relay").toFile()
    private val bin = System.getenv("FERRY_RELAY_BIN") ?: error("FERRY_RELAY_BIN is not set")
    private val config = File(dir, "relay.toml")
    private val process: Process
    val url: String

    init {
        // The relay is configured with the schema the app declares as records, exported.
        val schema = File(dir, "schema.json").apply { writeText(notesSchema().toJson()) }.path
        config.writeText(
            """
            listen = "127.0.0.1:0"
            data = "${File(dir, "data").path}"
            schema = "$schema"
            [log]
            level = "warn"
            [auth]
            hs256_secret = "bindings-test-secret-not-for-production-use"
            """.trimIndent()
        )
        process = ProcessBuilder(bin, "--config", config.path, "serve")
            .redirectError(ProcessBuilder.Redirect.INHERIT)
            .start()
        val line = process.inputStream.bufferedReader().readLine() ?: error("the relay did not start")
        url = "ws://${line.trim().split(" ").last()}/sync"
    }

    /** A development token for [sub] (read and write patterns as the relay's `token` command takes them). */
    fun token(sub: String, read: String = "*", write: String = "*", primary: String? = null): String {
        val args = mutableListOf(bin, "--config", config.path, "token", "--sub", sub, "--read", read, "--write", write, "--ttl", "1h")
        if (primary != null) args += listOf("--primary", primary)
        val p = ProcessBuilder(args)
            .redirectError(ProcessBuilder.Redirect.INHERIT)
            .start()
        val out = p.inputStream.bufferedReader().readText().trim()
        check(p.waitFor() == 0) { "token command failed" }
        return out
    }

    override fun close() {
        process.destroy()
        process.waitFor(10, TimeUnit.SECONDS)
        dir.deleteRecursively()
    }
}

/**
 * The notes schema, declared as records by examples/kotlin-notes, plus the `server_checked`
 * `seats` table the tests of checked writes use (together: bindings/tests/notes-schema.json).
 */
fun notesSchema(): Schema = dev.ferry.notes.schema.let {
    it.copy(tables = it.tables + table("seats", "id", column("id"), column("taken_by"), mode = TableMode.SERVER_CHECKED))
}
