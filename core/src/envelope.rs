//! Stored bodies: a change set as it rests on disk, versioned apart from the wire.
//!
//! The same [`ChangeSet`](crate::ChangeSet) travels in push and changes frames, waits in the
//! device's change log and is kept in the relay's store. If all three used its serde form
//! directly, changing the frame would silently be a storage migration on both sides. So what
//! is stored is *sealed*: a marker byte that MessagePack never produces (`0xc1`), the stored
//! format's version, then the body. A future wire change bumps [`STORED_VERSION`] and keeps a
//! reader for the old one; golden files (`core/tests/golden/stored_*.hex`, the relay's
//! `server/tests/golden/stored_set.hex`) freeze today's bytes so that no change slips through.
//!
//! Bodies written before envelopes existed (no marker) are read as version 0, which is the
//! same serde form as version 1.

use crate::error::{Error, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// First byte of a sealed body: reserved ("never used") in MessagePack, so it cannot begin
/// an unsealed (version 0) body.
pub const MARKER: u8 = 0xc1;

/// The stored format this build writes.
pub const STORED_VERSION: u8 = 1;

/// Seals `body` for storage in the current stored format.
pub fn seal<T: Serialize + ?Sized>(body: &T) -> Result<Vec<u8>> {
    let mut out = vec![MARKER, STORED_VERSION];
    rmp_serde::encode::write_named(&mut out, body)?;
    Ok(out)
}

/// Opens a body sealed by [`seal`] (any version this build reads, or an unsealed one).
pub fn open<T: DeserializeOwned>(stored: &[u8]) -> Result<T> {
    match stored {
        [MARKER, 1, body @ ..] => Ok(rmp_serde::from_slice(body)?),
        [MARKER, v, ..] => Err(Error::Corrupt(format!(
            "a stored change set is in format {v}, written by a newer Ferry; this build reads up to {STORED_VERSION}"
        ))),
        [MARKER] => Err(Error::Corrupt(
            "a stored change set body is truncated".into(),
        )),
        unsealed => Ok(rmp_serde::from_slice(unsealed)?),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sealed_and_unsealed_bodies_open_alike() {
        let v = (7u64, "x".to_owned());
        let sealed = seal(&v).unwrap();
        assert_eq!(&sealed[..2], &[MARKER, STORED_VERSION]);
        assert_eq!(open::<(u64, String)>(&sealed).unwrap(), v);
        let unsealed = rmp_serde::to_vec_named(&v).unwrap();
        assert_eq!(open::<(u64, String)>(&unsealed).unwrap(), v);
        let newer = [MARKER, STORED_VERSION + 1, 0x90];
        assert!(matches!(
            open::<(u64, String)>(&newer),
            Err(Error::Corrupt(_))
        ));
        assert!(matches!(
            open::<(u64, String)>(&[MARKER]),
            Err(Error::Corrupt(_))
        ));
    }
}
