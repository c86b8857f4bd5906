//! The store: a data directory of volumes, each a directory of chunk files.
//!
//! ```text
//! DATA_DIR/cairn-store                       identity: magic + format version
//! DATA_DIR/lock                              flock'ed while a process has the store open
//! DATA_DIR/volumes/<volume:016x>/volume.meta highest generation seen (replaced by rename)
//! DATA_DIR/volumes/<volume:016x>/<chunk:016x>.chunk
//! ```
//!
//! Concurrency: every chunk has one [`ChunkHandle`] at a time (the open-file cache hands out shared
//! handles and evicts only handles nobody holds), and every operation on a chunk holds that handle's
//! mutex, so data, block table and header of one chunk always change together as seen by readers.
//! Every volume has a read-write lock: mutations hold it shared; raising the highest generation holds
//! it exclusively, so once a newer generation is persisted no older write is still running or can start.

use crate::error::StoreError;
use crate::fault::{FaultInjector, IoOp};
use crate::format::{
    self, BLOCK_DATA, BLOCK_UNWRITTEN, ChunkHeader, HEADER_LEN, TABLE_ENTRY_LEN, TableEntry, VOLUME_META_LEN,
    VolumeMeta,
};
use cairn_types::checksum::zero_block_crc32c;
use cairn_types::version::VersionCheck;
use cairn_types::{
    BLOCK_SIZE_BYTES, ChunkIndex, ChunkSize, Expected, Generation, PgId, Version, VolumeId, crc32c,
};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

const BLOCK: u64 = BLOCK_SIZE_BYTES as u64;

/// Tunables of a store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Most chunk files kept open at once. Each costs one file descriptor; 1024 covers 1 GiB of hot
    /// data at the default chunk size while staying far below the usual 64k descriptor limit.
    pub open_files_max: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { open_files_max: 1024 }
    }
}

/// Who wrote a mutation: the writer's generation and its sequence number for the mutation. The
/// mutation leaves the chunk at version `(generation, sequence)`; with `expect` it applies only to a
/// copy at the version the writer expects (checked under the chunk's lock; see
/// [`cairn_types::Expected::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteStamp {
    pub generation: Generation,
    pub sequence: u64,
    pub expect: Option<Expected>,
}

impl WriteStamp {
    /// The version a mutation with this stamp leaves its chunk at.
    pub fn version(&self) -> Version {
        Version { generation: self.generation.0, seq: self.sequence }
    }
}

/// Data read from a chunk, with the checksum of every block (verified), which blocks hold data
/// (the others are holes) and the chunk's version, all read under the chunk's lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadReply {
    pub data: Vec<u8>,
    pub crcs: Vec<u32>,
    pub present: Vec<bool>,
    pub version: Version,
}

/// The persisted state of a chunk, as reported to peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkState {
    pub generation: Generation,
    pub version: u64,
    pub last_sequence: u64,
    pub dirty: bool,
    pub chunk_size: ChunkSize,
}

impl ChunkState {
    /// The chunk's version: the generation and sequence of its last mutation.
    pub fn version(&self) -> Version {
        Version { generation: self.generation.0, seq: self.last_sequence }
    }
}

/// A range as stored: its table entries, its data, the chunk's version.
type StoredRange = (Vec<TableEntry>, Vec<u8>, Version);

/// The indexes of the blocks of a stored range (its table entries and data) whose data fails its
/// checksum or whose table entry is damaged.
fn damaged_in(entries: &[TableEntry], data: &[u8]) -> Vec<usize> {
    entries
        .iter()
        .enumerate()
        .filter(|(i, e)| match e.state {
            BLOCK_UNWRITTEN => false,
            BLOCK_DATA => crc32c(&data[i * BLOCK as usize..(i + 1) * BLOCK as usize]) != e.crc,
            _ => true,
        })
        .map(|(i, _)| i)
        .collect()
}

fn header_version(header: &ChunkHeader) -> Version {
    Version { generation: header.generation.0, seq: header.last_sequence }
}

type ChunkKey = (VolumeId, ChunkIndex);

#[derive(Debug)]
struct ChunkHandle {
    file: File,
    path: PathBuf,
    inner: Mutex<ChunkInner>,
}

#[derive(Debug)]
struct ChunkInner {
    header: ChunkHeader,
    /// True once the header on disk says dirty and has been fdatasync'ed since the last flush.
    dirty_durable: bool,
}

#[derive(Debug)]
struct VolumeState {
    dir: PathBuf,
    /// Shared by mutations, exclusive while the highest generation is raised.
    fence: RwLock<Generation>,
    inner: Mutex<VolumeInner>,
}

#[derive(Debug, Default)]
struct VolumeInner {
    /// Chunks whose header says dirty (durably) → number of flushes since their last mutation.
    dirty: BTreeMap<ChunkIndex, u32>,
    /// Chunks mutated since their last fdatasync → value of `mutations` at their last mutation.
    unsynced: BTreeMap<ChunkIndex, u64>,
    /// Counts mutations, so a flush can tell whether a chunk was mutated again while it was syncing.
    mutations: u64,
    poisoned: bool,
    /// A chunk file was created (renamed into place) since the directory was last fsync'ed.
    dir_unsynced: bool,
}

/// A chunk's on-disk dirty flag is cleared only after the chunk has gone this many flushes without a
/// mutation. Clearing it right after each flush would make the next write to the chunk pay an extra
/// fdatasync to set it again; lingering keeps hot chunks marked, at the cost of reconciling chunks
/// written in the last 16 flush intervals after a crash instead of only the last one.
pub const DIRTY_LINGER_FLUSHES: u32 = 16;

/// Most chunk files synced in parallel by one flush: parallel fdatasyncs let the filesystem merge
/// journal commits and keep the device queue busy; 8 threads are enough to saturate one disk.
const FLUSH_PARALLEL_MAX: usize = 8;

/// A node-local chunk store. `Store` is `Sync`: call it from many threads (the daemon calls it from a
/// bounded blocking pool).
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    volumes_dir: PathBuf,
    open_files: Mutex<lru::LruCache<ChunkKey, Arc<ChunkHandle>>>,
    open_files_max: usize,
    volumes: Mutex<HashMap<VolumeId, Arc<VolumeState>>>,
    faults: Option<Arc<dyn FaultInjector>>,
    /// Damaged chunk files moved aside (to `DATA_DIR/damaged/`): this node holds no copy of them,
    /// so every operation on them fails until a copy from a replica is installed (never zeros).
    /// (Why, and where the file went.)
    quarantined: Mutex<BTreeMap<ChunkKey, String>>,
    /// Chunks quarantined since the last [`Store::take_damaged`]: for the node to fetch copies.
    damaged_found: Mutex<Vec<ChunkKey>>,
    /// Free bytes the store leaves on its file system (see [`Store::check_space`]).
    reserve_bytes: u64,
    /// The file system's free bytes, and when they were last looked up.
    free: Mutex<(Option<std::time::Instant>, u64)>,
    /// Held for the store's lifetime: the flock on DATA_DIR/lock.
    _lock: File,
}

/// The most a store keeps free on its file system for the node's own files (metadata database,
/// missed-writes log): 64 MiB, or a quarter of a small file system.
const RESERVE_BYTES_MAX: u64 = 64 << 20;

/// What a mutation may take besides its data: a new chunk file's header and block table.
const CHUNK_FILE_OVERHEAD_BYTES: u64 = 8 << 10;

/// How long a looked-up free-space figure is trusted.
const FREE_SPACE_TTL: std::time::Duration = std::time::Duration::from_millis(50);

fn free_bytes(dir: &Path) -> Option<(u64, u64)> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some((s.f_blocks.saturating_mul(s.f_frsize), s.f_bavail.saturating_mul(s.f_frsize)))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a store mutex means an invariant broke mid-update; the process is going
    // down anyway (release builds keep asserts), so propagating the poison as a panic is right.
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let context = context.into();
    move |e| StoreError::io(context, e, None)
}

impl Store {
    /// Opens (creating if needed) the store in `dir`. Fails clearly if the directory cannot be created
    /// or written, belongs to another format, or is in use by another process.
    pub fn open(dir: &Path, config: StoreConfig) -> Result<Store, StoreError> {
        Self::open_with_faults(dir, config, None)
    }

    /// Like [`Store::open`], with an IO fault injector (tests).
    pub fn open_with_faults(
        dir: &Path,
        config: StoreConfig,
        faults: Option<Arc<dyn FaultInjector>>,
    ) -> Result<Store, StoreError> {
        fs::create_dir_all(dir).map_err(io_err(format!("creating data directory {}", dir.display())))?;
        let lock_path = dir.join("lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(format!("opening {}", lock_path.display())))?;
        if let Err(e) = rustix::fs::flock(&lock_file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            return Err(if e == rustix::io::Errno::WOULDBLOCK {
                StoreError::DataDirLocked { path: dir.to_path_buf() }
            } else {
                StoreError::io(format!("locking {}", lock_path.display()), e.into(), None)
            });
        }
        let identity = dir.join("cairn-store");
        match fs::read(&identity) {
            Ok(bytes) => format::decode_store_identity(&bytes)
                .map_err(|e| StoreError::BadDataDir { path: dir.to_path_buf(), reason: e.to_string() })?,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                write_file_atomically(dir, "cairn-store", &format::encode_store_identity())?;
            }
            Err(e) => return Err(StoreError::io(format!("reading {}", identity.display()), e, None)),
        }
        let volumes_dir = dir.join("volumes");
        if !volumes_dir.exists() {
            fs::create_dir(&volumes_dir).map_err(io_err(format!("creating {}", volumes_dir.display())))?;
            fsync_dir(dir)?;
        }
        let open_files_max = config.open_files_max.max(1);
        Ok(Store {
            root: dir.to_path_buf(),
            volumes_dir,
            open_files: Mutex::new(lru::LruCache::unbounded()),
            open_files_max,
            volumes: Mutex::new(HashMap::new()),
            faults,
            quarantined: Mutex::default(),
            damaged_found: Mutex::default(),
            reserve_bytes: free_bytes(dir).map(|(total, _)| (total / 4).min(RESERVE_BYTES_MAX)).unwrap_or(0),
            free: Mutex::new((None, 0)),
            _lock: lock_file,
        })
    }

    /// Refuses a mutation that may take space (`NoSpace`) once the file system has less than the
    /// reserve free: the node's metadata database and missed-writes log live there too, and a
    /// node that cannot write them cannot even learn that a volume was deleted to free space.
    /// The free-space figure is looked up at most every [`FREE_SPACE_TTL`] and lowered by every
    /// mutation's size in between (and looked up again when that would cross the reserve), so a
    /// burst of writes cannot overshoot it.
    fn check_space(&self, volume: VolumeId, chunk: ChunkIndex, bytes: u64) -> Result<(), StoreError> {
        if self.reserve_bytes == 0 {
            return Ok(());
        }
        let take = bytes.saturating_add(CHUNK_FILE_OVERHEAD_BYTES);
        let need = self.reserve_bytes.saturating_add(take);
        let mut free = lock(&self.free);
        if free.0.is_none_or(|t| t.elapsed() > FREE_SPACE_TTL) || free.1 < need {
            let now = free_bytes(&self.root).map(|(_, f)| f).unwrap_or(u64::MAX);
            *free = (Some(std::time::Instant::now()), now);
        }
        if free.1 < need {
            return Err(StoreError::NoSpace { volume, chunk });
        }
        free.1 -= take;
        Ok(())
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn fault(&self, op: IoOp) -> io::Result<()> {
        match self.faults.as_ref().and_then(|f| f.before(op)) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn volume_dir(&self, volume: VolumeId) -> PathBuf {
        self.volumes_dir.join(format!("{:016x}", volume.get()))
    }

    fn chunk_path(&self, volume: VolumeId, chunk: ChunkIndex) -> PathBuf {
        self.volume_dir(volume).join(format!("{:016x}.chunk", chunk.0))
    }

    /// The volume's in-memory state, loading it from disk the first time: its highest generation and
    /// the set of chunks whose header says dirty.
    /// The state of a volume this node holds (its directory exists), loaded on first use; `None`
    /// for any other volume id, without keeping anything in memory for it (a request naming a
    /// volume that is not here costs nothing after it was answered).
    fn existing_volume(&self, volume: VolumeId) -> Result<Option<Arc<VolumeState>>, StoreError> {
        if let Some(v) = lock(&self.volumes).get(&volume) {
            return Ok(Some(v.clone()));
        }
        if !self.volume_dir(volume).exists() {
            return Ok(None);
        }
        self.volume(volume).map(Some)
    }

    fn volume(&self, volume: VolumeId) -> Result<Arc<VolumeState>, StoreError> {
        let mut volumes = lock(&self.volumes);
        if let Some(v) = volumes.get(&volume) {
            return Ok(v.clone());
        }
        let dir = self.volume_dir(volume);
        let mut highest = Generation(0);
        let mut dirty = BTreeMap::new();
        if dir.exists() {
            let meta_path = dir.join("volume.meta");
            let mut rebuild_meta = false;
            match fs::read(&meta_path) {
                Ok(b) => match VolumeMeta::decode(&b).map_err(|e| e.to_string()).and_then(|m| {
                    if m.volume == volume { Ok(m) } else { Err(format!("belongs to volume {}", m.volume)) }
                }) {
                    Ok(meta) => highest = meta.highest_generation,
                    Err(reason) => {
                        // Rebuilt below from the chunks' generations (a fence at least that high;
                        // the node also refuses generations below its cluster map's).
                        let name = format!("{:016x}-volume.meta", volume.get());
                        let next = "rebuilt from the generations of the volume's chunks";
                        self.move_aside(&meta_path, &name, &reason, next)?;
                        rebuild_meta = true;
                    }
                },
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(StoreError::io(format!("reading {}", meta_path.display()), e, None));
                }
            }
            remove_stale_temp_files(&dir);
            // Chunks found damaged before (this run's quarantine was in memory only): quarantined
            // again; a file present beside the marker is a copy whose install was cut short.
            let marked = damaged_markers(&dir);
            for chunk in &marked {
                let path = self.chunk_path(volume, *chunk);
                self.quarantine(volume, *chunk, &path, "marked damaged earlier, not yet replaced", None)?;
            }
            for chunk in list_chunk_files(&dir)? {
                if marked.contains(&chunk) {
                    continue;
                }
                let path = self.chunk_path(volume, chunk);
                if unfinished_creation(&path) {
                    // Created but never flushed before a power cut: it holds nothing a flush covered.
                    tracing::warn!(path = %path.display(), "removing a chunk file whose creation never became durable");
                    fs::remove_file(&path).map_err(io_err(format!("removing {}", path.display())))?;
                    continue;
                }
                let header = match File::open(&path)
                    .map_err(|e| StoreError::io(format!("opening {}", path.display()), e, None))
                    .and_then(|f| checked_header(&f, &path, volume, chunk))
                {
                    Ok(h) => h,
                    Err(StoreError::BadChunkFile { reason, .. }) => {
                        self.quarantine(volume, chunk, &path, &reason, None)?;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                highest = highest.max(header.generation);
                if header.dirty {
                    dirty.insert(chunk, 0);
                }
            }
            if rebuild_meta {
                write_file_atomically(
                    &dir,
                    "volume.meta",
                    &VolumeMeta { volume, highest_generation: highest }.encode(),
                )?;
                tracing::warn!(%volume, "rebuilt {} with generation {highest} (the highest of its chunks)", meta_path.display());
            }
        }
        let state = Arc::new(VolumeState {
            dir,
            fence: RwLock::new(highest),
            // After a restart the page cache may still hold unsynced data of dirty chunks: sync them
            // on the next flush too.
            inner: Mutex::new(VolumeInner {
                unsynced: dirty.keys().map(|c| (*c, 0)).collect(),
                dirty,
                mutations: 0,
                poisoned: false,
                dir_unsynced: false,
            }),
        });
        volumes.insert(volume, state.clone());
        Ok(state)
    }

    /// Admits a mutation carrying `stamp` on `volume`: refuses it if fenced or poisoned, persists a
    /// higher generation before accepting it, and returns the shared fence guard to hold while the
    /// mutation runs.
    fn admit<'v>(
        &self,
        volume: VolumeId,
        state: &'v VolumeState,
        stamp: WriteStamp,
    ) -> Result<std::sync::RwLockReadGuard<'v, Generation>, StoreError> {
        loop {
            if lock(&state.inner).poisoned {
                return Err(StoreError::Poisoned { volume });
            }
            {
                let fence = state.fence.read().unwrap_or_else(|p| p.into_inner());
                if stamp.generation < *fence {
                    return Err(StoreError::Fenced { volume, generation: stamp.generation, highest: *fence });
                }
                if stamp.generation == *fence {
                    return Ok(fence);
                }
            }
            // A newer generation: persist it exclusively, then admit under the shared guard.
            let mut fence = state.fence.write().unwrap_or_else(|p| p.into_inner());
            if stamp.generation > *fence {
                self.ensure_volume_dir(&state.dir)?;
                self.fault(IoOp::WriteVolumeMeta)
                    .map_err(io_err(format!("volume {volume}: persisting generation")))?;
                let meta = VolumeMeta { volume, highest_generation: stamp.generation };
                write_file_atomically(&state.dir, "volume.meta", &meta.encode())?;
                *fence = stamp.generation;
            }
        }
    }

    fn ensure_volume_dir(&self, dir: &Path) -> Result<(), StoreError> {
        if !dir.exists() {
            fs::create_dir(dir)
                .or_else(|e| if e.kind() == ErrorKind::AlreadyExists { Ok(()) } else { Err(e) })
                .map_err(io_err(format!("creating {}", dir.display())))?;
            fsync_dir(&self.volumes_dir)?;
        }
        Ok(())
    }

    /// The open handle of a chunk; opens the file if it exists, creates it if `create`, else `None`.
    fn chunk(
        &self,
        volume: VolumeId,
        state: &VolumeState,
        chunk: ChunkIndex,
        chunk_size: ChunkSize,
        create: bool,
    ) -> Result<Option<Arc<ChunkHandle>>, StoreError> {
        let key = (volume, chunk);
        let path = self.chunk_path(volume, chunk);
        if let Some(why) = lock(&self.quarantined).get(&key) {
            return Err(StoreError::BadChunkFile {
                path,
                reason: format!("{why}; this node holds no copy until one is installed from a replica"),
            });
        }
        let mut cache = lock(&self.open_files);
        if let Some(h) = cache.get(&key) {
            let h = h.clone();
            drop(cache);
            check_chunk_size(&h, chunk_size)?;
            return Ok(Some(h));
        }
        let handle = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => {
                let header = match checked_header(&file, &path, volume, chunk) {
                    Ok(h) => h,
                    Err(StoreError::BadChunkFile { reason, .. }) => {
                        drop(cache);
                        self.quarantine(volume, chunk, &path, &reason, Some(state))?;
                        return Err(StoreError::BadChunkFile { path, reason });
                    }
                    Err(e) => return Err(e),
                };
                ChunkHandle {
                    file,
                    path,
                    inner: Mutex::new(ChunkInner { header, dirty_durable: header.dirty }),
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if lock(&self.quarantined).contains_key(&key) {
                    // Quarantined while this call was on its way: never zeros, never a new file.
                    return Err(StoreError::BadChunkFile {
                        path,
                        reason: "damaged and moved aside; no copy here until one is installed".into(),
                    });
                }
                if !create {
                    return Ok(None);
                }
                self.create_chunk(volume, state, chunk, chunk_size, path)?
            }
            Err(e) => {
                return Err(StoreError::io(format!("opening {}", path.display()), e, Some(key)));
            }
        };
        let handle = Arc::new(handle);
        cache.put(key, handle.clone());
        self.evict(&mut cache);
        drop(cache);
        check_chunk_size(&handle, chunk_size)?;
        Ok(Some(handle))
    }

    /// Closes least recently used chunk files that nobody is using until the cache is within bounds.
    fn evict(&self, cache: &mut lru::LruCache<ChunkKey, Arc<ChunkHandle>>) {
        let mut scanned = 0;
        while cache.len() > self.open_files_max && scanned < cache.len() {
            scanned += 1;
            match cache.pop_lru() {
                // Only this cache holds it: nobody can get it without the cache lock, so closing is safe.
                Some((_, h)) if Arc::strong_count(&h) == 1 => drop(h),
                Some((k, h)) => {
                    cache.put(k, h);
                    // `put` made it most recent, so the loop moves on to the next candidate.
                }
                None => break,
            }
        }
    }

    /// Creates a chunk file: header (dirty, since it is created by a mutation) and an allocated block
    /// table in a temp file, renamed into place. Nothing is synced here: the next flush fdatasyncs the
    /// file (it is unsynced from its first mutation) and fsyncs the directory. A power cut before that
    /// may leave no file, or a file whose header never reached the disk (all zeros or short); opening
    /// the volume removes such a file — it held only writes no flush covered.
    fn create_chunk(
        &self,
        volume: VolumeId,
        state: &VolumeState,
        chunk: ChunkIndex,
        chunk_size: ChunkSize,
        path: PathBuf,
    ) -> Result<ChunkHandle, StoreError> {
        let key = (volume, chunk);
        self.ensure_volume_dir(&state.dir)?;
        self.fault(IoOp::CreateChunk)
            .map_err(|e| StoreError::io(format!("creating {}", path.display()), e, Some(key)))?;
        let header = ChunkHeader {
            volume,
            chunk,
            chunk_size,
            generation: Generation(0),
            version: 0,
            last_sequence: 0,
            dirty: true,
        };
        let tmp = state.dir.join(format!("{:016x}.chunk.tmp", chunk.0));
        let ctx = |what: &str| format!("creating chunk file {}: {what}", path.display());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| StoreError::io(ctx("open"), e, Some(key)))?;
        // Header block and block table are written out (allocated) so later updates need no space.
        let mut prefix = vec![0u8; format::data_offset(chunk_size) as usize];
        prefix[..HEADER_LEN].copy_from_slice(&header.encode());
        let result = (|| {
            file.write_all_at(&prefix, 0)?;
            file.set_len(format::chunk_file_len(chunk_size))?;
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::io(ctx("write"), e, Some(key)));
        }
        // The directory is fsync'ed by the next flush, not here: until then the new file may vanish in
        // a power cut, and with it only writes no flush has covered yet. (One directory fsync per
        // flush instead of one per new chunk halves the cost of writing fresh space.)
        {
            let mut v = lock(&state.inner);
            v.dir_unsynced = true;
            v.dirty.insert(chunk, 0);
        }
        Ok(ChunkHandle { file, path, inner: Mutex::new(ChunkInner { header, dirty_durable: true }) })
    }

    /// Called before a mutation touches a chunk's blocks: makes sure the chunk is durably marked dirty
    /// and records that the next flush must sync it.
    fn begin_mutation(
        &self,
        state: &VolumeState,
        handle: &ChunkHandle,
        inner: &mut ChunkInner,
    ) -> Result<(), StoreError> {
        if !inner.dirty_durable {
            self.mark_dirty(state, handle, inner)?;
        }
        let mut v = lock(&state.inner);
        v.mutations += 1;
        let m = v.mutations;
        v.unsynced.insert(inner.header.chunk, m);
        v.dirty.insert(inner.header.chunk, 0);
        Ok(())
    }

    /// Sets the chunk's on-disk dirty flag and fdatasyncs it.
    fn mark_dirty(
        &self,
        state: &VolumeState,
        handle: &ChunkHandle,
        inner: &mut ChunkInner,
    ) -> Result<(), StoreError> {
        let key = (inner.header.volume, inner.header.chunk);
        let mut header = inner.header;
        header.dirty = true;
        let r = self.fault(IoOp::MarkDirty).and_then(|_| handle.file.write_all_at(&header.encode(), 0));
        r.map_err(|e| StoreError::io(format!("marking {} dirty", handle.path.display()), e, Some(key)))?;
        if let Err(e) =
            self.fault(IoOp::Sync).and_then(|_| rustix::fs::fdatasync(&handle.file).map_err(Into::into))
        {
            lock(&state.inner).poisoned = true;
            return Err(StoreError::io(format!("syncing {}", handle.path.display()), e, Some(key)));
        }
        inner.header = header;
        inner.dirty_durable = true;
        Ok(())
    }

    /// Records a mutation in the chunk header (not synced: the chunk is durably dirty already, so a
    /// crash that loses this update is covered by reconciliation of dirty chunks).
    fn bump_version(
        &self,
        handle: &ChunkHandle,
        inner: &mut ChunkInner,
        version: Version,
    ) -> Result<Version, StoreError> {
        let mut header = inner.header;
        header.version += 1;
        header.generation = Generation(version.generation);
        header.last_sequence = version.seq;
        let key = (header.volume, header.chunk);
        self.fault(IoOp::WriteHeader).and_then(|_| handle.file.write_all_at(&header.encode(), 0)).map_err(
            |e| StoreError::io(format!("updating header of {}", handle.path.display()), e, Some(key)),
        )?;
        inner.header = header;
        Ok(version)
    }

    /// A mutation found the copy at its own new version (a re-send of a mutation applied here):
    /// answered as applied only if the blocks it names hold what it writes (`entries`: the
    /// table entries it would leave). Two writers whose versions collide (the same count and
    /// writer tag) would otherwise each be told their different data was applied, and the copies
    /// would differ at one version; such a mutation is refused as a conflict and settled instead.
    fn already_applied(
        &self,
        handle: &ChunkHandle,
        inner: &ChunkInner,
        first_block: u32,
        entries: &[TableEntry],
        key: ChunkKey,
        stamp: &WriteStamp,
    ) -> Result<Version, StoreError> {
        let current = header_version(&inner.header);
        let mut table = vec![0u8; entries.len() * TABLE_ENTRY_LEN];
        let at = format::table_offset() + u64::from(first_block) * TABLE_ENTRY_LEN as u64;
        self.fault(IoOp::Read)
            .and_then(|_| handle.file.read_exact_at(&mut table, at))
            .map_err(|e| StoreError::io(format!("reading {}", handle.path.display()), e, Some(key)))?;
        let same = table.chunks_exact(TABLE_ENTRY_LEN).map(TableEntry::decode).eq(entries.iter().copied());
        match stamp.expect {
            Some(expected) if !same => Err(StoreError::VersionMismatch {
                volume: key.0,
                chunk: key.1,
                current,
                expected,
                behind: false,
            }),
            _ => Ok(current),
        }
    }

    /// Checks a mutation's expected version against the chunk's (`current`, under its lock).
    /// `Ok(true)`: apply it; `Ok(false)`: the copy is already at the mutation's version (a re-send).
    fn check_expected(
        volume: VolumeId,
        chunk: ChunkIndex,
        current: Version,
        stamp: &WriteStamp,
    ) -> Result<bool, StoreError> {
        let Some(expect) = stamp.expect else { return Ok(true) };
        match expect.check(current, stamp.version()) {
            VersionCheck::Apply => Ok(true),
            VersionCheck::AlreadyApplied => Ok(false),
            VersionCheck::Behind => {
                Err(StoreError::VersionMismatch { volume, chunk, current, expected: expect, behind: true })
            }
            VersionCheck::Conflict => {
                Err(StoreError::VersionMismatch { volume, chunk, current, expected: expect, behind: false })
            }
        }
    }

    /// Writes whole blocks at `offset` (block aligned) of a chunk. `crcs` holds the writer's CRC-32C of
    /// each block; every one is verified before anything is stored.
    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &self,
        volume: VolumeId,
        chunk: ChunkIndex,
        chunk_size: ChunkSize,
        offset: u32,
        data: &[u8],
        crcs: &[u32],
        stamp: WriteStamp,
    ) -> Result<Version, StoreError> {
        let first_block = check_range(chunk_size, offset, data.len() as u64)?;
        check_received(volume, chunk, first_block, data, crcs)?;
        let state = self.volume(volume)?;
        let _fence = self.admit(volume, &state, stamp)?;
        // (A new chunk file is at version none: a refused write may leave one, reading as zeros.)
        let handle = self
            .chunk(volume, &state, chunk, chunk_size, true)?
            .ok_or_else(|| StoreError::InvalidRequest("chunk vanished while being created".into()))?;
        let mut inner = lock(&handle.inner);
        if !Self::check_expected(volume, chunk, header_version(&inner.header), &stamp)? {
            let entries: Vec<TableEntry> = crcs.iter().map(|c| TableEntry::data(*c)).collect();
            return self.already_applied(&handle, &inner, first_block, &entries, (volume, chunk), &stamp);
        }
        // After the fence and the version: a fenced or mismatched write is answered as such.
        self.check_space(volume, chunk, data.len() as u64)?;
        self.begin_mutation(&state, &handle, &mut inner)?;
        self.write_locked(&handle, chunk_size, first_block, data, crcs, (volume, chunk))?;
        self.bump_version(&handle, &mut inner, stamp.version())
    }

    /// Writes whole blocks (checked by the caller) with the chunk's lock held and its mutation begun.
    fn write_locked(
        &self,
        handle: &ChunkHandle,
        chunk_size: ChunkSize,
        first_block: u32,
        data: &[u8],
        crcs: &[u32],
        key: ChunkKey,
    ) -> Result<(), StoreError> {
        // Data first, then the table: if the data write fails (ENOSPC filling a hole), the table
        // still describes the old contents, which are intact.
        let data_at = format::data_offset(chunk_size) + u64::from(first_block) * BLOCK;
        self.fault(IoOp::WriteData)
            .and_then(|_| handle.file.write_all_at(data, data_at))
            .map_err(|e| StoreError::io(format!("writing {}", handle.path.display()), e, Some(key)))?;
        let mut table = vec![0u8; crcs.len() * TABLE_ENTRY_LEN];
        for (entry, crc) in table.chunks_exact_mut(TABLE_ENTRY_LEN).zip(crcs) {
            TableEntry::data(*crc).encode_into(entry);
        }
        self.write_table(handle, first_block, &table, key)
    }

    fn write_table(
        &self,
        handle: &ChunkHandle,
        first_block: u32,
        table: &[u8],
        key: ChunkKey,
    ) -> Result<(), StoreError> {
        let at = format::table_offset() + u64::from(first_block) * TABLE_ENTRY_LEN as u64;
        self.fault(IoOp::WriteTable).and_then(|_| handle.file.write_all_at(table, at)).map_err(|e| {
            StoreError::io(format!("writing block table of {}", handle.path.display()), e, Some(key))
        })
    }

    /// Makes `len` bytes at `offset` (block aligned) read as zeros and frees their space.
    pub fn trim(
        &self,
        volume: VolumeId,
        chunk: ChunkIndex,
        chunk_size: ChunkSize,
        offset: u32,
        len: u32,
        stamp: WriteStamp,
    ) -> Result<Version, StoreError> {
        self.zero(volume, chunk, chunk_size, offset, len, stamp, false)
    }

    /// Makes `len` bytes at `offset` (block aligned) read as zeros. With `allocate` the blocks are
    /// written with zeros and keep their space (NBD's NO_HOLE); without, they become holes like a trim.
    #[allow(clippy::too_many_arguments)]
    pub fn write_zeroes(
        &self,
        volume: VolumeId,
        chunk: ChunkIndex,
        chunk_size: ChunkSize,
        offset: u32,
        len: u32,
        stamp: WriteStamp,
        allocate: bool,
    ) -> Result<Version, StoreError> {
        self.zero(volume, chunk, chunk_size, offset, len, stamp, allocate)
    }

    #[allow(clippy::too_many_arguments)]
    fn zero(
        &self,
        volume: VolumeId,
        chunk: ChunkIndex,
        chunk_size: ChunkSize,
        offset: u32,
        len: u32,
        stamp: WriteStamp,
        allocate: bool,
    ) -> Result<Version, StoreError> {
        let first_block = check_range(chunk_size, offset, u64::from(len))?;
        if allocate {
            let zeros = vec![0u8; len as usize];
            let crcs = vec![zero_block_crc32c(); (len / BLOCK_SIZE_BYTES) as usize];
            return self.write(volume, chunk, chunk_size, offset, &zeros, &crcs, stamp);
        }
        // A volume this node holds nothing of reads as zeros already (nothing to keep for it).
        let Some(state) = self.existing_volume(volume)? else {
            Self::check_expected(volume, chunk, Version::NONE, &stamp)?;
            return Ok(Version::NONE);
        };
        let _fence = self.admit(volume, &state, stamp)?;
        // A chunk that does not exist reads as zeros already: nothing to free, nothing to record
        // (it stays at version none).
        let Some(handle) = self.chunk(volume, &state, chunk, chunk_size, false)? else {
            Self::check_expected(volume, chunk, Version::NONE, &stamp)?;
            return Ok(Version::NONE);
        };
        let mut inner = lock(&handle.inner);
        if !Self::check_expected(volume, chunk, header_version(&inner.header), &stamp)? {
            let entries = vec![TableEntry::UNWRITTEN; (len / BLOCK_SIZE_BYTES) as usize];
            return self.already_applied(&handle, &inner, first_block, &entries, (volume, chunk), &stamp);
        }
        self.begin_mutation(&state, &handle, &mut inner)?;
        self.punch_locked(&handle, chunk_size, first_block, len, (volume, chunk))?;
        self.bump_version(&handle, &mut inner, stamp.version())
    }

    /// Makes blocks read as zeros and frees them, with the chunk's lock held and its mutation begun.
    fn punch_locked(
        &self,
        handle: &ChunkHandle,
        chunk_size: ChunkSize,
        first_block: u32,
        len: u32,
        key: ChunkKey,
    ) -> Result<(), StoreError> {
        let blocks = (len / BLOCK_SIZE_BYTES) as usize;
        // Table first: once the entries say unwritten the blocks read as zeros whatever the data
        // region holds, so punching the hole afterwards is only space reclamation.
        let mut table = vec![0u8; blocks * TABLE_ENTRY_LEN];
        for entry in table.chunks_exact_mut(TABLE_ENTRY_LEN) {
            TableEntry::UNWRITTEN.encode_into(entry);
        }
        self.write_table(handle, first_block, &table, key)?;
        let at = format::data_offset(chunk_size) + u64::from(first_block) * BLOCK;
        self.fault(IoOp::PunchHole)
            .and_then(|_| {
                rustix::fs::fallocate(
                    &handle.file,
                    rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                    at,
                    u64::from(len),
                )
                .map_err(Into::into)
            })
            .map_err(|e| StoreError::io(format!("punching hole in {}", handle.path.display()), e, Some(key)))
    }

    /// Which blocks of `[offset, offset + len)` hold data (true) or are unwritten holes (false).
    /// A chunk this node does not hold is all holes.
    pub fn allocation(
        &self,
        volume: VolumeId,
        chunk: ChunkIndex,
        chunk_size: ChunkSize,
        offset: u32,
        len: u32,
    ) -> Result<Vec<bool>, StoreError> {
        let first_block = check_range(chunk_size, offset, u64::from(len))?;
        let blocks = (len / BLOCK_SIZE_BYTES) as usize;
        let Some(state) = self.existing_volume(volume)? else { return Ok(vec![false; blocks]) };
        let Some(handle) = self.chunk(volume, &state, chunk, chunk_size, false)? else {
            return Ok(vec![false; blocks]);
        };
        let _inner = lock(&handle.inner);
        let mut table = vec![0u8; blocks * TABLE_ENTRY_LEN];
        let at = format::table_offset() + u64::from(first_block) * TABLE_ENTRY_LEN as u64;
        self.fault(IoOp::Read).and_then(|_| handle.file.read_exact_at(&mut table, at)).map_err(|e| {
            StoreError::io(format!("reading {}", handle.path.display()), e, Some((volume, chunk)))
        })?;
        Ok(table.chunks_exact(TABLE_ENTRY_LEN).map(|e| TableEntry::decode(e).state == BLOCK_DATA).collect())
    }

    /// Raises the volume's fence to `generation` (persisted before this returns) and waits for the
    /// mutations admitted under the old fence to finish: from then on only `generation` or newer
    /// mutates the volume here. Raising it to the current value is a no-op; a lower one is
    /// [`StoreError::Fenced`].
    pub fn raise_fence(&self, volume: VolumeId, generation: Generation) -> Result<(), StoreError> {
        let state = self.volume(volume)?;
        let _admitted = self.admit(volume, &state, WriteStamp { generation, ..WriteStamp::default() })?;
        Ok(())
    }

    /// Replaces `[offset, offset + 4 KiB × present.len())` of a chunk with a copy from a peer
    /// (catch-up, reconciliation): blocks whose entry in `present` is false become holes; `data`
    /// holds the present blocks only, in order, with their checksums in `crcs`. A range that ends
    /// the chunk leaves it at `version` (the copy's); an earlier piece of a copy sent in several
    /// leaves it at [`Version::installing`]`(version)`, which reads refuse and the next piece
    /// expects. Fenced like a write: refused if `generation` is below the volume's fence (raised if
    /// above). With `expect`, applied only if this copy is still at that version (a reconciliation
    /// planned against it), checked and applied under the chunk's lock in one go, before anything
    /// changes (a damaged, quarantined chunk counts as holding none: an install expecting
    /// `Version::NONE` or none at all replaces it). The whole copy installed, the chunk is no
    /// longer dirty — unless `keep_dirty` (the source's copy is dirty: it may hold a write never
    /// confirmed, which the next open must reconcile and a catch-up compare).
    #[allow(clippy::too_many_arguments)]
    pub fn install_range(
        &self,
        volume: VolumeId,
        chunk: ChunkIndex,
        chunk_size: ChunkSize,
        offset: u32,
        present: &[bool],
        data: &[u8],
        crcs: &[u32],
        generation: Generation,
        version: Version,
        expect: Option<Version>,
        keep_dirty: bool,
    ) -> Result<(), StoreError> {
        let first_block = check_range(chunk_size, offset, present.len() as u64 * BLOCK)?;
        let n_present = present.iter().filter(|p| **p).count();
        if data.len() != n_present * BLOCK as usize || crcs.len() != n_present {
            return Err(StoreError::InvalidRequest(
                "chunk install: data does not match the present blocks".into(),
            ));
        }
        let key = (volume, chunk);
        for (i, block) in data.chunks_exact(BLOCK as usize).enumerate() {
            if crc32c(block) != crcs[i] {
                return Err(StoreError::InvalidRequest(format!(
                    "volume {volume} chunk {chunk}: a copied block does not match its checksum"
                )));
            }
        }
        let state = self.volume(volume)?;
        let _fence = self.admit(volume, &state, WriteStamp { generation, ..WriteStamp::default() })?;
        let mismatch = |current: Version, expected: Version| StoreError::VersionMismatch {
            volume,
            chunk,
            current,
            expected: Expected::Exact(expected),
            behind: current < expected,
        };
        if let Some(expected) = expect {
            // Checked before anything changes: no file created, no quarantine lifted for a copy
            // planned against another state. A quarantined (damaged) copy counts as none.
            let current = if lock(&self.quarantined).contains_key(&key) {
                Version::NONE
            } else {
                match self.chunk(volume, &state, chunk, chunk_size, false)? {
                    Some(h) => header_version(&lock(&h.inner).header),
                    None => Version::NONE,
                }
            };
            if current != expected {
                return Err(mismatch(current, expected));
            }
        }
        // After the fence and the version check: a superseded or stale copy is told so, not
        // "no space" (which would make a healthy, nearly full node look failed).
        if n_present > 0 {
            self.check_space(volume, chunk, data.len() as u64)?;
        }
        // An install replaces this node's copy: a damaged (quarantined) copy is replaced too.
        self.replace_if_damaged(volume, chunk)?;
        let handle = self
            .chunk(volume, &state, chunk, chunk_size, true)?
            .ok_or_else(|| StoreError::InvalidRequest("chunk vanished while being created".into()))?;
        let mut inner = lock(&handle.inner);
        let current = header_version(&inner.header);
        if let Some(expected) = expect
            && current != expected
        {
            return Err(mismatch(current, expected));
        }
        self.begin_mutation(&state, &handle, &mut inner)?;
        // Runs of present / absent blocks, each applied as one write or one hole.
        let (mut start, mut data_at, mut crc_at) = (0, 0usize, 0usize);
        while start < present.len() {
            let mut end = start + 1;
            while end < present.len() && present[end] == present[start] {
                end += 1;
            }
            let at = first_block + start as u32;
            let n = end - start;
            let len = n as u32 * BLOCK_SIZE_BYTES;
            if present[start] {
                let bytes = &data[data_at..data_at + len as usize];
                self.write_locked(&handle, chunk_size, at, bytes, &crcs[crc_at..crc_at + n], key)?;
                data_at += len as usize;
                crc_at += n;
            } else {
                self.punch_locked(&handle, chunk_size, at, len, key)?;
            }
            start = end;
        }
        let ends_chunk = u64::from(offset) + present.len() as u64 * BLOCK == u64::from(chunk_size.bytes());
        self.bump_version(
            &handle,
            &mut inner,
            if ends_chunk { version } else { Version::installing(version) },
        )?;
        if ends_chunk {
            // Durable before the copier counts it done: a copy whose header (with the source's
            // version) reached the disk without its blocks would, after a power cut, pass for the
            // source's copy while holding older data.
            if let Err(e) =
                self.fault(IoOp::Sync).and_then(|_| rustix::fs::fdatasync(&handle.file).map_err(Into::into))
            {
                lock(&state.inner).poisoned = true;
                return Err(StoreError::io(format!("syncing {}", handle.path.display()), e, Some(key)));
            }
            let dir_unsynced = std::mem::take(&mut lock(&state.inner).dir_unsynced);
            if dir_unsynced {
                fsync_dir(&state.dir)?;
            }
            if keep_dirty {
                // (Durably dirty since the install began, and synced; its flushes count from now.)
                let mut v = lock(&state.inner);
                v.dirty.insert(chunk, 0);
                v.unsynced.remove(&chunk);
                return Ok(());
            }
            // The whole copy is durable and is its source's copy: no longer dirty (else every
            // chunk a catch-up or a backfill copied would be reported at the next open and
            // compared at the next catch-up). Not synced: if it is lost the chunk merely looks
            // dirty after a crash. (The chunk lock is held: no mutation of it came in between.)
            let mut header = inner.header;
            header.dirty = false;
            self.fault(IoOp::WriteHeader)
                .and_then(|_| handle.file.write_all_at(&header.encode(), 0))
                .map_err(|e| {
                    StoreError::io(format!("clearing dirty flag of {}", handle.path.display()), e, Some(key))
                })?;
            inner.header = header;
            inner.dirty_durable = false;
            let mut v = lock(&state.inner);
            v.dirty.remove(&chunk);
            v.unsynced.remove(&chunk);
        }
        Ok(())
    }

    /// Lets an install recreate a chunk whose file was damaged (found now or earlier).
    fn replace_if_damaged(&self, volume: VolumeId, chunk: ChunkIndex) -> Result<(), StoreError> {
        let key = (volume, chunk);
        if !lock(&self.quarantined).contains_key(&key) {
            let state = self.volume(volume)?;
            match self.open_existing(volume, &state, chunk) {
                Ok(_) | Err(StoreError::BadChunkFile { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        if lock(&self.quarantined).remove(&key).is_some() {
            tracing::info!(%volume, %chunk, "replacing a damaged chunk with a copy from a replica");
            // (If this removal is lost in a crash the chunk is quarantined and copied again.)
            let _ = fs::remove_file(damaged_marker(&self.volume_dir(volume), chunk));
        }
        Ok(())
    }

    /// Moves a damaged file to `DATA_DIR/damaged/` (kept for inspection; never read again) and says
    /// so with the path and what happens next.
    fn move_aside(&self, path: &Path, name: &str, reason: &str, next: &str) -> Result<PathBuf, StoreError> {
        let dir = self.root.join("damaged");
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let to = dir.join(format!("{name}-{ms}"));
        match fs::rename(path, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(format!("moving {} aside", path.display()), e, None)),
        }
        fsync_dir(&dir)?;
        if let Some(parent) = path.parent() {
            fsync_dir(parent)?;
        }
        tracing::error!(
            "{} is damaged ({reason}); moved to {} ({next}; the moved file can be inspected or deleted)",
            path.display(),
            to.display()
        );
        Ok(to)
    }

    /// Moves a damaged chunk file aside and refuses every operation on the chunk until a copy is
    /// installed ([`Store::install_range`]).
    fn quarantine(
        &self,
        volume: VolumeId,
        chunk: ChunkIndex,
        path: &Path,
        reason: &str,
        state: Option<&VolumeState>,
    ) -> Result<(), StoreError> {
        let key = (volume, chunk);
        // Quarantined before the file goes, so that a concurrent open never finds it missing and
        // reads zeros (`chunk()` checks again when the file is not found).
        let newly = lock(&self.quarantined).insert(key, format!("{reason}; being moved aside")).is_none();
        lock(&self.open_files).pop(&key);
        if let Some(state) = state {
            // Nothing of it is left to flush.
            let mut inner = lock(&state.inner);
            inner.dirty.remove(&chunk);
            inner.unsynced.remove(&chunk);
        }
        if let Some(dir) = path.parent() {
            // Durable before the file goes: a crash must not leave neither file nor record.
            let marker = damaged_marker(dir, chunk);
            fs::write(&marker, reason.as_bytes())
                .and_then(|_| File::open(&marker)?.sync_all())
                .map_err(io_err(format!("writing {}", marker.display())))?;
            fsync_dir(dir)?;
        }
        let name = format!("{:016x}-{:016x}.chunk", volume.get(), chunk.0);
        let to = self.move_aside(path, &name, reason, "this node's copy is restored from a replica")?;
        let why = format!("{reason}; moved to {}", to.display());
        lock(&self.quarantined).insert(key, why);
        if newly {
            lock(&self.damaged_found).push(key);
        }
        Ok(())
    }

    /// Chunks found damaged (and quarantined) since the last call: the node fetches copies of them
    /// from replicas.
    pub fn take_damaged(&self) -> Vec<(VolumeId, ChunkIndex)> {
        std::mem::take(&mut *lock(&self.damaged_found))
    }

    /// Whether this node's copy of a chunk is quarantined (damaged, awaiting a replica's copy).
    pub fn is_quarantined(&self, volume: VolumeId, chunk: ChunkIndex) -> bool {
        lock(&self.quarantined).contains_key(&(volume, chunk))
    }

    /// Loads every volume, checking each chunk file's header and size and each volume's metadata:
    /// damaged files are moved aside (see [`Store::take_damaged`]). Returns the chunks quarantined.
    pub fn check_all(&self) -> Result<usize, StoreError> {
        for volume in self.list_volumes()? {
            self.volume(volume)?;
        }
        Ok(lock(&self.quarantined).len())
    }

    /// Rewrites, with good copies read from a peer, the blocks of the range that are corrupt here
    /// *now*: under the chunk's lock, a block is replaced only if its stored data fails its stored
    /// checksum (or its table entry is damaged). A block a newer write replaced meanwhile verifies
    /// and is left alone, so a repair never puts older data over newer. Returns how many blocks
    /// were rewritten. Never raises the fence and never changes the chunk's version.
    pub fn repair(
        &self,
        volume: VolumeId,
        chunk: ChunkIndex,
        chunk_size: ChunkSize,
        offset: u32,
        data: &[u8],
        crcs: &[u32],
    ) -> Result<u32, StoreError> {
        self.repair_inner(volume, (chunk, chunk_size), offset, data, crcs, None)
    }

    /// [`Store::repair`] with data read from a peer's copy at version `at`, done only if this copy
    /// is at that version too (checked under the chunk's lock; else `VersionMismatch`): one version
    /// names one content, so the peer's block is what this copy's damaged block held. A node's
    /// scrub repairs so, without the writer's chunk lock that a client's repair holds: a block
    /// damaged after a newer write here must not get an older copy's data.
    pub fn repair_at(
        &self,
        volume: VolumeId,
        (chunk, chunk_size): (ChunkIndex, ChunkSize),
        offset: u32,
        (data, crcs): (&[u8], &[u32]),
        at: Version,
    ) -> Result<u32, StoreError> {
        self.repair_inner(volume, (chunk, chunk_size), offset, data, crcs, Some(at))
    }

    fn repair_inner(
        &self,
        volume: VolumeId,
        (chunk, chunk_size): (ChunkIndex, ChunkSize),
        offset: u32,
        data: &[u8],
        crcs: &[u32],
        at: Option<Version>,
    ) -> Result<u32, StoreError> {
        let first_block = check_range(chunk_size, offset, data.len() as u64)?;
        let blocks = check_received(volume, chunk, first_block, data, crcs)?;
        let Some(state) = self.existing_volume(volume)? else { return Ok(0) };
        let stamp = WriteStamp { generation: self.highest_generation(volume)?, ..WriteStamp::default() };
        let _fence = self.admit(volume, &state, stamp)?;
        let Some(handle) = self.chunk(volume, &state, chunk, chunk_size, false)? else { return Ok(0) };
        let key = (volume, chunk);
        let mut inner = lock(&handle.inner);
        let current = header_version(&inner.header);
        if let Some(at) = at.filter(|at| *at != current) {
            return Err(StoreError::VersionMismatch {
                volume,
                chunk,
                current,
                expected: cairn_types::Expected::Exact(at),
                behind: current < at,
            });
        }
        let mut table = vec![0u8; blocks * TABLE_ENTRY_LEN];
        let table_at = format::table_offset() + u64::from(first_block) * TABLE_ENTRY_LEN as u64;
        let mut stored = vec![0u8; data.len()];
        let data_at = format::data_offset(chunk_size) + u64::from(offset);
        let read_ctx = || format!("reading {}", handle.path.display());
        self.fault(IoOp::Read)
            .and_then(|_| handle.file.read_exact_at(&mut table, table_at))
            .and_then(|_| handle.file.read_exact_at(&mut stored, data_at))
            .map_err(|e| StoreError::io(read_ctx(), e, Some(key)))?;
        let entries: Vec<TableEntry> = table.chunks_exact(TABLE_ENTRY_LEN).map(TableEntry::decode).collect();
        let damaged = damaged_in(&entries, &stored);
        if damaged.is_empty() {
            return Ok(0);
        }
        self.begin_mutation(&state, &handle, &mut inner)?;
        for i in &damaged {
            let b = &data[i * BLOCK as usize..(i + 1) * BLOCK as usize];
            self.fault(IoOp::WriteData)
                .and_then(|_| handle.file.write_all_at(b, data_at + *i as u64 * BLOCK))
                .map_err(|e| StoreError::io(format!("repairing {}", handle.path.display()), e, Some(key)))?;
            let mut entry = [0u8; TABLE_ENTRY_LEN];
            TableEntry::data(crcs[*i]).encode_into(&mut entry);
            self.write_table(&handle, first_block + *i as u32, &entry, key)?;
        }
        Ok(damaged.len() as u32)
    }

    /// Reads `len` bytes at `offset` (block aligned). Never-written blocks read as zeros. Every data
    /// block is verified against its stored checksum; a mismatch is [`StoreError::Corrupt`].
    pub fn read(
        &self,
        volume: VolumeId,
        chunk: ChunkIndex,
        chunk_size: ChunkSize,
        offset: u32,
        len: u32,
    ) -> Result<ReadReply, StoreError> {
        let first_block = check_range(chunk_size, offset, u64::from(len))?;
        let blocks = (len / BLOCK_SIZE_BYTES) as usize;
        let mut crcs = vec![zero_block_crc32c(); blocks];
        let Some((entries, mut data, version)) = self.read_stored(volume, chunk, chunk_size, offset, len)?
        else {
            let data = vec![0u8; len as usize];
            return Ok(ReadReply { data, crcs, present: vec![false; blocks], version: Version::NONE });
        };
        for (i, entry) in entries.iter().enumerate() {
            let block = &mut data[i * BLOCK as usize..(i + 1) * BLOCK as usize];
            let corrupt = |reason: &str| StoreError::Corrupt {
                volume,
                chunk,
                block: first_block + i as u32,
                reason: reason.into(),
            };
            match entry.state {
                BLOCK_UNWRITTEN => block.fill(0),
                BLOCK_DATA => {
                    if crc32c(block) != entry.crc {
                        return Err(corrupt("stored checksum does not match stored data"));
                    }
                    crcs[i] = entry.crc;
                }
                _ => return Err(corrupt("block table entry is damaged")),
            }
        }
        let present = entries.iter().map(|e| e.state == BLOCK_DATA).collect();
        Ok(ReadReply { data, crcs, present, version })
    }

    /// The blocks of `[offset, offset + len)` (block aligned) whose stored data fails its stored
    /// checksum or whose table entry is damaged (a scrub's check: every block read and verified,
    /// not stopping at the first bad one). A chunk this node does not hold has none.
    pub fn damaged_blocks(
        &self,
        volume: VolumeId,
        chunk: ChunkIndex,
        chunk_size: ChunkSize,
        offset: u32,
        len: u32,
    ) -> Result<Vec<u32>, StoreError> {
        let first_block = check_range(chunk_size, offset, u64::from(len))?;
        let Some((entries, data, _)) = self.read_stored(volume, chunk, chunk_size, offset, len)? else {
            return Ok(Vec::new());
        };
        Ok(damaged_in(&entries, &data).into_iter().map(|i| first_block + i as u32).collect())
    }

    /// A range as stored, unverified: its table entries, its data (read only if a block holds
    /// any) and the chunk's version, under the chunk's lock; `None` if the chunk is not here.
    fn read_stored(
        &self,
        volume: VolumeId,
        chunk: ChunkIndex,
        chunk_size: ChunkSize,
        offset: u32,
        len: u32,
    ) -> Result<Option<StoredRange>, StoreError> {
        let first_block = check_range(chunk_size, offset, u64::from(len))?;
        let blocks = (len / BLOCK_SIZE_BYTES) as usize;
        let mut data = vec![0u8; len as usize];
        let Some(state) = self.existing_volume(volume)? else { return Ok(None) };
        let Some(handle) = self.chunk(volume, &state, chunk, chunk_size, false)? else {
            return Ok(None);
        };
        let key = (volume, chunk);
        let inner = lock(&handle.inner);
        let version = header_version(&inner.header);
        if version.is_installing() {
            return Err(StoreError::Installing { volume, chunk });
        }
        let mut table = vec![0u8; blocks * TABLE_ENTRY_LEN];
        let table_at = format::table_offset() + u64::from(first_block) * TABLE_ENTRY_LEN as u64;
        let read_ctx = || format!("reading {}", handle.path.display());
        self.fault(IoOp::Read)
            .and_then(|_| handle.file.read_exact_at(&mut table, table_at))
            .map_err(|e| StoreError::io(read_ctx(), e, Some(key)))?;
        let entries: Vec<TableEntry> = table.chunks_exact(TABLE_ENTRY_LEN).map(TableEntry::decode).collect();
        if entries.iter().any(|e| e.state == BLOCK_DATA) {
            let at = format::data_offset(chunk_size) + u64::from(offset);
            self.fault(IoOp::Read)
                .and_then(|_| handle.file.read_exact_at(&mut data, at))
                .map_err(|e| StoreError::io(read_ctx(), e, Some(key)))?;
        }
        Ok(Some((entries, data, version)))
    }

    /// Makes every mutation of `volume` acknowledged before this call durable: fdatasyncs every chunk
    /// mutated since its last sync (several in parallel), then clears the dirty flag of chunks that have
    /// been idle for [`DIRTY_LINGER_FLUSHES`] flushes.
    pub fn flush(&self, volume: VolumeId) -> Result<(), StoreError> {
        // Nothing of a volume this node does not hold can need syncing.
        let Some(state) = self.existing_volume(volume)? else { return Ok(()) };
        let to_sync: Vec<(ChunkIndex, u64)> = {
            let inner = lock(&state.inner);
            if inner.poisoned {
                return Err(StoreError::Poisoned { volume });
            }
            inner.unsynced.iter().map(|(c, m)| (*c, *m)).collect()
        };
        let next = std::sync::atomic::AtomicUsize::new(0);
        let sync_some = || -> Result<(), StoreError> {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((chunk, mutation)) = to_sync.get(i).copied() else {
                    return Ok(());
                };
                self.sync_chunk(volume, &state, chunk, mutation)?;
            }
        };
        let threads = to_sync.len().min(FLUSH_PARALLEL_MAX);
        let results: Vec<Result<(), StoreError>> = if threads <= 1 {
            vec![sync_some()]
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = (0..threads).map(|_| scope.spawn(sync_some)).collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(StoreError::InvalidRequest("flush thread panicked".into()))
                        })
                    })
                    .collect()
            })
        };
        for r in results {
            r?;
        }
        // New chunk files: make their names durable.
        let new_files = std::mem::take(&mut lock(&state.inner).dir_unsynced);
        if new_files
            && let Err(e) = self
                .fault(IoOp::Sync)
                .map_err(|e| StoreError::io("syncing", e, None))
                .and_then(|_| fsync_dir(&state.dir))
        {
            let mut v = lock(&state.inner);
            v.dir_unsynced = true;
            v.poisoned = true;
            return Err(e);
        }
        self.clear_idle_dirty_flags(volume, &state)
    }

    fn sync_chunk(
        &self,
        volume: VolumeId,
        state: &VolumeState,
        chunk: ChunkIndex,
        mutation: u64,
    ) -> Result<(), StoreError> {
        let Some(handle) = self.open_existing(volume, state, chunk)? else {
            lock(&state.inner).unsynced.remove(&chunk);
            return Ok(());
        };
        if let Err(e) =
            self.fault(IoOp::Sync).and_then(|_| rustix::fs::fdatasync(&handle.file).map_err(Into::into))
        {
            lock(&state.inner).poisoned = true;
            return Err(StoreError::io(
                format!("syncing {}", handle.path.display()),
                e,
                Some((volume, chunk)),
            ));
        }
        let mut v = lock(&state.inner);
        // A mutation that raced with the sync may not be covered: leave it for the next flush.
        if v.unsynced.get(&chunk) == Some(&mutation) {
            v.unsynced.remove(&chunk);
        }
        Ok(())
    }

    fn clear_idle_dirty_flags(&self, volume: VolumeId, state: &VolumeState) -> Result<(), StoreError> {
        let idle: Vec<ChunkIndex> = {
            let mut v = lock(&state.inner);
            let VolumeInner { dirty, unsynced, .. } = &mut *v;
            dirty
                .iter_mut()
                .filter(|(c, _)| !unsynced.contains_key(c))
                .filter_map(|(c, n)| {
                    *n += 1;
                    (*n >= DIRTY_LINGER_FLUSHES).then_some(*c)
                })
                .collect()
        };
        for chunk in idle {
            let Some(handle) = self.open_existing(volume, state, chunk)? else {
                lock(&state.inner).dirty.remove(&chunk);
                continue;
            };
            let mut inner = lock(&handle.inner);
            let mut v = lock(&state.inner);
            if v.unsynced.contains_key(&chunk)
                || v.dirty.get(&chunk).is_some_and(|n| *n < DIRTY_LINGER_FLUSHES)
            {
                continue; // mutated meanwhile
            }
            // The chunk's data is durable; this write need not be synced: if it is lost the chunk
            // merely looks dirty after a crash, which costs a needless reconciliation.
            let mut header = inner.header;
            header.dirty = false;
            self.fault(IoOp::WriteHeader)
                .and_then(|_| handle.file.write_all_at(&header.encode(), 0))
                .map_err(|e| {
                    let ctx = format!("clearing dirty flag of {}", handle.path.display());
                    StoreError::io(ctx, e, Some((volume, chunk)))
                })?;
            inner.header = header;
            inner.dirty_durable = false;
            v.dirty.remove(&chunk);
        }
        Ok(())
    }

    /// Chunks mutated since their last fdatasync, over every volume held (what the next flush of
    /// each volume syncs; `/v1/status` reports it as `unsynced_chunks`).
    pub fn unsynced_count(&self) -> u64 {
        let volumes: Vec<Arc<VolumeState>> = lock(&self.volumes).values().cloned().collect();
        volumes.iter().map(|v| lock(&v.inner).unsynced.len() as u64).sum()
    }

    /// Flushes every volume that has dirty chunks.
    pub fn flush_all(&self) -> Result<(), StoreError> {
        let volumes: Vec<VolumeId> = lock(&self.volumes).keys().copied().collect();
        for v in volumes {
            self.flush(v)?;
        }
        Ok(())
    }

    fn open_existing(
        &self,
        volume: VolumeId,
        state: &VolumeState,
        chunk: ChunkIndex,
    ) -> Result<Option<Arc<ChunkHandle>>, StoreError> {
        let size = {
            let cache = lock(&self.open_files);
            cache.peek(&(volume, chunk)).map(|h| lock(&h.inner).header.chunk_size)
        };
        let size = match size {
            Some(s) => s,
            None if lock(&self.quarantined).contains_key(&(volume, chunk)) => ChunkSize::DEFAULT, // refused below
            None => {
                let path = self.chunk_path(volume, chunk);
                let file = match File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(StoreError::io(format!("opening {}", path.display()), e, None)),
                };
                match read_header_from(&file, &path, volume, chunk) {
                    Ok(h) => h.chunk_size,
                    Err(StoreError::BadChunkFile { reason, .. }) => {
                        self.quarantine(volume, chunk, &path, &reason, Some(state))?;
                        return Err(StoreError::BadChunkFile { path, reason });
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        self.chunk(volume, state, chunk, size, false)
    }

    /// The persisted state of a chunk, or `None` if this node holds no such chunk.
    pub fn chunk_state(&self, volume: VolumeId, chunk: ChunkIndex) -> Result<Option<ChunkState>, StoreError> {
        let Some(state) = self.existing_volume(volume)? else { return Ok(None) };
        Ok(self.open_existing(volume, &state, chunk)?.map(|h| {
            let inner = lock(&h.inner);
            ChunkState {
                generation: inner.header.generation,
                version: inner.header.version,
                last_sequence: inner.header.last_sequence,
                dirty: inner.header.dirty,
                chunk_size: inner.header.chunk_size,
            }
        }))
    }

    /// The version of this node's copy of a chunk (`Version::NONE` if it holds none).
    pub fn chunk_version(&self, volume: VolumeId, chunk: ChunkIndex) -> Result<Version, StoreError> {
        Ok(self.chunk_state(volume, chunk)?.map_or(Version::NONE, |st| st.version()))
    }

    /// The highest generation this node has persisted for `volume` (0 if none).
    pub fn highest_generation(&self, volume: VolumeId) -> Result<Generation, StoreError> {
        let Some(state) = self.existing_volume(volume)? else { return Ok(Generation(0)) };
        Ok(*state.fence.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Chunks of `volume` whose header says dirty: a superset of the chunks mutated since the last
    /// flush (see [`DIRTY_LINGER_FLUSHES`]), and so of the chunks replicas may disagree on after a crash.
    pub fn dirty_chunks(&self, volume: VolumeId) -> Result<Vec<ChunkIndex>, StoreError> {
        let Some(state) = self.existing_volume(volume)? else { return Ok(Vec::new()) };
        Ok(lock(&state.inner).dirty.keys().copied().collect())
    }

    /// Chunks of `volume` mutated since they were last synced: what the next flush will sync.
    pub fn unsynced_chunks(&self, volume: VolumeId) -> Result<Vec<ChunkIndex>, StoreError> {
        let Some(state) = self.existing_volume(volume)? else { return Ok(Vec::new()) };
        Ok(lock(&state.inner).unsynced.keys().copied().collect())
    }

    /// Volumes this node holds chunks or metadata of.
    pub fn list_volumes(&self) -> Result<Vec<VolumeId>, StoreError> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.volumes_dir)
            .map_err(io_err(format!("listing {}", self.volumes_dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(io_err(format!("listing {}", self.volumes_dir.display())))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| u64::from_str_radix(n, 16).ok()) else {
                continue;
            };
            if let Ok(v) = VolumeId::new(id) {
                out.push(v);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Chunks of `volume` stored on this node, in index order.
    pub fn list_chunks(&self, volume: VolumeId) -> Result<Vec<ChunkIndex>, StoreError> {
        // Loading the volume first drops chunk files whose creation never became durable.
        if self.existing_volume(volume)?.is_none() {
            return Ok(Vec::new());
        }
        list_chunk_files(&self.volume_dir(volume))
    }

    /// Chunks of every volume that fall in placement group `pg` of a pool of `pg_count` groups.
    pub fn list_chunks_in_pg(
        &self,
        pg: PgId,
        pg_count: u32,
    ) -> Result<Vec<(VolumeId, ChunkIndex)>, StoreError> {
        let mut out = Vec::new();
        for volume in self.list_volumes()? {
            for chunk in self.list_chunks(volume)? {
                if cairn_types::placement::pg_of(volume, chunk, pg_count) == pg {
                    out.push((volume, chunk));
                }
            }
        }
        Ok(out)
    }

    /// Removes up to `max_files` chunk files of `volume` and, once none are left, its directory
    /// and metadata (durably). Returns the files removed and whether the volume is gone. For a
    /// deleted volume's data, removed in steps so that deleting a large volume does not monopolise
    /// the disk; a volume whose files are damaged is removed all the same.
    pub fn delete_volume_step(
        &self,
        volume: VolumeId,
        max_files: usize,
    ) -> Result<(usize, bool), StoreError> {
        let dir = self.volume_dir(volume);
        let state = match self.volume(volume) {
            Ok(s) => s,
            // Unreadable metadata: nothing can be served from it anyway.
            Err(_) if dir.exists() => {
                fs::remove_dir_all(&dir).map_err(io_err(format!("deleting {}", dir.display())))?;
                fsync_dir(&self.volumes_dir)?;
                self.forget_volume(volume)?;
                return Ok((0, true));
            }
            Err(e) => return Err(e),
        };
        let chunks = {
            // Exclusive fence: no mutation of the volume is running while its files go away.
            let _fence = state.fence.write().unwrap_or_else(|p| p.into_inner());
            let chunks = if dir.exists() { list_chunk_files(&dir)? } else { Vec::new() };
            for chunk in chunks.iter().take(max_files) {
                lock(&self.open_files).pop(&(volume, *chunk));
                {
                    // Nothing left to flush of it.
                    let mut inner = lock(&state.inner);
                    inner.dirty.remove(chunk);
                    inner.unsynced.remove(chunk);
                }
                let path = self.chunk_path(volume, *chunk);
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(StoreError::io(format!("deleting {}", path.display()), e, None)),
                }
            }
            chunks.len()
        };
        if chunks > max_files {
            return Ok((max_files, false));
        }
        self.delete_volume(volume)?;
        Ok((chunks, true))
    }

    /// Deletes every chunk and the metadata of `volume` on this node. Durable when it returns.
    pub fn delete_volume(&self, volume: VolumeId) -> Result<(), StoreError> {
        let state = self.volume(volume)?;
        // Exclusive fence: no mutation of the volume is running while its files go away.
        let _fence = state.fence.write().unwrap_or_else(|p| p.into_inner());
        {
            let mut cache = lock(&self.open_files);
            let keys: Vec<ChunkKey> = cache.iter().map(|(k, _)| *k).filter(|(v, _)| *v == volume).collect();
            for k in keys {
                cache.pop(&k);
            }
        }
        match fs::remove_dir_all(&state.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StoreError::io(format!("deleting {}", state.dir.display()), e, None));
            }
        }
        fsync_dir(&self.volumes_dir)?;
        self.forget_volume(volume)
    }

    /// Drops what is kept of a volume whose directory is gone: its state and its damaged chunks
    /// (nothing to restore, nothing to keep for inspection).
    fn forget_volume(&self, volume: VolumeId) -> Result<(), StoreError> {
        lock(&self.volumes).remove(&volume);
        lock(&self.quarantined).retain(|(v, _), _| *v != volume);
        lock(&self.damaged_found).retain(|(v, _)| *v != volume);
        let damaged = self.root.join("damaged");
        let prefix = format!("{:016x}-", volume.get());
        if let Ok(entries) = fs::read_dir(&damaged) {
            for entry in entries.flatten() {
                if entry.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)) {
                    let path = entry.path();
                    fs::remove_file(&path).map_err(io_err(format!("deleting {}", path.display())))?;
                }
            }
        }
        Ok(())
    }

    /// Volumes whose state is kept in memory (tests: it stays bounded by the volumes held here).
    pub fn volumes_loaded(&self) -> usize {
        lock(&self.volumes).len()
    }
}

fn check_chunk_size(handle: &ChunkHandle, chunk_size: ChunkSize) -> Result<(), StoreError> {
    let stored = lock(&handle.inner).header.chunk_size;
    if stored != chunk_size {
        return Err(StoreError::InvalidRequest(format!(
            "chunk size {chunk_size} does not match the stored chunk's {stored}"
        )));
    }
    Ok(())
}

/// Checks that `[offset, offset + len)` is non-empty, block aligned and inside the chunk; returns the
/// first block's index.
fn check_range(chunk_size: ChunkSize, offset: u32, len: u64) -> Result<u32, StoreError> {
    if len == 0 {
        return Err(StoreError::InvalidRequest("zero-length request".into()));
    }
    if !u64::from(offset).is_multiple_of(BLOCK) || !len.is_multiple_of(BLOCK) {
        return Err(StoreError::InvalidRequest(format!(
            "offset {offset} and length {len} must be multiples of {BLOCK_SIZE_BYTES}"
        )));
    }
    if u64::from(offset) + len > u64::from(chunk_size.bytes()) {
        return Err(StoreError::InvalidRequest(format!(
            "range {offset}+{len} is beyond the end of a {chunk_size} chunk"
        )));
    }
    Ok(offset / BLOCK_SIZE_BYTES)
}

/// A chunk file's header, checked, and its size: a file shorter than its chunk size needs lost its
/// tail (truncated) and is damaged.
fn checked_header(
    file: &File,
    path: &Path,
    volume: VolumeId,
    chunk: ChunkIndex,
) -> Result<ChunkHeader, StoreError> {
    let header = read_header_from(file, path, volume, chunk)?;
    let len = file
        .metadata()
        .map_err(|e| StoreError::io(format!("reading size of {}", path.display()), e, None))?
        .len();
    let needed = format::chunk_file_len(header.chunk_size);
    if len < needed {
        return Err(StoreError::BadChunkFile {
            path: path.to_path_buf(),
            reason: format!("truncated: {len} bytes, a {} chunk needs {needed}", header.chunk_size),
        });
    }
    Ok(header)
}

fn read_header_from(
    file: &File,
    path: &Path,
    volume: VolumeId,
    chunk: ChunkIndex,
) -> Result<ChunkHeader, StoreError> {
    let mut b = [0u8; HEADER_LEN];
    file.read_exact_at(&mut b, 0)
        .map_err(|e| StoreError::io(format!("reading header of {}", path.display()), e, None))?;
    let header = ChunkHeader::decode(&b)
        .map_err(|e| StoreError::BadChunkFile { path: path.to_path_buf(), reason: e.to_string() })?;
    if header.volume != volume || header.chunk != chunk {
        return Err(StoreError::BadChunkFile {
            path: path.to_path_buf(),
            reason: format!("holds volume {} chunk {}", header.volume, header.chunk),
        });
    }
    Ok(header)
}

/// Whether a chunk file's header never reached the disk: shorter than a header, or all zeros.
fn unfinished_creation(path: &Path) -> bool {
    let Ok(file) = File::open(path) else { return false };
    let mut b = [0u8; HEADER_LEN];
    match file.read_exact_at(&mut b, 0) {
        Ok(()) => b.iter().all(|x| *x == 0),
        Err(e) => e.kind() == ErrorKind::UnexpectedEof,
    }
}

/// Removes chunk files a crash left half-created (never renamed into place: they hold nothing).
fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_str().is_some_and(|n| n.ends_with(".chunk.tmp")) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Chunks of a volume directory marked damaged (`<chunk>.damaged`, written durably before the
/// damaged file is moved aside): they stay quarantined across restarts until a copy is installed.
fn damaged_markers(dir: &Path) -> Vec<ChunkIndex> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<ChunkIndex> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let stem = name.to_str()?.strip_suffix(".damaged")?.to_string();
            u64::from_str_radix(&stem, 16).ok().map(ChunkIndex)
        })
        .collect();
    out.sort();
    out
}

fn damaged_marker(dir: &Path, chunk: ChunkIndex) -> PathBuf {
    dir.join(format!("{:016x}.damaged", chunk.0))
}

fn list_chunk_files(dir: &Path) -> Result<Vec<ChunkIndex>, StoreError> {
    let mut out = Vec::new();
    let entries = fs::read_dir(dir).map_err(io_err(format!("listing {}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(io_err(format!("listing {}", dir.display())))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".chunk")) else {
            continue;
        };
        if let Ok(i) = u64::from_str_radix(stem, 16) {
            out.push(ChunkIndex(i));
        }
    }
    out.sort();
    Ok(out)
}

/// Replaces `dir/name` with `bytes` atomically and durably: temp file, fdatasync, rename, fsync dir.
fn write_file_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let ctx = format!("writing {}", path.display());
    let result = (|| {
        let f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all_at(bytes, 0)?;
        rustix::fs::fdatasync(&f)?;
        fs::rename(&tmp, &path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(StoreError::io(ctx, e, None));
    }
    fsync_dir(dir)
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    let ctx = || format!("syncing directory {}", dir.display());
    let d = File::open(dir).map_err(|e| StoreError::io(ctx(), e, None))?;
    rustix::fs::fsync(&d).map_err(|e| StoreError::io(ctx(), e.into(), None))
}

const _: () = assert!(VOLUME_META_LEN <= BLOCK_SIZE_BYTES as usize);

/// Verifies data received from a peer before anything is stored: one checksum per 4 KiB block,
/// each matching. Returns the number of blocks.
fn check_received(
    volume: VolumeId,
    chunk: ChunkIndex,
    first_block: u32,
    data: &[u8],
    crcs: &[u32],
) -> Result<usize, StoreError> {
    let blocks = data.len() / BLOCK as usize;
    if crcs.len() != blocks {
        return Err(StoreError::InvalidRequest(format!("{} checksums for {blocks} blocks", crcs.len())));
    }
    for (i, (block, crc)) in data.chunks_exact(BLOCK as usize).zip(crcs).enumerate() {
        if crc32c(block) != *crc {
            return Err(StoreError::Corrupt {
                volume,
                chunk,
                block: first_block + i as u32,
                reason: "checksum of received data does not match the sender's".into(),
            });
        }
    }
    Ok(blocks)
}
