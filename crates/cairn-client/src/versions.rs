//! What a writer knows of its chunks' versions, and the versions it gives its mutations.
//!
//! Every mutation names the version it expects the chunk's copies to be at (the replicas refuse
//! it otherwise, see `cairn_types::Expected`), so the writer remembers, per chunk it mutated, the
//! version its last acknowledged mutation left. The table is bounded: when full it is emptied,
//! and a chunk it no longer knows is looked up on the replicas (one round trip) before its next
//! mutation.

use cairn_types::{Expected, Version};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

/// Chunks remembered at most (~32 bytes each: 32 MiB at the cap, reached only after a million
/// distinct chunks — 1 TiB at the default chunk size — were mutated through one client).
pub(crate) const VERSIONS_MAX: usize = 1 << 20;

/// Bits of a sequence number that name its writer (the rest count): versions made by two writers
/// of a shared volume (one generation) differ because their tags do. A writer's tag is its
/// number from the metadata (`Volume::writers`, committed when it opens the volume or joins a
/// shared volume's generation), so tags repeat only after 2^24 writers of one volume; until a
/// writer has its number it uses one distinct within its process from a random start.
const TAG_BITS: u32 = 24;

/// The tag of this process's next writer.
fn next_tag() -> u64 {
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let start = *START.get_or_init(|| std::collections::hash_map::RandomState::new().build_hasher().finish());
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    start.wrapping_add(n) & ((1 << TAG_BITS) - 1)
}

/// What the writer knows of one chunk's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Known {
    /// Its copies are at this version (as far as this writer knows).
    At(Version),
    /// This writer never mutated it in its generation and is the only writer: its copies are at
    /// a version of an older generation (reconciled when the generation was opened).
    Untouched,
    /// Must be looked up on the replicas first.
    Unknown,
}

#[derive(Debug)]
pub(crate) struct ChunkVersions {
    known: HashMap<u64, Option<Version>>,
    /// The table was emptied once: an absent chunk may have been mutated by this writer.
    forgot: bool,
    max: usize,
    /// Counts this writer's mutations (the high bits of its sequence numbers).
    count: u64,
    tag: u64,
}

impl ChunkVersions {
    pub(crate) fn new(max: usize) -> ChunkVersions {
        ChunkVersions { known: HashMap::new(), forgot: false, max: max.max(1), count: 0, tag: next_tag() }
    }

    /// What is known of `chunk`. A shared volume has other writers: only versions seen count.
    pub(crate) fn get(&self, chunk: u64, shared: bool) -> Known {
        match self.known.get(&chunk) {
            Some(Some(v)) => Known::At(*v),
            Some(None) => Known::Unknown,
            None if shared || self.forgot => Known::Unknown,
            None => Known::Untouched,
        }
    }

    /// Records that `chunk`'s copies are at `version` (`None`: unknown, look it up next time).
    pub(crate) fn set(&mut self, chunk: u64, version: Option<Version>) {
        if self.known.len() >= self.max && !self.known.contains_key(&chunk) {
            self.known.clear();
            self.forgot = true;
        }
        self.known.insert(chunk, version);
    }

    /// Sets this writer's tag (its number from the metadata).
    pub(crate) fn set_tag(&mut self, number: u64) {
        self.tag = number & ((1 << TAG_BITS) - 1);
    }

    /// The sequence number of a new mutation expecting `expected`: above the expected version's
    /// (so a copy's version only grows), unique to this writer.
    pub(crate) fn next_sequence(&mut self, expected: Expected) -> u64 {
        let floor = match expected {
            Expected::Exact(v) => v.seq >> TAG_BITS,
            Expected::Below(_) => 0,
        };
        self.count = self.count.max(floor) + 1;
        (self.count << TAG_BITS) | self.tag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_grow_past_what_they_expect_and_differ_between_writers() {
        let mut a = ChunkVersions::new(4);
        let mut b = ChunkVersions::new(4);
        assert_ne!(a.tag, b.tag, "writers of one process have distinct tags");
        let s1 = a.next_sequence(Expected::Below(3));
        let v1 = Version { generation: 3, seq: s1 };
        let s2 = b.next_sequence(Expected::Exact(v1));
        assert!(s2 > s1, "a mutation's version is above the one it expects");
        assert_ne!(a.next_sequence(Expected::Below(3)), b.next_sequence(Expected::Below(3)));
    }

    #[test]
    fn the_table_is_bounded_and_forgetting_makes_chunks_unknown() {
        let mut t = ChunkVersions::new(2);
        let v = Version { generation: 1, seq: 5 };
        assert_eq!(t.get(1, false), Known::Untouched);
        assert_eq!(t.get(1, true), Known::Unknown, "a shared volume has other writers");
        t.set(1, Some(v));
        t.set(2, None);
        assert_eq!((t.get(1, false), t.get(2, false)), (Known::At(v), Known::Unknown));
        t.set(3, Some(v));
        assert_eq!(t.known.len(), 1, "full: emptied");
        assert_eq!(t.get(1, false), Known::Unknown, "once emptied, an absent chunk may have been written");
    }
}
