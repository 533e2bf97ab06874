//! Per-chunk blake3 digests of served files, the ETag derived from them, and where they are
//! kept: a bounded in-memory memo for every file and a sidecar on disk for large ones.
//!
//! Owns the rule that a tag always belongs to one file version: digests are keyed on the
//! file's path and its [`Identity`] `(ino, size, mtime_ns, ctime_ns)`, hashing checks the
//! identity before and after reading, and concurrent requests for the same unhashed version
//! share one hashing job. Does not decide what a request gets; the handlers do.
//!
//! Hashing a file also cuts it into content-defined chunks (one read, `scan.rs`); the chunk
//! list is kept beside the digests (memo and sidecar) and handed to the chunk index.
//! Writes install the digests of the version they made (`install`), so nothing is hashed
//! again after a write. A commit of parts written in place installs the digests alone and
//! leaves the chunks to a bounded background job (`chunk_in_background`); a request for them
//! meanwhile shares the job (one chunking job per version).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::chunks::ChunkIndex;
use super::error::ServerError;
use super::scan::{self, ChunkSums};
use crate::protocol::{CdcChunk, DIGEST_CHUNK_SIZE, etag_from_digests};

/// Files up to this size are hashed on demand and get no sidecar.
pub const SMALL_FILE_MAX: u64 = 8 << 20;
/// How often a request re-reads a file that changed while it was hashed before `503 busy`.
const HASH_ATTEMPTS: u32 = 4;
/// Background hashing started by listings, and background chunking after commits of parts
/// written in place, run at most this many files at once (together)...
const BACKGROUND_JOBS: usize = 2;
/// ...and remembers at most this many files waiting for a turn.
const BACKGROUND_QUEUE_MAX: usize = 4096;
/// Bounds of the memo: entries, and digests summed over entries (32 bytes each).
const MEMO_MAX_ENTRIES: usize = 100_000;
const MEMO_MAX_DIGESTS: usize = 1 << 20;
/// Sidecar format: 1 had digests only, 2 added the content-defined chunks, 3 the CRC32C of
/// each chunk. A sidecar older than 3 is not read: its file is hashed again.
const SIDECAR_FORMAT: u32 = 3;

/// The version of a file that a set of digests describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl Identity {
    pub fn of(meta: &Metadata) -> Identity {
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        Identity {
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// `fstat` of an open file.
    pub fn of_file(file: &File) -> io::Result<Identity> {
        Ok(Identity::of(&file.metadata()?))
    }

    /// mtime in whole seconds, the precision of `Last-Modified`.
    pub fn mtime_secs(&self) -> i64 {
        self.mtime_ns.div_euclid(1_000_000_000)
    }
}

/// The digests of one file version and its tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigests {
    pub identity: Identity,
    pub chunk_size: u64,
    pub digests: ChunkSums,
    /// Without quotes.
    pub etag: String,
    /// The content-defined chunks, when known (a commit of parts written in place leaves them
    /// to a background job).
    pub cdc: Option<Arc<Vec<CdcChunk>>>,
}

impl FileDigests {
    pub fn new(identity: Identity, digests: ChunkSums) -> FileDigests {
        let etag = etag_from_digests(identity.size, DIGEST_CHUNK_SIZE, &digests.blake3);
        FileDigests {
            identity,
            chunk_size: DIGEST_CHUNK_SIZE,
            digests,
            etag,
            cdc: None,
        }
    }

    pub fn with_cdc(mut self, cdc: Vec<CdcChunk>) -> FileDigests {
        self.cdc = Some(Arc::new(cdc));
        self
    }

    /// What the entry costs in the memo's budget (digests and chunks alike).
    fn weight(&self) -> usize {
        self.digests.blake3.len() + self.cdc.as_ref().map_or(0, |c| c.len())
    }

    pub fn hex_digests(&self) -> Vec<String> {
        self.digests.blake3.iter().map(hex::encode).collect()
    }

    /// The CRC32C of each chunk, 8 hex digits each (`DigestList::crc32c`).
    pub fn hex_crc32c(&self) -> Vec<String> {
        self.digests.crc32c.iter().map(|c| format!("{c:08x}")).collect()
    }
}

/// On-disk form of a sidecar (`<state>/digests/<2 hex>/<blake3(path) hex>.json`).
#[derive(Debug, Serialize, Deserialize)]
struct Sidecar {
    /// Absent in format 1.
    #[serde(default = "format_one")]
    format: u32,
    path: String,
    #[serde(flatten)]
    identity: Identity,
    chunk_size: u64,
    digests: Vec<String>,
    etag: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cdc: Option<Vec<CdcChunk>>,
    /// Absent before format 3.
    #[serde(default)]
    crc32c: Vec<u32>,
}

fn format_one() -> u32 {
    1
}

/// Whether `cdc` tiles `0..size` exactly, as a chunk list read from disk must.
fn tiles(cdc: &[CdcChunk], size: u64) -> bool {
    let mut at = 0;
    for c in cdc {
        if c.offset != at || c.len == 0 || c.hash.len() != 64 {
            return false;
        }
        at += c.len;
    }
    at == size
}

/// Why one hashing job gave no digests; cloneable so every waiter of a shared job gets it.
#[derive(Debug, Clone)]
enum JobError {
    /// The file is not the version the job was asked for (any more).
    Changed,
    Failed(io::ErrorKind, Arc<str>),
}

type Job = Shared<BoxFuture<'static, Result<Arc<FileDigests>, JobError>>>;

/// Memo of digests keyed on path, each valid for the identity it holds; evicts oldest first.
#[derive(Default)]
struct Memo {
    map: HashMap<PathBuf, (u64, Arc<FileDigests>)>,
    order: VecDeque<(u64, PathBuf)>,
    next_gen: u64,
    digests: usize,
}

impl Memo {
    fn get(&self, rel: &Path, id: Identity) -> Option<Arc<FileDigests>> {
        let (_, d) = self.map.get(rel)?;
        (d.identity == id).then(|| Arc::clone(d))
    }

    fn insert(&mut self, rel: &Path, d: Arc<FileDigests>) {
        let gen_ = self.next_gen;
        self.next_gen += 1;
        self.digests += d.weight();
        if let Some((_, old)) = self.map.insert(rel.to_path_buf(), (gen_, d)) {
            self.digests -= old.weight();
        }
        self.order.push_back((gen_, rel.to_path_buf()));
        while self.map.len() > MEMO_MAX_ENTRIES || self.digests > MEMO_MAX_DIGESTS {
            let Some((g, p)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&p).is_some_and(|(cur, _)| *cur == g)
                && let Some((_, old)) = self.map.remove(&p)
            {
                self.digests -= old.weight();
            }
        }
        // Superseded entries leave stale keys in `order`; drop them once they dominate.
        if self.order.len() > 2 * self.map.len() + 1024 {
            let map = &self.map;
            self.order.retain(|(g, p)| map.get(p).is_some_and(|(cur, _)| cur == g));
        }
    }

    fn remove(&mut self, rel: &Path) {
        if let Some((_, old)) = self.map.remove(rel) {
            self.digests -= old.weight();
        }
    }

    /// Entries at `from` or under it move to `to` (a moved file or folder).
    fn rekey(&mut self, from: &Path, to: &Path) {
        let moved: Vec<PathBuf> = self.map.keys().filter(|p| p.starts_with(from)).cloned().collect();
        for p in moved {
            if let (Some((_, d)), Ok(rest)) = (self.map.remove(&p), p.strip_prefix(from)) {
                self.digests -= d.weight();
                let dest = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
                self.insert(&dest, d);
            }
        }
    }
}

/// Digests of the served files: memo, sidecars, shared hashing jobs, background hashing.
pub struct DigestStore {
    /// `<state>/digests`, or `None` when sidecars are off (state folder not writable).
    sidecar_dir: Option<PathBuf>,
    sidecar_broken: AtomicBool,
    memo: Mutex<Memo>,
    inflight: Mutex<HashMap<(PathBuf, Identity), Job>>,
    /// Jobs cutting a version whose digests are known into content-defined chunks.
    chunking: Mutex<HashMap<(PathBuf, Identity), Job>>,
    background: Arc<Semaphore>,
    background_queue: Mutex<HashSet<PathBuf>>,
    /// Versions waiting for [`Self::chunk_in_background`], bounded like `background_queue`.
    chunk_queue: Mutex<HashSet<(PathBuf, Identity)>>,
    hashed: AtomicU64,
    /// Bytes read to hash or chunk (whole files and the parts of files after writes).
    bytes_hashed: AtomicU64,
    index: Arc<ChunkIndex>,
    /// The served folder: a hash is remembered only while the path still has that version.
    root: Option<PathBuf>,
}

impl DigestStore {
    /// Prepares `<state_dir>/digests`; when it cannot be created the store warns once and keeps
    /// digests in memory only.
    #[cfg(test)]
    pub fn new(state_dir: &Path) -> DigestStore {
        DigestStore::with_index(state_dir, None, Arc::new(ChunkIndex::default()))
    }

    /// A store that feeds `index` and, given the served folder `root`, checks that a path
    /// still has the version just hashed before remembering it.
    pub fn with_index(state_dir: &Path, root: Option<PathBuf>, index: Arc<ChunkIndex>) -> DigestStore {
        let dir = state_dir.join("digests");
        let sidecar_dir = match std::fs::create_dir_all(&dir).and_then(|()| probe_writable(&dir)) {
            Ok(()) => Some(dir),
            Err(e) => {
                tracing::warn!(
                    dir = %dir.display(),
                    error = %e,
                    "state folder not writable; keeping digests in memory only"
                );
                None
            }
        };
        DigestStore {
            sidecar_dir,
            sidecar_broken: AtomicBool::new(false),
            memo: Mutex::new(Memo::default()),
            inflight: Mutex::new(HashMap::new()),
            chunking: Mutex::new(HashMap::new()),
            background: Arc::new(Semaphore::new(BACKGROUND_JOBS)),
            background_queue: Mutex::new(HashSet::new()),
            chunk_queue: Mutex::new(HashSet::new()),
            hashed: AtomicU64::new(0),
            bytes_hashed: AtomicU64::new(0),
            index,
            root,
        }
    }

    pub fn index(&self) -> &Arc<ChunkIndex> {
        &self.index
    }

    /// Bytes read to hash or chunk files since the start.
    #[cfg(test)]
    pub fn bytes_hashed(&self) -> u64 {
        self.bytes_hashed.load(Ordering::Relaxed)
    }

    pub fn count_hashed(&self, bytes: u64) {
        self.bytes_hashed.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Keeps `d` as the digests of `rel` (memo, chunk index, and a sidecar for a large file).
    /// Writes call this with the version they made, before answering; without a chunk list,
    /// what the index held for `rel` goes (the chunks come later, see
    /// [`Self::chunk_in_background`]). Blocking.
    pub fn install(&self, rel: &Path, d: FileDigests) -> Arc<FileDigests> {
        let d = Arc::new(d);
        if d.cdc.is_none() {
            self.index.remove_file(rel);
        }
        self.remember(rel, &d);
        if d.identity.size > SMALL_FILE_MAX {
            self.write_sidecar(rel, &d);
        } else if let Some(p) = self.sidecar_path(rel) {
            let _ = std::fs::remove_file(p);
        }
        d
    }

    /// Forgets `rel` (removed, or about to be replaced by a version `install` describes).
    /// Blocking.
    pub fn forget(&self, rel: &Path) {
        self.memo.lock().remove(rel);
        self.index.remove_file(rel);
        if let Some(p) = self.sidecar_path(rel) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// `from` (a file or a folder) was renamed to `to`: what is known moves along. Sidecars
    /// stay keyed on the old paths; a moved file is `install`ed again by the caller.
    pub fn renamed(&self, from: &Path, to: &Path) {
        self.memo.lock().rekey(from, to);
        self.index.rekey(from, to);
    }

    fn remember(&self, rel: &Path, d: &Arc<FileDigests>) {
        self.memo.lock().insert(rel, Arc::clone(d));
        if let Some(cdc) = &d.cdc {
            self.index.set_file(rel, d.identity, cdc);
        }
    }

    /// Whether `rel` in the served folder has version `id` now (always true without a root).
    fn is_current(&self, rel: &Path, id: Identity) -> bool {
        self.root
            .as_ref()
            .is_none_or(|root| std::fs::metadata(root.join(rel)).is_ok_and(|m| Identity::of(&m) == id))
    }

    /// The digests of `file`'s version together with its content-defined chunks, computing
    /// the chunks when only the digests were known (a commit that left them to the
    /// background). Concurrent requests for the chunks of one version share one job.
    pub async fn get_with_chunks(
        self: &Arc<Self>,
        rel: &Path,
        file: &Arc<File>,
    ) -> Result<(Arc<FileDigests>, Arc<Vec<CdcChunk>>), ServerError> {
        let d = self.get(rel, file).await?;
        if let Some(cdc) = &d.cdc {
            return Ok((Arc::clone(&d), Arc::clone(cdc)));
        }
        let shown = rel.display().to_string();
        let d = self.chunk_job(rel, file, d).await.map_err(|e| match e {
            JobError::Changed => ServerError::Busy(format!("{shown} changed while it was chunked")),
            JobError::Failed(kind, msg) => ServerError::io(&shown, io::Error::new(kind, msg.to_string())),
        })?;
        let cdc = d.cdc.clone().unwrap_or_default();
        Ok((d, cdc))
    }

    /// Joins the job cutting version `old` of `rel` into content-defined chunks, starting it
    /// when there is none.
    async fn chunk_job(
        self: &Arc<Self>,
        rel: &Path,
        file: &Arc<File>,
        old: Arc<FileDigests>,
    ) -> Result<Arc<FileDigests>, JobError> {
        let key = (rel.to_path_buf(), old.identity);
        let job = {
            let mut chunking = self.chunking.lock();
            match chunking.get(&key) {
                Some(job) => job.clone(),
                None => {
                    let (store, f, key2) = (Arc::clone(self), Arc::clone(file), key.clone());
                    let task = tokio::spawn(async move {
                        let (s, k) = (Arc::clone(&store), key2.clone());
                        let res = tokio::task::spawn_blocking(move || s.chunk_version(&k.0, &f, old))
                            .await
                            .unwrap_or_else(|e| Err(JobError::Failed(io::ErrorKind::Other, e.to_string().into())));
                        store.chunking.lock().remove(&key2);
                        res
                    });
                    let job: Job = task
                        .map(|r| {
                            r.unwrap_or_else(|e| Err(JobError::Failed(io::ErrorKind::Other, e.to_string().into())))
                        })
                        .boxed()
                        .shared();
                    chunking.insert(key, job.clone());
                    job
                }
            }
        };
        job.await
    }

    /// Body of a chunking job: cuts version `old` of `file` into content-defined chunks and
    /// keeps them (memo, index, sidecar) while `rel` still has that version. Blocking.
    fn chunk_version(&self, rel: &Path, file: &File, old: Arc<FileDigests>) -> Result<Arc<FileDigests>, JobError> {
        if let Some(d) = self.memo.lock().get(rel, old.identity)
            && d.cdc.is_some()
        {
            return Ok(d);
        }
        let failed = |e: io::Error| JobError::Failed(e.kind(), e.to_string().into());
        let cdc = match scan::chunk_file(file, old.identity.size) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(JobError::Changed),
            Err(e) => return Err(failed(e)),
        };
        if Identity::of_file(file).map_err(failed)? != old.identity {
            return Err(JobError::Changed);
        }
        self.count_hashed(old.identity.size);
        let d = Arc::new(FileDigests::clone(&old).with_cdc(cdc));
        if self.is_current(rel, d.identity) {
            self.remember(rel, &d);
            if d.identity.size > SMALL_FILE_MAX {
                self.write_sidecar(rel, &d);
            }
        }
        Ok(d)
    }

    /// Cuts the version `file` (the current one of `rel`) into content-defined chunks in the
    /// background, with at most [`BACKGROUND_JOBS`] background jobs at once and at most
    /// [`BACKGROUND_QUEUE_MAX`] versions waiting (more are left to be chunked when asked for).
    /// A request for the chunks meanwhile joins the job, or starts it.
    pub fn chunk_in_background(self: &Arc<Self>, rel: PathBuf, file: Arc<File>) {
        let Ok(id) = Identity::of_file(&file) else {
            return;
        };
        let key = (rel, id);
        {
            let mut queue = self.chunk_queue.lock();
            if queue.len() >= BACKGROUND_QUEUE_MAX || !queue.insert(key.clone()) {
                return;
            }
        }
        let store = Arc::clone(self);
        tokio::spawn(async move {
            // A version replaced (or forgotten) before its turn is not worth reading.
            if let Ok(_permit) = Arc::clone(&store.background).acquire_owned().await
                && store.memo.lock().get(&key.0, key.1).is_some()
                && let Err(e) = store.get_with_chunks(&key.0, &file).await
            {
                tracing::debug!(path = %key.0.display(), error = %e, "background chunking failed");
            }
            store.chunk_queue.lock().remove(&key);
        });
    }

    /// Waits (at most `max`) until the versions left to background chunking after commits
    /// are chunked, so that `has-chunks` does not deny chunks of a file just written.
    pub async fn settle_chunking(&self, max: std::time::Duration) {
        let end = std::time::Instant::now() + max;
        while !self.chunk_queue.lock().is_empty() && std::time::Instant::now() < end {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Holds every background slot until the permit is dropped (tests look at what a write
    /// left to the background before it runs).
    #[cfg(test)]
    pub async fn hold_background(&self) -> tokio::sync::OwnedSemaphorePermit {
        Arc::clone(&self.background)
            .acquire_many_owned(BACKGROUND_JOBS as u32)
            .await
            .unwrap()
    }

    /// How many times a file was actually read and hashed (not found in memo or sidecar).
    #[cfg(test)]
    pub fn files_hashed(&self) -> u64 {
        self.hashed.load(Ordering::Relaxed)
    }

    /// The digests of the version `file` (opened from `rel`) has now. Retries when the file
    /// changes while it is hashed, then gives up with `busy`.
    pub async fn get(self: &Arc<Self>, rel: &Path, file: &Arc<File>) -> Result<Arc<FileDigests>, ServerError> {
        for attempt in 0..HASH_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
            }
            let id = Identity::of_file(file).map_err(|e| ServerError::io(rel.display().to_string(), e))?;
            if let Some(d) = self.memo.lock().get(rel, id) {
                return Ok(d);
            }
            match self.job(rel, file, id).await {
                Ok(d) => return Ok(d),
                Err(JobError::Changed) => continue,
                Err(JobError::Failed(kind, msg)) => {
                    return Err(ServerError::io(
                        format!("hashing {}", rel.display()),
                        io::Error::new(kind, msg.to_string()),
                    ));
                }
            }
        }
        Err(ServerError::Busy(format!(
            "{} kept changing while it was hashed",
            rel.display()
        )))
    }

    /// Digests known without hashing (memo, then a valid sidecar). Blocking.
    pub fn known_blocking(&self, rel: &Path, id: Identity) -> Option<Arc<FileDigests>> {
        if let Some(d) = self.memo.lock().get(rel, id) {
            return Some(d);
        }
        if id.size <= SMALL_FILE_MAX {
            return None;
        }
        let d = Arc::new(self.read_sidecar(rel, id)?);
        self.remember(rel, &d);
        Some(d)
    }

    /// Queues `canon` (served as `rel`) for hashing with at most [`BACKGROUND_JOBS`] at once.
    pub fn hash_in_background(self: &Arc<Self>, rel: PathBuf, canon: PathBuf) {
        {
            let mut queue = self.background_queue.lock();
            if queue.len() >= BACKGROUND_QUEUE_MAX || !queue.insert(rel.clone()) {
                return;
            }
        }
        let store = Arc::clone(self);
        tokio::spawn(async move {
            let result = async {
                let _permit = Arc::clone(&store.background)
                    .acquire_owned()
                    .await
                    .map_err(|e| ServerError::Internal(e.to_string()))?;
                let file = tokio::task::spawn_blocking(move || super::paths::open_canonical(&canon))
                    .await
                    .map_err(|e| ServerError::Internal(e.to_string()))?
                    .map_err(|e| ServerError::io(rel.display().to_string(), e))?;
                store.get(&rel, &Arc::new(file)).await
            }
            .await;
            if let Err(e) = result {
                tracing::debug!(path = %rel.display(), error = %e, "background hashing failed");
            }
            store.background_queue.lock().remove(&rel);
        });
    }

    /// Joins the job hashing `(rel, id)`, starting it when there is none.
    async fn job(self: &Arc<Self>, rel: &Path, file: &Arc<File>, id: Identity) -> Result<Arc<FileDigests>, JobError> {
        let key = (rel.to_path_buf(), id);
        let job = {
            let mut inflight = self.inflight.lock();
            match inflight.get(&key) {
                Some(job) => job.clone(),
                None => {
                    let store = Arc::clone(self);
                    let file = Arc::clone(file);
                    let key2 = key.clone();
                    let task = tokio::spawn(async move {
                        let s = Arc::clone(&store);
                        let k = key2.clone();
                        let res = tokio::task::spawn_blocking(move || s.load_or_hash(&k.0, &file, k.1))
                            .await
                            .unwrap_or_else(|e| Err(JobError::Failed(io::ErrorKind::Other, e.to_string().into())));
                        store.inflight.lock().remove(&key2);
                        res
                    });
                    let job: Job = task
                        .map(|r| {
                            r.unwrap_or_else(|e| Err(JobError::Failed(io::ErrorKind::Other, e.to_string().into())))
                        })
                        .boxed()
                        .shared();
                    inflight.insert(key, job.clone());
                    job
                }
            }
        };
        job.await
    }

    /// Body of a hashing job: memo, then sidecar, then reading the file. Blocking.
    fn load_or_hash(&self, rel: &Path, file: &File, id: Identity) -> Result<Arc<FileDigests>, JobError> {
        if let Some(d) = self.known_blocking(rel, id) {
            return Ok(d);
        }
        let d = Arc::new(hash_file(file, id)?);
        self.hashed.fetch_add(1, Ordering::Relaxed);
        self.count_hashed(id.size);
        // A write may have replaced the path meanwhile; its digests must not be displaced.
        if self.is_current(rel, id) {
            self.remember(rel, &d);
            if id.size > SMALL_FILE_MAX {
                self.write_sidecar(rel, &d);
            }
        }
        Ok(d)
    }

    fn sidecar_path(&self, rel: &Path) -> Option<PathBuf> {
        if self.sidecar_broken.load(Ordering::Relaxed) {
            return None;
        }
        let dir = self.sidecar_dir.as_ref()?;
        let name = blake3::hash(rel.as_os_str().as_bytes()).to_hex();
        Some(dir.join(&name[..2]).join(format!("{name}.json")))
    }

    fn read_sidecar(&self, rel: &Path, id: Identity) -> Option<FileDigests> {
        let path = self.sidecar_path(rel)?;
        let bytes = std::fs::read(&path).ok()?;
        let sc: Sidecar = serde_json::from_slice(&bytes).ok()?;
        let chunks = id.size.div_ceil(DIGEST_CHUNK_SIZE);
        if sc.path != rel.to_string_lossy()
            || sc.identity != id
            || sc.chunk_size != DIGEST_CHUNK_SIZE
            || sc.digests.len() as u64 != chunks
            || sc.crc32c.len() as u64 != chunks
            || sc.format < SIDECAR_FORMAT
        {
            return None;
        }
        let blake3 = sc
            .digests
            .iter()
            .map(|h| {
                let mut d = [0u8; 32];
                hex::decode_to_slice(h, &mut d).ok().map(|()| d)
            })
            .collect::<Option<Vec<_>>>()?;
        let mut d = FileDigests::new(
            id,
            ChunkSums {
                blake3,
                crc32c: sc.crc32c,
            },
        );
        if d.etag != sc.etag {
            return None;
        }
        if let Some(cdc) = sc.cdc
            && tiles(&cdc, id.size)
        {
            d = d.with_cdc(cdc);
        }
        Some(d)
    }

    /// Writes the sidecar atomically (temp file + rename); on failure warns once and stops
    /// using sidecars.
    fn write_sidecar(&self, rel: &Path, d: &FileDigests) {
        let Some(path) = self.sidecar_path(rel) else {
            return;
        };
        let sc = Sidecar {
            format: SIDECAR_FORMAT,
            path: rel.to_string_lossy().into_owned(),
            identity: d.identity,
            chunk_size: d.chunk_size,
            digests: d.hex_digests(),
            etag: d.etag.clone(),
            cdc: d.cdc.as_ref().map(|c| c.to_vec()),
            crc32c: d.digests.crc32c.clone(),
        };
        if let Err(e) = write_atomically(&path, &sc)
            && !self.sidecar_broken.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                path = %path.display(),
                error = %e,
                "cannot write digest sidecar; keeping digests in memory only"
            );
        }
    }
}

fn probe_writable(dir: &Path) -> io::Result<()> {
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}

fn write_atomically(path: &Path, sc: &Sidecar) -> io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let parent = path
        .parent()
        .ok_or_else(|| io::Error::other("sidecar path has no parent"))?;
    std::fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let json = serde_json::to_vec(sc).map_err(io::Error::other)?;
    let res = std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, path));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Hashes each chunk of `file` and cuts it into content-defined chunks (one read); the file
/// must stay at identity `id` from before the first read to after the last one.
fn hash_file(file: &File, id: Identity) -> Result<FileDigests, JobError> {
    let failed = |e: io::Error| JobError::Failed(e.kind(), e.to_string().into());
    if Identity::of_file(file).map_err(failed)? != id {
        return Err(JobError::Changed);
    }
    let found = match scan::scan(file, id.size, Vec::new()) {
        Ok(s) => s,
        // Shorter than its size said: truncated under us.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(JobError::Changed),
        Err(e) => return Err(failed(e)),
    };
    if Identity::of_file(file).map_err(failed)? != id {
        return Err(JobError::Changed);
    }
    Ok(FileDigests::new(id, found.digests).with_cdc(found.cdc))
}

/// `pread` until `buf` is full or end of file; returns the bytes read.
pub fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::chunk_digests;

    fn write(dir: &Path, name: &str, data: &[u8]) -> (PathBuf, Arc<File>) {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        (PathBuf::from(name), Arc::new(File::open(&p).unwrap()))
    }

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test]
    async fn digests_match_the_protocol_and_are_memoised() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(DigestStore::new(&tmp.path().join("state")));
        let bytes = data(3 * (1 << 20) + 17, 1);
        let (rel, file) = write(tmp.path(), "f", &bytes);
        let d = store.get(&rel, &file).await.unwrap();
        let want = chunk_digests(&bytes, DIGEST_CHUNK_SIZE);
        assert_eq!(d.digests, ChunkSums::of(&bytes));
        assert_eq!(d.etag, etag_from_digests(bytes.len() as u64, DIGEST_CHUNK_SIZE, &want));
        store.get(&rel, &file).await.unwrap();
        assert_eq!(store.files_hashed(), 1);
        // Small: no sidecar.
        assert!(store.sidecar_path(&rel).is_some_and(|p| !p.exists()));
    }

    #[tokio::test]
    async fn empty_file_has_no_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(DigestStore::new(&tmp.path().join("state")));
        let (rel, file) = write(tmp.path(), "e", b"");
        let d = store.get(&rel, &file).await.unwrap();
        assert!(d.digests.blake3.is_empty() && d.digests.crc32c.is_empty());
        assert_eq!(d.etag, etag_from_digests(0, DIGEST_CHUNK_SIZE, &[]));
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_job_and_large_files_get_a_sidecar() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let store = Arc::new(DigestStore::new(&state));
        let bytes = data(SMALL_FILE_MAX as usize + 5, 2);
        let (rel, file) = write(tmp.path(), "big", &bytes);
        let gets = (0..8).map(|_| store.get(&rel, &file));
        let all = futures_util::future::join_all(gets).await;
        let first = all[0].as_ref().unwrap().clone();
        for d in &all {
            assert_eq!(d.as_ref().unwrap().etag, first.etag);
        }
        assert_eq!(store.files_hashed(), 1);
        let sidecar = store.sidecar_path(&rel).unwrap();
        assert!(sidecar.exists());

        // A second store (a restarted server) reads the sidecar instead of hashing.
        let again = Arc::new(DigestStore::new(&state));
        let d = again.get(&rel, &file).await.unwrap();
        assert_eq!(d.etag, first.etag);
        assert_eq!(again.files_hashed(), 0);
        let id = Identity::of_file(&file).unwrap();
        assert!(again.known_blocking(&rel, id).is_some());

        // A sidecar whose identity no longer matches is ignored.
        let other = Identity {
            ctime_ns: id.ctime_ns + 1,
            ..id
        };
        assert!(again.read_sidecar(&rel, other).is_none());
    }

    #[tokio::test]
    async fn tampered_sidecar_is_not_trusted() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let store = Arc::new(DigestStore::new(&state));
        let bytes = data(SMALL_FILE_MAX as usize + 1, 3);
        let (rel, file) = write(tmp.path(), "big", &bytes);
        let d = store.get(&rel, &file).await.unwrap();
        let path = store.sidecar_path(&rel).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let first = hex::encode(d.digests.blake3[0]);
        std::fs::write(&path, text.replace(&first, &"0".repeat(64))).unwrap();
        let again = DigestStore::new(&state);
        assert!(again.read_sidecar(&rel, d.identity).is_none());
    }

    #[tokio::test]
    async fn a_sidecar_without_crc32c_is_hashed_again() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let store = Arc::new(DigestStore::new(&state));
        let bytes = data(SMALL_FILE_MAX as usize + 1, 5);
        let (rel, file) = write(tmp.path(), "big", &bytes);
        let d = store.get(&rel, &file).await.unwrap();
        let path = store.sidecar_path(&rel).unwrap();
        let mut sc: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert!(DigestStore::new(&state).read_sidecar(&rel, d.identity).is_some());
        // As a server before CRC32C wrote it.
        sc["format"] = 2.into();
        sc.as_object_mut().unwrap().remove("crc32c");
        std::fs::write(&path, serde_json::to_vec(&sc).unwrap()).unwrap();
        let again = Arc::new(DigestStore::new(&state));
        assert!(again.read_sidecar(&rel, d.identity).is_none());
        let fresh = again.get(&rel, &file).await.unwrap();
        assert_eq!(again.files_hashed(), 1);
        assert_eq!(fresh.digests, ChunkSums::of(&bytes));
        assert_eq!(fresh.etag, d.etag);
    }

    #[tokio::test]
    async fn unwritable_state_keeps_memory_only() {
        let tmp = tempfile::tempdir().unwrap();
        // A file where the state folder should be: it cannot be created.
        let state = tmp.path().join("state");
        std::fs::write(&state, b"").unwrap();
        let store = Arc::new(DigestStore::new(&state));
        assert!(store.sidecar_dir.is_none());
        let bytes = data(SMALL_FILE_MAX as usize + 1, 4);
        let (rel, file) = write(tmp.path(), "big", &bytes);
        let d = store.get(&rel, &file).await.unwrap();
        assert_eq!(d.digests.blake3, chunk_digests(&bytes, DIGEST_CHUNK_SIZE));
        store.get(&rel, &file).await.unwrap();
        assert_eq!(store.files_hashed(), 1);
    }

    #[test]
    fn hashing_notices_a_stale_identity() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, file) = write(tmp.path(), "f", b"hello");
        let id = Identity::of_file(&file).unwrap();
        assert!(hash_file(&file, id).is_ok());
        let stale = Identity { size: 4, ..id };
        assert!(matches!(hash_file(&file, stale), Err(JobError::Changed)));
    }

    #[test]
    fn memo_is_bounded_and_keyed_on_identity() {
        let mut m = Memo::default();
        let id = |n: u64| Identity {
            ino: n,
            size: 1,
            mtime_ns: 0,
            ctime_ns: 0,
        };
        for i in 0..(MEMO_MAX_ENTRIES as u64 + 10) {
            let p = PathBuf::from(format!("f{i}"));
            m.insert(&p, Arc::new(FileDigests::new(id(i), ChunkSums::of(b"x"))));
        }
        assert_eq!(m.map.len(), MEMO_MAX_ENTRIES);
        assert!(m.get(Path::new("f0"), id(0)).is_none());
        let last = MEMO_MAX_ENTRIES as u64 + 9;
        let p = PathBuf::from(format!("f{last}"));
        assert!(m.get(&p, id(last)).is_some());
        assert!(m.get(&p, id(last + 1)).is_none());
    }
}
