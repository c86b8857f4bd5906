//! Errors of the chunk store, one enum for every operation: each says what failed in words a
//! sysadmin understands and names the volume and chunk involved.

use cairn_types::{ChunkIndex, Generation, VolumeId};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "volume {volume}: write with generation {generation} refused, a newer writer holds generation {highest}"
    )]
    Fenced { volume: VolumeId, generation: Generation, highest: Generation },

    #[error("volume {volume} chunk {chunk} block {block}: data is corrupt ({reason})")]
    Corrupt { volume: VolumeId, chunk: ChunkIndex, block: u32, reason: String },

    #[error("volume {volume} chunk {chunk}: no space left on the data directory's device")]
    NoSpace { volume: VolumeId, chunk: ChunkIndex },

    // The cause is part of the message and not a `source`, so that a printed error chain names
    // it once.
    #[error("{context}: {cause}")]
    Io { context: String, cause: std::io::Error },

    #[error(
        "volume {volume} chunk {chunk}: the copy here is at version {current}, not the {expected:?} the writer expects{}",
        if *behind { " (it missed writes)" } else { "" }
    )]
    VersionMismatch {
        volume: VolumeId,
        chunk: ChunkIndex,
        current: cairn_types::Version,
        expected: cairn_types::Expected,
        behind: bool,
    },

    #[error("volume {volume} chunk {chunk}: a copy is being installed here; read another replica")]
    Installing { volume: VolumeId, chunk: ChunkIndex },

    #[error("invalid request: {0}")]
    InvalidRequest(String),

    #[error("{path}: chunk file is damaged ({reason})")]
    BadChunkFile { path: PathBuf, reason: String },

    #[error("volume {volume}: refused because an earlier flush failed; restart the node to recover")]
    Poisoned { volume: VolumeId },

    #[error("{path}: data directory is already in use by another process")]
    DataDirLocked { path: PathBuf },

    #[error("{path}: not a Cairn data directory or written by an incompatible version ({reason})")]
    BadDataDir { path: PathBuf, reason: String },
}

impl StoreError {
    /// Wraps an IO error, mapping ENOSPC to [`StoreError::NoSpace`] when the chunk is known.
    pub(crate) fn io(
        context: impl Into<String>,
        source: std::io::Error,
        at: Option<(VolumeId, ChunkIndex)>,
    ) -> Self {
        if source.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error())
            && let Some((volume, chunk)) = at
        {
            return StoreError::NoSpace { volume, chunk };
        }
        StoreError::Io { context: context.into(), cause: source }
    }
}
