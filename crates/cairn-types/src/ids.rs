//! Identifier newtypes. Each is checked when built so that a zero or out-of-range id never travels.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why an id could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{0} must not be zero")]
    Zero(&'static str),
}

macro_rules! nonzero_id {
    ($(#[$m:meta])* $name:ident, $label:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "u64", into = "u64")]
        pub struct $name(u64);

        impl $name {
            /// Builds the id; zero is reserved for "none" and refused.
            pub fn new(raw: u64) -> Result<Self, IdError> {
                if raw == 0 { Err(IdError::Zero($label)) } else { Ok(Self(raw)) }
            }
            pub fn get(self) -> u64 {
                self.0
            }
        }

        impl TryFrom<u64> for $name {
            type Error = IdError;
            fn try_from(raw: u64) -> Result<Self, IdError> {
                Self::new(raw)
            }
        }

        impl From<$name> for u64 {
            fn from(id: $name) -> u64 {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

nonzero_id!(
    /// A volume's id. Assigned by metadata, never reused, never zero.
    VolumeId,
    "volume id"
);
nonzero_id!(
    /// A storage node's id, unique in a pool, never zero.
    NodeId,
    "node id"
);

/// Index of a chunk inside its volume: chunk `i` covers bytes `[i * chunk_size, (i + 1) * chunk_size)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkIndex(pub u64);

impl fmt::Display for ChunkIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A writer generation. Metadata hands out strictly increasing generations; storage nodes refuse writes
/// carrying a generation lower than the highest they have persisted for the volume. Zero means "never
/// written" and is what a fresh volume starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A placement group number, `0 .. pg_count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PgId(pub u32);

impl fmt::Display for PgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_ids_are_refused() {
        assert!(VolumeId::new(0).is_err());
        assert!(NodeId::new(0).is_err());
        assert_eq!(VolumeId::new(7).map(VolumeId::get), Ok(7));
    }
}
