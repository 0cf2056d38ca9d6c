//! The relay's files are its own: the data directory is created `0700` and the SQLite files
//! `0600` (SQLite gives its `-wal` and `-shm` files the database file's mode). They hold
//! every value of every tenant, and the default umask would leave them readable by every
//! user of the machine.

use crate::error::{RelayError, Result};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and its parents) readable by the relay's user only; an existing directory
/// is narrowed to `0700`.
pub fn dir(dir: &Path) -> Result<()> {
    let fail = |e: std::io::Error| {
        RelayError::Store(format!(
            "cannot create data directory {}: {e}",
            dir.display()
        ))
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(fail)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)
}

/// Creates the file at `path` with mode `0600` if it does not exist yet, so that SQLite
/// opens it rather than creating it with the umask's mode.
pub fn file(path: &Path) -> Result<()> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(RelayError::Store(format!(
            "cannot create {}: {e}",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn directories_and_files_are_private() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b");
        dir(&d).unwrap();
        let p = d.join("relay.db");
        file(&p).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&p), 0o600);
        // Idempotent, and an existing file keeps its content.
        std::fs::write(&p, b"x").unwrap();
        file(&p).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"x");
    }
}
