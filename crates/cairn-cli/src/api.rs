//! The CLI's client of the admin HTTP API: finds the pool, tries each address until one answers,
//! follows the redirect a follower answers with, and turns error bodies into one-line errors.
//!
//! Addresses come from `--addr URL[,URL…]`, else `CAIRN_ADDR`, else `./cairn-data/pool.json`.

use anyhow::{Context, anyhow, bail};
use reqwest::StatusCode;
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde::de::DeserializeOwned;
use std::time::Duration;

/// How many redirects (follower → leader) a request follows.
const REDIRECTS_MAX: usize = 3;

#[derive(Debug)]
pub struct Api {
    client: Client,
    bases: Vec<String>,
}

fn normalise(addr: &str) -> String {
    let a = addr.trim().trim_end_matches('/');
    if a.starts_with("http://") || a.starts_with("https://") { a.to_string() } else { format!("http://{a}") }
}

/// The HTTP addresses listed in a pool.json.
pub fn pool_json_addrs(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let nodes = v["nodes"].as_array().ok_or_else(|| anyhow!("{}: no \"nodes\" list", path.display()))?;
    Ok(nodes.iter().filter_map(|n| n["http"].as_str().map(normalise)).collect())
}

impl Api {
    pub fn new(addr: Option<&str>) -> anyhow::Result<Api> {
        let bases: Vec<String> = match addr.map(str::to_string).or_else(|| std::env::var("CAIRN_ADDR").ok()) {
            Some(list) => list.split(',').filter(|s| !s.trim().is_empty()).map(normalise).collect(),
            None => {
                let path = std::path::Path::new("cairn-data/pool.json");
                if !path.exists() {
                    bail!(
                        "no pool address: pass --addr URL, set CAIRN_ADDR, or run in the directory holding cairn-data/"
                    );
                }
                pool_json_addrs(path)?
            }
        };
        if bases.is_empty() {
            bail!("no pool address given");
        }
        let client = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(15))
            .connect_timeout(Duration::from_secs(2))
            .build()
            .context("building the HTTP client")?;
        Ok(Api { client, bases })
    }

    /// Sends a request built by `build(client, url)` to the first address that answers, following
    /// redirects to the leader. Returns the final response (any status).
    fn send(&self, path: &str, build: &dyn Fn(&Client, &str) -> RequestBuilder) -> anyhow::Result<Response> {
        let mut failures = Vec::new();
        for base in &self.bases {
            let mut url = format!("{base}{path}");
            for _ in 0..=REDIRECTS_MAX {
                let resp = match build(&self.client, &url).send() {
                    Ok(r) => r,
                    Err(e) => {
                        failures.push(format!("{url}: {}", error_chain(&e)));
                        break;
                    }
                };
                if resp.status() == StatusCode::TEMPORARY_REDIRECT
                    && let Some(loc) =
                        resp.headers().get(reqwest::header::LOCATION).and_then(|l| l.to_str().ok())
                {
                    url = loc.to_string();
                    continue;
                }
                if resp.status() == StatusCode::SERVICE_UNAVAILABLE && self.bases.len() > 1 {
                    // This node may be cut off; another may be with the majority.
                    failures.push(format!("{url}: {}", error_text(resp)));
                    break;
                }
                return Ok(resp);
            }
        }
        bail!("no node of the pool answered: {}", failures.join("; "))
    }

    fn decode<T: DeserializeOwned>(resp: Response) -> anyhow::Result<T> {
        let status = resp.status();
        if !status.is_success() {
            bail!("{}", error_text(resp));
        }
        resp.json().context("decoding the answer")
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        Self::decode(self.send(path, &|c, u| c.get(u))?)
    }

    pub fn post<T: DeserializeOwned>(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<T> {
        Self::decode(self.send(path, &|c, u| c.post(u).json(body))?)
    }

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        Self::decode(self.send(path, &|c, u| c.delete(u))?)
    }

    /// GET on one node's API (`addr` as the node list gives it), not redirected: for what each
    /// node answers for itself (its scrub).
    pub fn get_at<T: DeserializeOwned>(&self, addr: &str, path: &str) -> anyhow::Result<T> {
        let url = format!("{}{path}", normalise(addr));
        Self::decode(self.client.get(&url).send().with_context(|| format!("GET {url}"))?)
    }

    /// POST on one node's API, not redirected.
    pub fn post_at<T: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", normalise(addr));
        Self::decode(self.client.post(&url).json(body).send().with_context(|| format!("POST {url}"))?)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn error_text(resp: Response) -> String {
    let status = resp.status();
    let url = resp.url().to_string();
    let text = resp.text().unwrap_or_default();
    match serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
    {
        Some(msg) => format!("{msg} (HTTP {})", status.as_u16()),
        // Not a Cairn API's answer (every error of ours is {"error": …}).
        None => format!(
            "{url} answered HTTP {} without a Cairn error: is this address a Cairn node's admin API?",
            status.as_u16()
        ),
    }
}

/// Parses a size with an optional binary suffix: `512`, `4K`, `40G`, `1T` (K = 1024).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => bail!("size {s:?}: unknown suffix {c:?} (use K, M, G or T)"),
            };
            (&t[..i], mult)
        }
        _ => (t, 1),
    };
    let n: u64 =
        num.parse().map_err(|_| anyhow!("size {s:?} is not a number with an optional K/M/G/T suffix"))?;
    n.checked_mul(mult).ok_or_else(|| anyhow!("size {s:?} is too large"))
}

/// Formats bytes with a binary suffix.
pub fn format_size(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)];
    for (u, m) in UNITS {
        if b >= m && b.is_multiple_of(m) {
            return format!("{}{u}", b / m);
        }
        if b >= m * 10 {
            return format!("{:.1}{u}", b as f64 / m as f64);
        }
    }
    format!("{b}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("40G").unwrap(), 40 << 30);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(format_size(40 << 30), "40G");
        assert_eq!(format_size(1536), "1536");
        assert_eq!(format_size(3 << 20), "3M");
    }
}
