//! Streaming upload of a file written from its start to its end (a new file, or one
//! truncated to nothing, written sequentially): whole parts go to an upload session while the
//! file is still being written, so at `close` only the last part and the commit remain.
//!
//! A write that is not sequential ends the stream (its session is aborted) and the file is
//! uploaded at `close` as any other.

use std::fs::File;
use std::sync::Arc;

use tokio::task::JoinSet;

use crate::store::{DynStore, ETag, ObjectMeta, PartReceipt, PartSource, StoreError, UploadId, WriteCondition};

/// What the writer tells the streaming task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    /// The file's size now.
    written: u64,
    /// Set by `finish`: the final size; send the rest and stop.
    last: Option<u64>,
}

#[derive(Debug)]
struct Shared {
    /// Bytes from offset 0 that parts took (being sent or sent): they must not change.
    claimed: parking_lot::Mutex<u64>,
    progress: tokio::sync::watch::Sender<Progress>,
}

/// A task sending whole parts of a staging file while it is written; the writer only says
/// how far it wrote, and never waits for the network.
#[derive(Debug)]
pub struct Streamer {
    store: DynStore,
    id: UploadId,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<Result<(Vec<PartReceipt>, u64), StoreError>>,
}

impl Streamer {
    /// Opens the session and starts the task. `file` is the staging file parts are read from.
    pub async fn start(
        store: DynStore,
        path: &str,
        file: File,
        part_size: u64,
        parallel: usize,
    ) -> Result<Self, StoreError> {
        let id = store.begin_upload(path, None).await?;
        let (tx, rx) = tokio::sync::watch::channel(Progress { written: 0, last: None });
        let shared = Arc::new(Shared {
            claimed: parking_lot::Mutex::new(0),
            progress: tx,
        });
        let task = tokio::spawn(send_parts(
            store.clone(),
            id.clone(),
            Arc::new(file),
            shared.clone(),
            rx,
            part_size.max(1),
            parallel.max(1),
        ));
        Ok(Streamer {
            store,
            id,
            shared,
            task,
        })
    }

    /// Held by a writer while it changes the staging file: the number is how far parts took
    /// the file; a write below it ends the stream.
    pub fn claims(&self) -> parking_lot::MutexGuard<'_, u64> {
        self.shared.claimed.lock()
    }

    /// Bytes parts took so far.
    pub fn sent_upto(&self) -> u64 {
        *self.shared.claimed.lock()
    }

    /// The file is `size` bytes now.
    pub fn written(&self, size: u64) {
        self.shared.progress.send_modify(|p| p.written = p.written.max(size));
    }

    /// Sends the rest (`size`: the final size) and commits under `cond`. Returns the new
    /// version and the bytes sent.
    pub async fn finish(self, size: u64, cond: WriteCondition) -> Result<(ObjectMeta, u64), StoreError> {
        if size < self.sent_upto() {
            self.abort().await;
            return Err(StoreError::Protocol("the file shrank below what was sent".into()));
        }
        self.shared.progress.send_modify(|p| {
            p.written = size;
            p.last = Some(size);
        });
        let (mut parts, sent) = self.task.await.map_err(|e| StoreError::Protocol(e.to_string()))??;
        parts.sort_by_key(|p| p.number);
        let meta = self.store.commit_upload(&self.id, parts, cond).await?;
        Ok((meta, sent))
    }

    /// Gives the session up.
    pub async fn abort(self) {
        self.task.abort();
        let _ = self.task.await;
        let _ = self.store.abort_upload(&self.id).await;
    }

    pub fn id(&self) -> &UploadId {
        &self.id
    }
}

/// The streaming task: takes whole parts as the writer goes (the last one may be short), at
/// most `parallel` in flight.
async fn send_parts(
    store: DynStore,
    id: UploadId,
    file: Arc<File>,
    shared: Arc<Shared>,
    mut rx: tokio::sync::watch::Receiver<Progress>,
    base: u64,
    parallel: usize,
) -> Result<(Vec<PartReceipt>, u64), StoreError> {
    let mut tasks: JoinSet<Result<(PartReceipt, u64), StoreError>> = JoinSet::new();
    let mut done = Vec::new();
    let mut sent = 0u64;
    let mut next_part = 1u32;
    loop {
        let p = *rx.borrow_and_update();
        let limit = p.last.unwrap_or(p.written);
        loop {
            let claimed = *shared.claimed.lock();
            let size = part_size_for(base, claimed);
            let ready = match p.last {
                Some(_) => limit > claimed || next_part == 1,
                None => limit >= claimed + size,
            };
            if !ready {
                break;
            }
            while tasks.len() >= parallel {
                if let Some(r) = tasks.join_next().await {
                    let (receipt, n) = r.map_err(|e| StoreError::Protocol(e.to_string()))??;
                    sent += n;
                    done.push(receipt);
                }
            }
            let end = (claimed + size).min(limit);
            // Claim first: from now on a write below `end` ends the stream instead of
            // changing bytes that are being sent.
            *shared.claimed.lock() = end;
            let (store, id, file) = (store.clone(), id.clone(), file.clone());
            let number = next_part;
            next_part += 1;
            tasks.spawn(async move {
                let data = crate::write::staged::map_range(&file, claimed..end)
                    .map_err(|e| StoreError::Protocol(format!("reading the staging file: {e}")))?;
                let receipt =
                    with_retries(|| store.upload_part(&id, number, PartSource::Bytes(data.clone()), Some(claimed)))
                        .await?;
                drop(data);
                // Not waited for: the disk write must not hold up the next part.
                tokio::task::spawn_blocking(move || release_pages(&file, claimed..end));
                Ok((receipt, end - claimed))
            });
        }
        if let Some(last) = p.last
            && *shared.claimed.lock() >= last
            && next_part > 1
        {
            while let Some(r) = tasks.join_next().await {
                let (receipt, n) = r.map_err(|e| StoreError::Protocol(e.to_string()))??;
                sent += n;
                done.push(receipt);
            }
            return Ok((done, sent));
        }
        // Collect what finished meanwhile, then wait for the writer.
        while let Some(r) = tasks.try_join_next() {
            let (receipt, n) = r.map_err(|e| StoreError::Protocol(e.to_string()))??;
            sent += n;
            done.push(receipt);
        }
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return Err(StoreError::Protocol("the stream was dropped".into()));
                }
            }
            Some(r) = tasks.join_next(), if !tasks.is_empty() => {
                let (receipt, n) = r.map_err(|e| StoreError::Protocol(e.to_string()))??;
                sent += n;
                done.push(receipt);
            }
        }
    }
}

/// Writes a sent part's range of the staging file to disk and lets the kernel take its pages
/// back. The staging file stays the file's local copy (read from disk from now on), and the
/// pages are freed while still warm, so the writer's next pages reuse them: a 1 GiB file then
/// needs a few parts' worth of page cache, not 1 GiB of freshly allocated memory. (On a VM
/// whose balloon hands free memory back to the host, fresh memory costs most of a write:
/// see docs/BENCHMARKS.md.)
fn release_pages(file: &File, range: std::ops::Range<u64>) {
    use std::os::fd::AsRawFd;
    let (off, len) = (range.start as libc::off64_t, (range.end - range.start) as libc::off64_t);
    // SAFETY: plain syscalls on an open descriptor; failures only leave the pages cached.
    unsafe {
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        if libc::sync_file_range(file.as_raw_fd(), off, len, flags) == 0 {
            libc::posix_fadvise(file.as_raw_fd(), off, len, libc::POSIX_FADV_DONTNEED);
        }
    }
}

/// Part size for a part starting at `offset`: `base`, or larger for huge files, so that parts
/// stay below 10,000 (a file of `offset` bytes has used at most `offset / base` parts; the size
/// doubles every 1,000 parts).
pub fn part_size_for(base: u64, offset: u64) -> u64 {
    let base = base.max(1);
    let mut size = base;
    let mut covered = 0u64;
    // Parts 1..=1000 are `base`, the next 1000 twice that, and so on.
    loop {
        let span = size.saturating_mul(1000);
        if offset < covered.saturating_add(span) {
            return size;
        }
        covered = covered.saturating_add(span);
        size = size.saturating_mul(2);
    }
}

/// Runs a store call again on a transient failure (three more tries, with backoff).
pub async fn with_retries<T, F, Fut>(f: F) -> Result<T, StoreError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    use backon::Retryable;
    f.retry(
        backon::ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(std::time::Duration::from_millis(200))
            .with_max_times(3),
    )
    .when(StoreError::is_transient)
    .await
}

/// Whether most content-defined chunks of `prefix` are held by the remote already (in the
/// version `base` of `path`, or anywhere): then the file is better sent by chunks at close
/// than streamed.
pub async fn mostly_known(store: &DynStore, path: &str, base: Option<&ETag>, prefix: &[u8]) -> bool {
    let mut chunks = crate::protocol::cdc_chunks(prefix);
    // The last chunk of a prefix ends where the prefix ends, not where the content cuts.
    chunks.pop();
    if chunks.is_empty() {
        return false;
    }
    let mut known = 0usize;
    let mut ask = Vec::new();
    let in_base: std::collections::HashSet<String> = match base {
        Some(etag) => store
            .chunks(path, etag)
            .await
            .map(|l| l.into_iter().map(|c| c.hash).collect())
            .unwrap_or_default(),
        None => Default::default(),
    };
    for c in &chunks {
        if in_base.contains(&c.hash) {
            known += 1;
        } else {
            let mut h = [0u8; 32];
            if hex::decode_to_slice(&c.hash, &mut h).is_ok() {
                ask.push(h);
            }
        }
    }
    if !ask.is_empty()
        && let Ok(have) = store.has_chunks(&ask).await
    {
        known += have.iter().filter(|h| **h).count();
    }
    known * 2 >= chunks.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::testing::noise;
    use std::io::Write;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parts_go_while_the_file_is_written() {
        let mem = Arc::new(MemoryStore::new());
        let store: DynStore = mem.clone();
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s");
        let mut f = File::create(&path).unwrap();
        let data = noise(10 << 20, 1);
        let s = Streamer::start(store.clone(), "new.bin", File::open(&path).unwrap(), 1 << 20, 3)
            .await
            .unwrap();
        for piece in data.chunks(300_000) {
            let claims = s.claims();
            f.write_all(piece).unwrap();
            drop(claims);
            s.written(f.metadata().unwrap().len());
        }
        for _ in 0..200 {
            if mem.stats.bytes_received.load(std::sync::atomic::Ordering::Relaxed) >= 9 << 20 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(s.sent_upto() >= 9 << 20, "whole parts went during the writes");
        let (meta, sent) = s.finish(data.len() as u64, WriteCondition::Absent).await.unwrap();
        assert_eq!(sent, data.len() as u64);
        assert_eq!(meta.size, data.len() as u64);
        assert_eq!(&mem.object("new.bin").unwrap().0[..], &data[..]);
        // The sent parts' pages were written to disk and given back to the kernel.
        if !on_tmpfs(&path) {
            let mut cached = usize::MAX;
            for _ in 0..200 {
                let f = File::open(&path).unwrap();
                cached = crate::testing::resident_pages(&f, data.len());
                if cached == 0 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            assert_eq!(cached, 0, "pages of sent parts stayed in the page cache");
        }
        assert_eq!(std::fs::read(&path).unwrap(), data, "the staging file keeps the bytes");
    }

    fn on_tmpfs(p: &std::path::Path) -> bool {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid C string and out-pointer.
        unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC }
    }

    #[test]
    fn part_sizes_grow_so_that_any_file_fits_in_10000_parts() {
        let base = 8 << 20;
        assert_eq!(part_size_for(base, 0), base);
        assert_eq!(part_size_for(base, 999 * base), base);
        assert_eq!(part_size_for(base, 1000 * base), 2 * base);
        // 10,000 parts reach far beyond 80 GiB.
        let mut off = 0u64;
        for _ in 0..10_000 {
            off += part_size_for(base, off);
        }
        assert!(off > 5 << 40, "{off}");
    }

    #[tokio::test]
    async fn known_content_is_recognised() {
        let mem = Arc::new(MemoryStore::new());
        let data = noise(8 << 20, 2);
        let t = mem.insert("old.bin", data.clone());
        let store: DynStore = mem.clone();
        assert!(mostly_known(&store, "x", None, &data).await, "held elsewhere");
        assert!(mostly_known(&store, "old.bin", Some(&t), &data).await, "in the base");
        assert!(!mostly_known(&store, "x", None, &noise(8 << 20, 6)).await);
        // An empty stream commits an empty file.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("e");
        File::create(&p).unwrap();
        let s = Streamer::start(store.clone(), "empty", File::open(&p).unwrap(), 1 << 20, 2)
            .await
            .unwrap();
        s.finish(0, WriteCondition::Absent).await.unwrap();
        assert_eq!(mem.object("empty").unwrap().0.len(), 0);
    }
}
