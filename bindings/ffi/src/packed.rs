//! A compact form of parameters and rows for hosts whose generated marshalling is slow.
//!
//! UniFFI lowers a `Vec<SqlValue>` value by value; in Python that is pure-Python code,
//! about 70 µs per call and most of a bulk write's time (docs/benchmarks.md). Here values
//! cross as one JSON string each way, which Python's C-accelerated `json` module writes and
//! reads: `null`, integers, finite floats and text as themselves; a blob as `{"b": "<hex>"}`,
//! a non-finite float as `{"f": "inf" | "-inf" | "nan"}`. Results are
//! `{"c": [columns], "r": [[values], …], "x": bool}`, `x` true when a blob or non-finite float
//! needs decoding (the host then walks the rows; otherwise it takes them as they are).

use crate::error::{FerryError, Result};
use ferry_core as core;
use serde_json::Value as Json;
use serde_json::value::RawValue;
use std::fmt::Write as _;

fn invalid(reason: String) -> FerryError {
    FerryError::InvalidInput { reason }
}

/// One value from its JSON form.
fn value(j: Json) -> Result<core::Value> {
    Ok(match j {
        Json::Null => core::Value::Null,
        Json::Bool(b) => core::Value::Integer(i64::from(b)),
        Json::Number(n) => match n.as_i64() {
            Some(i) => core::Value::Integer(i),
            None => core::Value::Real(
                n.as_f64()
                    .ok_or_else(|| invalid(format!("{n} is not a 64-bit integer or float")))?,
            ),
        },
        Json::String(s) => core::Value::Text(s),
        Json::Object(mut o) => match (o.remove("b"), o.remove("f")) {
            (Some(Json::String(hex)), None) if o.is_empty() => core::Value::Blob(unhex(&hex)?),
            (None, Some(Json::String(f))) if o.is_empty() => core::Value::Real(match f.as_str() {
                "inf" => f64::INFINITY,
                "-inf" => f64::NEG_INFINITY,
                "nan" => f64::NAN,
                other => return Err(invalid(format!("`{other}` is not inf, -inf or nan"))),
            }),
            _ => {
                return Err(invalid(
                    "an object parameter is {\"b\": hex} or {\"f\": …}".into(),
                ));
            }
        },
        Json::Array(_) => return Err(invalid("a parameter is a value, not an array".into())),
    })
}

/// One value from its JSON text. An integer literal beyond 64 bits is refused rather than
/// read as a float, as a JSON number would be.
fn raw_value(raw: &RawValue) -> Result<core::Value> {
    let text = raw.get();
    if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) && !text.contains(['.', 'e', 'E'])
    {
        return text
            .parse::<i64>()
            .map(core::Value::Integer)
            .map_err(|_| invalid(format!("{text} does not fit a 64-bit integer")));
    }
    value(serde_json::from_str(text).map_err(|e| invalid(format!("parameter: {e}")))?)
}

/// The parameters of one statement: a JSON array of values.
pub(crate) fn params(json: &str) -> Result<Vec<core::Value>> {
    let items: Vec<&RawValue> =
        serde_json::from_str(json).map_err(|e| invalid(format!("parameters: {e}")))?;
    items.into_iter().map(raw_value).collect()
}

/// Parameter rows for one statement run many times: a JSON array of arrays.
pub(crate) fn param_rows(json: &str) -> Result<Vec<Vec<core::Value>>> {
    let rows: Vec<Vec<&RawValue>> =
        serde_json::from_str(json).map_err(|e| invalid(format!("parameter rows: {e}")))?;
    rows.into_iter()
        .map(|r| r.into_iter().map(raw_value).collect())
        .collect()
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return Err(invalid("a blob's hex has an odd length".into()));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| invalid("a blob's hex has a non-hex digit".into()))
        })
        .collect()
}

/// Query results in the packed form (see the module docs).
pub(crate) fn rows(r: &core::Rows) -> Result<String> {
    let mut out = String::with_capacity(64 + r.rows.len() * r.columns.len() * 12);
    out.push_str("{\"c\":");
    out.push_str(&serde_json::to_string(&r.columns).map_err(|e| invalid(e.to_string()))?);
    out.push_str(",\"r\":[");
    let mut special = false;
    for (i, row) in r.rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('[');
        for (k, v) in row.iter().enumerate() {
            if k > 0 {
                out.push(',');
            }
            match v {
                core::Value::Null => out.push_str("null"),
                core::Value::Integer(n) => {
                    let _ = write!(out, "{n}");
                }
                core::Value::Real(f) if f.is_finite() => {
                    // `{:?}` keeps a decimal point or exponent, so the host reads a float back.
                    let _ = write!(out, "{f:?}");
                }
                core::Value::Real(f) => {
                    special = true;
                    let name = if f.is_nan() {
                        "nan"
                    } else if *f > 0.0 {
                        "inf"
                    } else {
                        "-inf"
                    };
                    let _ = write!(out, "{{\"f\":\"{name}\"}}");
                }
                core::Value::Text(t) => {
                    out.push_str(&serde_json::to_string(t).map_err(|e| invalid(e.to_string()))?);
                }
                core::Value::Blob(b) => {
                    special = true;
                    out.push_str("{\"b\":\"");
                    for byte in b {
                        let _ = write!(out, "{byte:02x}");
                    }
                    out.push_str("\"}");
                }
            }
        }
        out.push(']');
    }
    out.push_str("],\"x\":");
    out.push_str(if special { "true" } else { "false" });
    out.push('}');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_the_packed_form() {
        let all = vec![
            core::Value::Null,
            core::Value::Integer(i64::MIN),
            core::Value::Integer(7),
            core::Value::Real(1.0),
            core::Value::Real(-2.5e300),
            core::Value::Real(f64::INFINITY),
            core::Value::Text("a \"quoted\" ü\n".into()),
            core::Value::Blob(vec![0, 255, 16]),
        ];
        let packed = rows(&core::Rows {
            columns: vec!["v".into()],
            rows: all.iter().map(|v| vec![v.clone()]).collect(),
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let j: Json = serde_json::from_str(&packed).unwrap_or_else(|e| panic!("{e}: {packed}"));
        assert_eq!(j["x"], Json::Bool(true));
        let back: Vec<core::Value> = j["r"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| value(r[0].clone()).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        assert_eq!(back, all);
        assert!(params(r#"[1, {"b": "0g"}]"#).is_err());
        assert!(params(r#"{"a": 1}"#).is_err());
        assert!(
            params("[100000000000000000000]").is_err(),
            "not silently a float"
        );
        assert_eq!(
            params("[-9223372036854775808, 1e3]").ok(),
            Some(vec![
                core::Value::Integer(i64::MIN),
                core::Value::Real(1000.0)
            ])
        );
        assert_eq!(
            param_rows(r#"[[1, "x"], [null, 2.5]]"#).ok(),
            Some(vec![
                vec![core::Value::Integer(1), core::Value::Text("x".into())],
                vec![core::Value::Null, core::Value::Real(2.5)],
            ])
        );
    }

    proptest::proptest! {
        /// Every finite double reads back exactly as the shortest form Python and Kotlin write
        /// (serde_json's `float_roundtrip`; without it some land one ULP off).
        #[test]
        fn every_finite_double_reads_back_exactly(bits in proptest::prelude::any::<u64>()) {
            let f = f64::from_bits(bits);
            proptest::prop_assume!(f.is_finite());
            let written = format!("[{f:?}]");
            proptest::prop_assert_eq!(params(&written)?, vec![core::Value::Real(f)]);
        }
    }

    #[test]
    fn the_double_python_wrote_and_serde_json_misread() {
        assert_eq!(
            params("[974828409.0177441]").ok(),
            Some(vec![core::Value::Real(974_828_409.017_744_1)])
        );
    }
}
