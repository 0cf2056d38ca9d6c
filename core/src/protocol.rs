//! Wire protocol types shared by the client and the relay.
//!
//! Frames are WebSocket binary messages: a 4-byte header (`b'F'`, `b'Y'`, protocol version,
//! flags) followed by a MessagePack body (serde, named fields, so a field added later with a
//! default is still readable by an older peer). The header lets either side refuse a frame
//! from another protocol version with a clear error before decoding anything.
//!
//! Flags: bit 0 ([`FLAG_LZ4`]) marks a body compressed with LZ4 (block format, the
//! uncompressed length prepended as 4 little-endian bytes). Other bits are reserved and must be
//! zero. A compressed body whose announced size is above the receiver's limit is refused
//! before anything is decompressed, so a small frame cannot expand into a huge allocation.
//!
//! The full exchange is documented in `docs/protocol.md`; golden frames in
//! `core/tests/integration/protocol.rs` freeze the encoding.

use crate::changeset::{ChangeSet, Sequenced};
use crate::error::{Error, Result};
use crate::ids::ReplicaId;
use crate::scope::{HeldScopes, ScopeSet};
use crate::value::Value;
use serde::{Deserialize, Serialize};

/// Current protocol version.
pub const PROTOCOL_VERSION: u8 = 1;

const MAGIC: [u8; 2] = *b"FY";

/// Header flag: the body is LZ4-compressed.
pub const FLAG_LZ4: u8 = 0x01;

/// Bodies at least this large are offered to the compressor.
pub const COMPRESS_MIN_BYTES: usize = 1024;

/// A frame larger than this is refused before decoding (the relay may configure less).
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Client → relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// First frame of a connection.
    Hello {
        /// Protocol version the client speaks.
        protocol: u8,
        /// The replica.
        replica_id: ReplicaId,
        /// Bearer token (JWT).
        token: String,
        /// Relay position the replica has applied.
        cursor: u64,
        /// App schema version.
        schema_version: u32,
        /// The client takes snapshots ([`ServerMsg::Snapshot`]): a replica that has applied
        /// nothing receives the current rows of its scopes instead of the whole log.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        snapshots: bool,
        /// The resume token of the last snapshot page this replica applied, while the
        /// snapshot is unfinished: the relay continues after it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<Vec<u8>>,
        /// The scope patterns the app subscribes to (`None`: every scope the token may
        /// read). The relay sends the scopes both allow.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subscriptions: Option<Vec<String>>,
        /// The scopes this replica holds (what the relay last announced in
        /// [`ServerMsg::Welcome`]`.scopes`): scopes the connection may read beyond them
        /// are back-filled by a snapshot.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        held: Option<HeldScopes>,
    },
    /// Change sets for the relay to sequence (oldest first).
    Push {
        /// The change sets.
        change_sets: Vec<ChangeSet>,
    },
    /// Keep-alive.
    Ping {
        /// Echoed in the pong.
        nonce: u64,
    },
    /// Asks for the checksum of everything this connection may read (see [`ServerMsg::Checksum`]).
    Checksum {
        /// Echoed in the answer.
        nonce: u64,
    },
    /// Acquires, renews or releases a lease (see [`LeaseRequest`]); answered by
    /// [`ServerMsg::Lease`] with the same nonce.
    Lease {
        /// Echoed in the answer.
        nonce: u64,
        /// What to do.
        request: LeaseRequest,
    },
}

/// A lease operation. Leases are named locks the relay grants for a time-to-live measured on
/// its own clock; every grant carries a fencing token larger than any earlier grant's of the
/// same name, and a change set guarded by a token older than the current grant is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseRequest {
    /// Take the lease if nobody holds it (or the holder's grant has expired).
    Acquire {
        /// Lease name (1–128 bytes of printable text).
        name: String,
        /// Time to live in milliseconds.
        ttl_ms: u64,
    },
    /// Extend the caller's current grant.
    Renew {
        /// Lease name.
        name: String,
        /// The grant's fencing token.
        token: u64,
        /// New time to live from now, in milliseconds.
        ttl_ms: u64,
    },
    /// Give the lease up.
    Release {
        /// Lease name.
        name: String,
        /// The grant's fencing token.
        token: u64,
    },
}

/// The relay's answer to a [`LeaseRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseOutcome {
    /// The lease is the caller's until `ttl_ms` from when the relay answered.
    Granted {
        /// Lease name.
        name: String,
        /// Fencing token of this grant.
        token: u64,
        /// Time to live in milliseconds.
        ttl_ms: u64,
    },
    /// Someone else holds it.
    Busy {
        /// Lease name.
        name: String,
        /// Milliseconds until the current grant expires.
        retry_after_ms: u64,
    },
    /// Released.
    Released {
        /// Lease name.
        name: String,
    },
    /// The token is not the current grant (it expired, or a newer grant exists).
    Lost {
        /// Lease name.
        name: String,
        /// The current grant's token (0 when none).
        current: u64,
    },
    /// The connection's token may not take this lease (it must be able to write a scope of
    /// the lease's name). Says nothing about the lease itself.
    Forbidden {
        /// Lease name.
        name: String,
    },
}

/// One acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The change set's origin_seq.
    pub origin_seq: u64,
    /// The position the relay gave it.
    pub server_seq: u64,
}

pub use crate::error_code::{CodeKind, ErrorCode};

/// Limits the relay enforces, announced at welcome so the client batches within them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest frame (after decompression) the relay accepts.
    pub max_frame_bytes: u64,
    /// Largest change set, in cell operations.
    pub max_change_set_ops: u64,
    /// Most change sets in one push frame.
    pub max_push_sets: u64,
    /// Most bytes of change sets a client keeps pushed and unacknowledged (0 from relays
    /// that predate it: the client's own bound applies). Keeps what one connection can leave
    /// in socket buffers and relay queues bounded.
    #[serde(default)]
    pub push_window_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 8 << 20,
            max_change_set_ops: 100_000,
            max_push_sets: 1024,
            push_window_bytes: 4 << 20,
        }
    }
}

/// A primary key of a synced table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowKey {
    /// Table.
    pub table: String,
    /// Primary key value.
    pub pk: Value,
}

/// Rows that change visibility for the receiver at one position, because the change set
/// sequenced there moved them between scopes. Applied atomically with that position: the
/// backfill before the change set's own parts, the evictions after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Move {
    /// The change set that moved the rows.
    pub server_seq: u64,
    /// Rows that left the receiver's read scopes: deleted locally, not a user delete, never
    /// pushed back.
    #[serde(default)]
    pub evict: Vec<RowKey>,
    /// Earlier history of rows that entered the receiver's read scopes: the parts of change
    /// sets before `server_seq` that touch them, in order.
    #[serde(default)]
    pub backfill: Vec<Sequenced>,
}

/// Relay → client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// Answer to hello.
    Welcome {
        /// Protocol version in use.
        protocol: u8,
        /// Highest position the relay has sequenced.
        head: u64,
        /// Relay's wall clock (ms since the epoch), so the client keeps HLCs within bounds.
        server_time_ms: u64,
        /// Highest origin_seq the relay holds from this replica id.
        max_origin_seq: u64,
        /// The relay's limits.
        #[serde(default)]
        limits: Limits,
        /// History at or below this position is compacted (see `docs/protocol.md`).
        #[serde(default)]
        horizon: u64,
        /// A snapshot follows ([`ServerMsg::Snapshot`]): the client pushes nothing until its
        /// last page, so that none of its own change sets sits below the position the log
        /// continues from.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        snapshot: bool,
        /// The scopes this connection delivers (the token's read grants and the
        /// subscriptions): the replica evicts rows outside them, and holds exactly these
        /// once the snapshot (if any) is applied.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scopes: Option<ScopeSet>,
    },
    /// Pushed change sets are durable.
    Acks {
        /// One per change set.
        acks: Vec<Ack>,
    },
    /// A pushed change set was refused; the connection stays open. Change sets after it
    /// from the same origin cannot be sequenced until the origin withdraws it.
    Refused {
        /// The refused change set's origin_seq.
        origin_seq: u64,
        /// Why.
        code: ErrorCode,
        /// Human-readable detail (names the table, scope or limit).
        message: String,
        /// For [`ErrorCode::Conflict`]: the position of the change the pusher had not seen.
        /// A client that has applied up to it has seen what its change set conflicted with.
        #[serde(default, skip_serializing_if = "is_zero")]
        conflict_seq: u64,
    },
    /// Every position in `(after, up_to]` is covered: these are the parts the client may see.
    Changes {
        /// Start (exclusive).
        after: u64,
        /// End (inclusive).
        up_to: u64,
        /// Change sets in order.
        change_sets: Vec<Sequenced>,
        /// Relay head when sent.
        head: u64,
        /// Rows entering or leaving the receiver's read scopes in this range, by position.
        #[serde(default)]
        moves: Vec<Move>,
    },
    /// One page of a snapshot: the current rows of the scopes this connection may read, each
    /// as its pruned history (see [`crate::snapshot`]), sent before any `Changes` to a
    /// replica that has applied nothing. Pages come in key order; apply each with its
    /// `resume` token in one transaction.
    Snapshot {
        /// The position the replica continues the log from once the snapshot is complete
        /// (its cursor then); the rows may be newer (see [`crate::snapshot`]).
        position: u64,
        /// The rows.
        rows: Vec<crate::snapshot::SnapshotRow>,
        /// Token to resume after this page on a later connection (empty on the last page).
        resume: Vec<u8>,
        /// The last page.
        done: bool,
        /// Rows the snapshot holds from this connection's first page on, announced with
        /// every page for progress (the rows may grow a little while writers write).
        #[serde(default)]
        total_rows: u64,
        /// The relay's stored bytes of those rows (the unit of `bytes`).
        #[serde(default)]
        total_bytes: u64,
        /// The relay's stored bytes of this page's rows.
        #[serde(default)]
        bytes: u64,
    },
    /// Keep-alive answer.
    Pong {
        /// From the ping.
        nonce: u64,
        /// Relay head when the ping was answered: a client whose cursor reaches it has seen
        /// everything sequenced before its ping.
        #[serde(default)]
        head: u64,
    },
    /// Checksum of the rows this connection may read, as of relay position `position`.
    Checksum {
        /// From the request.
        nonce: u64,
        /// The state's position: a replica whose cursor equals it and that has nothing
        /// pending must compute the same digest.
        position: u64,
        /// SHA-256 over the rows (see [`crate::checksum`]).
        digest: [u8; 32],
        /// Number of rows covered.
        rows: u64,
    },
    /// Answer to [`ClientMsg::Lease`].
    Lease {
        /// From the request.
        nonce: u64,
        /// What happened.
        outcome: LeaseOutcome,
    },
    /// The relay refuses something; the connection closes after it.
    Error {
        /// Code.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>> {
    let mut out = vec![MAGIC[0], MAGIC[1], PROTOCOL_VERSION, 0];
    rmp_serde::encode::write_named(&mut out, msg)?;
    if out.len() - 4 >= COMPRESS_MIN_BYTES {
        let packed = lz4_flex::compress_prepend_size(&out[4..]);
        if packed.len() + 64 < out.len() - 4 {
            let mut c = Vec::with_capacity(packed.len() + 4);
            c.extend_from_slice(&[MAGIC[0], MAGIC[1], PROTOCOL_VERSION, FLAG_LZ4]);
            c.extend_from_slice(&packed);
            return Ok(c);
        }
    }
    Ok(out)
}

fn encode_plain<T: Serialize>(msg: &T) -> Result<Vec<u8>> {
    let mut out = vec![MAGIC[0], MAGIC[1], PROTOCOL_VERSION, 0];
    rmp_serde::encode::write_named(&mut out, msg)?;
    Ok(out)
}

/// Why a frame could not be decoded: the code to answer with follows from the variant, never
/// from the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Over the byte limit, as received or once decompressed.
    #[error("frame of {size} bytes exceeds the {max} byte limit")]
    TooLarge {
        /// The frame's size (decompressed size for a compressed frame).
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A Ferry frame of another protocol version.
    #[error("protocol version {0} is not supported (this side speaks {PROTOCOL_VERSION})")]
    Version(u8),
    /// Not a Ferry frame, or one whose body does not decode.
    #[error("{0}")]
    BadFrame(String),
}

impl DecodeError {
    /// The protocol code that answers it.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge { .. } => ErrorCode::TooLarge,
            DecodeError::Version(_) => ErrorCode::UnsupportedVersion,
            DecodeError::BadFrame(_) => ErrorCode::BadFrame,
        }
    }
}

impl From<DecodeError> for Error {
    fn from(e: DecodeError) -> Self {
        Error::Protocol(e.to_string())
    }
}

fn read<T: for<'a> Deserialize<'a>>(b: &[u8], max: usize) -> std::result::Result<T, DecodeError> {
    if b.len() > max {
        return Err(DecodeError::TooLarge { size: b.len(), max });
    }
    if b.len() < 4 || b[..2] != MAGIC {
        return Err(DecodeError::BadFrame(
            "not a Ferry frame (bad header)".into(),
        ));
    }
    if b[2] != PROTOCOL_VERSION {
        return Err(DecodeError::Version(b[2]));
    }
    let body = &b[4..];
    let undecodable =
        |e: rmp_serde::decode::Error| DecodeError::BadFrame(format!("undecodable frame body: {e}"));
    match b[3] {
        0 => rmp_serde::from_slice(body).map_err(undecodable),
        FLAG_LZ4 => {
            if body.len() < 4 {
                return Err(DecodeError::BadFrame(
                    "compressed frame without a size".into(),
                ));
            }
            let size = u32::from_le_bytes([body[0], body[1], body[2], body[3]]) as usize;
            if size > max {
                return Err(DecodeError::TooLarge { size, max });
            }
            let plain = lz4_flex::decompress_size_prepended(body)
                .map_err(|e| DecodeError::BadFrame(format!("undecodable compressed frame: {e}")))?;
            rmp_serde::from_slice(&plain).map_err(undecodable)
        }
        f => Err(DecodeError::BadFrame(format!(
            "unknown frame flags {f:#04x}"
        ))),
    }
}

fn decode<T: for<'a> Deserialize<'a>>(b: &[u8], max: usize) -> Result<T> {
    Ok(read(b, max)?)
}

impl ClientMsg {
    /// Encodes to a binary frame (compressed when that pays).
    pub fn encode(&self) -> Result<Vec<u8>> {
        encode(self)
    }
    /// Encodes without compression (golden files, tests).
    pub fn encode_plain(&self) -> Result<Vec<u8>> {
        encode_plain(self)
    }
    /// Decodes a binary frame of at most [`MAX_FRAME_BYTES`].
    pub fn decode(b: &[u8]) -> Result<Self> {
        decode(b, MAX_FRAME_BYTES)
    }
    /// Decodes a binary frame of at most `max` bytes (after decompression too).
    pub fn decode_limited(b: &[u8], max: usize) -> Result<Self> {
        decode(b, max)
    }
    /// [`ClientMsg::decode_limited`] with a typed error (what the relay answers a bad frame
    /// with).
    pub fn read(b: &[u8], max: usize) -> std::result::Result<Self, DecodeError> {
        read(b, max)
    }
    /// Short name of the message kind (logs, metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            ClientMsg::Hello { .. } => "hello",
            ClientMsg::Push { .. } => "push",
            ClientMsg::Ping { .. } => "ping",
            ClientMsg::Checksum { .. } => "checksum",
            ClientMsg::Lease { .. } => "lease",
        }
    }
}

impl ServerMsg {
    /// Encodes to a binary frame (compressed when that pays).
    pub fn encode(&self) -> Result<Vec<u8>> {
        encode(self)
    }
    /// Encodes without compression (golden files, tests).
    pub fn encode_plain(&self) -> Result<Vec<u8>> {
        encode_plain(self)
    }
    /// Decodes a binary frame of at most [`MAX_FRAME_BYTES`].
    pub fn decode(b: &[u8]) -> Result<Self> {
        decode(b, MAX_FRAME_BYTES)
    }
    /// Decodes a binary frame of at most `max` bytes (after decompression too).
    pub fn decode_limited(b: &[u8], max: usize) -> Result<Self> {
        decode(b, max)
    }
}
