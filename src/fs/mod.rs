//! The filesystem logic, with no fuser types in it: inodes, versions, handles, listings and
//! their TTLs, and the rules that keep what the kernel caches honest. `fs::fuse` is the thin
//! adapter that plugs it into the kernel; tests drive it directly.
//!
//! **Versions are inodes.** Every (path, version) the mount has seen gets its own inode
//! number, derived from the path and the ETag. The kernel's page cache belongs to an inode, so
//! it can never mix the bytes of two versions, and every open can keep its page cache
//! (`FOPEN_KEEP_CACHE`). When a path's version changes, the path moves to a new inode; the old
//! inode keeps serving the handles already open on it (or `ESTALE` for bytes it no longer can
//! get), and an `open` of it answers `ESTALE`, which makes the kernel look the path up again.

pub mod error;
pub mod fuse;
pub mod iomode;
mod mutate;
pub mod name;
mod prefetch;
mod revalidate;
#[cfg(test)]
mod tests;
mod writeback;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

pub use error::FsError;
pub use name::ValidName;

use crate::read::{Readahead, Reader, Version};
use crate::store::{DirEntry, DynStore, ETag, EntryKind, Head, Revalidated, join_path};

/// Inode number of the mount's root.
pub const ROOT: u64 = 1;

#[derive(Debug, Clone)]
pub struct FsConfig {
    /// How long metadata and listings are trusted before they are revalidated.
    pub metadata_ttl: Duration,
    /// How long "no such file" is trusted.
    pub negative_ttl: Duration,
    /// Serve the cached metadata (with a warning) when revalidation cannot reach the remote.
    pub stale_if_error: bool,
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
    /// `st_blksize` of files: the preferred I/O size tools read with.
    pub block_size: u32,
    /// Directory whose filesystem `statfs` reports (the cache's).
    pub statfs_dir: Option<PathBuf>,
    /// Refuse every change with `EROFS`.
    pub read_only: bool,
    /// Where files being written keep their local bytes (the cache's write area).
    pub staging_dir: PathBuf,
    /// How changes are sent.
    pub upload: crate::write::plan::PlanConfig,
    /// Upload parts in flight at once per file.
    pub upload_parallel: usize,
    /// `--write-back`: `close`/`fsync` return once changes are in the journal; uploads follow
    /// after this delay.
    pub write_back: Option<Duration>,
    /// Offer passthrough opens of files complete in the cache (the adapter turns it off when
    /// the kernel does not allow it).
    pub passthrough: bool,
    /// Opening a file of at most this size fetches its folder's other files of at most this
    /// size (0: never).
    pub prefetch_small_files: u64,
    /// At most this many bytes of a folder's small files are fetched ahead.
    pub prefetch_folder_bytes: u64,
    /// Folders the kernel holds are listed again in the background this often, and the
    /// kernel is given long TTLs for what they hold (`None`: no background revalidation;
    /// TTLs are `metadata_ttl`, and an expired entry is revalidated when next used).
    pub revalidate_interval: Option<Duration>,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            metadata_ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
            stale_if_error: true,
            uid: 0,
            gid: 0,
            file_mode: 0o444,
            dir_mode: 0o555,
            block_size: 1 << 20,
            statfs_dir: None,
            read_only: false,
            staging_dir: std::env::temp_dir(),
            upload: crate::write::plan::PlanConfig::default(),
            upload_parallel: 4,
            write_back: None,
            passthrough: true,
            prefetch_small_files: 256 << 10,
            prefetch_folder_bytes: 64 << 20,
            revalidate_interval: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
}

/// Attributes of an inode, as the kernel sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub blocks: u64,
    pub mtime: SystemTime,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub blksize: u32,
}

/// A lookup answer: attributes and how long the kernel may trust them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub attr: Attr,
    pub ttl: Duration,
}

/// One entry handed out by `readdir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirItem {
    pub name: String,
    pub ino: u64,
    pub kind: Kind,
}

/// How an open file is served.
#[derive(Debug)]
pub struct OpenReply {
    pub fh: u64,
    /// The kernel may keep the inode's page cache: true for every ordinary open, since an
    /// inode never changes content behind the kernel's back (a new version is a new inode).
    pub keep_cache: bool,
    /// Passthrough: the kernel reads this file (the version's complete cache file) directly.
    /// If it cannot, the adapter calls [`ArtifactFs::passthrough_refused`] and opens the
    /// handle the ordinary way.
    pub passthrough: Option<std::fs::File>,
}

impl OpenReply {
    fn ordinary(fh: u64) -> Self {
        OpenReply {
            fh,
            keep_cache: true,
            passthrough: None,
        }
    }
}

/// Sends invalidations to the kernel. Implementations must not block the caller (the FUSE
/// adapter hands them to a thread of their own).
pub trait Invalidator: Send + Sync {
    /// The kernel should forget the dentry `name` in directory `parent`.
    fn entry(&self, parent: u64, name: &str);
    /// The kernel should forget what it keeps of inode `ino`'s contents (a folder's listing).
    fn inode(&self, ino: u64);
}

/// What a listing says of one child.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Child {
    kind: Kind,
    size: u64,
    mtime: SystemTime,
    etag: Option<ETag>,
}

impl Child {
    fn from_entry(e: &DirEntry) -> Self {
        Child {
            kind: match e.kind {
                EntryKind::Dir => Kind::Dir,
                EntryKind::File => Kind::File,
            },
            size: e.size,
            mtime: e.mtime,
            etag: e.etag.clone(),
        }
    }
}

#[derive(Debug)]
struct Inode {
    parent: u64,
    name: String,
    path: String,
    kind: Kind,
    size: u64,
    mtime: SystemTime,
    etag: Option<ETag>,
    /// Kernel references (lookups not yet forgotten).
    lookups: u64,
    /// False once the path moved to another version or disappeared.
    current: bool,
    /// Metadata trusted until then.
    valid_until: Instant,
    /// Local changes (a file being written).
    local: Option<Arc<mutate::LocalFile>>,
    /// Made here and not uploaded yet: listings of the remote do not know it.
    pending_create: bool,
}

impl Inode {
    /// Whether `c` describes the version this inode holds.
    fn same_version(&self, c: &Child) -> bool {
        if self.kind != c.kind {
            return false;
        }
        if self.kind == Kind::Dir {
            return true;
        }
        match (&self.etag, &c.etag) {
            (Some(a), Some(b)) => a == b && self.size == c.size,
            _ => self.size == c.size && same_second(self.mtime, c.mtime),
        }
    }
}

/// Whether two modification times are the same to the second: HTTP dates carry seconds
/// only, listings may carry nanoseconds.
/// Whether `precise` is the time `listed` stands for: the same second, or, for a listing that
/// gives times to the minute only (nginx's HTML index), the same minute.
fn listed_time_matches(listed: SystemTime, precise: SystemTime) -> bool {
    let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).ok();
    same_second(listed, precise)
        || matches!((secs(listed), secs(precise)), (Some(l), Some(p)) if l % 60 == 0 && p / 60 == l / 60)
}

fn same_second(a: SystemTime, b: SystemTime) -> bool {
    let secs = |t: SystemTime| match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i128,
        Err(e) => -(e.duration().as_secs_f64().ceil() as i128),
    };
    secs(a) == secs(b)
}

#[derive(Debug, Default)]
struct DirState {
    entries: Option<Arc<BTreeMap<ValidName, Child>>>,
    validator: Option<String>,
    valid_until: Option<Instant>,
    /// Lookups answered with a `HEAD` since the directory was last listed; after a few, the
    /// whole directory is listed instead.
    heads: u32,
    /// Serialises refreshes of this directory's listing.
    refresh: Arc<tokio::sync::Mutex<()>>,
    /// The listing whose small files were prefetched (each listing once).
    prefetched: Option<Arc<BTreeMap<ValidName, Child>>>,
    /// When the remote last confirmed (or sent) `entries`.
    listed_at: Option<Instant>,
    /// How long the remote said the listing is good (`Cache-Control: max-age`): then that,
    /// not `metadata.ttl` nor background revalidation, decides.
    max_age: Option<Duration>,
}

#[derive(Debug, Default)]
struct Table {
    inodes: HashMap<u64, Inode>,
    by_path: HashMap<String, u64>,
    dirs: HashMap<u64, DirState>,
    negative: HashMap<String, Instant>,
}

#[derive(Debug)]
struct FileHandle {
    ino: u64,
    /// The version read (`None` for a file made here).
    /// The version read; made at the first read when the file had local changes at open
    /// (they may be sent and gone by then).
    version: OnceLock<Arc<Version>>,
    readahead: Mutex<Readahead>,
    /// Passthrough: the cache file, held whole while the kernel reads it.
    passthrough: Mutex<Option<crate::cache::WholePin>>,
}

/// A snapshot of a listing for one `opendir`. Inodes are made only for the entries handed
/// out by `readdirplus` (the kernel then holds them); plain `readdir` entries carry the number
/// the entry would get, so the inode table holds only what the kernel references.
#[derive(Debug)]
struct DirHandle {
    dir: u64,
    items: Vec<DirItem>,
    /// What the listing said of each item (`None` for `.` and `..`).
    children: Vec<Option<(ValidName, Child)>>,
    valid_until: Instant,
}

/// How long an open that could be passthrough waits for the releases of ordinary handles
/// already closed (see [`iomode::IoModes::ordinary_closed`]).
const PASSTHROUGH_WAIT: Duration = Duration::from_millis(5);
/// How long an open for writing (or a truncation) waits for passthrough readers' `RELEASE`s
/// before it fails with `ETXTBSY` (see [`iomode::IoModes::open_ordinary_within`]).
const RELEASE_WAIT: Duration = Duration::from_secs(1);

/// Lookups answered by `HEAD` in a directory before it is listed as a whole.
const HEADS_BEFORE_LISTING: u32 = 2;

pub struct ArtifactFs {
    store: DynStore,
    reader: Arc<Reader>,
    uploader: crate::write::upload::Uploader,
    cfg: FsConfig,
    table: Mutex<Table>,
    files: Mutex<HashMap<u64, Arc<FileHandle>>>,
    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    invalidator: OnceLock<Arc<dyn Invalidator>>,
    journal: crate::write::journal::Journal,
    /// Background uploads: the write-back mode's, and retries of failed uploads.
    write_back: writeback::WriteBack,
    /// Which inodes are open in passthrough mode, which the ordinary way.
    io: iomode::IoModes,
    /// This filesystem, for tasks that outlive a request.
    me: std::sync::Weak<ArtifactFs>,
}

impl std::fmt::Debug for ArtifactFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactFs")
            .field("remote", &self.store.id())
            .finish_non_exhaustive()
    }
}

fn ino_hash(parts: &[&[u8]]) -> u64 {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let b = h.finalize();
    // Keep clear of 0 (invalid), 1 (root) and the top bit (some tools treat inode numbers as
    // signed).
    (u64::from_le_bytes(b.as_bytes()[..8].try_into().unwrap_or([0; 8])) >> 1).max(2)
}

/// The inode number a (path, version) gets unless another one already holds it.
fn ino_candidate(path: &str, child: &Child) -> u64 {
    match child.kind {
        Kind::Dir => ino_hash(&[b"dir", path.as_bytes()]),
        Kind::File => match &child.etag {
            Some(e) => ino_hash(&[b"file", path.as_bytes(), e.as_str().as_bytes()]),
            None => ino_hash(&[
                b"file-unknown-etag",
                path.as_bytes(),
                &child.size.to_le_bytes(),
                format!("{:?}", child.mtime).as_bytes(),
            ]),
        },
    }
}

impl ArtifactFs {
    pub fn new(reader: Arc<Reader>, cfg: FsConfig) -> Arc<Self> {
        let mut table = Table::default();
        table.inodes.insert(
            ROOT,
            Inode {
                parent: ROOT,
                name: String::new(),
                path: String::new(),
                kind: Kind::Dir,
                size: 0,
                mtime: SystemTime::now(),
                etag: None,
                lookups: 1,
                current: true,
                valid_until: Instant::now(),
                local: None,
                pending_create: false,
            },
        );
        table.by_path.insert(String::new(), ROOT);
        Arc::new_cyclic(|me| ArtifactFs {
            me: me.clone(),
            journal: crate::write::journal::Journal::new(cfg.staging_dir.clone()),
            write_back: writeback::WriteBack::new(cfg.write_back),
            io: iomode::IoModes::new(cfg.passthrough),
            store: reader.store().clone(),
            uploader: crate::write::upload::Uploader::new(
                reader.store().clone(),
                cfg.upload.clone(),
                cfg.upload_parallel,
            ),
            reader,
            cfg,
            table: Mutex::new(table),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            invalidator: OnceLock::new(),
        })
    }

    /// Connects kernel invalidations (once the mount exists).
    pub fn set_invalidator(&self, inv: Arc<dyn Invalidator>) {
        let _ = self.invalidator.set(inv);
    }

    pub fn config(&self) -> &FsConfig {
        &self.cfg
    }

    pub fn reader(&self) -> &Arc<Reader> {
        &self.reader
    }

    /// Open file handles (for a clean unmount).
    pub fn open_files(&self) -> usize {
        self.files.lock().len()
    }

    /// Open file handles the kernel reads straight from the cache (passthrough).
    pub fn passthrough_handles(&self) -> usize {
        self.files
            .lock()
            .values()
            .filter(|h| h.passthrough.lock().is_some())
            .count()
    }

    fn invalidate_entry(&self, parent: u64, name: &str) {
        if let Some(inv) = self.invalidator.get() {
            inv.entry(parent, name);
        }
    }

    fn invalidate_inode(&self, ino: u64) {
        if let Some(inv) = self.invalidator.get() {
            inv.inode(ino);
        }
    }

    fn attr_of(&self, ino: u64, i: &Inode) -> Attr {
        let (perm, nlink) = match i.kind {
            Kind::File => (self.cfg.file_mode, 1),
            Kind::Dir => (self.cfg.dir_mode, 2),
        };
        Attr {
            ino,
            kind: i.kind,
            size: i.size,
            blocks: i.size.div_ceil(512),
            mtime: i.mtime,
            perm,
            nlink,
            uid: self.cfg.uid,
            gid: self.cfg.gid,
            blksize: self.cfg.block_size,
        }
    }

    fn ttl_left(until: Instant) -> Duration {
        until.saturating_duration_since(Instant::now())
    }

    /// Finds or creates the inode of `child` at `parent/name`; a different version than the
    /// one known moves the path to a new inode. Returns the inode number.
    fn upsert(&self, t: &mut Table, parent: u64, name: &ValidName, child: &Child, valid_until: Instant) -> u64 {
        let parent_path = t.inodes.get(&parent).map(|p| p.path.clone()).unwrap_or_default();
        let path = join_path(&parent_path, name.as_str());
        t.negative.remove(&path);
        if let Some(&ino) = t.by_path.get(&path)
            && let Some(i) = t.inodes.get_mut(&ino)
        {
            if i.same_version(child) {
                i.size = child.size;
                i.mtime = child.mtime;
                if i.etag.is_none() {
                    i.etag = child.etag.clone();
                }
                i.valid_until = valid_until;
                return ino;
            }
            self.supersede(t, ino);
        }
        let mut ino = ino_candidate(&path, child);
        // Another (path, version) already holds this number (a hash collision, or the same
        // version seen again after being superseded): take the next free one, or reuse it.
        loop {
            match t.inodes.get_mut(&ino) {
                None => break,
                Some(i) if i.path == path && i.same_version(child) => {
                    i.current = true;
                    i.valid_until = valid_until;
                    t.by_path.insert(path, ino);
                    return ino;
                }
                Some(_) => ino = ino.wrapping_add(1).max(2),
            }
        }
        t.inodes.insert(
            ino,
            Inode {
                parent,
                name: name.as_str().to_string(),
                path: path.clone(),
                kind: child.kind,
                size: child.size,
                mtime: child.mtime,
                etag: child.etag.clone(),
                lookups: 0,
                current: true,
                valid_until,
                local: None,
                pending_create: false,
            },
        );
        t.by_path.insert(path, ino);
        ino
    }

    /// The path of `ino` now belongs to another version (or to nothing): the inode stays for
    /// whoever holds it, the kernel forgets the dentry, the cached bytes are retired.
    fn supersede(&self, t: &mut Table, ino: u64) {
        let Some(i) = t.inodes.get_mut(&ino) else { return };
        if !i.current {
            return;
        }
        i.current = false;
        if t.by_path.get(&i.path) == Some(&ino) {
            t.by_path.remove(&i.path);
        }
        tracing::info!(path = %i.path, "remote version changed");
        if let Some(etag) = &i.etag {
            self.reader.retire(&i.path, etag, i.size);
        }
        let (parent, name, lookups, kind) = (i.parent, i.name.clone(), i.lookups, i.kind);
        self.invalidate_entry(parent, &name);
        if kind == Kind::Dir {
            t.dirs.remove(&ino);
        }
        if lookups == 0 {
            t.inodes.remove(&ino);
        }
    }

    /// Lists `dir` again if its listing is missing or expired. Returns its entries, or `None`
    /// when the directory was never listed and `may_skip` says a `HEAD` should do.
    async fn listing(&self, dir: u64, may_skip: bool) -> Result<Option<Arc<BTreeMap<ValidName, Child>>>, FsError> {
        self.listing_since(dir, may_skip, None).await
    }

    /// [`listing`](Self::listing), also listing again a listing the remote confirmed before
    /// `since` (background revalidation).
    async fn listing_since(
        &self,
        dir: u64,
        may_skip: bool,
        since: Option<Instant>,
    ) -> Result<Option<Arc<BTreeMap<ValidName, Child>>>, FsError> {
        let fresh = |d: &DirState| {
            d.valid_until.is_some_and(|u| u > Instant::now())
                && since.is_none_or(|s| d.listed_at.is_some_and(|l| l >= s))
        };
        let lock = {
            let mut t = self.table.lock();
            let d = t.dirs.entry(dir).or_default();
            match &d.entries {
                Some(e) if fresh(d) => return Ok(Some(e.clone())),
                None if may_skip && d.heads < HEADS_BEFORE_LISTING => return Ok(None),
                _ => d.refresh.clone(),
            }
        };
        let _guard = lock.lock().await;
        // Someone else may have refreshed it while we waited.
        let (path, validator, old) = {
            let mut t = self.table.lock();
            let path = match t.inodes.get(&dir) {
                Some(i) if i.kind == Kind::Dir => i.path.clone(),
                Some(_) => return Err(FsError::NotDir),
                None => return Err(FsError::NotFound),
            };
            let d = t.dirs.entry(dir).or_default();
            if let Some(e) = &d.entries
                && fresh(d)
            {
                return Ok(Some(e.clone()));
            }
            (path, d.validator.clone(), d.entries.clone())
        };
        let validator = if old.is_some() { validator } else { None };
        match self.store.list(&path, validator.as_deref()).await {
            Ok(Revalidated::NotModified) => {
                let mut t = self.table.lock();
                let d = t.dirs.entry(dir).or_default();
                let until = Instant::now() + self.listing_ttl(d.max_age);
                d.valid_until = Some(until);
                d.listed_at = Some(Instant::now());
                let entries = d.entries.clone();
                // The children are as valid as their listing.
                if let Some(e) = &entries {
                    for name in e.keys() {
                        let p = join_path(&path, name.as_str());
                        if let Some(&ino) = t.by_path.get(&p)
                            && let Some(i) = t.inodes.get_mut(&ino)
                        {
                            i.valid_until = until;
                        }
                    }
                }
                Ok(entries)
            }
            Ok(Revalidated::Modified(listing)) => {
                let until = Instant::now() + self.listing_ttl(listing.max_age);
                let mut entries = BTreeMap::new();
                for e in &listing.entries {
                    match ValidName::from_remote(&e.name) {
                        Ok(n) => {
                            entries.insert(n, Child::from_entry(e));
                        }
                        Err(why) => {
                            tracing::warn!(dir = %path, name = ?e.name, "skipping a remote name that cannot be a file name: {why}")
                        }
                    }
                }
                let mut t = self.table.lock();
                // Files made here and not uploaded yet are not on the remote: keep them.
                for i in t.inodes.values() {
                    if i.parent == dir
                        && i.current
                        && i.pending_create
                        && let Ok(n) = ValidName::from_remote(&i.name)
                    {
                        entries.insert(
                            n,
                            Child {
                                kind: i.kind,
                                size: i.size,
                                mtime: i.mtime,
                                etag: None,
                            },
                        );
                    }
                }
                let entries = Arc::new(entries);
                // Children that changed or disappeared move off their inodes now.
                let names: Vec<&ValidName> = match &old {
                    Some(o) => o.keys().chain(entries.keys()).collect(),
                    None => entries.keys().collect(),
                };
                for name in names {
                    let p = join_path(&path, name.as_str());
                    let Some(&ino) = t.by_path.get(&p) else {
                        // New here since the last listing: the kernel may remember it absent.
                        if old.as_ref().is_some_and(|o| !o.contains_key(name)) {
                            t.negative.remove(&p);
                            self.invalidate_entry(dir, name.as_str());
                        }
                        continue;
                    };
                    match entries.get(name) {
                        Some(c) if t.inodes.get(&ino).is_some_and(|i| i.same_version(c)) => {
                            if let Some(i) = t.inodes.get_mut(&ino) {
                                i.size = c.size;
                                i.mtime = c.mtime;
                                if i.etag.is_none() {
                                    i.etag = c.etag.clone();
                                }
                                i.valid_until = until;
                            }
                        }
                        _ => self.supersede(&mut t, ino),
                    }
                }
                // A listing the kernel may keep (`FOPEN_CACHE_DIR`) that changed: it drops it.
                if old.as_ref().is_some_and(|o| **o != *entries) {
                    self.invalidate_inode(dir);
                }
                let d = t.dirs.entry(dir).or_default();
                d.entries = Some(entries.clone());
                d.validator = listing.validator;
                d.valid_until = Some(until);
                d.listed_at = Some(Instant::now());
                d.max_age = listing.max_age;
                d.heads = 0;
                Ok(Some(entries))
            }
            Err(crate::store::StoreError::NotFound) => {
                let mut t = self.table.lock();
                if dir != ROOT {
                    self.supersede(&mut t, dir);
                }
                Err(FsError::NotFound)
            }
            Err(e) => match old {
                Some(old) if self.cfg.stale_if_error => {
                    tracing::warn!(dir = %path, "cannot revalidate the listing, serving the cached one: {e}");
                    let mut t = self.table.lock();
                    let d = t.dirs.entry(dir).or_default();
                    // Try again soon, not on every call.
                    d.valid_until = Some(Instant::now() + self.cfg.negative_ttl);
                    Ok(Some(old))
                }
                _ => Err(FsError::remote(&path, e)),
            },
        }
    }

    fn entry_of(&self, t: &Table, ino: u64) -> Result<Entry, FsError> {
        let i = t.inodes.get(&ino).ok_or(FsError::NotFound)?;
        let ttl = if self.kept_honest(t, i) {
            revalidate::KERNEL_TTL
        } else {
            Self::ttl_left(i.valid_until)
        };
        Ok(Entry {
            attr: self.attr_of(ino, i),
            ttl,
        })
    }

    /// `lookup`: resolves `name` in `parent` and counts a kernel reference on the result.
    pub async fn lookup(&self, parent: u64, name: &OsStr) -> Result<Entry, FsError> {
        let name = ValidName::from_kernel(name)?;
        let parent_path = {
            let t = self.table.lock();
            match t.inodes.get(&parent) {
                Some(i) if i.kind == Kind::Dir => i.path.clone(),
                Some(_) => return Err(FsError::NotDir),
                None => return Err(FsError::NotFound),
            }
        };
        let path = join_path(&parent_path, name.as_str());
        {
            // Made here and not uploaded yet: only we know it.
            let mut t = self.table.lock();
            if let Some(&ino) = t.by_path.get(&path)
                && t.inodes.get(&ino).is_some_and(|i| i.pending_create && i.current)
            {
                return self.referenced(&mut t, ino);
            }
        }
        let listed = self.listing(parent, true).await?;
        if let Some(entries) = &listed
            && let Some(child) = entries.get(&name)
        {
            let mut t = self.table.lock();
            let until = t
                .dirs
                .get(&parent)
                .and_then(|d| d.valid_until)
                .unwrap_or_else(Instant::now);
            let ino = self.upsert(&mut t, parent, &name, child, until);
            return self.referenced(&mut t, ino);
        }
        // Listed without it: absent, unless the remote's listings leave out dot names.
        if listed.is_some() && (self.store.capabilities().complete_listings || !name.as_str().starts_with('.')) {
            return Err(FsError::NotFound);
        }
        // Not listed yet (or a dot name a listing may hide): ask about this one path.
        {
            let mut t = self.table.lock();
            if let Some(&until) = t.negative.get(&path) {
                if until > Instant::now() {
                    return Err(FsError::NotFound);
                }
                t.negative.remove(&path);
            }
            if let Some(&ino) = t.by_path.get(&path)
                && t.inodes.get(&ino).is_some_and(|i| i.valid_until > Instant::now())
            {
                return self.referenced(&mut t, ino);
            }
            if let Some(d) = t.dirs.get_mut(&parent) {
                d.heads += 1;
            }
        }
        let head = match self.store.head(&path, None).await {
            Ok(Revalidated::Modified(h)) => h,
            Ok(Revalidated::NotModified) => {
                return Err(FsError::remote(
                    &path,
                    crate::store::StoreError::Protocol("304 to an unconditional HEAD".into()),
                ));
            }
            Err(crate::store::StoreError::NotFound) => {
                let mut t = self.table.lock();
                t.negative.insert(path, Instant::now() + self.cfg.negative_ttl);
                if t.negative.len() > 100_000 {
                    let now = Instant::now();
                    t.negative.retain(|_, &mut until| until > now);
                }
                return Err(FsError::NotFound);
            }
            Err(e) => {
                let mut t = self.table.lock();
                if self.cfg.stale_if_error
                    && let Some(&ino) = t.by_path.get(&path)
                {
                    tracing::warn!(path, "cannot revalidate, serving the cached entry: {e}");
                    if let Some(i) = t.inodes.get_mut(&ino) {
                        i.valid_until = Instant::now() + self.cfg.negative_ttl;
                    }
                    return self.referenced(&mut t, ino);
                }
                return Err(FsError::remote(&path, e));
            }
        };
        // The remote's Cache-Control: max-age, when it sent one, says how long to trust this.
        let ttl = match &head {
            Head::File(m) => m.max_age.unwrap_or(self.cfg.metadata_ttl),
            Head::Dir { .. } => self.cfg.metadata_ttl,
        };
        let child = match head {
            Head::Dir { mtime } => Child {
                kind: Kind::Dir,
                size: 0,
                mtime,
                etag: None,
            },
            Head::File(m) => Child {
                kind: Kind::File,
                size: m.size,
                mtime: m.mtime,
                etag: m.etag,
            },
        };
        let mut t = self.table.lock();
        let ino = self.upsert(&mut t, parent, &name, &child, Instant::now() + ttl);
        self.referenced(&mut t, ino)
    }

    fn referenced(&self, t: &mut Table, ino: u64) -> Result<Entry, FsError> {
        let e = self.entry_of(t, ino)?;
        if let Some(i) = t.inodes.get_mut(&ino) {
            i.lookups += 1;
        }
        Ok(e)
    }

    /// `forget`: the kernel dropped `n` references.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let mut t = self.table.lock();
        let Some(i) = t.inodes.get_mut(&ino) else { return };
        i.lookups = i.lookups.saturating_sub(n);
        // A file with local changes stays until they are sent.
        if i.lookups == 0 && i.local.is_none() {
            // Recreated from the listing when needed again; bounded memory however many
            // files the kernel has seen.
            let path = i.path.clone();
            t.inodes.remove(&ino);
            t.dirs.remove(&ino);
            if t.by_path.get(&path) == Some(&ino) {
                t.by_path.remove(&path);
            }
        }
    }

    /// `getattr`. The metadata of a current inode is revalidated once its TTL passed.
    pub async fn getattr(&self, ino: u64) -> Result<Entry, FsError> {
        let (parent, name, kind) = {
            let t = self.table.lock();
            let i = t.inodes.get(&ino).ok_or(FsError::NotFound)?;
            if i.local.is_some() {
                // Being written here: what we have is what it is.
                let mut e = self.entry_of(&t, ino)?;
                e.ttl = self.cfg.metadata_ttl;
                return Ok(e);
            }
            if !i.current || i.valid_until > Instant::now() || ino == ROOT {
                let mut e = self.entry_of(&t, ino)?;
                if !i.current {
                    e.ttl = Duration::ZERO;
                } else if ino == ROOT {
                    e.ttl = self.root_ttl();
                }
                return Ok(e);
            }
            (i.parent, i.name.clone(), i.kind)
        };
        self.revalidate(ino, parent, &name, kind).await?;
        let t = self.table.lock();
        let mut e = self.entry_of(&t, ino)?;
        if !t.inodes.get(&ino).is_some_and(|i| i.current) {
            e.ttl = Duration::ZERO;
        }
        Ok(e)
    }

    /// Checks an inode's version against the remote: through its parent's listing when the
    /// parent is listed (one request refreshes all siblings), else with a conditional `HEAD`.
    async fn revalidate(&self, ino: u64, parent: u64, name: &str, kind: Kind) -> Result<(), FsError> {
        let listed = self.table.lock().dirs.get(&parent).is_some_and(|d| d.entries.is_some());
        if listed {
            let entries = match self.listing(parent, false).await {
                Ok(e) => e,
                Err(FsError::NotFound) => None,
                Err(e) => return Err(e),
            };
            let gone = ValidName::from_remote(name)
                .ok()
                .and_then(|n| entries.as_ref()?.get(&n).cloned())
                .is_none();
            if gone {
                let mut t = self.table.lock();
                self.supersede(&mut t, ino);
            }
            return Ok(());
        }
        if kind == Kind::Dir {
            let mut t = self.table.lock();
            if let Some(i) = t.inodes.get_mut(&ino) {
                i.valid_until = Instant::now() + self.cfg.metadata_ttl;
            }
            return Ok(());
        }
        let (path, etag) = {
            let t = self.table.lock();
            let i = t.inodes.get(&ino).ok_or(FsError::NotFound)?;
            (i.path.clone(), i.etag.clone())
        };
        let answer = self.store.head(&path, etag.as_ref()).await;
        let mut t = self.table.lock();
        let until = Instant::now() + self.cfg.metadata_ttl;
        match answer {
            Ok(Revalidated::NotModified) => {
                if let Some(i) = t.inodes.get_mut(&ino) {
                    i.valid_until = until;
                }
            }
            Ok(Revalidated::Modified(Head::File(m))) => {
                let until = Instant::now() + m.max_age.unwrap_or(self.cfg.metadata_ttl);
                let child = Child {
                    kind: Kind::File,
                    size: m.size,
                    mtime: m.mtime,
                    etag: m.etag,
                };
                if let Ok(n) = ValidName::from_remote(name) {
                    self.upsert(&mut t, parent, &n, &child, until);
                }
            }
            Ok(Revalidated::Modified(Head::Dir { .. })) | Err(crate::store::StoreError::NotFound) => {
                self.supersede(&mut t, ino);
            }
            Err(e) if self.cfg.stale_if_error => {
                tracing::warn!(path, "cannot revalidate, serving the cached version: {e}");
                if let Some(i) = t.inodes.get_mut(&ino) {
                    i.valid_until = Instant::now() + self.cfg.negative_ttl;
                }
            }
            Err(e) => return Err(FsError::remote(&path, e)),
        }
        Ok(())
    }

    /// The version file inode `ino` holds, as (path, ETag, size); asks the remote when the
    /// listing did not say. `Stale` when the path moved on.
    pub(crate) async fn file_version(&self, ino: u64) -> Result<(String, ETag, u64), FsError> {
        let (path, etag, size, mtime, parent, name) = {
            let t = self.table.lock();
            let i = t.inodes.get(&ino).ok_or(FsError::NotFound)?;
            if i.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            if !i.current {
                return Err(FsError::Stale);
            }
            (
                i.path.clone(),
                i.etag.clone(),
                i.size,
                i.mtime,
                i.parent,
                i.name.clone(),
            )
        };
        if let Some(e) = etag {
            return Ok((path, e, size));
        }
        // The listing did not say which version this is. A file with bytes: the first GET of
        // its first chunk says it (and brings the bytes); an empty one: a HEAD.
        if size > 0 {
            match self.reader.open_current(&path, size).await {
                Ok(v) => {
                    let mut t = self.table.lock();
                    if v.size != size {
                        // Changed since it was listed: the new size and version are taken, and
                        // the kernel looks the name up again.
                        let child = Child {
                            kind: Kind::File,
                            size: v.size,
                            mtime,
                            etag: Some(v.etag.clone()),
                        };
                        if let Ok(n) = ValidName::from_remote(&name) {
                            self.upsert(&mut t, parent, &n, &child, Instant::now() + self.cfg.metadata_ttl);
                            mutate::set_child(&mut t, parent, &n, Some(child));
                        }
                        return Err(FsError::Stale);
                    }
                    if let Some(i) = t.inodes.get_mut(&ino) {
                        i.etag = Some(v.etag.clone());
                    }
                    return Ok((path, v.etag.clone(), size));
                }
                Err(crate::read::ReadError::Remote(crate::store::StoreError::NotFound)) => {
                    let mut t = self.table.lock();
                    self.supersede(&mut t, ino);
                    return Err(FsError::Stale);
                }
                Err(e) => return Err(FsError::read(&path, e)),
            }
        }
        let head = self
            .store
            .head(&path, None)
            .await
            .map_err(|e| FsError::remote(&path, e))?;
        let Revalidated::Modified(Head::File(m)) = head else {
            let mut t = self.table.lock();
            self.supersede(&mut t, ino);
            return Err(FsError::Stale);
        };
        let Some(etag) = m.etag.clone() else {
            return Err(FsError::remote(
                &path,
                crate::store::StoreError::Protocol("no ETag for this file".into()),
            ));
        };
        let mut t = self.table.lock();
        if !(m.size == size && listed_time_matches(mtime, m.mtime)) {
            let child = Child {
                kind: Kind::File,
                size: m.size,
                mtime: m.mtime,
                etag: Some(etag),
            };
            if let Ok(n) = ValidName::from_remote(&name) {
                self.upsert(&mut t, parent, &n, &child, Instant::now() + self.cfg.metadata_ttl);
                mutate::set_child(&mut t, parent, &n, Some(child));
            }
            return Err(FsError::Stale);
        }
        if let Some(i) = t.inodes.get_mut(&ino) {
            i.etag = Some(etag.clone());
        }
        Ok((path, etag, size))
    }

    /// `open` of a file. `write`: for writing; `truncate`: `O_TRUNC`.
    pub async fn open(&self, ino: u64, write: bool, truncate: bool) -> Result<OpenReply, FsError> {
        if (write || truncate) && self.cfg.read_only {
            return Err(FsError::ReadOnly);
        }
        let local = {
            let t = self.table.lock();
            let i = t.inodes.get(&ino).ok_or(FsError::NotFound)?;
            if i.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            if !i.current {
                // The kernel looks the path up again and opens the new version.
                return Err(FsError::Stale);
            }
            i.local.clone()
        };
        if local.is_some() || write || truncate {
            self.io.open_ordinary_within(ino, RELEASE_WAIT).await?;
            let prepared = async {
                if write || truncate {
                    self.ensure_local(ino).await?;
                }
                if truncate {
                    self.truncate_on_open(ino).await?;
                }
                Ok(())
            }
            .await;
            if let Err(e) = prepared {
                self.io.close(ino, iomode::Mode::Ordinary);
                return Err(e);
            }
            return Ok(OpenReply::ordinary(self.add_handle(ino, None, None)));
        }
        let (path, etag, size) = self.file_version(ino).await?;
        let version = self.reader.open_version(&path, &etag, size);
        self.prefetch_siblings(ino, size);
        if let Some((pin, file)) = self.passthrough_for(ino, &version).await {
            return Ok(OpenReply {
                fh: self.add_handle(ino, Some(version), Some(pin)),
                keep_cache: false,
                passthrough: Some(file),
            });
        }
        self.io.open_ordinary_within(ino, RELEASE_WAIT).await?;
        Ok(OpenReply::ordinary(self.add_handle(ino, Some(version), None)))
    }

    /// Whether a read-only open of `version` may be passthrough: the version complete and
    /// checked in the cache, passthrough on, and no ordinary open of the inode. Claims the
    /// passthrough mode for the inode when it says yes.
    async fn passthrough_for(
        &self,
        ino: u64,
        version: &Arc<Version>,
    ) -> Option<(crate::cache::WholePin, std::fs::File)> {
        if !self.io.enabled() {
            return None;
        }
        let Some(pin) = version.pin_whole() else {
            if let Some(f) = version.cache_file().filter(|f| f.is_complete()) {
                // Complete but not checked by this process (cached by an earlier one): check it
                // in the background, so that the next open can be passthrough.
                let f = f.clone();
                tokio::task::spawn_blocking(move || f.verify_all());
            }
            return None;
        };
        let file = match std::fs::File::open(pin.file().data_path()) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(path = %version.path, "no passthrough: {e}");
                return None;
            }
        };
        if self.io.open_passthrough(ino) {
            return Some((pin, file));
        }
        // Ordinary handles hold the inode; most often ones already closed whose release has
        // not arrived yet.
        (self.io.ordinary_closed(ino, PASSTHROUGH_WAIT).await && self.io.open_passthrough(ino)).then_some((pin, file))
    }

    /// The kernel could not take the passthrough open `fh`: it becomes an ordinary one. With
    /// `for_good`, passthrough is turned off for the rest of the mount.
    pub fn passthrough_refused(&self, fh: u64, for_good: bool) {
        if for_good {
            self.io.disable();
        }
        if let Some(h) = self.files.lock().get(&fh)
            && h.passthrough.lock().take().is_some()
        {
            self.io.downgrade(h.ino);
        }
    }

    /// Whether passthrough opens may be offered.
    pub fn passthrough_enabled(&self) -> bool {
        self.io.enabled()
    }

    /// No passthrough for this mount (the kernel or the daemon's privileges do not allow it).
    pub fn disable_passthrough(&self) {
        self.io.disable();
    }

    /// `read`: hands the bytes (or the error) to `reply`, possibly on the calling thread.
    pub async fn read<R>(&self, fh: u64, offset: u64, size: u32, reply: impl FnOnce(Result<&[u8], FsError>) -> R) -> R {
        let Some(h) = self.files.lock().get(&fh).cloned() else {
            return reply(Err(FsError::BadHandle));
        };
        let local = self.table.lock().inodes.get(&h.ino).and_then(|i| i.local.clone());
        if let Some(l) = local {
            return match self.read_local(&l, &h, offset, size).await {
                Ok(b) => reply(Ok(&b)),
                Err(e) => reply(Err(e)),
            };
        }
        let version = match h.version.get() {
            Some(v) => v.clone(),
            None => match self.file_version(h.ino).await {
                Ok((path, etag, size)) => h
                    .version
                    .get_or_init(|| self.reader.open_version(&path, &etag, size))
                    .clone(),
                Err(e) => return reply(Err(e)),
            },
        };
        let stale = version
            .read(&h.readahead, offset, size, |r| match r {
                Ok(b) => (reply(Ok(b)), false),
                Err(e) => {
                    let stale = matches!(e, crate::read::ReadError::Stale);
                    (reply(Err(FsError::read(&version.path, e))), stale)
                }
            })
            .await;
        if stale.1 {
            // The remote moved on: look at the path again at the next lookup.
            let mut t = self.table.lock();
            if let Some(i) = t.inodes.get_mut(&h.ino) {
                i.valid_until = Instant::now();
                let parent = i.parent;
                if let Some(d) = t.dirs.get_mut(&parent) {
                    d.valid_until = Some(Instant::now());
                }
            }
        }
        stale.0
    }

    /// `opendir`: takes a snapshot of the listing for the handle's `readdir` calls.
    pub async fn opendir(&self, ino: u64) -> Result<u64, FsError> {
        let entries = self.listing(ino, false).await?.unwrap_or_default();
        let mut items = Vec::with_capacity(entries.len() + 2);
        let mut children = Vec::with_capacity(entries.len() + 2);
        let valid_until;
        {
            let t = self.table.lock();
            let (parent, path) = t
                .inodes
                .get(&ino)
                .map(|i| (i.parent, i.path.clone()))
                .unwrap_or((ROOT, String::new()));
            for (name, i) in [(".", ino), ("..", parent)] {
                items.push(DirItem {
                    name: name.into(),
                    ino: i,
                    kind: Kind::Dir,
                });
                children.push(None);
            }
            valid_until = t
                .dirs
                .get(&ino)
                .and_then(|d| d.valid_until)
                .unwrap_or_else(Instant::now);
            for (name, child) in entries.iter() {
                let p = join_path(&path, name.as_str());
                // The number it has, or the one it will get.
                let cino = match t.by_path.get(&p) {
                    Some(&n) if t.inodes.get(&n).is_some_and(|i| i.same_version(child)) => n,
                    _ => ino_candidate(&p, child),
                };
                items.push(DirItem {
                    name: name.to_string(),
                    ino: cino,
                    kind: child.kind,
                });
                children.push(Some((name.clone(), child.clone())));
            }
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs.lock().insert(
            fh,
            Arc::new(DirHandle {
                dir: ino,
                items,
                children,
                valid_until,
            }),
        );
        Ok(fh)
    }

    /// `readdir`: entries from `offset` on; `add` returns true when the kernel's buffer is
    /// full. Each entry's offset is its index + 1.
    pub fn readdir(&self, fh: u64, offset: u64, mut add: impl FnMut(&DirItem, u64) -> bool) -> Result<(), FsError> {
        let h = self.dirs.lock().get(&fh).cloned().ok_or(FsError::BadHandle)?;
        for (i, item) in h.items.iter().enumerate().skip(offset as usize) {
            if add(item, i as u64 + 1) {
                break;
            }
        }
        Ok(())
    }

    /// `readdirplus`: like `readdir` with attributes; every entry handed out (but `.` and
    /// `..`) counts as a lookup.
    pub fn readdirplus(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(&DirItem, &Entry, u64) -> bool,
    ) -> Result<(), FsError> {
        let h = self.dirs.lock().get(&fh).cloned().ok_or(FsError::BadHandle)?;
        for (i, item) in h.items.iter().enumerate().skip(offset as usize) {
            let mut t = self.table.lock();
            let ino = match &h.children[i] {
                Some((name, child)) => self.upsert(&mut t, h.dir, name, child, h.valid_until),
                None => item.ino,
            };
            let Ok(entry) = self.entry_of(&t, ino) else {
                continue;
            };
            let item = DirItem { ino, ..item.clone() };
            if add(&item, &entry, i as u64 + 1) {
                break;
            }
            if h.children[i].is_some()
                && let Some(inode) = t.inodes.get_mut(&ino)
            {
                inode.lookups += 1;
            }
        }
        Ok(())
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.lock().remove(&fh);
    }

    /// `statfs`: the cache disk's figures (the remote has no meaningful ones).
    pub fn statfs(&self) -> Statfs {
        let files = self.table.lock().inodes.len() as u64;
        let mut out = Statfs {
            blocks: 0,
            bfree: 0,
            bavail: 0,
            files,
            ffree: u32::MAX as u64,
            bsize: 4096,
            namelen: name::NAME_MAX as u32,
            frsize: 4096,
        };
        if let Some(dir) = &self.cfg.statfs_dir
            && let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        {
            let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
            // SAFETY: valid C string and out-pointer.
            if unsafe { libc::statvfs(c.as_ptr(), &mut s) } == 0 {
                out.blocks = s.f_blocks as u64;
                out.bfree = s.f_bfree as u64;
                out.bavail = s.f_bavail as u64;
                out.bsize = s.f_bsize as u32;
                out.frsize = s.f_frsize as u32;
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}
