//! TLS in front of a relay, as deployments run it: a throwaway CA made with Debian's
//! `openssl`, and Debian's `nginx` terminating TLS on 127.0.0.1 and passing WebSocket
//! upgrades (and the `Authorization` header) to the relay.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A CA and a server certificate for `localhost` and `127.0.0.1` it signed, in a directory.
#[derive(Debug)]
pub struct TestCa {
    dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (scripts/deps installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestCa {
    /// Makes the CA (`ca.pem`), the server key and certificate (`server.key`, `server.pem`)
    /// and an unrelated key (`other.key`) in `dir`.
    pub fn new(dir: &Path) -> TestCa {
        std::fs::create_dir_all(dir).unwrap();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        let mut ca = vec!["req", "-x509", "-nodes", "-days", "2"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=Ferry test CA",
        ]);
        openssl(dir, &ca);
        let mut req = vec!["req", "-nodes"];
        req.extend(ec);
        req.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        openssl(dir, &req);
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
                "-out",
                "server.pem",
            ],
        );
        openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-out",
                "other.key",
            ],
        );
        TestCa {
            dir: dir.to_owned(),
        }
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.join("ca.pem")).unwrap()
    }

    /// A file in the CA's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The pin of the server certificate's key: `sha256/` and the base64 SHA-256 of its
    /// SubjectPublicKeyInfo, computed by openssl.
    pub fn server_pin(&self) -> String {
        self.pin_of(&["x509", "-in", "server.pem", "-pubkey", "-noout"])
    }

    /// The pin of a key the server does not use.
    pub fn other_pin(&self) -> String {
        self.pin_of(&["pkey", "-in", "other.key", "-pubout"])
    }

    fn pin_of(&self, pubkey: &[&str]) -> String {
        let script = format!(
            "openssl {} | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | openssl base64 -A",
            pubkey.join(" ")
        );
        let out = Command::new("sh")
            .args(["-c", &script])
            .current_dir(&self.dir)
            .output()
            .unwrap();
        assert!(out.status.success());
        format!("sha256/{}", String::from_utf8(out.stdout).unwrap().trim())
    }
}

/// nginx terminating TLS for a relay; stopped when dropped.
#[derive(Debug)]
pub struct TlsProxy {
    child: Child,
    /// Where it listens (127.0.0.1).
    pub addr: SocketAddr,
}

fn nginx_binary() -> &'static str {
    if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    }
}

impl TlsProxy {
    /// Starts nginx in `dir` with the CA's server certificate, in front of the relay at
    /// `upstream`.
    pub fn start(dir: &Path, ca: &TestCa, upstream: SocketAddr) -> TlsProxy {
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let d = dir.display();
        let conf = format!(
            r#"daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"#,
            cert = ca.path("server.pem").display(),
            key = ca.path("server.key").display(),
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("nginx starts (scripts/deps installs it)");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut proxy = TlsProxy { child, addr };
        let started = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                panic!(
                    "nginx exited ({status}): {}",
                    std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "nginx did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        proxy
    }

    /// The relay's URL through the proxy, by host name (`wss://localhost:port/sync`).
    pub fn url(&self) -> String {
        format!("wss://localhost:{}/sync", self.addr.port())
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
