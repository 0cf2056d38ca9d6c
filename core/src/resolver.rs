//! Custom conflict resolution, for columns with the `custom` policy.
//!
//! Built-in merge is a pure function of the two versions, so every replica agrees without
//! talking. A custom resolver is app code and may not be pure, so it runs in exactly one
//! place: on the device whose pending (not yet acknowledged) write met a concurrent incoming
//! one. Its answer is written as a new local change, which carries a newer HLC than both
//! sides and so wins everywhere once pushed.

use crate::value::Value;

/// What the resolver sees.
#[derive(Debug, Clone, PartialEq)]
pub struct ConflictInput {
    /// Table.
    pub table: String,
    /// Row key.
    pub pk: Value,
    /// Column.
    pub column: String,
    /// This device's pending value.
    pub local: Value,
    /// The concurrent incoming value.
    pub remote: Value,
    /// The value the built-in rule (lww) picked and the row holds now.
    pub merged: Value,
}

/// The resolver's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// Keep this device's value.
    KeepLocal,
    /// Take the incoming value.
    TakeRemote,
    /// Write this value instead.
    Value(Value),
}

/// App-supplied conflict resolver.
pub trait Resolver: Send + Sync {
    /// Decides a conflict on a `custom` column.
    fn resolve(&self, conflict: &ConflictInput) -> Resolution;
}

impl<F> Resolver for F
where
    F: Fn(&ConflictInput) -> Resolution + Send + Sync,
{
    fn resolve(&self, conflict: &ConflictInput) -> Resolution {
        self(conflict)
    }
}
