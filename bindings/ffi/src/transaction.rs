//! The app's write transaction across the FFI: a thin object over `ferry_core::Transaction`.

use crate::error::Result;
use crate::num::{self, Signed};
use crate::types::{LeaseGrant, QueryResult, SqlValue};
use ferry_core as core;
use parking_lot::Mutex;

/// An open write transaction (from `Replica.beginWrite`). Dropping it rolls back.
#[derive(uniffi::Object)]
pub struct WriteTransaction {
    pub(crate) inner: Mutex<core::Transaction>,
}

#[uniffi::export]
impl WriteTransaction {
    /// Runs one statement; returns rows changed.
    pub fn execute(&self, sql: String, params: Vec<SqlValue>) -> Result<i64> {
        Ok(self
            .inner
            .lock()
            .execute(&sql, &crate::types::params(params))?
            .signed())
    }

    /// Runs one statement once per parameter row, prepared once: the fast way to write many
    /// rows (one call across the FFI instead of one per row). Returns rows changed in all.
    pub fn execute_many(&self, sql: String, rows: Vec<Vec<SqlValue>>) -> Result<i64> {
        let rows: Vec<Vec<core::Value>> = rows.into_iter().map(crate::types::params).collect();
        Ok(self.inner.lock().execute_many(&sql, &rows)?.signed())
    }

    /// The name of each parameter of `sql` in binding order (`:id` with its prefix; `None`
    /// for `?`): how a host language binds a mapping of named parameters by position.
    pub fn parameter_names(&self, sql: String) -> Result<Vec<Option<String>>> {
        Ok(self.inner.lock().parameter_names(&sql)?)
    }

    /// `execute` with the parameters as one JSON array (the packed form).
    pub fn execute_packed(&self, sql: String, params: String) -> Result<i64> {
        let params = crate::packed::params(&params)?;
        Ok(self.inner.lock().execute(&sql, &params)?.signed())
    }

    /// `execute_many` with the parameter rows as one JSON array of arrays (the packed form).
    pub fn execute_many_packed(&self, sql: String, rows: String) -> Result<i64> {
        let rows = crate::packed::param_rows(&rows)?;
        Ok(self.inner.lock().execute_many(&sql, &rows)?.signed())
    }

    /// `query` with parameters and results in the packed JSON form.
    pub fn query_packed(&self, sql: String, params: String) -> Result<String> {
        let params = crate::packed::params(&params)?;
        crate::packed::rows(&self.inner.lock().query(&sql, &params)?)
    }

    /// Runs a query that sees this transaction's writes.
    pub fn query(&self, sql: String, params: Vec<SqlValue>) -> Result<QueryResult> {
        Ok(self
            .inner
            .lock()
            .query(&sql, &crate::types::params(params))?
            .into())
    }

    /// Commits; what was written becomes one change set.
    pub fn commit(&self) -> Result<()> {
        Ok(self.inner.lock().commit()?)
    }

    /// Commits and returns the id of the change set it made (None when nothing synced was
    /// written), for `SyncSession.verdict`.
    pub fn commit_change(&self) -> Result<Option<String>> {
        Ok(self.inner.lock().commit_change()?.map(|id| id.to_string()))
    }

    /// Guards this transaction with a lease grant (call before writing): the relay refuses
    /// its change set, and the replica rolls it back, unless the grant is still current.
    pub fn guard(&self, lease: LeaseGrant) -> Result<()> {
        let token = num::unsigned("lease token", lease.token)?;
        Ok(self.inner.lock().guard(core::Fence {
            lease: lease.name,
            token,
        })?)
    }

    /// Rolls everything back (does nothing once finished).
    pub fn rollback(&self) -> Result<()> {
        Ok(self.inner.lock().rollback()?)
    }

    /// True until committed or rolled back.
    pub fn is_open(&self) -> bool {
        self.inner.lock().is_open()
    }
}
