//! The node RPC protocol: every message storage nodes and volume clients exchange, and its codec.
//!
//! A connection carries length-prefixed frames (layout in `frame` and docs/wire-format.md). The
//! client's first frame is a hello naming the protocol versions it speaks; the server answers with
//! the version it picked (the highest both speak) or an error, and every later frame carries that
//! version. Requests carry a request id chosen by the client; the server may answer out of order,
//! and many requests may be in flight on one connection.
//!
//! Versions: 1 — read, write, trim, write-zeroes, flush, chunk version query. 2 — `Fence` (a new
//! writer raises its generation on every replica at open and collects their dirty chunks); version
//! 1 peers are refused (a version-1 client would write without fencing at open).
//!
//! Invariants: decoding never panics and never allocates more than [`frame::FRAME_BODY_MAX_BYTES`]
//! for one frame; every frame's header and body are covered by a CRC-32C.

pub mod frame;
pub mod message;

pub use frame::{Frame, FrameCodec, FrameError, FrameKind};
pub use message::{BodyError, ChunkInfo, Hello, HelloReply, Request, Response, RpcError, Stamp};

/// Oldest protocol version this build speaks.
pub const PROTOCOL_VERSION_MIN: u16 = 9;
/// Newest protocol version this build speaks.
pub const PROTOCOL_VERSION_MAX: u16 = 9;

/// Picks the version to speak with a peer speaking `[min, max]`: the highest both speak.
pub fn negotiate(min: u16, max: u16) -> Option<u16> {
    let v = max.min(PROTOCOL_VERSION_MAX);
    (v >= min && v >= PROTOCOL_VERSION_MIN).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        assert_eq!(negotiate(9, 9), Some(9));
        assert_eq!(negotiate(1, 10), Some(9));
        assert_eq!(negotiate(1, 1), None, "version 1 has no fencing at open");
        assert_eq!(negotiate(2, 2), None, "version 2 has no refusal of deleted volumes");
        assert_eq!(negotiate(3, 3), None, "version 3 has no versioned mutations");
        assert_eq!(negotiate(4, 4), None, "version 4 records missed writes without checking the copy");
        assert_eq!(negotiate(5, 5), None, "version 5 writers do not name nodes being filled");
        assert_eq!(negotiate(6, 6), None, "version 6 writers do not say which PG members they routed by");
        assert_eq!(negotiate(7, 7), None, "version 7 chunk states carry no fence and no serving flag");
        assert_eq!(
            negotiate(8, 8),
            None,
            "version 8 records of an open's reconciliation carry no generation (copies keep a fenced writer's leftover)"
        );
        assert_eq!(negotiate(10, 10), None);
        assert_eq!(negotiate(0, 0), None);
        assert_eq!(negotiate(9, 1), None);
    }
}
