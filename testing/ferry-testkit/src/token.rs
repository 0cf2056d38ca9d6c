//! Tokens for the test relays, signed with their shared HS256 secret.

use ferry_relay::auth::{Claims, mint_hs256, now_secs};
use std::time::Duration;

/// The HS256 secret every test relay is configured with.
pub const SECRET: &str = "test-secret-test-secret-test-secret!";

/// A token's claims, built up from a subject; [`Token::mint`] signs them.
#[derive(Debug, Clone)]
pub struct Token(Claims);

impl Token {
    /// A token for `sub` that reads and writes nothing and expires in an hour.
    pub fn new(sub: &str) -> Token {
        Token(Claims {
            sub: sub.into(),
            exp: now_secs() + 3600,
            read: vec![],
            write: vec![],
            primary: vec![],
            iss: None,
            aud: None,
            nbf: None,
            iat: None,
        })
    }

    /// Scopes it may read.
    pub fn read<S: AsRef<str>>(mut self, scopes: &[S]) -> Token {
        self.0.read = scopes.iter().map(|s| s.as_ref().to_owned()).collect();
        self
    }

    /// Scopes it may write.
    pub fn write<S: AsRef<str>>(mut self, scopes: &[S]) -> Token {
        self.0.write = scopes.iter().map(|s| s.as_ref().to_owned()).collect();
        self
    }

    /// Read-only tables it may write as their primary.
    pub fn primary<S: AsRef<str>>(mut self, tables: &[S]) -> Token {
        self.0.primary = tables.iter().map(|s| s.as_ref().to_owned()).collect();
        self
    }

    /// Expires at `exp` (seconds since the epoch; may be in the past).
    pub fn expires_at(mut self, exp: u64) -> Token {
        self.0.exp = exp;
        self
    }

    /// Issuer and audience claims.
    pub fn issued(mut self, iss: &str, aud: &str) -> Token {
        self.0.iss = Some(iss.into());
        self.0.aud = Some(aud.into());
        self
    }

    /// The claims as they stand.
    pub fn claims(&self) -> &Claims {
        &self.0
    }

    /// Signs the claims with [`SECRET`].
    pub fn mint(&self) -> String {
        mint_hs256(SECRET.as_bytes(), &self.0).expect("mint a test token")
    }
}

/// A token valid for `ttl`.
pub fn token_for(sub: &str, read: &[&str], write: &[&str], ttl: Duration) -> String {
    token_until(sub, read, write, now_secs() + ttl.as_secs())
}

/// A token that expires at `exp` (seconds since the epoch; may be in the past).
pub fn token_until(sub: &str, read: &[&str], write: &[&str], exp: u64) -> String {
    Token::new(sub)
        .read(read)
        .write(write)
        .expires_at(exp)
        .mint()
}

/// A token that reads and writes everything, for an hour.
pub fn admin_token(sub: &str) -> String {
    Token::new(sub).read(&["*"]).write(&["*"]).mint()
}
