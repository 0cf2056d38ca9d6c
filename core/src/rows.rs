//! Row-level storage helpers shared by materialize and apply: per-row metadata, tombs,
//! origin interning and the SQL that writes user tables.

use crate::error::{Error, Result};
use crate::ids::ReplicaId;
use crate::rowmeta::RowMeta;
use crate::schema::quote;
use crate::tables::TableInfo;
use crate::value::Value;
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashMap;

/// Metadata of one row plus, for deleted rows of `update_wins` tables, its last values.
#[derive(Debug, Clone, Default)]
pub struct Stored {
    /// Merge metadata.
    pub meta: RowMeta,
    /// Last values (by column id) of a deleted row, for `update_wins` tables.
    pub tomb: Option<Vec<(u32, Value)>>,
}

/// Loads a row's metadata.
pub fn load(conn: &Connection, t: &TableInfo, pk: &Value) -> Result<Option<Stored>> {
    let row: Option<(i64, Vec<u8>, Option<Vec<u8>>)> = conn
        .prepare_cached("SELECT cl, meta, tomb FROM ferry_rows WHERE tbl = ?1 AND pk = ?2")?
        .query_row(params![t.id, pk], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((cl, meta, tomb)) = row else {
        return Ok(None);
    };
    let meta = RowMeta::decode(cl as u64, &meta)?;
    let tomb = match tomb {
        Some(b) => Some(rmp_serde::from_slice(&b)?),
        None => None,
    };
    Ok(Some(Stored { meta, tomb }))
}

/// Stores a row's metadata.
pub fn store(conn: &Connection, t: &TableInfo, pk: &Value, s: &Stored) -> Result<()> {
    let tomb = match &s.tomb {
        Some(v) => Some(rmp_serde::to_vec(v)?),
        None => None,
    };
    conn.prepare_cached(
        "INSERT OR REPLACE INTO ferry_rows(tbl, pk, cl, meta, tomb) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![t.id, pk, s.meta.cl as i64, s.meta.encode(), tomb])?;
    Ok(())
}

/// Removes a row's metadata (the row left this replica's scopes).
pub fn forget(conn: &Connection, t: &TableInfo, pk: &Value) -> Result<()> {
    conn.prepare_cached("DELETE FROM ferry_rows WHERE tbl = ?1 AND pk = ?2")?
        .execute(params![t.id, pk])?;
    Ok(())
}

/// Inserts (or replaces) a whole row with the given column values; others take defaults.
pub fn insert_row(
    conn: &Connection,
    t: &TableInfo,
    pk: &Value,
    cells: &[(usize, Value)],
) -> Result<()> {
    let whole = cells.len() + 1 == t.cols.len()
        && cells
            .iter()
            .map(|(i, _)| *i)
            .eq((0..t.cols.len()).filter(|i| *i != t.pk));
    let built;
    let sql = if whole {
        t.insert_whole.as_str()
    } else {
        built = insert_sql(t.name(), &t.cols, t.pk, cells.iter().map(|(i, _)| *i));
        built.as_str()
    };
    let mut vals: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(cells.len() + 1);
    vals.push(pk);
    vals.extend(cells.iter().map(|(_, v)| v as &dyn rusqlite::ToSql));
    conn.prepare_cached(sql)?.execute(vals.as_slice())?;
    Ok(())
}

/// The `INSERT OR REPLACE` statement of [`insert_row`] for the key and `columns`.
pub(crate) fn insert_sql(
    table: &str,
    cols: &[crate::tables::ColInfo],
    pk: usize,
    columns: impl Iterator<Item = usize>,
) -> String {
    let mut names = vec![quote(&cols[pk].name)];
    names.extend(columns.map(|i| quote(&cols[i].name)));
    let marks: Vec<String> = (1..=names.len()).map(|i| format!("?{i}")).collect();
    format!(
        "INSERT OR REPLACE INTO {} ({}) VALUES ({}) /* ferry apply */",
        quote(table),
        names.join(", "),
        marks.join(", ")
    )
}

/// Sets cells and adds counter deltas on an existing row.
pub fn update_row(
    conn: &Connection,
    t: &TableInfo,
    pk: &Value,
    sets: &[(usize, Value)],
    adds: &[(usize, i64)],
) -> Result<()> {
    if sets.is_empty() && adds.is_empty() {
        return Ok(());
    }
    let mut parts = Vec::new();
    let mut n = 1;
    for (i, _) in sets {
        parts.push(format!("{} = ?{n}", quote(&t.cols[*i].name)));
        n += 1;
    }
    for (i, _) in adds {
        let c = quote(&t.cols[*i].name);
        parts.push(format!("{c} = {c} + ?{n}"));
        n += 1;
    }
    let sql = format!(
        "UPDATE {} SET {} WHERE {} = ?{n} /* ferry apply */",
        quote(t.name()),
        parts.join(", "),
        quote(&t.cols[t.pk].name)
    );
    let mut vals: Vec<&dyn rusqlite::ToSql> = Vec::new();
    vals.extend(sets.iter().map(|(_, v)| v as &dyn rusqlite::ToSql));
    vals.extend(adds.iter().map(|(_, d)| d as &dyn rusqlite::ToSql));
    vals.push(pk);
    conn.prepare_cached(&sql)?.execute(vals.as_slice())?;
    Ok(())
}

/// Deletes a row.
pub fn delete_row(conn: &Connection, t: &TableInfo, pk: &Value) -> Result<()> {
    let sql = format!(
        "DELETE FROM {} WHERE {} = ?1 /* ferry apply */",
        quote(t.name()),
        quote(&t.cols[t.pk].name)
    );
    conn.prepare_cached(&sql)?.execute([pk])?;
    Ok(())
}

/// Interned replica ids: metadata stores a small number per origin instead of 16 bytes.
#[derive(Debug, Default, Clone)]
pub struct Origins {
    ids: HashMap<ReplicaId, u32>,
    by_num: HashMap<u32, ReplicaId>,
}

impl Origins {
    /// Loads every known origin.
    pub fn load(conn: &Connection) -> Result<Self> {
        let mut o = Origins::default();
        let mut st = conn.prepare("SELECT id, replica_id FROM ferry_origins")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let n: i64 = r.get(0)?;
            let b: Vec<u8> = r.get(1)?;
            let id =
                ReplicaId::from_slice(&b).ok_or_else(|| Error::Corrupt("bad origin id".into()))?;
            o.ids.insert(id, n as u32);
            o.by_num.insert(n as u32, id);
        }
        Ok(o)
    }

    /// The number for a replica id, adding it if new (inside the caller's transaction; the
    /// in-memory copy must be reloaded if that transaction rolls back).
    pub fn intern(&mut self, conn: &Connection, id: ReplicaId) -> Result<u32> {
        if let Some(n) = self.ids.get(&id) {
            return Ok(*n);
        }
        conn.prepare_cached("INSERT INTO ferry_origins(replica_id) VALUES (?1)")?
            .execute([id.0.to_vec()])?;
        let n = conn.last_insert_rowid() as u32;
        self.ids.insert(id, n);
        self.by_num.insert(n, id);
        Ok(n)
    }

    /// The replica id of a number.
    pub fn get(&self, n: u32) -> ReplicaId {
        self.by_num.get(&n).copied().unwrap_or(ReplicaId([0; 16]))
    }
}

/// Reads the current values of a row (for materializing rows Ferry has no metadata for).
pub fn read_row(conn: &Connection, t: &TableInfo, pk: &Value) -> Result<Option<Vec<Value>>> {
    let sql = format!(
        "SELECT {} FROM {} WHERE {} = ?1",
        t.select_list(),
        quote(t.name()),
        quote(&t.cols[t.pk].name)
    );
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([pk], |r| {
            (0..t.cols.len()).map(|i| r.get::<_, Value>(i)).collect()
        })
        .optional()?)
}
