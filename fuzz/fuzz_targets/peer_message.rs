//! Metadata peer messages (Raft, heartbeats, joins) as a peer's bytes: the binary decoder must
//! never panic nor allocate without bound, whatever arrives.
#![no_main]

use cairn_meta::network::{PeerReply, PeerRequest, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode::<PeerRequest>(data);
    let _ = decode::<PeerReply>(data);
});
