//! Wire protocol types shared by the client and the relay.
//!
//! Frames are binary: a 4-byte header (`b'F'`, `b'Y'`, protocol version, flags) followed by a
//! MessagePack body (serde, named enum variants). The header lets either side refuse a frame
//! from another protocol version with a clear error before decoding anything; the flags byte
//! is reserved for compression and must be zero in version 1.

use crate::changeset::{ChangeSet, Sequenced};
use crate::error::{Error, Result};
use crate::ids::ReplicaId;
use serde::{Deserialize, Serialize};

/// Current protocol version.
pub const PROTOCOL_VERSION: u8 = 1;

const MAGIC: [u8; 2] = *b"FY";

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
}

/// One acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The change set's origin_seq.
    pub origin_seq: u64,
    /// The position the relay gave it.
    pub server_seq: u64,
}

/// Machine-readable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame could not be decoded.
    BadFrame,
    /// Protocol version not supported.
    UnsupportedVersion,
    /// Token missing, invalid or expired.
    Unauthorized,
    /// Write outside the token's write scopes or to a read-only table.
    Forbidden,
    /// Frame or change set too large.
    TooLarge,
    /// Too many frames.
    RateLimited,
    /// A change set is invalid (origin, sequence, clock skew, content).
    InvalidChangeSet,
    /// The origin id is already used by different changes (restored backup).
    OriginReused,
    /// Something failed on the relay.
    Internal,
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
    },
    /// Pushed change sets are durable.
    Acks {
        /// One per change set.
        acks: Vec<Ack>,
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
    },
    /// Keep-alive answer.
    Pong {
        /// From the ping.
        nonce: u64,
    },
    /// The relay refuses something; the connection closes after it.
    Error {
        /// Code.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>> {
    let mut out = vec![MAGIC[0], MAGIC[1], PROTOCOL_VERSION, 0];
    rmp_serde::encode::write_named(&mut out, msg)?;
    Ok(out)
}

fn decode<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T> {
    if b.len() > MAX_FRAME_BYTES {
        return Err(Error::Protocol(format!(
            "frame of {} bytes exceeds the {} byte limit",
            b.len(),
            MAX_FRAME_BYTES
        )));
    }
    if b.len() < 4 || b[..2] != MAGIC {
        return Err(Error::Protocol("not a Ferry frame (bad header)".into()));
    }
    if b[2] != PROTOCOL_VERSION {
        return Err(Error::Protocol(format!(
            "protocol version {} is not supported (this side speaks {PROTOCOL_VERSION})",
            b[2]
        )));
    }
    if b[3] != 0 {
        return Err(Error::Protocol(format!(
            "unknown frame flags {:#04x}",
            b[3]
        )));
    }
    rmp_serde::from_slice(&b[4..])
        .map_err(|e| Error::Protocol(format!("undecodable frame body: {e}")))
}

impl ClientMsg {
    /// Encodes to a binary frame.
    pub fn encode(&self) -> Result<Vec<u8>> {
        encode(self)
    }
    /// Decodes a binary frame.
    pub fn decode(b: &[u8]) -> Result<Self> {
        decode(b)
    }
}

impl ServerMsg {
    /// Encodes to a binary frame.
    pub fn encode(&self) -> Result<Vec<u8>> {
        encode(self)
    }
    /// Decodes a binary frame.
    pub fn decode(b: &[u8]) -> Result<Self> {
        decode(b)
    }
}
