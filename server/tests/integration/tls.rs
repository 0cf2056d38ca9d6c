//! Which relays a device trusts: a relay behind Debian's nginx terminating TLS with a
//! certificate from a throwaway CA (made with openssl). The device trusts the operating
//! system's store (not a list compiled in), the app's own CAs, and refuses a chain without a
//! pinned key when pins are given.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use ferry_core::SyncHandle;
use ferry_testkit::eventually;
use ferry_testkit::relay::*;
use ferry_testkit::tls::{TestCa, TlsProxy};
use std::sync::Arc;
use std::time::Duration;

fn connect_trusting(
    r: &Arc<ferry_core::Replica>,
    url: &str,
    ca: Vec<String>,
    pins: Vec<String>,
) -> SyncHandle {
    let token = admin_token("tls");
    let mut opts = fast_opts();
    opts.trust.ca_certificates_pem = ca;
    opts.trust.pinned_keys = pins;
    r.connect_with(url, Arc::new(move || Ok(token.clone())), opts)
        .unwrap()
}

fn write(r: &ferry_core::Replica, id: &str) {
    r.execute(
        "INSERT INTO todo(id, list, title) VALUES (?1, 'l', 'x')",
        &[ferry_core::Value::Text(id.into())],
    )
    .unwrap();
}

/// Waits until the handle reports a failed connection whose message contains `says`; checks
/// nothing was uploaded.
fn refused(h: &SyncHandle, says: &str) {
    eventually("a refused TLS handshake", Duration::from_secs(20), || {
        h.status()
            .last_error
            .is_some_and(|e| e.message.contains(says))
    });
    assert!(h.status().pending > 0, "nothing was uploaded");
    assert!(h.status().last_synced_at.is_none());
}

#[test]
fn devices_trust_the_os_store_their_own_cas_and_pins() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let ca = TestCa::new(&d.path().join("ca"));
    let proxy = TlsProxy::start(&d.path().join("nginx"), &ca, relay.addr);
    let url = proxy.url();

    // A private CA is in no trust store: the device does not connect.
    let a = open(d.path(), "a.db");
    write(&a, "a1");
    let h = connect_trusting(&a, &url, vec![], vec![]);
    refused(&h, "certificate");
    drop(h);

    // The app trusts its CA: it syncs.
    let h = connect_trusting(&a, &url, vec![ca.ca_pem()], vec![]);
    wait_synced(&h);
    drop(h);

    // A pin of another key: the chain verifies but is refused.
    let b = open(d.path(), "b.db");
    write(&b, "b1");
    let h = connect_trusting(&b, &url, vec![ca.ca_pem()], vec![ca.other_pin()]);
    refused(&h, "pinned");
    drop(h);
    // The server's key among the pins (with a backup key): it syncs.
    let h = connect_trusting(
        &b,
        &url,
        vec![ca.ca_pem()],
        vec![ca.other_pin(), ca.server_pin()],
    );
    wait_synced(&h);
    drop(h);

    // The operating system's store: a process whose store (SSL_CERT_FILE, as an MDM or
    // administrator would install a CA) holds the test CA syncs with default options.
    let bundle = d.path().join("bundle.pem");
    let system = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
    std::fs::write(&bundle, format!("{system}\n{}", ca.ca_pem())).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["tls::child_with_default_trust", "--exact", "--nocapture"])
        .env("SSL_CERT_FILE", &bundle)
        .env("FERRY_TLS_CHILD_URL", &url)
        .env("FERRY_TLS_CHILD_DIR", d.path())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("child synced through the OS store"), "{text}");

    // Everything written reached the relay once trusted.
    let c = open(d.path(), "c.db");
    let h = connect(&c, &relay.url(), admin_token("reader"));
    wait_synced(&h);
    let rows = c.query("SELECT id FROM todo ORDER BY id", &[]).unwrap();
    assert_eq!(rows.rows.len(), 3, "{rows:?}");
}

/// Run by `devices_trust_the_os_store_their_own_cas_and_pins` in a child process whose trust
/// store holds the test CA; does nothing otherwise.
#[test]
fn child_with_default_trust() {
    let (Ok(url), Ok(dir)) = (
        std::env::var("FERRY_TLS_CHILD_URL"),
        std::env::var("FERRY_TLS_CHILD_DIR"),
    ) else {
        return;
    };
    let r = open(std::path::Path::new(&dir), "child.db");
    write(&r, "c1");
    let h = connect_trusting(&r, &url, vec![], vec![]);
    wait_synced(&h);
    println!("child synced through the OS store");
}
