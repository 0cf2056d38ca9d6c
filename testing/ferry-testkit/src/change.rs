//! A [`ChangeSet`] builder: a test names the fields it is about and gets sensible values for the
//! rest (a fresh id, stamped now, base 0, schema version 1, no fence).

use ferry_core::{Cell, ChangeSet, Fence, Hlc, ReplicaId, RowChange, RowOp, Value};

/// A change set being built; [`Build::build`] returns it.
#[derive(Debug, Clone)]
pub struct Build(ChangeSet);

/// Starts a change set of `origin` at `origin_seq`.
pub fn change_set(origin: ReplicaId, origin_seq: u64) -> Build {
    Build(ChangeSet {
        id: ulid::Ulid::generate().to_bytes(),
        origin,
        origin_seq,
        hlc: Hlc::new(ferry_relay::auth::now_secs() * 1000, 0),
        base: 0,
        schema_version: 1,
        rows: vec![],
        fence: None,
        guarded: false,
    })
}

impl Build {
    /// Its id.
    pub fn id(mut self, id: [u8; 16]) -> Build {
        self.0.id = id;
        self
    }

    /// Its timestamp.
    pub fn hlc(mut self, hlc: Hlc) -> Build {
        self.0.hlc = hlc;
        self
    }

    /// The relay position its origin had applied.
    pub fn base(mut self, base: u64) -> Build {
        self.0.base = base;
        self
    }

    /// The schema version its origin ran.
    pub fn schema_version(mut self, v: u32) -> Build {
        self.0.schema_version = v;
        self
    }

    /// Written under grant `token` of lease `lease`.
    pub fn fence(mut self, lease: &str, token: u64) -> Build {
        self.0.fence = Some(Fence {
            lease: lease.into(),
            token,
        });
        self
    }

    /// Made while a change set the relay may refuse was pending.
    pub fn guarded(mut self) -> Build {
        self.0.guarded = true;
        self
    }

    /// Adds an upsert of row `pk` of `table` at causal length `cl` (odd: alive).
    pub fn upsert(self, table: &str, pk: impl Into<Value>, cl: u64, cells: Vec<Cell>) -> Build {
        self.row(table, pk, cl, RowOp::Upsert(cells))
    }

    /// Adds a delete of row `pk` of `table` at causal length `cl` (even: deleted).
    pub fn delete(self, table: &str, pk: impl Into<Value>, cl: u64) -> Build {
        self.row(table, pk, cl, RowOp::Delete)
    }

    /// Adds a row change.
    pub fn row(mut self, table: &str, pk: impl Into<Value>, cl: u64, op: RowOp) -> Build {
        self.0.rows.push(RowChange {
            table: table.into(),
            pk: pk.into(),
            cl,
            op,
        });
        self
    }

    /// Adds row changes.
    pub fn rows(mut self, rows: impl IntoIterator<Item = RowChange>) -> Build {
        self.0.rows.extend(rows);
        self
    }

    /// The change set.
    pub fn build(self) -> ChangeSet {
        self.0
    }
}

/// A cell set to a value.
pub fn set(column: &str, v: impl Into<Value>) -> Cell {
    Cell::Set(column.into(), v.into())
}

/// A counter cell incremented by `n`.
pub fn add(column: &str, n: i64) -> Cell {
    Cell::Add(column.into(), n)
}

/// A text value.
pub fn t(s: &str) -> Value {
    Value::Text(s.into())
}

/// An integer value.
pub fn i(n: i64) -> Value {
    Value::Integer(n)
}
