//! Per-row merge metadata, stored compactly as one row per primary key in `ferry_rows`.
//!
//! A row's metadata holds its causal length, the version of each cell's current value (the
//! versions are de-duplicated, so a row written by one change set stores one version), and
//! the version of the delete that removed it. For `update_wins` tables a deleted row also
//! keeps its last values (`tomb`), because a concurrent update must be able to bring the row
//! back in any delivery order. The encoding is a small hand-written varint format: it is on
//! the hot path of every merge, and the layout is frozen by a test.

use crate::error::{Error, Result};
use crate::hlc::Hlc;
use crate::vv::Version;

/// Decoded metadata of one row.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RowMeta {
    /// Causal length: odd = exists, even = deleted.
    pub cl: u64,
    /// `(column id, version)` of cells written since the current incarnation began.
    pub cells: Vec<(u32, Version)>,
    /// Version of the write that began the current incarnation (insert) or deleted it.
    pub row: Option<Version>,
    /// The latest write (set or counter add) to the current incarnation per origin. A delete
    /// is concurrent with an update iff it did not see one of these; keeping one per origin
    /// (not only the winning value's) makes that answer independent of arrival order.
    pub writes: Vec<Version>,
}

impl RowMeta {
    /// The version of a cell's current value (falls back to the row's creation version).
    pub fn cell(&self, col: u32) -> Option<Version> {
        self.cells
            .iter()
            .find(|(c, _)| *c == col)
            .map(|(_, v)| *v)
            .or(self.row)
    }

    /// Every version the metadata holds (row, cells, latest writes).
    pub fn versions(&self) -> impl Iterator<Item = &Version> {
        self.row
            .iter()
            .chain(self.cells.iter().map(|(_, v)| v))
            .chain(self.writes.iter())
    }

    /// Records a cell's new version.
    pub fn set_cell(&mut self, col: u32, v: Version) {
        match self.cells.iter_mut().find(|(c, _)| *c == col) {
            Some(slot) => slot.1 = v,
            None => self.cells.push((col, v)),
        }
    }

    /// Notes a write to the current incarnation.
    pub fn note_write(&mut self, v: Version) {
        match self.writes.iter_mut().find(|w| w.origin == v.origin) {
            Some(w) => {
                if v.origin_seq >= w.origin_seq {
                    *w = v;
                }
            }
            None => self.writes.push(v),
        }
    }

    /// Starts a new incarnation begun by `v`.
    pub fn reincarnate(&mut self, cl: u64, v: Version) {
        self.cl = cl;
        self.cells.clear();
        self.row = Some(v);
        self.writes = vec![v];
    }

    /// Replaces every occurrence of version `old` by `new`; true if there was one.
    pub fn swap_version(&mut self, old: &Version, new: &Version) -> bool {
        let mut hit = false;
        let mut swap = |v: &mut Version| {
            if v == old {
                *v = *new;
                hit = true;
            }
        };
        self.row.iter_mut().for_each(&mut swap);
        self.cells.iter_mut().for_each(|(_, v)| swap(v));
        self.writes.iter_mut().for_each(&mut swap);
        hit
    }

    /// Gives every version of change set `(origin, origin_seq)` the timestamp `hlc`; true if
    /// there was one.
    pub fn restamp(&mut self, origin: u32, origin_seq: u64, hlc: crate::hlc::Hlc) -> bool {
        let mut hit = false;
        let mut fix = |v: &mut Version| {
            if v.origin == origin && v.origin_seq == origin_seq {
                v.hlc = hlc;
                hit = true;
            }
        };
        self.row.iter_mut().for_each(&mut fix);
        self.cells.iter_mut().for_each(|(_, v)| fix(v));
        self.writes.iter_mut().for_each(&mut fix);
        hit
    }

    /// Marks the columns (but the key `pk`) that the write creating this incarnation did not
    /// set as [`Version::UNWRITTEN`]: its author was on an older app schema without them.
    pub fn mark_unwritten(&mut self, ncols: usize, pk: usize, written: impl Fn(usize) -> bool) {
        for i in (0..ncols).filter(|i| *i != pk && !written(*i)) {
            self.set_cell(i as u32, Version::UNWRITTEN);
        }
    }

    /// Pins every column's current version explicitly, so that the row version can be
    /// replaced (by a delete) without changing what each cell's version is.
    pub fn freeze_cells(&mut self, ncols: usize) {
        if let Some(row) = self.row {
            for c in 0..ncols as u32 {
                if !self.cells.iter().any(|(x, _)| *x == c) {
                    self.cells.push((c, row));
                }
            }
        }
    }

    /// Encodes to bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut uniq: Vec<Version> = Vec::new();
        let idx = |v: &Version, uniq: &mut Vec<Version>| -> u64 {
            match uniq.iter().position(|u| u == v) {
                Some(i) => i as u64,
                None => {
                    uniq.push(*v);
                    (uniq.len() - 1) as u64
                }
            }
        };
        let row_idx = self.row.as_ref().map(|v| idx(v, &mut uniq));
        let cell_idx: Vec<(u32, u64)> = self
            .cells
            .iter()
            .map(|(c, v)| (*c, idx(v, &mut uniq)))
            .collect();
        let write_idx: Vec<u64> = self.writes.iter().map(|v| idx(v, &mut uniq)).collect();
        let mut out = Vec::with_capacity(8 + uniq.len() * 20 + cell_idx.len() * 3);
        out.push(1u8); // layout version
        put(&mut out, uniq.len() as u64);
        for v in &uniq {
            put(&mut out, v.hlc.0);
            put(&mut out, u64::from(v.origin));
            put(&mut out, v.origin_seq);
            put(&mut out, v.server_seq);
            put(&mut out, v.base);
        }
        put(&mut out, row_idx.map_or(0, |i| i + 1));
        put(&mut out, cell_idx.len() as u64);
        for (c, i) in cell_idx {
            put(&mut out, u64::from(c));
            put(&mut out, i);
        }
        put(&mut out, write_idx.len() as u64);
        for i in write_idx {
            put(&mut out, i);
        }
        out
    }

    /// Decodes bytes written by [`RowMeta::encode`].
    pub fn decode(cl: u64, b: &[u8]) -> Result<Self> {
        let mut r = Reader { b, pos: 0 };
        let layout = r.byte()?;
        if layout != 1 {
            return Err(Error::Corrupt(format!(
                "row metadata layout {layout} is unknown"
            )));
        }
        let n = r.len()?;
        let mut uniq = Vec::with_capacity(n);
        for _ in 0..n {
            uniq.push(Version {
                hlc: Hlc(r.get()?),
                origin: r.small()?,
                origin_seq: r.get()?,
                server_seq: r.get()?,
                base: r.get()?,
            });
        }
        let pick = |i: u64, uniq: &[Version]| -> Result<Version> {
            uniq.get(i as usize)
                .copied()
                .ok_or_else(|| Error::Corrupt("row metadata refers to a missing version".into()))
        };
        let row = match r.get()? {
            0 => None,
            i => Some(pick(i - 1, &uniq)?),
        };
        let nc = r.len()?;
        let mut cells = Vec::with_capacity(nc);
        for _ in 0..nc {
            let c = r.small()?;
            let i = r.get()?;
            cells.push((c, pick(i, &uniq)?));
        }
        let nw = r.len()?;
        let mut writes = Vec::with_capacity(nw);
        for _ in 0..nw {
            let i = r.get()?;
            writes.push(pick(i, &uniq)?);
        }
        if r.pos != b.len() {
            return Err(Error::Corrupt("row metadata has trailing bytes".into()));
        }
        Ok(RowMeta {
            cl,
            cells,
            row,
            writes,
        })
    }
}

fn put(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7F) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8> {
        let v = *self
            .b
            .get(self.pos)
            .ok_or_else(|| Error::Corrupt("row metadata is truncated".into()))?;
        self.pos += 1;
        Ok(v)
    }
    fn get(&mut self) -> Result<u64> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7F) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Error::Corrupt("row metadata varint is too long".into()))
    }
    fn small(&mut self) -> Result<u32> {
        u32::try_from(self.get()?)
            .map_err(|_| Error::Corrupt("row metadata id out of range".into()))
    }
    fn len(&mut self) -> Result<usize> {
        let n = self.get()?;
        if n > 1 << 20 {
            return Err(Error::Corrupt("row metadata length out of range".into()));
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(h: u64, o: u32, s: u64) -> Version {
        Version {
            hlc: Hlc(h),
            origin: o,
            origin_seq: s,
            server_seq: s * 10,
            base: 3,
        }
    }

    #[test]
    fn roundtrip_and_dedup() {
        let mut m = RowMeta {
            cl: 3,
            cells: vec![],
            row: Some(v(100, 1, 1)),
            writes: vec![],
        };
        m.note_write(v(100, 1, 1));
        m.note_write(v(200, 2, 7));
        m.note_write(v(300, 1, 2));
        assert_eq!(m.writes, vec![v(300, 1, 2), v(200, 2, 7)]);
        m.set_cell(0, v(100, 1, 1));
        m.set_cell(2, v(200, 2, 7));
        m.set_cell(0, v(300, 1, 2));
        let enc = m.encode();
        assert_eq!(RowMeta::decode(3, &enc).ok(), Some(m.clone()));
        assert_eq!(m.cell(5), Some(v(100, 1, 1)));
        assert_eq!(m.cell(2), Some(v(200, 2, 7)));
    }

    #[test]
    fn frozen_layout() {
        let m = RowMeta {
            cl: 1,
            cells: vec![(1, v(5, 1, 1))],
            row: Some(v(5, 1, 1)),
            writes: vec![v(5, 1, 1)],
        };
        assert_eq!(m.encode(), vec![1, 1, 5, 1, 1, 10, 3, 1, 1, 1, 0, 1, 0]);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &[][..],
            &[2][..],
            &[1, 5][..],
            &[1, 0, 0, 1, 0, 9][..],
            &[1, 0xFF, 0xFF, 0xFF][..],
        ] {
            assert!(RowMeta::decode(1, bad).is_err());
        }
    }
}
