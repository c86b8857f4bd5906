//! The metadata at the scale the pool supports: 100 000 volumes. The state machine applies them,
//! builds a snapshot, and the snapshot reaches a lagging node in pieces that each fit one node RPC
//! frame, where it installs and survives a reopen.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cairn_meta::network::{PeerRequest, SNAPSHOT_CHUNK_MAX_BYTES, decode, encode};
use cairn_meta::state::Command;
use cairn_meta::storage::{StateMachineStore, open_db};
use cairn_meta::{NodeAddr, TypeConfig};
use openraft::raft::InstallSnapshotRequest;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};
use std::io::Cursor;
use std::time::Instant;

/// The number of volumes the metadata is tested with (documented as supported).
const VOLUMES: u64 = 100_000;

fn entry(index: u64, command: Command) -> Entry<TypeConfig> {
    Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(command) }
}

#[tokio::test]
async fn a_state_of_100_000_volumes_reaches_a_lagging_node_in_pieces_that_fit_a_frame() {
    let dir = tempfile::tempdir().unwrap();
    let mut leader = StateMachineStore::open(open_db(&dir.path().join("leader.redb")).unwrap()).unwrap();
    let started = Instant::now();
    let mut index = 0;
    let nodes: Vec<Entry<TypeConfig>> = (1..=3)
        .map(|id| {
            index += 1;
            let addr = NodeAddr { rpc: format!("127.0.0.1:{id}"), ..NodeAddr::default() };
            entry(index, Command::RegisterNode { id, addr, voter: true, capacity_bytes: 1 << 40, time_ms: 1 })
        })
        .collect();
    leader.apply(nodes).await.unwrap();
    for batch in 0..VOLUMES / 1000 {
        let entries: Vec<Entry<TypeConfig>> = (0..1000)
            .map(|i| {
                index += 1;
                entry(
                    index,
                    Command::CreateVolume {
                        name: format!("vm-{:06}-disk", batch * 1000 + i),
                        size_bytes: 40 << 30,
                        chunk_size_bytes: 1 << 20,
                        replicas: 3,
                        shared: false,
                        time_ms: 2,
                    },
                )
            })
            .collect();
        leader.apply(entries).await.unwrap();
    }
    let applied = started.elapsed();
    let snapshot = leader.build_snapshot().await.unwrap();
    let meta = snapshot.meta.clone();
    let bytes = snapshot.snapshot.into_inner();

    // As openraft sends it: pieces of at most SNAPSHOT_CHUNK_MAX_BYTES, each one peer message in
    // one node RPC frame.
    let mut received = Vec::new();
    let pieces: Vec<&[u8]> = bytes.chunks(SNAPSHOT_CHUNK_MAX_BYTES as usize).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let request = PeerRequest::InstallSnapshot(InstallSnapshotRequest {
            vote: Vote::new_committed(1, 1),
            meta: meta.clone(),
            offset: received.len() as u64,
            data: piece.to_vec(),
            done: i + 1 == pieces.len(),
        });
        let body = encode(&request).unwrap();
        let mut frame = bytes::BytesMut::new();
        cairn_proto::Frame {
            version: cairn_proto::PROTOCOL_VERSION_MAX,
            kind: cairn_proto::FrameKind::Request,
            request_id: 1,
            body: cairn_proto::message::encode(&cairn_proto::Request::Peer { body: body.clone().into() })
                .unwrap(),
        }
        .encode(&mut frame)
        .expect("every snapshot piece fits one frame");
        match decode::<PeerRequest>(&body).unwrap() {
            PeerRequest::InstallSnapshot(r) => received.extend_from_slice(&r.data),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(received, bytes);

    let lagging_path = dir.path().join("lagging.redb");
    let mut lagging = StateMachineStore::open(open_db(&lagging_path).unwrap()).unwrap();
    lagging.install_snapshot(&meta, Box::new(Cursor::new(received))).await.unwrap();
    let count = |sm: &StateMachineStore| sm.data.read().unwrap().cluster.volumes.len() as u64;
    assert_eq!(count(&lagging), VOLUMES);
    drop(lagging);
    let reopened = StateMachineStore::open(open_db(&lagging_path).unwrap()).unwrap();
    assert_eq!(count(&reopened), VOLUMES);
    eprintln!(
        "{VOLUMES} volumes: applied in {applied:?}, snapshot {} MiB in {} pieces",
        bytes.len() >> 20,
        pieces.len()
    );
}
