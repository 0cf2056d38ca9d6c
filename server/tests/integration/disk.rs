//! Storage that fills up or turns read-only, for real: the relay's data folder and a
//! replica's file live on small tmpfs mounts that the test shrinks, grows and remounts
//! read-only. The relay and the replica report a clear error, lose nothing, and recover by
//! themselves once space (or write access) returns.
//!
//! Mounting needs root (CAP_SYS_ADMIN), which this project's machines and CI have; the test
//! fails with a clear message where it is missing.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::{Error, Replica, Value};
use ferry_testkit::relay::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A tmpfs mounted for the test, unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn new(path: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(path).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "mounting a tmpfs at {} failed: this test needs root (CAP_SYS_ADMIN)",
            path.display()
        );
        Mount(path.to_path_buf())
    }

    fn remount(&self, opts: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success(), "remount {opts} failed");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn blob(n: usize, tag: usize) -> Value {
    Value::Text(format!("{tag:06}").repeat(n / 6))
}

fn count(r: &Replica, sql: &str) -> i64 {
    match &r.query(sql, &[]).unwrap().rows[0][0] {
        Value::Integer(n) => *n,
        other => panic!("{other:?}"),
    }
}

#[test]
fn relay_disk_full_refuses_cleanly_and_recovers() {
    let d = tempfile::tempdir().unwrap();
    let relay_dir = d.path().join("relay");
    let data = Mount::new(&relay_dir.join("data"), "3m");
    let relay = RelayProc::start_with(&relay_dir, "[checksums]\nenabled = false\n");
    let url = relay.url();
    let writer = open(d.path(), "w.db");
    let hw = connect(&writer, &url, admin_token("w"));
    let reader = open(d.path(), "r.db");
    let hr = connect(&reader, &url, admin_token("r"));
    // 60 change sets of ~100 KiB: more than the 3 MiB the relay has.
    for k in 0..60 {
        writer
            .execute(
                "INSERT INTO note (id, body, n) VALUES (?1, ?2, 1)",
                &[Value::Text(format!("n{k}")), blob(100_000, k)],
            )
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let err = loop {
        let st = hw.status();
        // Reported as an upload error (what a status bar shows), not only as the last error;
        // downloads are not failing.
        if let Some(e) = st
            .upload_error
            .as_ref()
            .filter(|e| e.message.contains("storage"))
        {
            assert_eq!(st.last_error.as_ref(), Some(e), "{st:?}");
            assert!(st.download_error.is_none(), "{st:?}");
            break e.message.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no storage error reported: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(err.contains("full or read-only"), "{err}");
    let stuck = hw.status().pending;
    assert!(stuck > 0, "everything fit: make the blobs bigger");
    // The relay keeps serving: what it acknowledged reaches the reader.
    let acked = 60 - stuck as i64;
    eventually(
        "reader gets what was acknowledged",
        Duration::from_secs(30),
        || count(&reader, "SELECT count(*) FROM note") >= acked,
    );
    // Space returns: the relay takes the rest by itself, nothing lost or duplicated.
    data.remount("size=64m");
    wait_synced(&hw);
    wait_synced(&hr);
    let st = hw.status();
    assert!(
        st.upload_error.is_none(),
        "cleared once pushes are taken again: {st:?}"
    );
    assert_eq!(count(&reader, "SELECT count(*) FROM note"), 60);
    assert_eq!(reader.dump().unwrap(), writer.dump().unwrap());
    check_log(&relay);
    eprintln!("relay disk full: {stuck} of 60 change sets waited for space; error: {err}");
}

#[test]
fn replica_disk_full_and_read_only_fail_clearly_and_recover() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let disk = Mount::new(&d.path().join("device"), "1m");
    let r = Arc::new(Replica::open(disk.0.join("app.db"), &schema()).unwrap());
    // Fill the device.
    let mut written = 0;
    let full = loop {
        match r.execute(
            "INSERT INTO note (id, body, n) VALUES (?1, ?2, 1)",
            &[Value::Text(format!("n{written}")), blob(20_000, written)],
        ) {
            Ok(_) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 1000, "the 1 MiB device never filled up");
    };
    assert!(matches!(full, Error::StorageFull(_)), "{full}");
    assert!(full.to_string().contains("nothing was written"), "{full}");
    assert_eq!(count(&r, "SELECT count(*) FROM note"), written as i64);
    // Space returns: writing and syncing go on; nothing committed was lost.
    disk.remount("size=64m");
    r.execute(
        "INSERT INTO note (id, body, n) VALUES ('after-full', 'x', 1)",
        &[],
    )
    .unwrap();
    // Storage mounted read-only (no file can be open for writing while it is remounted, so
    // the app is closed first): opening fails clearly or writes do; nothing changes.
    let before = count(&r, "SELECT count(*) FROM note");
    r.close().unwrap();
    drop(r);
    disk.remount("ro");
    let ro = match Replica::open(disk.0.join("app.db"), &schema()) {
        Err(e) => e,
        Ok(r) => r
            .execute("INSERT INTO note (id, body, n) VALUES ('ro', 'x', 1)", &[])
            .unwrap_err(),
    };
    assert!(
        matches!(ro, Error::StorageReadOnly(_) | Error::CannotOpen(_)),
        "{ro}"
    );
    disk.remount("rw");
    let r = Arc::new(Replica::open(disk.0.join("app.db"), &schema()).unwrap());
    assert_eq!(count(&r, "SELECT count(*) FROM note"), before);
    r.execute(
        "INSERT INTO note (id, body, n) VALUES ('after-ro', 'x', 1)",
        &[],
    )
    .unwrap();
    let h = connect(&r, &relay.url(), admin_token("device"));
    wait_synced(&h);
    let other = open(d.path(), "other.db");
    let ho = connect(&other, &relay.url(), admin_token("other"));
    wait_synced(&ho);
    assert_eq!(
        count(&other, "SELECT count(*) FROM note"),
        written as i64 + 2
    );
    assert_eq!(other.dump().unwrap(), r.dump().unwrap());
    eprintln!("replica: full after {written} rows ({full}); read-only: {ro}");
}
