//! Admission of connections on a listener: at most `total_max` at once, and at most
//! `per_client_max` from one client address, so that one host cannot take every slot. The last
//! `reserved` slots take only privileged clients (the node RPC keeps them for the pool's own
//! nodes, so that clients holding connections cannot lock the pool's members out).

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
    reserved: usize,
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
    /// Only the reserved slots are left, and the client is not privileged.
    Reserved,
}

/// One admitted connection; its slot is released when dropped.
#[derive(Debug)]
pub struct Admitted {
    inner: Arc<Inner>,
    client: Option<IpAddr>,
}

impl ConnectionLimiter {
    pub fn new(total_max: usize, per_client_max: usize) -> ConnectionLimiter {
        Self::with_reserve(total_max, per_client_max, 0)
    }

    /// As [`ConnectionLimiter::new`], keeping the last `reserved` slots (at most half) for
    /// privileged clients.
    pub fn with_reserve(total_max: usize, per_client_max: usize, reserved: usize) -> ConnectionLimiter {
        let total_max = total_max.max(1);
        ConnectionLimiter {
            inner: Arc::new(Inner {
                total_max,
                per_client_max: per_client_max.max(1),
                reserved: reserved.min(total_max / 2),
                held: Mutex::default(),
                refused: Default::default(),
            }),
        }
    }

    /// Admits a connection from `client` (`None`: not an IP client, a unix socket) if there is room.
    pub fn admit(&self, client: Option<IpAddr>) -> Result<Admitted, Refusal> {
        self.admit_as(client, false)
    }

    /// [`ConnectionLimiter::admit`]; a `privileged` client may also take the reserved slots.
    pub fn admit_as(&self, client: Option<IpAddr>, privileged: bool) -> Result<Admitted, Refusal> {
        let mut held = self.inner.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.total >= self.inner.total_max {
            return Err(Refusal::Full);
        }
        if !privileged && held.total >= self.inner.total_max - self.inner.reserved {
            return Err(Refusal::Reserved);
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
        self.admit_logged_as(client, false, listener)
    }

    /// [`ConnectionLimiter::admit_logged`] for a client that may or may not be `privileged`.
    pub fn admit_logged_as(
        &self,
        client: Option<IpAddr>,
        privileged: bool,
        listener: &str,
    ) -> Option<Admitted> {
        match self.admit_as(client, privileged) {
            Ok(a) => Some(a),
            Err(refusal) => {
                let n = self.inner.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n.is_multiple_of(1000) {
                    let why = refusal.describe(
                        self.inner.total_max,
                        self.inner.per_client_max,
                        self.inner.reserved,
                    );
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
    pub fn describe(self, total_max: usize, per_client_max: usize, reserved: usize) -> String {
        match self {
            Refusal::Full => format!("{total_max} connections already open (limits.connections_max)"),
            Refusal::Reserved => format!(
                "{} connections already open; the last {reserved} are kept for the pool's nodes \
                 (limits.rpc_connections_reserved_for_members)",
                total_max - reserved
            ),
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

    #[test]
    fn reserved_slots_take_only_privileged_clients() {
        let l = ConnectionLimiter::with_reserve(4, 4, 2);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let _held: Vec<Admitted> = (0..2).map(|_| l.admit(Some(a)).unwrap()).collect();
        assert_eq!(l.admit(Some(a)).unwrap_err(), Refusal::Reserved);
        let _m1 = l.admit_as(Some(a), true).unwrap();
        let _m2 = l.admit_as(Some(a), true).unwrap();
        assert_eq!(l.admit_as(Some(a), true).unwrap_err(), Refusal::Full);
        assert_eq!(ConnectionLimiter::with_reserve(4, 4, 9).inner.reserved, 2, "at most half");
    }
}
