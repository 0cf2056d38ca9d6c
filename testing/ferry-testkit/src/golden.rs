//! Golden files: bytes frozen as hex in the repository, so a change to a wire frame or a stored
//! form is a visible decision. `FERRY_BLESS=1` rewrites a file after a deliberate change.

use std::path::Path;

/// Checks `bytes` against the hex file at `path` (rewriting it first when `FERRY_BLESS` is
/// set); `what` names the frozen thing in the failure.
pub fn check(path: &Path, bytes: &[u8], what: &str) {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if std::env::var("FERRY_BLESS").is_ok() {
        std::fs::write(path, format!("{hex}\n"))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
    let want = std::fs::read_to_string(path)
        .unwrap_or_else(|_| panic!("missing golden file {}", path.display()));
    assert_eq!(
        hex,
        want.trim(),
        "{what} changed: it is frozen in {}",
        path.display()
    );
}

/// The bytes of the hex file at `path`.
pub fn read(path: &Path) -> Vec<u8> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|_| panic!("missing golden file {}", path.display()));
    let hex: String = text.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex digits"))
        .collect()
}
