//! Chunk versions.
//!
//! A chunk's version is `(generation, seq)`, ordered lexicographically: the writer generation that
//! made its last mutation and that writer's count of mutations of the chunk. Within one generation
//! there is one writer (fencing), so one version names one content (I7: the versions counted
//! members hold of a chunk are prefixes of one chain).

use serde::{Deserialize, Serialize};

/// A chunk's version. `Version::NONE` is a chunk never written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Version {
    pub generation: u64,
    pub seq: u64,
}

impl Version {
    pub const NONE: Version = Version { generation: 0, seq: 0 };

    /// The lowest version of generation `g`: every version of older generations is below it.
    pub fn base(generation: u64) -> Version {
        Version { generation, seq: 0 }
    }
}

/// What version a mutation expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expected {
    /// Exactly this version (the writer's previous mutation of the chunk).
    Exact(Version),
    /// Any version older than generation `g`: the first mutation of the chunk by writer `g`. Safe
    /// because the writer's open reconciled every counted copy, so they are identical.
    Below(u64),
}

impl Expected {
    /// Whether a copy at `current` may apply the mutation.
    pub fn matches(self, current: Version) -> bool {
        match self {
            Expected::Exact(v) => current == v,
            Expected::Below(g) => current < Version::base(g),
        }
    }

    /// Whether a copy at `current` is behind what the mutation expects (it missed writes).
    pub fn is_ahead_of(self, current: Version) -> bool {
        match self {
            Expected::Exact(v) => current < v,
            Expected::Below(_) => false,
        }
    }
}
