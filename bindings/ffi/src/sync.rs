//! The sync session: a replica's connection to a relay, its status, and `sync_now`.

use crate::error::{FerryError, Result};
use crate::listeners::{Status, SyncStatusListener};
use crate::num::{self, Signed};
use crate::subscription::Subscription;
use crate::transaction::WriteTransaction;
use crate::types::{LeaseGrant, SyncStatus, core_lease};
use ferry_core as core;
use std::sync::Arc;

/// Tuning of the sync loop (every field has a sensible default).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct SyncOptions {
    /// First reconnect delay.
    #[uniffi(default = 200)]
    pub backoff_min_ms: i64,
    /// Largest reconnect delay.
    #[uniffi(default = 30000)]
    pub backoff_max_ms: i64,
    /// Keep-alive interval.
    #[uniffi(default = 15000)]
    pub ping_interval_ms: i64,
    /// Limit for opening a connection.
    #[uniffi(default = 10000)]
    pub connect_timeout_ms: i64,
    /// Allows `ws://` (unencrypted) to a host other than loopback, e.g. an emulator's host
    /// bridge (`10.0.2.2`) on a trusted network. Off: such URLs are refused (`InvalidInput`).
    #[uniffi(default = false)]
    pub allow_insecure: bool,
    /// Extra root certificates (PEM) to trust for `wss://`, beyond the operating system's:
    /// a private CA. A PEM without a certificate is `InvalidInput`.
    #[uniffi(default = [])]
    pub ca_certificates_pem: Vec<String>,
    /// Public-key pins, `sha256/<base64 SHA-256 of the SubjectPublicKeyInfo>`: when given,
    /// the relay's certificate chain must hold one of these keys. Pin a backup key too.
    #[uniffi(default = [])]
    pub pinned_keys: Vec<String>,
}

impl TryFrom<SyncOptions> for core::SyncOptions {
    type Error = FerryError;
    fn try_from(o: SyncOptions) -> Result<Self> {
        let bad = |reason: String| Err(FerryError::InvalidInput { reason });
        if o.backoff_max_ms < o.backoff_min_ms {
            return bad(format!(
                "sync options: backoff_max_ms ({}) is below backoff_min_ms ({})",
                o.backoff_max_ms, o.backoff_min_ms
            ));
        }
        for (name, v) in [
            ("ping_interval_ms", o.ping_interval_ms),
            ("connect_timeout_ms", o.connect_timeout_ms),
        ] {
            if v < 100 {
                return bad(format!(
                    "sync options: {name} must be at least 100, got {v}"
                ));
            }
        }
        Ok(core::SyncOptions {
            backoff_min: num::millis("backoff_min_ms", o.backoff_min_ms)?,
            backoff_max: num::millis("backoff_max_ms", o.backoff_max_ms)?,
            ping_interval: num::millis("ping_interval_ms", o.ping_interval_ms)?,
            connect_timeout: num::millis("connect_timeout_ms", o.connect_timeout_ms)?,
            allow_insecure: o.allow_insecure,
            trust: core::tls::Trust {
                ca_certificates_pem: o.ca_certificates_pem,
                pinned_keys: o.pinned_keys,
            },
            ..core::SyncOptions::default()
        })
    }
}

/// The outcome of `verify()`.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Verification {
    /// True when this replica holds exactly what the relay says it should.
    pub matches: bool,
    /// Relay position both digests describe.
    pub position: i64,
    /// Rows the relay counted.
    pub relay_rows: i64,
    /// Rows this replica counted.
    pub local_rows: i64,
}

/// A running connection to a relay (see `Replica.connect`). Dropping it, `disconnect()` or
/// closing the replica ends it.
#[derive(uniffi::Object)]
pub struct SyncSession {
    handle: core::SyncHandle,
    replica: Arc<core::Replica>,
}

impl SyncSession {
    pub(crate) fn new(handle: core::SyncHandle, replica: Arc<core::Replica>) -> Arc<Self> {
        Arc::new(SyncSession { handle, replica })
    }
}

#[uniffi::export(async_runtime = "tokio")]
impl SyncSession {
    /// The current status.
    pub fn status(&self) -> SyncStatus {
        (&self.handle.status()).into()
    }

    /// Calls `listener` with the current status now and on every change, until the returned
    /// subscription is cancelled or dropped.
    pub fn observe(&self, listener: Arc<dyn SyncStatusListener>) -> Arc<Subscription> {
        Subscription::new(self.handle.observe(Arc::new(Status(listener))))
    }

    /// Stops syncing until `resume()`.
    pub fn pause(&self) {
        self.handle.pause()
    }

    /// Resumes after `pause()`, connecting at once.
    pub fn resume(&self) {
        self.handle.resume()
    }

    /// Disconnects for good.
    pub fn disconnect(&self) {
        self.handle.disconnect()
    }

    /// Syncs `scope` too (a scope name or a `*` pattern the token may read): reconnects, and
    /// the relay back-fills it. When the replica synced every permitted scope, it now syncs
    /// the subscribed ones only.
    pub fn subscribe(&self, scope: String) -> Result<()> {
        Ok(self.handle.subscribe(&scope)?)
    }

    /// Stops syncing `scope`: reconnects; its rows are evicted once pending writes are pushed.
    /// `InvalidInput` when the replica has no subscriptions (it syncs every permitted scope).
    pub fn unsubscribe(&self, scope: String) -> Result<()> {
        Ok(self.handle.unsubscribe(&scope)?)
    }

    /// Replaces the subscriptions (`None`: every scope the token may read) and reconnects.
    pub fn set_subscriptions(&self, subscriptions: Option<Vec<String>>) -> Result<()> {
        Ok(self.handle.set_subscriptions(subscriptions)?)
    }

    /// True once `scope`'s rows are complete on this replica.
    pub fn has_synced(&self, scope: String) -> Result<bool> {
        Ok(self.handle.has_synced(&scope)?)
    }

    /// Waits until `hasSynced(scope)`; `Offline` after `timeout_ms` or when the session ends.
    pub async fn wait_for_first_sync(&self, scope: String, timeout_ms: i64) -> Result<()> {
        let timeout = num::millis("timeout_ms", timeout_ms)?;
        Ok(self.handle.wait_for_first_sync(&scope, timeout).await?)
    }

    /// Completes when nothing is pending and the replica has caught up with the relay's head
    /// as of this call. Fails fast, at the first connection attempt that fails after the
    /// call: `Unauthorized` when the relay refused the token, `Offline` when it could not be
    /// reached (or is restarting), `Protocol` for a relay of an incompatible version; also
    /// `Unauthorized`/`ConflictRejected` when a push was refused, `SchemaOutdated`, and
    /// `Offline` when the session ended. The session keeps retrying in the background: call
    /// again to wait for the next attempt.
    pub async fn sync_now(&self) -> Result<()> {
        Ok(self.handle.try_sync_now().await?)
    }

    /// Commits `tx` and waits for the relay's verdict: the relay position it was sequenced
    /// at, or `ConflictRejected` once it was refused and rolled back.
    pub async fn commit_checked(&self, tx: Arc<WriteTransaction>) -> Result<i64> {
        let id = tx.inner.lock().commit_change()?.ok_or_else(|| FerryError::InvalidInput {
            reason: "the transaction wrote nothing to synced tables: there is no verdict to wait for"
                .into(),
        })?;
        Ok(self.handle.verdict(id).await?.signed())
    }

    /// Waits for the relay's verdict on the change set `change_id` (from `commitChange`).
    pub async fn verdict(&self, change_id: String) -> Result<i64> {
        let id: core::ChangeId = change_id.parse()?;
        Ok(self.handle.verdict(id).await?.signed())
    }

    /// Acquires the lease `name` for `ttl_ms`; `LeaseUnavailable` while another replica
    /// holds it.
    pub async fn acquire_lease(&self, name: String, ttl_ms: i64) -> Result<LeaseGrant> {
        let ttl = num::millis("ttl_ms", ttl_ms)?;
        Ok(self.handle.acquire_lease(&name, ttl).await?.into())
    }

    /// Extends a grant by `ttl_ms` from now; `LeaseUnavailable` when it was lost.
    pub async fn renew_lease(&self, lease: LeaseGrant, ttl_ms: i64) -> Result<LeaseGrant> {
        let ttl = num::millis("ttl_ms", ttl_ms)?;
        Ok(self
            .handle
            .renew_lease(&core_lease(lease)?, ttl)
            .await?
            .into())
    }

    /// Gives a grant up.
    pub async fn release_lease(&self, lease: LeaseGrant) -> Result<()> {
        Ok(self.handle.release_lease(&core_lease(lease)?).await?)
    }

    /// Syncs, then compares this replica's checksum with the relay's.
    pub async fn verify(&self) -> Result<Verification> {
        let v = self.handle.verify(&self.replica).await?;
        Ok(Verification {
            matches: v.matches(),
            position: v.position.signed(),
            relay_rows: v.relay_rows.signed(),
            local_rows: v.local_rows.signed(),
        })
    }
}
