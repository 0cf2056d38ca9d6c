//! A compact binary form of parameters and rows, for hosts that read bytes faster than JSON.
//!
//! The packed JSON form (`packed.rs`) suits Python, whose `json` module is C; Kotlin on the
//! JVM has no JSON reader of its own but reads a `ByteBuffer` at memory speed, and JNA's
//! marshalling of UniFFI's buffers by value costs most of a point read (docs/benchmarks.md).
//! So the fast call path (`fast.rs`) also speaks this form. Everything is little-endian:
//!
//! - a value is a tag byte and its payload: `0` NULL; `1` INTEGER, 8 bytes two's complement;
//!   `2` REAL, 8 bytes IEEE 754; `3` TEXT, a `u32` byte length and UTF-8; `4` BLOB, a `u32`
//!   length and the bytes;
//! - parameters are a `u32` count and that many values;
//! - results are a `u32` column count, each name as a `u32` length and UTF-8, a `u32` row
//!   count, and the rows' values, row after row.
//!
//! The reader checks every length against what is left and every text for UTF-8, so a
//! malformed buffer is an `InvalidInput` error, never a read past its end.

use crate::error::{FerryError, Result};
use ferry_core as core;

const NULL: u8 = 0;
const INTEGER: u8 = 1;
const REAL: u8 = 2;
const TEXT: u8 = 3;
const BLOB: u8 = 4;

fn invalid(reason: &str) -> FerryError {
    FerryError::InvalidInput {
        reason: format!("compact parameters: {reason}"),
    }
}

/// A cursor over untrusted bytes.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.rest.len() {
            return Err(invalid("ends early"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn len(&mut self) -> Result<usize> {
        usize::try_from(u32::from_le_bytes(self.array()?)).map_err(|_| invalid("length"))
    }

    fn value(&mut self) -> Result<core::Value> {
        let [tag] = self.array()?;
        Ok(match tag {
            NULL => core::Value::Null,
            INTEGER => core::Value::Integer(i64::from_le_bytes(self.array()?)),
            REAL => core::Value::Real(f64::from_le_bytes(self.array()?)),
            TEXT => {
                let n = self.len()?;
                let text = std::str::from_utf8(self.take(n)?)
                    .map_err(|_| invalid("a text value is not UTF-8"))?;
                core::Value::Text(text.to_owned())
            }
            BLOB => {
                let n = self.len()?;
                core::Value::Blob(self.take(n)?.to_vec())
            }
            other => return Err(invalid(&format!("unknown value tag {other}"))),
        })
    }
}

/// The parameters of one statement (see the module docs).
pub(crate) fn params(bytes: &[u8]) -> Result<Vec<core::Value>> {
    let mut r = Reader { rest: bytes };
    let n = r.len()?;
    // Each value takes at least its tag byte: a count beyond that is a lie, not an allocation.
    if n > r.rest.len() {
        return Err(invalid("more values announced than bytes sent"));
    }
    let values = (0..n).map(|_| r.value()).collect::<Result<Vec<_>>>()?;
    if !r.rest.is_empty() {
        return Err(invalid("bytes after the last value"));
    }
    Ok(values)
}

fn put_len(out: &mut Vec<u8>, n: usize) -> Result<()> {
    let n = u32::try_from(n).map_err(|_| FerryError::InvalidInput {
        reason: "a result over 4 GiB cannot cross in the compact form".into(),
    })?;
    out.extend_from_slice(&n.to_le_bytes());
    Ok(())
}

/// Query results in the compact form (see the module docs).
pub(crate) fn rows(r: &core::Rows) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(16 + r.rows.len() * r.columns.len() * 12);
    put_len(&mut out, r.columns.len())?;
    for c in &r.columns {
        put_len(&mut out, c.len())?;
        out.extend_from_slice(c.as_bytes());
    }
    put_len(&mut out, r.rows.len())?;
    for v in r.rows.iter().flatten() {
        match v {
            core::Value::Null => out.push(NULL),
            core::Value::Integer(n) => {
                out.push(INTEGER);
                out.extend_from_slice(&n.to_le_bytes());
            }
            core::Value::Real(f) => {
                out.push(REAL);
                out.extend_from_slice(&f.to_le_bytes());
            }
            core::Value::Text(t) => {
                out.push(TEXT);
                put_len(&mut out, t.len())?;
                out.extend_from_slice(t.as_bytes());
            }
            core::Value::Blob(b) => {
                out.push(BLOB);
                put_len(&mut out, b.len())?;
                out.extend_from_slice(b);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode_params(values: &[core::Value]) -> Vec<u8> {
        // The row encoder writes values the way parameters are written, after its header.
        let encoded = rows(&core::Rows {
            columns: vec![],
            rows: vec![values.to_vec()],
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let mut out = (values.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&encoded[8..]);
        out
    }

    fn value() -> impl Strategy<Value = core::Value> {
        prop_oneof![
            Just(core::Value::Null),
            any::<i64>().prop_map(core::Value::Integer),
            any::<f64>()
                .prop_filter("NaN is not equal to itself", |f| !f.is_nan())
                .prop_map(core::Value::Real),
            ".{0,40}".prop_map(core::Value::Text),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(core::Value::Blob),
        ]
    }

    proptest! {
        #[test]
        fn values_round_trip(values in proptest::collection::vec(value(), 0..12)) {
            prop_assert_eq!(params(&encode_params(&values))?, values);
        }

        #[test]
        fn malformed_bytes_are_refused_never_read_past(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            // Whatever the bytes, an answer: values or InvalidInput.
            if let Err(e) = params(&bytes) {
                prop_assert!(matches!(e, FerryError::InvalidInput { .. }), "{e}");
            }
        }
    }

    #[test]
    fn truncations_and_lies_are_named() {
        let good = encode_params(&[core::Value::Text("héllo".into()), core::Value::Integer(-3)]);
        for cut in 0..good.len() {
            assert!(params(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = good.clone();
        extra.push(0);
        assert!(params(&extra).is_err());
        assert!(params(&[0xff, 0xff, 0xff, 0xff]).is_err(), "a huge count");
        assert!(params(&[1, 0, 0, 0, 9]).is_err(), "an unknown tag");
        assert!(
            params(&[1, 0, 0, 0, TEXT, 1, 0, 0, 0, 0xff]).is_err(),
            "not UTF-8"
        );
        let r = rows(&core::Rows {
            columns: vec!["a".into(), "b".into()],
            rows: vec![vec![core::Value::Null, core::Value::Real(0.5)]],
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            r,
            [
                &[
                    2, 0, 0, 0, 1, 0, 0, 0, b'a', 1, 0, 0, 0, b'b', 1, 0, 0, 0, NULL, REAL
                ][..],
                &0.5f64.to_le_bytes()
            ]
            .concat()
        );
    }
}
