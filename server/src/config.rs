//! Relay configuration: a TOML file, then environment variables, then command-line flags.
//!
//! Every field has a default so an empty file is valid except for what cannot be guessed
//! (the app schema and a token key). `server/config.example.toml` documents every field;
//! [`Config::validate`] turns each mistake into an error naming the field.

use crate::error::{RelayError, Result};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the relay stores change sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// One embedded SQLite file under the data directory.
    Sqlite,
    /// A PostgreSQL database (connection string).
    Postgres(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Address of the admin listener (`/metrics`, `/readyz`), kept off the sync port. When
    /// unset: loopback, on the sync port + 1 (`127.0.0.1:7071` beside the default; a free
    /// port when the sync port is 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<String>,
    /// Data directory (the SQLite store and the checksum state live here).
    #[serde(default = "default_data")]
    pub data: PathBuf,
    /// `sqlite` (default) or a `postgres://` URL.
    #[serde(default = "default_store")]
    pub store: String,
    /// The app schema as JSON (`ferry_core::Schema`): which tables sync, their scope column,
    /// write mode and delete rule.
    #[serde(default)]
    pub schema: Option<PathBuf>,
    /// Token verification.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// History retention.
    #[serde(default)]
    pub retention: RetentionConfig,
    /// Checksums of what replicas should hold.
    #[serde(default)]
    pub checksums: ChecksumConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
}

/// Token verification.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 shared secret (development; at least 32 bytes).
    #[serde(default)]
    pub hs256_secret: Option<String>,
    /// File holding the HS256 secret.
    #[serde(default)]
    pub hs256_secret_file: Option<PathBuf>,
    /// JWKS file with RS256/ES256 public keys (production).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`, if set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    #[serde(default)]
    pub audience: Option<String>,
    /// Clock leeway for `exp`/`nbf`/`iat` (at most 5 minutes).
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// Longest a token may live, from its `iat` (or now) to its `exp`.
    #[serde(default = "default_max_token_lifetime", with = "humantime_serde")]
    pub max_token_lifetime: Duration,
}

/// Limits protecting the relay and other clients.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest frame accepted (bytes, after decompression).
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
    /// Largest frame accepted on a connection whose upgrade request carried no valid token
    /// (`Authorization: Bearer`), i.e. before its hello is verified: what a stranger can make
    /// the relay buffer per socket. Ferry's SDK presents its token on the upgrade.
    #[serde(default = "default_preauth_frame")]
    pub preauth_frame_bytes: usize,
    /// Largest change set (cell operations).
    #[serde(default = "default_max_ops")]
    pub max_change_set_ops: usize,
    /// Most change sets in one push frame.
    #[serde(default = "default_max_push_sets")]
    pub max_push_sets: usize,
    /// Most bytes of change sets a client keeps pushed and unacknowledged, announced at
    /// welcome: what one connection can put ahead of the relay's answers.
    #[serde(default = "default_push_window")]
    pub push_window_bytes: usize,
    /// Frame bytes of pushes being decoded and sequenced at once, across every connection.
    /// A connection whose push does not fit waits, unread, until earlier ones are answered:
    /// a hundred devices returning with backlogs at the same time cost this much memory
    /// (times the decoded size's factor, about 3), not a hundred push windows.
    #[serde(default = "default_push_memory")]
    pub push_memory_bytes: usize,
    /// TCP send and receive buffer size of client connections (unset: the kernel's
    /// autotuning). Lowers memory per connection; flow control does not depend on it.
    #[serde(default)]
    pub socket_buffer_bytes: Option<usize>,
    /// Most concurrent connections.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most open sockets (upgraded or not) from one IP address, so that one host cannot take
    /// every place. Generous by default: many devices share an address behind carrier NAT.
    /// Behind a reverse proxy every connection comes from the proxy's address: raise it (or
    /// limit at the proxy).
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// Sustained frames per second per connection (above it the relay stops reading).
    #[serde(default = "default_fps")]
    pub frames_per_second: u32,
    /// Burst of frames allowed above the sustained rate.
    #[serde(default = "default_burst")]
    pub frame_burst: u32,
    /// Checksum requests per minute per connection (after a burst of 3); more wait. Each
    /// sums every row the token may read, unless the answer for that position and those
    /// scopes is cached.
    #[serde(default = "default_checksums_per_minute")]
    pub checksums_per_minute: u32,
    /// How far ahead of the relay's clock a change set's HLC may be.
    #[serde(default = "default_skew", with = "humantime_serde")]
    pub max_clock_skew: Duration,
    /// A connection that sends nothing (not even a ping) for this long is closed.
    #[serde(default = "default_idle", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time allowed between connect and a valid hello.
    #[serde(default = "default_hello", with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// Time allowed for a request's HTTP headers to arrive (slowloris): the socket is closed
    /// after it.
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
}

/// History retention.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Change sets kept uncompacted behind the head (0: never compact). New devices start
    /// from a snapshot of the current rows, not from the log, so old history serves only
    /// devices that were away long; compacted, it costs them the current state of what
    /// changed rather than every write.
    #[serde(default = "default_keep")]
    pub keep_change_sets: u64,
    /// How often compaction runs.
    #[serde(default = "default_compact_every", with = "humantime_serde")]
    pub compact_every: Duration,
}

/// Checksums.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChecksumConfig {
    /// Keep a materialized copy of the state so replicas can verify what they hold.
    #[serde(default = "yes")]
    pub enabled: bool,
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    #[serde(default = "default_log_format")]
    pub format: String,
    /// A `tracing` filter (`info`, `ferry_relay=debug`, ...).
    #[serde(default = "default_log_level")]
    pub level: String,
}

fn default_listen() -> String {
    "127.0.0.1:7070".into()
}
fn default_data() -> PathBuf {
    PathBuf::from("ferry-data")
}
fn default_store() -> String {
    "sqlite".into()
}
fn default_preauth_frame() -> usize {
    64 << 10
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_leeway() -> Duration {
    Duration::from_secs(5)
}
fn default_max_token_lifetime() -> Duration {
    Duration::from_secs(24 * 3600)
}
/// The development secret `config.example.toml` shows: refused unless the relay listens on
/// loopback only.
pub const EXAMPLE_SECRET: &str = "change-me-change-me-change-me-change-me";
/// Largest clock leeway accepted for tokens.
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);
fn default_max_frame() -> usize {
    8 << 20
}
fn default_max_ops() -> usize {
    100_000
}
fn default_max_push_sets() -> usize {
    1024
}
fn default_push_window() -> usize {
    4 << 20
}
fn default_push_memory() -> usize {
    16 << 20
}
fn default_max_connections() -> usize {
    20_000
}
fn default_max_connections_per_ip() -> usize {
    1_000
}
fn default_checksums_per_minute() -> u32 {
    12
}
fn default_fps() -> u32 {
    500
}
fn default_burst() -> u32 {
    1000
}
fn default_skew() -> Duration {
    Duration::from_secs(300)
}
fn default_idle() -> Duration {
    Duration::from_secs(90)
}
fn default_hello() -> Duration {
    Duration::from_secs(10)
}
fn default_keep() -> u64 {
    10_000
}
fn default_compact_every() -> Duration {
    Duration::from_secs(600)
}
fn yes() -> bool {
    true
}
fn default_log_format() -> String {
    "text".into()
}
fn default_log_level() -> String {
    "info".into()
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            hs256_secret: None,
            hs256_secret_file: None,
            jwks_file: None,
            issuer: None,
            audience: None,
            leeway: default_leeway(),
            max_token_lifetime: default_max_token_lifetime(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_frame_bytes: default_max_frame(),
            preauth_frame_bytes: default_preauth_frame(),
            max_change_set_ops: default_max_ops(),
            max_push_sets: default_max_push_sets(),
            push_window_bytes: default_push_window(),
            push_memory_bytes: default_push_memory(),
            socket_buffer_bytes: None,
            max_connections: default_max_connections(),
            max_connections_per_ip: default_max_connections_per_ip(),
            checksums_per_minute: default_checksums_per_minute(),
            frames_per_second: default_fps(),
            frame_burst: default_burst(),
            max_clock_skew: default_skew(),
            idle_timeout: default_idle(),
            hello_timeout: default_hello(),
            header_timeout: default_header_timeout(),
        }
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            keep_change_sets: default_keep(),
            compact_every: default_compact_every(),
        }
    }
}

impl Default for ChecksumConfig {
    fn default() -> Self {
        ChecksumConfig { enabled: true }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: default_listen(),
            admin_listen: None,
            data: default_data(),
            store: default_store(),
            schema: None,
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            retention: RetentionConfig::default(),
            checksums: ChecksumConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// Environment variables that override the file (the flags of `ferry-relay serve` override
/// both).
pub const ENV_VARS: &[(&str, &str)] = &[
    ("FERRY_LISTEN", "listen"),
    ("FERRY_DATA", "data"),
    ("FERRY_STORE", "store"),
    ("FERRY_SCHEMA", "schema"),
    ("FERRY_JWT_SECRET", "auth.hs256_secret"),
    ("FERRY_JWKS_FILE", "auth.jwks_file"),
    ("FERRY_LOG", "log.level"),
    ("FERRY_LOG_FORMAT", "log.format"),
];

impl Config {
    /// Reads a TOML file (missing file: an error naming it).
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            RelayError::Config(format!("cannot read config file {}: {e}", path.display()))
        })?;
        let mut c = Self::from_toml(&text).map_err(|e| match e {
            RelayError::Config(m) => RelayError::Config(format!("{}: {m}", path.display())),
            other => other,
        })?;
        // Relative paths in a file are relative to the file, not to wherever the relay runs.
        if let Some(base) = path.parent() {
            let fix = |p: &mut PathBuf| {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            };
            fix(&mut c.data);
            if let Some(p) = c.schema.as_mut() {
                fix(p);
            }
            if let Some(p) = c.auth.jwks_file.as_mut() {
                fix(p);
            }
            if let Some(p) = c.auth.hs256_secret_file.as_mut() {
                fix(p);
            }
        }
        Ok(c)
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Config> {
        toml::from_str(text).map_err(|e| RelayError::Config(e.to_string()))
    }

    /// Applies `FERRY_*` environment overrides from `get` (the process environment in the
    /// binary; a map in tests).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(v) = get("FERRY_LISTEN") {
            self.listen = v;
        }
        if let Some(v) = get("FERRY_DATA") {
            self.data = v.into();
        }
        if let Some(v) = get("FERRY_STORE") {
            self.store = v;
        }
        if let Some(v) = get("FERRY_SCHEMA") {
            self.schema = Some(v.into());
        }
        if let Some(v) = get("FERRY_JWT_SECRET") {
            self.auth.hs256_secret = Some(v);
        }
        if let Some(v) = get("FERRY_JWKS_FILE") {
            self.auth.jwks_file = Some(v.into());
        }
        if let Some(v) = get("FERRY_LOG") {
            self.log.level = v;
        }
        if let Some(v) = get("FERRY_LOG_FORMAT") {
            self.log.format = v;
        }
    }

    /// The store to use.
    pub fn store_kind(&self) -> Result<StoreKind> {
        let s = self.store.trim();
        if s.eq_ignore_ascii_case("sqlite") {
            Ok(StoreKind::Sqlite)
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(StoreKind::Postgres(s.to_owned()))
        } else {
            Err(RelayError::Config(format!(
                "store = `{s}`: expected `sqlite` or a postgres:// URL"
            )))
        }
    }

    /// The listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr> {
        self.listen.parse().map_err(|e| {
            RelayError::Config(format!(
                "listen = `{}` is not an address like 127.0.0.1:7070: {e}",
                self.listen
            ))
        })
    }

    /// The admin listener's address (see `admin_listen`).
    pub fn admin_addr(&self) -> Result<SocketAddr> {
        match &self.admin_listen {
            Some(a) => a.parse().map_err(|e| {
                RelayError::Config(format!(
                    "admin_listen = `{a}` is not an address like 127.0.0.1:7071: {e}"
                ))
            }),
            None => {
                let port = match self.listen_addr()?.port() {
                    0 => 0,
                    p => p.checked_add(1).ok_or_else(|| {
                        RelayError::Config(
                            "listen uses port 65535: set admin_listen explicitly".into(),
                        )
                    })?,
                };
                Ok(SocketAddr::from(([127, 0, 0, 1], port)))
            }
        }
    }

    /// Checks the settings themselves (addresses parse, limits are positive, a schema is
    /// named). What needs the rest of the relay — the schema file, the token keys, the
    /// PostgreSQL URL — is checked by `server::check_config`; this module stays a
    /// leaf that nothing else is reached from.
    pub fn validate(&self) -> Result<()> {
        let listen = self.listen_addr()?;
        let admin = self.admin_addr()?;
        if admin.port() != 0 && admin == listen {
            return Err(RelayError::Config(format!(
                "admin_listen ({admin}) must differ from listen: metrics and readiness stay off the sync port"
            )));
        }
        self.store_kind()?;
        if self.schema.is_none() {
            return Err(RelayError::Config(
                "schema is not set: point it at the app's schema JSON (see `ferry-relay --help`)"
                    .into(),
            ));
        }
        if !["text", "json"].contains(&self.log.format.as_str()) {
            return Err(RelayError::Config(format!(
                "log.format = `{}`: expected `text` or `json`",
                self.log.format
            )));
        }
        if self.auth.hs256_secret.as_deref() == Some(EXAMPLE_SECRET)
            && !self.listen_addr()?.ip().is_loopback()
        {
            return Err(RelayError::Config(format!(
                "auth.hs256_secret is the example's development secret and the relay listens on {}: anyone could mint tokens; set a secret of your own (FERRY_JWT_SECRET or auth.hs256_secret_file)",
                self.listen
            )));
        }
        if self.auth.leeway > MAX_LEEWAY {
            return Err(RelayError::Config(format!(
                "auth.leeway is {:?}; at most {MAX_LEEWAY:?} (a longer one accepts expired tokens)",
                self.auth.leeway
            )));
        }
        if self.auth.max_token_lifetime.is_zero() {
            return Err(RelayError::Config(
                "auth.max_token_lifetime must be positive".into(),
            ));
        }
        let l = &self.limits;
        if l.max_frame_bytes < 4096 {
            return Err(RelayError::Config(
                "limits.max_frame_bytes must be at least 4096".into(),
            ));
        }
        if l.preauth_frame_bytes < 4096 || l.preauth_frame_bytes > l.max_frame_bytes {
            return Err(RelayError::Config(format!(
                "limits.preauth_frame_bytes ({}) must be at least 4096 and at most limits.max_frame_bytes ({})",
                l.preauth_frame_bytes, l.max_frame_bytes
            )));
        }
        if l.push_memory_bytes < l.max_frame_bytes || l.push_memory_bytes > u32::MAX as usize {
            return Err(RelayError::Config(format!(
                "limits.push_memory_bytes ({}) must hold one frame of limits.max_frame_bytes ({}) \
                 and be below 4 GiB",
                l.push_memory_bytes, l.max_frame_bytes
            )));
        }
        if l.max_change_set_ops == 0
            || l.max_push_sets == 0
            || l.max_connections == 0
            || l.push_window_bytes == 0
        {
            return Err(RelayError::Config(
                "limits.max_change_set_ops, max_push_sets, push_window_bytes and max_connections \
                 must be positive"
                    .into(),
            ));
        }
        if l.socket_buffer_bytes.is_some_and(|n| n < 4096) {
            return Err(RelayError::Config(
                "limits.socket_buffer_bytes must be at least 4096".into(),
            ));
        }
        if l.frames_per_second == 0 || l.frame_burst == 0 {
            return Err(RelayError::Config(
                "limits.frames_per_second and frame_burst must be positive".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn empty_file_takes_defaults_and_env_overrides() {
        let mut c = Config::from_toml("").unwrap();
        assert_eq!(c.listen, "127.0.0.1:7070");
        assert_eq!(c.limits.max_clock_skew, Duration::from_secs(300));
        c.apply_env(|k| (k == "FERRY_LISTEN").then(|| "0.0.0.0:9".to_string()));
        assert_eq!(c.listen, "0.0.0.0:9");
    }

    #[test]
    fn the_example_file_parses_to_the_defaults() {
        let c = Config::from_toml(include_str!("../config.example.toml")).unwrap();
        let d = Config::default();
        assert_eq!(c.listen, d.listen);
        assert_eq!(c.limits.max_frame_bytes, d.limits.max_frame_bytes);
        assert_eq!(c.limits.push_memory_bytes, d.limits.push_memory_bytes);
        assert_eq!(c.limits.max_clock_skew, d.limits.max_clock_skew);
        assert_eq!(c.limits.idle_timeout, d.limits.idle_timeout);
        assert_eq!(c.auth.leeway, d.auth.leeway);
        assert_eq!(c.retention.compact_every, d.retention.compact_every);
        assert!(c.checksums.enabled);
    }

    #[test]
    fn mistakes_name_the_field() {
        let e = Config::from_toml("listn = 1").unwrap_err().to_string();
        assert!(e.contains("listn"), "{e}");
        let e = Config::from_toml("[limits]\nmax_clock_skew = \"5 parsecs\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_clock_skew") || e.contains("parsecs"), "{e}");
        let c = Config::from_toml("store = \"mysql://x\"").unwrap();
        assert!(c.store_kind().unwrap_err().to_string().contains("store"));
        let c = Config::from_toml("listen = \"nowhere\"").unwrap();
        assert!(c.listen_addr().unwrap_err().to_string().contains("listen"));
        let c = Config::from_toml("schema = \"s.json\"\n[auth]\nhs256_secret = \"0123456789abcdef0123456789abcdef\"\n[limits]\npush_memory_bytes = 1000").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("push_memory_bytes"), "{e}");
        let base =
            "schema = \"s.json\"\n[auth]\nhs256_secret = \"0123456789abcdef0123456789abcdef\"\n";
        let c = Config::from_toml(&format!("{base}leeway = \"10m\"")).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("auth.leeway"), "{e}");
        let c = Config::from_toml(&format!("{base}max_token_lifetime = \"0s\"")).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("max_token_lifetime"), "{e}");
        let example = format!("schema = \"s.json\"\n[auth]\nhs256_secret = \"{EXAMPLE_SECRET}\"\n");
        let c = Config::from_toml(&format!("listen = \"0.0.0.0:9000\"\n{example}")).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("development secret"), "{e}");
        let c = Config::from_toml(&format!("listen = \"127.0.0.1:9000\"\n{example}")).unwrap();
        c.validate().unwrap();
        let c = Config::from_toml(&format!("{base}max_token_lifetime = \"7d\"")).unwrap();
        assert_eq!(c.auth.max_token_lifetime, Duration::from_secs(7 * 86400));
        for bad in ["100", "16777216"] {
            let c =
                Config::from_toml(&format!("{base}[limits]\npreauth_frame_bytes = {bad}")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("preauth_frame_bytes"), "{e}");
        }
    }
}
