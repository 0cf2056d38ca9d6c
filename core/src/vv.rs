//! The two-entry version vector that decides happened-before versus concurrent.
//!
//! A change's causal context is `{relay: base, origin: origin_seq}`. X happened before Y iff
//! they share an origin and `X.origin_seq < Y.origin_seq`, or X was sequenced at or before
//! the relay cursor Y's origin had applied (`X.server_seq <= Y.base`). Otherwise they are
//! concurrent. This is O(1) metadata per change whatever the number of devices, because the
//! relay's total order summarises everything a replica has seen.

/// The causal identity of a write, as stored per cell and per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    /// HLC of the change set.
    pub hlc: crate::hlc::Hlc,
    /// Local intern number of the origin replica (see `origins`).
    pub origin: u32,
    /// Origin sequence number.
    pub origin_seq: u64,
    /// Relay position; 0 while unknown (the replica's own pending change).
    pub server_seq: u64,
    /// The relay cursor the origin had applied.
    pub base: u64,
}

impl Version {
    /// The version of a cell no write has set in the row's current incarnation: a column
    /// the app schema gained after the incarnation began (its creator, on an older schema,
    /// did not write it). It happened before every write, so any write to the cell wins, on
    /// every replica and in any order. Real change sets have `origin_seq` ≥ 1.
    pub const UNWRITTEN: Version = Version {
        hlc: crate::hlc::Hlc(0),
        origin: 0,
        origin_seq: 0,
        server_seq: 0,
        base: 0,
    };
}

/// Happened-before between two versions. `seq_of` resolves a version's server_seq when it
/// is not stored (this replica's own changes, acknowledged after they were written).
pub fn happened_before(a: &Version, b: &Version, seq_of: impl Fn(&Version) -> Option<u64>) -> bool {
    if a.origin_seq == 0 {
        // Version::UNWRITTEN: before every write.
        return true;
    }
    if a.origin == b.origin && a.origin_seq < b.origin_seq {
        return true;
    }
    let sa = if a.server_seq != 0 {
        Some(a.server_seq)
    } else {
        seq_of(a)
    };
    sa.is_some_and(|s| s <= b.base)
}

/// Neither happened before the other.
pub fn concurrent(
    a: &Version,
    b: &Version,
    seq_of: impl Fn(&Version) -> Option<u64> + Copy,
) -> bool {
    !happened_before(a, b, seq_of) && !happened_before(b, a, seq_of)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;

    fn v(origin: u32, oseq: u64, sseq: u64, base: u64) -> Version {
        Version {
            hlc: Hlc::new(1, 0),
            origin,
            origin_seq: oseq,
            server_seq: sseq,
            base,
        }
    }
    fn none(_: &Version) -> Option<u64> {
        None
    }

    #[test]
    fn same_origin_is_ordered_by_origin_seq() {
        assert!(happened_before(&v(1, 1, 0, 0), &v(1, 2, 0, 0), none));
        assert!(!happened_before(&v(1, 2, 0, 0), &v(1, 1, 0, 0), none));
    }

    #[test]
    fn seen_through_the_relay_cursor() {
        let x = v(1, 1, 5, 0);
        let y = v(2, 1, 9, 5);
        assert!(happened_before(&x, &y, none));
        assert!(!concurrent(&x, &y, none));
        let z = v(2, 1, 9, 4);
        assert!(concurrent(&x, &z, none));
    }

    #[test]
    fn unknown_server_seq_is_resolved_by_lookup() {
        let mine = v(1, 3, 0, 0);
        let theirs = v(2, 1, 12, 10);
        assert!(concurrent(&mine, &theirs, none));
        assert!(happened_before(&mine, &theirs, |_| Some(10)));
        assert!(!happened_before(&mine, &theirs, |_| Some(11)));
    }
}
