//! The hot calls — a query or a one-statement write — as plain C functions, one foreign call
//! each.
//!
//! A generated UniFFI call lowers every argument into a Rust buffer (in Python each is a
//! separate call into the library, in Kotlin JNA marshals each buffer as a structure by
//! value), clones the object's handle through another call, and frees the result through one
//! more. For a point read that overhead is several times SQLite's own cost (docs/benchmarks.md),
//! so the bindings' `select`/`exec` helpers call these functions instead:
//!
//! - `handle` is a UniFFI handle of a [`Replica`] or [`WriteTransaction`] cloned for this
//!   call, which the call consumes, exactly as a generated method does (a pointer to the object
//!   inside its `Arc`, as uniffi 0.32 makes it; the version is pinned) — Kotlin clones it in
//!   the generated `callWithHandle`; or the object's own handle lent for the call
//!   ([`BORROWED`]), as Python passes it;
//! - the statement and its parameters come as one byte range (`sql_len` bytes of UTF-8, then
//!   `params_len` bytes of parameters in `format`: packed JSON (`packed.rs`), the compact
//!   binary form (`compact.rs`), or packed JSON answered in Python's `marshal` form
//!   (`marshal.rs`); none at all means no parameters);
//! - the result is written into the caller's buffer; one that does not fit is kept for this
//!   thread and [`MORE`] says how long it is: the caller fetches it with
//!   [`ferry_fast_take`];
//! - a failure is kept for this thread and [`FAILED`] returned: the caller then calls the
//!   generated `fast_call_error()`, which raises it as the typed `FerryError` (a panic is
//!   raised as UniFFI's internal error, as in any generated call) — errors are still mapped in
//!   one place and lowered by UniFFI.
//!
//! This is the crate's only unsafe code; each entry point's safety contract is the caller's
//! and is written on it. Swift uses the generated calls (not built on this machine).
#![allow(unsafe_code)]

use crate::error::{FerryError, Result};
use crate::num::Signed;
use crate::replica::Replica;
use crate::transaction::WriteTransaction;
use ferry_core as core;
use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

/// The call succeeded; its answer is in the caller's buffer (or in `changed`).
pub const OK: i32 = 0;
/// The answer is longer than the caller's buffer: its length is in `out_len`; fetch it with
/// [`ferry_fast_take`] into a buffer that long.
pub const MORE: i32 = 1;
/// The call failed: `fast_call_error()` raises why.
pub const FAILED: i32 = 2;

/// The handle is a [`Replica`]'s.
const REPLICA: u8 = 0;
/// The handle is a [`WriteTransaction`]'s.
const TRANSACTION: u8 = 1;
/// Added to a target: the handle is the object's own, borrowed for the call rather than
/// cloned for it (the call takes its own reference and releases it). Saves a host the clone
/// call; the host must keep the object, so its handle, alive until the call returns — Python
/// does, as the object is an argument of the calling frame.
const BORROWED: u8 = 0x80;

/// Parameters and results as packed JSON (`packed.rs`).
const PACKED: u8 = 0;
/// Parameters and results in the compact binary form (`compact.rs`).
const COMPACT: u8 = 1;
/// Parameters as packed JSON, results in Python's `marshal` form (`marshal.rs`).
const MARSHAL: u8 = 2;

enum Failure {
    Error(FerryError),
    Panic(String),
}

thread_local! {
    /// A result that did not fit the caller's buffer, until [`ferry_fast_take`].
    static WAITING: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Why this thread's last fast call failed, until `fast_call_error()`.
    static FAILURE: RefCell<Option<Failure>> = const { RefCell::new(None) };
}

/// Raises the failure of this thread's last fast call (see the module docs): `Ok` when none
/// is waiting.
#[uniffi::export]
pub fn fast_call_error() -> Result<()> {
    match FAILURE.with(|f| f.borrow_mut().take()) {
        None => Ok(()),
        Some(Failure::Error(e)) => Err(e),
        // Raised where UniFFI turns it into the host's internal error, as for any call.
        Some(Failure::Panic(message)) => panic!("{message}"),
    }
}

/// What a call takes: the statement and its parameters, read from the caller's bytes.
struct Call<'a> {
    sql: &'a str,
    params: Vec<core::Value>,
    format: u8,
}

impl<'a> Call<'a> {
    fn read(input: &'a [u8], sql_len: u32, format: u8) -> Result<Self> {
        let at = usize::try_from(sql_len)
            .unwrap_or(usize::MAX)
            .min(input.len());
        let (sql, params) = input.split_at(at);
        let sql = std::str::from_utf8(sql).map_err(|_| FerryError::InvalidInput {
            reason: "the statement is not UTF-8".into(),
        })?;
        let params = match format {
            // No bytes: no parameters, in either form.
            PACKED | COMPACT | MARSHAL if params.is_empty() => Vec::new(),
            PACKED | MARSHAL => {
                crate::packed::params(std::str::from_utf8(params).map_err(|_| {
                    FerryError::InvalidInput {
                        reason: "packed parameters are not UTF-8".into(),
                    }
                })?)?
            }
            COMPACT => crate::compact::params(params)?,
            other => {
                return Err(FerryError::InvalidInput {
                    reason: format!("unknown parameter format {other}"),
                });
            }
        };
        Ok(Call {
            sql,
            params,
            format,
        })
    }

    fn encode(&self, rows: &core::Rows) -> Result<Vec<u8>> {
        match self.format {
            COMPACT => crate::compact::rows(rows),
            MARSHAL => crate::marshal::rows(rows),
            _ => crate::packed::rows(rows).map(String::into_bytes),
        }
    }
}

/// Runs `body`, keeping its failure (or panic) for `fast_call_error()`.
fn guarded<T>(body: impl FnOnce() -> Result<T>) -> Option<T> {
    FAILURE.with(|f| f.borrow_mut().take());
    let failure = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(value)) => return Some(value),
        Ok(Err(e)) => Failure::Error(e),
        Err(panic) => Failure::Panic(
            panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic in a fast call".into()),
        ),
    };
    FAILURE.with(|f| *f.borrow_mut() = Some(failure));
    None
}

/// The object behind a handle, as a reference of this call's own (dropped, so released, when
/// the call ends).
///
/// # Safety
/// `handle` is a UniFFI handle of an object of type `T`: made by `clone_<object>` for this
/// call and used once, or, when `borrowed`, one that stays alive until the call returns.
unsafe fn owned<T>(handle: u64, borrowed: bool) -> Arc<T> {
    let ptr = handle as *const T;
    // SAFETY: the caller's contract; UniFFI's handles of Rust objects are `Arc::into_raw`.
    unsafe {
        if borrowed {
            Arc::increment_strong_count(ptr);
        }
        Arc::from_raw(ptr)
    }
}

/// The caller's input bytes.
///
/// # Safety
/// `ptr` points to `len` readable bytes (or `len` is 0).
unsafe fn input<'a>(ptr: *const u8, len: u64) -> &'a [u8] {
    match usize::try_from(len) {
        Ok(len) if len > 0 && !ptr.is_null() => {
            // SAFETY: the caller's contract.
            unsafe { std::slice::from_raw_parts(ptr, len) }
        }
        _ => &[],
    }
}

/// Delivers `answer` into the caller's buffer, or keeps it for [`ferry_fast_take`].
///
/// # Safety
/// `out` points to `out_cap` writable bytes (or `out_cap` is 0); `out_len` is writable.
unsafe fn deliver(answer: Option<Vec<u8>>, out: *mut u8, out_cap: u32, out_len: *mut u32) -> i32 {
    let Some(bytes) = answer else {
        return FAILED;
    };
    let Ok(len) = u32::try_from(bytes.len()) else {
        FAILURE.with(|f| {
            *f.borrow_mut() = Some(Failure::Error(FerryError::InvalidInput {
                reason: "a result over 4 GiB cannot cross the fast path".into(),
            }));
        });
        return FAILED;
    };
    // SAFETY: the caller's contract.
    unsafe { *out_len = len };
    if len <= out_cap && !out.is_null() {
        // SAFETY: `len` bytes fit the caller's `out_cap` writable bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), out, bytes.len()) };
        OK
    } else {
        WAITING.with(|w| *w.borrow_mut() = bytes);
        MORE
    }
}

/// What every entry point takes first: the object's handle and the call's bytes.
struct Raw {
    handle: u64,
    borrowed: bool,
    input: *const u8,
    sql_len: u32,
    params_len: u32,
    format: u8,
}

impl Raw {
    /// Reads the call and runs `body` on the object, keeping a failure for
    /// `fast_call_error()`; the handle is released when it returns.
    ///
    /// # Safety
    /// `handle` is a handle of a `T` cloned for this call (or borrowed: see [`owned`]); `input` points to
    /// `sql_len + params_len` readable bytes.
    unsafe fn run<T, R>(self, body: impl FnOnce(&T, &Call<'_>) -> Result<R>) -> Option<R> {
        // SAFETY: the caller's contract.
        let (object, bytes) = unsafe {
            (
                owned::<T>(self.handle, self.borrowed),
                input(
                    self.input,
                    u64::from(self.sql_len) + u64::from(self.params_len),
                ),
            )
        };
        // The handle is released inside the guard: were it the last reference, a panic while
        // dropping the object would otherwise unwind through `extern "C"`.
        guarded(move || {
            let object = object;
            body(&object, &Call::read(bytes, self.sql_len, self.format)?)
        })
    }
}

/// Runs a query; see the module docs for the arguments and answers. `target` says what
/// `handle` is: [`REPLICA`], or [`TRANSACTION`] (the query sees the transaction's writes).
///
/// # Safety
/// `handle` is a handle of the object `target` names, cloned for this call (consumed) or,
/// with [`BORROWED`], alive until the call returns;
/// `input` points to `sql_len + params_len` readable bytes; `out` to `out_cap` writable bytes;
/// `out_len` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_fast_query(
    handle: u64,
    target: u8,
    input: *const u8,
    sql_len: u32,
    params_len: u32,
    format: u8,
    out: *mut u8,
    out_cap: u32,
    out_len: *mut u32,
) -> i32 {
    let raw = Raw {
        handle,
        borrowed: target & BORROWED != 0,
        input,
        sql_len,
        params_len,
        format,
    };
    // SAFETY: the caller's contract.
    unsafe {
        let answer = match target & !BORROWED {
            REPLICA => {
                raw.run(|r: &Replica, call| call.encode(&r.core().query(call.sql, &call.params)?))
            }
            TRANSACTION => raw.run(|tx: &WriteTransaction, call| {
                call.encode(&tx.inner.lock().query(call.sql, &call.params)?)
            }),
            other => unknown_target(other),
        };
        deliver(answer, out, out_cap, out_len)
    }
}

/// Runs one statement — as its own write transaction on a [`REPLICA`], or inside a
/// [`TRANSACTION`] — and stores the rows it changed in `changed`.
///
/// # Safety
/// `handle` is a handle of the object `target` names, cloned for this call (consumed) or,
/// with [`BORROWED`], alive until the call returns;
/// `input` points to `sql_len + params_len` readable bytes; `changed` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_fast_execute(
    handle: u64,
    target: u8,
    input: *const u8,
    sql_len: u32,
    params_len: u32,
    format: u8,
    changed: *mut i64,
) -> i32 {
    let raw = Raw {
        handle,
        borrowed: target & BORROWED != 0,
        input,
        sql_len,
        params_len,
        format,
    };
    // SAFETY: the caller's contract.
    unsafe {
        let answer = match target & !BORROWED {
            REPLICA => {
                raw.run(|r: &Replica, call| Ok(r.core().execute(call.sql, &call.params)?.signed()))
            }
            TRANSACTION => raw.run(|tx: &WriteTransaction, call| {
                Ok(tx.inner.lock().execute(call.sql, &call.params)?.signed())
            }),
            other => unknown_target(other),
        };
        match answer {
            Some(n) => {
                *changed = n;
                OK
            }
            None => FAILED,
        }
    }
}

/// A call naming no object type Ferry knows: refused (its handle cannot be released without
/// knowing its type, so it stays held — a host bug, reported as such).
fn unknown_target<R>(target: u8) -> Option<R> {
    guarded(|| {
        Err(FerryError::InvalidInput {
            reason: format!("unknown fast-call target {target}"),
        })
    })
}

/// Copies this thread's waiting result (after [`MORE`]) into `out` and forgets it; returns
/// the bytes copied (0 when none waits or `out_cap` is too small, the result then kept).
///
/// # Safety
/// `out` points to `out_cap` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_fast_take(out: *mut u8, out_cap: u32) -> u32 {
    WAITING.with(|w| {
        let mut w = w.borrow_mut();
        match u32::try_from(w.len()) {
            Ok(len) if len > 0 && len <= out_cap && !out.is_null() => {
                // SAFETY: `len` bytes fit the caller's `out_cap` writable bytes.
                unsafe { std::ptr::copy_nonoverlapping(w.as_ptr(), out, w.len()) };
                *w = Vec::new();
                len
            }
            _ => 0,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(dir: &std::path::Path) -> Arc<Replica> {
        let schema = crate::schema_from_json(
            r#"{"version": 1, "tables": [{"name": "t", "primary_key": "id", "columns": [
                {"name": "id", "column_type": "text", "policy": "lww"},
                {"name": "n", "column_type": "integer", "policy": "lww"}]}]}"#
                .into(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        Replica::open(dir.join("r.db").display().to_string(), schema)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn call(sql: &str, params: &[u8]) -> Vec<u8> {
        [sql.as_bytes(), params].concat()
    }

    /// A handle cloned for one call, as UniFFI's `clone_<object>` makes it.
    fn handle<T>(o: &Arc<T>) -> u64 {
        Arc::into_raw(Arc::clone(o)) as u64
    }

    /// A query on `h` (a handle of the object `target` names); its code and whole answer.
    ///
    /// # Safety
    /// `h` is cloned for the call, or lent (`BORROWED`) by an owner alive across it.
    unsafe fn query_at(
        h: u64,
        target: u8,
        sql: &str,
        params: &[u8],
        format: u8,
        cap: u32,
    ) -> (i32, Vec<u8>) {
        let input = call(sql, params);
        let mut out = vec![0u8; cap as usize];
        let mut len = 0u32;
        // SAFETY: the handle as the caller promises; the buffers are as long as said.
        let rc = unsafe {
            ferry_fast_query(
                h,
                target,
                input.as_ptr(),
                sql.len() as u32,
                params.len() as u32,
                format,
                out.as_mut_ptr(),
                cap,
                &mut len,
            )
        };
        if rc == MORE {
            out = vec![0u8; len as usize];
            // SAFETY: a buffer of the announced length.
            assert_eq!(unsafe { ferry_fast_take(out.as_mut_ptr(), len) }, len);
        }
        out.truncate(len as usize);
        (rc, out)
    }

    /// A statement on `h`; its code and the rows it changed.
    ///
    /// # Safety
    /// As [`query_at`].
    unsafe fn execute_at(h: u64, target: u8, sql: &str, params: &[u8], format: u8) -> (i32, i64) {
        let input = call(sql, params);
        let mut changed = 0;
        // SAFETY: the handle as the caller promises; the input is as long as said.
        let rc = unsafe {
            ferry_fast_execute(
                h,
                target,
                input.as_ptr(),
                sql.len() as u32,
                params.len() as u32,
                format,
                &mut changed,
            )
        };
        (rc, changed)
    }

    fn query(r: &Arc<Replica>, sql: &str, params: &[u8], format: u8, cap: u32) -> (i32, Vec<u8>) {
        // SAFETY: a handle cloned for the call.
        unsafe { query_at(handle(r), REPLICA, sql, params, format, cap) }
    }

    #[test]
    fn writes_and_reads_in_both_forms_with_results_longer_than_the_buffer() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let r = replica(dir.path());
        // SAFETY: a handle cloned for the call.
        let done = unsafe {
            execute_at(
                handle(&r),
                REPLICA,
                "INSERT INTO t(id, n) VALUES (?, ?)",
                br#"["a",7]"#,
                PACKED,
            )
        };
        assert_eq!(done, (OK, 1));
        let (rc, out) = query(&r, "SELECT id, n FROM t", b"[]", PACKED, 4096);
        assert_eq!(rc, OK);
        assert_eq!(
            String::from_utf8_lossy(&out),
            r#"{"c":["id","n"],"r":[["a",7]],"x":false}"#
        );
        let (rc, out) = query(
            &r,
            "SELECT id, n FROM t WHERE n = ?",
            &[1, 0, 0, 0, 1, 7, 0, 0, 0, 0, 0, 0, 0],
            COMPACT,
            4,
        );
        assert_eq!(rc, MORE);
        let rows = crate::compact::rows(&core::Rows {
            columns: vec!["id".into(), "n".into()],
            rows: vec![vec![core::Value::Text("a".into()), core::Value::Integer(7)]],
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out, rows);

        let tx = r.begin_write().unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: handles cloned for the calls.
        let done = unsafe {
            execute_at(
                handle(&tx),
                TRANSACTION,
                "UPDATE t SET n = n + 1",
                b"",
                COMPACT,
            )
        };
        assert_eq!(done, (OK, 1));
        // The transaction's own query sees its write.
        // SAFETY: as above.
        let (rc, out) =
            unsafe { query_at(handle(&tx), TRANSACTION, "SELECT n FROM t", b"", PACKED, 64) };
        assert_eq!(rc, OK);
        assert_eq!(
            String::from_utf8_lossy(&out),
            r#"{"c":["n"],"r":[[8]],"x":false}"#
        );
        tx.commit().unwrap_or_else(|e| panic!("{e}"));
        let (_, out) = query(&r, "SELECT n FROM t", b"[]", PACKED, 4096);
        assert_eq!(
            String::from_utf8_lossy(&out),
            r#"{"c":["n"],"r":[[8]],"x":false}"#
        );
        // Every call released the handle it was given.
        assert_eq!((Arc::strong_count(&r), Arc::strong_count(&tx)), (1, 1));
    }

    #[test]
    fn a_failure_is_raised_typed_by_the_next_fast_call_error() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let r = replica(dir.path());
        let (rc, _) = query(&r, "SELECT nope FROM t", b"[]", PACKED, 64);
        assert_eq!(rc, FAILED);
        assert!(matches!(
            fast_call_error(),
            Err(FerryError::InvalidInput { .. })
        ));
        assert!(fast_call_error().is_ok(), "raised once");
        let (rc, _) = query(&r, "SELECT 1", b"[", PACKED, 64);
        assert_eq!(rc, FAILED);
        assert!(matches!(
            fast_call_error(),
            Err(FerryError::InvalidInput { .. })
        ));
        let (rc, _) = query(&r, "SELECT 1", b"[]", 9, 64);
        assert_eq!(rc, FAILED);
        assert!(matches!(
            fast_call_error(),
            Err(FerryError::InvalidInput { .. })
        ));
        let mut changed = 0;
        // SAFETY: an unknown target never touches the handle (a null one here).
        let rc = unsafe { ferry_fast_execute(0, 7, std::ptr::null(), 0, 0, PACKED, &mut changed) };
        assert_eq!(rc, FAILED);
        assert!(
            matches!(fast_call_error(), Err(FerryError::InvalidInput { reason }) if reason.contains("target 7"))
        );
        // A closed replica says so, as the generated call does.
        r.close_database().unwrap_or_else(|e| panic!("{e}"));
        let (rc, _) = query(&r, "SELECT 1", b"[]", PACKED, 64);
        assert_eq!(rc, FAILED);
        assert!(matches!(fast_call_error(), Err(FerryError::Closed { .. })));
        assert_eq!(
            Arc::strong_count(&r),
            1,
            "failed calls released their handles too"
        );
    }

    #[test]
    fn a_borrowed_handle_is_left_as_it_was_and_marshal_answers_python() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let r = replica(dir.path());
        let own = Arc::as_ptr(&r) as u64;
        let lent = REPLICA | BORROWED;
        let sql = "INSERT INTO t(id, n) VALUES ('a', 5000000000)";
        // SAFETY: `r` keeps the lent handle alive across the calls.
        let done = unsafe { execute_at(own, lent, sql, b"", MARSHAL) };
        assert_eq!(done, (OK, 1));
        // SAFETY: as above.
        let (rc, out) = unsafe {
            query_at(
                own,
                lent,
                "SELECT id, n FROM t WHERE n > ?",
                b"[1]",
                MARSHAL,
                128,
            )
        };
        assert_eq!(rc, OK);
        let expected = crate::marshal::rows(&core::Rows {
            columns: vec!["id".into(), "n".into()],
            rows: vec![vec![
                core::Value::Text("a".into()),
                core::Value::Integer(5_000_000_000),
            ]],
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out, expected);
        assert_eq!(
            Arc::strong_count(&r),
            1,
            "the borrowed handle is not released"
        );
        // SAFETY: as above.
        let (rc, _) = unsafe { execute_at(own, lent, "nope", b"", MARSHAL) };
        assert_eq!(rc, FAILED);
        assert!(fast_call_error().is_err());
        assert_eq!(Arc::strong_count(&r), 1, "nor after a failure");
    }
}
