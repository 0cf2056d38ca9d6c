//! Snapshot resume tokens: where an unfinished snapshot walk stands, sealed so that only a
//! relay of this store made it.
//!
//! A device keeps the token of the last snapshot page it applied and sends it back in its
//! next hello; any relay node over the same store continues the walk after that row, and the
//! device continues the log from the token's position (see ADR 0003). The token names the
//! replica and a digest of the walk's read filter (subject, scopes, and what a back-fill
//! skips), and carries an HMAC-SHA256 under a key kept in the store, so a forged token or
//! another replica's token is refused with a typed error before anything is sent. A genuine
//! token for other scopes (the grants or subscriptions changed since) is stale: the walk
//! starts over.

use crate::store::{ReadFilter, SnapshotKey};
use ferry_core::ReplicaId;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Token format version.
const VERSION: u8 = 1;
/// Bytes of the MAC at the end of a token.
const MAC_BYTES: usize = 32;
/// The largest token accepted (a row key is bounded by the frame size; this bounds the work).
pub const MAX_TOKEN_BYTES: usize = 64 << 10;

#[derive(Debug, Serialize, Deserialize)]
struct Body {
    v: u8,
    replica: ReplicaId,
    read: [u8; 32],
    position: u64,
    after: Option<SnapshotKey>,
}

/// Where a resumed walk continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// The position the device continues the log from.
    pub position: u64,
    /// The walk continues after this row.
    pub after: Option<SnapshotKey>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Too long, cut, or not a token of this format.
    #[error("the snapshot resume token is malformed")]
    Malformed,
    /// The MAC does not match: not made by a relay of this store, or altered.
    #[error("the snapshot resume token was not issued by this relay's store")]
    Forged,
    /// Made for another replica.
    #[error("the snapshot resume token belongs to another replica")]
    Foreign,
    /// Made for a walk of other scopes: the grants or subscriptions changed since.
    #[error("the snapshot resume token is for other scopes than this connection reads")]
    Stale,
}

/// The key tokens are sealed with.
#[derive(Clone)]
pub struct ResumeKey([u8; 32]);

impl std::fmt::Debug for ResumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResumeKey(..)")
    }
}

impl ResumeKey {
    /// A key from the store's secret.
    pub fn new(secret: [u8; 32]) -> Self {
        ResumeKey(secret)
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes a key of any length; this cannot fail.
        <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
    }

    /// The token for a walk of `replica` reading through `filter` that continues after
    /// `after` and whose log continues from `position`.
    pub fn seal(
        &self,
        replica: ReplicaId,
        filter: &ReadFilter,
        position: u64,
        after: Option<SnapshotKey>,
    ) -> Vec<u8> {
        let body = Body {
            v: VERSION,
            replica,
            read: filter.digest(),
            position,
            after,
        };
        let mut out = rmp_serde::to_vec(&body).unwrap_or_default();
        let mut mac = self.mac();
        mac.update(&out);
        out.extend_from_slice(&mac.finalize().into_bytes());
        out
    }

    /// Opens a token sent by `replica` reading through `filter`.
    pub fn open(
        &self,
        token: &[u8],
        replica: ReplicaId,
        filter: &ReadFilter,
    ) -> Result<Resume, TokenError> {
        if token.len() <= MAC_BYTES || token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed);
        }
        let (body, tag) = token.split_at(token.len() - MAC_BYTES);
        let mut mac = self.mac();
        mac.update(body);
        mac.verify_slice(tag).map_err(|_| TokenError::Forged)?;
        let b: Body = rmp_serde::from_slice(body).map_err(|_| TokenError::Malformed)?;
        if b.v != VERSION {
            return Err(TokenError::Malformed);
        }
        if b.replica != replica {
            return Err(TokenError::Foreign);
        }
        if b.read != filter.digest() {
            return Err(TokenError::Stale);
        }
        Ok(Resume {
            position: b.position,
            after: b.after,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;

    fn grants(sub: &str, read: &[&str]) -> ReadFilter {
        ReadFilter::new(Arc::new(crate::auth::reading(sub, read)))
    }

    #[test]
    fn a_token_opens_only_for_its_replica_grants_and_key() {
        let key = ResumeKey::new([7; 32]);
        let g = grants("u", &["list:*"]);
        let me = ReplicaId([1; 16]);
        let after = Some(SnapshotKey {
            scope: "list:a".into(),
            table: "todo".into(),
            pk: vec![1, 2, 3],
        });
        let t = key.seal(me, &g, 42, after.clone());
        assert_eq!(
            key.open(&t, me, &g).unwrap(),
            Resume {
                position: 42,
                after
            }
        );
        assert_eq!(
            ResumeKey::new([8; 32]).open(&t, me, &g),
            Err(TokenError::Forged)
        );
        assert_eq!(
            key.open(&t, ReplicaId([2; 16]), &g),
            Err(TokenError::Foreign)
        );
        assert_eq!(
            key.open(&t, me, &grants("u", &["list:a"])),
            Err(TokenError::Stale)
        );
        let g2 = grants("u", &["list:*"]);
        let held = g2.view().clone();
        assert_eq!(
            key.open(&t, me, &g2.except(held)),
            Err(TokenError::Stale),
            "a back-fill's walk is another walk"
        );
        for i in 0..t.len() {
            let mut bad = t.clone();
            bad[i] ^= 1;
            assert!(key.open(&bad, me, &g).is_err(), "a flipped bit at {i}");
        }
        assert_eq!(key.open(&t[..10], me, &g), Err(TokenError::Malformed));
        assert_eq!(key.open(&[], me, &g), Err(TokenError::Malformed));
    }
}
