//! Query results in the form Python's `marshal.loads` reads, for the Python binding.
//!
//! A point read's result decoded from packed JSON and turned into row objects cost Python
//! more than SQLite's whole read (docs/benchmarks.md): `marshal.loads` is C, makes the row
//! tuples itself and reads this form at memory speed. So the fast call path (`fast.rs`) can
//! answer a query as the marshalled tuple `(column_names, rows)`, `column_names` a tuple of
//! `str` and `rows` a list of tuples of `None`/`int`/`float`/`str`/`bytes`.
//!
//! Only the oldest, simplest type codes are written (each readable by every CPython since 3.4,
//! no back-references): `N` None; `i` a 32-bit integer; `l` a longer integer as base-2¹⁵
//! digits, least significant first, the digit count signed by the value's sign; `g` a binary
//! double; `u` a UTF-8 string; `s` bytes; `(` a tuple and `[` a list, each with its length —
//! every length and count a little-endian `i32`. `marshal`'s format is CPython's own and not
//! promised stable, so the binding checks at import that its Python reads this form back as
//! expected, and uses packed JSON when it does not (`bindings/python/ferry/_direct.py`).

use crate::error::{FerryError, Result};
use ferry_core as core;

const NONE: u8 = b'N';
const INT: u8 = b'i';
const LONG: u8 = b'l';
const FLOAT: u8 = b'g';
const STR: u8 = b'u';
const BYTES: u8 = b's';
const TUPLE: u8 = b'(';
const LIST: u8 = b'[';

fn put_len(out: &mut Vec<u8>, n: usize) -> Result<()> {
    let n = i32::try_from(n).map_err(|_| FerryError::InvalidInput {
        reason: "a result with over 2 GiB in one value or 2³¹ rows cannot cross to Python".into(),
    })?;
    out.extend_from_slice(&n.to_le_bytes());
    Ok(())
}

fn put_int(out: &mut Vec<u8>, n: i64) {
    if let Ok(small) = i32::try_from(n) {
        out.push(INT);
        out.extend_from_slice(&small.to_le_bytes());
        return;
    }
    // |n| > 2³¹ here, so at most five 15-bit digits (2⁶³ < 2⁷⁵) and at least three.
    let mut magnitude = n.unsigned_abs();
    let mut digits = [0u16; 5];
    let mut count = 0usize;
    while magnitude > 0 {
        digits[count] = (magnitude & 0x7fff) as u16;
        magnitude >>= 15;
        count += 1;
    }
    let signed = if n < 0 { -(count as i32) } else { count as i32 };
    out.push(LONG);
    out.extend_from_slice(&signed.to_le_bytes());
    for d in &digits[..count] {
        out.extend_from_slice(&d.to_le_bytes());
    }
}

fn put_value(out: &mut Vec<u8>, v: &core::Value) -> Result<()> {
    match v {
        core::Value::Null => out.push(NONE),
        core::Value::Integer(n) => put_int(out, *n),
        core::Value::Real(f) => {
            out.push(FLOAT);
            out.extend_from_slice(&f.to_le_bytes());
        }
        core::Value::Text(t) => {
            out.push(STR);
            put_len(out, t.len())?;
            out.extend_from_slice(t.as_bytes());
        }
        core::Value::Blob(b) => {
            out.push(BYTES);
            put_len(out, b.len())?;
            out.extend_from_slice(b);
        }
    }
    Ok(())
}

/// Query results as the marshalled `(column_names, rows)` (see the module docs).
pub(crate) fn rows(r: &core::Rows) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(32 + r.rows.len() * (5 + r.columns.len() * 12));
    out.push(TUPLE);
    put_len(&mut out, 2)?;
    out.push(TUPLE);
    put_len(&mut out, r.columns.len())?;
    for c in &r.columns {
        out.push(STR);
        put_len(&mut out, c.len())?;
        out.extend_from_slice(c.as_bytes());
    }
    out.push(LIST);
    put_len(&mut out, r.rows.len())?;
    for row in &r.rows {
        out.push(TUPLE);
        put_len(&mut out, row.len())?;
        for v in row {
            put_value(&mut out, v)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(v: core::Value) -> Vec<u8> {
        let mut out = Vec::new();
        put_value(&mut out, &v).unwrap_or_else(|e| panic!("{e}"));
        out
    }

    // The bytes CPython's `marshal.dumps(value, 2)` writes for the same values (checked in
    // Python 3.11; the binding's tests read every kind back through `marshal.loads`).
    #[test]
    fn values_are_written_as_cpython_writes_them() {
        assert_eq!(one(core::Value::Null), b"N");
        assert_eq!(one(core::Value::Integer(-2)), b"i\xfe\xff\xff\xff");
        assert_eq!(
            one(core::Value::Integer(1 << 40)),
            b"l\x03\x00\x00\x00\x00\x00\x00\x00\x00\x04"
        );
        assert_eq!(
            one(core::Value::Integer(i64::MIN)),
            b"l\xfb\xff\xff\xff\x00\x00\x00\x00\x00\x00\x00\x00\x08\x00"
        );
        assert_eq!(
            one(core::Value::Real(0.5)),
            b"g\x00\x00\x00\x00\x00\x00\xe0\x3f"
        );
        assert_eq!(
            one(core::Value::Text("é".into())),
            b"u\x02\x00\x00\x00\xc3\xa9"
        );
        assert_eq!(
            one(core::Value::Blob(vec![1, 2])),
            b"s\x02\x00\x00\x00\x01\x02"
        );
    }

    #[test]
    fn results_are_a_pair_of_names_and_row_tuples() {
        let r = rows(&core::Rows {
            columns: vec!["a".into()],
            rows: vec![vec![core::Value::Null], vec![core::Value::Integer(7)]],
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            r,
            b"(\x02\x00\x00\x00(\x01\x00\x00\x00u\x01\x00\x00\x00a[\x02\x00\x00\x00(\x01\x00\x00\x00N(\x01\x00\x00\x00i\x07\x00\x00\x00"
        );
    }

    /// The sample `bindings/python/ferry/_direct.py` reads back at import: the writer is
    /// pinned here, the reader there, on the same bytes.
    #[test]
    fn the_sample_the_python_binding_checks_at_import() {
        let r = rows(&core::Rows {
            columns: vec!["a".into()],
            rows: vec![vec![
                core::Value::Null,
                core::Value::Integer(-2),
                core::Value::Integer(1 << 40),
                core::Value::Integer(i64::MIN),
                core::Value::Real(0.5),
                core::Value::Text("é".into()),
                core::Value::Blob(vec![1, 2]),
            ]],
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            r,
            b"(\x02\x00\x00\x00(\x01\x00\x00\x00u\x01\x00\x00\x00a[\x01\x00\x00\x00(\x07\x00\x00\x00Ni\xfe\xff\xff\xffl\x03\x00\x00\x00\x00\x00\x00\x00\x00\x04l\xfb\xff\xff\xff\x00\x00\x00\x00\x00\x00\x00\x00\x08\x00g\x00\x00\x00\x00\x00\x00\xe0?u\x02\x00\x00\x00\xc3\xa9s\x02\x00\x00\x00\x01\x02"
        );
    }
}
