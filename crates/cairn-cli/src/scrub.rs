//! `cairn scrub [VOLUME] [--wait]`: asks every node that is up to check every block it stores
//! against its checksum now and repair the damaged ones from an in-sync replica (the scheduled
//! background scrub, on demand; see `cairn-node`'s `scrub.rs`). With `--wait`, waits until every
//! node has finished and prints each node's figures; fails if a node could not be asked or
//! finished with blocks it could not repair.

use crate::api::Api;
use anyhow::bail;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

pub fn run(
    api: &Api,
    volume: Option<&str>,
    wait: bool,
    timeout: Duration,
    json_out: bool,
) -> anyhow::Result<()> {
    let nodes: Value = api.get("/v1/nodes")?;
    let body = json!({ "volume": volume });
    // (node id, its API address, (its scrub instance, the run's ticket))
    let mut asked: Vec<(u64, String, (u64, u64))> = Vec::new();
    let mut failed: Vec<(u64, String)> = Vec::new();
    for n in nodes.as_array().map(Vec::as_slice).unwrap_or_default() {
        let (Some(id), Some(http)) = (n["id"].as_u64(), n["http"].as_str()) else { continue };
        if n["state"] != "up" {
            failed.push((id, format!("not asked: the node is {}", n["state"].as_str().unwrap_or("unknown"))));
            continue;
        }
        match api.post_at::<Value>(http, "/v1/scrub", &body) {
            Ok(v) => match (v["ticket"].as_u64(), v["instance"].as_u64()) {
                (Some(ticket), Some(instance)) => asked.push((id, http.to_string(), (instance, ticket))),
                _ => failed.push((id, format!("answered without a ticket: {v}"))),
            },
            Err(e) => failed.push((id, format!("{e:#}"))),
        }
    }
    if !wait {
        if json_out {
            let started: Vec<u64> = asked.iter().map(|a| a.0).collect();
            let failed: Vec<Value> = failed.iter().map(|(id, e)| json!({"node": id, "error": e})).collect();
            println!("{}", serde_json::to_string_pretty(&json!({"started": started, "failed": failed}))?);
        } else {
            for (id, ..) in &asked {
                outln!("node {id}: scrub started");
            }
            for (id, e) in &failed {
                outln!("node {id}: {e}");
            }
        }
        if !failed.is_empty() {
            bail!("{} node(s) could not be asked to scrub", failed.len());
        }
        return Ok(());
    }
    let deadline = Instant::now() + timeout;
    let mut results: Vec<(u64, Value)> = Vec::new();
    for (id, http, (instance, ticket)) in asked {
        loop {
            match api.get_at::<Value>(&http, "/v1/scrub") {
                Ok(s) if s["instance"].as_u64() != Some(instance) => {
                    failed.push((id, "the node restarted: its run was lost (ask again)".into()));
                    break;
                }
                Ok(s) if s["served_through"].as_u64().unwrap_or(0) >= ticket => {
                    let runs = s["runs"].as_array().map(Vec::as_slice).unwrap_or_default();
                    match runs.iter().find(|r| r["ticket"] == ticket) {
                        Some(run) => results.push((id, run.clone())),
                        None => {
                            failed.push((id, "its run's figures are no longer kept (16 runs since)".into()))
                        }
                    }
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    failed.push((id, format!("{e:#}")));
                    break;
                }
            }
            if Instant::now() > deadline {
                failed.push((id, format!("not finished within {timeout:?}")));
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let count = |k: &str| results.iter().map(|(_, r)| r[k].as_u64().unwrap_or(0)).sum::<u64>();
    let (unrepaired, unreadable) = (count("blocks_unrepaired"), count("chunks_unreadable"));
    let differing = count("chunks_differing_count");
    for (id, r) in &results {
        if let Some(e) = r["error"].as_str() {
            failed.push((*id, e.to_string()));
        }
    }
    if json_out {
        let nodes: Vec<Value> = results.iter().map(|(id, r)| json!({"node": id, "run": r})).collect();
        let failed: Vec<Value> = failed.iter().map(|(id, e)| json!({"node": id, "error": e})).collect();
        println!("{}", serde_json::to_string_pretty(&json!({"nodes": nodes, "failed": failed}))?);
    } else {
        let rows = results
            .iter()
            .map(|(id, r)| {
                let n = |k: &str| r[k].as_u64().unwrap_or(0).to_string();
                vec![
                    id.to_string(),
                    n("chunks_checked"),
                    crate::api::format_size(r["bytes_checked"].as_u64().unwrap_or(0)),
                    n("blocks_damaged"),
                    n("blocks_repaired"),
                    n("blocks_unrepaired"),
                    n("chunks_skipped"),
                    n("chunks_unreadable"),
                    n("chunks_compared"),
                    n("chunks_unsettled"),
                    n("chunks_not_compared"),
                    n("chunks_differing_count"),
                ]
            })
            .collect();
        crate::commands::table(
            &[
                "NODE",
                "CHUNKS",
                "BYTES",
                "DAMAGED",
                "REPAIRED",
                "UNREPAIRED",
                "SKIPPED",
                "UNREADABLE",
                "COMPARED",
                "UNSETTLED",
                "NOT COMPARED",
                "DIFFERING",
            ],
            rows,
        );
        for (_, r) in &results {
            for u in r["unrepaired"].as_array().map(Vec::as_slice).unwrap_or_default() {
                outln!(
                    "unrepaired: volume {} chunk {} block {}: {}",
                    u["volume"],
                    u["chunk"],
                    u["block"],
                    u["why"]
                );
            }
            for d in r["chunks_differing"].as_array().map(Vec::as_slice).unwrap_or_default() {
                outln!("differing: volume {} chunk {}: versions {}", d["volume"], d["chunk"], d["versions"]);
            }
        }
        for (id, e) in &failed {
            outln!("node {id}: {e}");
        }
    }
    if let Some((id, e)) = failed.first() {
        bail!("{} node(s) did not scrub (node {id}: {e})", failed.len());
    }
    if unrepaired > 0 {
        bail!("{unrepaired} damaged block(s) could not be repaired (the next run tries again)");
    }
    if differing > 0 {
        bail!(
            "{differing} chunk(s) with in-sync copies of one version that differ (a fault: see `cairn volume verify` and the nodes' logs)"
        );
    }
    if unreadable > 0 {
        bail!("{unreadable} chunk(s) could not be read (I/O errors: check the node's disk and log)");
    }
    Ok(())
}
