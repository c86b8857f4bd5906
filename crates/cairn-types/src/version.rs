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

    /// The version a chunk is at while a copy at `target` is installed piece by piece (a copy
    /// larger than one request): below every writer's version, never matched by `Below`, never
    /// served, never a reconciliation's winner; the pieces after the first expect it, and the last
    /// one sets `target`. Two installers of different copies have different markers, so their
    /// pieces never interleave.
    pub fn installing(target: Version) -> Version {
        let mix = (target.generation.rotate_left(29) ^ target.seq).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Version { generation: 0, seq: INSTALLING_BIT | (mix >> 1) }
    }

    /// Whether this is the marker of a copy being installed (see [`Version::installing`]).
    pub fn is_installing(&self) -> bool {
        self.generation == 0 && self.seq & INSTALLING_BIT != 0
    }

    /// The lowest version of generation `g`: every version of older generations is below it.
    pub fn base(generation: u64) -> Version {
        Version { generation, seq: 0 }
    }
}

const INSTALLING_BIT: u64 = 1 << 63;

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
            // A half-installed copy is below every generation, yet holds nothing a writer may build on.
            Expected::Below(g) => current < Version::base(g) && !current.is_installing(),
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

/// A copy offered by a node that the receiving node recorded as having missed the chunk
/// (`InstallRange::source`): such a copy would undo the write recorded, or bring back a leftover an
/// open settled without that node, so it is refused unless [`RecordedSource::taken`] says
/// otherwise. The same decision drives the production simulation's model, and the sender's check
/// before it reads a copy only to have it refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordedSource {
    /// The generation of the open that settled the receiver's record (0: made by writes only).
    pub recorded: u64,
    /// The generation of the open whose settled record the copy is sent for (0: none).
    pub settled: u64,
    /// The receiver's copy.
    pub current: Version,
    /// The copy offered.
    pub copy: Version,
    /// The receiver recorded itself as missing the chunk: a power loss may have taken writes it
    /// had not flushed, and its copy is to be pulled back.
    pub unsure: bool,
    /// The volume has one writer per generation (not shared): its versions grow along one chain.
    pub one_chain: bool,
    /// The volume's writer generation as the receiver knows it (its map's, or its fence if newer).
    pub current_generation: u64,
}

impl RecordedSource {
    /// Whether the copy is taken: [`RecordedSource::settles`] or [`RecordedSource::takes_newer`].
    pub fn taken(&self) -> bool {
        self.settles() || self.takes_newer()
    }

    /// The copy is sent for a record an open of a newer generation than the receiver's record
    /// settled, over a copy here of an older generation (the receiver's record is of writes that
    /// open settled, or of an earlier open).
    pub fn settles(&self) -> bool {
        self.settled > self.recorded && self.current.generation < self.settled
    }

    /// The receiver is unsure of its copy, its record is of writes only, the volume has one
    /// writer's chain, and the copy is of the current writer generation and newer (or the rest of
    /// one being installed): a newer copy of one chain holds every write this copy holds. (Not
    /// an older generation's, even if higher: that may be a fenced writer's leftover an open
    /// settled the chunk without.) Else two holders that each applied a write alone, each
    /// recording the other, one of them since reverted by a power loss, refuse each other's
    /// copies for good (the production simulation, seed 643 095). The receiver stays unsure of
    /// the copy it took: it still pulls its own copy back.
    pub fn takes_newer(&self) -> bool {
        let newer = (!self.current.is_installing() && self.copy > self.current)
            || self.current == Version::installing(self.copy);
        self.unsure
            && self.recorded == 0
            && self.one_chain
            && self.copy.generation >= self.current_generation
            && newer
    }
}

/// What a copy at some version does with a mutation (see [`Expected::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionCheck {
    /// The copy is at the version the mutation expects: apply it.
    Apply,
    /// The copy is already at the mutation's new version: a re-send; answer as applied.
    AlreadyApplied,
    /// The copy lacks mutations the writer expects it to have: it needs recovery.
    Behind,
    /// The copy is at a version the writer does not expect (another chain): never applied.
    Conflict,
}

impl Expected {
    /// Decides what a copy at `current` does with a mutation expecting `self` that would leave the
    /// copy at `new`.
    pub fn check(self, current: Version, new: Version) -> VersionCheck {
        if self.matches(current) {
            VersionCheck::Apply
        } else if current == new {
            VersionCheck::AlreadyApplied
        } else if self.is_ahead_of(current) {
            VersionCheck::Behind
        } else {
            VersionCheck::Conflict
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.generation, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(generation: u64, seq: u64) -> Version {
        Version { generation, seq }
    }

    #[test]
    fn a_mutation_applies_only_on_the_version_it_expects() {
        let exact = Expected::Exact(v(3, 4));
        assert_eq!(exact.check(v(3, 4), v(3, 5)), VersionCheck::Apply);
        assert_eq!(exact.check(v(3, 5), v(3, 5)), VersionCheck::AlreadyApplied);
        assert_eq!(exact.check(v(3, 2), v(3, 5)), VersionCheck::Behind);
        assert_eq!(exact.check(v(3, 9), v(3, 5)), VersionCheck::Conflict);
        assert_eq!(Expected::Below(3).check(v(2, 9), v(3, 1)), VersionCheck::Apply);
        assert_eq!(Expected::Below(3).check(Version::NONE, v(3, 1)), VersionCheck::Apply);
        assert_eq!(Expected::Below(3).check(v(3, 1), v(3, 2)), VersionCheck::Conflict);
        let installing = Version::installing(v(2, 9));
        assert!(installing.is_installing() && !v(2, 9).is_installing() && !Version::NONE.is_installing());
        assert_ne!(installing, Version::installing(v(2, 8)), "installers of different copies differ");
        assert_eq!(Expected::Below(3).check(installing, v(3, 1)), VersionCheck::Conflict);
        assert_eq!(Expected::Exact(v(2, 9)).check(installing, v(3, 1)), VersionCheck::Behind);
    }

    #[test]
    fn a_recorded_sources_copy_is_taken_only_when_settled_or_newer_on_an_unsure_node() {
        let base = RecordedSource {
            recorded: 0,
            settled: 0,
            current: v(1, 91),
            copy: v(1, 108),
            unsure: false,
            one_chain: true,
            current_generation: 1,
        };
        assert!(!base.taken(), "a sure node refuses a copy from a node it recorded");
        let unsure = RecordedSource { unsure: true, ..base };
        assert!(unsure.taken() && unsure.takes_newer(), "an unsure node takes a newer copy");
        assert!(!RecordedSource { copy: v(1, 90), ..unsure }.taken(), "but not an older one");
        assert!(!RecordedSource { copy: v(1, 91), ..unsure }.taken(), "nor the same version");
        assert!(!RecordedSource { recorded: 2, ..unsure }.taken(), "nor over an open's settled record");
        assert!(!RecordedSource { one_chain: false, ..unsure }.taken(), "nor on a shared volume");
        let fenced = RecordedSource { current_generation: 2, ..unsure };
        assert!(!fenced.taken(), "nor a copy of a generation older than the current writer's, even higher");
        let rest = RecordedSource { current: Version::installing(v(1, 108)), ..unsure };
        assert!(rest.taken(), "the rest of a copy being installed follows its first piece");
        let other = RecordedSource { current: Version::installing(v(1, 200)), ..unsure };
        assert!(!other.taken(), "another copy does not go over one being installed");
        // An open's settled record: over an older generation only, and only a newer open's.
        let settled = RecordedSource { settled: 2, ..base };
        assert!(settled.taken() && settled.settles());
        assert!(!RecordedSource { current: v(2, 1), ..settled }.taken());
        assert!(!RecordedSource { recorded: 2, ..settled }.taken());
    }
}
