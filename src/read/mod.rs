//! The read engine: turns "bytes `a..b` of version V" into cached chunks. Missing chunks are
//! fetched with ranged GETs ("flights") that run in parallel, bounded per remote; every
//! chunk has at most one flight, which all readers of the chunk wait on; sequential readers
//! grow a readahead window; every response is checked against the version it must belong to
//! (status, `Content-Range`, length, ETag, and each chunk's CRC32C or blake3 when the remote
//! offers them).
//!
//! It owns no FUSE types and no inode logic: `fs/` asks it for versions and bytes.

pub mod plan;
pub mod slots;
pub mod warm;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::{Buf, BytesMut};
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::{OnceCell, Semaphore, watch};

use slots::{Slot, Slots};

use crate::cache::{Cache, CacheError, CacheFile, ChunkError, ChunkHash, ChunkSum, ChunkWriter, VersionKey};
use crate::store::{Content, Digests, DynStore, ETag, GetResponse, Head, ObjectMeta, Revalidated, StoreError};
pub use plan::{Readahead, ReadaheadConfig};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadConfig {
    /// Largest ranged GET.
    pub max_request: u64,
    pub readahead: ReadaheadConfig,
    /// Reads that arrive this close to the sequential position still count as sequential
    /// (the kernel's own readahead requests arrive out of order).
    pub sequential_slack: u64,
    /// Ranged GETs in flight at once for this remote, at first.
    pub concurrency: usize,
    /// The number of GETs at once grows up to this while more of them bring more bytes per
    /// second ([`slots`]); equal to `concurrency`, it never changes.
    pub max_concurrency: usize,
    /// No probe for more GETs at once while this process and the machine are busy
    /// ([`slots`]). Off only in tests: a test process runs other tests beside it, and their
    /// CPU is not the remote's doing.
    pub(crate) cpu_rule: bool,
    /// Bytes the engine may hold in memory for transfers at once, across all files.
    pub memory_budget: u64,
    /// Hash every chunk: checked against the remote's digests when it offers them (CRC32C,
    /// or blake3 from a server without them and for a file of one chunk, whose tag is its
    /// blake3), and recorded so chunks found on disk later can be checked again.
    pub verify: bool,
    /// Further tries of a transfer that broke off or delivered bad bytes.
    pub retries: usize,
}

impl Default for ReadConfig {
    fn default() -> Self {
        ReadConfig {
            max_request: 8 << 20,
            readahead: ReadaheadConfig {
                initial: 4 << 20,
                max: 64 << 20,
            },
            sequential_slack: 8 << 20,
            concurrency: 16,
            max_concurrency: MAX_CONCURRENCY,
            cpu_rule: true,
            memory_budget: 64 << 20,
            verify: true,
            retries: 5,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    #[error("the remote version changed")]
    Stale,
    #[error("{0}")]
    Remote(StoreError),
    #[error("{0}")]
    Cache(Arc<CacheError>),
    #[error("bad data from the remote: {0}")]
    Integrity(String),
}

impl ReadError {
    fn is_transient(&self) -> bool {
        match self {
            ReadError::Remote(e) => e.is_transient(),
            ReadError::Integrity(_) => true,
            _ => false,
        }
    }
}

impl From<CacheError> for ReadError {
    fn from(e: CacheError) -> Self {
        ReadError::Cache(Arc::new(e))
    }
}

impl From<ChunkError> for ReadError {
    fn from(e: ChunkError) -> Self {
        ReadError::Integrity(e.to_string())
    }
}

/// Counts a fetch a reader waits on while it runs.
struct Foreground<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Foreground<'a> {
    fn new(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Foreground(n)
    }
}

impl Drop for Foreground<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a fetch that no reader waits on yet is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ahead {
    /// A reader's readahead: competes with other readers' fetches as an equal.
    Readahead,
    /// Warm-up or a folder's small files: pauses its body while a reader waits.
    Bulk,
}

/// How far the number of GETs at once may grow unless configured otherwise.
pub const MAX_CONCURRENCY: usize = 64;

/// Memory budget units (64 KiB).
const UNIT: u64 = 64 << 10;

/// The read engine of one remote.
#[derive(Debug)]
pub struct Reader {
    store: DynStore,
    cache: Option<Arc<Cache>>,
    cfg: ReadConfig,
    rt: Handle,
    /// Request slots: how many GETs at once, half of them at most for background fetches.
    slots: Slots,
    /// The readahead window never grows past this (a quarter of the cache).
    window_cap: u64,
    /// Fetches readers wait on, in flight now: background transfers pause while there are.
    foreground: std::sync::atomic::AtomicUsize,
    budget: Semaphore,
    /// Set once the remote answered a ranged GET with the whole file.
    whole_file: AtomicBool,
    versions: Mutex<HashMap<(String, ETag), Weak<Version>>>,
    /// Versions we wrote, and which bytes they share with the version they were written from.
    lineage: Mutex<HashMap<(String, ETag), Lineage>>,
    /// Versions on their way in a folder's bundle: a reader waits for the bundle rather than
    /// fetching the same bytes again. Woken as bundled files land.
    bundled: Mutex<HashMap<(String, ETag), watch::Receiver<()>>>,
}

/// How long a reader waits for a bundle to bring the file it reads before fetching it itself.
const BUNDLE_WAIT: Duration = Duration::from_secs(2);

/// Versions announced as coming in one bundle ([`Reader::expect_bundle`]). Dropping it
/// releases those that did not land.
pub struct BundleGuard {
    reader: Arc<Reader>,
    keys: Vec<(String, ETag)>,
    landed: watch::Sender<()>,
}

impl BundleGuard {
    /// These versions are in the cache now (or will not come): their readers go on.
    pub fn landed(&self, versions: &[(String, ETag)]) {
        let mut map = self.reader.bundled.lock();
        for k in versions {
            map.remove(k);
        }
        drop(map);
        self.landed.send_replace(());
    }
}

impl Drop for BundleGuard {
    fn drop(&mut self) {
        let mut map = self.reader.bundled.lock();
        for k in &self.keys {
            map.remove(k);
        }
    }
}

/// A version we uploaded equals the version it was written from on `same`: those bytes can
/// come from that version's cache instead of the remote.
#[derive(Debug, Clone)]
pub struct Lineage {
    pub from_etag: ETag,
    pub from_size: u64,
    /// Ranges of equal bytes, within both versions' sizes.
    pub same: Vec<Range<u64>>,
}

/// Lineage records kept at most; when full, all are dropped (a missing record costs fetches,
/// never wrong bytes).
const MAX_LINEAGE: usize = 4096;

/// How far back a chunk is looked for through versions we wrote.
const MAX_LINEAGE_DEPTH: u32 = 8;

impl Reader {
    /// `cache` is `None` to read without caching (every read goes to the remote).
    pub fn new(store: DynStore, cache: Option<Arc<Cache>>, mut cfg: ReadConfig, rt: Handle) -> Arc<Self> {
        let mut window_cap = u64::MAX;
        if let Some(c) = &cache {
            // Readahead must fit in the cache with room to spare, or it evicts what it fetched
            // before the reader gets there and everything is fetched twice.
            let cap = (c.max_size() / 4).max(c.chunk_size());
            cfg.readahead.max = cfg.readahead.max.min(cap);
            cfg.readahead.initial = cfg.readahead.initial.min(cfg.readahead.max);
            cfg.max_request = cfg.max_request.min((cap / 2).max(c.chunk_size()));
            window_cap = cap;
        }
        let units = (cfg.memory_budget / UNIT).max(1) as usize;
        let ranged = store.capabilities().ranged_reads;
        Arc::new(Reader {
            slots: Slots::new(cfg.concurrency, cfg.max_concurrency, cfg.cpu_rule),
            window_cap,
            foreground: std::sync::atomic::AtomicUsize::new(0),
            budget: Semaphore::new(units.min(Semaphore::MAX_PERMITS)),
            store,
            cache,
            cfg,
            rt,
            // A remote that says it serves no ranges is read whole from the start.
            whole_file: AtomicBool::new(!ranged),
            versions: Mutex::new(HashMap::new()),
            lineage: Mutex::new(HashMap::new()),
            bundled: Mutex::new(HashMap::new()),
        })
    }

    /// Announces `versions` as coming in one bundle, until the guard says they landed or is
    /// dropped.
    pub fn expect_bundle(self: &Arc<Self>, versions: Vec<(String, ETag)>) -> BundleGuard {
        let (tx, rx) = watch::channel(());
        let mut map = self.bundled.lock();
        for k in &versions {
            map.insert(k.clone(), rx.clone());
        }
        drop(map);
        BundleGuard {
            reader: self.clone(),
            keys: versions,
            landed: tx,
        }
    }

    /// Waits (at most [`BUNDLE_WAIT`]) while a bundle brings `(path, etag)`. Returns whether
    /// one was on its way.
    async fn wait_for_bundle(&self, path: &str, etag: &ETag) -> bool {
        let key = (path.to_string(), etag.clone());
        let Some(mut rx) = self.bundled.lock().get(&key).cloned() else {
            return false;
        };
        let wait = async {
            while self.bundled.lock().contains_key(&key) {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(BUNDLE_WAIT, wait).await;
        true
    }

    pub fn store(&self) -> &DynStore {
        &self.store
    }

    pub fn config(&self) -> &ReadConfig {
        &self.cfg
    }

    /// The one [`Version`] object of `(path, etag)`: everyone reading that version shares its
    /// cache file and its in-flight fetches.
    pub fn open_version(self: &Arc<Self>, path: &str, etag: &ETag, size: u64) -> Arc<Version> {
        let key = (path.to_string(), etag.clone());
        if let Some(v) = self.versions.lock().get(&key).and_then(Weak::upgrade) {
            return v;
        }
        // The cache file is opened without the map's lock (opening is disk I/O, and every
        // open and close of every version takes that lock); the cache hands two openers of
        // one version the same file, and the first to come back below wins.
        let file = match (&self.cache, size) {
            (Some(cache), 1..) => {
                let vk = VersionKey {
                    remote: self.store.id().to_string(),
                    path: path.to_string(),
                    etag: etag.as_str().to_string(),
                    size,
                };
                // Where listings name versions, nothing asks for the last one.
                match cache.open_version_as(vk, !self.store.capabilities().listing_etags) {
                    Ok(f) => Some(f),
                    Err(e) => {
                        tracing::warn!(path, "reading without the cache: {e}");
                        None
                    }
                }
            }
            _ => None,
        };
        let mut map = self.versions.lock();
        if let Some(v) = map.get(&key).and_then(Weak::upgrade) {
            return v;
        }
        let lineage = self.lineage.lock().get(&key).cloned().map(|l| Inherited {
            lineage: l,
            from: std::sync::OnceLock::new(),
        });
        let v = Arc::new(Version {
            reader: self.clone(),
            lineage,
            path: path.to_string(),
            etag: etag.clone(),
            size,
            file,
            flights: Mutex::new(Vec::new()),
            digests: OnceCell::new(),
            stale: AtomicBool::new(false),
        });
        map.insert(key, Arc::downgrade(&v));
        v
    }

    /// Opens the current version of `path` when no listing said which it is: one `GET` of the
    /// first chunk, without a condition, names the version (its ETag and size) and brings its
    /// first bytes into the cache, so no `HEAD` is needed. `size_hint` is the listed size (not 0).
    ///
    /// When the cache holds bytes of a version of `path` from before (another mount), a `HEAD`
    /// with `If-None-Match` asks whether it is still current instead: its bytes are then read
    /// from the cache, not fetched again.
    pub async fn open_current(self: &Arc<Self>, path: &str, size_hint: u64) -> Result<Arc<Version>, ReadError> {
        let last = self.cache.as_ref().and_then(|c| c.last_version(self.store.id(), path));
        if let Some((etag, size)) = last.filter(|(_, size)| *size == size_hint) {
            let etag = ETag::new(&etag);
            let head = {
                let _permit = self.request_permit().await?;
                self.store.head(path, Some(&etag)).await.map_err(ReadError::Remote)?
            };
            match head {
                Revalidated::NotModified => return Ok(self.open_version(path, &etag, size)),
                Revalidated::Modified(Head::File(ObjectMeta {
                    etag: Some(t), size, ..
                })) => return Ok(self.open_version(path, &t, size)),
                // No tag: the first GET below says which version it is.
                Revalidated::Modified(Head::File(_)) => {}
                Revalidated::Modified(Head::Dir { .. }) => return Err(ReadError::Remote(StoreError::NotFound)),
            }
        }
        let chunk = self.cache.as_ref().map(|c| c.chunk_size()).unwrap_or(1 << 20);
        let asked = 0..size_hint.clamp(1, chunk);
        let resp = {
            let _permit = self.request_permit().await?;
            self.store
                .get(path, Some(asked.clone()), None)
                .await
                .map_err(ReadError::Remote)?
        };
        let etag = resp
            .etag
            .clone()
            .ok_or_else(|| ReadError::Remote(StoreError::Protocol("no ETag for this file".into())))?;
        let size = match &resp.content {
            Content::Partial { total: Some(t), .. } => *t,
            Content::Whole { size: Some(s) } => *s,
            _ => size_hint,
        };
        let v = self.open_version(path, &etag, size);
        v.adopt(resp, asked);
        Ok(v)
    }

    /// Requests to the remote in flight now.
    pub fn requests_in_flight(&self) -> usize {
        self.slots.in_use()
    }

    /// Requests this remote may have in flight at once now, and at most.
    pub fn concurrency_now(&self) -> (usize, usize) {
        (self.slots.limit(), self.slots.max())
    }

    /// A place among the requests this remote may have in flight at once.
    async fn request_permit(&self) -> Result<Slot<'_>, ReadError> {
        self.slots
            .request()
            .await
            .ok_or_else(|| ReadError::Integrity("shutting down".into()))
    }

    /// The readahead settings for now: the window may reach as far as the background share
    /// of the request slots fetches at once, and half again as far when that number may
    /// grow: a reader of a remote that is slow per request then wants more GETs than it gets,
    /// which is what makes the number grow ([`slots`]).
    fn readahead_now(&self) -> ReadaheadConfig {
        let mut ra = self.cfg.readahead;
        let mut slots = self.slots.background_limit() as u64 * self.cfg.max_request;
        if self.slots.max() > self.cfg.concurrency {
            slots = slots * 3 / 2;
        }
        ra.max = ra.max.max(slots.min(self.window_cap));
        ra
    }

    /// Records that version `etag` of `path`, which we uploaded, equals an older version on
    /// `lineage.same`.
    pub fn record_lineage(&self, path: &str, etag: &ETag, lineage: Lineage) {
        let mut map = self.lineage.lock();
        if map.len() >= MAX_LINEAGE {
            map.clear();
        }
        map.insert((path.to_string(), etag.clone()), lineage);
    }

    /// The version `(path, etag)` when it is being read, its cache file is on disk, or it was
    /// written by us from another.
    /// Whether `(path, etag)` is being read or has bytes in the cache (blocking: may look
    /// at the disk).
    pub fn knows_version(&self, path: &str, etag: &ETag, size: u64) -> bool {
        let key = (path.to_string(), etag.clone());
        if self.versions.lock().get(&key).is_some_and(|v| v.strong_count() > 0) {
            return true;
        }
        self.cache.as_ref().is_some_and(|c| {
            c.has_version(&VersionKey {
                remote: self.store.id().to_string(),
                path: path.to_string(),
                etag: etag.as_str().to_string(),
                size,
            })
        })
    }

    fn cached_version(self: &Arc<Self>, path: &str, etag: &ETag, size: u64) -> Option<Arc<Version>> {
        let key = (path.to_string(), etag.clone());
        if let Some(v) = self.versions.lock().get(&key).and_then(Weak::upgrade) {
            return Some(v);
        }
        let cache = self.cache.as_ref()?;
        let vk = VersionKey {
            remote: self.store.id().to_string(),
            path: path.to_string(),
            etag: etag.as_str().to_string(),
            size,
        };
        // A version we wrote may hold nothing yet and still lead to one that does.
        let reachable = cache.has_version(&vk) || self.lineage.lock().contains_key(&key);
        reachable.then(|| self.open_version(path, etag, size))
    }

    /// The version `(path, etag)` is superseded: its cached bytes go now, or when its last
    /// reader is done.
    pub fn retire(&self, path: &str, etag: &ETag, size: u64) {
        if let Some(c) = &self.cache {
            c.retire(&VersionKey {
                remote: self.store.id().to_string(),
                path: path.to_string(),
                etag: etag.as_str().to_string(),
                size,
            });
        }
    }

    fn count<T>(&self, f: impl FnOnce(&crate::cache::LiveCounters) -> T) {
        if let Some(c) = &self.cache {
            f(c.counters());
        }
    }
}

#[derive(Debug, Clone)]
struct Progress {
    /// Chunks before this one are in the cache.
    done: u64,
    finished: bool,
    error: Option<ReadError>,
}

/// One ranged GET filling consecutive chunks, in order.
#[derive(Debug)]
struct Flight {
    chunks: Range<u64>,
    progress: watch::Sender<Progress>,
    /// Set when no reader waits on it yet (readahead or bulk work): it takes a background
    /// request slot (at most half of the remote's). Bulk work (warm-up, a folder's small
    /// files) also pauses its body while a reader waits on another fetch. Readahead does not:
    /// it is the near future of a reader streaming the file, and pausing it for other readers
    /// stalled every reader of several files at once.
    ahead: Option<Ahead>,
    /// A reader came to wait on it: it stops yielding.
    promote: tokio::sync::Notify,
    promoted: AtomicBool,
}

impl Flight {
    fn background(&self) -> bool {
        self.ahead.is_some()
    }
}

/// Lands a flight that ends without landing (its task panicked, or was dropped): its readers
/// then get an error instead of waiting for ever.
struct Landing<'a> {
    version: &'a Version,
    flight: &'a Arc<Flight>,
    landed: bool,
}

impl<'a> Landing<'a> {
    fn new(version: &'a Version, flight: &'a Arc<Flight>) -> Self {
        Landing {
            version,
            flight,
            landed: false,
        }
    }

    fn land(mut self, result: Result<(), ReadError>) {
        self.landed = true;
        self.version.land(self.flight, result);
    }
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        if !self.landed {
            let e = ReadError::Integrity("the fetch ended without an outcome".into());
            self.version.land(self.flight, Err(e));
        }
    }
}

/// One version of one artifact, as long as someone reads it.
#[derive(Debug)]
pub struct Version {
    reader: Arc<Reader>,
    pub path: String,
    pub etag: ETag,
    pub size: u64,
    file: Option<Arc<CacheFile>>,
    flights: Mutex<Vec<Arc<Flight>>>,
    digests: OnceCell<Option<Arc<Digests>>>,
    stale: AtomicBool,
    /// Written by us from an older version: where shared bytes may be copied from.
    lineage: Option<Inherited>,
}

#[derive(Debug)]
struct Inherited {
    lineage: Lineage,
    /// The older version, once looked up (`None`: nothing of it is cached).
    from: std::sync::OnceLock<Option<Arc<Version>>>,
}

impl Version {
    /// The remote said this version is gone.
    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }

    /// Whether every byte is in the cache.
    pub fn is_complete(&self) -> bool {
        self.size == 0 || self.file.as_ref().is_some_and(|f| f.is_complete())
    }

    pub fn cache_file(&self) -> Option<&Arc<CacheFile>> {
        self.file.as_ref()
    }

    /// Holds the cache file whole when every byte is in it and checked (see
    /// [`CacheFile::pin_whole`]).
    pub fn pin_whole(&self) -> Option<crate::cache::WholePin> {
        self.file.as_ref()?.pin_whole()
    }

    /// Reads up to `len` bytes at `offset` and hands them to `reply` (which may run on the
    /// calling thread, with the bytes borrowed straight from the cache mapping). `ra` is the
    /// reader's readahead state.
    pub async fn read<R>(
        self: &Arc<Self>,
        ra: &Mutex<Readahead>,
        offset: u64,
        len: u32,
        reply: impl FnOnce(Result<&[u8], ReadError>) -> R,
    ) -> R {
        let end = offset.saturating_add(len as u64).min(self.size);
        let range = offset.min(end)..end;
        let cfg = &self.reader.cfg;
        let prefetch = ra
            .lock()
            .on_read(&range, self.size, &self.reader.readahead_now(), cfg.sequential_slack);
        let mut reply = Some(reply);
        let Some(file) = self.file.clone() else {
            let reply = reply.take().expect("reply unused");
            return self.read_direct(range, reply).await;
        };
        if let Some(r) = file.read_with(range.clone(), |b| (reply.take().expect("reply unused"))(Ok(b))) {
            self.reader
                .count(|c| c.hit_bytes.fetch_add(range.end - range.start, Ordering::Relaxed));
            self.prefetch(prefetch, Ahead::Readahead);
            return r;
        }
        // Bytes on disk that only need their check after a restart still count as hits.
        let on_disk = file.chunks_of(&range).all(|i| file.is_present(i));
        self.reader.count(|c| {
            let counter = if on_disk { &c.hit_bytes } else { &c.miss_bytes };
            counter.fetch_add(range.end - range.start, Ordering::Relaxed)
        });
        // On its way in a bundle: wait for it rather than fetch it again.
        if self.reader.wait_for_bundle(&self.path, &self.etag).await
            && let Some(r) = file.read_with(range.clone(), |b| (reply.take().expect("reply unused"))(Ok(b)))
        {
            return r;
        }
        // Fetch what the read needs and what readahead wants in one plan, so the first
        // request covers both.
        let union = range.start..prefetch.end.max(range.end);
        self.start_flights(file.chunks_of(&union), file.chunks_of(&range), Ahead::Readahead);
        loop {
            match self.ensure(&file, range.clone(), true).await {
                Ok(()) => {
                    if let Some(r) = file.read_with(range.clone(), |b| (reply.take().expect("reply unused"))(Ok(b))) {
                        return r;
                    }
                    // A chunk was evicted between fetching and reading: fetch it again.
                }
                Err(ReadError::Cache(e)) if matches!(*e, CacheError::Full) => {
                    tracing::warn!(path = %self.path, "cache disk full; reading without caching");
                    return self.read_direct(range, reply.take().expect("reply unused")).await;
                }
                Err(e) => return (reply.take().expect("reply unused"))(Err(e)),
            }
        }
    }

    /// Fetches `bytes` into the cache in the background: a reader's readahead, or bulk work
    /// (warm-up, small files) that makes way for readers ([`Ahead`]).
    pub fn prefetch(self: &Arc<Self>, bytes: Range<u64>, ahead: Ahead) {
        let Some(file) = &self.file else { return };
        if bytes.is_empty() {
            return;
        }
        let chunks = file.chunks_of(&bytes);
        // What is on disk already: have the kernel read it in ahead of the reader.
        file.will_need(bytes);
        if let Some(check) = verifier(file, chunks.clone()) {
            self.reader.rt.spawn_blocking(check);
        }
        self.start_flights(chunks, 0..0, ahead);
    }

    /// Waits until every chunk under `bytes` is ready, fetching what is missing.
    /// `reader`: a reader waits (the flights it waits on stop yielding to others); false for
    /// background work (warm-up).
    async fn ensure(self: &Arc<Self>, file: &Arc<CacheFile>, bytes: Range<u64>, reader: bool) -> Result<(), ReadError> {
        let chunks = file.chunks_of(&bytes);
        if let Some(check) = verifier(file, chunks.clone()) {
            let _ = tokio::task::spawn_blocking(check).await;
        }
        let mut i = chunks.start;
        let mut restarts = 0;
        while i < chunks.end {
            if file.is_ready(i) {
                i += 1;
                continue;
            }
            let flight = self.flights.lock().iter().find(|f| f.chunks.contains(&i)).cloned();
            let Some(flight) = flight else {
                // Missing and nobody fetching it (a flight failed, or it was evicted).
                restarts += 1;
                if restarts > chunks.end - chunks.start + 2 {
                    return Err(ReadError::Integrity(format!("chunk {i} keeps disappearing")));
                }
                let (urgent, ahead) = if reader {
                    (i..chunks.end, Ahead::Readahead)
                } else {
                    (0..0, Ahead::Bulk)
                };
                self.start_flights(i..chunks.end, urgent, ahead);
                continue;
            };
            if reader && flight.background() {
                // A reader waits on it now: no more yielding.
                flight.promoted.store(true, Ordering::Release);
                flight.promote.notify_one();
            }
            let mut rx = flight.progress.subscribe();
            let p = rx
                .wait_for(|p| p.done > i || p.finished)
                .await
                .map(|p| p.clone())
                .map_err(|_| ReadError::Integrity("fetch abandoned".into()))?;
            if p.done <= i
                && let Some(e) = p.error
            {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Starts flights for the missing chunks of `chunks` that nobody fetches yet.
    /// Runs that reach into `urgent` have a reader waiting; the others are background work,
    /// which never takes more than half of the remote's request slots, of the kind `ahead`.
    fn start_flights(self: &Arc<Self>, chunks: Range<u64>, urgent: Range<u64>, ahead: Ahead) {
        let Some(file) = &self.file else { return };
        let r = &self.reader;
        let whole = r.whole_file.load(Ordering::Acquire);
        let max_chunks = if whole {
            u64::MAX
        } else {
            (r.cfg.max_request / file.chunk_size()).max(1)
        };
        // A remote that ignores ranges sends the whole file to every GET: one GET then fills
        // everything missing from here to the end, instead of one GET (of the whole file) per
        // readahead step.
        let chunks = if whole { chunks.start..file.chunks() } else { chunks };
        let mut flights = self.flights.lock();
        // Missing chunks nobody fetches: copied from an older version of ours when it holds
        // the same bytes (under the lock, so no flight starts for them meanwhile), else fetched.
        let runs = plan::runs(chunks, max_chunks, |i| {
            !file.is_present(i) && !flights.iter().any(|f| f.chunks.contains(&i)) && !self.inherit(file, i, 0)
        });
        for run in runs {
            let (tx, _) = watch::channel(Progress {
                done: run.start,
                finished: false,
                error: None,
            });
            let background = run.end <= urgent.start || run.start >= urgent.end;
            let flight = Arc::new(Flight {
                chunks: run,
                progress: tx,
                ahead: background.then_some(ahead),
                promote: tokio::sync::Notify::new(),
                promoted: AtomicBool::new(false),
            });
            flights.push(flight.clone());
            r.rt.spawn(self.clone().fly(flight));
        }
    }

    /// Copies chunk `i` into `file` from the cache of the version this one was written from
    /// (or, recursively, of its own ancestors) when those bytes are the same and held there.
    fn inherit(&self, file: &CacheFile, i: u64, depth: u32) -> bool {
        let Some(inh) = &self.lineage else { return false };
        let range = file.chunk_range(i);
        if !inh
            .lineage
            .same
            .iter()
            .any(|s| s.start <= range.start && range.end <= s.end)
        {
            return false;
        }
        let from = inh.from.get_or_init(|| {
            let l = &inh.lineage;
            self.reader.cached_version(&self.path, &l.from_etag, l.from_size)
        });
        let Some(src) = from else { return false };
        let Some(sfile) = &src.file else { return false };
        if sfile.read_with(range.clone(), |_| ()).is_none() {
            if depth >= MAX_LINEAGE_DEPTH {
                return false;
            }
            let all = sfile
                .chunks_of(&range)
                .all(|j| sfile.is_ready(j) || src.inherit(sfile, j, depth + 1));
            if !all {
                return false;
            }
        }
        let Ok(mut w) = file.begin_chunk(i, self.chunk_hash(file, None)) else {
            return false;
        };
        let copied = sfile.read_with(range, |b| w.write(b).is_ok()).unwrap_or(false);
        let ok = copied && self.finish_chunk(file, w, None).is_ok();
        if ok {
            tracing::trace!(path = %self.path, chunk = i, "chunk copied from the version it was written from");
        }
        ok
    }

    /// Puts all of this version's bytes, fetched some other way (a folder's bundle), in the
    /// cache, checked against the tag where the tag says what the bytes are. Only for a
    /// version of one chunk nobody holds or fetches yet; returns whether it took them.
    pub fn fill_whole(&self, data: &[u8]) -> Result<bool, ReadError> {
        let Some(file) = &self.file else { return Ok(false) };
        if data.len() as u64 != self.size || self.size == 0 || file.chunks() != 1 {
            return Ok(false);
        }
        // Under the flights' lock, as `inherit`: no fetch of the chunk starts meanwhile (a
        // reader finds it present once the lock is free).
        let flights = self.flights.lock();
        if file.is_present(0) || flights.iter().any(|f| f.chunks.contains(&0)) {
            return Ok(false);
        }
        let Ok(mut w) = file.begin_chunk(0, self.chunk_hash(file, None)) else {
            // Claimed by a fetch meanwhile.
            return Ok(false);
        };
        w.write(data)?;
        self.finish_chunk(file, w, None)?;
        drop(flights);
        self.reader
            .count(|c| c.fetched_bytes.fetch_add(self.size, Ordering::Relaxed));
        if let Err(e) = file.persist(false) {
            tracing::warn!("{e}");
        }
        Ok(true)
    }

    /// Takes the answer of a `GET` made before this version was known ([`Reader::open_current`])
    /// as the fetch of the chunks it covers, when they are whole chunks nobody has yet.
    fn adopt(self: &Arc<Self>, resp: GetResponse, asked: Range<u64>) {
        let Some(file) = self.file.clone() else { return };
        if asked.is_empty() || asked.end > self.size {
            return;
        }
        let chunks = file.chunks_of(&asked);
        if file.chunk_range(chunks.start).start != asked.start || file.chunk_range(chunks.end - 1).end != asked.end {
            return;
        }
        let flight = {
            let mut flights = self.flights.lock();
            let taken = |i: u64| file.is_present(i) || flights.iter().any(|f| f.chunks.contains(&i));
            if chunks.clone().any(taken) {
                return;
            }
            let (tx, _) = watch::channel(Progress {
                done: chunks.start,
                finished: false,
                error: None,
            });
            let flight = Arc::new(Flight {
                chunks: chunks.clone(),
                progress: tx,
                ahead: None,
                promote: tokio::sync::Notify::new(),
                promoted: AtomicBool::new(false),
            });
            flights.push(flight.clone());
            flight
        };
        let v = self.clone();
        self.reader.rt.spawn(async move {
            let landing = Landing::new(&v, &flight);
            let result = async {
                file.reserve(&asked, false)?;
                let digests = v.digests().await?;
                let mut next = flight.chunks.start;
                v.fill(&file, &flight, &mut next, digests.as_deref(), resp, &asked)
                    .await
            }
            .await;
            landing.land(result);
        });
    }

    async fn fly(self: Arc<Self>, flight: Arc<Flight>) {
        let landing = Landing::new(&self, &flight);
        let result = self.fly_inner(&flight).await;
        landing.land(result);
    }

    /// A flight is over: readers waiting on it see how it ended.
    fn land(&self, flight: &Arc<Flight>, result: Result<(), ReadError>) {
        if let Err(e) = &result {
            match e {
                ReadError::Stale => tracing::info!(path = %self.path, "remote version changed while reading"),
                e => tracing::warn!(path = %self.path, chunks = ?flight.chunks, "fetch failed: {e}"),
            }
        }
        self.flights.lock().retain(|f| !Arc::ptr_eq(f, flight));
        flight.progress.send_modify(|p| {
            p.finished = true;
            p.error = result.err();
        });
    }

    async fn fly_inner(&self, flight: &Flight) -> Result<(), ReadError> {
        let r = &self.reader;
        let file = self.file.as_ref().expect("flights need a cache file");
        let bytes = file.chunk_range(flight.chunks.end - 1).end - file.chunk_range(flight.chunks.start).start;
        let _budget = r
            .budget
            .acquire_many((bytes.min(1 << 20) / UNIT).max(1) as u32)
            .await
            .map_err(|_| ReadError::Integrity("shutting down".into()))?;
        // Background work first waits for one of its own slots (half the remote's), so
        // readers always find the other half.
        let _background = match flight.background() {
            true => tokio::select! {
                p = r.slots.background() => Some(p.ok_or_else(|| ReadError::Integrity("shutting down".into()))?),
                _ = flight.promote.notified() => None,
            },
            false => None,
        };
        let _permit = r.request_permit().await?;
        let _foreground = (!flight.background()).then(|| Foreground::new(&r.foreground));
        let digests = self.digests().await?;
        let mut next = flight.chunks.start;
        let mut backoff = retry_delays(r.cfg.retries);
        loop {
            match self.fetch_run(file, flight, &mut next, digests.as_deref()).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() => match backoff.next() {
                    Some(d) => {
                        if matches!(e, ReadError::Remote(StoreError::Unavailable(_))) {
                            r.slots.overloaded();
                        }
                        tracing::debug!(path = %self.path, chunk = next, "retrying in {d:?}: {e}");
                        tokio::time::sleep(d).await;
                    }
                    None => return Err(e),
                },
                Err(e) => return Err(e),
            }
        }
    }

    /// One ranged GET for chunks `next..flight.chunks.end`; advances `next` as chunks land.
    async fn fetch_run(
        &self,
        file: &CacheFile,
        flight: &Flight,
        next: &mut u64,
        digests: Option<&Digests>,
    ) -> Result<(), ReadError> {
        let r = &self.reader;
        let asked = file.chunk_range(*next).start..file.chunk_range(flight.chunks.end - 1).end;
        // Disk blocks for the whole run at once: one extent, not one per chunk (a file read
        // later straight from the cache then reads as fast as a file written in one go).
        file.reserve(
            &asked,
            flight.background() || flight.chunks.end - flight.chunks.start > 1,
        )?;
        let whole = r.whole_file.load(Ordering::Acquire);
        let resp = r
            .store
            .get(&self.path, (!whole).then(|| asked.clone()), Some(&self.etag))
            .await
            .map_err(|e| self.store_error(e))?;
        self.fill(file, flight, next, digests, resp, &asked).await
    }

    /// Writes the body of `resp` (asked for `asked`, whose disk blocks the caller reserved)
    /// into chunks `next..flight.chunks.end`.
    async fn fill(
        &self,
        file: &CacheFile,
        flight: &Flight,
        next: &mut u64,
        digests: Option<&Digests>,
        resp: GetResponse,
        asked: &Range<u64>,
    ) -> Result<(), ReadError> {
        let r = &self.reader;
        let mut skip = self.check_response(&resp, asked)?;
        let mut body = resp.body;
        let hash = self.chunk_hash(file, digests);
        // The caller reserved the disk blocks of `asked`.
        let mut writer = file.begin_reserved(*next, hash)?;
        while let Some(piece) = body.next().await {
            // Bulk transfers hold back while a reader waits on another fetch (the remote's
            // and this machine's bandwidth go to the reader first).
            if flight.ahead == Some(Ahead::Bulk) && !flight.promoted.load(Ordering::Acquire) {
                let mut waited = 0;
                while r.foreground.load(Ordering::Acquire) > 0 && waited < 100 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    waited += 1;
                }
            }
            let mut piece = piece.map_err(|e| self.store_error(e))?;
            let n = skip.min(piece.len() as u64);
            piece.advance(n as usize);
            skip -= n;
            while !piece.is_empty() {
                let n = writer.remaining().min(piece.len() as u64) as usize;
                writer.push(piece.split_to(n))?;
                r.count(|c| c.fetched_bytes.fetch_add(n as u64, Ordering::Relaxed));
                r.slots.received(n as u64);
                if writer.remaining() == 0 {
                    self.finish_chunk(file, writer, digests)?;
                    *next += 1;
                    let done = *next;
                    flight.progress.send_modify(|p| p.done = done);
                    if let Err(e) = file.persist(false) {
                        tracing::warn!("{e}");
                    }
                    if done == flight.chunks.end {
                        return Ok(());
                    }
                    writer = file.begin_reserved(done, hash)?;
                }
            }
        }
        Err(ReadError::Remote(StoreError::BodyCut(format!(
            "{}: body ended in chunk {} of {:?}",
            self.path, next, flight.chunks
        ))))
    }

    fn store_error(&self, e: StoreError) -> ReadError {
        match e {
            StoreError::PreconditionFailed | StoreError::NotFound => {
                self.stale.store(true, Ordering::Release);
                ReadError::Stale
            }
            e => ReadError::Remote(e),
        }
    }

    /// Accepts a response only if it carries bytes of this version at the asked offsets.
    /// Returns how many leading bytes of the body to skip (for a whole-file answer).
    fn check_response(&self, resp: &GetResponse, asked: &Range<u64>) -> Result<u64, ReadError> {
        if let Some(t) = &resp.etag
            && *t != self.etag
        {
            tracing::warn!(path = %self.path, expected = %self.etag, got = %t, "the remote answered with another version");
            self.stale.store(true, Ordering::Release);
            return Err(ReadError::Stale);
        }
        match &resp.content {
            Content::Partial { range, total } => {
                // Every version has a tag (a file without one is versioned by the tag of its
                // first GET), so a part without one cannot be shown to belong to it.
                if resp.etag.is_none() {
                    return Err(ReadError::Integrity(
                        "a partial answer without an ETag cannot be matched to the version".into(),
                    ));
                }
                if total.is_some_and(|t| t != self.size) {
                    self.stale.store(true, Ordering::Release);
                    return Err(ReadError::Stale);
                }
                if range != asked {
                    return Err(ReadError::Integrity(format!(
                        "asked for bytes {asked:?}, the response carries {range:?}"
                    )));
                }
                Ok(0)
            }
            Content::Whole { size } => {
                // A 200 is the whole file; it is taken only when it provably is this version.
                if resp.etag.is_none() {
                    return Err(ReadError::Integrity(
                        "a 200 answer without an ETag cannot be matched to the version".into(),
                    ));
                }
                if size.is_some_and(|s| s != self.size) {
                    return Err(ReadError::Integrity(format!(
                        "a 200 answer of {size:?} bytes for a file of {}",
                        self.size
                    )));
                }
                if !self.reader.whole_file.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        remote = self.reader.store.id(),
                        "the remote answers ranged requests with whole files; reading whole files from now on"
                    );
                }
                Ok(asked.start)
            }
        }
    }

    /// Whether this version is one chunk whose digest the remote's tag vouches for (no
    /// request for its digests needed).
    fn checked_by_tag(&self, file: &CacheFile) -> bool {
        let caps = self.reader.store.capabilities();
        self.reader.cfg.verify
            && caps.etags_from_digests
            && caps.digest_chunk_size == Some(file.chunk_size())
            && file.chunks() == 1
    }

    /// How a chunk of this version is hashed: blake3 when the tag vouches for it (one chunk)
    /// or the remote's digests are blake3 only; otherwise CRC32C, checked against the
    /// remote's or only recorded (checked again when found on disk after a restart).
    fn chunk_hash(&self, file: &CacheFile, digests: Option<&Digests>) -> ChunkHash {
        match digests {
            _ if !self.reader.cfg.verify => ChunkHash::None,
            _ if self.checked_by_tag(file) => ChunkHash::Blake3,
            Some(d) if d.crc32c.is_none() => ChunkHash::Blake3,
            _ => ChunkHash::Crc32c,
        }
    }

    /// Publishes a chunk written with [`Version::chunk_hash`]`(file, digests)`, checked
    /// against the tag (one chunk) or the remote's digests when there are any.
    fn finish_chunk(&self, file: &CacheFile, w: ChunkWriter<'_>, digests: Option<&Digests>) -> Result<(), ChunkError> {
        if self.checked_by_tag(file) {
            let tag = self.etag.as_str().trim_matches('"');
            return w.finish_with(|sum| {
                matches!(sum, ChunkSum::Blake3(d)
                    if crate::protocol::etag_from_digests(self.size, file.chunk_size(), &[*d]) == tag)
            });
        }
        let i = w.index() as usize;
        w.finish(digests.and_then(|d| match &d.crc32c {
            Some(c) => c.get(i).copied().map(ChunkSum::Crc32c),
            None => d.digests.get(i).copied().map(ChunkSum::Blake3),
        }))
    }

    /// The remote's chunk digests of this version, fetched once, when the remote offers them
    /// at the cache's chunk size.
    async fn digests(&self) -> Result<Option<Arc<Digests>>, ReadError> {
        let r = &self.reader;
        let Some(file) = &self.file else { return Ok(None) };
        if !r.cfg.verify || r.store.capabilities().digest_chunk_size != Some(file.chunk_size()) {
            return Ok(None);
        }
        if self.checked_by_tag(file) {
            // One chunk: its digest is checked against the tag itself.
            return Ok(None);
        }
        let got = self
            .digests
            .get_or_try_init(|| async {
                match r.store.digests(&self.path, &self.etag).await {
                    Ok(Some(d)) if d.digests.len() as u64 == file.chunks() => Ok(Some(Arc::new(d))),
                    Ok(_) => Ok(None),
                    Err(e) => Err(self.store_error(e)),
                }
            })
            .await;
        match got {
            Ok(d) => Ok(d.clone()),
            Err(ReadError::Stale) => Err(ReadError::Stale),
            Err(e) => {
                tracing::warn!(path = %self.path, "no chunk digests, checking length and ETag only: {e}");
                Ok(None)
            }
        }
    }

    /// Reads `range` straight from the remote into memory (no cache file, or a full disk).
    async fn read_direct<R>(&self, range: Range<u64>, reply: impl FnOnce(Result<&[u8], ReadError>) -> R) -> R {
        if range.is_empty() {
            return reply(Ok(&[]));
        }
        let r = &self.reader;
        let len = range.end - range.start;
        let units = len.div_ceil(UNIT).max(1).min(r.budget_units() as u64) as u32;
        let Ok(_budget) = r.budget.acquire_many(units).await else {
            return reply(Err(ReadError::Integrity("shutting down".into())));
        };
        let mut backoff = retry_delays(r.cfg.retries);
        loop {
            match self.fetch_direct(&range).await {
                Ok(buf) => return reply(Ok(&buf)),
                Err(e) if e.is_transient() => match backoff.next() {
                    Some(d) => tokio::time::sleep(d).await,
                    None => return reply(Err(e)),
                },
                Err(e) => return reply(Err(e)),
            }
        }
    }

    async fn fetch_direct(&self, range: &Range<u64>) -> Result<BytesMut, ReadError> {
        let r = &self.reader;
        let _permit = r.request_permit().await?;
        let whole = r.whole_file.load(Ordering::Acquire);
        let resp = r
            .store
            .get(&self.path, (!whole).then(|| range.clone()), Some(&self.etag))
            .await
            .map_err(|e| self.store_error(e))?;
        let mut skip = self.check_response(&resp, range)?;
        let want = (range.end - range.start) as usize;
        let mut buf = BytesMut::with_capacity(want);
        let mut body = resp.body;
        while let Some(piece) = body.next().await {
            let mut piece = piece.map_err(|e| self.store_error(e))?;
            let n = skip.min(piece.len() as u64);
            piece.advance(n as usize);
            skip -= n;
            let take = piece.len().min(want - buf.len());
            buf.extend_from_slice(&piece[..take]);
            r.count(|c| c.fetched_bytes.fetch_add(take as u64, Ordering::Relaxed));
            if buf.len() == want {
                return Ok(buf);
            }
        }
        Err(ReadError::Remote(StoreError::BodyCut(format!(
            "{}: body ended after {} of {want} bytes",
            self.path,
            buf.len()
        ))))
    }
}

impl Drop for Version {
    fn drop(&mut self) {
        let key = (std::mem::take(&mut self.path), self.etag.clone());
        let mut map = self.reader.versions.lock();
        if map.get(&key).is_some_and(|w| w.strong_count() == 0) {
            map.remove(&key);
        }
    }
}

impl Reader {
    fn budget_units(&self) -> usize {
        (self.cfg.memory_budget / UNIT).max(1) as usize
    }
}

/// A job that checks the chunks of `chunks` found on disk but not yet checked in this
/// process (after a restart), or `None` when there are none.
fn verifier(file: &Arc<CacheFile>, chunks: Range<u64>) -> Option<impl FnOnce() + Send + 'static> {
    let todo: Vec<u64> = chunks.filter(|&i| file.is_present(i) && !file.is_ready(i)).collect();
    let file = file.clone();
    (!todo.is_empty()).then_some(move || {
        for i in todo {
            file.verify(i);
        }
    })
}

/// Delays between tries of a transfer: exponential with jitter, `retries` of them.
fn retry_delays(retries: usize) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(retries)
        .build()
}

#[cfg(test)]
mod tests;
