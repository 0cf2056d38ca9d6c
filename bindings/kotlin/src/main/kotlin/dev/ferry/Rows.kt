// Typed rows and non-blocking calls (dev.ferry).
//
// A query crosses the FFI as column names plus rows of SqlValue; apps want `row.getString("title")`
// and a mapper per row, as with Room, SQLDelight or a JDBC ResultSet. A `Row` reads by column name
// or index and says what is wrong (no such column, NULL, another type) instead of casting.
// The suspend forms run the call on Dispatchers.IO, so a coroutine on the main thread never waits
// on Ferry's lock; their transaction blocks are plain (non-suspend) lambdas, so no lock is ever
// held across a suspension.
package dev.ferry

import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.flowOn
import kotlinx.coroutines.flow.map
import kotlinx.coroutines.withContext

/** One result row: values by column name or index, typed getters that check. */
class Row internal constructor(private val index: Map<String, Int>, private val values: List<SqlValue>) {
    /** The result's column names, in order. */
    val columns: List<String> get() = index.entries.sortedBy { it.value }.map { it.key }

    /** The value of [column] as a Kotlin value (null, String, Long, Double or ByteArray). */
    operator fun get(column: String): Any? = value(column).toKotlin()

    /** The value at [i] (0-based) as a Kotlin value. */
    operator fun get(i: Int): Any? = values[i].toKotlin()

    /** The values as Kotlin values, in column order. */
    fun toList(): List<Any?> = values.map { it.toKotlin() }

    fun getString(column: String): String = getStringOrNull(column) ?: nullIn(column)
    fun getStringOrNull(column: String): String? = when (val v = value(column)) {
        is SqlValue.Null -> null
        is SqlValue.Text -> v.value
        else -> wrongType(column, v, "TEXT")
    }

    fun getLong(column: String): Long = getLongOrNull(column) ?: nullIn(column)
    fun getLongOrNull(column: String): Long? = when (val v = value(column)) {
        is SqlValue.Null -> null
        is SqlValue.Integer -> v.value
        else -> wrongType(column, v, "INTEGER")
    }

    fun getInt(column: String): Int = getIntOrNull(column) ?: nullIn(column)
    fun getIntOrNull(column: String): Int? = getLongOrNull(column)?.let {
        if (it < Int.MIN_VALUE || it > Int.MAX_VALUE) {
            throw IllegalStateException("column '$column' holds $it, which does not fit an Int")
        }
        it.toInt()
    }

    fun getBoolean(column: String): Boolean = getBooleanOrNull(column) ?: nullIn(column)
    fun getBooleanOrNull(column: String): Boolean? = getLongOrNull(column)?.let { it != 0L }

    /** A REAL, or an INTEGER widened (SQLite stores whole REAL values as integers in some cases). */
    fun getDouble(column: String): Double = getDoubleOrNull(column) ?: nullIn(column)
    fun getDoubleOrNull(column: String): Double? = when (val v = value(column)) {
        is SqlValue.Null -> null
        is SqlValue.Real -> v.value
        is SqlValue.Integer -> v.value.toDouble()
        else -> wrongType(column, v, "REAL")
    }

    fun getBlob(column: String): ByteArray = getBlobOrNull(column) ?: nullIn(column)
    fun getBlobOrNull(column: String): ByteArray? = when (val v = value(column)) {
        is SqlValue.Null -> null
        is SqlValue.Blob -> v.value
        else -> wrongType(column, v, "BLOB")
    }

    override fun toString(): String =
        columns.joinToString(", ", "Row(", ")") { "$it=${get(it)}" }

    private fun value(column: String): SqlValue {
        val i = index[column]
            ?: throw IllegalArgumentException("no column '$column'; columns: ${columns.joinToString()}")
        return values[i]
    }

    private fun nullIn(column: String): Nothing =
        throw IllegalStateException("column '$column' is NULL (use the OrNull getter)")

    private fun wrongType(column: String, v: SqlValue, wanted: String): Nothing {
        val held = when (v) {
            is SqlValue.Null -> "NULL"
            is SqlValue.Text -> "TEXT"
            is SqlValue.Integer -> "INTEGER"
            is SqlValue.Real -> "REAL"
            is SqlValue.Blob -> "BLOB"
        }
        throw IllegalStateException("column '$column' holds $held, not $wanted")
    }
}

/** The rows as [Row]s. */
fun QueryResult.toRows(): List<Row> {
    val index = columns.withIndex().associate { (i, name) -> name to i }
    return rows.map { Row(index, it) }
}

/** Runs [sql] with Kotlin values as [args] and maps each row (blocking; see [getAll]). */
fun <T> Replica.query(sql: String, args: List<Any?> = emptyList(), map: (Row) -> T): List<T> =
    queryRows(sql, args).map(map)

/** [Replica.query] with a mapper, inside a write transaction (sees its writes). */
fun <T> WriteTransaction.query(sql: String, args: List<Any?> = emptyList(), map: (Row) -> T): List<T> =
    queryRows(sql, args).map(map)

/**
 * The mapped results of [sql] now and after every commit that changes them, run off the
 * collector's thread. Only the latest results are kept for a slow collector.
 */
fun <T> Replica.watch(sql: String, args: List<Any?> = emptyList(), map: (Row) -> T): Flow<List<T>> =
    watchFlow(sql, *args.toTypedArray()).map { it.toRows().map(map) }.flowOn(Dispatchers.IO)

/** Every mapped row of [sql], queried on Dispatchers.IO. */
suspend fun <T> Replica.getAll(sql: String, args: List<Any?> = emptyList(), map: (Row) -> T): List<T> =
    withContext(Dispatchers.IO) { query(sql, args, map) }

/** The first mapped row of [sql], or null when there is none, queried on Dispatchers.IO. */
suspend fun <T> Replica.getOptional(sql: String, args: List<Any?> = emptyList(), map: (Row) -> T): T? =
    getAll(sql, args, map).firstOrNull()

/** Runs one statement as its own write transaction on Dispatchers.IO; returns rows changed. */
suspend fun Replica.executeAsync(sql: String, args: List<Any?> = emptyList()): Long =
    withContext(Dispatchers.IO) { executeValues(sql, args) }

/**
 * [write] on Dispatchers.IO: [body] runs in one write transaction, committed if it returns and
 * rolled back if it throws. [body] is not a suspend lambda, so the transaction never stays
 * open across a suspension.
 */
suspend fun <T> Replica.writeAsync(body: (WriteTransaction) -> T): T =
    withContext(Dispatchers.IO) { write(body) }

/** Opens (creating if needed) the replica at [path] on Dispatchers.IO. */
suspend fun openReplica(path: String, schema: Schema, options: ReplicaOptions = ReplicaOptions()): Replica =
    withContext(Dispatchers.IO) { Replica.openWith(path, schema, options) }
