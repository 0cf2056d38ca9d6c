//! One group commit of the PostgreSQL store: read once, decide in memory, write once.
//!
//! The sequencing lock is held for the whole transaction, so its length bounds the
//! throughput of every node together. Round trips, not SQL work, dominate it on a network;
//! so a batch does a fixed number of them whatever its size: one pipelined read of
//! everything every change set of the batch may consult (stored `(origin, origin_seq)`
//! pairs, origin heads, row scopes, compare-and-set stamps, leases), then
//! [`rule::decide`] for each change set in order against that state (updated in memory
//! as each one is accepted, exactly as the rows it writes would update the tables), then
//! one pipelined write of the final state. What the batch writes is what per-change-set
//! statements would have left behind; the store suite checks both paths give the same
//! answers as the SQLite store.

use crate::auth::Grants;
use crate::catalog::RelayCatalog;
use crate::error::{RelayError, Result};
use crate::scoping::{self, RowScope};
use crate::store::rule::{self, Decision, Fetched, RowKey};
use crate::store::scoped;
use crate::store::{PushOutcome, StoredSet, encode_set};
use ferry_core::admission::{Bounds, OriginState};
use ferry_core::cas::{CasUpdate, CellStamp, RowStamp};
use ferry_core::hlc::Hlc;
use ferry_core::lease::LeaseState;
use ferry_core::{ChangeSet, ReplicaId};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use tokio_postgres::types::ToSql;

type Tx<'a> = deadpool_postgres::Transaction<'a>;

/// A 16-byte id column back into a replica id (the zero id for anything else, which is
/// what an empty stamp origin is).
pub fn origin_of(b: &[u8]) -> ReplicaId {
    ReplicaId::from_slice(b).unwrap_or(ReplicaId([0; 16]))
}

/// What one batch has read and decided so far.
#[derive(Default)]
struct Batch {
    existing: HashMap<(ReplicaId, u64), (u64, [u8; 16])>,
    max_seq: HashMap<ReplicaId, u64>,
    leases: HashMap<String, LeaseState>,
    scopes: Fetched,
    cas: Fetched,
    touched_scopes: BTreeSet<RowKey>,
    touched_cas: BTreeSet<RowKey>,
    sets: SetCols,
    hist: (Vec<String>, Vec<Vec<u8>>, Vec<i64>),
    index: ScopeIndex,
}

/// Entries of the per-scope read index (see `store::scoped`) for some change sets, written
/// in one pipelined round trip.
#[derive(Default)]
pub struct ScopeIndex {
    scope: Vec<String>,
    seq: Vec<i64>,
    last: HashMap<String, i64>,
}

impl ScopeIndex {
    /// Adds the scopes `s` touches.
    pub fn add(&mut self, s: &StoredSet) {
        let seq = s.server_seq as i64;
        for scope in scoped::scopes_of(s) {
            self.scope.push(scope.to_owned());
            self.seq.push(seq);
            let last = self.last.entry(scope.to_owned()).or_insert(seq);
            *last = (*last).max(seq);
        }
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.scope.is_empty()
    }

    /// Writes the entries (each scope's last position only moves forward).
    pub async fn write(&self, tx: &Tx<'_>) -> Result<()> {
        let (names, lasts): (Vec<&String>, Vec<i64>) =
            self.last.iter().map(|(k, v)| (k, *v)).unzip();
        let entries: [&(dyn ToSql + Sync); 2] = [&self.scope, &self.seq];
        let scopes: [&(dyn ToSql + Sync); 2] = [&names, &lasts];
        futures_util::try_join!(
            execute(
                tx,
                !self.scope.is_empty(),
                "INSERT INTO ferry_set_scopes(scope, server_seq)
                 SELECT * FROM unnest($1::text[], $2::int8[]) ON CONFLICT DO NOTHING",
                &entries,
            ),
            execute(
                tx,
                !names.is_empty(),
                "INSERT INTO ferry_scopes(name, last_seq) SELECT * FROM unnest($1::text[], $2::int8[])
                 ON CONFLICT (name) DO UPDATE SET last_seq = greatest(ferry_scopes.last_seq, excluded.last_seq)",
                &scopes,
            ),
        )?;
        Ok(())
    }
}

#[derive(Default)]
struct SetCols {
    seq: Vec<i64>,
    origin: Vec<Vec<u8>>,
    oseq: Vec<i64>,
    id: Vec<Vec<u8>>,
    body: Vec<Vec<u8>>,
}

/// One connection's push in a group commit.
pub struct Push<'a> {
    /// The connection's grants.
    pub grants: &'a Grants,
    /// Bounds on each change set.
    pub bounds: &'a Bounds,
    /// Oldest first.
    pub sets: &'a [ChangeSet],
}

/// Sequences `pushes` after `head` at the store clock `now`, inside `tx` (which holds the
/// sequencing lock). Returns each push's outcomes and the newly stored change sets.
pub async fn sequence(
    tx: &Tx<'_>,
    cat: &RelayCatalog,
    pushes: &[Push<'_>],
    mut head: u64,
    now: u64,
) -> Result<(Vec<Vec<PushOutcome>>, Vec<Arc<StoredSet>>)> {
    let mut b = Batch::fetch(tx, pushes).await?;
    let mut all = Vec::with_capacity(pushes.len());
    let mut stored = Vec::new();
    for push in pushes {
        let mut outcomes = Vec::with_capacity(push.sets.len());
        for cs in push.sets {
            let state = OriginState {
                existing: b.existing.get(&(cs.origin, cs.origin_seq)).cloned(),
                max_seq: b.max_seq.get(&cs.origin).copied().unwrap_or(0),
            };
            let lease = cs
                .fence
                .as_ref()
                .and_then(|f| b.leases.get(&f.lease).copied());
            let mut cx = rule::Context {
                cat,
                grants: push.grants,
                rows: &mut b.scopes,
                fence_lease: lease,
                now_ms: now,
                stamps: &mut b.cas,
            };
            let decided = rule::decide(cs, &state, push.bounds, &mut cx)?;
            match decided {
                Decision::Existing(seq) => outcomes.push(PushOutcome::Acked(seq)),
                Decision::Refused(e) => {
                    outcomes.push(PushOutcome::Refused(e));
                    break;
                }
                Decision::Accept(a) => {
                    head += 1;
                    let s = StoredSet {
                        server_seq: head,
                        change_set: cs.clone(),
                        tags: a.tags,
                    };
                    b.accept(cat, &s, &a.scopes, &a.stamps)?;
                    outcomes.push(PushOutcome::Acked(head));
                    stored.push(Arc::new(s));
                }
            }
        }
        all.push(outcomes);
    }
    if !stored.is_empty() {
        b.write(tx).await?;
    }
    Ok((all, stored))
}

/// One query of a pipelined group (statements are prepared once per connection).
async fn query(
    tx: &Tx<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>> {
    let st = tx.prepare_cached(sql).await?;
    Ok(tx.query(&st, params).await?)
}

/// One write of a pipelined group, skipped when it has nothing to write.
async fn execute(
    tx: &Tx<'_>,
    needed: bool,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64> {
    if !needed {
        return Ok(0);
    }
    let st = tx.prepare_cached(sql).await?;
    Ok(tx.execute(&st, params).await?)
}

impl Batch {
    /// One pipelined round trip: everything any change set of the batch may consult.
    async fn fetch(tx: &Tx<'_>, pushes: &[Push<'_>]) -> Result<Batch> {
        let mut pairs: (Vec<Vec<u8>>, Vec<i64>) = Default::default();
        let mut origins: BTreeSet<Vec<u8>> = BTreeSet::new();
        let mut keys: BTreeSet<RowKey> = BTreeSet::new();
        let mut leases: BTreeSet<String> = BTreeSet::new();
        for push in pushes {
            for cs in push.sets {
                pairs.0.push(cs.origin.0.to_vec());
                pairs.1.push(cs.origin_seq as i64);
                origins.insert(cs.origin.0.to_vec());
                keys.extend(rule::row_keys(cs)?);
                if let Some(f) = &cs.fence {
                    leases.insert(f.lease.clone());
                }
            }
        }
        let origins: Vec<Vec<u8>> = origins.into_iter().collect();
        let (tbls, pks): (Vec<String>, Vec<Vec<u8>>) = keys.into_iter().unzip();
        let leases: Vec<String> = leases.into_iter().collect();
        let pair_params: [&(dyn ToSql + Sync); 2] = [&pairs.0, &pairs.1];
        let origin_params: [&(dyn ToSql + Sync); 1] = [&origins];
        let key_params: [&(dyn ToSql + Sync); 2] = [&tbls, &pks];
        let lease_params: [&(dyn ToSql + Sync); 1] = [&leases];
        let (existing, heads, scopes, rows, cells, held) = futures_util::try_join!(
            query(
                tx,
                "SELECT s.origin, s.origin_seq, s.server_seq, s.id FROM ferry_sets s
                 JOIN unnest($1::bytea[], $2::int8[]) AS k(o, n) ON s.origin = k.o AND s.origin_seq = k.n",
                &pair_params,
            ),
            query(
                tx,
                "SELECT origin, max_seq FROM ferry_origins WHERE origin = ANY($1)",
                &origin_params,
            ),
            query(
                tx,
                "SELECT s.tbl, s.pk, s.cl, s.scope, s.hlc, s.origin FROM ferry_row_scopes s
                 JOIN unnest($1::text[], $2::bytea[]) AS k(tbl, pk) ON s.tbl = k.tbl AND s.pk = k.pk",
                &key_params,
            ),
            query(
                tx,
                "SELECT s.tbl, s.pk, s.cl, s.row_seq, s.row_origin, s.w_seq, s.w_origin, s.o_seq, s.o_origin FROM ferry_cas_rows s
                 JOIN unnest($1::text[], $2::bytea[]) AS k(tbl, pk) ON s.tbl = k.tbl AND s.pk = k.pk",
                &key_params,
            ),
            query(
                tx,
                "SELECT s.tbl, s.pk, s.col, s.seq, s.origin FROM ferry_cas_cells s
                 JOIN unnest($1::text[], $2::bytea[]) AS k(tbl, pk) ON s.tbl = k.tbl AND s.pk = k.pk",
                &key_params,
            ),
            query(
                tx,
                "SELECT name, token, holder, expires_ms FROM ferry_leases WHERE name = ANY($1)",
                &lease_params,
            ),
        )?;
        let mut b = Batch::default();
        for r in existing {
            let id: Vec<u8> = r.get(3);
            b.existing.insert(
                (origin_of(r.get(0)), r.get::<_, i64>(1) as u64),
                (r.get::<_, i64>(2) as u64, rule::stored_id(&id)?),
            );
        }
        for r in heads {
            b.max_seq
                .insert(origin_of(r.get(0)), r.get::<_, i64>(1) as u64);
        }
        for r in scopes {
            b.scopes.scopes.insert(
                (r.get(0), r.get(1)),
                RowScope {
                    cl: r.get::<_, i64>(2) as u64,
                    scope: r.get(3),
                    hlc: Hlc(r.get::<_, i64>(4) as u64),
                    origin: origin_of(r.get(5)),
                },
            );
        }
        for r in rows {
            b.cas.rows.insert(
                (r.get(0), r.get(1)),
                RowStamp {
                    cl: r.get::<_, i64>(2) as u64,
                    row: CellStamp {
                        seq: r.get::<_, i64>(3) as u64,
                        origin: origin_of(r.get(4)),
                    },
                    write: CellStamp {
                        seq: r.get::<_, i64>(5) as u64,
                        origin: origin_of(r.get(6)),
                    },
                    other: CellStamp {
                        seq: r.get::<_, i64>(7) as u64,
                        origin: origin_of(r.get(8)),
                    },
                },
            );
        }
        for r in cells {
            b.cas.cells.entry((r.get(0), r.get(1))).or_default().push((
                r.get(2),
                CellStamp {
                    seq: r.get::<_, i64>(3) as u64,
                    origin: origin_of(r.get(4)),
                },
            ));
        }
        for r in held {
            b.leases.insert(
                r.get(0),
                LeaseState {
                    token: r.get::<_, i64>(1) as u64,
                    holder: ReplicaId::from_slice(r.get(2))
                        .ok_or_else(|| RelayError::Store("lease holder is not 16 bytes".into()))?,
                    expires_ms: r.get::<_, i64>(3) as u64,
                },
            );
        }
        Ok(b)
    }

    /// Applies an accepted change set to the in-memory state, as its rows would change the
    /// tables.
    fn accept(
        &mut self,
        cat: &RelayCatalog,
        s: &StoredSet,
        scopes: &[(String, ferry_core::Value, RowScope)],
        stamps: &[CasUpdate],
    ) -> Result<()> {
        let cs = &s.change_set;
        let seq = s.server_seq;
        self.existing
            .insert((cs.origin, cs.origin_seq), (seq, cs.id));
        self.max_seq.insert(cs.origin, cs.origin_seq);
        for (t, pk, scope) in scopes {
            let k = (t.clone(), scoping::pk_key(pk)?);
            self.scopes.scopes.insert(k.clone(), scope.clone());
            self.touched_scopes.insert(k);
        }
        self.record(stamps, seq, cs.origin)?;
        self.sets.seq.push(seq as i64);
        self.sets.origin.push(cs.origin.0.to_vec());
        self.sets.oseq.push(cs.origin_seq as i64);
        self.sets.id.push(cs.id.to_vec());
        self.sets.body.push(encode_set(s)?);
        self.index.add(s);
        for (t, pk) in rule::history_keys(cat, cs)? {
            self.hist.0.push(t);
            self.hist.1.push(pk);
            self.hist.2.push(seq as i64);
        }
        Ok(())
    }

    /// Records compare-and-set stamps the way the stamp tables are written: a row-level
    /// write restamps the row and clears its cell stamps; a plain write restamps the row's
    /// last write; checked cells are stamped one by one.
    fn record(&mut self, stamps: &[CasUpdate], seq: u64, origin: ReplicaId) -> Result<()> {
        let now = CellStamp { seq, origin };
        let none = CellStamp {
            seq: 0,
            origin: ReplicaId([0; 16]),
        };
        for u in stamps {
            let k = (u.table.clone(), scoping::pk_key(&u.pk)?);
            if u.write {
                let r = self
                    .cas
                    .rows
                    .entry(k.clone())
                    .or_insert(RowStamp::new(u.cl, none, none));
                r.cl = u.cl;
                if u.row_level {
                    r.row = now;
                }
                r.wrote(now);
            }
            if u.row_level {
                self.cas.cells.remove(&k);
            }
            if !u.cells.is_empty() {
                let cells = self.cas.cells.entry(k.clone()).or_default();
                for c in &u.cells {
                    match cells.iter_mut().find(|(x, _)| x == c) {
                        Some(slot) => slot.1 = now,
                        None => cells.push((c.clone(), now)),
                    }
                }
            }
            self.touched_cas.insert(k);
        }
        Ok(())
    }

    /// Writes the batch's final state: one round trip to clear the cell stamps it rewrites,
    /// one pipelined round trip for everything else.
    async fn write(&self, tx: &Tx<'_>) -> Result<()> {
        let mut scopes = ScopeCols::default();
        for k in &self.touched_scopes {
            if let Some(s) = self.scopes.scopes.get(k) {
                scopes.tbl.push(k.0.clone());
                scopes.pk.push(k.1.clone());
                scopes.cl.push(s.cl as i64);
                scopes.scope.push(s.scope.clone());
                scopes.hlc.push(s.hlc.0 as i64);
                scopes.origin.push(s.origin.0.to_vec());
            }
        }
        let mut rows = StampCols::default();
        let mut cells = CellCols::default();
        let (ct, cp): (Vec<String>, Vec<Vec<u8>>) = self.touched_cas.iter().cloned().unzip();
        for k in &self.touched_cas {
            if let Some(r) = self.cas.rows.get(k) {
                rows.tbl.push(k.0.clone());
                rows.pk.push(k.1.clone());
                rows.cl.push(r.cl as i64);
                rows.row_seq.push(r.row.seq as i64);
                rows.row_origin.push(stamp_origin(r.row));
                rows.w_seq.push(r.write.seq as i64);
                rows.w_origin.push(stamp_origin(r.write));
                rows.o_seq.push(r.other.seq as i64);
                rows.o_origin.push(stamp_origin(r.other));
            }
            for (c, s) in self.cas.cells.get(k).into_iter().flatten() {
                cells.tbl.push(k.0.clone());
                cells.pk.push(k.1.clone());
                cells.col.push(c.clone());
                cells.seq.push(s.seq as i64);
                cells.origin.push(s.origin.0.to_vec());
            }
        }
        let clear_params: [&(dyn ToSql + Sync); 2] = [&ct, &cp];
        execute(
            tx,
            !ct.is_empty(),
            "DELETE FROM ferry_cas_cells c USING unnest($1::text[], $2::bytea[]) AS k(tbl, pk)
             WHERE c.tbl = k.tbl AND c.pk = k.pk",
            &clear_params,
        )
        .await?;
        let (latest_origin, latest_seq) = self.origin_heads();
        let s = &self.sets;
        let set_params: [&(dyn ToSql + Sync); 5] = [&s.seq, &s.origin, &s.oseq, &s.id, &s.body];
        let origin_params: [&(dyn ToSql + Sync); 2] = [&latest_origin, &latest_seq];
        let scope_params: [&(dyn ToSql + Sync); 6] = [
            &scopes.tbl,
            &scopes.pk,
            &scopes.cl,
            &scopes.scope,
            &scopes.hlc,
            &scopes.origin,
        ];
        let hist_params: [&(dyn ToSql + Sync); 3] = [&self.hist.0, &self.hist.1, &self.hist.2];
        let row_params: [&(dyn ToSql + Sync); 9] = [
            &rows.tbl,
            &rows.pk,
            &rows.cl,
            &rows.row_seq,
            &rows.row_origin,
            &rows.w_seq,
            &rows.w_origin,
            &rows.o_seq,
            &rows.o_origin,
        ];
        let cell_params: [&(dyn ToSql + Sync); 5] =
            [&cells.tbl, &cells.pk, &cells.col, &cells.seq, &cells.origin];
        futures_util::try_join!(
            execute(
                tx,
                true,
                "INSERT INTO ferry_sets(server_seq, origin, origin_seq, id, body)
                 SELECT * FROM unnest($1::int8[], $2::bytea[], $3::int8[], $4::bytea[], $5::bytea[])",
                &set_params,
            ),
            execute(
                tx,
                true,
                "INSERT INTO ferry_origins(origin, max_seq) SELECT * FROM unnest($1::bytea[], $2::int8[])
                 ON CONFLICT (origin) DO UPDATE SET max_seq = excluded.max_seq",
                &origin_params,
            ),
            execute(
                tx,
                !scopes.tbl.is_empty(),
                "INSERT INTO ferry_row_scopes(tbl, pk, cl, scope, hlc, origin)
                 SELECT * FROM unnest($1::text[], $2::bytea[], $3::int8[], $4::text[], $5::int8[], $6::bytea[])
                 ON CONFLICT (tbl, pk) DO UPDATE SET cl = excluded.cl, scope = excluded.scope,
                 hlc = excluded.hlc, origin = excluded.origin",
                &scope_params,
            ),
            execute(
                tx,
                !self.hist.0.is_empty(),
                "INSERT INTO ferry_row_hist(tbl, pk, server_seq)
                 SELECT * FROM unnest($1::text[], $2::bytea[], $3::int8[]) ON CONFLICT DO NOTHING",
                &hist_params,
            ),
            execute(
                tx,
                !rows.tbl.is_empty(),
                "INSERT INTO ferry_cas_rows(tbl, pk, cl, row_seq, row_origin, w_seq, w_origin, o_seq, o_origin)
                 SELECT * FROM unnest($1::text[], $2::bytea[], $3::int8[], $4::int8[], $5::bytea[], $6::int8[], $7::bytea[], $8::int8[], $9::bytea[])
                 ON CONFLICT (tbl, pk) DO UPDATE SET cl = excluded.cl, row_seq = excluded.row_seq,
                 row_origin = excluded.row_origin, w_seq = excluded.w_seq, w_origin = excluded.w_origin,
                 o_seq = excluded.o_seq, o_origin = excluded.o_origin",
                &row_params,
            ),
            execute(
                tx,
                !cells.tbl.is_empty(),
                "INSERT INTO ferry_cas_cells(tbl, pk, col, seq, origin)
                 SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[], $4::int8[], $5::bytea[])",
                &cell_params,
            ),
            self.index.write(tx),
        )?;
        Ok(())
    }

    /// Each origin written by the batch with its highest origin_seq.
    fn origin_heads(&self) -> (Vec<Vec<u8>>, Vec<i64>) {
        let mut latest: HashMap<&[u8], i64> = HashMap::new();
        for (o, n) in self.sets.origin.iter().zip(&self.sets.oseq) {
            let e = latest.entry(o.as_slice()).or_insert(*n);
            *e = (*e).max(*n);
        }
        latest.into_iter().map(|(o, n)| (o.to_vec(), n)).unzip()
    }
}

/// A stamp's origin column: empty for "no stamp", as the single-statement path writes it.
fn stamp_origin(s: CellStamp) -> Vec<u8> {
    if s.seq == 0 {
        Vec::new()
    } else {
        s.origin.0.to_vec()
    }
}

#[derive(Default)]
struct ScopeCols {
    tbl: Vec<String>,
    pk: Vec<Vec<u8>>,
    cl: Vec<i64>,
    scope: Vec<String>,
    hlc: Vec<i64>,
    origin: Vec<Vec<u8>>,
}

#[derive(Default)]
struct StampCols {
    tbl: Vec<String>,
    pk: Vec<Vec<u8>>,
    cl: Vec<i64>,
    row_seq: Vec<i64>,
    row_origin: Vec<Vec<u8>>,
    w_seq: Vec<i64>,
    w_origin: Vec<Vec<u8>>,
    o_seq: Vec<i64>,
    o_origin: Vec<Vec<u8>>,
}

#[derive(Default)]
struct CellCols {
    tbl: Vec<String>,
    pk: Vec<Vec<u8>>,
    col: Vec<String>,
    seq: Vec<i64>,
    origin: Vec<Vec<u8>>,
}
