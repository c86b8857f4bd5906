//! A seam for injecting IO failures in tests: the store asks the injector before every IO it does.

use std::fmt::Debug;

/// The kinds of IO the store performs, in the order a write performs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoOp {
    /// Creating a chunk file (temp file, header, fsync, rename, directory fsync).
    CreateChunk,
    /// Writing a chunk header to mark it dirty (before any data of the mutation is touched).
    MarkDirty,
    /// Writing a chunk header to record a mutation or clear the dirty flag.
    WriteHeader,
    /// Writing block data.
    WriteData,
    /// Writing entries of the block table.
    WriteTable,
    /// Punching a hole (trim, write-zeroes).
    PunchHole,
    /// fdatasync of a chunk file.
    Sync,
    /// Reading block data or the block table.
    Read,
    /// Writing the volume's metadata file (highest generation).
    WriteVolumeMeta,
}

/// Decides whether an IO fails. Production stores have none.
pub trait FaultInjector: Send + Sync + Debug {
    /// Returns an error to make the IO `op` fail before it touches the disk, or `None` to let it run.
    fn before(&self, op: IoOp) -> Option<std::io::Error>;
}
