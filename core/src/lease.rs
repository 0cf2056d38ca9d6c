//! Leases with fencing tokens: the rules, shared by every store and the in-memory sequencer.
//!
//! A lease is a named lock the relay grants for a time-to-live measured on the relay's clock
//! only (a client's clock never decides expiry). Each grant gets a fencing token larger than
//! every earlier grant of that name, and a change set written under a lease carries its
//! token ([`crate::changeset::Fence`]). The relay sequences such a change set only while the
//! token is the current, unexpired grant held by the pushing replica — so a holder that was
//! paused past its TTL (a stop-the-world pause, a frozen VM) and wakes up believing it still
//! holds the lease cannot overwrite what the next holder wrote: its change set is refused and
//! rolled back on its device.
//!
//! The state per name is one small record; stores persist it in the same transaction that
//! sequences change sets, so a fence check and a grant are totally ordered.
//!
//! Lease names are chosen by clients, so records of names nobody uses any more must not pile
//! up: a record expired for longer than [`FORGET_AFTER_MS`] is deleted, a few at a time by
//! each later lease request ([`FORGET_PER_REQUEST`], so the work is bounded and paid by those
//! who create records). Forgetting must not let a token be granted twice: a store keeps the
//! largest token it ever forgot (the *floor*), and a name without a record starts above it.
//! A write fenced by a forgotten grant finds no record and is refused as never granted.

use crate::changeset::Fence;
use crate::error::{Error, Result};
use crate::ids::ReplicaId;
use crate::protocol::{LeaseOutcome, LeaseRequest};

/// Longest time-to-live a lease may be granted for (24 hours).
pub const MAX_TTL_MS: u64 = 24 * 3600 * 1000;

/// How long after its expiry a lease record is kept (7 days): a holder that comes back
/// within it is told `Lost` with the current token rather than being granted afresh.
pub const FORGET_AFTER_MS: u64 = 7 * 24 * 3600 * 1000;

/// How many long-expired records one lease request deletes at most.
pub const FORGET_PER_REQUEST: usize = 4;

/// The relay time (ms) before which an expired record may be forgotten at `now_ms`.
pub fn forget_before(now_ms: u64) -> u64 {
    now_ms.saturating_sub(FORGET_AFTER_MS)
}

/// The stored state of one lease name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseState {
    /// Fencing token of the latest grant.
    pub token: u64,
    /// Replica holding it.
    pub holder: ReplicaId,
    /// Relay clock (ms) at which it expires.
    pub expires_ms: u64,
}

impl LeaseState {
    fn live(&self, now_ms: u64) -> bool {
        self.expires_ms > now_ms
    }
}

/// Checks a lease name: 1–128 bytes, printable, no control characters.
pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(Error::InvalidInput(format!(
            "lease name {name:?} must be 1 to 128 bytes of printable text"
        )));
    }
    Ok(())
}

/// Checks a request before deciding it (name and TTL bounds).
pub fn validate(req: &LeaseRequest) -> Result<()> {
    match req {
        LeaseRequest::Acquire { name, ttl_ms } | LeaseRequest::Renew { name, ttl_ms, .. } => {
            validate_name(name)?;
            if *ttl_ms == 0 || *ttl_ms > MAX_TTL_MS {
                return Err(Error::InvalidInput(format!(
                    "lease ttl of {ttl_ms} ms is outside 1..={MAX_TTL_MS} ms"
                )));
            }
            Ok(())
        }
        LeaseRequest::Release { name, .. } => validate_name(name),
    }
}

/// Decides a (validated) request by `holder` at relay time `now_ms` against the current
/// state; `floor` is the largest token of any record the store forgot (0 if none). Returns
/// the answer and the new state to store, if it changed.
pub fn decide(
    now_ms: u64,
    state: Option<LeaseState>,
    floor: u64,
    holder: ReplicaId,
    req: &LeaseRequest,
) -> (LeaseOutcome, Option<LeaseState>) {
    let current = |s: Option<LeaseState>| s.map_or(floor, |s| s.token);
    match req {
        LeaseRequest::Acquire { name, ttl_ms } => match state {
            Some(s) if s.live(now_ms) && s.holder != holder => (
                LeaseOutcome::Busy {
                    name: name.clone(),
                    retry_after_ms: s.expires_ms - now_ms,
                },
                None,
            ),
            _ => {
                let next = LeaseState {
                    token: current(state) + 1,
                    holder,
                    expires_ms: now_ms.saturating_add(*ttl_ms),
                };
                (
                    LeaseOutcome::Granted {
                        name: name.clone(),
                        token: next.token,
                        ttl_ms: *ttl_ms,
                    },
                    Some(next),
                )
            }
        },
        LeaseRequest::Renew {
            name,
            token,
            ttl_ms,
        } => match state {
            Some(s) if s.token == *token && s.holder == holder && s.live(now_ms) => {
                let next = LeaseState {
                    expires_ms: now_ms.saturating_add(*ttl_ms),
                    ..s
                };
                (
                    LeaseOutcome::Granted {
                        name: name.clone(),
                        token: s.token,
                        ttl_ms: *ttl_ms,
                    },
                    Some(next),
                )
            }
            _ => (
                LeaseOutcome::Lost {
                    name: name.clone(),
                    current: current(state),
                },
                None,
            ),
        },
        LeaseRequest::Release { name, token } => match state {
            Some(s) if s.token == *token && s.holder == holder && s.live(now_ms) => (
                LeaseOutcome::Released { name: name.clone() },
                Some(LeaseState {
                    expires_ms: now_ms,
                    ..s
                }),
            ),
            _ => (
                LeaseOutcome::Lost {
                    name: name.clone(),
                    current: current(state),
                },
                None,
            ),
        },
    }
}

/// Checks a change set's fence at relay time `now_ms`: the token must be the current grant,
/// unexpired and held by the change set's origin. The error explains which part failed.
pub fn check_fence(
    now_ms: u64,
    state: Option<LeaseState>,
    fence: &Fence,
    origin: ReplicaId,
) -> std::result::Result<(), String> {
    let name = &fence.lease;
    match state {
        None => Err(format!("lease `{name}` was never granted")),
        Some(s) if s.token > fence.token => Err(format!(
            "fencing token {} of lease `{name}` is stale: a newer grant (token {}) exists",
            fence.token, s.token
        )),
        Some(s) if s.token != fence.token || s.holder != origin => Err(format!(
            "fencing token {} of lease `{name}` was not granted to this replica",
            fence.token
        )),
        Some(s) if !s.live(now_ms) => Err(format!(
            "lease `{name}` (token {}) expired {} ms ago by the relay's clock",
            fence.token,
            now_ms - s.expires_ms
        )),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn acquire(name: &str, ttl_ms: u64) -> LeaseRequest {
        LeaseRequest::Acquire {
            name: name.into(),
            ttl_ms,
        }
    }

    #[test]
    fn tokens_grow_and_expiry_is_by_the_given_clock() {
        let (a, b) = (ReplicaId([1; 16]), ReplicaId([2; 16]));
        let (out, s1) = decide(1000, None, 0, a, &acquire("l", 100));
        assert!(matches!(out, LeaseOutcome::Granted { token: 1, .. }));
        let (out, none) = decide(1050, s1, 0, b, &acquire("l", 100));
        assert!(matches!(
            out,
            LeaseOutcome::Busy {
                retry_after_ms: 50,
                ..
            }
        ));
        assert!(none.is_none());
        let fence = Fence {
            lease: "l".into(),
            token: 1,
        };
        assert!(check_fence(1099, s1, &fence, a).is_ok());
        assert!(check_fence(1099, s1, &fence, b).is_err());
        let (out, s2) = decide(1100, s1, 0, b, &acquire("l", 100));
        assert!(matches!(out, LeaseOutcome::Granted { token: 2, .. }));
        let err = check_fence(1101, s2, &fence, a).unwrap_err();
        assert!(err.contains("stale"), "{err}");
        let renew = LeaseRequest::Renew {
            name: "l".into(),
            token: 1,
            ttl_ms: 100,
        };
        assert!(matches!(
            decide(1101, s2, 0, a, &renew).0,
            LeaseOutcome::Lost { current: 2, .. }
        ));
        let release = LeaseRequest::Release {
            name: "l".into(),
            token: 2,
        };
        let (out, s3) = decide(1150, s2, 0, b, &release);
        assert!(matches!(out, LeaseOutcome::Released { .. }));
        let f2 = Fence {
            lease: "l".into(),
            token: 2,
        };
        assert!(
            check_fence(1150, s3, &f2, b)
                .unwrap_err()
                .contains("expired")
        );
        let (out, _) = decide(1151, s3, 0, a, &acquire("l", 100));
        assert!(matches!(out, LeaseOutcome::Granted { token: 3, .. }));
    }

    #[test]
    fn a_forgotten_name_starts_above_the_floor() {
        let (a, b) = (ReplicaId([1; 16]), ReplicaId([2; 16]));
        // The record of `l` (token 7) was forgotten: the floor is 7.
        let (out, s) = decide(5000, None, 7, b, &acquire("l", 100));
        assert!(matches!(out, LeaseOutcome::Granted { token: 8, .. }));
        let old = Fence {
            lease: "l".into(),
            token: 7,
        };
        assert!(check_fence(5001, s, &old, a).unwrap_err().contains("stale"));
        assert!(
            check_fence(5001, None, &old, a)
                .unwrap_err()
                .contains("never")
        );
        assert_eq!(forget_before(FORGET_AFTER_MS + 10), 10);
        assert_eq!(forget_before(10), 0);
    }

    #[test]
    fn bad_requests_are_named() {
        assert!(validate(&acquire("", 10)).is_err());
        assert!(validate(&acquire("x", 0)).is_err());
        assert!(validate(&acquire("x", MAX_TTL_MS + 1)).is_err());
        assert!(validate(&acquire("a\nb", 10)).is_err());
        assert!(validate(&acquire("ok", 10)).is_ok());
    }
}
