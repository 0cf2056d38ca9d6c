//! Records and enums the host languages see, mirroring core types with `From` impls.
//!
//! Core types carry no FFI attributes (they stay plain Rust); these mirrors are the FFI's
//! vocabulary. Schemas are declared as records, never as strings to parse.

use crate::error::{FerryError, Result};
use crate::num::{self, Signed};
use ferry_core as core;

/// One SQLite value.
#[derive(Debug, Clone, PartialEq, uniffi::Enum)]
pub enum SqlValue {
    /// SQL NULL.
    Null,
    /// 64-bit integer.
    Integer {
        /// The value.
        value: i64,
    },
    /// 64-bit float.
    Real {
        /// The value.
        value: f64,
    },
    /// UTF-8 text.
    Text {
        /// The value.
        value: String,
    },
    /// Bytes.
    Blob {
        /// The value.
        value: Vec<u8>,
    },
}

impl From<core::Value> for SqlValue {
    fn from(v: core::Value) -> Self {
        match v {
            core::Value::Null => SqlValue::Null,
            core::Value::Integer(value) => SqlValue::Integer { value },
            core::Value::Real(value) => SqlValue::Real { value },
            core::Value::Text(value) => SqlValue::Text { value },
            core::Value::Blob(value) => SqlValue::Blob { value },
        }
    }
}

impl From<SqlValue> for core::Value {
    fn from(v: SqlValue) -> Self {
        match v {
            SqlValue::Null => core::Value::Null,
            SqlValue::Integer { value } => core::Value::Integer(value),
            SqlValue::Real { value } => core::Value::Real(value),
            SqlValue::Text { value } => core::Value::Text(value),
            SqlValue::Blob { value } => core::Value::Blob(value),
        }
    }
}

/// Converts host parameters to core values.
pub(crate) fn params(p: Vec<SqlValue>) -> Vec<core::Value> {
    p.into_iter().map(Into::into).collect()
}

/// Query results.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct QueryResult {
    /// Column names, in order.
    pub columns: Vec<String>,
    /// Rows, each with one value per column.
    pub rows: Vec<Vec<SqlValue>>,
}

impl From<core::Rows> for QueryResult {
    fn from(r: core::Rows) -> Self {
        QueryResult {
            columns: r.columns,
            rows: r
                .rows
                .into_iter()
                .map(|row| row.into_iter().map(Into::into).collect())
                .collect(),
        }
    }
}

/// Declares an FFI enum with the same unit variants as a core enum, and `From` both ways.
macro_rules! mirror_enum {
    ($(#[$m:meta])* $name:ident => $core:path { $($(#[$vm:meta])* $v:ident),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
        pub enum $name { $($(#[$vm])* $v),+ }
        impl From<$name> for $core {
            fn from(x: $name) -> Self { match x { $($name::$v => <$core>::$v),+ } }
        }
        impl From<$core> for $name {
            fn from(x: $core) -> Self { match x { $(<$core>::$v => $name::$v),+ } }
        }
    };
}

mirror_enum!(
    /// SQLite type of a declared column.
    ColumnType => core::ColumnType {
        /// TEXT
        Text,
        /// INTEGER
        Integer,
        /// REAL
        Real,
        /// BLOB
        Blob,
        /// No affinity.
        Any,
    }
);

mirror_enum!(
    /// How concurrent writes to a column merge.
    Policy => core::Policy {
        /// Last writer wins on (HLC, origin).
        Lww,
        /// Integer deltas add up; no increment is lost.
        Counter,
        /// Merged as lww; the app's resolver decides on the device whose pending write met it.
        Custom,
    }
);

mirror_enum!(
    /// Who may write a table.
    TableMode => core::TableMode {
        /// Every replica writes (multi-master).
        MultiWriter,
        /// Written by a primary only; read-only everywhere else (master-slave).
        ReadOnly,
        /// The relay accepts a change only if no unseen change touched the same cells.
        ServerChecked,
    }
);

mirror_enum!(
    /// What a delete concurrent with an update does.
    DeleteRule => core::DeleteRule {
        /// The delete wins.
        DeleteWins,
        /// The update wins and the row survives.
        UpdateWins,
    }
);

/// One declared column.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct ColumnDecl {
    /// Column name.
    pub name: String,
    /// SQLite type.
    pub column_type: ColumnType,
    /// Merge policy.
    pub policy: Policy,
    /// NOT NULL constraint.
    #[uniffi(default)]
    pub not_null: bool,
    /// Default for rows that do not set the column.
    #[uniffi(default)]
    pub default_value: Option<SqlValue>,
}

/// One synced table.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct TableDecl {
    /// Table name.
    pub name: String,
    /// Columns, including the primary key.
    pub columns: Vec<ColumnDecl>,
    /// Primary key column (TEXT or BLOB, globally unique: use `new_id()`).
    pub primary_key: String,
    /// Who may write.
    pub mode: TableMode,
    /// Delete vs concurrent update.
    pub delete_rule: DeleteRule,
    /// Column naming the partition (read/write scope) a row belongs to.
    #[uniffi(default)]
    pub scope_column: Option<String>,
}

/// One migration step for local tables and data.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct Migration {
    /// The app schema version this step upgrades to.
    pub version: i32,
    /// SQL statements to run.
    pub sql: String,
}

/// Everything the app declares when it opens a replica.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct Schema {
    /// App schema version (starts at 1, only grows).
    pub version: i32,
    /// Synced tables.
    pub tables: Vec<TableDecl>,
    /// Migrations, run in version order.
    #[uniffi(default)]
    pub migrations: Vec<Migration>,
}

impl TryFrom<Schema> for core::Schema {
    type Error = FerryError;
    fn try_from(s: Schema) -> Result<Self> {
        let migrations = s
            .migrations
            .into_iter()
            .map(|m| {
                Ok(core::Migration {
                    version: num::unsigned32("migration version", m.version)?,
                    sql: m.sql,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(core::Schema {
            version: num::unsigned32("schema version", s.version)?,
            tables: s
                .tables
                .into_iter()
                .map(|t| core::TableDecl {
                    name: t.name,
                    columns: t
                        .columns
                        .into_iter()
                        .map(|c| core::ColumnDecl {
                            name: c.name,
                            ty: c.column_type.into(),
                            policy: c.policy.into(),
                            not_null: c.not_null,
                            default: c.default_value.map(Into::into),
                        })
                        .collect(),
                    primary_key: Some(t.primary_key),
                    scope_column: t.scope_column,
                    mode: t.mode.into(),
                    delete_rule: t.delete_rule.into(),
                })
                .collect(),
            migrations,
        })
    }
}

mirror_enum!(
    /// Where a committed change came from.
    ChangeSource => core::ChangeSource {
        /// Through Ferry on this device.
        Local,
        /// Another connection on the same file, folded in.
        Foreign,
        /// Received from the relay.
        Remote,
        /// This device's change sets, refused by the relay, rolled back.
        Rollback,
        /// Every row was deleted (`disconnectAndClear`, `resync`).
        Cleared,
    }
);

/// A committed change to synced tables.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct ChangeEvent {
    /// Tables touched.
    pub tables: Vec<String>,
    /// Where it came from.
    pub source: ChangeSource,
}

impl From<&core::ChangeEvent> for ChangeEvent {
    fn from(e: &core::ChangeEvent) -> Self {
        ChangeEvent {
            tables: e.tables.iter().cloned().collect(),
            source: e.source.into(),
        }
    }
}

/// One side of a logged conflict.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct ConflictSide {
    /// The value (NULL for a delete).
    pub value: SqlValue,
    /// Its hybrid logical clock, as milliseconds since the epoch.
    pub hlc_millis: i64,
    /// The replica that wrote it.
    pub origin: String,
}

/// A change set the relay refused for a permanent reason, set aside so the uploads behind
/// it go on: discard it (`Replica.discardQuarantined`) or retry it
/// (`Replica.retryQuarantined`).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct QuarantinedChange {
    /// Handle for discard and retry.
    pub id: i64,
    /// The `origin_seq` it was refused under.
    pub origin_seq: i64,
    /// Why the relay refused it.
    pub code: RelayCode,
    /// The relay's explanation.
    pub reason: String,
    /// Tables it writes.
    pub tables: Vec<String>,
    /// Rows it writes.
    pub rows: i64,
    /// Whether discarding can take it back (its before-images were kept; guarded writes are
    /// rolled back rather than set aside, so only entries an earlier version set aside).
    pub discardable: bool,
    /// When it was set aside (ms since the Unix epoch).
    pub at_ms: i64,
}

impl From<core::Quarantined> for QuarantinedChange {
    fn from(q: core::Quarantined) -> Self {
        QuarantinedChange {
            id: q.id,
            origin_seq: q.origin_seq.signed(),
            code: q.code.into(),
            reason: q.reason,
            tables: q.tables,
            rows: q.rows.signed(),
            discardable: q.discardable,
            at_ms: q.at_ms.signed(),
        }
    }
}

/// A logged conflict.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct ConflictRecord {
    /// Log id (for clearing up to it).
    pub id: i64,
    /// Table.
    pub table: String,
    /// Row key.
    pub pk: SqlValue,
    /// Column (None for a delete/update conflict).
    pub column: Option<String>,
    /// True for a delete meeting a concurrent update.
    pub delete_update: bool,
    /// True when this device's own change was refused by the relay and rolled back
    /// (`local` is what was written, `resolution` the relay's reason).
    pub rejected: bool,
    /// The rule that decided (`lww`, `custom`, `delete_wins`, `update_wins`).
    pub policy: String,
    /// What this replica had.
    pub local: ConflictSide,
    /// What arrived.
    pub remote: ConflictSide,
    /// True when this replica's value won.
    pub local_won: bool,
    /// What the custom resolver answered, if it ran.
    pub resolution: Option<String>,
}

fn side(s: core::Side) -> ConflictSide {
    ConflictSide {
        value: s.value.into(),
        hlc_millis: s.hlc.millis().signed(),
        origin: s.origin.to_string(),
    }
}

impl From<core::Conflict> for ConflictRecord {
    fn from(c: core::Conflict) -> Self {
        ConflictRecord {
            id: c.id,
            table: c.table,
            pk: c.pk.into(),
            column: c.column,
            delete_update: c.kind == core::ConflictKind::DeleteUpdate,
            rejected: c.kind == core::ConflictKind::Rejected,
            policy: c.policy,
            local: side(c.local),
            remote: side(c.remote),
            local_won: c.winner == core::Winner::Local,
            resolution: c.resolution,
        }
    }
}

/// What a custom resolver sees.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct ConflictInput {
    /// Table.
    pub table: String,
    /// Row key.
    pub pk: SqlValue,
    /// Column.
    pub column: String,
    /// This device's pending value.
    pub local: SqlValue,
    /// The concurrent incoming value.
    pub remote: SqlValue,
    /// What the built-in rule (lww) picked, which the row holds now.
    pub merged: SqlValue,
}

impl From<&core::ConflictInput> for ConflictInput {
    fn from(c: &core::ConflictInput) -> Self {
        ConflictInput {
            table: c.table.clone(),
            pk: c.pk.clone().into(),
            column: c.column.clone(),
            local: c.local.clone().into(),
            remote: c.remote.clone().into(),
            merged: c.merged.clone().into(),
        }
    }
}

/// A resolver's answer.
#[derive(Debug, Clone, PartialEq, uniffi::Enum)]
pub enum Resolution {
    /// Keep this device's value.
    KeepLocal,
    /// Take the incoming value.
    TakeRemote,
    /// Write this value instead.
    Value {
        /// The value to write.
        value: SqlValue,
    },
}

impl From<Resolution> for core::Resolution {
    fn from(r: Resolution) -> Self {
        match r {
            Resolution::KeepLocal => core::Resolution::KeepLocal,
            Resolution::TakeRemote => core::Resolution::TakeRemote,
            Resolution::Value { value } => core::Resolution::Value(value.into()),
        }
    }
}

mirror_enum!(
    /// Connection state.
    ConnState => core::ConnState {
        /// Not connected; retrying after a backoff.
        Offline,
        /// Opening a connection.
        Connecting,
        /// Connected and streaming.
        Online,
        /// Paused by the app.
        Paused,
        /// Disconnected for good.
        Stopped,
    }
);

mirror_enum!(
    /// Why the relay refused a frame, a connection or a change set.
    RelayCode => core::protocol::ErrorCode {
        /// The frame could not be decoded.
        BadFrame,
        /// Protocol version not supported.
        UnsupportedVersion,
        /// Token missing, invalid, forged or expired.
        Unauthorized,
        /// Write outside the token's write scopes or to a read-only table.
        Forbidden,
        /// Frame or change set too large.
        TooLarge,
        /// Too many frames or connections.
        RateLimited,
        /// A change set is invalid.
        InvalidChangeSet,
        /// A change set's clock is too far ahead of the relay's.
        ClockSkew,
        /// The replica id is used by different changes (a restored copy).
        OriginReused,
        /// The relay is shutting down.
        ShuttingDown,
        /// Compare-and-set failed.
        Conflict,
        /// The fencing token is not the lease's current grant.
        Fenced,
        /// Something failed on the relay.
        Internal,
        /// The replica id belongs to another user; the replica took a new id.
        IdentityMismatch,
    }
);

/// The last error the sync loop met.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct SyncError {
    /// The relay's code, when the relay sent one (`None`: the network or this device).
    pub code: Option<RelayCode>,
    /// What happened, for people.
    pub message: String,
}

impl From<&core::SyncError> for SyncError {
    fn from(e: &core::SyncError) -> Self {
        SyncError {
            code: e.code.map(Into::into),
            message: e.message.clone(),
        }
    }
}

/// Rows of a scope evicted because the replica no longer holds it (the token lost it, or the
/// app unsubscribed).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Eviction {
    /// The scope.
    pub scope: String,
    /// Rows removed.
    pub rows: i64,
    /// Local change sets waiting to be pushed when the scope was lost (pushed before the rows
    /// went, unless the relay refused one: `SyncStatus.refused` reports it).
    pub pending_writes: i64,
    /// When (ms since the Unix epoch).
    pub at_ms: i64,
}

impl From<core::Eviction> for Eviction {
    fn from(e: core::Eviction) -> Self {
        Eviction {
            scope: e.scope,
            rows: e.rows.signed(),
            pending_writes: e.pending_writes.signed(),
            at_ms: e.at_ms.signed(),
        }
    }
}

/// A push the relay refused, which stops uploads until the app deals with it.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct RefusedPush {
    /// The refused change set's origin sequence number.
    pub origin_seq: i64,
    /// Why.
    pub code: RelayCode,
    /// The relay's explanation.
    pub message: String,
}

/// What the sync loop is doing.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct SyncStatus {
    /// Connection state.
    pub state: ConnState,
    /// Change sets acknowledged this session…
    pub uploaded: i64,
    /// …of this many to upload.
    pub upload_total: i64,
    /// Bytes of the change sets acknowledged this session.
    pub uploaded_bytes: i64,
    /// Relay positions applied this session…
    pub downloaded: i64,
    /// …of this many known.
    pub download_total: i64,
    /// How far this session's upload has come, 0.0 to 1.0 (`None`: nothing to upload).
    pub upload_progress: Option<f64>,
    /// How far the download has come, 0.0 to 1.0: through a snapshot's rows while a new
    /// device receives one, else through the relay positions known (`None`: nothing to
    /// download).
    pub download_progress: Option<f64>,
    /// Snapshot rows applied on this connection (a new device's first sync)…
    pub snapshot_rows: i64,
    /// …of this many the relay announced (0: no snapshot).
    pub snapshot_total_rows: i64,
    /// Snapshot bytes received (the relay's stored size)…
    pub snapshot_bytes: i64,
    /// …of this many announced.
    pub snapshot_total_bytes: i64,
    /// Relay position applied.
    pub cursor: i64,
    /// Relay head as last heard.
    pub head: i64,
    /// Local change sets not yet acknowledged.
    pub pending: i64,
    /// The replica has been completely synced at least once.
    pub has_synced: bool,
    /// When it was last caught up with the relay (ms since the Unix epoch).
    pub last_synced_at_ms: Option<i64>,
    /// The last error (cleared when a connection comes up).
    pub last_error: Option<SyncError>,
    /// Why uploads are failing, while they are (a refused push that stops them, a change set
    /// this device could not send); cleared when a push is acknowledged again.
    pub upload_error: Option<SyncError>,
    /// Why downloads are failing, while they are (changes this device could not apply, or
    /// downloads paused for a newer app's change); cleared when a download applies again.
    pub download_error: Option<SyncError>,
    /// A refused push that stops uploads.
    pub refused: Option<RefusedPush>,
    /// Connections opened so far.
    pub connects: i64,
    /// Connection attempts and sessions that failed so far (`lastError` says why the last one
    /// did).
    pub failures: i64,
    /// Change sets the relay refused (compare-and-set, stale lease) that were rolled back.
    pub rolled_back: i64,
    /// Change sets the relay refused for a permanent reason, waiting in quarantine for the
    /// app's decision (`Replica.quarantined`); the uploads behind them go on.
    pub quarantined: i64,
    /// Downloads are paused at a change this app version's schema cannot hold: open the
    /// replica with the newer schema (upgrade the app) to resume. Uploads go on.
    pub schema_outdated: Option<SchemaOutdated>,
}

/// A change written by a newer app version, which this app's schema cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct SchemaOutdated {
    /// The table written.
    pub table: String,
    /// The column this app's schema does not declare.
    pub column: String,
}

/// A lease this replica holds (see `SyncSession.acquireLease`).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct LeaseGrant {
    /// Lease name.
    pub name: String,
    /// Fencing token of the grant.
    pub token: i64,
    /// Time to live granted, in milliseconds (expiry is decided by the relay's clock).
    pub ttl_ms: i64,
}

impl From<core::Lease> for LeaseGrant {
    fn from(l: core::Lease) -> Self {
        LeaseGrant {
            name: l.name,
            token: l.token.signed(),
            ttl_ms: u64::try_from(l.ttl.as_millis())
                .unwrap_or(u64::MAX)
                .signed(),
        }
    }
}

pub(crate) fn core_lease(l: LeaseGrant) -> Result<core::Lease> {
    Ok(core::Lease {
        token: num::unsigned("lease token", l.token)?,
        ttl: num::millis("ttl_ms", l.ttl_ms)?,
        name: l.name,
        granted_at: std::time::Instant::now(),
    })
}

impl From<&core::SyncStatus> for SyncStatus {
    fn from(s: &core::SyncStatus) -> Self {
        SyncStatus {
            state: s.state.into(),
            uploaded: s.uploading.done.signed(),
            upload_total: s.uploading.total.signed(),
            uploaded_bytes: s.uploaded_bytes.signed(),
            downloaded: s.downloading.done.signed(),
            download_total: s.downloading.total.signed(),
            snapshot_rows: s.snapshot.rows.signed(),
            snapshot_total_rows: s.snapshot.total_rows.signed(),
            snapshot_bytes: s.snapshot.bytes.signed(),
            snapshot_total_bytes: s.snapshot.total_bytes.signed(),
            cursor: s.cursor.signed(),
            head: s.head.signed(),
            pending: s.pending.signed(),
            has_synced: s.has_synced,
            last_synced_at_ms: s.last_synced_at.map(Signed::signed),
            upload_progress: s.upload_fraction(),
            download_progress: s.download_fraction(),
            last_error: s.last_error.as_ref().map(SyncError::from),
            upload_error: s.upload_error.as_ref().map(SyncError::from),
            download_error: s.download_error.as_ref().map(SyncError::from),
            refused: s.refused.as_ref().map(|r| RefusedPush {
                origin_seq: r.origin_seq.signed(),
                code: r.code.into(),
                message: r.message.clone(),
            }),
            connects: s.connects.signed(),
            failures: s.failures.signed(),
            rolled_back: s.rolled_back.signed(),
            quarantined: s.quarantined.signed(),
            schema_outdated: s.schema_outdated.as_ref().map(|o| SchemaOutdated {
                table: o.table.clone(),
                column: o.column.clone(),
            }),
        }
    }
}
