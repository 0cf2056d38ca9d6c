//! Tokens and grants: who may read and write which scopes.
//!
//! A token is a JWT with `sub`, `exp`, and three Ferry claims:
//!
//! * `read`: scope patterns the bearer may read;
//! * `write`: scope patterns the bearer may write (a write must also be readable, so write
//!   scopes are effectively a subset of read scopes and a replica's cursor covers every
//!   change it could conflict with);
//! * `primary`: `read_only` tables the bearer may write (a backend or a primary device),
//!   `*` for all.
//!
//! A pattern is a scope name in which `*` matches any run of characters and `{sub}` stands
//! for the token's subject, taken literally (a subject containing `*` matches only itself).
//! Rows of tables without a scope column are in the scope `global`.
//!
//! Development tokens are HS256 with a shared secret; production tokens are RS256 or ES256
//! verified against a JWKS file. Anything else (including `alg: none`) is refused.

use crate::config::AuthConfig;
use crate::error::{RelayError, Result};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, jwk::JwkSet};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::collections::HashMap;

/// The claims Ferry reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Subject (user or device).
    pub sub: String,
    /// Expiry (seconds since the epoch).
    pub exp: u64,
    /// Readable scope patterns.
    #[serde(default)]
    pub read: Vec<String>,
    /// Writable scope patterns.
    #[serde(default)]
    pub write: Vec<String>,
    /// `read_only` tables this token may write.
    #[serde(default)]
    pub primary: Vec<String>,
    /// Issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience: one, or several (as Auth0 and others issue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    /// Not before (seconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at (seconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// A token's `aud`: a string or an array of strings (RFC 7519 §4.1.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// One audience.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl From<&str> for Audience {
    fn from(s: &str) -> Self {
        Audience::One(s.to_owned())
    }
}

/// A key id as it may appear in a message or a log line: printable, escaped, at most 64
/// characters (a token's header is the sender's to choose).
fn shown(kid: &str) -> String {
    let mut s: String = kid
        .chars()
        .take(64)
        .flat_map(char::escape_default)
        .collect();
    if kid.chars().count() > 64 {
        s.push('…');
    }
    s
}

pub use ferry_core::scope::Pattern;
use ferry_core::scope::ScopeSet;

/// What a verified token allows.
#[derive(Debug, Clone)]
pub struct Grants {
    /// Subject.
    pub sub: String,
    /// Expiry (seconds since the epoch).
    pub exp: u64,
    read: Vec<Pattern>,
    write: Vec<Pattern>,
    primary: Vec<String>,
    /// SHA-256 of the subject and the readable patterns as written in the token.
    read_digest: [u8; 32],
}

impl Grants {
    /// Compiles a token's claims.
    pub fn from_claims(c: &Claims) -> Result<Grants> {
        if c.sub.is_empty() {
            return Err(RelayError::Unauthorized("token has an empty `sub`".into()));
        }
        let compile = |v: &[String]| -> Result<Vec<Pattern>> {
            v.iter()
                .map(|p| {
                    Pattern::compile(p, &c.sub).map_err(|e| RelayError::Unauthorized(e.to_string()))
                })
                .collect()
        };
        let mut h = sha2::Sha256::new();
        for part in std::iter::once(&c.sub).chain(&c.read) {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        Ok(Grants {
            sub: c.sub.clone(),
            exp: c.exp,
            read: compile(&c.read)?,
            write: compile(&c.write)?,
            primary: c.primary.clone(),
            read_digest: h.finalize().into(),
        })
    }

    /// A digest of what the bearer may read (subject and read patterns): two tokens with the
    /// same digest read the same scopes.
    pub fn read_digest(&self) -> [u8; 32] {
        self.read_digest
    }

    /// May the bearer read `scope`?
    pub fn can_read(&self, scope: &str) -> bool {
        self.read.iter().any(|p| p.matches(scope))
    }

    /// The scopes the bearer may read.
    pub fn read_set(&self) -> ScopeSet {
        ScopeSet::any_of(self.read.clone())
    }

    /// May the bearer write `scope`? (It must be readable too.)
    pub fn can_write(&self, scope: &str) -> bool {
        self.can_read(scope) && self.write.iter().any(|p| p.matches(scope))
    }

    /// Does the token grant any write scope? One without may store nothing, not even an
    /// empty change set (whose position every reader would be told about).
    pub fn writes_anything(&self) -> bool {
        !self.write.is_empty()
    }

    /// May the bearer take the lease `name`? Lease names are authorized like scopes: the
    /// token must be able to write a scope of that name (a write grant `lease:*` covers
    /// every lease named `lease:…`).
    pub fn may_lease(&self, name: &str) -> bool {
        self.can_write(name)
    }

    /// May the bearer write the `read_only` table `table`?
    pub fn is_primary_for(&self, table: &str) -> bool {
        self.primary.iter().any(|t| t == "*" || t == table)
    }
}

/// Grants of subject `sub` reading `read` (nothing written), for unit tests.
#[cfg(test)]
pub(crate) fn reading(sub: &str, read: &[&str]) -> Grants {
    Grants::from_claims(&Claims {
        sub: sub.into(),
        exp: u64::MAX,
        read: read.iter().map(|s| s.to_string()).collect(),
        write: Vec::new(),
        primary: Vec::new(),
        iss: None,
        aud: None,
        nbf: None,
        iat: None,
    })
    .unwrap_or_else(|e| panic!("test grants: {e}"))
}

/// Verifies tokens with the configured keys.
#[derive(Clone)]
pub struct Verifier {
    hs256: Option<DecodingKey>,
    jwks: HashMap<String, (DecodingKey, Algorithm)>,
    jwks_single: Option<(DecodingKey, Algorithm)>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
    max_lifetime: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("hs256", &self.hs256.is_some())
            .field("jwks_keys", &self.jwks.len())
            .finish()
    }
}

fn install_crypto() {
    // Err means a provider is installed already, which is what we want.
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
}

/// Reads the HS256 secret from the configuration (inline or file).
pub fn hs256_secret(cfg: &AuthConfig) -> Result<Option<Vec<u8>>> {
    let secret = match (&cfg.hs256_secret, &cfg.hs256_secret_file) {
        (Some(_), Some(_)) => {
            return Err(RelayError::Config(
                "auth: set hs256_secret or hs256_secret_file, not both".into(),
            ));
        }
        (Some(s), None) => Some(s.as_bytes().to_vec()),
        (None, Some(p)) => {
            let s = std::fs::read_to_string(p).map_err(|e| {
                RelayError::Config(format!("auth.hs256_secret_file {}: {e}", p.display()))
            })?;
            Some(s.trim_end().as_bytes().to_vec())
        }
        (None, None) => None,
    };
    if let Some(s) = &secret
        && s.len() < 32
    {
        return Err(RelayError::Config(format!(
            "auth: the HS256 secret has {} bytes; use at least 32",
            s.len()
        )));
    }
    Ok(secret)
}

impl Verifier {
    /// Builds from the configuration; at least one key source must be set.
    pub fn from_config(cfg: &AuthConfig) -> Result<Verifier> {
        install_crypto();
        let hs256 = hs256_secret(cfg)?.map(|s| DecodingKey::from_secret(&s));
        let mut jwks = HashMap::new();
        let mut jwks_single = None;
        if let Some(path) = &cfg.jwks_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                RelayError::Config(format!("auth.jwks_file {}: {e}", path.display()))
            })?;
            let set: JwkSet = serde_json::from_str(&text).map_err(|e| {
                RelayError::Config(format!(
                    "auth.jwks_file {} is not a JWKS: {e}",
                    path.display()
                ))
            })?;
            for k in &set.keys {
                let alg = match k.common.key_algorithm.map(|a| a.to_string()).as_deref() {
                    Some("RS256") => Algorithm::RS256,
                    Some("ES256") => Algorithm::ES256,
                    None => match &k.algorithm {
                        jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                        jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => {
                            Algorithm::ES256
                        }
                        _ => {
                            return Err(RelayError::Config(format!(
                                "auth.jwks_file {}: only RSA (RS256) and EC P-256 (ES256) keys are supported",
                                path.display()
                            )));
                        }
                    },
                    Some(other) => {
                        return Err(RelayError::Config(format!(
                            "auth.jwks_file {}: key algorithm {other} is not supported (RS256, ES256)",
                            path.display()
                        )));
                    }
                };
                let key = DecodingKey::from_jwk(k).map_err(|e| {
                    RelayError::Config(format!("auth.jwks_file {}: bad key: {e}", path.display()))
                })?;
                if let Some(kid) = &k.common.key_id {
                    jwks.insert(kid.clone(), (key.clone(), alg));
                }
                if set.keys.len() == 1 {
                    jwks_single = Some((key, alg));
                }
            }
            if set.keys.is_empty() {
                return Err(RelayError::Config(format!(
                    "auth.jwks_file {} holds no keys",
                    path.display()
                )));
            }
        }
        if hs256.is_none() && jwks.is_empty() && jwks_single.is_none() {
            return Err(RelayError::Config(
                "auth: no key configured; set auth.hs256_secret (development) or auth.jwks_file"
                    .into(),
            ));
        }
        Ok(Verifier {
            hs256,
            jwks,
            jwks_single,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            leeway: cfg.leeway.as_secs(),
            max_lifetime: cfg.max_token_lifetime.as_secs(),
        })
    }

    /// Verifies a token and compiles its grants.
    pub fn verify(&self, token: &str) -> Result<Grants> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            RelayError::Unauthorized(format!(
                "token is not a valid JWT ({e}); `alg: none` and unknown algorithms are refused"
            ))
        })?;
        let (key, alg) = match header.alg {
            Algorithm::HS256 => (
                self.hs256.as_ref().ok_or_else(|| {
                    RelayError::Unauthorized("HS256 tokens are not accepted by this relay".into())
                })?,
                Algorithm::HS256,
            ),
            Algorithm::RS256 | Algorithm::ES256 => {
                let (k, a) = match &header.kid {
                    Some(kid) => self.jwks.get(kid).ok_or_else(|| {
                        RelayError::Unauthorized(format!(
                            "token key id `{}` is not in the JWKS",
                            shown(kid)
                        ))
                    })?,
                    None => self.jwks_single.as_ref().ok_or_else(|| {
                        RelayError::Unauthorized(
                            "token has no key id (kid) and the JWKS holds several keys".into(),
                        )
                    })?,
                };
                if *a != header.alg {
                    return Err(RelayError::Unauthorized(format!(
                        "token algorithm {:?} does not match its key ({a:?})",
                        header.alg
                    )));
                }
                (k, *a)
            }
            other => {
                return Err(RelayError::Unauthorized(format!(
                    "token algorithm {other:?} is not accepted (HS256, RS256, ES256)"
                )));
            }
        };
        let mut v = Validation::new(alg);
        v.leeway = self.leeway;
        v.validate_nbf = true;
        // A configured issuer or audience must be present, not merely right when present.
        // Without a configured audience, a token naming one is refused (it was meant for
        // another service: RFC 7519 §4.1.3).
        let mut required = vec!["exp", "sub"];
        if let Some(i) = &self.issuer {
            v.set_issuer(&[i]);
            required.push("iss");
        }
        if let Some(a) = &self.audience {
            v.set_audience(&[a]);
            required.push("aud");
        }
        v.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Claims>(token, key, &v).map_err(|e| {
            RelayError::Unauthorized(match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => "token expired".to_owned(),
                jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                    "token signature is invalid (forged or signed with another key)".to_owned()
                }
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => {
                    "token is not valid yet (nbf)".to_owned()
                }
                jsonwebtoken::errors::ErrorKind::InvalidAudience if self.audience.is_none() => {
                    "token names an audience and this relay has none configured (auth.audience)"
                        .to_owned()
                }
                _ => format!("token refused: {e}"),
            })
        })?;
        self.check_lifetime(&data.claims, now_secs())?;
        Grants::from_claims(&data.claims)
    }

    /// A token lives at most `max_token_lifetime`: from now to `exp`, and from `iat` (which
    /// may not lie in the future beyond the leeway) to `exp`.
    fn check_lifetime(&self, c: &Claims, now: u64) -> Result<()> {
        if let Some(iat) = c.iat
            && iat > now.saturating_add(self.leeway)
        {
            return Err(RelayError::Unauthorized(
                "token issued in the future (iat)".into(),
            ));
        }
        let from = c.iat.unwrap_or(now).min(now);
        if c.exp.saturating_sub(from) > self.max_lifetime {
            return Err(RelayError::Unauthorized(format!(
                "token lives {} s; this relay accepts at most {} s (auth.max_token_lifetime)",
                c.exp.saturating_sub(from),
                self.max_lifetime
            )));
        }
        Ok(())
    }
}

/// Signs a development HS256 token.
pub fn mint_hs256(secret: &[u8], claims: &Claims) -> Result<String> {
    install_crypto();
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| RelayError::Config(format!("cannot sign a token: {e}")))
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn grants(read: &[&str], write: &[&str]) -> Grants {
        Grants::from_claims(&Claims {
            sub: "al*ce".into(),
            exp: u64::MAX,
            read: read.iter().map(|s| s.to_string()).collect(),
            write: write.iter().map(|s| s.to_string()).collect(),
            primary: vec!["prices".into()],
            iss: None,
            aud: None,
            nbf: None,
            iat: None,
        })
        .unwrap()
    }

    #[test]
    fn patterns() {
        let g = grants(
            &["user:{sub}", "team:*", "global"],
            &["user:{sub}", "other"],
        );
        assert!(g.can_read("user:al*ce"));
        assert!(
            !g.can_read("user:alice"),
            "{{sub}} is literal, its * is no wildcard"
        );
        assert!(g.can_read("team:x") && g.can_read("team:"));
        assert!(!g.can_read("teams:x"));
        assert!(g.can_write("user:al*ce"));
        assert!(!g.can_write("other"), "write needs read too");
        assert!(!g.can_write("team:x"));
        assert!(g.is_primary_for("prices") && !g.is_primary_for("todo"));
        let p = Pattern::compile("a*b*c", "s").unwrap();
        assert!(p.matches("abc") && p.matches("aXbYc") && !p.matches("acb"));
        assert!(Pattern::compile("{user}", "s").is_err());
        assert!(Pattern::compile("", "s").is_err());
    }

    #[test]
    fn read_prefixes_cover_every_readable_scope() {
        let g = grants(&["team:*", "user:{sub}", "team:a*", "global", "t*x"], &[]);
        assert_eq!(
            g.read_set().prefixes().unwrap(),
            vec!["global", "t", "user:al*ce"],
            "`team:` and `team:a` are covered by `t`"
        );
        for s in ["team:x", "user:al*ce", "global", "tux"] {
            assert!(g.can_read(s));
            assert!(
                g.read_set()
                    .prefixes()
                    .unwrap()
                    .iter()
                    .any(|p| s.starts_with(p.as_str()))
            );
        }
        assert_eq!(grants(&["a", "*b"], &[]).read_set().prefixes(), None);
        assert_eq!(grants(&[], &[]).read_set().prefixes(), Some(vec![]));
    }

    fn verifier(issuer: Option<&str>, audience: Option<&str>) -> Verifier {
        let cfg = AuthConfig {
            hs256_secret: Some("0123456789abcdef0123456789abcdef".into()),
            issuer: issuer.map(str::to_owned),
            audience: audience.map(str::to_owned),
            ..AuthConfig::default()
        };
        Verifier::from_config(&cfg).unwrap()
    }

    fn claims(now: u64) -> Claims {
        Claims {
            sub: "u".into(),
            exp: now + 600,
            read: vec!["*".into()],
            write: Vec::new(),
            primary: Vec::new(),
            iss: None,
            aud: None,
            nbf: None,
            iat: None,
        }
    }

    fn token(c: &Claims) -> String {
        mint_hs256(b"0123456789abcdef0123456789abcdef", c).unwrap()
    }

    fn refused(v: &Verifier, c: &Claims) -> String {
        match v.verify(&token(c)) {
            Err(RelayError::Unauthorized(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// Issuer and audience are required when configured (not only checked when present),
    /// `aud` may be an array, a token naming an audience is refused by a relay with none,
    /// `nbf` and `iat` are honoured and a token lives at most `max_token_lifetime`.
    #[test]
    fn token_claims_are_checked_as_configured() {
        let now = now_secs();
        let plain = verifier(None, None);
        assert!(plain.verify(&token(&claims(now))).is_ok());
        let strict = verifier(Some("https://id.example"), Some("ferry"));
        let m = refused(&strict, &claims(now));
        assert!(m.contains("iss") || m.contains("aud"), "{m}");
        let mut c = claims(now);
        c.iss = Some("https://id.example".into());
        assert!(refused(&strict, &c).contains("aud"), "aud required");
        c.aud = Some("ferry".into());
        assert!(strict.verify(&token(&c)).is_ok());
        c.aud = Some(Audience::Many(vec!["other".into(), "ferry".into()]));
        assert!(strict.verify(&token(&c)).is_ok(), "aud as an array");
        c.aud = Some(Audience::Many(vec!["other".into()]));
        refused(&strict, &c);
        c.iss = Some("https://evil.example".into());
        c.aud = Some("ferry".into());
        refused(&strict, &c);
        let mut c = claims(now);
        c.aud = Some("someone-else".into());
        assert!(refused(&plain, &c).contains("auth.audience"));
        let mut c = claims(now);
        c.nbf = Some(now + 120);
        assert!(refused(&plain, &c).contains("nbf"));
        let mut c = claims(now);
        c.iat = Some(now + 120);
        assert!(refused(&plain, &c).contains("iat"));
        let mut c = claims(now);
        c.exp = 1 << 62;
        assert!(refused(&plain, &c).contains("max_token_lifetime"));
        let mut c = claims(now);
        c.iat = Some(now - 3 * 24 * 3600);
        c.exp = now + 600;
        assert!(
            refused(&plain, &c).contains("max_token_lifetime"),
            "issued three days ago for three days"
        );
    }

    /// A key id is the sender's to choose: it reaches messages and logs escaped and cut.
    #[test]
    fn key_ids_are_shown_escaped_and_cut() {
        assert_eq!(shown("k1"), "k1");
        assert_eq!(shown("a\nfake log line"), "a\\nfake log line");
        assert!(!shown("x\u{1b}[31m").contains('\u{1b}'));
        let long = shown(&"k".repeat(500));
        assert!(long.chars().count() <= 65 && long.ends_with('…'));
    }
}
