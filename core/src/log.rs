//! The change log (`ferry_log`): every change set this replica made, from the moment its
//! transaction commits until the relay has sequenced it (and, as a slim row, after).
//!
//! One row per local change set, keyed by `seq` (local order) and by `(origin, origin_seq)`
//! (the identity the relay sees). A row moves through these states:
//!
//! * **recorded** — `raw` holds the compact [`LocalChange`](crate::capture::LocalChange)
//!   the write path stored (nothing per row, so local writes stay close to SQLite speed);
//! * **materialized** — `wire` holds the encoded [`ChangeSet`] with causal metadata, `raw`
//!   is cleared (see `materialize`); it is what the device pushes;
//! * **acknowledged** — `server_seq` is the relay's position; `wire` and `raw` are cleared;
//! * **withdrawn** — `rejected` says why the relay refused it (or one it was written on top
//!   of); `wire` is then an empty placeholder that keeps the origin's sequence gap-free;
//! * **re-issued** — `reissued` points to the row that replaced it under a new replica id.
//!
//! Every function here runs inside the caller's transaction (the write engine's), and
//! returns errors rather than guessing: a log that cannot be read is not "no data". The
//! stored body of a change set is written and read only through [`encode`] and [`decode`].

use crate::changeset::ChangeSet;
use crate::error::{Error, Result};
use crate::error_code::ErrorCode;
use crate::hlc::Hlc;
use crate::ids::ReplicaId;
use rusqlite::{Connection, OptionalExtension, params};

/// Encodes a change set for the log's `wire` column (sealed: see `envelope`).
pub(crate) fn encode(cs: &ChangeSet) -> Result<Vec<u8>> {
    crate::envelope::seal(cs)
}

/// Decodes a change set stored by [`encode`].
pub(crate) fn decode(body: &[u8]) -> Result<ChangeSet> {
    crate::envelope::open(body)
}

/// The `origin_seq` the next local change set of origin `origin` gets (stored, so it
/// survives restarts and is rolled back with a failed transaction).
pub(crate) fn next_origin_seq(conn: &Connection, origin: u32) -> Result<u64> {
    let n: i64 = conn
        .prepare_cached("SELECT coalesce(max(origin_seq), 0) + 1 FROM ferry_log WHERE origin = ?1")?
        .query_row([origin], |r| r.get(0))?;
    Ok(n as u64)
}

/// The largest HLC any logged change set carries.
pub(crate) fn max_hlc(conn: &Connection) -> Result<Hlc> {
    let h: i64 = conn.query_row("SELECT coalesce(max(hlc), 0) FROM ferry_log", [], |r| {
        r.get(0)
    })?;
    Ok(Hlc(h as u64))
}

/// A change set as the write path records it.
pub(crate) struct Recorded<'a> {
    pub origin: u32,
    pub origin_seq: u64,
    pub id: [u8; 16],
    pub hlc: Hlc,
    pub base: u64,
    /// The encoded local change (see `capture`).
    pub raw: &'a [u8],
    pub guarded: bool,
}

/// Appends a recorded change set.
pub(crate) fn append(conn: &Connection, r: &Recorded<'_>) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO ferry_log(origin, origin_seq, id, hlc, base, raw, guarded) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        r.origin,
        r.origin_seq as i64,
        r.id.to_vec(),
        r.hlc.0 as i64,
        r.base as i64,
        r.raw,
        r.guarded
    ])?;
    Ok(())
}

/// Appends a materialized change set of origin `origin` (a quarantined one issued again);
/// returns its log row.
pub(crate) fn append_materialized(
    conn: &Connection,
    origin: u32,
    cs: &ChangeSet,
    guarded: bool,
) -> Result<i64> {
    conn.prepare_cached(
        "INSERT INTO ferry_log(origin, origin_seq, id, hlc, base, wire, guarded) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        origin,
        cs.origin_seq as i64,
        cs.id.to_vec(),
        cs.hlc.0 as i64,
        cs.base as i64,
        encode(cs)?,
        guarded
    ])?;
    Ok(conn.last_insert_rowid())
}

/// A recorded change set waiting to be materialized.
pub(crate) struct RawRecord {
    pub seq: i64,
    pub origin_seq: u64,
    pub id: [u8; 16],
    pub hlc: Hlc,
    pub base: u64,
    pub raw: Vec<u8>,
    pub guarded: bool,
}

/// Number of recorded change sets not materialized yet.
pub(crate) fn unmaterialized_count(conn: &Connection) -> Result<u64> {
    let n: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM ferry_log WHERE server_seq IS NULL AND wire IS NULL AND raw IS NOT NULL AND reissued IS NULL",
        )?
        .query_row([], |r| r.get(0))?;
    Ok(n as u64)
}

/// The oldest `limit` recorded change sets not materialized yet, in order.
pub(crate) fn unmaterialized(conn: &Connection, limit: usize) -> Result<Vec<RawRecord>> {
    let rows: Vec<(Vec<u8>, RawRecord)> = conn
        .prepare_cached(
            "SELECT seq, origin_seq, id, hlc, base, raw, guarded FROM ferry_log WHERE server_seq IS NULL AND wire IS NULL AND raw IS NOT NULL
             AND reissued IS NULL ORDER BY seq LIMIT ?1",
        )?
        .query_map([limit.min(i64::MAX as usize) as i64], |r| {
            Ok((
                r.get(2)?,
                RawRecord {
                    seq: r.get(0)?,
                    origin_seq: r.get::<_, i64>(1)? as u64,
                    id: [0; 16],
                    hlc: Hlc(r.get::<_, i64>(3)? as u64),
                    base: r.get::<_, i64>(4)? as u64,
                    raw: r.get(5)?,
                    guarded: r.get(6)?,
                },
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    rows.into_iter()
        .map(|(id, rec)| {
            Ok(RawRecord {
                id: change_id(&id)?,
                ..rec
            })
        })
        .collect()
}

fn change_id(id: &[u8]) -> Result<[u8; 16]> {
    id.try_into()
        .map_err(|_| Error::Corrupt("change set id is not 16 bytes".into()))
}

/// Stores the materialized change set of log row `seq` (its record is dropped).
pub(crate) fn set_materialized(conn: &Connection, seq: i64, cs: &ChangeSet) -> Result<()> {
    conn.prepare_cached("UPDATE ferry_log SET wire = ?1, raw = NULL WHERE seq = ?2")?
        .execute(params![encode(cs)?, seq])?;
    Ok(())
}

/// The oldest unacknowledged materialized change sets, at most `max_sets` and about
/// `max_bytes` (always one if any).
pub(crate) fn unacked(
    conn: &Connection,
    after_origin_seq: u64,
    max_sets: usize,
    max_bytes: usize,
) -> Result<Vec<ChangeSet>> {
    // Pending sets are the current identity's (older ones were re-issued under it), so
    // their origin_seq grows with `seq`.
    let mut st = conn.prepare_cached(
        "SELECT wire FROM ferry_log WHERE server_seq IS NULL AND reissued IS NULL AND wire IS NOT NULL
         AND origin_seq > ?2 ORDER BY seq LIMIT ?1",
    )?;
    let mut rows = st.query(params![
        max_sets.clamp(1, i64::MAX as usize) as i64,
        i64::try_from(after_origin_seq).unwrap_or(i64::MAX)
    ])?;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    while let Some(r) = rows.next()? {
        let b: Vec<u8> = r.get(0)?;
        if !out.is_empty() && bytes + b.len() > max_bytes {
            break;
        }
        bytes += b.len();
        out.push(decode(&b)?);
    }
    Ok(out)
}

/// Number of change sets the relay has not acknowledged.
pub(crate) fn unacked_count(conn: &Connection) -> Result<u64> {
    let n: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM ferry_log WHERE server_seq IS NULL AND reissued IS NULL",
        )?
        .query_row([], |r| r.get(0))?;
    Ok(n as u64)
}

/// Records the relay's position of own change set `origin_seq`. Returns true when it was
/// not acknowledged before; fails when this replica never issued it or the relay names two
/// positions for it.
pub(crate) fn acknowledge(
    conn: &Connection,
    origin: u32,
    origin_seq: u64,
    server_seq: u64,
) -> Result<bool> {
    let known: Option<Option<i64>> = conn
        .prepare_cached("SELECT server_seq FROM ferry_log WHERE origin = ?1 AND origin_seq = ?2")?
        .query_row(params![origin, origin_seq as i64], |r| r.get(0))
        .optional()?;
    match known {
        None => Err(Error::Protocol(format!(
            "acknowledgement for origin_seq {origin_seq}, which this replica never issued"
        ))),
        Some(Some(s)) if s as u64 != server_seq => Err(Error::Protocol(format!(
            "origin_seq {origin_seq} acknowledged at {server_seq} but earlier at {s}"
        ))),
        Some(Some(_)) => Ok(false),
        Some(None) => {
            conn.prepare_cached(
                "UPDATE ferry_log SET server_seq = ?1, wire = NULL, raw = NULL WHERE origin = ?2 AND origin_seq = ?3",
            )?
            .execute(params![server_seq as i64, origin, origin_seq as i64])?;
            Ok(true)
        }
    }
}

/// For an own change set coming back in the relay's stream: `Some(withdrawn)` when it is
/// the one logged under that `origin_seq` (one lookup for both).
pub(crate) fn own_echo(conn: &Connection, origin: u32, cs: &ChangeSet) -> Result<Option<bool>> {
    let row: Option<(Vec<u8>, bool)> = conn
        .prepare_cached(
            "SELECT id, rejected IS NOT NULL FROM ferry_log WHERE origin = ?1 AND origin_seq = ?2",
        )?
        .query_row(params![origin, cs.origin_seq as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    Ok(row.and_then(|(id, withdrawn)| (id == cs.id).then_some(withdrawn)))
}

/// Marks a withdrawn change set as not withdrawn (the relay sequenced it after all).
pub(crate) fn reinstate(conn: &Connection, origin: u32, origin_seq: u64) -> Result<()> {
    conn.prepare_cached(
        "UPDATE ferry_log SET rejected = NULL WHERE origin = ?1 AND origin_seq = ?2",
    )?
    .execute(params![origin, origin_seq as i64])?;
    Ok(())
}

/// The log row of own change `(origin, origin_seq)` and the row it was re-issued as.
fn find(conn: &Connection, origin: u32, origin_seq: u64) -> Result<Option<(i64, Option<i64>)>> {
    Ok(conn
        .prepare_cached(
            "SELECT seq, reissued FROM ferry_log WHERE origin = ?1 AND origin_seq = ?2",
        )?
        .query_row(params![origin, origin_seq as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?)
}

/// True when `(origin, origin_seq)` is a change set this replica made (under any of its ids).
pub(crate) fn is_own(conn: &Connection, origin: u32, origin_seq: u64) -> Result<bool> {
    Ok(find(conn, origin, origin_seq)?.is_some())
}

/// The log row that holds own change `(origin, origin_seq)` now (following a re-issue).
pub(crate) fn entry_of(conn: &Connection, origin: u32, origin_seq: u64) -> Result<Option<i64>> {
    Ok(find(conn, origin, origin_seq)?.map(|(seq, re)| re.unwrap_or(seq)))
}

/// The relay position of own change `(origin, origin_seq)`, if acknowledged (following a
/// change re-issued under a new replica id to its new identity).
pub(crate) fn own_server_seq(
    conn: &Connection,
    origin: u32,
    origin_seq: u64,
) -> Result<Option<u64>> {
    let row: Option<(Option<i64>, Option<i64>)> = conn
        .prepare_cached(
            "SELECT server_seq, reissued FROM ferry_log WHERE origin = ?1 AND origin_seq = ?2",
        )?
        .query_row(params![origin, origin_seq as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let s = match row {
        Some((Some(s), _)) => Some(s),
        Some((None, Some(re))) => conn
            .prepare_cached("SELECT server_seq FROM ferry_log WHERE seq = ?1")?
            .query_row([re], |r| r.get::<_, Option<i64>>(0))
            .optional()?
            .flatten(),
        _ => None,
    };
    Ok(s.map(|s| s as u64))
}

/// Where an own change set stands, for a refusal of it.
pub(crate) struct Standing {
    pub guarded: bool,
    pub rejected: Option<String>,
    pub server_seq: Option<u64>,
}

/// Where own change set `origin_seq` stands (`None`: never issued).
pub(crate) fn standing(
    conn: &Connection,
    origin: u32,
    origin_seq: u64,
) -> Result<Option<Standing>> {
    Ok(conn
        .prepare_cached(
            "SELECT guarded, rejected, server_seq FROM ferry_log WHERE origin = ?1 AND origin_seq = ?2",
        )?
        .query_row(params![origin, origin_seq as i64], |r| {
            Ok(Standing {
                guarded: r.get(0)?,
                rejected: r.get(1)?,
                server_seq: r.get::<_, Option<i64>>(2)?.map(|s| s as u64),
            })
        })
        .optional()?)
}

/// A pending materialized change set and its log row.
pub(crate) struct Pending {
    pub seq: i64,
    pub cs: ChangeSet,
}

fn pending_rows(
    mut st: rusqlite::CachedStatement<'_>,
    p: impl rusqlite::Params,
) -> Result<Vec<Pending>> {
    let rows: Vec<(i64, Vec<u8>)> = st
        .query_map(p, |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    rows.into_iter()
        .map(|(seq, wire)| {
            Ok(Pending {
                seq,
                cs: decode(&wire)?,
            })
        })
        .collect()
}

/// Own pending change set `origin_seq`, unless withdrawn (what a rebase rewrites).
pub(crate) fn pending_one(
    conn: &Connection,
    origin: u32,
    origin_seq: u64,
) -> Result<Option<Pending>> {
    let st = conn.prepare_cached(
        "SELECT seq, wire FROM ferry_log WHERE origin = ?1 AND origin_seq = ?2
         AND server_seq IS NULL AND rejected IS NULL AND reissued IS NULL AND wire IS NOT NULL",
    )?;
    Ok(pending_rows(st, params![origin, origin_seq as i64])?.pop())
}

/// Own pending change sets from `origin_seq` on, withdrawn ones included (their
/// placeholders must still be sequenced), by `origin_seq`.
pub(crate) fn pending_from(
    conn: &Connection,
    origin: u32,
    origin_seq: u64,
) -> Result<Vec<Pending>> {
    let st = conn.prepare_cached(
        "SELECT seq, wire FROM ferry_log WHERE origin = ?1 AND origin_seq >= ?2
         AND server_seq IS NULL AND reissued IS NULL AND wire IS NOT NULL ORDER BY origin_seq",
    )?;
    pending_rows(st, params![origin, origin_seq as i64])
}

/// Every pending change set not withdrawn, in local order (what a withdrawal chains over).
pub(crate) fn pending_live(conn: &Connection) -> Result<Vec<Pending>> {
    let st = conn.prepare_cached(
        "SELECT seq, wire FROM ferry_log WHERE server_seq IS NULL AND reissued IS NULL AND rejected IS NULL
         AND wire IS NOT NULL ORDER BY seq",
    )?;
    pending_rows(st, [])
}

/// The largest HLC of own change sets before `origin_seq` or already acknowledged.
pub(crate) fn own_hlc_before(conn: &Connection, origin: u32, origin_seq: u64) -> Result<Hlc> {
    let h: i64 = conn
        .prepare_cached(
            "SELECT coalesce(max(hlc), 0) FROM ferry_log WHERE origin = ?1
             AND (origin_seq < ?2 OR server_seq IS NOT NULL)",
        )?
        .query_row(params![origin, origin_seq as i64], |r| r.get(0))?;
    Ok(Hlc(h as u64))
}

/// Replaces the stored change set of log row `seq` (re-stamped or rebased: its HLC and base
/// change with it).
pub(crate) fn rewrite(conn: &Connection, seq: i64, cs: &ChangeSet) -> Result<()> {
    conn.prepare_cached("UPDATE ferry_log SET wire = ?1, hlc = ?2, base = ?3 WHERE seq = ?4")?
        .execute(params![encode(cs)?, cs.hlc.0 as i64, cs.base as i64, seq])?;
    Ok(())
}

/// Withdraws log row `seq`: it keeps its identity with `placeholder` (no rows) as body.
pub(crate) fn withdraw(
    conn: &Connection,
    seq: i64,
    (code, why): (ErrorCode, &str),
    placeholder: &ChangeSet,
) -> Result<()> {
    conn.prepare_cached(
        "UPDATE ferry_log SET rejected = ?1, rejected_code = ?2, wire = ?3, guarded = 0 WHERE seq = ?4",
    )?
    .execute(params![why, code.as_str(), encode(placeholder)?, seq])?;
    Ok(())
}

/// True while a guarded change set is pending (new writes are then guarded too).
pub(crate) fn guard_pending(conn: &Connection) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM ferry_log WHERE guarded = 1 AND server_seq IS NULL AND rejected IS NULL AND reissued IS NULL)")?
        .query_row([], |r| r.get(0))?)
}

/// The relay's verdict on one of this replica's change sets, by change id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not decided yet (not pushed, or no answer yet).
    Pending,
    /// Sequenced at this relay position.
    Accepted(u64),
    /// Refused and rolled back: the relay's code (`conflict`, `fenced`, or the permanent
    /// code a quarantined change set was refused with) and its reason.
    Rejected {
        /// The relay's code.
        code: ErrorCode,
        /// The relay's explanation.
        reason: String,
    },
}

/// Reads the verdict of the change set with ULID `id` (following re-issues).
pub(crate) fn verdict(conn: &Connection, id: &[u8; 16]) -> Result<Verdict> {
    let mut id = *id;
    loop {
        type Row = (Option<i64>, Option<String>, Option<i64>, Option<String>);
        let row: Option<Row> = conn
            .prepare_cached(
                "SELECT server_seq, rejected, reissued, rejected_code FROM ferry_log WHERE id = ?1",
            )?
            .query_row([id.to_vec()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()?;
        return match row {
            None => Err(Error::InvalidInput(
                "no change set with that id on this replica".into(),
            )),
            Some((_, Some(reason), _, code)) => Ok(Verdict::Rejected {
                // Withdrawn by a build older than format 6, which kept no code.
                code: code
                    .as_deref()
                    .and_then(ErrorCode::parse)
                    .unwrap_or(ErrorCode::Conflict),
                reason,
            }),
            Some((Some(s), None, _, _)) => Ok(Verdict::Accepted(s as u64)),
            Some((None, None, Some(re), _)) => {
                let next: Vec<u8> =
                    conn.query_row("SELECT id FROM ferry_log WHERE seq = ?1", [re], |r| {
                        r.get(0)
                    })?;
                id = change_id(&next)?;
                continue;
            }
            Some((None, None, None, _)) => Ok(Verdict::Pending),
        };
    }
}

/// Re-issues every unacknowledged change set under the new origin `num` (replica id `new`),
/// numbered from 1 with fresh change ids; the old rows point to their replacements. Undo
/// records follow their change set. Returns the next `origin_seq` of the new origin.
pub(crate) fn reissue_unacked(conn: &Connection, new: ReplicaId, num: u32) -> Result<u64> {
    type Unacked = (
        i64,
        i64,
        i64,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
        bool,
        (Option<String>, Option<String>),
    );
    let old: Vec<Unacked> = conn
        .prepare(
            "SELECT seq, hlc, base, raw, wire, guarded, rejected, rejected_code FROM ferry_log
             WHERE server_seq IS NULL AND reissued IS NULL ORDER BY seq",
        )?
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                (r.get(6)?, r.get(7)?),
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut oseq = 1u64;
    for (seq, hlc, base, raw, wire, guarded, (rejected, rejected_code)) in old {
        let id = ulid::Ulid::generate().to_bytes();
        let wire = match wire {
            Some(w) => {
                let mut cs = decode(&w)?;
                cs.origin = new;
                cs.origin_seq = oseq;
                cs.id = id;
                Some(encode(&cs)?)
            }
            None => None,
        };
        conn.execute(
            "INSERT INTO ferry_log(origin, origin_seq, id, hlc, base, raw, wire, guarded, rejected, rejected_code)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![num, oseq as i64, id.to_vec(), hlc, base, raw, wire, guarded, rejected, rejected_code],
        )?;
        let new_seq = conn.last_insert_rowid();
        conn.execute(
            "UPDATE ferry_undo SET seq = ?1 WHERE seq = ?2",
            params![new_seq, seq],
        )?;
        conn.execute(
            "UPDATE ferry_log SET reissued = ?1, raw = NULL, wire = NULL WHERE seq = ?2",
            params![new_seq, seq],
        )?;
        oseq += 1;
    }
    Ok(oseq)
}
