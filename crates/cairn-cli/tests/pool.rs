//! Whole pools started with `cairn up` (separate node processes), driven with the CLI and the HTTP
//! API: volume administration, leader failover, loss of quorum, generations, and a node joining.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[test]
fn the_cli_says_clearly_what_is_wrong_and_survives_a_closed_pipe() {
    let pool = Pool::start(3);
    for name in [".", ".."] {
        let (ok, _, err) = pool.cli(&["volume", "create", name, "--size", "1M"]);
        assert!(!ok && err.contains("is invalid") && err.contains("not only dots"), "{err}");
    }
    // Thin provisioning: accepted, with the overcommit said, and a warning past the limit.
    wait_for("the nodes to report their capacity", Duration::from_secs(30), || {
        let (status, nodes) = pool.get(1, "/v1/nodes");
        let all = status == 200 && nodes.as_array()?.iter().all(|n| n["capacity_bytes"].as_u64() > Some(0));
        all.then_some(())
    });
    let (ok, _, err) = pool.cli(&["volume", "create", "v1", "--size", "1M"]);
    assert!(ok && err.contains("overcommitted") && !err.contains("warning"), "{err}");
    let (ok, out, err) = pool.cli(&["--json", "volume", "create", "huge", "--size", "1024T"]);
    assert!(ok && err.contains("warning: overcommit"), "{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["name"], "huge", "JSON stays clean");
    pool.cli_json(&["volume", "create", "v2", "--size", "1M"]);
    // `cairn events | head -1`: the reader goes away, the CLI ends quietly with success.
    let script = format!(
        "{} --addr {} events | head -1; echo \"rc=${{PIPESTATUS[0]}}\"",
        env!("CARGO_BIN_EXE_cairn"),
        pool.addrs()
    );
    let (ok, out) = run_tool("bash", &["-c".to_string(), script], Duration::from_secs(60));
    assert!(ok && out.contains("rc=0") && !out.contains("panicked"), "{out}");
    // An address that is not a Cairn API: say so, not "error:  (HTTP 404)".
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = other.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        if let Ok((mut s, _)) = other.accept() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let body = "<html>Not Found</html>";
            let _ = write!(s, "HTTP/1.1 404 Not Found\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        }
    });
    let mut cmd = cairn();
    cmd.args(["--addr", &at.to_string(), "status"]).env("CAIRN_LOG", "off");
    let out = run_to_end(cmd, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is this address a Cairn node's admin API"), "{err}");
    server.join().unwrap();
}

#[test]
fn volumes_are_created_listed_resized_and_deleted() {
    let pool = Pool::start(3);
    let v = pool.cli_json(&["volume", "create", "web01", "--size", "40G"]);
    assert_eq!(
        (v["name"].as_str(), v["size_bytes"].as_u64(), v["replicas"].as_u64()),
        (Some("web01"), Some(40 << 30), Some(3))
    );
    let v = pool.cli_json(&[
        "volume",
        "create",
        "db.01",
        "--size",
        "100M",
        "--replicas",
        "2",
        "--chunk-size",
        "4M",
    ]);
    assert_eq!((v["replicas"].as_u64(), v["chunk_size_bytes"].as_u64()), (Some(2), Some(4 << 20)));
    let ls = pool.cli_json(&["volume", "ls"]);
    let names: Vec<&str> = ls.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["db.01", "web01"]);
    // Info names the nodes holding the volume's placement groups.
    let info = pool.cli_json(&["volume", "info", "web01"]);
    assert_eq!(info["chunks"].as_u64(), Some(40 * 1024));
    assert_eq!(info["nodes"].as_object().unwrap().len(), 3);
    assert!(info["pgs"].as_array().unwrap().iter().all(|p| p["nodes"].as_array().unwrap().len() == 3));
    // Human output is a table.
    let (ok, out, _) = pool.cli(&["volume", "ls"]);
    assert!(ok && out.lines().next().unwrap().starts_with("NAME"), "{out}");

    // Validation, with the right errors.
    for (args, needle) in [
        (vec!["volume", "create", "web01", "--size", "1G"], "already exists (HTTP 409)"),
        (vec!["volume", "create", "bad/name", "--size", "1G"], "is invalid"),
        (vec!["volume", "create", &"x".repeat(65), "--size", "1G"], "is invalid"),
        (vec!["volume", "create", "odd", "--size", "1000"], "multiple of 4 KiB"),
        (vec!["volume", "create", "zero", "--size", "0"], "at least 4 KiB"),
        (vec!["volume", "create", "many", "--size", "1G", "--replicas", "4"], "only 3 storage node"),
        (vec!["volume", "create", "chunky", "--size", "1G", "--chunk-size", "3M"], "power of two"),
        (vec!["volume", "create", "s", "--size", "12Q"], "unknown suffix"),
        (vec!["volume", "resize", "web01", "--size", "20G"], "--allow-shrink"),
        (vec!["volume", "info", "nope"], "no volume named \"nope\" (HTTP 404)"),
        (vec!["volume", "rm", "nope"], "HTTP 404"),
    ] {
        let (ok, _, err) = pool.cli(&args);
        assert!(!ok, "{args:?} must fail");
        assert!(
            err.starts_with("error: ") && err.contains(needle),
            "{args:?}: {err:?} should contain {needle:?}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "one-line error: {err:?}");
    }

    let v = pool.cli_json(&["volume", "resize", "web01", "--size", "50G"]);
    assert_eq!(v["size_bytes"].as_u64(), Some(50 << 30));
    let v = pool.cli_json(&["volume", "resize", "web01", "--size", "10G", "--allow-shrink"]);
    assert_eq!(v["size_bytes"].as_u64(), Some(10 << 30));
    let gone = pool.cli_json(&["volume", "rm", "db.01"]);
    // Ids are never reused.
    let again = pool.cli_json(&["volume", "create", "db.01", "--size", "1G"]);
    assert!(again["id"].as_u64() > gone["id"].as_u64());

    let status = pool.cli_json(&["status"]);
    assert_eq!(status["status"]["nodes_up"].as_u64(), Some(3));
    assert_eq!(status["status"]["volumes"].as_u64(), Some(2));
    // `events --json` prints one JSON object per line (so that --follow can stream).
    let (ok, out, _) = pool.cli(&["--json", "events"]);
    assert!(ok);
    let kinds: Vec<String> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"].as_str().unwrap().into())
        .collect();
    assert_eq!(kinds[0], "leader.changed");
    let (ok, out, _) = pool.cli(&["events"]);
    assert!(ok);
    for kind in ["leader.changed", "node.joined", "volume.created", "volume.resized", "volume.deleted"] {
        assert!(out.contains(kind), "events lack {kind}: {out}");
    }
}

fn open(pool: &Pool, name: &str) -> u64 {
    let v = pool.cli_json(&["volume", "info", name]);
    assert!(v["generation"].is_u64());
    // Opening for writing is an API call (the data path makes it); the CLI has no command for it.
    let client = reqwest::blocking::Client::new();
    for k in 1..=pool.nodes as u64 {
        if let Ok(r) = client.post(format!("http://{}/v1/volumes/{name}/open", pool.http(k))).send()
            && r.status().is_success()
        {
            return r.json::<serde_json::Value>().unwrap()["generation"].as_u64().unwrap();
        }
    }
    panic!("no node opened {name}");
}

/// The leader all of `alive` agree on (and which is one of them).
fn current_leader(pool: &Pool, alive: &[u64]) -> u64 {
    wait_for("a leader", Duration::from_secs(20), || {
        let seen: Vec<Option<u64>> = alive.iter().map(|k| pool.leader_seen_by(*k)).collect();
        let first = seen[0]?;
        (alive.contains(&first) && seen.iter().all(|s| *s == Some(first))).then_some(first)
    })
}

#[test]
fn leader_failover_keeps_volumes_and_generations_grow() {
    let mut pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "vm1", "--size", "1G"]);
    let mut generations = vec![open(&pool, "vm1")];
    let leader = current_leader(&pool, &[1, 2, 3]);

    // SIGKILL the leader: another takes over within a few seconds.
    pool.sigkill(leader);
    let killed_at = Instant::now();
    let others: Vec<u64> = (1..=3).filter(|k| *k != leader).collect();
    let new_leader = current_leader(&pool, &others);
    let took = killed_at.elapsed();
    assert_ne!(new_leader, leader);
    assert!(took < Duration::from_secs(10), "failover took {took:?}");
    eprintln!("new leader {new_leader} after {took:?}");

    // The CLI keeps working through the other nodes; nothing committed was lost.
    let ls = pool.cli_json(&["volume", "ls"]);
    assert_eq!(ls.as_array().unwrap().len(), 1);
    pool.cli_json(&["volume", "create", "vm2", "--size", "2G"]);
    generations.push(open(&pool, "vm1"));

    // The killed node comes back as a follower of the new leader.
    pool.restart(leader);
    wait_for("the old leader to rejoin as follower", Duration::from_secs(20), || {
        let (status, v) = pool.get(leader, "/v1/status");
        (status == 200 && v["role"] == "follower" && v["leader"]["id"] == new_leader && v["volumes"] == 2)
            .then_some(())
    });
    generations.push(open(&pool, "vm2"));

    // Restart every node: the pool, its volumes and the generation counter survive.
    for k in 1..=3 {
        pool.sigkill(k);
    }
    for k in 1..=3 {
        pool.restart(k);
    }
    current_leader(&pool, &[1, 2, 3]);
    let ls = wait_for("volumes after a full restart", Duration::from_secs(20), || {
        let (ok, out, _) = pool.cli(&["--json", "volume", "ls"]);
        ok.then(|| serde_json::from_str::<serde_json::Value>(&out).unwrap())
    });
    assert_eq!(ls.as_array().unwrap().len(), 2);
    generations.push(open(&pool, "vm1"));
    assert!(
        generations.windows(2).all(|w| w[0] < w[1]),
        "generations must strictly increase: {generations:?}"
    );

    // A writer's open names the generation it read: one naming an older generation than the
    // committed one (a retry whose first request committed, or a late duplicate) opens nothing,
    // so it cannot fence the writer that sent it.
    let current = *generations.last().unwrap();
    let (status, body) = open_after(&pool, "vm1", current - 1);
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("read it again"), "{body}");
    assert_eq!(
        pool.cli_json(&["volume", "info", "vm1"])["generation"],
        current,
        "a refused open moved nothing"
    );
    let (status, body) = open_after(&pool, "vm1", current);
    assert_eq!(status, 200, "{body}");
    assert!(body["generation"].as_u64().unwrap() > current, "{body}");
}

/// `POST /v1/volumes/{name}/open?after=G` through whichever node answers (redirects followed).
fn open_after(pool: &Pool, name: &str, after: u64) -> (u16, serde_json::Value) {
    let client = reqwest::blocking::Client::new();
    for k in 1..=pool.nodes as u64 {
        if let Ok(r) =
            client.post(format!("http://{}/v1/volumes/{name}/open?after={after}", pool.http(k))).send()
            && r.status().as_u16() != 503
        {
            return (r.status().as_u16(), r.json().unwrap());
        }
    }
    panic!("no node answered an open of {name}");
}

#[test]
fn losing_quorum_answers_503_and_recovers() {
    let mut pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "keep", "--size", "1G"]);
    let leader = current_leader(&pool, &[1, 2, 3]);
    // Kill the leader and one follower: the survivor has no quorum.
    let follower = (1..=3).find(|k| *k != leader).unwrap();
    let survivor = (1..=3).find(|k| *k != leader && *k != follower).unwrap();
    pool.sigkill(leader);
    pool.sigkill(follower);
    let (status, body) = wait_for("503 from the survivor", Duration::from_secs(30), || {
        let (status, body) = pool.get(survivor, "/v1/volumes");
        (status == 503).then_some((status, body))
    });
    assert_eq!(status, 503);
    let msg = body["error"].as_str().unwrap();
    assert!(msg.contains("no quorum"), "{msg}");
    let (ok, _, err) = pool.cli(&["volume", "create", "lost", "--size", "1G"]);
    assert!(!ok && err.contains("no quorum"), "{err}");

    // One comes back: the pool works again.
    pool.restart(follower);
    wait_for("the pool to accept writes again", Duration::from_secs(30), || {
        let (ok, _, _) = pool.cli(&["volume", "create", "after", "--size", "1G"]);
        ok.then_some(())
    });
    let ls = pool.cli_json(&["volume", "ls"]);
    let names: Vec<&str> = ls.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["after", "keep"], "the failed create must not have happened");
}

#[test]
fn a_fourth_node_joins_and_only_necessary_pgs_move() {
    let mut pool = Pool::start(3);
    let (_, before) = pool.get(current_leader(&pool, &[1, 2, 3]), "/v1/pgs");
    let before: Vec<Vec<u64>> = serde_json::from_value(before["table"].clone()).unwrap();

    // Node 4, configured to join through node 1.
    pool.add_node(4);
    let leader = current_leader(&pool, &[1, 2, 3]);
    wait_for("node 4 to be up", Duration::from_secs(30), || {
        let (status, nodes) = pool.get(leader, "/v1/nodes");
        let ok = status == 200
            && nodes.as_array().unwrap().len() == 4
            && nodes.as_array().unwrap().iter().all(|n| n["state"] == "up");
        ok.then_some(())
    });
    let (_, nodes) = pool.get(leader, "/v1/nodes");
    let n4 = nodes.as_array().unwrap().iter().find(|n| n["id"] == 4).unwrap();
    assert_eq!(n4["voter"], false, "later nodes are learners");
    let (_, after) = pool.get(leader, "/v1/pgs");
    let after: Vec<Vec<u64>> = serde_json::from_value(after["table"].clone()).unwrap();

    // A PG moves only if node 4 entered its replica set; everything else stays put.
    let top3 = |row: &Vec<u64>| row.iter().take(3).copied().collect::<Vec<u64>>();
    let moved = before.iter().zip(&after).filter(|(b, a)| top3(b) != top3(a)).count();
    let gained = after.iter().filter(|a| top3(a).contains(&4)).count();
    assert_eq!(moved, gained, "PGs that moved without node 4 entering them");
    let expect: BTreeMap<u64, u32> = (1..=4).map(|n| (n, 100)).collect();
    let expected = cairn_meta::placement::pg_table(&expect, 256, 5);
    assert_eq!(after, expected, "the table is the balancer's");
    eprintln!("{moved} of 256 PGs moved (about 3/4 expected)");
    assert!((150..=230).contains(&moved), "{moved} PGs moved");
}

#[test]
fn cairn_up_stops_cleanly_and_brings_the_same_pool_back() {
    let mut pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "persist", "--size", "1G"]);
    let first_id = pool.cli_json(&["volume", "info", "persist"])["id"].as_u64().unwrap();
    // Data written before (its chunks stay dirty on every node for a while after the final flush).
    let url = format!("nbd://{}/persist", pool.nbd(1));
    qemu_io(&url, pattern_cmds("write", 0, 8, 1));
    pool.restart_up();
    let ls = wait_for("the volumes after cairn up restarted", Duration::from_secs(30), || {
        let (ok, out, _) = pool.cli(&["--json", "volume", "ls"]);
        ok.then(|| serde_json::from_str::<serde_json::Value>(&out).unwrap())
    });
    let vols = ls.as_array().unwrap();
    assert_eq!(vols.len(), 1);
    assert_eq!(vols[0]["id"].as_u64(), Some(first_id));
    assert_eq!(pool.cli_json(&["status"])["status"]["nodes_up"].as_u64(), Some(3));
    // Every node restarted at once, so every node caught up with nobody in sync: the pool must
    // still come back to serving, with the data.
    pool.wait_in_sync(Duration::from_secs(60));
    qemu_io(&url, pattern_cmds("read", 0, 8, 1));
    qemu_io(&url, pattern_cmds("write", 0, 8, 2));
    qemu_io(&url, pattern_cmds("read", 0, 8, 2));
}

/// Overwrites 64 bytes of every 4 KiB page after the first with pseudo-random bytes.
fn garble(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for page in (4096..bytes.len()).step_by(4096) {
        for _ in 0..64 {
            let at = page + (next() % 4096) as usize;
            if at < bytes.len() {
                bytes[at] = next() as u8;
            }
        }
    }
    std::fs::write(path, bytes).unwrap();
}

fn volumes_seen_by(pool: &Pool, k: u64) -> Option<u64> {
    let (status, v) = pool.get(k, "/v1/status");
    (status == 200).then(|| v["volumes"].as_u64()).flatten()
}

#[test]
fn a_damaged_metadata_file_is_a_clear_error_and_a_learner_is_rebuilt_from_the_pool() {
    let mut pool = Pool::start(3);
    pool.add_node(4);
    pool.cli_json(&["volume", "create", "a", "--size", "1M"]);
    wait_for("node 4 to see the volume", Duration::from_secs(30), || {
        (volumes_seen_by(&pool, 4) == Some(1)).then_some(())
    });
    pool.sigkill(4);
    let config = pool.data().join("node-4/node.toml");
    let redb = pool.data().join("node-4/data/meta.redb");
    garble(&redb);
    // Starting says what is wrong and what to do, in one line, and exits 1 (no panic).
    let mut cmd = cairn();
    cmd.args(["node", "run", "--config"]).arg(&config).env("CAIRN_LOG", "off");
    let out = run_to_end(cmd, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("meta.redb is damaged or unreadable"), "{stderr}");
    assert!(stderr.contains("Rebuilding a node's metadata"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    // The documented procedure for a learner: move the file aside and start the node again.
    std::fs::rename(&redb, redb.with_extension("redb.damaged")).unwrap();
    pool.restart(4);
    wait_for("node 4 to get the pool's metadata again", Duration::from_secs(60), || {
        (volumes_seen_by(&pool, 4) == Some(1)).then_some(())
    });
    pool.cli_json(&["volume", "create", "b", "--size", "1M"]);
    wait_for("node 4 to follow new changes", Duration::from_secs(30), || {
        (volumes_seen_by(&pool, 4) == Some(2)).then_some(())
    });
    wait_for("node 4 up and in sync", Duration::from_secs(30), || {
        let (status, nodes) = pool.get(1, "/v1/nodes");
        let ok = status == 200
            && nodes
                .as_array()?
                .iter()
                .any(|n| n["id"] == 4 && n["state"] == "up" && n["catching_up"] == false);
        ok.then_some(())
    });
}

/// Whether the pool's map shows node `id` as a metadata voter (asked through the CLI, which
/// follows redirects to the leader).
fn voter_in_map(pool: &Pool, id: u64) -> Option<bool> {
    let (ok, out, _) = pool.cli(&["--json", "node", "ls"]);
    let nodes: serde_json::Value = serde_json::from_str(&out).ok().filter(|_| ok)?;
    nodes.as_array()?.iter().find(|n| n["id"] == id)?["voter"].as_bool()
}

#[test]
fn a_voter_that_lost_its_metadata_is_demoted_rebuilt_and_promoted() {
    let mut pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "a", "--size", "1M"]);
    // Node 1: the voter that formed the pool (it would form a new, empty one if it bootstrapped
    // again).
    pool.sigkill(1);
    let redb = pool.data().join("node-1/data/meta.redb");
    garble(&redb);
    // The documented procedure for a voter: demote it while it is stopped (nodes 2 and 3 are a
    // majority before and after), move the file aside, start it, promote it.
    wait_for("node 1 to be demoted", Duration::from_secs(60), || {
        pool.cli(&["node", "demote", "1"]).0.then_some(())
    });
    wait_for("the map to show node 1 as a learner", Duration::from_secs(30), || {
        (voter_in_map(&pool, 1) == Some(false)).then_some(())
    });
    std::fs::rename(&redb, redb.with_extension("redb.damaged")).unwrap();
    pool.restart(1);
    wait_for("node 1 to get the pool's metadata again", Duration::from_secs(60), || {
        (volumes_seen_by(&pool, 1) == Some(1)).then_some(())
    });
    wait_for("node 1 to be promoted", Duration::from_secs(60), || {
        pool.cli(&["node", "promote", "1"]).0.then_some(())
    });
    wait_for("the map to show node 1 as a voter", Duration::from_secs(30), || {
        (voter_in_map(&pool, 1) == Some(true)).then_some(())
    });
    let (ok, events, _) = pool.cli(&["events"]);
    assert!(ok && events.contains("node.demoted") && events.contains("node.promoted"), "{events}");
    // Node 1 votes again: with node 2 down, nodes 1 and 3 are the majority that commits.
    pool.sigkill(2);
    wait_for("a change committed without node 2", Duration::from_secs(60), || {
        pool.cli(&["volume", "create", "b", "--size", "1M"]).0.then_some(())
    });
    wait_for("node 1 to follow it", Duration::from_secs(30), || {
        (volumes_seen_by(&pool, 1) == Some(2)).then_some(())
    });
}
