//! Shared vocabulary of Cairn: ids, sizes, limits, the block checksum and the placement hash.
//!
//! This crate does no I/O. Every other crate depends on it, so everything here is small and stable:
//! changing the placement hash or the checksum moves or invalidates data on disk and is forbidden.

pub mod admission;
pub mod checksum;
pub mod ids;
pub mod limits;
pub mod placement;
pub mod version;

pub use checksum::crc32c;
pub use ids::{ChunkIndex, Generation, NodeId, PgId, VolumeId};
pub use limits::{BLOCK_SIZE_BYTES, ChunkSize};
pub use version::{Expected, RecordedSource, Version};
