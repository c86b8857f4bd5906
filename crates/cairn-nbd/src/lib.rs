//! Cairn's NBD server, implemented from the protocol specification (NetworkBlockDevice/nbd,
//! doc/proto.md): fixed newstyle handshake; options EXPORT_NAME, ABORT, LIST, INFO, GO,
//! STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT (`base:allocation`); commands READ,
//! WRITE (+FUA), DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES (+NO_HOLE) and BLOCK_STATUS. The export name is
//! the volume name. Every connection opens its own [`cairn_client::VolumeClient`].
//!
//! Errors: a fenced writer gets `EPERM` (another host took the volume over); IO that cannot reach a
//! majority of replicas in time gets `EIO`; requests beyond the end get `ENOSPC` (writes) or `EINVAL`;
//! malformed requests get `EINVAL` and the connection goes on where the protocol allows.

pub mod proto;
pub mod server;

pub use server::{Exports, serve_connection, serve_tcp, serve_unix};
