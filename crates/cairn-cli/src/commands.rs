//! The admin commands: each calls the HTTP API and prints an aligned table, or with `--json` the
//! API's JSON unchanged (the API's field names are the stable, documented format).

use crate::api::{Api, format_size, parse_size};
use anyhow::Context;
use serde_json::{Value, json};
use std::time::Duration;

/// Prints rows as columns aligned to the widest cell.
pub(crate) fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> =
            cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        outln!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// "up", "down", or "catching-up" (up, but still receiving writes it missed).
fn node_state(n: &Value) -> String {
    if n["state"] == "up" && n["catching_up"] == true { "catching-up".into() } else { s(&n["state"]) }
}

fn age(ms: &Value) -> String {
    ms.as_u64().map(|m| format!("{:.1}s", m as f64 / 1000.0)).unwrap_or_else(|| "-".into())
}

pub fn status(api: &Api, json_out: bool) -> anyhow::Result<()> {
    let st: Value = api.get("/v1/status")?;
    let nodes: Value = api.get("/v1/nodes")?;
    let volumes: Value = api.get("/v1/volumes")?;
    if json_out {
        return print_json(&json!({ "status": st, "nodes": nodes, "volumes": volumes }));
    }
    let leader = &st["leader"];
    outln!(
        "pool: {} of {} nodes up, {} volumes, {} placement groups, epoch {}",
        st["nodes_up"],
        st["nodes_total"],
        st["volumes"],
        st["pg_count"],
        st["epoch"]
    );
    outln!("metadata leader: node {} ({}), term {}", s(&leader["id"]), s(&leader["http"]), st["term"]);
    let empty = vec![];
    let rows = nodes
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|n| {
            vec![
                s(&n["id"]),
                node_state(n),
                if n["voter"].as_bool() == Some(true) { "voter".into() } else { "learner".into() },
                s(&n["pg_replicas"]),
                format!(
                    "{}/{}",
                    format_size(n["used_bytes"].as_u64().unwrap_or(0)),
                    format_size(n["capacity_bytes"].as_u64().unwrap_or(0))
                ),
                age(&n["last_heartbeat_ms_ago"]),
                s(&n["rpc"]),
            ]
        })
        .collect();
    table(&["NODE", "STATE", "ROLE", "PGS", "USED/CAPACITY", "HEARD", "RPC"], rows);
    Ok(())
}

pub fn node_ls(api: &Api, json_out: bool) -> anyhow::Result<()> {
    let nodes: Value = api.get("/v1/nodes")?;
    if json_out {
        return print_json(&nodes);
    }
    let empty = vec![];
    let rows = nodes
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|n| {
            vec![
                s(&n["id"]),
                node_state(n),
                if n["in"].as_bool() == Some(true) { "in".into() } else { "out".into() },
                if n["voter"].as_bool() == Some(true) { "voter".into() } else { "learner".into() },
                s(&n["weight"]),
                s(&n["pg_replicas"]),
                s(&n["rpc"]),
                s(&n["nbd"]),
                s(&n["http"]),
            ]
        })
        .collect();
    table(&["ID", "STATE", "IN/OUT", "ROLE", "WEIGHT", "PGS", "RPC", "NBD", "HTTP"], rows);
    Ok(())
}

pub fn node_set_voter(api: &Api, id: u64, voter: bool, json_out: bool) -> anyhow::Result<()> {
    let path = format!("/v1/nodes/{id}/{}", if voter { "promote" } else { "demote" });
    let v: Value = api.post(&path, &serde_json::json!({}))?;
    if json_out {
        return print_json(&v);
    }
    outln!("node {id} is now a metadata {}", if voter { "voter" } else { "learner" });
    Ok(())
}

fn volume_row(v: &Value) -> Vec<String> {
    vec![
        s(&v["name"]),
        s(&v["id"]),
        format_size(v["size_bytes"].as_u64().unwrap_or(0)),
        s(&v["replicas"]),
        format_size(u64::from(v["chunk_size_bytes"].as_u64().unwrap_or(0) as u32)),
        s(&v["generation"]),
        if v["shared"].as_bool() == Some(true) { "shared".into() } else { "-".into() },
    ]
}

const VOLUME_HEADER: [&str; 7] = ["NAME", "ID", "SIZE", "REPLICAS", "CHUNK", "GENERATION", "SHARED"];

#[allow(clippy::too_many_arguments)]
pub fn volume_create(
    api: &Api,
    name: &str,
    size: &str,
    replicas: Option<u8>,
    chunk_size: Option<&str>,
    shared: bool,
    overcommit_limit: f64,
    json_out: bool,
) -> anyhow::Result<()> {
    let mut body = json!({ "name": name, "size_bytes": parse_size(size)?, "shared": shared });
    if let Some(r) = replicas {
        body["replicas"] = json!(r);
    }
    if let Some(c) = chunk_size {
        body["chunk_size_bytes"] = json!(u32::try_from(parse_size(c)?).context("chunk size too large")?);
    }
    let v: Value = api.post("/v1/volumes", &body)?;
    if json_out {
        print_json(&v)?;
    } else {
        table(&VOLUME_HEADER, vec![volume_row(&v)]);
    }
    report_overcommit(api, overcommit_limit);
    Ok(())
}

/// Thin provisioning is allowed; saying how far the pool is overcommitted is not optional. Prints
/// (to stderr, so `--json` output stays clean) the bytes provisioned — every volume's size times
/// its replicas — against the pool's raw capacity, and a warning past `limit`.
fn report_overcommit(api: &Api, limit: f64) {
    let (Ok(volumes), Ok(nodes)) = (api.get::<Value>("/v1/volumes"), api.get::<Value>("/v1/nodes")) else {
        return;
    };
    let provisioned: u64 = volumes
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v["size_bytes"].as_u64().unwrap_or(0).saturating_mul(v["replicas"].as_u64().unwrap_or(1)))
        .sum();
    let capacity: u64 = nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["in"].as_bool() != Some(false))
        .map(|n| n["capacity_bytes"].as_u64().unwrap_or(0))
        .sum();
    if capacity == 0 {
        eprintln!(
            "pool: {} provisioned (size × replicas); the nodes have not reported their capacity yet",
            format_size(provisioned)
        );
        return;
    }
    let ratio = provisioned as f64 / capacity as f64;
    eprintln!(
        "pool: {} provisioned (size × replicas) on {} of raw capacity: {ratio:.2}× overcommitted",
        format_size(provisioned),
        format_size(capacity)
    );
    if ratio > limit {
        eprintln!(
            "warning: overcommit {ratio:.2}× exceeds the limit of {limit}× (--overcommit-limit, \
             CAIRN_OVERCOMMIT_LIMIT): writing the volumes full would run the pool out of space"
        );
    }
}

pub fn volume_ls(api: &Api, json_out: bool) -> anyhow::Result<()> {
    let vols: Value = api.get("/v1/volumes")?;
    if json_out {
        return print_json(&vols);
    }
    let empty = vec![];
    table(&VOLUME_HEADER, vols.as_array().unwrap_or(&empty).iter().map(volume_row).collect());
    Ok(())
}

pub fn volume_info(api: &Api, name: &str, json_out: bool) -> anyhow::Result<()> {
    let v: Value = api.get(&format!("/v1/volumes/{name}"))?;
    if json_out {
        return print_json(&v);
    }
    table(&VOLUME_HEADER, vec![volume_row(&v)]);
    outln!();
    outln!(
        "{} chunks in {} placement groups",
        v["chunks"],
        v["pgs"].as_array().map(|a| a.len()).unwrap_or(0)
    );
    let mut rows = Vec::new();
    if let Some(map) = v["nodes"].as_object() {
        for (node, count) in map {
            rows.push(vec![node.clone(), s(count)]);
        }
    }
    table(&["NODE", "PGS HELD"], rows);
    Ok(())
}

pub fn volume_resize(
    api: &Api,
    name: &str,
    size: &str,
    allow_shrink: bool,
    overcommit_limit: f64,
    json_out: bool,
) -> anyhow::Result<()> {
    let body = json!({ "size_bytes": parse_size(size)?, "allow_shrink": allow_shrink });
    let v: Value = api.post(&format!("/v1/volumes/{name}/resize"), &body)?;
    if json_out {
        print_json(&v)?;
    } else {
        table(&VOLUME_HEADER, vec![volume_row(&v)]);
    }
    report_overcommit(api, overcommit_limit);
    Ok(())
}

pub fn volume_rm(api: &Api, name: &str, json_out: bool) -> anyhow::Result<()> {
    let v: Value = api.delete(&format!("/v1/volumes/{name}"))?;
    if json_out {
        return print_json(&v);
    }
    outln!("deleted volume {name} (id {})", v["id"]);
    Ok(())
}

fn print_events(events: &Value, json_out: bool) -> anyhow::Result<u64> {
    let mut last = 0;
    for e in events.as_array().into_iter().flatten() {
        last = last.max(e["seq"].as_u64().unwrap_or(0));
        if json_out {
            outln!("{}", serde_json::to_string(e)?);
        } else {
            outln!(
                "{:>6}  {}  {:<18} {:<14} {}",
                s(&e["seq"]),
                utc(e["time_ms"].as_u64().unwrap_or(0)),
                s(&e["kind"]),
                s(&e["subject"]),
                s(&e["details"])
            );
        }
    }
    Ok(last)
}

/// Formats milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS.mmm` UTC (proleptic Gregorian
/// calendar; days-to-date by Howard Hinnant's civil-from-days algorithm).
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

pub fn events(api: &Api, follow: bool, since: u64, json_out: bool) -> anyhow::Result<()> {
    let mut since = since;
    loop {
        let events: Value = api.get(&format!("/v1/events?since={since}"))?;
        since = since.max(print_events(&events, json_out)?);
        if !follow {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(super::utc(1_795_639_744_922), "2026-11-25 20:49:04.922");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29 00:00:00.000");
    }
}
