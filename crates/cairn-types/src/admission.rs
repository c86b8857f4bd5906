//! Admission of connections on a listener: at most `total_max` at once, and at most
//! `per_client_max` from one client address, so that one host cannot take every slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts the connections a listener holds; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct ConnectionLimiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    total_max: usize,
    per_client_max: usize,
    held: Mutex<Held>,
    refused: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener holds `total_max` connections.
    Full,
    /// The client holds `per_client_max` connections.
    ClientFull,
}

/// One admitted connection; its slot is released when dropped.
#[derive(Debug)]
pub struct Admitted {
    inner: Arc<Inner>,
    client: Option<IpAddr>,
}

impl ConnectionLimiter {
    pub fn new(total_max: usize, per_client_max: usize) -> ConnectionLimiter {
        ConnectionLimiter {
            inner: Arc::new(Inner {
                total_max: total_max.max(1),
                per_client_max: per_client_max.max(1),
                held: Mutex::default(),
                refused: Default::default(),
            }),
        }
    }

    /// Admits a connection from `client` (`None`: not an IP client, a unix socket) if there is room.
    pub fn admit(&self, client: Option<IpAddr>) -> Result<Admitted, Refusal> {
        let mut held = self.inner.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.total >= self.inner.total_max {
            return Err(Refusal::Full);
        }
        if let Some(ip) = client {
            let n = held.by_client.entry(ip).or_insert(0);
            if *n >= self.inner.per_client_max {
                return Err(Refusal::ClientFull);
            }
            *n += 1;
        }
        held.total += 1;
        Ok(Admitted { inner: self.inner.clone(), client })
    }

    /// [`ConnectionLimiter::admit`], logging a refusal (the first and every 1000th, so a flood
    /// cannot flood the log) with which limit was reached.
    pub fn admit_logged(&self, client: Option<IpAddr>, listener: &str) -> Option<Admitted> {
        match self.admit(client) {
            Ok(a) => Some(a),
            Err(refusal) => {
                let n = self.inner.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n.is_multiple_of(1000) {
                    let why = refusal.describe(self.inner.total_max, self.inner.per_client_max);
                    let from = client.map(|c| c.to_string()).unwrap_or_else(|| "a local client".into());
                    tracing::warn!(
                        "{listener} connection from {from} refused: {why}; {} refused so far",
                        n + 1
                    );
                }
                None
            }
        }
    }

    /// Connections held now.
    pub fn held(&self) -> usize {
        self.inner.held.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut held = self.inner.held.lock().unwrap_or_else(|p| p.into_inner());
        held.total = held.total.saturating_sub(1);
        if let Some(ip) = self.client
            && let Some(n) = held.by_client.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                held.by_client.remove(&ip);
            }
        }
    }
}

impl Refusal {
    /// Words for the log: which limit was reached.
    pub fn describe(self, total_max: usize, per_client_max: usize) -> String {
        match self {
            Refusal::Full => format!("{total_max} connections already open (limits.connections_max)"),
            Refusal::ClientFull => {
                format!(
                    "that client already holds {per_client_max} connections (limits.connections_per_client_max)"
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_hold_per_client_and_in_total_and_slots_come_back() {
        let l = ConnectionLimiter::new(3, 2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let a1 = l.admit(Some(a)).unwrap();
        let _a2 = l.admit(Some(a)).unwrap();
        assert_eq!(l.admit(Some(a)).unwrap_err(), Refusal::ClientFull);
        let _b1 = l.admit(Some(b)).unwrap();
        assert_eq!(l.admit(Some(b)).unwrap_err(), Refusal::Full);
        assert_eq!(l.admit(None).unwrap_err(), Refusal::Full);
        drop(a1);
        assert_eq!(l.held(), 2);
        let _a3 = l.admit(Some(a)).unwrap();
        assert_eq!(l.held(), 3);
    }
}
