// The hot calls — a query or one statement — in one native call each (dev.ferry).
//
// A generated call marshals every argument and result as a UniFFI buffer, which JNA passes as
// a structure by value: most of a point read's cost (docs/benchmarks.md). The library also
// exports these calls as plain C functions (bindings/ffi/src/fast.rs): the generated
// `callWithHandle` clones the object's handle for the call, which consumes it as a generated
// method does (and the object cannot be destroyed meanwhile), the statement and its
// parameters go as one direct buffer in the compact binary form (bindings/ffi/src/compact.rs),
// and the rows come back in a direct buffer kept per thread.
// A failure is raised by the generated `fastCallError()`, so it is the same typed
// FerryException as from the generated methods.
package dev.ferry

import com.sun.jna.Native
import java.nio.BufferOverflowException
import java.nio.ByteBuffer
import java.nio.ByteOrder

/** The library's C entry points for the hot calls (JNA direct mapping). */
internal object FastCalls {
    init {
        // The library the generated code loads (JNA hands back the loaded instance).
        Native.register(
            FastCalls::class.java,
            System.getProperty("uniffi.component.ferry_ffi.libraryOverride") ?: "ferry_ffi",
        )
    }

    @JvmStatic external fun ferry_fast_query(
        handle: Long, target: Byte, input: ByteBuffer, sqlLen: Int, paramsLen: Int, format: Byte,
        out: ByteBuffer, outCap: Int, outLen: IntArray,
    ): Int

    @JvmStatic external fun ferry_fast_execute(
        handle: Long, target: Byte, input: ByteBuffer, sqlLen: Int, paramsLen: Int, format: Byte,
        changed: LongArray,
    ): Int

    @JvmStatic external fun ferry_fast_take(out: ByteBuffer, outCap: Int): Int

    const val OK = 0
    const val MORE = 1
    const val COMPACT: Byte = 1
    const val REPLICA: Byte = 0
    const val TRANSACTION: Byte = 1
}

/** One thread's buffers (a call runs on its caller's thread, start to end). */
private class CallBuffers {
    var input: ByteBuffer = direct(4 * 1024)
    val out: ByteBuffer = direct(OUT_CAP)
    val len = IntArray(1)
    val changed = LongArray(1)

    companion object {
        const val OUT_CAP = 64 * 1024
        fun direct(n: Int): ByteBuffer = ByteBuffer.allocateDirect(n).order(ByteOrder.LITTLE_ENDIAN)
    }
}

private val callBuffers = ThreadLocal.withInitial { CallBuffers() }

private const val NULL: Byte = 0
private const val INTEGER: Byte = 1
private const val REAL: Byte = 2
private const val TEXT: Byte = 3
private const val BLOB: Byte = 4

/** One value in the compact form; Kotlin values are converted by [sqlValue], the one rule. */
private fun ByteBuffer.putValue(v: Any?) {
    when (val s = sqlValue(v)) {
        is SqlValue.Null -> put(NULL)
        is SqlValue.Integer -> put(INTEGER).putLong(s.value)
        is SqlValue.Real -> put(REAL).putDouble(s.value)
        is SqlValue.Text -> putBytes(TEXT, s.value.toByteArray(Charsets.UTF_8))
        is SqlValue.Blob -> putBytes(BLOB, s.value)
    }
}

private fun ByteBuffer.putBytes(tag: Byte, bytes: ByteArray) {
    put(tag).putInt(bytes.size).put(bytes)
}

/** Writes the statement and its parameters into this thread's input buffer; returns the
 *  statement's and the parameters' lengths. */
private fun CallBuffers.encode(sql: String, args: List<Any?>): Pair<Int, Int> {
    val sqlBytes = sql.toByteArray(Charsets.UTF_8)
    while (true) {
        val b = input
        b.clear()
        try {
            b.put(sqlBytes).putInt(args.size)
            for (a in args) b.putValue(a)
            val end = b.position()
            b.flip() // JNA passes a buffer's address from its position
            return sqlBytes.size to (end - sqlBytes.size)
        } catch (e: BufferOverflowException) {
            input = CallBuffers.direct(b.capacity() * 2)
        }
    }
}

private fun ByteBuffer.string(): String {
    val n = int
    val bytes = ByteArray(n)
    get(bytes)
    return String(bytes, Charsets.UTF_8)
}

/** Rows in the compact form (see bindings/ffi/src/compact.rs). */
private fun decodeRows(b: ByteBuffer): List<Row> {
    val ncols = b.int
    val index = HashMap<String, Int>(ncols * 2)
    for (i in 0 until ncols) index[b.string()] = i
    val nrows = b.int
    val rows = ArrayList<Row>(nrows)
    repeat(nrows) {
        val values = ArrayList<SqlValue>(ncols)
        repeat(ncols) {
            values.add(
                when (val tag = b.get()) {
                    NULL -> SqlValue.Null
                    INTEGER -> SqlValue.Integer(b.long)
                    REAL -> SqlValue.Real(b.double)
                    TEXT -> SqlValue.Text(b.string())
                    BLOB -> SqlValue.Blob(ByteArray(b.int).also { b.get(it) })
                    else -> throw IllegalStateException("unknown value tag $tag from the library")
                },
            )
        }
        rows.add(Row(index, values))
    }
    return rows
}

private fun failed(): Nothing {
    fastCallError() // throws the call's FerryException
    throw IllegalStateException("a fast call failed without saying why")
}

private fun fastQuery(handle: Long, target: Byte, sql: String, args: List<Any?>): List<Row> {
    val bufs = callBuffers.get()
    val (sqlLen, paramsLen) = bufs.encode(sql, args)
    bufs.out.clear()
    val rc = FastCalls.ferry_fast_query(
        handle, target, bufs.input, sqlLen, paramsLen, FastCalls.COMPACT, bufs.out, CallBuffers.OUT_CAP, bufs.len,
    )
    return when (rc) {
        FastCalls.OK -> {
            val out = bufs.out
            out.clear().limit(bufs.len[0])
            decodeRows(out)
        }
        FastCalls.MORE -> {
            val n = bufs.len[0]
            val big = CallBuffers.direct(n)
            check(FastCalls.ferry_fast_take(big, n) == n) { "the fast call's long result went missing" }
            decodeRows(big)
        }
        else -> failed()
    }
}

private fun fastExecute(handle: Long, target: Byte, sql: String, args: List<Any?>): Long {
    val bufs = callBuffers.get()
    val (sqlLen, paramsLen) = bufs.encode(sql, args)
    val rc = FastCalls.ferry_fast_execute(handle, target, bufs.input, sqlLen, paramsLen, FastCalls.COMPACT, bufs.changed)
    if (rc != FastCalls.OK) failed()
    return bufs.changed[0]
}

/** Runs a query with Kotlin values (or [SqlValue]s) as [args]; rows as [Row]s. */
internal fun Replica.queryRows(sql: String, args: List<Any?>): List<Row> =
    callWithHandle { fastQuery(it, FastCalls.REPLICA, sql, args) }

/** [Replica.queryRows] inside the transaction (sees its writes). */
internal fun WriteTransaction.queryRows(sql: String, args: List<Any?>): List<Row> =
    callWithHandle { fastQuery(it, FastCalls.TRANSACTION, sql, args) }

/** Runs one statement as its own write transaction; returns rows changed. */
internal fun Replica.executeValues(sql: String, args: List<Any?>): Long =
    callWithHandle { fastExecute(it, FastCalls.REPLICA, sql, args) }

/** Runs one statement inside the transaction; returns rows changed. */
internal fun WriteTransaction.executeValues(sql: String, args: List<Any?>): Long =
    callWithHandle { fastExecute(it, FastCalls.TRANSACTION, sql, args) }
