//! Scopes: the partition a row belongs to, which tokens grant read and write access to.
//!
//! A row's scope is the value of its table's scope column, as text: text values as they are,
//! integers in decimal, reals in Rust's shortest round-trip form, blobs in lowercase hex.
//! Rows of tables without a scope column, and rows whose scope column is NULL, are in the
//! global scope, named [`GLOBAL_SCOPE`]. The relay and the clients derive scopes with this one
//! function so that filtering and checksums agree.

use crate::value::Value;

/// The scope of tables without a scope column (and of rows whose scope value is NULL).
pub const GLOBAL_SCOPE: &str = "global";

/// The scope named by a scope column value.
pub fn scope_name(v: &Value) -> String {
    match v {
        Value::Null => GLOBAL_SCOPE.to_owned(),
        Value::Integer(i) => i.to_string(),
        Value::Real(f) => f.to_string(),
        Value::Text(s) => s.clone(),
        Value::Blob(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(scope_name(&Value::Text("list:1".into())), "list:1");
        assert_eq!(scope_name(&Value::Integer(-4)), "-4");
        assert_eq!(scope_name(&Value::Blob(vec![0, 255])), "00ff");
        assert_eq!(scope_name(&Value::Null), GLOBAL_SCOPE);
    }
}
