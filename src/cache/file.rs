//! One cached version of one artifact: a sparse data file holding the artifact's bytes at their
//! own offsets, memory-mapped, plus a metadata file beside it (identity of the version, which
//! chunks are present, a checksum per present chunk: blake3, or CRC32C where that is what the
//! remote vouches for or the chunk is only recorded).
//!
//! Rules that keep it safe:
//! - a chunk's range is `fallocate`d before its bytes are written through the mapping, so a
//!   full disk is an error from `fallocate`, never a SIGBUS from a page fault;
//! - the data file is never shrunk while mapped (a version's size never changes);
//! - a chunk is written by exactly one writer while its bit is clear and read only once its bit
//!   is set (release/acquire), so readers never see a chunk being written;
//! - punching a chunk out (eviction under pressure) takes the write side of `punch`, readers the
//!   read side, so no reader copies from a chunk while it turns into a hole;
//! - chunks found on disk at open are used only after their checksum is verified again.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};
use memmap2::{Advice, MmapOptions, MmapRaw};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use super::bitmap::Bitmap;
use super::{CacheError, Shared};
use crate::protocol::{Crc32c, crc32c};

/// Identity of one cached version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VersionKey {
    /// The remote's id (`Store::id`).
    pub remote: String,
    /// Path of the artifact on the remote.
    pub path: String,
    /// The version's entity tag, exactly as the remote sent it.
    pub etag: String,
    pub size: u64,
}

const META_FORMAT: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Meta {
    pub format: u32,
    pub remote: String,
    pub path: String,
    pub etag: String,
    pub size: u64,
    pub chunk_size: u64,
    /// Hex bitmap of present chunks.
    pub present: String,
    /// Hex checksum of each chunk, 64 hex digits per chunk (zeros where absent): its blake3,
    /// or for the chunks in `crc32c` its CRC32C (4 bytes, big-endian) and zeros.
    pub checksums: String,
    /// Hex bitmap of the chunks whose checksum is a CRC32C; absent in metadata written before
    /// CRC32C was used (all blake3 then).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub crc32c: String,
}

impl Meta {
    pub(super) fn load(path: &Path) -> Option<Meta> {
        let text = fs::read(path).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Chunks recorded as present (for statistics).
    pub(super) fn present_count(&self) -> Option<u64> {
        let n = self.size.div_ceil(self.chunk_size.max(1));
        Bitmap::from_hex(n, &self.present).map(|b| b.count())
    }
}

#[derive(Debug)]
pub struct CacheFile {
    key: VersionKey,
    pub(super) data_path: PathBuf,
    pub(super) meta_path: PathBuf,
    file: File,
    map: Option<MmapRaw>,
    chunk_size: u64,
    present: Bitmap,
    verified: Bitmap,
    /// Chunks a writer holds: at most one writer per chunk, enforced here.
    claimed: Bitmap,
    checksums: Mutex<Vec<[u8; 32]>>,
    /// Chunks whose recorded checksum is a CRC32C.
    crc: Bitmap,
    /// Last use of each chunk, in ticks of the cache-wide clock (for eviction under pressure).
    ticks: Box<[AtomicU32]>,
    punch: RwLock<()>,
    dirty: AtomicBool,
    last_persist: Mutex<Instant>,
    /// Whether the filesystem can `fallocate`: chunks' blocks are then reserved before their
    /// bytes are fetched (a full disk is said before the request goes out). Bytes go in with
    /// `pwrite` either way: the page cache then holds them in large folios, which the kernel
    /// copies out (passthrough reads) half again as fast as the 4 KiB pages a store through
    /// the mapping makes; the mapping serves the daemon's own reads.
    can_fallocate: bool,
    pub(super) retired: AtomicBool,
    /// Holders of the whole file (passthrough readers, whom the kernel serves straight from
    /// it): while any, no chunk is punched out.
    pins: AtomicU32,
    /// A [`CacheFile::verify_all`] is running.
    checking: AtomicBool,
    pub(super) shared: Arc<Shared>,
}

/// Holds a complete cache file whole: no chunk of it is punched out while this lives.
#[derive(Debug)]
pub struct WholePin(Arc<CacheFile>);

impl WholePin {
    pub fn file(&self) -> &Arc<CacheFile> {
        &self.0
    }
}

impl Drop for WholePin {
    fn drop(&mut self) {
        self.0.pins.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How a chunk being written is hashed: for a check against what the remote vouches for,
/// and for the record that checks the chunk again when it is found on disk after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkHash {
    /// Neither checked nor recorded (`verify = false`).
    None,
    /// blake3: the remote's tag is made of it (a version of one chunk), or the remote offers
    /// only blake3 digests.
    Blake3,
    /// CRC32C: a fifth of blake3's CPU, for chunks checked against the remote's CRC32C or
    /// only recorded.
    Crc32c,
}

/// The checksum of one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkSum {
    Blake3([u8; 32]),
    Crc32c(u32),
}

impl ChunkSum {
    /// The 32 bytes recorded in the metadata.
    fn record(&self) -> [u8; 32] {
        match self {
            ChunkSum::Blake3(d) => *d,
            ChunkSum::Crc32c(c) => {
                let mut r = [0u8; 32];
                r[..4].copy_from_slice(&c.to_be_bytes());
                r
            }
        }
    }
}

enum Hasher {
    None,
    Blake3(Box<blake3::Hasher>),
    Crc32c(Box<Crc32c>),
}

/// Writes one chunk; becomes visible to readers only through [`ChunkWriter::finish`].
pub struct ChunkWriter<'a> {
    file: &'a CacheFile,
    index: u64,
    range: Range<u64>,
    /// Bytes taken: written, or queued by [`ChunkWriter::push`].
    written: u64,
    /// Pieces taken by [`ChunkWriter::push`] and not written yet; they start at `range.start
    /// + flushed`.
    queued: VecDeque<Bytes>,
    flushed: u64,
    hasher: Hasher,
    /// The file ranges written, one per `pwritev`/`pwrite` call (for tests).
    #[cfg(test)]
    pub(super) writes: Vec<Range<u64>>,
}

/// [`ChunkWriter::push`] writes pieces in runs that start and end on multiples of this (in
/// the file's offsets; a chunk's end aside). The page cache then holds the file in folios of
/// this size. Written as the network's pieces come, at any offset, it holds them in folios of
/// 4 KiB to 256 KiB, and the kernel copies a 1 GiB file out of those in 0.048 s instead of
/// 0.042 s (a local file: 0.041 s; passthrough readers are served from here). 1 MiB runs
/// made the daemon's CPU time in a cold read two to four times longer on this machine
/// (allocating folios that large); 256 KiB ones reread in 0.042 s too. Holds at most this
/// much plus one piece per chunk being fetched. See `docs/BENCHMARKS.md`.
pub(super) const WRITE_ALIGN: u64 = 512 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {index}: expected {expected} bytes, got {got}")]
    Length { index: u64, expected: u64, got: u64 },
    #[error("chunk {index}: content does not match the remote's digest")]
    Digest { index: u64 },
    #[error("chunk {index} is being written by another fetch")]
    Busy { index: u64 },
}

fn fallocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an owned fd.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset as libc::off_t, len as libc::off_t) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an owned fd.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl CacheFile {
    /// Opens the cache file of `key`, reusing what an earlier run left when it is the same
    /// version, starting empty otherwise.
    /// `verified`: chunks this process checked before (the words of an earlier instance's
    /// `verified` bitmap), which need no second check.
    pub(super) fn open(
        shared: Arc<Shared>,
        key: VersionKey,
        data_path: PathBuf,
        meta_path: PathBuf,
        verified: Option<Vec<u64>>,
    ) -> Result<Self, CacheError> {
        let chunk_size = shared.chunk_size;
        let nchunks = key.size.div_ceil(chunk_size);
        let old = Meta::load(&meta_path).filter(|m| {
            m.format == META_FORMAT
                && m.remote == key.remote
                && m.path == key.path
                && m.etag == key.etag
                && m.size == key.size
                && m.chunk_size == chunk_size
        });
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&data_path)
        };
        // The folder is made only when missing (the first version of its prefix): trying it
        // first for every version cost a failing `mkdir` and a `stat` per file opened.
        let file = match open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => match data_path.parent() {
                Some(dir) => fs::create_dir_all(dir).and_then(|()| open()),
                None => Err(e),
            },
            other => other,
        }
        .map_err(|e| CacheError::io(&data_path, e))?;
        let (present, checksums, crc) = match old.as_ref().and_then(|m| {
            let present = Bitmap::from_hex(nchunks, &m.present)?;
            let raw = hex::decode(&m.checksums).ok()?;
            (raw.len() as u64 == nchunks * 32).then_some(())?;
            let sums = raw.chunks_exact(32).map(|c| c.try_into().unwrap_or([0; 32])).collect();
            let crc = match m.crc32c.as_str() {
                "" => Bitmap::new(nchunks),
                hex => Bitmap::from_hex(nchunks, hex)?,
            };
            Some((present, sums, crc))
        }) {
            Some(found) if file.metadata().map(|m| m.len() == key.size).unwrap_or(false) => found,
            _ => {
                // Unknown or other version: start from an empty sparse file.
                file.set_len(0).map_err(|e| CacheError::io(&data_path, e))?;
                file.set_len(key.size).map_err(|e| CacheError::io(&data_path, e))?;
                (
                    Bitmap::new(nchunks),
                    vec![[0u8; 32]; nchunks as usize],
                    Bitmap::new(nchunks),
                )
            }
        };
        let map = if key.size > 0 {
            Some(
                MmapOptions::new()
                    .len(key.size as usize)
                    .map_raw(&file)
                    .map_err(|e| CacheError::io(&data_path, e))?,
            )
        } else {
            None
        };
        let ticks = (0..nchunks).map(|_| AtomicU32::new(0)).collect();
        // Asked of the first file only: all live on the cache's filesystem.
        let can_fallocate = *shared.can_fallocate.get_or_init(|| match fallocate(&file, 0, 0) {
            // A zero length is EINVAL where fallocate works at all, EOPNOTSUPP where it does not.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => false,
            _ => true,
        });
        Ok(CacheFile {
            key,
            data_path,
            meta_path,
            file,
            map,
            chunk_size,
            verified: match verified {
                Some(words) => Bitmap::from_words_masked(nchunks, &words, &present),
                None => Bitmap::new(nchunks),
            },
            claimed: Bitmap::new(nchunks),
            present,
            checksums: Mutex::new(checksums),
            crc,
            ticks,
            punch: RwLock::new(()),
            dirty: AtomicBool::new(false),
            last_persist: Mutex::new(Instant::now()),
            can_fallocate,
            retired: AtomicBool::new(false),
            pins: AtomicU32::new(0),
            checking: AtomicBool::new(false),
            shared,
        })
    }

    /// The sparse file holding the bytes (what passthrough would hand to the kernel).
    pub fn data_path(&self) -> &Path {
        &self.data_path
    }

    pub fn key(&self) -> &VersionKey {
        &self.key
    }

    pub fn size(&self) -> u64 {
        self.key.size
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    pub fn chunks(&self) -> u64 {
        self.present.len()
    }

    /// Byte range of chunk `i`.
    pub fn chunk_range(&self, i: u64) -> Range<u64> {
        let start = i * self.chunk_size;
        start..(start + self.chunk_size).min(self.key.size)
    }

    /// Chunks that hold the bytes of `range` (which must lie within the file).
    pub fn chunks_of(&self, range: &Range<u64>) -> Range<u64> {
        if range.is_empty() {
            return 0..0;
        }
        range.start / self.chunk_size..range.end.div_ceil(self.chunk_size)
    }

    pub fn is_present(&self, i: u64) -> bool {
        self.present.get(i)
    }

    /// Present and checked in this process: safe to serve.
    pub fn is_ready(&self, i: u64) -> bool {
        self.verified.get(i) && self.present.get(i)
    }

    /// The chunks checked in this process, to hand to the next instance of this version.
    pub(super) fn verified_words(&self) -> Vec<u64> {
        self.verified.words()
    }

    pub fn present_count(&self) -> u64 {
        self.present.count()
    }

    pub fn is_complete(&self) -> bool {
        self.present.count() == self.present.len()
    }

    /// Pins the file whole if every chunk is present and checked in this process (so the
    /// kernel may read it directly, with no check of ours in between); `None` otherwise.
    pub fn pin_whole(self: &Arc<Self>) -> Option<WholePin> {
        // Under the punch lock: a punch either ran before (the file is then incomplete) or
        // sees the pin and leaves the chunk alone.
        let _g = self.punch.read();
        if !(self.is_complete() && self.verified.count() == self.verified.len()) {
            return None;
        }
        self.pins.fetch_add(1, Ordering::AcqRel);
        Some(WholePin(self.clone()))
    }

    /// Whether someone holds the file whole.
    pub fn is_pinned(&self) -> bool {
        self.pins.load(Ordering::Acquire) > 0
    }

    /// Checks every present chunk not yet checked in this process (after a restart), so that
    /// [`CacheFile::pin_whole`] can succeed. Returns whether the file is complete and checked.
    pub fn verify_all(&self) -> bool {
        // One check at a time (every open of such a file asks for one).
        if self.checking.swap(true, Ordering::AcqRel) {
            return false;
        }
        let mut ok = true;
        for i in 0..self.chunks() {
            ok &= self.verify(i);
        }
        self.checking.store(false, Ordering::Release);
        ok
    }

    /// Checks a chunk found on disk against its recorded checksum; a chunk that fails is
    /// dropped (and fetched again by the caller). Returns whether the chunk is ready.
    pub fn verify(&self, i: u64) -> bool {
        if self.is_ready(i) {
            return true;
        }
        let _g = self.punch.read();
        if !self.present.get(i) {
            return false;
        }
        let r = self.chunk_range(i);
        let ok = match &self.map {
            Some(map) => {
                // SAFETY: the chunk is present, so no writer touches it, and the punch lock
                // keeps it from becoming a hole while we read it.
                let bytes = unsafe {
                    std::slice::from_raw_parts(map.as_ptr().add(r.start as usize), (r.end - r.start) as usize)
                };
                let recorded = self.checksums.lock()[i as usize];
                let sum = if self.crc.get(i) {
                    ChunkSum::Crc32c(crc32c(bytes))
                } else {
                    ChunkSum::Blake3(*blake3::hash(bytes).as_bytes())
                };
                // All zeros: written with hashing turned off, nothing to check against.
                recorded == [0u8; 32] || sum.record() == recorded
            }
            None => true,
        };
        if ok {
            self.verified.set(i);
        } else {
            tracing::warn!(path = %self.key.path, chunk = i, "cached chunk failed its checksum; fetching it again");
            if self.present.clear(i) {
                self.shared.sub_used(r.end - r.start);
            }
            self.dirty.store(true, Ordering::Release);
        }
        ok
    }

    /// Reserves the disk blocks of `range` in one call, ahead of its chunks' writes (which
    /// reserve their own again, a no-op then). A full disk is said before anything is
    /// fetched for it; other failures are left to the chunks' writes.
    ///
    /// `ahead`: the range is part of a sequential read; the blocks of the whole 32 MiB region
    /// around it are reserved at once, so that a file read from start to end lies in a few
    /// long extents instead of one per chunk in the order the fetches landed (reading it back
    /// from disk, in passthrough mode, then runs at the disk's speed).
    pub fn reserve(&self, range: &Range<u64>, ahead: bool) -> Result<(), CacheError> {
        const REGION: u64 = 32 << 20;
        if !self.can_fallocate || range.end <= range.start {
            return Ok(());
        }
        let full = |r: &Range<u64>| {
            fallocate(&self.file, r.start, r.end - r.start).is_err_and(|e| e.raw_os_error() == Some(libc::ENOSPC))
        };
        // Only for files that fit the cache easily: reserved blocks not yet written are not
        // counted as cached bytes, and a file larger than the cache is evicted chunk by chunk.
        if ahead && self.key.size <= self.shared.max_size / 4 {
            let region =
                range.start / REGION * REGION..range.end.div_ceil(REGION).saturating_mul(REGION).min(self.key.size);
            // A disk too full for the region may still hold the range itself.
            if !full(&region) {
                return Ok(());
            }
        }
        if full(range) {
            return Err(CacheError::Full);
        }
        Ok(())
    }

    /// Prepares chunk `i` for writing: reserves its disk blocks.
    pub fn begin_chunk(&self, i: u64, hash: ChunkHash) -> Result<ChunkWriter<'_>, CacheError> {
        let writer = self.begin_reserved(i, hash)?;
        let range = self.chunk_range(i);
        let len = range.end - range.start;
        if self.can_fallocate
            && let Err(e) = fallocate(&self.file, range.start, len)
        {
            return Err(if e.raw_os_error() == Some(libc::ENOSPC) {
                CacheError::Full
            } else {
                CacheError::io(&self.data_path, e)
            });
        }
        Ok(writer)
    }

    /// Prepares chunk `i` for writing, its disk blocks already reserved by
    /// [`CacheFile::reserve`] (a fetch reserves its whole range at once: one `fallocate` per
    /// request instead of one more per chunk, each taking the file's lock that the writes of
    /// the other fetches wait on). Blocks freed meanwhile are allocated by the write itself,
    /// which reports a full disk as [`CacheError::Full`] all the same.
    pub fn begin_reserved(&self, i: u64, hash: ChunkHash) -> Result<ChunkWriter<'_>, CacheError> {
        if !self.claimed.set(i) {
            return Err(CacheError::io(
                &self.data_path,
                io::Error::other(ChunkError::Busy { index: i }),
            ));
        }
        Ok(ChunkWriter {
            file: self,
            index: i,
            range: self.chunk_range(i),
            written: 0,
            queued: VecDeque::new(),
            flushed: 0,
            #[cfg(test)]
            writes: Vec::new(),
            hasher: match hash {
                ChunkHash::None => Hasher::None,
                ChunkHash::Blake3 => Hasher::Blake3(Box::default()),
                ChunkHash::Crc32c => Hasher::Crc32c(Box::default()),
            },
        })
    }

    /// Calls `f` with the bytes of `range` when every chunk under it is ready; `None` when one
    /// is missing (the caller fetches it and tries again).
    pub fn read_with<R>(&self, range: Range<u64>, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let range = range.start.min(self.key.size)..range.end.min(self.key.size);
        if range.is_empty() {
            return Some(f(&[]));
        }
        let chunks = self.chunks_of(&range);
        let _g = self.punch.read();
        if !chunks.clone().all(|i| self.is_ready(i)) {
            return None;
        }
        let tick = self.shared.tick();
        for i in chunks {
            self.ticks[i as usize].store(tick, Ordering::Relaxed);
        }
        let map = self.map.as_ref()?;
        // SAFETY: every chunk under `range` is present (no writer touches it) and the punch
        // read lock keeps it from becoming a hole until `f` returns.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                map.as_ptr().add(range.start as usize),
                (range.end - range.start) as usize,
            )
        };
        Some(f(bytes))
    }

    /// Asks the kernel to read the cached bytes of `range` from disk ahead of their use.
    ///
    /// Only the runs of present chunks: advising a hole makes the kernel fill page cache with
    /// zeros that the fetch then overwrites (6 % of the daemon's time in a cold read, measured
    /// with `perf`).
    pub fn will_need(&self, range: Range<u64>) {
        let range = range.start.min(self.key.size)..range.end.min(self.key.size);
        let Some(map) = &self.map else { return };
        let chunks = self.chunks_of(&range);
        let mut i = chunks.start;
        while i < chunks.end {
            if !self.is_present(i) {
                i += 1;
                continue;
            }
            let first = i;
            while i < chunks.end && self.is_present(i) {
                i += 1;
            }
            let run = (first * self.chunk_size).max(range.start)..(i * self.chunk_size).min(range.end);
            // Page-align the start, as madvise requires.
            let start = run.start & !4095;
            let _ = map.advise_range(Advice::WillNeed, start as usize, (run.end - start) as usize);
        }
    }

    /// Last use of chunk `i` (for eviction).
    pub(super) fn tick_of(&self, i: u64) -> u32 {
        self.ticks[i as usize].load(Ordering::Relaxed)
    }

    /// Turns a present chunk back into a hole, freeing its disk space. Returns the bytes freed.
    pub(super) fn punch(&self, i: u64) -> u64 {
        let _g = self.punch.write();
        if self.is_pinned() || !self.present.clear(i) {
            return 0;
        }
        self.verified.clear(i);
        let r = self.chunk_range(i);
        if let Err(e) = punch_hole(&self.file, r.start, r.end - r.start) {
            tracing::warn!(path = %self.key.path, "cannot punch a hole in a cache file: {e}");
        }
        self.dirty.store(true, Ordering::Release);
        r.end - r.start
    }

    /// Whether the metadata on disk is behind (the next `persist` writes it).
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// Writes the metadata if it changed (at most once a second unless `force`).
    pub fn persist(&self, force: bool) -> Result<(), CacheError> {
        if !self.dirty.load(Ordering::Acquire) {
            return Ok(());
        }
        {
            let mut last = self.last_persist.lock();
            if !force && last.elapsed() < Duration::from_secs(1) {
                return Ok(());
            }
            *last = Instant::now();
        }
        self.dirty.store(false, Ordering::Release);
        let meta = Meta {
            format: META_FORMAT,
            remote: self.key.remote.clone(),
            path: self.key.path.clone(),
            etag: self.key.etag.clone(),
            size: self.key.size,
            chunk_size: self.chunk_size,
            present: self.present.to_hex(),
            checksums: hex::encode(self.checksums.lock().as_flattened()),
            crc32c: self.crc.to_hex(),
        };
        let tmp = self.meta_path.with_extension("meta.tmp");
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(&meta).map_err(io::Error::other)?)?;
            fs::rename(&tmp, &self.meta_path)
        };
        write().map_err(|e| {
            self.dirty.store(true, Ordering::Release);
            CacheError::io(&self.meta_path, e)
        })
    }

    /// Seconds since the epoch, for LRU bookkeeping.
    pub(super) fn now_secs() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

impl ChunkWriter<'_> {
    /// The chunk's number.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Bytes this chunk still needs.
    pub fn remaining(&self) -> u64 {
        (self.range.end - self.range.start) - self.written
    }

    fn hash(&mut self, data: &[u8]) {
        match &mut self.hasher {
            Hasher::None => {}
            Hasher::Blake3(h) => {
                h.update(data);
            }
            Hasher::Crc32c(h) => h.update(data),
        }
    }

    fn io_error(&self, e: io::Error) -> CacheError {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            CacheError::Full
        } else {
            CacheError::io(&self.file.data_path, e)
        }
    }

    /// Appends bytes to the chunk at once (after what [`ChunkWriter::push`] queued); never
    /// more than [`ChunkWriter::remaining`].
    pub fn write(&mut self, data: &[u8]) -> Result<(), CacheError> {
        let n = data.len() as u64;
        assert!(n <= self.remaining(), "chunk overflow");
        self.flush_to(self.written)?;
        self.hash(data);
        let off = self.range.start + self.written;
        self.file.file.write_all_at(data, off).map_err(|e| self.io_error(e))?;
        #[cfg(test)]
        self.writes.push(off..off + n);
        self.written += n;
        self.flushed = self.written;
        Ok(())
    }

    /// Appends a piece to the chunk, never more than [`ChunkWriter::remaining`]. Queued
    /// pieces are written together up to the last multiple of [`WRITE_ALIGN`] (in the file's
    /// offsets) they reach, and all of them once the chunk is complete.
    pub fn push(&mut self, piece: Bytes) -> Result<(), CacheError> {
        let n = piece.len() as u64;
        assert!(n <= self.remaining(), "chunk overflow");
        if n == 0 {
            return Ok(());
        }
        self.hash(&piece);
        self.written += n;
        self.queued.push_back(piece);
        let to = if self.remaining() == 0 {
            self.written
        } else {
            // In the file's offsets: a chunk need not start on a multiple.
            let a = WRITE_ALIGN;
            ((self.range.start + self.written) / a * a).saturating_sub(self.range.start)
        };
        if to > self.flushed {
            self.flush_to(to)?;
        }
        Ok(())
    }

    /// Writes the queued bytes up to chunk offset `to` (at most `written`).
    fn flush_to(&mut self, to: u64) -> Result<(), CacheError> {
        // Fewer than IOV_MAX (1024) buffers per call.
        const MAX_IOV: usize = 512;
        while self.flushed < to {
            let mut want = (to - self.flushed) as usize;
            let iov: Vec<libc::iovec> = self
                .queued
                .iter()
                .take(MAX_IOV)
                .map_while(|b| {
                    (want > 0).then(|| {
                        let len = b.len().min(want);
                        want -= len;
                        libc::iovec {
                            iov_base: b.as_ptr() as *mut libc::c_void,
                            iov_len: len,
                        }
                    })
                })
                .collect();
            let at = self.range.start + self.flushed;
            // SAFETY: the buffers are owned by `self.queued`, untouched during the call.
            let n = unsafe {
                libc::pwritev(
                    self.file.file.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len() as libc::c_int,
                    at as libc::off_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.io_error(e));
            }
            if n == 0 {
                return Err(self.io_error(io::Error::from(io::ErrorKind::WriteZero)));
            }
            #[cfg(test)]
            self.writes.push(at..at + n as u64);
            // What went out leaves the queue, a short write included.
            let mut n = n as usize;
            self.flushed += n as u64;
            while n > 0 {
                let b = &mut self.queued[0];
                let take = n.min(b.len());
                b.advance(take);
                n -= take;
                if b.is_empty() {
                    self.queued.pop_front();
                }
            }
        }
        Ok(())
    }

    /// Publishes the chunk after checking its length and, when given, the remote's checksum
    /// (of the kind the writer was begun with; one of another kind fails the check).
    pub fn finish(self, expected: Option<ChunkSum>) -> Result<(), ChunkError> {
        self.finish_with(|d| expected.is_none_or(|e| *d == e))
    }

    /// Like [`ChunkWriter::finish`], with the chunk's checksum judged by `check` (a chunk
    /// written without hashing is not checked).
    pub fn finish_with(mut self, check: impl FnOnce(&ChunkSum) -> bool) -> Result<(), ChunkError> {
        let len = self.range.end - self.range.start;
        if self.written != len || self.flushed != len {
            return Err(ChunkError::Length {
                index: self.index,
                expected: len,
                got: self.flushed,
            });
        }
        let digest = match std::mem::replace(&mut self.hasher, Hasher::None) {
            Hasher::None => None,
            Hasher::Blake3(h) => Some(ChunkSum::Blake3(*h.finalize().as_bytes())),
            Hasher::Crc32c(h) => Some(ChunkSum::Crc32c(h.finalize())),
        };
        if let Some(d) = &digest
            && !check(d)
        {
            return Err(ChunkError::Digest { index: self.index });
        }
        let f = self.file;
        {
            // Under the checksums' lock, so that a `persist` sees the record and its kind
            // together. A chunk written without hashing records zeros (nothing to check), not
            // the sum of the bytes it replaces.
            let mut sums = f.checksums.lock();
            sums[self.index as usize] = digest.map_or([0; 32], |d| d.record());
            if matches!(digest, Some(ChunkSum::Crc32c(_))) {
                f.crc.set(self.index);
            } else {
                f.crc.clear(self.index);
            }
        }
        f.ticks[self.index as usize].store(f.shared.tick(), Ordering::Relaxed);
        f.verified.set(self.index);
        if f.present.set(self.index) {
            f.shared.add_used(len);
        }
        f.dirty.store(true, Ordering::Release);
        Ok(())
    }
}

impl Drop for ChunkWriter<'_> {
    fn drop(&mut self) {
        self.file.claimed.clear(self.index);
    }
}

impl Drop for CacheFile {
    fn drop(&mut self) {
        self.shared.closed(self);
    }
}
