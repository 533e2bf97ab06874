//! The persistent disk cache: one sparse, memory-mapped file per (remote, path, version) with
//! its chunk bitmap and checksums beside it ([`file::CacheFile`]), a size limit enforced by
//! evicting whole idle versions in LRU order (and, only when open versions alone exceed the
//! limit, their least recently used chunks), and a lock so one daemon owns a cache directory.
//!
//! Layout under the cache directory (mode 0700):
//! ```text
//! lock                      held (flock) by the daemon using this directory; says who
//! stats.json                cumulative hit/miss counters
//! remotes/<rid>/remote.json the remote's id (URL)
//! remotes/<rid>/<aa>/<h>.data, <h>.meta   one cached version
//! pending/                  writes not yet uploaded (write-back); never evicted
//! ```
//! This module knows nothing of HTTP or FUSE: callers hand it keys and bytes.

mod bitmap;
pub mod file;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

pub use file::{CacheFile, ChunkError, ChunkHash, ChunkSum, ChunkWriter, VersionKey, WholePin};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache directory {dir} is in use by another artifactfs mount ({holder}); pick another with --cache-dir")]
    Locked { dir: PathBuf, holder: String },
    #[error("cache {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the cache disk is full")]
    Full,
}

impl CacheError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        CacheError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub dir: PathBuf,
    /// Bytes of cached data kept at most.
    pub max_size: u64,
    /// Granularity of the chunk bitmap.
    pub chunk_size: u64,
    /// Part of the cache's filesystem kept free (0.0 to 1.0): when other files fill the disk,
    /// the cache shrinks below `max_size` to leave this much.
    pub min_free: f64,
    /// Versions nobody read for this long are deleted (none: kept until the size limit).
    pub expire_after: Option<std::time::Duration>,
}

/// Cumulative counters, persisted in `stats.json`.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    /// Bytes read that were already in the cache.
    pub hit_bytes: u64,
    /// Bytes read that had to be fetched first.
    pub miss_bytes: u64,
    /// Bytes fetched from remotes (including readahead).
    pub fetched_bytes: u64,
    /// Versions evicted whole, and chunks punched out of open versions.
    pub evicted_versions: u64,
    pub punched_chunks: u64,
}

#[derive(Debug, Default)]
pub struct LiveCounters {
    pub hit_bytes: AtomicU64,
    pub miss_bytes: AtomicU64,
    pub fetched_bytes: AtomicU64,
    pub evicted_versions: AtomicU64,
    pub punched_chunks: AtomicU64,
}

impl LiveCounters {
    pub fn snapshot(&self) -> Counters {
        Counters {
            hit_bytes: self.hit_bytes.load(Ordering::Relaxed),
            miss_bytes: self.miss_bytes.load(Ordering::Relaxed),
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
            evicted_versions: self.evicted_versions.load(Ordering::Relaxed),
            punched_chunks: self.punched_chunks.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug)]
struct IdleEntry {
    meta_path: PathBuf,
    bytes: u64,
    last_access: u64,
    /// Chunks this process already checked (none for entries found on disk at start).
    verified: Option<Vec<u64>>,
}

/// A version in the `open` map.
#[derive(Debug)]
enum Slot {
    Open(Weak<CacheFile>),
    /// Its files are being opened or closed (metadata written) by one thread.
    Busy,
}

impl Slot {
    fn upgrade(&self) -> Option<Arc<CacheFile>> {
        match self {
            Slot::Open(w) => w.upgrade(),
            Slot::Busy => None,
        }
    }
}

/// A wait for another thread opening or closing a version is logged every this often.
const BUSY_WARN: std::time::Duration = std::time::Duration::from_secs(5);

/// Ends a `Busy` slot however its thread's work ends (a panic included): the slot becomes
/// what `done` says, or goes, and the waiters are woken.
struct BusyGuard<'a> {
    shared: &'a Shared,
    data: &'a Path,
    done: Option<Slot>,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        {
            let mut open = self.shared.open.lock();
            match self.done.take() {
                Some(slot) => open.insert(self.data.to_path_buf(), slot),
                None => open.remove(self.data),
            };
        }
        self.shared.open_changed.notify_all();
    }
}

/// State shared by the cache and its open files.
#[derive(Debug)]
pub(crate) struct Shared {
    root: PathBuf,
    chunk_size: u64,
    max_size: u64,
    /// The limit in force: `max_size`, or less when the disk is short of free space.
    limit: AtomicU64,
    min_free: f64,
    expire_after: Option<std::time::Duration>,
    used: AtomicU64,
    clock: AtomicU32,
    idle: Mutex<HashMap<PathBuf, IdleEntry>>,
    /// Versions open, or being opened or closed, by data path. The lock is held only to look
    /// at and change this map, never across the files' I/O: a version being opened or closed
    /// is `Busy`, and whoever wants it waits on `open_changed` (other versions go on).
    open: Mutex<HashMap<PathBuf, Slot>>,
    open_changed: Condvar,
    /// Whether the cache's filesystem takes `fallocate` (found at the first file opened).
    can_fallocate: std::sync::OnceLock<bool>,
    pressure: tokio::sync::Notify,
    pub(crate) counters: LiveCounters,
}

impl Shared {
    fn add_used(&self, n: u64) {
        let now = self.used.fetch_add(n, Ordering::AcqRel) + n;
        if now > self.limit.load(Ordering::Relaxed) {
            self.pressure.notify_one();
        }
    }

    fn sub_used(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| Some(u.saturating_sub(n)));
    }

    fn tick(&self) -> u32 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    fn present_bytes(f: &CacheFile) -> u64 {
        (0..f.chunks())
            .filter(|&i| f.is_present(i))
            .map(|i| {
                let r = f.chunk_range(i);
                r.end - r.start
            })
            .sum()
    }

    /// Called when the last user of an open version lets go of it. The version is `Busy`
    /// while its metadata is written, so a new open of it waits for that (it would otherwise
    /// find the chunks this instance holds missing, and fetch them again).
    fn closed(&self, f: &CacheFile) {
        {
            let mut open = self.open.lock();
            match open.get(&f.data_path) {
                // Opened again while this instance was being dropped: the new one owns it now.
                Some(Slot::Open(w)) if w.strong_count() > 0 => return,
                // Not reached: an opener waits for a slot whose holder lets go (`settled`)
                // rather than marking it `Busy`.
                Some(Slot::Busy) => return,
                Some(Slot::Open(_)) | None => {
                    open.insert(f.data_path.clone(), Slot::Busy);
                }
            }
        }
        let _busy = BusyGuard {
            shared: self,
            data: &f.data_path,
            done: None,
        };
        self.close_files(f);
    }

    /// The I/O of [`Shared::closed`], with the version marked `Busy`.
    fn close_files(&self, f: &CacheFile) {
        let bytes = Self::present_bytes(f);
        if f.retired.load(Ordering::Acquire) {
            remove_entry(&f.data_path, &f.meta_path);
            self.sub_used(bytes);
            return;
        }
        let rewritten = f.is_dirty();
        if let Err(e) = f.persist(true) {
            tracing::warn!("cannot save cache metadata: {e}");
        }
        // The metadata file's time is the version's last access for the next daemon (its LRU
        // order, `expire_after`, `cache clear --older-than`): a version read but not changed
        // was not rewritten above.
        if !rewritten
            && let Err(e) = File::options()
                .write(true)
                .open(&f.meta_path)
                .and_then(|m| m.set_modified(std::time::SystemTime::now()))
        {
            tracing::debug!("cannot record the last access of {}: {e}", f.meta_path.display());
        }
        self.idle.lock().insert(
            f.data_path.clone(),
            IdleEntry {
                meta_path: f.meta_path.clone(),
                bytes,
                last_access: CacheFile::now_secs(),
                verified: Some(f.verified_words()),
            },
        );
    }

    /// Waits (the `open` lock held on return) until no thread opens or closes the version
    /// at `data`. Not bounded: the thread at work always ends by changing the slot (also
    /// when it fails or panics: [`BusyGuard`]), and going ahead without it would read
    /// metadata not written yet, losing the chunks it records.
    ///
    /// Returns the version's open file, if any. Taken in the same look as the check: a file
    /// whose last holder lets go between a check and an `upgrade` is being closed, and is
    /// waited for like one marked `Busy`.
    #[allow(clippy::type_complexity)]
    fn settled<'a>(
        &'a self,
        data: &Path,
    ) -> (
        parking_lot::MutexGuard<'a, HashMap<PathBuf, Slot>>,
        Option<Arc<CacheFile>>,
    ) {
        let mut open = self.open.lock();
        let mut waited = std::time::Duration::ZERO;
        loop {
            match open.get(data) {
                None => return (open, None),
                // Its last holder is letting go right now (its `closed` comes next), or a
                // thread is opening or closing it.
                Some(slot) => {
                    if let Some(f) = slot.upgrade() {
                        return (open, Some(f));
                    }
                }
            }
            if self.open_changed.wait_for(&mut open, BUSY_WARN).timed_out() {
                waited += BUSY_WARN;
                tracing::warn!(
                    "waiting {waited:?} for another thread to open or close {}",
                    data.display()
                );
            }
        }
    }
}

fn remove_entry(data: &Path, meta: &Path) {
    for p in [meta, data] {
        if let Err(e) = fs::remove_file(p)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove {}: {e}", p.display());
        }
    }
}

fn hex16(data: &[u8]) -> String {
    blake3::hash(data).to_hex()[..32].to_string()
}

/// The cache directory of one daemon.
#[derive(Debug)]
pub struct Cache {
    shared: Arc<Shared>,
    _lock: File,
    /// Serialises read-modify-writes of `stats.json`; holds what this process saved there.
    saving: Mutex<Counters>,
}

impl Cache {
    /// Locks and opens the cache directory, cleaning up what an earlier run left half-done.
    /// `owner` describes this daemon in the lock file (shown to a second daemon).
    pub fn open(cfg: &CacheConfig, owner: &str) -> Result<Arc<Cache>, CacheError> {
        let root = cfg.dir.clone();
        let lock = lock_dir(&root, owner)?;
        let shared = Arc::new(Shared {
            root: root.clone(),
            chunk_size: cfg.chunk_size,
            max_size: cfg.max_size,
            limit: AtomicU64::new(cfg.max_size),
            min_free: cfg.min_free.clamp(0.0, 0.95),
            expire_after: cfg.expire_after,
            used: AtomicU64::new(0),
            clock: AtomicU32::new(1),
            idle: Mutex::new(HashMap::new()),
            open: Mutex::new(HashMap::new()),
            open_changed: Condvar::new(),
            can_fallocate: std::sync::OnceLock::new(),
            pressure: tokio::sync::Notify::new(),
            counters: LiveCounters::default(),
        });
        fs::create_dir_all(root.join("pending")).map_err(|e| CacheError::io(&root, e))?;
        let (entries, used) = scan(&root.join("remotes"));
        shared.used.store(used, Ordering::Release);
        *shared.idle.lock() = entries;
        let cache = Arc::new(Cache {
            shared,
            _lock: lock,
            saving: Mutex::new(Counters::default()),
        });
        if used > cfg.max_size {
            cache.evict();
        }
        Ok(cache)
    }

    pub fn root(&self) -> &Path {
        &self.shared.root
    }

    /// Where files being written keep their local bytes; never evicted.
    pub fn write_area(&self) -> PathBuf {
        self.shared.root.join("pending")
    }

    pub fn chunk_size(&self) -> u64 {
        self.shared.chunk_size
    }

    pub fn max_size(&self) -> u64 {
        self.shared.max_size
    }

    /// Bytes of cached data on disk now.
    pub fn used(&self) -> u64 {
        self.shared.used.load(Ordering::Acquire)
    }

    /// The counters of this process since it opened the cache.
    pub fn session_counters(&self) -> Counters {
        let saved = self.saving.lock();
        let now = self.shared.counters.snapshot();
        Counters {
            hit_bytes: saved.hit_bytes + now.hit_bytes,
            miss_bytes: saved.miss_bytes + now.miss_bytes,
            fetched_bytes: saved.fetched_bytes + now.fetched_bytes,
            evicted_versions: saved.evicted_versions + now.evicted_versions,
            punched_chunks: saved.punched_chunks + now.punched_chunks,
        }
    }

    pub fn counters(&self) -> &LiveCounters {
        &self.shared.counters
    }

    fn paths(&self, key: &VersionKey) -> (PathBuf, PathBuf, PathBuf) {
        let rid = hex16(key.remote.as_bytes());
        let mut name_src = key.path.as_bytes().to_vec();
        name_src.push(0);
        name_src.extend_from_slice(key.etag.as_bytes());
        let h = hex16(&name_src);
        let remote_dir = self.shared.root.join("remotes").join(rid);
        let dir = remote_dir.join(&h[..2]);
        (remote_dir, dir.join(format!("{h}.data")), dir.join(format!("{h}.meta")))
    }

    /// The version of `path` this cache last held bytes of (recorded when its cache file was
    /// made), so a later mount can ask the remote "still this one?" instead of fetching to
    /// find out.
    pub fn last_version(&self, remote: &str, path: &str) -> Option<(String, u64)> {
        let text = fs::read_to_string(self.last_version_path(remote, path)).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        // The file name is a hash of the path: make sure it is this path.
        (v["path"].as_str()? == path).then_some(())?;
        Some((v["etag"].as_str()?.to_string(), v["size"].as_u64()?))
    }

    fn last_version_path(&self, remote: &str, path: &str) -> PathBuf {
        let rid = hex16(remote.as_bytes());
        let h = hex16(path.as_bytes());
        self.shared
            .root
            .join("remotes")
            .join(rid)
            .join("last")
            .join(&h[..2])
            .join(format!("{h}.json"))
    }

    fn remember_version(&self, key: &VersionKey) {
        let p = self.last_version_path(&key.remote, &key.path);
        let body = serde_json::json!({ "path": key.path, "etag": key.etag, "size": key.size }).to_string();
        let tmp = p.with_extension("tmp");
        let written = p
            .parent()
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|_| fs::write(&tmp, body))
            .and_then(|_| fs::rename(&tmp, &p));
        if let Err(e) = written {
            tracing::debug!(path = %key.path, "cannot record the last version: {e}");
        }
    }

    /// Whether a version has a cache file (open, or on disk from before).
    pub fn has_version(&self, key: &VersionKey) -> bool {
        let (_, data, _) = self.paths(key);
        let open = match self.shared.open.lock().get(&data) {
            Some(Slot::Open(w)) => w.strong_count() > 0,
            Some(Slot::Busy) => true,
            None => false,
        };
        open || data.exists()
    }

    /// [`Cache::open_version_as`] for tests, with the last version recorded.
    #[cfg(test)]
    pub fn open_version(&self, key: VersionKey) -> Result<Arc<CacheFile>, CacheError> {
        self.open_version_as(key, true)
    }

    /// The cache file of a version, shared by everyone who has it open. `record_last`: record
    /// a new cache file as its path's last version ([`Cache::last_version`]). Only remotes
    /// whose listings lack versions need that record (a later mount asks them "still this
    /// one?"); it is a file of its own, and for a remote with small files, a third of the
    /// files a cold read creates. The caller, who knows the remote, decides.
    pub fn open_version_as(&self, key: VersionKey, record_last: bool) -> Result<Arc<CacheFile>, CacheError> {
        let (remote_dir, data, meta) = self.paths(&key);
        {
            let (mut open, found) = self.shared.settled(&data);
            if let Some(f) = found {
                // Wanted again: a version that came back is current again.
                f.retired.store(false, Ordering::Release);
                return Ok(f);
            }
            open.insert(data.clone(), Slot::Busy);
        }
        // Opened with the version `Busy`: other versions open and close meanwhile.
        let mut busy = BusyGuard {
            shared: &self.shared,
            data: &data,
            done: None,
        };
        let opened = self.open_files(&key, &remote_dir, &data, meta, record_last)?;
        busy.done = Some(Slot::Open(Arc::downgrade(&opened)));
        Ok(opened)
    }

    /// The I/O of [`Cache::open_version`].
    fn open_files(
        &self,
        key: &VersionKey,
        remote_dir: &Path,
        data: &Path,
        meta: PathBuf,
        record_last: bool,
    ) -> Result<Arc<CacheFile>, CacheError> {
        let remote_file = remote_dir.join("remote.json");
        if !remote_file.exists() {
            fs::create_dir_all(remote_dir).map_err(|e| CacheError::io(remote_dir, e))?;
            let body = serde_json::json!({ "remote": key.remote }).to_string();
            fs::write(&remote_file, body).map_err(|e| CacheError::io(&remote_file, e))?;
        }
        let idle = self.shared.idle.lock().remove(data);
        if record_last && idle.is_none() && !data.exists() {
            self.remember_version(key);
        }
        let before = idle.as_ref().map(|e| e.bytes).unwrap_or(0);
        let verified = idle.and_then(|e| e.verified);
        let f = Arc::new(CacheFile::open(
            self.shared.clone(),
            key.clone(),
            data.to_path_buf(),
            meta,
            verified,
        )?);
        let now = Shared::present_bytes(&f);
        if now >= before {
            self.shared.add_used(now - before);
        } else {
            self.shared.sub_used(before - now);
        }
        Ok(f)
    }

    /// Marks a version as superseded: its cache file is deleted now, or when its last reader
    /// closes it.
    pub fn retire(&self, key: &VersionKey) {
        let (_, data, meta) = self.paths(key);
        // Held throughout, so the version cannot be opened while its files go.
        let (open, found) = self.shared.settled(&data);
        if let Some(f) = found {
            f.retired.store(true, std::sync::atomic::Ordering::Release);
            // `f` may be the last reference; its drop takes the lock.
            drop(open);
            drop(f);
            return;
        }
        if let Some(e) = self.shared.idle.lock().remove(&data) {
            remove_entry(&data, &e.meta_path);
            self.shared.sub_used(e.bytes);
        } else if data.exists() {
            remove_entry(&data, &meta);
        }
    }

    /// Brings the cache under its limit: first whole idle versions, oldest first; then, if
    /// open versions alone are over the limit, their least recently used chunks. Returns the
    /// bytes freed.
    pub fn evict(&self) -> u64 {
        let s = &self.shared;
        let mut freed = self.expire();
        let max = self.update_limit();
        let target = max / 10 * 9;
        if s.used.load(Ordering::Acquire) <= max {
            return freed;
        }
        let mut idle: Vec<(PathBuf, PathBuf, u64, u64)> = s
            .idle
            .lock()
            .iter()
            .map(|(d, e)| (d.clone(), e.meta_path.clone(), e.bytes, e.last_access))
            .collect();
        idle.sort_by_key(|e| e.3);
        for (data, meta, bytes, _) in idle {
            if s.used.load(Ordering::Acquire) <= target {
                break;
            }
            // Held while the files go, so the version cannot be opened meanwhile.
            let open = s.open.lock();
            // Opened meanwhile, or being opened.
            if open.contains_key(&data) || s.idle.lock().remove(&data).is_none() {
                continue;
            }
            remove_entry(&data, &meta);
            s.sub_used(bytes);
            freed += bytes;
            s.counters.evicted_versions.fetch_add(1, Ordering::Relaxed);
        }
        if s.used.load(Ordering::Acquire) > max {
            let open: Vec<Arc<CacheFile>> = s.open.lock().values().filter_map(Slot::upgrade).collect();
            let mut chunks: Vec<(u32, usize, u64)> = Vec::new();
            // Files held whole (read by the kernel directly) keep all their chunks.
            for (fi, f) in open.iter().enumerate().filter(|(_, f)| !f.is_pinned()) {
                for i in (0..f.chunks()).filter(|&i| f.is_present(i)) {
                    chunks.push((f.tick_of(i), fi, i));
                }
            }
            chunks.sort_unstable();
            for (_, fi, i) in chunks {
                if s.used.load(Ordering::Acquire) <= target {
                    break;
                }
                let n = open[fi].punch(i);
                s.sub_used(n);
                freed += n;
                s.counters.punched_chunks.fetch_add(1, Ordering::Relaxed);
            }
        }
        if freed > 0 {
            tracing::debug!(freed, used = s.used.load(Ordering::Acquire), "cache eviction");
        }
        freed
    }

    /// The limit in force now: `max_size`, lowered so that the cache's filesystem keeps
    /// `min_free` of its size free (the cache's own bytes count as freeable).
    fn update_limit(&self) -> u64 {
        let s = &self.shared;
        let mut limit = s.max_size;
        if s.min_free > 0.0
            && let Some((total, avail)) = disk_space(&s.root)
        {
            let keep_free = (total as f64 * s.min_free) as u64;
            let used = s.used.load(Ordering::Acquire);
            limit = limit.min((used + avail).saturating_sub(keep_free));
        }
        let before = s.limit.swap(limit, Ordering::Relaxed);
        // Said when the disk's free space starts or stops holding the cache back.
        if (limit < s.max_size) != (before < s.max_size) || (limit < s.max_size && before == s.max_size) {
            if limit < s.max_size {
                tracing::warn!(
                    limit,
                    max_size = s.max_size,
                    "the cache's disk is short of free space (cache.min_free_percent): the cache keeps at most {limit} bytes"
                );
            } else {
                tracing::info!("the cache's disk has free space again: the cache may grow to max_size");
            }
        }
        limit
    }

    /// Deletes idle versions nobody read for `expire_after`. Returns the bytes freed.
    fn expire(&self) -> u64 {
        let s = &self.shared;
        let Some(ttl) = s.expire_after else { return 0 };
        let cutoff = CacheFile::now_secs().saturating_sub(ttl.as_secs());
        let old: Vec<(PathBuf, PathBuf, u64)> = s
            .idle
            .lock()
            .iter()
            .filter(|(_, e)| e.last_access < cutoff)
            .map(|(d, e)| (d.clone(), e.meta_path.clone(), e.bytes))
            .collect();
        let mut freed = 0;
        for (data, meta, bytes) in old {
            let open = s.open.lock();
            if open.contains_key(&data) || s.idle.lock().remove(&data).is_none() {
                continue;
            }
            remove_entry(&data, &meta);
            s.sub_used(bytes);
            freed += bytes;
            s.counters.evicted_versions.fetch_add(1, Ordering::Relaxed);
        }
        if freed > 0 {
            tracing::info!(
                freed,
                "expired cache versions not read for {}",
                humantime::format_duration(ttl)
            );
        }
        freed
    }

    /// Runs eviction whenever the cache goes over its limit, and every few seconds for the
    /// disk's free space and expiry, until the cache is dropped.
    pub async fn run_evictor(self: Arc<Self>) {
        let weak = Arc::downgrade(&self);
        let shared = self.shared.clone();
        drop(self);
        loop {
            tokio::select! {
                _ = shared.pressure.notified() => {}
                _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            }
            let Some(cache) = weak.upgrade() else { return };
            let _ = tokio::task::spawn_blocking(move || cache.evict()).await;
        }
    }

    /// Saves the metadata of every open version and the counters.
    pub fn persist(&self) {
        let open: Vec<Arc<CacheFile>> = self.shared.open.lock().values().filter_map(Slot::upgrade).collect();
        for f in open {
            if let Err(e) = f.persist(true) {
                tracing::warn!("{e}");
            }
        }
        self.save_counters();
    }

    /// Saves the counters every `every` (so `cache stats` sees a running mount's figures),
    /// until the cache is dropped.
    pub async fn run_counter_saver(self: Arc<Self>, every: Duration) {
        let weak = Arc::downgrade(&self);
        drop(self);
        loop {
            tokio::time::sleep(every).await;
            let Some(cache) = weak.upgrade() else { return };
            let _ = tokio::task::spawn_blocking(move || cache.save_counters()).await;
        }
    }

    /// Adds the counters since the last save to `stats.json`.
    fn save_counters(&self) {
        let mut saved = self.saving.lock();
        let path = self.shared.root.join("stats.json");
        let mut total = read_counters(&self.shared.root);
        let now = self.shared.counters.snapshot();
        saved.hit_bytes += now.hit_bytes;
        saved.miss_bytes += now.miss_bytes;
        saved.fetched_bytes += now.fetched_bytes;
        saved.evicted_versions += now.evicted_versions;
        saved.punched_chunks += now.punched_chunks;
        total.hit_bytes += now.hit_bytes;
        total.miss_bytes += now.miss_bytes;
        total.fetched_bytes += now.fetched_bytes;
        total.evicted_versions += now.evicted_versions;
        total.punched_chunks += now.punched_chunks;
        // Counted once: the live counters start again from zero.
        let c = &self.shared.counters;
        c.hit_bytes.fetch_sub(now.hit_bytes, Ordering::Relaxed);
        c.miss_bytes.fetch_sub(now.miss_bytes, Ordering::Relaxed);
        c.fetched_bytes.fetch_sub(now.fetched_bytes, Ordering::Relaxed);
        c.evicted_versions.fetch_sub(now.evicted_versions, Ordering::Relaxed);
        c.punched_chunks.fetch_sub(now.punched_chunks, Ordering::Relaxed);
        let tmp = path.with_extension("json.tmp");
        let r = serde_json::to_vec_pretty(&total)
            .map_err(io::Error::other)
            .and_then(|b| fs::write(&tmp, b))
            .and_then(|_| fs::rename(&tmp, &path));
        if let Err(e) = r {
            tracing::warn!("cannot save cache counters: {e}");
        }
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        self.persist();
    }
}

fn lock_dir(root: &Path, owner: &str) -> Result<File, CacheError> {
    fs::create_dir_all(root).map_err(|e| CacheError::io(root, e))?;
    fs::set_permissions(root, fs::Permissions::from_mode(0o700)).map_err(|e| CacheError::io(root, e))?;
    let path = root.join("lock");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| CacheError::io(&path, e))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            return Err(CacheError::Locked {
                dir: root.to_path_buf(),
                holder: holder.trim().replace('\n', ", "),
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(CacheError::io(&path, e)),
    }
    f.set_len(0).map_err(|e| CacheError::io(&path, e))?;
    f.write_all(format!("pid {}\n{owner}\n", std::process::id()).as_bytes())
        .map_err(|e| CacheError::io(&path, e))?;
    Ok(f)
}

/// Finds the cached versions on disk and deletes what an interrupted run left: temporary
/// files, data without metadata, metadata without data.
fn scan(remotes: &Path) -> (HashMap<PathBuf, IdleEntry>, u64) {
    let mut entries = HashMap::new();
    let mut used = 0;
    for dir in subdirs(remotes).into_iter().flat_map(|r| subdirs(&r)) {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            match p.extension().and_then(|x| x.to_str()) {
                Some("data") => {
                    let meta = p.with_extension("meta");
                    match (fs::metadata(&p), fs::metadata(&meta)) {
                        (Ok(dm), Ok(mm)) => {
                            let bytes = dm.blocks() * 512;
                            used += bytes;
                            let last_access = mm.mtime().max(0) as u64;
                            entries.insert(
                                p,
                                IdleEntry {
                                    meta_path: meta,
                                    bytes,
                                    last_access,
                                    verified: None,
                                },
                            );
                        }
                        _ => remove_entry(&p, &meta),
                    }
                }
                Some("meta") if !p.with_extension("data").exists() => remove_entry(&p, &p),
                Some("tmp") => remove_entry(&p, &p),
                _ => {}
            }
        }
    }
    (entries, used)
}

/// Size and space available to us of the filesystem holding `p`.
fn disk_space(p: &Path) -> Option<(u64, u64)> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a zeroed struct to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    Some((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
}

fn subdirs(p: &Path) -> Vec<PathBuf> {
    fs::read_dir(p)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default()
}

fn read_counters(root: &Path) -> Counters {
    fs::read(root.join("stats.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// What `artifactfs cache stats` shows.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CacheStats {
    pub dir: PathBuf,
    /// Who holds the directory now, if a daemon does.
    pub in_use_by: Option<String>,
    pub bytes: u64,
    pub versions: u64,
    pub complete_versions: u64,
    /// Seconds since the epoch of the least recently used version.
    pub oldest_access: Option<u64>,
    pub remotes: Vec<RemoteStats>,
    pub counters: Counters,
    pub pending_uploads: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RemoteStats {
    pub remote: String,
    pub versions: u64,
    pub bytes: u64,
}

/// Reads the statistics of a cache directory without locking it (it may be in use).
pub fn stats(dir: &Path) -> io::Result<CacheStats> {
    let mut out = CacheStats {
        dir: dir.to_path_buf(),
        in_use_by: holder(dir),
        bytes: 0,
        versions: 0,
        complete_versions: 0,
        oldest_access: None,
        remotes: Vec::new(),
        counters: read_counters(dir),
        pending_uploads: fs::read_dir(dir.join("pending")).map(|r| r.count() as u64).unwrap_or(0),
    };
    for rdir in subdirs(&dir.join("remotes")) {
        let remote = fs::read(rdir.join("remote.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["remote"].as_str().map(str::to_string))
            .unwrap_or_else(|| rdir.display().to_string());
        let mut rs = RemoteStats {
            remote,
            versions: 0,
            bytes: 0,
        };
        for sub in subdirs(&rdir) {
            let Ok(rd) = fs::read_dir(&sub) else { continue };
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().and_then(|x| x.to_str()) != Some("meta") {
                    continue;
                }
                let Ok(dm) = fs::metadata(p.with_extension("data")) else {
                    continue;
                };
                rs.versions += 1;
                rs.bytes += dm.blocks() * 512;
                if let Ok(mm) = fs::metadata(&p) {
                    let t = mm.mtime().max(0) as u64;
                    out.oldest_access = Some(out.oldest_access.map_or(t, |o| o.min(t)));
                }
                if let Some(m) = file::Meta::load(&p)
                    && m.present_count() == Some(m.size.div_ceil(m.chunk_size.max(1)))
                {
                    out.complete_versions += 1;
                }
            }
        }
        out.bytes += rs.bytes;
        out.versions += rs.versions;
        out.remotes.push(rs);
    }
    out.remotes.sort_by(|a, b| a.remote.cmp(&b.remote));
    Ok(out)
}

/// Who holds the lock of `dir`, if anyone.
fn holder(dir: &Path) -> Option<String> {
    let mut f = File::open(dir.join("lock")).ok()?;
    match f.try_lock_shared() {
        Ok(()) => None,
        Err(_) => {
            let mut s = String::new();
            let _ = f.read_to_string(&mut s);
            Some(s.trim().replace('\n', ", "))
        }
    }
}

/// Deletes every cached version (not the pending uploads). Refuses while a daemon uses `dir`.
pub fn clear(dir: &Path) -> Result<u64, CacheError> {
    let _lock = lock_dir(dir, "artifactfs cache clear")?;
    let before = stats(dir).map(|s| s.bytes).unwrap_or(0);
    let remotes = dir.join("remotes");
    match fs::remove_dir_all(&remotes) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(CacheError::io(&remotes, e)),
    }
    let _ = fs::remove_file(dir.join("stats.json"));
    Ok(before)
}

/// Deletes the cached versions of remote `remote` (its id, as `cache stats` names it), or of
/// every remote, that nobody read for `older_than`, or all of them. Refuses while a daemon
/// uses `dir`. Returns the bytes and versions deleted.
pub fn clear_where(
    dir: &Path,
    remote: Option<&str>,
    older_than: Option<std::time::Duration>,
) -> Result<(u64, u64), CacheError> {
    if remote.is_none() && older_than.is_none() {
        let versions = stats(dir).map(|s| s.versions).unwrap_or(0);
        return clear(dir).map(|bytes| (bytes, versions));
    }
    let _lock = lock_dir(dir, "artifactfs cache clear")?;
    let cutoff = older_than.map(|d| CacheFile::now_secs().saturating_sub(d.as_secs()));
    let want = remote.map(|r| r.trim_end_matches('/'));
    let (mut bytes, mut versions) = (0, 0);
    for rdir in subdirs(&dir.join("remotes")) {
        let id = fs::read(rdir.join("remote.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["remote"].as_str().map(str::to_string));
        if want.is_some() && id.as_deref().map(|i| i.trim_end_matches('/')) != want {
            continue;
        }
        for sub in subdirs(&rdir) {
            let Ok(rd) = fs::read_dir(&sub) else { continue };
            for e in rd.flatten() {
                let meta = e.path();
                if meta.extension().and_then(|x| x.to_str()) != Some("meta") {
                    continue;
                }
                let data = meta.with_extension("data");
                // The last access is the time the version's metadata was last saved.
                let accessed = fs::metadata(&meta).map(|m| m.mtime().max(0) as u64).unwrap_or(0);
                if cutoff.is_some_and(|c| accessed >= c) {
                    continue;
                }
                bytes += fs::metadata(&data).map(|m| m.blocks() * 512).unwrap_or(0);
                versions += 1;
                remove_entry(&data, &meta);
            }
        }
    }
    Ok((bytes, versions))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(etag: &str, size: u64) -> VersionKey {
        VersionKey {
            remote: "memory://t".into(),
            path: "a/b.bin".into(),
            etag: etag.into(),
            size,
        }
    }

    fn cache(dir: &Path) -> Arc<Cache> {
        Cache::open(
            &CacheConfig {
                dir: dir.to_path_buf(),
                max_size: 1 << 30,
                chunk_size: 4096,
                min_free: 0.0,
                expire_after: None,
            },
            "test",
        )
        .unwrap()
    }

    fn fill(f: &CacheFile, i: u64) {
        let mut w = f.begin_chunk(i, ChunkHash::Blake3).unwrap();
        let len = w.remaining() as usize;
        w.write(&vec![i as u8; len]).unwrap();
        w.finish(None).unwrap();
    }

    /// After a restart, a chunk found on disk is used only once it matches the checksum
    /// recorded when it was written, of whichever kind that was; metadata from before CRC32C
    /// (no `crc32c` bitmap) holds blake3 sums.
    #[test]
    fn chunks_found_on_disk_are_checked_against_their_recorded_crc32c_or_blake3() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let k = key("\"v1\"", 4 * 4096);
        let (data, meta) = {
            let c = cache(dir.path());
            let f = c.open_version(k.clone()).unwrap();
            for (i, hash) in [
                ChunkHash::Crc32c,
                ChunkHash::Crc32c,
                ChunkHash::Blake3,
                ChunkHash::Blake3,
            ]
            .into_iter()
            .enumerate()
            {
                let mut w = f.begin_chunk(i as u64, hash).unwrap();
                w.write(&[i as u8 + 1; 4096]).unwrap();
                w.finish(None).unwrap();
            }
            f.persist(true).unwrap();
            (f.data_path().to_path_buf(), c.paths(&k).2)
        };
        let raw: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
        assert_eq!(raw["crc32c"], "0300000000000000", "chunks 0 and 1 carry a CRC32C");
        let disk = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
        disk.write_all_at(b"x", 4096 + 7).unwrap();
        disk.write_all_at(b"x", 3 * 4096 + 9).unwrap();
        {
            let c = cache(dir.path());
            let f = c.open_version(k.clone()).unwrap();
            let ok: Vec<bool> = (0..4).map(|i| f.verify(i)).collect();
            assert_eq!(ok, [true, false, true, false]);
            assert!(f.is_present(0) && !f.is_present(1) && f.is_present(2) && !f.is_present(3));
        }
        // Metadata as written before CRC32C: blake3 sums only, no bitmap.
        let k2 = key("\"v2\"", 2 * 4096);
        let meta2 = {
            let c = cache(dir.path());
            let f = c.open_version(k2.clone()).unwrap();
            fill(&f, 0);
            fill(&f, 1);
            f.persist(true).unwrap();
            c.paths(&k2).2
        };
        let mut raw: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta2).unwrap()).unwrap();
        raw.as_object_mut().unwrap().remove("crc32c");
        std::fs::write(&meta2, serde_json::to_vec(&raw).unwrap()).unwrap();
        let c = cache(dir.path());
        let f = c.open_version(k2.clone()).unwrap();
        assert!(f.verify(0) && f.verify(1));
        // A chunk written again without hashing (`verify = false`) records nothing to check,
        // not the sum of the bytes it replaced.
        assert_eq!(f.punch(1), 4096);
        let mut w = f.begin_chunk(1, ChunkHash::None).unwrap();
        w.write(&[9; 4096]).unwrap();
        w.finish(None).unwrap();
        f.persist(true).unwrap();
        drop((f, c));
        let c = cache(dir.path());
        let f = c.open_version(k2).unwrap();
        assert!(f.verify(0) && f.verify(1), "chunk 1 is not checked against its old sum");
    }

    /// Pieces pushed into a chunk reach the file whole and in order, whatever their sizes, in
    /// writes that start and end on multiples of `WRITE_ALIGN` in the file's offsets (the
    /// chunk's end aside), also when chunks do not start on one. Nothing is left queued.
    #[test]
    fn pushed_pieces_are_written_in_aligned_runs_in_order() {
        for chunk_size in [1u64 << 20, 768 << 10] {
            let dir = tempfile::tempdir().unwrap();
            let c = Cache::open(
                &CacheConfig {
                    dir: dir.path().to_path_buf(),
                    max_size: 1 << 30,
                    chunk_size,
                    min_free: 0.0,
                    expire_after: None,
                },
                "test",
            )
            .unwrap();
            let len = 3 * chunk_size as usize + 12_345;
            let data = crate::testing::noise(len, 7);
            let f = c.open_version(key("\"v1\"", len as u64)).unwrap();
            // Uneven sizes: empty, tiny, across one boundary, across several.
            let sizes = [1usize, 0, 4096, 65_536, 300_001, 777, 1_300_000];
            let mut n = 0;
            for chunk in 0..4u64 {
                let range = f.chunk_range(chunk);
                let mut w = f.begin_chunk(chunk, ChunkHash::Crc32c).unwrap();
                let mut at = range.start as usize;
                while at < range.end as usize {
                    let take = sizes[n % sizes.len()].min(range.end as usize - at);
                    w.push(bytes::Bytes::copy_from_slice(&data[at..at + take])).unwrap();
                    at += take;
                    n += 1;
                }
                let writes = w.writes.clone();
                assert_eq!(writes.first().map(|r| r.start), Some(range.start));
                assert_eq!(writes.last().map(|r| r.end), Some(range.end));
                for (i, r) in writes.iter().enumerate() {
                    assert!(i == 0 || writes[i - 1].end == r.start, "{writes:?}");
                    assert!(r.start == range.start || r.start % file::WRITE_ALIGN == 0, "{writes:?}");
                    assert!(r.end == range.end || r.end % file::WRITE_ALIGN == 0, "{writes:?}");
                }
                let want = crate::protocol::crc32c(&data[range.start as usize..range.end as usize]);
                w.finish(Some(ChunkSum::Crc32c(want))).unwrap();
            }
            assert_eq!(f.read_with(0..len as u64, |b| b.to_vec()).unwrap(), data);
        }
        // A chunk given fewer bytes than it holds is refused, and stays missing.
        let dir = tempfile::tempdir().unwrap();
        let c = cache_with(dir.path(), 0.0, None);
        let f = c.open_version(key("\"v2\"", 1 << 20)).unwrap();
        let short = f.chunk_range(0).end - 1;
        let mut w = f.begin_chunk(0, ChunkHash::Crc32c).unwrap();
        w.push(bytes::Bytes::from(vec![1u8; short as usize])).unwrap();
        assert!(matches!(w.finish(None), Err(ChunkError::Length { .. })));
        assert!(!f.is_present(0));
    }

    /// `will_need` has the kernel read in the chunks on disk, and leaves the holes alone: a
    /// hole advised would be filled with zeros in the page cache, for the fetch to overwrite.
    #[test]
    fn will_need_reads_in_present_chunks_and_leaves_holes_alone() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path());
        let f = c.open_version(key("\"v1\"", 64 * 4096)).unwrap();
        for i in 0..8 {
            fill(&f, i);
        }
        let data = std::fs::File::open(f.data_path()).unwrap();
        data.sync_all().unwrap();
        // SAFETY: plain advice on an open descriptor.
        unsafe { libc::posix_fadvise(data.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(crate::testing::resident_pages(&data, 64 * 4096), 0, "dropped");
        f.will_need(2 * 4096..64 * 4096);
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while crate::testing::resident_pages(&data, 8 * 4096) < 6 && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(
            crate::testing::resident_pages(&data, 8 * 4096),
            6,
            "chunks 2..8 read in, 0 and 1 (before the range) not"
        );
        assert_eq!(
            crate::testing::resident_pages(&data, 64 * 4096),
            6,
            "no page of a hole in the page cache"
        );
    }

    /// A version being opened or closed holds up only itself: another version opens at once,
    /// and the same version waits until the other thread is done, then is shared.
    #[test]
    fn a_version_busy_on_disk_holds_up_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path());
        let (_, data, _) = c.paths(&key("\"v1\"", 10_000));
        // Another thread's open of v1 is under way.
        c.shared.open.lock().insert(data.clone(), Slot::Busy);
        let t = std::time::Instant::now();
        let other = c.open_version(key("\"v2\"", 10_000)).unwrap();
        assert!(
            t.elapsed() < std::time::Duration::from_millis(90),
            "another version waited for v1"
        );
        let waiter = {
            let c = c.clone();
            std::thread::spawn(move || {
                let t = std::time::Instant::now();
                (c.open_version(key("\"v1\"", 10_000)).unwrap(), t.elapsed())
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        // The other thread is done: its file is the one the waiter gets.
        let mine = Arc::new(
            CacheFile::open(
                c.shared.clone(),
                key("\"v1\"", 10_000),
                data.clone(),
                data.with_extension("meta"),
                None,
            )
            .unwrap(),
        );
        c.shared
            .open
            .lock()
            .insert(data.clone(), Slot::Open(Arc::downgrade(&mine)));
        c.shared.open_changed.notify_all();
        let (theirs, waited) = waiter.join().unwrap();
        assert!(Arc::ptr_eq(&mine, &theirs), "the same version is shared");
        assert!(
            waited >= std::time::Duration::from_millis(90),
            "v1 waited for its opener"
        );
        drop(other);
    }

    /// Many threads opening, filling and closing the same versions: every chunk written is
    /// found by the next opener (no open reads metadata a close has not written yet).
    #[test]
    fn opens_and_closes_racing_on_one_version_lose_no_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for round in 0..50u64 {
                        let f = c.open_version(key("\"v1\"", 4096 * 256)).unwrap();
                        let i = t * 50 + round;
                        fill(&f, i);
                        drop(f);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let f = c.open_version(key("\"v1\"", 4096 * 256)).unwrap();
        assert_eq!(f.present_count(), 200, "every chunk written is there");
    }

    #[test]
    fn a_retired_version_goes_when_its_last_reader_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path());
        let f = c.open_version(key("\"v1\"", 10_000)).unwrap();
        fill(&f, 0);
        let data = f.data_path().to_path_buf();
        c.retire(&key("\"v1\"", 10_000));
        assert!(data.exists(), "still open: kept");
        drop(f);
        assert!(!data.exists(), "closed: deleted");
        assert_eq!(c.used(), 0);
    }

    #[test]
    fn a_reopened_version_keeps_its_chunks_and_a_second_daemon_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = cache(dir.path());
            let f = c.open_version(key("\"v1\"", 10_000)).unwrap();
            fill(&f, 1);
            assert!(f.read_with(4096..8192, |b| b.iter().all(|&x| x == 1)).unwrap());
            let err = Cache::open(
                &CacheConfig {
                    dir: dir.path().to_path_buf(),
                    max_size: 1 << 30,
                    chunk_size: 4096,
                    min_free: 0.0,
                    expire_after: None,
                },
                "second",
            )
            .unwrap_err();
            assert!(
                err.to_string().contains("in use by another artifactfs mount (pid"),
                "{err}"
            );
        }
        let c = cache(dir.path());
        let f = c.open_version(key("\"v1\"", 10_000)).unwrap();
        assert!(f.is_present(1) && !f.is_present(0));
        assert!(!f.is_ready(1), "checked again before use after a restart");
        assert!(f.verify(1));
        assert!(f.read_with(4096..8192, |b| b.iter().all(|&x| x == 1)).unwrap());
        // Another version of the same path starts empty.
        let g = c.open_version(key("\"v2\"", 10_000)).unwrap();
        assert_eq!(g.present_count(), 0);
    }

    #[test]
    fn leftovers_of_an_interrupted_run_are_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let data = {
            let c = cache(dir.path());
            let f = c.open_version(key("\"v1\"", 10_000)).unwrap();
            fill(&f, 0);
            f.data_path().to_path_buf()
        };
        let orphan = data.with_file_name("0123.data");
        let tmp = data.with_extension("meta.tmp");
        std::fs::write(&orphan, b"x").unwrap();
        std::fs::write(&tmp, b"x").unwrap();
        let c = cache(dir.path());
        assert!(!orphan.exists() && !tmp.exists());
        assert!(data.exists());
        assert!(c.used() >= 4096);
    }

    fn cache_with(dir: &Path, min_free: f64, expire_after: Option<std::time::Duration>) -> Arc<Cache> {
        Cache::open(
            &CacheConfig {
                dir: dir.to_path_buf(),
                max_size: 1 << 30,
                chunk_size: 4096,
                min_free,
                expire_after,
            },
            "test",
        )
        .unwrap()
    }

    /// An idle version of `remote` with 2 chunks on disk.
    fn idle_version(c: &Cache, remote: &str, etag: &str) {
        let f = c
            .open_version(VersionKey {
                remote: remote.into(),
                path: "f".into(),
                etag: etag.into(),
                size: 8192,
            })
            .unwrap();
        fill(&f, 0);
        fill(&f, 1);
    }

    #[test]
    fn reading_a_complete_version_counts_as_an_access_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let k = VersionKey {
            remote: "http://a".into(),
            path: "f".into(),
            etag: "\"1\"".into(),
            size: 8192,
        };
        {
            let c = cache(dir.path());
            idle_version(&c, "http://a", "\"1\"");
        }
        let meta = walk_files(&dir.path().join("remotes"))
            .into_iter()
            .find(|p| p.extension().is_some_and(|x| x == "meta"))
            .unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(10 * 86_400);
        File::options()
            .write(true)
            .open(&meta)
            .unwrap()
            .set_modified(old)
            .unwrap();
        {
            // Another daemon reads the complete version (nothing in it changes) and closes it.
            let c = cache(dir.path());
            let f = c.open_version(k).unwrap();
            assert!(f.is_complete());
            drop(f);
        }
        let (_, n) = clear_where(dir.path(), None, Some(std::time::Duration::from_secs(86_400))).unwrap();
        assert_eq!(n, 0, "read just now, yet cleared as not read for a day");
    }

    #[test]
    fn clear_takes_one_remote_or_what_was_not_read_for_a_while() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = cache(dir.path());
            idle_version(&c, "http://a", "\"1\"");
            idle_version(&c, "http://a", "\"2\"");
            idle_version(&c, "http://b", "\"1\"");
        }
        // One of a's versions was last read a day ago.
        let metas: Vec<PathBuf> = walk_files(&dir.path().join("remotes"))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|x| x == "meta"))
            .collect();
        assert_eq!(metas.len(), 3);
        let day_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(86_400);
        let a_dir = metas
            .iter()
            .find(|m| {
                let rdir = m.parent().unwrap().parent().unwrap();
                fs::read_to_string(rdir.join("remote.json"))
                    .unwrap()
                    .contains("http://a")
            })
            .unwrap();
        File::options()
            .write(true)
            .open(a_dir)
            .unwrap()
            .set_modified(day_ago)
            .unwrap();

        let (_, n) = clear_where(dir.path(), None, Some(std::time::Duration::from_secs(3600))).unwrap();
        assert_eq!(n, 1, "only the version not read for an hour");
        assert_eq!(stats(dir.path()).unwrap().versions, 2);
        let (bytes, n) = clear_where(dir.path(), Some("http://b/"), None).unwrap();
        assert_eq!((bytes, n), (8192, 1));
        let left = stats(dir.path()).unwrap();
        assert_eq!(left.versions, 1);
        assert_eq!(left.remotes.iter().find(|r| r.versions > 0).unwrap().remote, "http://a");
        // Refused while a daemon holds the directory.
        let _c = cache(dir.path());
        assert!(clear_where(dir.path(), Some("http://a"), None).is_err());
    }

    fn walk_files(p: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in fs::read_dir(p).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk_files(&p));
            } else {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn versions_not_read_for_the_expiry_time_go() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache_with(dir.path(), 0.0, Some(std::time::Duration::from_secs(1)));
        idle_version(&c, "http://a", "\"old\"");
        assert_eq!(c.evict(), 0, "read just now: kept");
        std::thread::sleep(std::time::Duration::from_millis(2100));
        let f = c
            .open_version(VersionKey {
                remote: "http://a".into(),
                path: "g".into(),
                etag: "\"open\"".into(),
                size: 4096,
            })
            .unwrap();
        fill(&f, 0);
        assert_eq!(c.evict(), 8192, "the idle version expired; the open one stays");
        assert_eq!(c.used(), 4096);
    }

    #[test]
    fn the_cache_shrinks_to_keep_the_disks_free_space() {
        let dir = tempfile::tempdir().unwrap();
        let (total, avail) = disk_space(dir.path()).unwrap();
        // Ask for more free space than the disk has: the idle versions must go.
        let want = ((avail as f64 / total as f64) + 0.02).min(0.95);
        if avail as f64 / total as f64 > 0.9 {
            return; // a nearly empty disk: nothing to show
        }
        let c = cache_with(dir.path(), want, None);
        idle_version(&c, "http://a", "\"1\"");
        idle_version(&c, "http://a", "\"2\"");
        assert_eq!(c.used(), 16384);
        assert_eq!(c.evict(), 16384, "short of free space: the cache gives its bytes back");
        assert!(c.shared.limit.load(Ordering::Relaxed) < (1 << 30));
        // With room to spare, nothing goes.
        let dir2 = tempfile::tempdir().unwrap();
        let c2 = cache_with(dir2.path(), 0.0, None);
        idle_version(&c2, "http://a", "\"1\"");
        assert_eq!(c2.evict(), 0);
    }
}
