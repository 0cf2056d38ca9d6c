// Idiomatic Kotlin over the generated bindings (dev.ferry, generated from ferry-ffi).
//
// Kept small on purpose: the generated code already gives suspend functions, data classes,
// sealed exceptions and AutoCloseable objects (`use {}` closes, and closing a Replica releases
// its database file). This file adds what Kotlin code expects on top: a `write {}` block that
// commits or rolls back, Flows for watched queries, changes and sync status, lambdas for the
// foreign traits, and conversions between Kotlin values and SqlValue.
package dev.ferry

import kotlinx.coroutines.channels.Channel
import kotlinx.coroutines.channels.awaitClose
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.buffer
import kotlinx.coroutines.flow.callbackFlow
import kotlinx.coroutines.flow.conflate
import kotlinx.coroutines.flow.first

/**
 * Runs [body] in one write transaction: committed if it returns (everything it wrote becomes
 * one change set), rolled back if it throws. Not `inline`: [body] cannot suspend, so the
 * replica's lock is never held across a suspension (use [writeAsync] from a coroutine).
 */
fun <T> Replica.write(body: (WriteTransaction) -> T): T {
    val tx = beginWrite()
    try {
        val result = body(tx)
        tx.commit()
        return result
    } catch (e: Throwable) {
        try {
            tx.rollback()
        } catch (r: Throwable) {
            e.addSuppressed(r) // keep the body's exception as the one thrown
        }
        throw e
    } finally {
        tx.close()
    }
}

/** [Replica.execute] with Kotlin values as parameters (see [sqlValue]). */
fun Replica.exec(sql: String, vararg params: Any?): Long = executeValues(sql, params.asList())

/** [Replica.query] with Kotlin values as parameters, rows as Kotlin values. */
fun Replica.select(sql: String, vararg params: Any?): List<List<Any?>> =
    queryRows(sql, params.asList()).map { it.toList() }

/** [WriteTransaction.execute] with Kotlin values as parameters. */
fun WriteTransaction.exec(sql: String, vararg params: Any?): Long = executeValues(sql, params.asList())

/** [WriteTransaction.query] with Kotlin values as parameters, rows as Kotlin values. */
fun WriteTransaction.select(sql: String, vararg params: Any?): List<List<Any?>> =
    queryRows(sql, params.asList()).map { it.toList() }

/**
 * The results of [sql] now and after every commit that changes them. Collecting starts the
 * watch; cancelling the collector cancels it. Only the latest results are kept for a slow
 * collector.
 */
fun Replica.watchFlow(sql: String, vararg params: Any?): Flow<QueryResult> = callbackFlow {
    val listener = object : QueryListener {
        override fun onRows(rows: QueryResult) {
            trySend(rows)
        }
    }
    val sub = watch(sql, params.map(::sqlValue), listener)
    awaitClose { sub.cancel(); sub.close() }
}.conflate()

/** Every commit to synced tables (local, foreign or remote), none dropped. */
fun Replica.changes(): Flow<ChangeEvent> = callbackFlow {
    val listener = object : ChangeListener {
        override fun onChange(event: ChangeEvent) {
            trySend(event)
        }
        override fun onConflict(conflict: ConflictRecord) {}
    }
    val sub = subscribe(listener)
    awaitClose { sub.cancel(); sub.close() }
}.buffer(Channel.UNLIMITED)

/** Every conflict detected while merging (the conflict log's entries as they are written), none dropped. */
fun Replica.conflictFlow(): Flow<ConflictRecord> = callbackFlow {
    val listener = object : ChangeListener {
        override fun onChange(event: ChangeEvent) {}
        override fun onConflict(conflict: ConflictRecord) {
            trySend(conflict)
        }
    }
    val sub = subscribe(listener)
    awaitClose { sub.cancel(); sub.close() }
}.buffer(Channel.UNLIMITED)

/** Statuses from a registration ([observe] returns its subscription), conflated: the newest wins. */
private fun statuses(observe: (SyncStatusListener) -> Subscription): Flow<SyncStatus> = callbackFlow {
    val sub = observe(object : SyncStatusListener {
        override fun onStatus(status: SyncStatus) {
            trySend(status)
        }
    })
    awaitClose { sub.cancel(); sub.close() }
}.conflate()

/** The sync status now and on every change; only the latest is kept for a slow collector. */
fun SyncSession.statusFlow(): Flow<SyncStatus> = statuses(::observe)

/**
 * The replica's sync status now and on every change of any of its sessions — across
 * disconnects, reconnects and [Replica.disconnectAndClear] (conflated: the newest wins). What a
 * status bar collects.
 */
fun Replica.syncStatusFlow(): Flow<SyncStatus> = statuses(::observeSyncStatus)

/** Suspends until the replica has synced completely once ([SyncStatus.hasSynced]), in any session. */
suspend fun Replica.waitForFirstSync() {
    syncStatusFlow().first { it.hasSynced }
}

/** The schema as the relay's `schema.json` (the same names as these records): one declaration for both sides. */
fun Schema.toJson(): String = schemaToJson(this)

/** Registers [resolve] for the `custom` columns of [table]. */
fun Replica.setResolver(table: String, resolve: (ConflictInput) -> Resolution) =
    setResolver(table, object : ConflictResolver {
        override fun resolve(conflict: ConflictInput): Resolution = resolve(conflict)
    })

/** Connects with a lambda as the token provider (called before every connection attempt). */
fun Replica.connect(url: String, options: SyncOptions? = null, token: () -> String): SyncSession =
    connect(url, object : TokenProvider {
        override fun token(): String = token()
    }, options)

/**
 * Connects with a suspending token source (awaited before every connection attempt, e.g. to
 * refresh the token over the network; it may take up to 60 s).
 */
fun Replica.connectFetching(url: String, options: SyncOptions? = null, fetch: suspend () -> String): SyncSession =
    connectFetching(url, object : TokenFetcher {
        override suspend fun fetchToken(): String = fetch()
    }, options)

/** Converts a Kotlin value: null, String, Long/Int/Short/Byte, Double/Float, Boolean (0/1), ByteArray. */
fun sqlValue(v: Any?): SqlValue = when (v) {
    null -> SqlValue.Null
    is SqlValue -> v
    is String -> SqlValue.Text(v)
    is Long -> SqlValue.Integer(v)
    is Int -> SqlValue.Integer(v.toLong())
    is Short -> SqlValue.Integer(v.toLong())
    is Byte -> SqlValue.Integer(v.toLong())
    is Boolean -> SqlValue.Integer(if (v) 1 else 0)
    is Double -> SqlValue.Real(v)
    is Float -> SqlValue.Real(v.toDouble())
    is ByteArray -> SqlValue.Blob(v)
    else -> throw IllegalArgumentException("no SQLite value for ${v::class.qualifiedName}")
}

/** The Kotlin value inside: null, String, Long, Double or ByteArray. */
fun SqlValue.toKotlin(): Any? = when (this) {
    is SqlValue.Null -> null
    is SqlValue.Text -> value
    is SqlValue.Integer -> value
    is SqlValue.Real -> value
    is SqlValue.Blob -> value
}

/** Rows as Kotlin values. */
fun QueryResult.values(): List<List<Any?>> = rows.map { row -> row.map { it.toKotlin() } }

/** A column declaration with Kotlin defaults. */
fun column(
    name: String,
    type: ColumnType = ColumnType.TEXT,
    policy: Policy = Policy.LWW,
    notNull: Boolean = false,
    default: Any? = null,
): ColumnDecl = ColumnDecl(name, type, policy, notNull, default?.let(::sqlValue))

/** A table declaration with Kotlin defaults (multi-writer, deletes win). */
fun table(
    name: String,
    primaryKey: String,
    vararg columns: ColumnDecl,
    mode: TableMode = TableMode.MULTI_WRITER,
    deleteRule: DeleteRule = DeleteRule.DELETE_WINS,
    scopeColumn: String? = null,
): TableDecl = TableDecl(name, columns.toList(), primaryKey, mode, deleteRule, scopeColumn)

/**
 * Sends Ferry's log records at [level] and above to [log] (called on Ferry's threads: hand them
 * to Logcat, SLF4J, ...). `setLogger(null, level)` stops them.
 */
fun setLogger(level: LogLevel = LogLevel.INFO, log: (LogRecord) -> Unit) =
    setLogger(object : LogSink {
        override fun log(record: LogRecord) = log(record)
    }, level)
