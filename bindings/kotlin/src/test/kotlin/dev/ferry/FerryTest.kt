// The Kotlin surface of Ferry against a real relay process: sync between two replicas, watch
// as a Flow, a resolver written in Kotlin deciding a real conflict, typed exceptions, closing
// and reopening. Behaviour is tested in Rust; these tests cover what crosses the FFI.
package dev.ferry

import kotlinx.coroutines.async
import kotlinx.coroutines.flow.first
import kotlinx.coroutines.delay
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
import org.junit.After
import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertNotNull
import org.junit.Assert.assertNull
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Before
import org.junit.Test
import java.io.File
import java.nio.file.Files
import java.util.Collections

class FerryTest {
    private lateinit var relay: TestRelay
    private lateinit var dir: File

    @Before
    fun start() {
        relay = TestRelay()
        dir = Files.createTempDirectory("ferry-kt").toFile()
    }

    @After
    fun stop() {
        relay.close()
        dir.deleteRecursively()
    }

    private fun open(name: String) = Replica.open(File(dir, name).path, notesSchema())

    /** Two replicas of the notes schema (`a.db`, `b.db`), closed after [block]. */
    private inline fun twoReplicas(block: (Replica, Replica) -> Unit) {
        open("a.db").use { a -> open("b.db").use { b -> block(a, b) } }
    }

    private fun Replica.sync(sub: String, write: String = "*"): SyncSession {
        val token = relay.token(sub, write = write)
        return connect(relay.url, SyncOptions(backoffMinMs = 50, backoffMaxMs = 500)) { token }
    }

    /** Pauses and waits until the session has really stopped talking to the relay. */
    private suspend fun SyncSession.pauseNow() {
        pause()
        withTimeout(20_000) { statusFlow().first { it.state == ConnState.PAUSED } }
    }

    /**
     * Connects [a] as alice and [b] as bob, writes one row through [a] with [insert] (bound to
     * [id]), waits until both hold it, then pauses both: the start of an offline race.
     */
    private suspend fun sharedThenOffline(a: Replica, b: Replica, insert: String, id: String): Pair<SyncSession, SyncSession> {
        val sa = a.sync("alice")
        val sb = b.sync("bob")
        a.exec(insert, id)
        withTimeout(20_000) { sa.syncNow() }
        withTimeout(20_000) { sb.syncNow() }
        sa.pauseNow(); sb.pauseNow()
        return sa to sb
    }

    private inline fun <reified E : Throwable> assertThrows(block: () -> Unit): E {
        try {
            block()
        } catch (e: Throwable) {
            if (e is E) return e
            throw AssertionError("expected ${E::class.simpleName}, got $e", e)
        }
        fail("expected ${E::class.simpleName}, nothing was thrown")
        throw IllegalStateException()
    }

    @Test
    fun aWriteInOneReplicaAppearsInTheOthersWatch() = runBlocking<Unit> {
        twoReplicas { a, b ->
            val sa = a.sync("alice")
            val sb = b.sync("bob")
            val id = newId()
            a.write { tx ->
                tx.exec("INSERT INTO notes(id, folder, title) VALUES (?, 'home', ?)", id, "milk")
                assertEquals(listOf(listOf<Any?>(1L)), tx.select("SELECT count(*) FROM notes"))
            }
            withTimeout(20_000) { sa.syncNow() }
            val seen = withTimeout(20_000) {
                b.watchFlow("SELECT id, title FROM notes").first { it.rows.isNotEmpty() }
            }
            assertEquals(listOf(listOf<Any?>(id, "milk")), seen.values())
            withTimeout(20_000) { sb.syncNow() }
            assertTrue(withTimeout(20_000) { sb.verify() }.matches)
            assertEquals(a.checksum(), b.checksum())
            // A complete sync is recorded, in the status and in the file.
            val st = sb.status()
            assertTrue(st.hasSynced)
            assertNotNull(st.lastSyncedAtMs)
            assertNotNull(b.lastSyncedAtMs())
            assertEquals(st.snapshotTotalRows, st.snapshotRows)
            sa.close(); sb.close()
        }
    }

    @Test
    fun subscriptionsBackFillAndEvictScopes() = runBlocking<Unit> {
        twoReplicas { a, b ->
            val sa = a.sync("alice")
            for (folder in listOf("home", "work")) {
                for (i in 0 until 10) {
                    a.exec("INSERT INTO notes(id, folder, title) VALUES (?, ?, 't')", "$folder$i", folder)
                }
            }
            withTimeout(20_000) { sa.syncNow() }
            b.setSubscriptions(listOf("work"))
            val sb = b.sync("bob")
            withTimeout(20_000) { sb.waitForFirstSync("work", 20_000) }
            assertFalse(sb.hasSynced("home"))
            assertEquals(listOf(listOf<Any?>(10L)), b.select("SELECT count(*) FROM notes"))
            sb.subscribe("home")
            withTimeout(20_000) { sb.waitForFirstSync("home", 20_000) }
            assertEquals(listOf(listOf<Any?>(20L)), b.select("SELECT count(*) FROM notes"))
            sb.unsubscribe("work")
            withTimeout(20_000) {
                while (b.evictions(10).isEmpty()) delay(20)
            }
            val ev = b.evictions(10).single()
            assertEquals("work", ev.scope)
            assertEquals(10L, ev.rows)
            assertTrue(withTimeout(20_000) { sb.verify() }.matches)
            sa.close(); sb.close()
        }
    }

    @Test
    fun aResolverWrittenInKotlinDecidesARealConflict() = runBlocking<Unit> {
        twoReplicas { a, b ->
            val calls = Collections.synchronizedList(mutableListOf<ConflictInput>())
            b.setResolver("notes") { c ->
                calls.add(c)
                Resolution.Value(sqlValue("${c.local.toKotlin()} & ${c.remote.toKotlin()}"))
            }
            val seen = async { withTimeout(20_000) { b.conflictFlow().first() } }
            val id = newId()
            val (sa, sb) = sharedThenOffline(a, b, "INSERT INTO notes(id, folder, title, body) VALUES (?, 'home', 't', 'draft')", id)
            a.exec("UPDATE notes SET body = 'from a' WHERE id = ?", id)
            b.exec("UPDATE notes SET body = 'from b' WHERE id = ?", id)
            sa.resume(); withTimeout(20_000) { sa.syncNow() }
            // b's edit is still pending when a's arrives: b's resolver decides.
            sb.resume(); withTimeout(20_000) { sb.syncNow() }
            withTimeout(20_000) { sb.syncNow() }
            withTimeout(20_000) { sa.syncNow() }
            assertEquals(1, calls.size)
            assertEquals(sqlValue("from b"), calls[0].local)
            assertEquals(sqlValue("from a"), calls[0].remote)
            val expected = listOf(listOf<Any?>("from b & from a"))
            assertEquals(expected, b.select("SELECT body FROM notes WHERE id = ?", id))
            assertEquals(expected, a.select("SELECT body FROM notes WHERE id = ?", id))
            val logged = b.conflicts().single()
            assertEquals("custom", logged.policy)
            assertEquals(logged.id, seen.await().id)
            assertTrue(logged.resolution!!.contains("from b & from a"))
            sa.close(); sb.close()
        }
    }

    @Test
    fun countersFromTwoReplicasAddUp() = runBlocking<Unit> {
        twoReplicas { a, b ->
            val id = newId()
            val (sa, sb) = sharedThenOffline(a, b, "INSERT INTO notes(id, folder, likes) VALUES (?, 'home', 0)", id)
            repeat(3) { a.exec("UPDATE notes SET likes = likes + 1 WHERE id = ?", id) }
            repeat(4) { b.exec("UPDATE notes SET likes = likes + 1 WHERE id = ?", id) }
            sa.resume(); sb.resume()
            withTimeout(20_000) { sa.syncNow() }
            withTimeout(20_000) { sb.syncNow() }
            withTimeout(20_000) { sa.syncNow() }
            for (r in listOf(a, b)) {
                assertEquals(listOf(listOf<Any?>(7L)), r.select("SELECT likes FROM notes WHERE id = ?", id))
            }
            sa.close(); sb.close()
        }
    }

    @Test
    fun errorsArriveAsTypedExceptions() = runBlocking<Unit> {
        open("a.db").use { a ->
            assertThrows<FerryException.InvalidInput> { a.exec("SELEC nonsense") }
            assertThrows<FerryException.InvalidInput> { a.exec("INSERT INTO notes(id, folder) VALUES (?, ?)", "x") }
            val ro = assertThrows<FerryException.ReadOnlyTable> {
                a.exec("INSERT INTO announcements(id, text) VALUES ('1', 'hi')")
            }
            assertEquals("announcements", ro.table)
            assertThrows<FerryException.InvalidInput> {
                Replica.open(File(dir, "bad.db").path, Schema(1, listOf(table("t", "missing", column("id"))), emptyList()))
            }
            assertThrows<FerryException.InvalidInput> { a.connect("http://not-a-relay", null) { "t" } }
            // Writing outside the token's write scopes is refused by the relay and quarantined:
            // the uploads behind it go on, and the app decides.
            val s = a.sync("mallory", write = "mine")
            a.exec("INSERT INTO notes(id, folder, title) VALUES (?, 'someone-else', 'x')", newId())
            a.exec("INSERT INTO notes(id, folder, title) VALUES (?, 'mine', 'behind')", newId())
            withTimeout(20_000) { s.syncNow() }
            assertNull(s.status().refused)
            assertEquals(1L, s.status().quarantined)
            val note = a.quarantined().single()
            assertEquals(RelayCode.FORBIDDEN, note.code)
            assertEquals(listOf("notes"), note.tables)
            assertFalse(note.discardable)
            assertThrows<FerryException.CannotDiscard> { a.discardQuarantined(note.id) }
            assertEquals(listOf(note.id), a.quarantined().map { it.id })
            s.close()
            a.closeDatabase()
            assertThrows<FerryException.Closed> { a.select("SELECT 1") }
        }
    }

    @Test
    fun theOneCallPathCarriesEveryValueLongResultsAndThreads() {
        // exec/select/query go through the library's C entry points (FastCalls.kt): every
        // value type both ways, a result longer than the per-thread buffer, a transaction that
        // reads its own writes, and threads calling at once.
        open("a.db").use { a ->
            val blob = byteArrayOf(0, -1, 7)
            val row = a.select("SELECT ?, ?, ?, ?, ?, ?, ?", null, 7L, 2.5, "ü€\u0000x", blob, true, 3)[0]
            assertEquals(listOf(null, 7L, 2.5, "ü€\u0000x"), row.take(4))
            assertTrue((row[4] as ByteArray).contentEquals(blob))
            assertEquals(listOf(1L, 3L), row.drop(5))
            val big = "€".repeat(100_000)
            a.write { tx ->
                for (i in 0 until 300) {
                    assertEquals(1L, tx.exec("INSERT INTO notes(id, folder, title) VALUES (?, 'home', ?)", "k$i", "t$i"))
                }
                assertEquals(1L, tx.exec("UPDATE notes SET title = ? WHERE id = 'k1'", big))
                assertEquals(listOf(listOf<Any?>(300L)), tx.select("SELECT count(*) FROM notes"))
            }
            assertEquals(big, a.query("SELECT title FROM notes WHERE id = ?", listOf("k1")) { it.getString("title") }.single())
            val failures = Collections.synchronizedList(mutableListOf<Throwable>())
            val threads = (0 until 4).map { t ->
                Thread {
                    val rnd = java.util.Random(t.toLong())
                    repeat(300) {
                        val i = rnd.nextInt(300)
                        val got = a.query("SELECT id, length(title) AS n FROM notes WHERE id = ?", listOf("k$i")) {
                            it.getString("id") to it.getLong("n")
                        }
                        assertEquals(listOf("k$i" to if (i == 1) 100_000L else "t$i".length.toLong()), got)
                    }
                }.also { it.setUncaughtExceptionHandler { _, e -> failures.add(e) }; it.start() }
            }
            threads.forEach { it.join(60_000) }
            assertTrue(threads.none { it.isAlive })
            assertEquals(emptyList<Throwable>(), failures)
            assertThrows<IllegalArgumentException> { a.select("SELECT ?", Any()) }
        }
    }

    @Test
    fun writeBlockRollsBackWhenItThrows() {
        open("a.db").use { a ->
            assertThrows<IllegalStateException> {
                a.write { tx ->
                    tx.exec("INSERT INTO notes(id, folder) VALUES ('1', 'home')")
                    error("changed my mind")
                }
            }
            assertEquals(listOf(listOf<Any?>(0L)), a.select("SELECT count(*) FROM notes"))
            assertEquals(0L, a.pendingCount())
            // Calling the replica from inside its own transaction is an error, not a deadlock.
            assertThrows<FerryException.InvalidInput> { a.write { a.select("SELECT 1") } }
            a.write { tx -> tx.exec("INSERT INTO notes(id, folder) VALUES ('2', 'home')") }
            assertEquals(1L, a.pendingCount())
            val bulk = (0 until 50).map { listOf(sqlValue("b$it"), sqlValue(it)) }
            assertEquals(50L, a.write { tx -> tx.executeMany("INSERT INTO notes(id, folder, likes) VALUES (?, 'bulk', ?)", bulk) })
            assertEquals(listOf(listOf<Any?>(50L, 1225L)), a.select("SELECT count(*), sum(likes) FROM notes WHERE folder = 'bulk'"))
            assertEquals(2L, a.pendingCount())
        }
    }

    private data class Note(val id: String, val title: String?, val likes: Long)

    @Test
    fun rowsAreTypedAndCallsSuspendOffTheCallersThread() = runBlocking<Unit> {
        val a = openReplica(File(dir, "t.db").path, notesSchema())
        a.use {
            assertEquals(1L, a.executeAsync("INSERT INTO notes(id, folder, title, likes) VALUES (?, 'home', ?, ?)", listOf("n1", "milk", 3)))
            a.writeAsync { tx -> tx.exec("INSERT INTO notes(id, folder, likes) VALUES ('n2', 'home', 0)") }
            val notes = a.getAll("SELECT id, title, likes FROM notes ORDER BY id") { row ->
                Note(row.getString("id"), row.getStringOrNull("title"), row.getLong("likes"))
            }
            assertEquals(listOf(Note("n1", "milk", 3), Note("n2", null, 0)), notes)
            val row = a.query("SELECT id, likes, 2.5 AS r FROM notes WHERE id = ?", listOf("n1")) { it }.single()
            assertEquals(listOf("id", "likes", "r"), row.columns)
            assertEquals("n1", row["id"])
            assertEquals(3L, row[1])
            assertEquals(3, row.getInt("likes"))
            assertTrue(row.getBoolean("likes"))
            assertEquals(2.5, row.getDouble("r"), 0.0)
            assertEquals(3.0, row.getDouble("likes"), 0.0)
            assertTrue(assertThrows<IllegalArgumentException> { row.getString("nope") }.message!!.contains("no column 'nope'"))
            assertTrue(assertThrows<IllegalStateException> { row.getLong("id") }.message!!.contains("holds TEXT, not INTEGER"))
            val n2 = a.getOptional("SELECT title FROM notes WHERE id = 'n2'") { it }!!
            assertTrue(assertThrows<IllegalStateException> { n2.getString("title") }.message!!.contains("NULL"))
            assertNull(a.getOptional("SELECT id FROM notes WHERE id = 'none'") { it.getString("id") })
            // A typed watch: the first results, then the results after a commit.
            val titles = a.watch("SELECT title FROM notes WHERE title IS NOT NULL ORDER BY title") { it.getString("title") }
            assertEquals(listOf("milk"), withTimeout(20_000) { titles.first() })
            val later = async { withTimeout(20_000) { titles.first { it.size == 2 } } }
            delay(50)
            a.executeAsync("UPDATE notes SET title = 'bread' WHERE id = 'n2'")
            assertEquals(listOf("bread", "milk"), later.await())
            // Counts and positions are Long, not ULong.
            val pending: Long = a.pendingCount()
            assertEquals(3L, pending)
        }
    }

    @Test
    fun ferrysLogRecordsReachTheApp() {
        val got = Collections.synchronizedList(mutableListOf<LogRecord>())
        setLogger(LogLevel.DEBUG) { got.add(it) }
        try {
            open("logged.db").use { a ->
                assertTrue(got.toString(), got.any { it.level == LogLevel.DEBUG && it.message.contains("replica opened") })
                val sub = a.subscribe(object : ChangeListener {
                    override fun onChange(event: ChangeEvent) = throw IllegalStateException("listener bug")
                    override fun onConflict(conflict: ConflictRecord) {}
                })
                a.exec("INSERT INTO notes(id, folder) VALUES ('1', 'home')")
                assertTrue(got.toString(), got.any { it.level == LogLevel.WARN && it.message.contains("change listener failed") })
                sub.cancel()
                setLogger(null, LogLevel.WARN)
                val count = got.size
                open("quiet.db").close()
                assertEquals(count, got.size)
            }
        } finally {
            setLogger(null, LogLevel.INFO)
        }
    }

    @Test
    fun aSuspendFunctionSuppliesTheTokenAndAFailingOneIsRetried() = runBlocking<Unit> {
        open("fetch.db").use { a ->
            val token = relay.token("alice")
            val calls = java.util.concurrent.atomic.AtomicInteger()
            val s = a.connectFetching(relay.url, SyncOptions(backoffMinMs = 50, backoffMaxMs = 200)) {
                delay(10) // e.g. a refresh over the network
                if (calls.incrementAndGet() == 1) throw IllegalStateException("identity provider unreachable")
                token
            }
            s.use {
                val failed = withTimeout(20_000) { s.statusFlow().first { it.lastError != null } }
                assertTrue(failed.lastError.toString(), failed.lastError!!.message.contains("token"))
                a.exec("INSERT INTO notes(id, folder, title) VALUES ('1', 'home', 'x')")
                withTimeout(20_000) { s.syncNow() }
                assertTrue(calls.get() >= 2)
                assertEquals(0L, a.pendingCount())
            }
        }
    }

    @Test
    fun logoutClearsAndResyncDownloadsAgain() = runBlocking<Unit> {
        twoReplicas { a, b ->
            val sa = a.sync("alice")
            var sb = b.sync("bob")
            a.exec("INSERT INTO notes(id, folder, title) VALUES ('1', 'home', 'milk')")
            withTimeout(20_000) { sa.syncNow(); sb.syncNow() }
            val sources = Collections.synchronizedList(mutableListOf<ChangeSource>())
            val sub = b.subscribe(object : ChangeListener {
                override fun onChange(event: ChangeEvent) { sources.add(event.source) }
                override fun onConflict(conflict: ConflictRecord) {}
            })
            b.resync()
            assertEquals(listOf(ChangeSource.CLEARED), sources.toList())
            sub.cancel()
            assertEquals(0L, b.query("SELECT count(*) AS n FROM notes") { it.getLong("n") }.single())
            sb = b.sync("bob")
            withTimeout(20_000) { sb.syncNow() }
            assertEquals(listOf("milk"), b.query("SELECT title FROM notes") { it.getString("title") })
            assertTrue(withTimeout(20_000) { sb.verify() }.matches)
            val before = b.replicaId()
            b.disconnectAndClear()
            assertEquals(0L, b.query("SELECT count(*) AS n FROM notes") { it.getLong("n") }.single())
            assertTrue(before != b.replicaId())
            assertNull(b.lastSyncedAtMs())
            sa.disconnect()
        }
    }

    @Test
    fun checkedWritesAndLeasesCrossTheFfi() = runBlocking<Unit> {
        twoReplicas { a, b ->
            val sa = a.sync("a")
            val sb = b.sync("b")
            a.exec("INSERT INTO seats(id, taken_by) VALUES ('12A', NULL)")
            withTimeout(20_000) { sa.syncNow(); sb.syncNow() }
            // Both book the same seat; b is offline, a's booking reaches the relay first.
            sb.pauseNow()
            var tx = b.beginWrite()
            tx.exec("UPDATE seats SET taken_by = 'b' WHERE id = '12A'")
            val late = requireNotNull(tx.commitChange())
            tx = a.beginWrite()
            tx.exec("UPDATE seats SET taken_by = 'a' WHERE id = '12A'")
            assertTrue(withTimeout(20_000) { sa.commitChecked(tx) } > 0)
            sb.resume()
            val lost = assertThrows<FerryException.ConflictRejected> {
                runBlocking { withTimeout(20_000) { sb.verdict(late) } }
            }
            assertEquals("conflict", lost.code)
            withTimeout(20_000) { sb.syncNow() }
            assertEquals(listOf("a"), b.query("SELECT taken_by FROM seats") { it.getString("taken_by") })
            assertTrue(b.conflicts().any { it.rejected && it.table == "seats" })
            // Offline or online, the loss is counted once.
            assertEquals(1L, sb.status().rolledBack)

            // Leases: one holder at a time; a guarded write carries the fencing token.
            val grant = withTimeout(20_000) { sa.acquireLease("check-in", 10_000) }
            val busy = assertThrows<FerryException.LeaseUnavailable> {
                runBlocking { withTimeout(20_000) { sb.acquireLease("check-in", 10_000) } }
            }
            assertTrue(requireNotNull(busy.retryAfterMs) > 0)
            tx = a.beginWrite()
            tx.guard(grant)
            tx.exec("INSERT INTO seats(id, taken_by) VALUES ('12B', 'a')")
            assertTrue(withTimeout(20_000) { sa.commitChecked(tx) } > 0)
            withTimeout(20_000) { sa.releaseLease(grant) }
            val newer = withTimeout(20_000) { sb.acquireLease("check-in", 10_000) }
            assertTrue(newer.token > grant.token)
            tx = a.beginWrite()
            tx.guard(grant) // released: the token is stale
            tx.exec("UPDATE seats SET taken_by = 'a again' WHERE id = '12B'")
            val fenced = assertThrows<FerryException.ConflictRejected> {
                runBlocking { withTimeout(20_000) { sa.commitChecked(tx) } }
            }
            assertEquals("fenced", fenced.code)
            assertEquals(listOf("a"), a.query("SELECT taken_by FROM seats WHERE id = '12B'") { it.getString("taken_by") })
            sa.disconnect()
            sb.disconnect()
        }
    }

    @Test
    fun theDatabaseStatusSpansSessions() = runBlocking<Unit> {
        twoReplicas { a, b ->
            val sa = a.sync("alice")
            a.write { tx -> for (i in 0 until 300) tx.exec("INSERT INTO notes(id, folder, title) VALUES (?, 'home', 't')", "n$i") }
            withTimeout(20_000) { sa.syncNow() }
            val first = b.syncStatusFlow().first()
            assertEquals(ConnState.STOPPED, first.state)
            assertFalse(first.hasSynced)
            assertNull(first.downloadProgress)
            val progress = Collections.synchronizedList(mutableListOf<Double>())
            val watcher = async {
                b.syncStatusFlow().first { st -> st.downloadProgress?.let { progress.add(it) }; st.hasSynced }
            }
            val sb = b.sync("bob")
            withTimeout(20_000) { b.waitForFirstSync() }
            withTimeout(20_000) { watcher.await() }
            assertTrue(progress.all { it in 0.0..1.0 })
            sb.disconnect()
            val stopped = withTimeout(20_000) { b.syncStatusFlow().first { it.state == ConnState.STOPPED } }
            assertTrue(stopped.hasSynced)
            assertNotNull(stopped.lastSyncedAtMs)
            assertNull(stopped.uploadError)
            assertNull(stopped.downloadError)
            b.disconnectAndClear()
            assertFalse(b.syncStatus().hasSynced)
            sa.disconnect()
        }
    }

    @Test
    fun syncNowFailsFastOnARefusedTokenAndAnUnreachableRelay() = runBlocking<Unit> {
        open("fast.db").use { a ->
            val opts = SyncOptions(backoffMinMs = 50, backoffMaxMs = 200)
            a.connect(relay.url, opts) { "not-a-token" }.use { s ->
                assertThrows<FerryException.Unauthorized> { runBlocking { withTimeout(20_000) { s.syncNow() } } }
                assertTrue(s.status().failures >= 1)
            }
            a.connect("ws://127.0.0.1:9/sync", opts) { "t" }.use { s ->
                assertThrows<FerryException.Offline> { runBlocking { withTimeout(20_000) { s.syncNow() } } }
            }
        }
    }

    @Test
    fun closingReleasesTheDatabaseAndReopenWorks() = runBlocking<Unit> {
        val path = File(dir, "c.db").path
        val id = newId()
        Replica.open(path, notesSchema()).use { r ->
            val s = r.sync("carol")
            r.exec("INSERT INTO notes(id, folder, title) VALUES (?, 'home', 'kept')", id)
            withTimeout(20_000) { s.syncNow() }
            val status = withTimeout(20_000) { s.statusFlow().first { it.state == ConnState.ONLINE && it.pending == 0L } }
            assertTrue(status.cursor >= 1L)
        } // close(): sessions end, the connection closes
        // The last connection to a WAL database removes the -wal file when it closes.
        assertFalse(File("$path-wal").exists())
        Replica.open(path, notesSchema()).use { r ->
            assertEquals(listOf(listOf<Any?>("kept")), r.select("SELECT title FROM notes WHERE id = ?", id))
            r.exec("UPDATE notes SET title = 'again' WHERE id = ?", id)
            r.closeDatabase()
            r.closeDatabase() // twice is fine
        }
        Replica.open(path, notesSchema()).use { r ->
            assertEquals(listOf(listOf<Any?>("again")), r.select("SELECT title FROM notes WHERE id = ?", id))
        }
        val sub = Replica.open(path, notesSchema()).use { r ->
            val sub = r.watch("SELECT 1", emptyList(), object : QueryListener {
                override fun onRows(rows: QueryResult) {}
            })
            assertTrue(sub.isActive())
            sub.cancel()
            sub
        }
        assertFalse(sub.isActive())
    }

    @Test
    fun migrationsUpgradeTheSchemaAndChangesAreObserved() = runBlocking<Unit> {
        val path = File(dir, "m.db").path
        Replica.open(path, notesSchema()).use { r ->
            val events = r.changes()
            val id = newId()
            val first = async { withTimeout(20_000) { events.first() } }
            delay(50) // lets the collector subscribe (runBlocking runs it first)
            r.exec("INSERT INTO notes(id, folder, title) VALUES (?, 'home', 'old')", id)
            val e = first.await()
            assertEquals(listOf("notes"), e.tables)
            assertEquals(ChangeSource.LOCAL, e.source)
        }
        val v1 = notesSchema()
        val notes = v1.tables[0]
        val v2 = v1.copy(
            version = 2,
            tables = listOf(notes.copy(columns = notes.columns + column("pinned", ColumnType.INTEGER))) + v1.tables.drop(1),
            migrations = listOf(Migration(2, "CREATE TABLE drafts(id TEXT PRIMARY KEY, text TEXT); UPDATE notes SET pinned = 0;")),
        )
        Replica.open(path, v2).use { r ->
            assertEquals(2, r.schemaVersion())
            assertEquals(listOf(listOf<Any?>("old", 0L)), r.select("SELECT title, pinned FROM notes"))
            r.exec("INSERT INTO drafts VALUES ('d', 'local only')")
        }
        assertThrows<FerryException.SchemaTooNew> { Replica.open(path, v1) }
    }

    @Test
    fun aPrimaryReplicaWritesAReadOnlyTableOthersReceive() = runBlocking<Unit> {
        Replica.openWith(File(dir, "primary.db").path, notesSchema(), ReplicaOptions(listOf("announcements"))).use { primary ->
            open("dash.db").use { dash ->
                val token = relay.token("backend", primary = "announcements")
                val sp = primary.connect(relay.url, SyncOptions(backoffMinMs = 50, backoffMaxMs = 500)) { token }
                val sd = dash.sync("dash")
                primary.exec("INSERT INTO announcements(id, text) VALUES ('1', 'maintenance at noon')")
                withTimeout(20_000) { sp.syncNow() }
                withTimeout(20_000) { sd.syncNow() }
                assertEquals(listOf(listOf<Any?>("maintenance at noon")), dash.select("SELECT text FROM announcements"))
                assertThrows<FerryException.ReadOnlyTable> { dash.exec("UPDATE announcements SET text = 'x'") }
                sp.close(); sd.close()
            }
        }
        assertThrows<FerryException.InvalidInput> {
            Replica.openWith(File(dir, "x.db").path, notesSchema(), ReplicaOptions(listOf("notes")))
        }
    }
}
