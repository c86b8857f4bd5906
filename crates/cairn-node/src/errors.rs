//! The one place where store errors become wire errors.

use cairn_proto::RpcError;
use cairn_store::StoreError;

pub(crate) fn to_rpc(e: StoreError) -> RpcError {
    match e {
        StoreError::Fenced { volume, generation, highest } => {
            RpcError::Fenced { volume, generation, highest }
        }
        StoreError::Corrupt { volume, chunk, block, reason } => {
            RpcError::Corrupt { volume, chunk, block, message: reason }
        }
        StoreError::NoSpace { volume, chunk } => RpcError::NoSpace { volume, chunk },
        StoreError::InvalidRequest(message) => RpcError::InvalidRequest { message },
        e @ StoreError::Installing { .. } => RpcError::Unavailable { message: e.to_string() },
        StoreError::VersionMismatch { current, behind, .. } => RpcError::VersionMismatch { current, behind },
        e @ StoreError::BadChunkFile { .. } => RpcError::Damaged { message: e.to_string() },
        other @ (StoreError::Io { .. }
        | StoreError::Poisoned { .. }
        | StoreError::DataDirLocked { .. }
        | StoreError::BadDataDir { .. }) => RpcError::Io { message: other.to_string() },
    }
}
