//! The node-local chunk store.
//!
//! A storage node keeps each chunk of each volume it holds in one file (see `format` and
//! docs/on-disk-format.md). The store owns the crash-safety protocol for those files:
//!
//! * Every stored block carries the CRC-32C its writer computed. It is verified before the block is
//!   stored and again on every read; a mismatch is a [`StoreError::Corrupt`] naming volume, chunk and
//!   block, never data.
//! * A chunk is marked dirty on disk (header written and fdatasync'ed) *before* a mutation touches
//!   its data, and the flag is cleared only after a flush made the data durable, so after any crash
//!   the chunks that may differ between replicas are among the dirty chunks. A whole copy installed
//!   from a peer is synced and clean — unless the peer's copy was dirty (it may hold a write never
//!   confirmed): then it stays dirty, so a stray write a copy spread is among the dirty chunks too.
//! * [`Store::flush`] returns only when every write acknowledged before it is durable (fdatasync of
//!   every dirty chunk file; new files are created by rename and the directory is fsync'ed).
//! * Every volume persists the highest writer generation it has seen, before using it; a mutation
//!   carrying a lower generation is refused with [`StoreError::Fenced`].
//! * A failed fdatasync poisons the volume until the store is reopened: after such a failure Linux may
//!   have dropped dirty pages, so claiming later flushes succeeded would be a lie.

mod error;
pub mod fault;
pub mod format;
mod store;

pub use error::StoreError;
pub use fault::{FaultInjector, IoOp};
pub use format::ChunkHeader;
pub use store::{ChunkState, DIRTY_LINGER_FLUSHES, ReadReply, Store, StoreConfig, WriteStamp};
