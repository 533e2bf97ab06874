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

#[derive(Debug)]
pub struct Streamer {
    store: DynStore,
    id: UploadId,
    file: Arc<File>,
    part_size: u64,
    parallel: usize,
    /// Bytes handed to part uploads so far (all from offset 0).
    sent_upto: u64,
    next_part: u32,
    tasks: JoinSet<Result<(PartReceipt, u64), StoreError>>,
    done: Vec<PartReceipt>,
    /// New bytes sent, for logs and tests.
    pub bytes_sent: u64,
}

impl Streamer {
    /// Opens the session. `file` is the staging file the parts are read from.
    pub async fn start(
        store: DynStore,
        path: &str,
        file: File,
        part_size: u64,
        parallel: usize,
    ) -> Result<Self, StoreError> {
        let id = store.begin_upload(path, None).await?;
        Ok(Streamer {
            store,
            id,
            file: Arc::new(file),
            part_size: part_size.max(1),
            parallel: parallel.max(1),
            sent_upto: 0,
            next_part: 1,
            tasks: JoinSet::new(),
            done: Vec::new(),
            bytes_sent: 0,
        })
    }

    /// Bytes already handed to part uploads; they must not change any more.
    pub fn sent_upto(&self) -> u64 {
        self.sent_upto
    }

    fn spawn(&mut self, start: u64, end: u64) {
        let (store, id, file) = (self.store.clone(), self.id.clone(), self.file.clone());
        let number = self.next_part;
        self.next_part += 1;
        self.sent_upto = end;
        self.tasks.spawn(async move {
            let len = (end - start) as usize;
            let data = crate::write::staged::map_range(&file, start..end)
                .map_err(|e| StoreError::Protocol(format!("reading the staging file: {e}")))?;
            let receipt =
                with_retries(|| store.upload_part(&id, number, PartSource::Bytes(data.clone()), Some(start))).await?;
            Ok((receipt, len as u64))
        });
    }

    async fn join_one(&mut self) -> Result<(), StoreError> {
        if let Some(r) = self.tasks.join_next().await {
            let (receipt, n) = r.map_err(|e| StoreError::Protocol(e.to_string()))??;
            self.bytes_sent += n;
            self.done.push(receipt);
        }
        Ok(())
    }

    /// The size of the next part: the configured size, growing with what was sent so that a
    /// file of any size fits in 10,000 parts.
    fn next_part_size(&self) -> u64 {
        part_size_for(self.part_size, self.sent_upto)
    }

    /// The file is written up to `written`: sends every whole part not sent yet, waiting when
    /// `parallel` parts are in flight already (so the writer never runs far ahead).
    pub async fn feed(&mut self, written: u64) -> Result<(), StoreError> {
        while written - self.sent_upto >= self.next_part_size() {
            while self.tasks.len() >= self.parallel {
                self.join_one().await?;
            }
            let start = self.sent_upto;
            let end = start + self.next_part_size();
            self.spawn(start, end);
        }
        // Collect what finished meanwhile, without waiting.
        while let Some(r) = self.tasks.try_join_next() {
            let (receipt, n) = r.map_err(|e| StoreError::Protocol(e.to_string()))??;
            self.bytes_sent += n;
            self.done.push(receipt);
        }
        Ok(())
    }

    /// Sends the rest (`size` is the file's final size) and commits under `cond`.
    pub async fn finish(mut self, size: u64, cond: WriteCondition) -> Result<(ObjectMeta, u64), StoreError> {
        if size < self.sent_upto {
            return Err(StoreError::Protocol("the file shrank below what was sent".into()));
        }
        if size > self.sent_upto || self.next_part == 1 {
            let start = self.sent_upto;
            self.spawn(start, size);
        }
        while !self.tasks.is_empty() {
            self.join_one().await?;
        }
        self.done.sort_by_key(|p| p.number);
        let parts = std::mem::take(&mut self.done);
        let meta = self.store.commit_upload(&self.id, parts, cond).await?;
        Ok((meta, self.bytes_sent))
    }

    /// Gives the session up.
    pub async fn abort(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        let _ = self.store.abort_upload(&self.id).await;
    }

    pub fn id(&self) -> &UploadId {
        &self.id
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
        let mut s = Streamer::start(store.clone(), "new.bin", File::open(&path).unwrap(), 1 << 20, 3)
            .await
            .unwrap();
        for piece in data.chunks(300_000) {
            f.write_all(piece).unwrap();
            let written = f.metadata().unwrap().len();
            s.feed(written).await.unwrap();
        }
        assert!(s.sent_upto() >= 9 << 20, "whole parts went during the writes");
        let (meta, sent) = s.finish(data.len() as u64, WriteCondition::Absent).await.unwrap();
        assert_eq!(sent, data.len() as u64);
        assert_eq!(meta.size, data.len() as u64);
        assert_eq!(&mem.object("new.bin").unwrap().0[..], &data[..]);
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
