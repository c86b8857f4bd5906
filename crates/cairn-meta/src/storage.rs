//! openraft storage on redb: the Raft log, vote and committed index in one redb database per node,
//! and the state machine in memory with its latest snapshot persisted beside the log.
//!
//! Durability: redb commits with fsync (its default `Durability::Immediate`), and openraft is told an
//! append is complete only after the commit returned, so an acknowledged log entry survives a power
//! cut. The state machine is rebuilt at start from the persisted snapshot plus the log entries after
//! it (openraft replays them), so it needs no fsync of its own.
//!
//! Encoding: entries, votes and snapshots are JSON (serde): metadata traffic is small, and JSON keeps
//! the files inspectable.

use crate::TypeConfig;
use crate::state::{ClusterState, Command, CommandResult, NodeAddr};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, RwLock};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

type StorageResult<T> = Result<T, StorageError<u64>>;

fn io_err(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

/// Runs `f`, turning a panic inside it into an error carrying the panic's message (redb may panic
/// on a damaged file). The default panic hook is silenced meanwhile so that no backtrace is printed
/// for a condition reported as a clear error; call it only where no other thread is expected to
/// panic (startup).
pub fn guard_panics<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    match result {
        Ok(r) => r,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(format!("the database library failed: {message}"))
        }
    }
}

/// Opens (creating) the metadata database of a node.
pub fn open_db(path: &Path) -> Result<Arc<Database>, redb::DatabaseError> {
    let db = Database::create(path)?;
    Ok(Arc::new(db))
}

fn get_meta<T: DeserializeOwned>(db: &Database, key: &str) -> Result<Option<T>, AnyError> {
    let txn = db.begin_read().map_err(io_err)?;
    let table = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    match table.get(key).map_err(io_err)? {
        Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(io_err)?)),
        None => Ok(None),
    }
}

/// The latest snapshot: its description as JSON, its data as raw bytes (a snapshot of 100 000
/// volumes is ~18 MiB; as a JSON array of numbers it would be ~4 times that), written in one
/// transaction. Reads a snapshot stored whole as JSON by earlier versions too.
fn get_snapshot(db: &Database) -> Result<Option<StoredSnapshot>, AnyError> {
    let Some(meta) = get_meta::<SnapshotMeta<u64, NodeAddr>>(db, "snapshot.meta")? else {
        return get_meta::<StoredSnapshot>(db, "snapshot");
    };
    let txn = db.begin_read().map_err(io_err)?;
    let table = txn.open_table(META).map_err(io_err)?;
    let data = table.get("snapshot.data").map_err(io_err)?.map(|v| v.value().to_vec()).unwrap_or_default();
    Ok(Some(StoredSnapshot { meta, data }))
}

fn put_snapshot(db: &Database, snapshot: &StoredSnapshot) -> Result<(), AnyError> {
    let meta = serde_json::to_vec(&snapshot.meta).map_err(io_err)?;
    let txn = db.begin_write().map_err(io_err)?;
    {
        let mut table = txn.open_table(META).map_err(io_err)?;
        table.insert("snapshot.meta", meta.as_slice()).map_err(io_err)?;
        table.insert("snapshot.data", snapshot.data.as_slice()).map_err(io_err)?;
        table.remove("snapshot").map_err(io_err)?;
    }
    txn.commit().map_err(io_err)
}

fn put_meta<T: Serialize>(db: &Database, key: &str, value: &T) -> Result<(), AnyError> {
    let bytes = serde_json::to_vec(value).map_err(io_err)?;
    let txn = db.begin_write().map_err(io_err)?;
    {
        let mut table = txn.open_table(META).map_err(io_err)?;
        table.insert(key, bytes.as_slice()).map_err(io_err)?;
    }
    txn.commit().map_err(io_err)
}

/// The Raft log, vote and committed index.
#[derive(Debug, Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    pub fn new(db: Arc<Database>) -> Self {
        LogStore { db }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let read = || -> Result<Vec<Entry<TypeConfig>>, AnyError> {
            let txn = self.db.begin_read().map_err(io_err)?;
            let table = match txn.open_table(LOG) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(io_err(e)),
            };
            let mut out = Vec::new();
            for item in table.range(range).map_err(io_err)? {
                let (_, v) = item.map_err(io_err)?;
                out.push(serde_json::from_slice(v.value()).map_err(io_err)?);
            }
            Ok(out)
        };
        read().map_err(|e| StorageIOError::read_logs(e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let read = || -> Result<LogState<TypeConfig>, AnyError> {
            let last_purged_log_id: Option<LogId<u64>> = get_meta(&self.db, "last_purged")?;
            let txn = self.db.begin_read().map_err(io_err)?;
            let last = match txn.open_table(LOG) {
                Ok(table) => match table.last().map_err(io_err)? {
                    Some((_, v)) => {
                        let e: Entry<TypeConfig> = serde_json::from_slice(v.value()).map_err(io_err)?;
                        Some(e.log_id)
                    }
                    None => None,
                },
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(io_err(e)),
            };
            Ok(LogState { last_purged_log_id, last_log_id: last.or(last_purged_log_id) })
        };
        read().map_err(|e| StorageIOError::read_logs(e).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StorageResult<()> {
        put_meta(&self.db, "vote", vote).map_err(|e| StorageIOError::write_vote(e).into())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<u64>>> {
        get_meta(&self.db, "vote").map_err(|e| StorageIOError::read_vote(e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> StorageResult<()> {
        put_meta(&self.db, "committed", &committed).map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<u64>>> {
        let c: Option<Option<LogId<u64>>> =
            get_meta(&self.db, "committed").map_err(|e| StorageError::from(StorageIOError::read_logs(e)))?;
        Ok(c.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let write = || -> Result<(), AnyError> {
            let txn = self.db.begin_write().map_err(io_err)?;
            {
                let mut table = txn.open_table(LOG).map_err(io_err)?;
                for entry in entries {
                    let bytes = serde_json::to_vec(&entry).map_err(io_err)?;
                    table.insert(entry.log_id.index, bytes.as_slice()).map_err(io_err)?;
                }
            }
            txn.commit().map_err(io_err)
        };
        let result = write();
        callback
            .log_io_completed(result.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string())));
        result.map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        self.remove_range(log_id.index..).map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        put_meta(&self.db, "last_purged", &log_id)
            .map_err(|e| StorageError::from(StorageIOError::write_logs(e)))?;
        self.remove_range(..=log_id.index).map_err(|e| StorageIOError::write_logs(e).into())
    }
}

impl LogStore {
    fn remove_range(&self, range: impl RangeBounds<u64>) -> Result<(), AnyError> {
        let txn = self.db.begin_write().map_err(io_err)?;
        {
            let mut table = txn.open_table(LOG).map_err(io_err)?;
            let keys: Vec<u64> = table
                .range(range)
                .map_err(io_err)?
                .map(|item| item.map(|(k, _)| k.value()).map_err(io_err))
                .collect::<Result<_, _>>()?;
            for k in keys {
                table.remove(k).map_err(io_err)?;
            }
        }
        txn.commit().map_err(io_err)
    }
}

/// The applied state: what the state machine holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SmData {
    pub last_applied: Option<LogId<u64>>,
    pub last_membership: StoredMembership<u64, NodeAddr>,
    pub cluster: ClusterState,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, NodeAddr>,
    data: Vec<u8>,
}

/// The state machine: [`SmData`] in memory (shared with readers), snapshots in redb.
#[derive(Debug, Clone)]
pub struct StateMachineStore {
    pub data: Arc<RwLock<SmData>>,
    db: Arc<Database>,
    /// Notified after every apply, so readers can wait for a change.
    changed: Arc<tokio::sync::watch::Sender<u64>>,
}

fn read_lock(d: &RwLock<SmData>) -> std::sync::RwLockReadGuard<'_, SmData> {
    d.read().unwrap_or_else(|p| p.into_inner())
}

fn write_lock(d: &RwLock<SmData>) -> std::sync::RwLockWriteGuard<'_, SmData> {
    d.write().unwrap_or_else(|p| p.into_inner())
}

impl StateMachineStore {
    /// Opens the state machine, starting from the persisted snapshot if there is one.
    pub fn open(db: Arc<Database>) -> Result<Self, AnyError> {
        let data = match get_snapshot(&db)? {
            Some(s) => serde_json::from_slice(&s.data).map_err(io_err)?,
            None => SmData::default(),
        };
        Ok(StateMachineStore {
            data: Arc::new(RwLock::new(data)),
            db,
            changed: Arc::new(tokio::sync::watch::channel(0).0),
        })
    }

    /// A receiver that sees a new value after every apply.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let (bytes, last_log_id, last_membership) = {
            let d = read_lock(&self.data);
            let bytes = serde_json::to_vec(&*d).map_err(|e| StorageIOError::read_state_machine(io_err(e)))?;
            (bytes, d.last_applied, d.last_membership.clone())
        };
        let snapshot_id = match last_log_id {
            Some(l) => format!("{}-{}", l.leader_id.term, l.index),
            None => "empty".to_string(),
        };
        let meta = SnapshotMeta { last_log_id, last_membership, snapshot_id };
        let stored = StoredSnapshot { meta: meta.clone(), data: bytes.clone() };
        put_snapshot(&self.db, &stored).map_err(|e| StorageIOError::write_snapshot(None, e))?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<u64>>, StoredMembership<u64, NodeAddr>)> {
        let d = read_lock(&self.data);
        Ok((d.last_applied, d.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<CommandResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        {
            let mut d = write_lock(&self.data);
            for entry in entries {
                d.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => results.push(CommandResult::Done),
                    EntryPayload::Normal(command) => results.push(apply_command(&mut d.cluster, command)),
                    EntryPayload::Membership(m) => {
                        d.last_membership = StoredMembership::new(Some(entry.log_id), m);
                        results.push(CommandResult::Done);
                    }
                }
            }
        }
        self.changed.send_modify(|v| *v += 1);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, NodeAddr>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let bytes = snapshot.into_inner();
        let data: SmData = serde_json::from_slice(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), io_err(e)))?;
        let stored = StoredSnapshot { meta: meta.clone(), data: bytes };
        put_snapshot(&self.db, &stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        *write_lock(&self.data) = data;
        self.changed.send_modify(|v| *v += 1);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let stored: Option<StoredSnapshot> =
            get_snapshot(&self.db).map_err(|e| StorageIOError::read_snapshot(None, e))?;
        Ok(stored.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

fn apply_command(cluster: &mut ClusterState, command: Command) -> CommandResult {
    cluster.apply(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_snapshot_stored_by_an_earlier_version_is_read_and_rewritten_in_the_new_layout() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(&dir.path().join("m.redb")).unwrap();
        let mut data = SmData::default();
        data.cluster.next_volume_id = 42;
        let old = StoredSnapshot { meta: SnapshotMeta::default(), data: serde_json::to_vec(&data).unwrap() };
        put_meta(&db, "snapshot", &old).unwrap();
        let mut sm = StateMachineStore::open(db.clone()).unwrap();
        assert_eq!(sm.data.read().unwrap().cluster.next_volume_id, 42);
        assert!(sm.get_current_snapshot().await.unwrap().is_some());
        sm.build_snapshot().await.unwrap();
        assert!(get_meta::<StoredSnapshot>(&db, "snapshot").unwrap().is_none(), "the old key is gone");
        let sm = StateMachineStore::open(db).unwrap();
        assert_eq!(sm.data.read().unwrap().cluster.next_volume_id, 42);
    }
}
