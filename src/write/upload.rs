//! Sends a file's changes as its [`Plan`] says: one conditional request for an append, a
//! ranged write, a truncation or a small file; an upload session for the rest, whose parts
//! (copies of the remote version's ranges, chunks the remote holds, new bytes) go in parallel
//! and are committed atomically, conditional on the version the changes apply to.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};

use super::plan::{Piece, Plan, PlanConfig, plan};
use super::staged::{Layer, RemoteVersion, Staged};
use crate::protocol;
use crate::store::{DynStore, ObjectMeta, PartReceipt, PartSource, StoreError, UploadId, WriteCondition};

#[derive(Debug, Clone, thiserror::Error)]
pub enum UploadError {
    /// Someone else changed the file on the remote since the version these changes apply to.
    #[error("the file changed on the remote meanwhile")]
    Conflict,
    #[error("{0}")]
    Store(StoreError),
    #[error("reading the local copy: {0}")]
    Local(String),
}

impl From<StoreError> for UploadError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::PreconditionFailed | StoreError::OffsetMismatch { .. } => UploadError::Conflict,
            e => UploadError::Store(e),
        }
    }
}

/// Bytes of the version being modified that were not written locally (read through the
/// cache, or fetched).
#[async_trait]
pub trait BaseSource: Send + Sync {
    async fn read(&self, range: Range<u64>) -> Result<Bytes, String>;
}

/// What a session part is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Local(Range<u64>),
    /// Read from the base layer locally and sent as bytes.
    Base(Range<u64>),
    Zero(u64),
    Copy(Range<u64>),
    /// A chunk the remote holds, and its length.
    Chunk([u8; 32], u64),
    /// Several pieces sent together as one part of new bytes (to reach a remote's minimum
    /// part size): local bytes, base bytes read locally, zeros.
    Mixed(Vec<Part>),
}

impl Part {
    fn len(&self) -> u64 {
        match self {
            Part::Local(r) | Part::Base(r) | Part::Copy(r) => r.end - r.start,
            Part::Zero(n) | Part::Chunk(_, n) => *n,
            Part::Mixed(ps) => ps.iter().map(Part::len).sum(),
        }
    }

    /// The same bytes as a piece of new bytes (a copy of the base becomes a local read of it).
    fn into_bytes(self) -> Part {
        match self {
            Part::Copy(r) => Part::Base(r),
            p => p,
        }
    }

    /// Cuts off the first `n` bytes (`0 < n < len`); `None` for parts that cannot be cut.
    fn split(self, n: u64) -> Result<(Part, Part), Part> {
        match self {
            Part::Local(r) => Ok((Part::Local(r.start..r.start + n), Part::Local(r.start + n..r.end))),
            Part::Base(r) => Ok((Part::Base(r.start..r.start + n), Part::Base(r.start + n..r.end))),
            Part::Copy(r) => Ok((Part::Copy(r.start..r.start + n), Part::Copy(r.start + n..r.end))),
            Part::Zero(len) => Ok((Part::Zero(n), Part::Zero(len - n))),
            p => Err(p),
        }
    }
}

/// Makes every part but the last at least `min` bytes (S3 refuses smaller ones): a small part
/// is sent together with what follows it as one part of new bytes, taking from a following
/// copy only what is needed (those base bytes are read locally, from the cache), so an append
/// or a small overwrite in a large object sends about `min` bytes, not the object.
fn meet_min_part_size(parts: Vec<Part>, min: u64) -> Vec<Part> {
    if min == 0 {
        return parts;
    }
    let mut out: Vec<Part> = Vec::new();
    let mut group: Vec<Part> = Vec::new();
    let mut group_len = 0u64;
    let mut queue: std::collections::VecDeque<Part> = parts.into();
    while let Some(p) = queue.pop_front() {
        if group.is_empty() && p.len() >= min {
            out.push(p);
            continue;
        }
        let need = min - group_len;
        if p.len() <= need {
            group_len += p.len();
            group.push(p.into_bytes());
        } else {
            match p.split(need) {
                Ok((head, tail)) => {
                    group.push(head.into_bytes());
                    group_len += need;
                    queue.push_front(tail);
                }
                Err(whole) => {
                    // A part that cannot be cut (a chunk by hash): taken whole.
                    group_len += whole.len();
                    group.push(whole);
                }
            }
        }
        if group_len >= min {
            out.push(Part::Mixed(std::mem::take(&mut group)));
            group_len = 0;
        }
    }
    if !group.is_empty() {
        out.push(Part::Mixed(group));
    }
    out
}

#[derive(Debug, Clone)]
pub struct Uploader {
    store: DynStore,
    cfg: PlanConfig,
    /// Parts in flight at once.
    parallel: usize,
}

/// What an upload did, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub version: RemoteVersion,
    pub plan: &'static str,
    /// New bytes sent.
    pub bytes_sent: u64,
}

impl Uploader {
    pub fn new(store: DynStore, cfg: PlanConfig, parallel: usize) -> Self {
        Uploader {
            store,
            cfg,
            parallel: parallel.max(1),
        }
    }

    pub fn config(&self) -> &PlanConfig {
        &self.cfg
    }

    /// Sends the changes of `s` to `path`. `None` when there was nothing to send.
    pub async fn upload(&self, path: &str, s: &Staged, base: &dyn BaseSource) -> Result<Option<Outcome>, UploadError> {
        let caps = self.store.capabilities();
        let p = plan(s, &caps, &self.cfg);
        let cond = match s.remote() {
            Some(r) => WriteCondition::Matches(r.etag.clone()),
            None => WriteCondition::Absent,
        };
        let (meta, name, sent) = match p {
            Plan::Nothing => return Ok(None),
            Plan::Put => self.put(path, s, base, cond).await?,
            Plan::Append { offset } => {
                let body = local(s, offset..s.size())?;
                let n = body.len() as u64;
                match self.store.append(path, offset, body, cond.clone()).await {
                    Err(StoreError::Unsupported(what)) => self.put_instead(path, s, base, cond, what).await?,
                    r => (r?, "append", n),
                }
            }
            Plan::WriteRange(r) => {
                let body = local(s, r.clone())?;
                let n = body.len() as u64;
                match self.store.write_range(path, r.start, body, cond.clone()).await {
                    Err(StoreError::Unsupported(what)) => self.put_instead(path, s, base, cond, what).await?,
                    r => (r?, "write", n),
                }
            }
            Plan::Truncate(size) => match self.store.truncate(path, size, cond.clone()).await {
                Err(StoreError::Unsupported(what)) => self.put_instead(path, s, base, cond, what).await?,
                r => (r?, "truncate", 0),
            },
            Plan::Parts => {
                let parts = s
                    .layers(0..s.size())
                    .into_iter()
                    .flat_map(|(r, l)| match l {
                        Layer::Local => vec![Part::Local(r)],
                        Layer::Base => vec![Part::Base(r)],
                        Layer::Zero => vec![Part::Zero(r.end - r.start)],
                    })
                    .collect();
                let (m, n) = self.session(path, s, base, None, parts, cond).await?;
                (m, "parts", n)
            }
            Plan::Session(ps) => {
                let parts = ps
                    .into_iter()
                    .map(|p| match p {
                        Piece::Local(r) => Part::Local(r),
                        Piece::Remote(r) => Part::Copy(r),
                        Piece::Zero(r) => Part::Zero(r.end - r.start),
                    })
                    .collect();
                let base_etag = s.remote().map(|r| r.etag.clone());
                let (m, n) = self.session(path, s, base, base_etag, parts, cond).await?;
                (m, "session", n)
            }
            Plan::Rewrite => {
                let (parts, base_etag) = self.dedupe(path, s).await?;
                let (m, n) = self.session(path, s, base, base_etag, parts, cond).await?;
                (m, "chunks", n)
            }
        };
        let version = version_of(meta)?;
        tracing::debug!(path, plan = name, bytes = sent, etag = %version.etag, "uploaded");
        Ok(Some(Outcome {
            version,
            plan: name,
            bytes_sent: sent,
        }))
    }

    async fn put(
        &self,
        path: &str,
        s: &Staged,
        base: &dyn BaseSource,
        cond: WriteCondition,
    ) -> Result<(ObjectMeta, &'static str, u64), UploadError> {
        let body = self.whole(s, base).await?;
        let n = body.len() as u64;
        Ok((self.store.put(path, body, cond).await?, "put", n))
    }

    /// The whole file instead of a partial write the remote turned out not to take.
    async fn put_instead(
        &self,
        path: &str,
        s: &Staged,
        base: &dyn BaseSource,
        cond: WriteCondition,
        what: &str,
    ) -> Result<(ObjectMeta, &'static str, u64), UploadError> {
        tracing::info!(path, "the remote does not support {what}: uploading the whole file");
        self.put(path, s, base, cond).await
    }

    /// The whole content as one body: the staged file itself (mapped, not copied) when all
    /// of it was written locally, else put together, in memory for small files and in a
    /// mapped scratch file beside the staged one for large files.
    async fn whole(&self, s: &Staged, base: &dyn BaseSource) -> Result<Bytes, UploadError> {
        /// Pieces of the base version are read in steps of this size.
        const STEP: u64 = 8 << 20;
        let size = s.size();
        let layers = s.layers(0..size);
        if let [(r, Layer::Local)] = layers.as_slice() {
            return local(s, r.clone());
        }
        if size <= STEP {
            let mut out = Vec::with_capacity(size as usize);
            for (r, l) in layers {
                match l {
                    Layer::Local => out.extend_from_slice(&local(s, r)?),
                    Layer::Base => out.extend_from_slice(&base.read(r).await.map_err(UploadError::Local)?),
                    Layer::Zero => out.resize(out.len() + (r.end - r.start) as usize, 0),
                }
            }
            return Ok(out.into());
        }
        let io = |e: std::io::Error| UploadError::Local(e.to_string());
        let scratch = s.path().with_extension("whole");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&scratch)
            .map_err(io)?;
        // Unlinked at once: the mapping keeps the bytes as long as the body lives.
        let _ = std::fs::remove_file(&scratch);
        file.set_len(size).map_err(io)?;
        for (r, l) in layers {
            let mut at = r.start;
            while at < r.end {
                let end = r.end.min(at + STEP);
                let piece = match l {
                    Layer::Local => local(s, at..end)?,
                    Layer::Base => base.read(at..end).await.map_err(UploadError::Local)?,
                    // The scratch file is sparse: holes read as zeros.
                    Layer::Zero => Bytes::new(),
                };
                std::os::unix::fs::FileExt::write_all_at(&file, &piece, at).map_err(io)?;
                at = end;
            }
        }
        super::staged::map_range(&file, 0..size).map_err(io)
    }

    /// The new content cut into content-defined chunks: copies of the remote version's
    /// chunks, chunks the remote holds elsewhere, new bytes for the rest.
    async fn dedupe(&self, path: &str, s: &Staged) -> Result<(Vec<Part>, Option<crate::store::ETag>), UploadError> {
        let file = std::fs::File::open(s.path()).map_err(|e| UploadError::Local(e.to_string()))?;
        let size = s.size();
        let chunks = tokio::task::spawn_blocking(move || -> Result<Vec<HashedChunk>, String> {
            let reader = std::io::BufReader::with_capacity(1 << 20, std::io::Read::take(file, size));
            let cdc = fastcdc::v2020::StreamCDC::new(reader, protocol::CDC_MIN, protocol::CDC_AVG, protocol::CDC_MAX);
            cdc.map(|c| {
                let c = c.map_err(|e| e.to_string())?;
                Ok((c.offset..c.offset + c.length as u64, *blake3::hash(&c.data).as_bytes()))
            })
            .collect()
        })
        .await
        .map_err(|e| UploadError::Local(e.to_string()))?
        .map_err(UploadError::Local)?;
        // Chunks of the version being replaced can be copied from it.
        let mut in_base: HashMap<[u8; 32], Range<u64>> = HashMap::new();
        let base_etag = s.remote().map(|r| r.etag.clone());
        if let Some(etag) = &base_etag {
            match self.store.chunks(path, etag).await {
                Ok(list) => {
                    for c in list {
                        let mut h = [0u8; 32];
                        if hex::decode_to_slice(&c.hash, &mut h).is_ok() {
                            in_base.entry(h).or_insert(c.offset..c.offset + c.len);
                        }
                    }
                }
                Err(StoreError::PreconditionFailed) => return Err(UploadError::Conflict),
                Err(e) => tracing::debug!(path, "no chunk list of the base: {e}"),
            }
        }
        let ask: Vec<[u8; 32]> = chunks
            .iter()
            .map(|(_, h)| *h)
            .filter(|h| !in_base.contains_key(h))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let held: HashSet<[u8; 32]> = if ask.is_empty() {
            HashSet::new()
        } else {
            let have = self.store.has_chunks(&ask).await?;
            ask.into_iter().zip(have).filter(|(_, h)| *h).map(|(c, _)| c).collect()
        };
        let mut parts: Vec<Part> = Vec::new();
        for (r, h) in chunks {
            let next = if let Some(b) = in_base.get(&h) {
                Part::Copy(b.clone())
            } else if held.contains(&h) {
                Part::Chunk(h, r.end - r.start)
            } else {
                Part::Local(r)
            };
            match (parts.last_mut(), &next) {
                (Some(Part::Local(a)), Part::Local(b)) if a.end == b.start => a.end = b.end,
                (Some(Part::Copy(a)), Part::Copy(b)) if a.end == b.start => a.end = b.end,
                _ => parts.push(next),
            }
        }
        if parts.len() > 10_000 {
            // Too many parts for one session: send new bytes in runs instead of chunk by chunk.
            parts = vec![Part::Local(0..size)];
        }
        let copies = parts_copy(&parts);
        Ok((parts, base_etag.filter(|_| copies)))
    }

    /// One upload session: parts in parallel, then an atomic commit under `cond`.
    async fn session(
        &self,
        path: &str,
        s: &Staged,
        base: &dyn BaseSource,
        base_etag: Option<crate::store::ETag>,
        parts: Vec<Part>,
        cond: WriteCondition,
    ) -> Result<(ObjectMeta, u64), UploadError> {
        // New bytes go in parts of at most `part_size` (larger for huge files, to stay within
        // 10,000 parts).
        let mut jobs: Vec<Part> = Vec::new();
        let total: u64 = parts.iter().map(Part::len).sum();
        let ps = self
            .cfg
            .part_size
            .max(1)
            .max(total.div_ceil(9_000).next_multiple_of(1 << 20));
        for p in parts {
            let is_local = matches!(p, Part::Local(_));
            match p {
                Part::Local(r) | Part::Base(r) if r.end - r.start > ps => {
                    let mut a = r.start;
                    while a < r.end {
                        let b = (a + ps).min(r.end);
                        jobs.push(if is_local { Part::Local(a..b) } else { Part::Base(a..b) });
                        a = b;
                    }
                }
                Part::Zero(n) if n > ps => {
                    let mut left = n;
                    while left > 0 {
                        let k = left.min(ps);
                        jobs.push(Part::Zero(k));
                        left -= k;
                    }
                }
                p => jobs.push(p),
            }
        }
        let jobs = meet_min_part_size(jobs, self.store.capabilities().min_part_size);
        if jobs.len() > 10_000 {
            return Err(UploadError::Store(StoreError::Unsupported("more than 10,000 parts")));
        }
        let id = self.store.begin_upload(path, base_etag).await?;
        let result = self.send_parts(&id, s, base, jobs).await;
        let receipts = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = self.store.abort_upload(&id).await;
                return Err(e);
            }
        };
        let sent = receipts.1;
        match self.store.commit_upload(&id, receipts.0, cond).await {
            Ok(m) => Ok((m, sent)),
            Err(e) => {
                let _ = self.store.abort_upload(&id).await;
                Err(e.into())
            }
        }
    }

    async fn send_parts(
        &self,
        id: &UploadId,
        s: &Staged,
        base: &dyn BaseSource,
        jobs: Vec<Part>,
    ) -> Result<(Vec<PartReceipt>, u64), UploadError> {
        let store = &self.store;
        // Each part's place in the new file, so the remote can write it in place.
        let mut at = 0u64;
        let placed: Vec<(u64, Part)> = jobs
            .into_iter()
            .map(|p| {
                let here = at;
                at += p.len();
                (here, p)
            })
            .collect();
        let mut receipts: Vec<(PartReceipt, u64)> = futures_util::stream::iter(placed.into_iter().enumerate())
            .map(|(i, (offset, job))| async move {
                let number = i as u32 + 1;
                let (src, sent) = match job {
                    Part::Local(r) => {
                        let b = local(s, r)?;
                        let n = b.len() as u64;
                        (PartSource::Bytes(b), n)
                    }
                    Part::Base(r) => {
                        let b = base.read(r).await.map_err(UploadError::Local)?;
                        let n = b.len() as u64;
                        (PartSource::Bytes(b), n)
                    }
                    Part::Zero(n) => (PartSource::Bytes(Bytes::from(vec![0u8; n as usize])), n),
                    Part::Copy(r) => (PartSource::CopyFromBase(r), 0),
                    Part::Chunk(h, _) => (PartSource::Chunk(h), 0),
                    Part::Mixed(pieces) => {
                        let mut buf = Vec::new();
                        for piece in pieces {
                            match piece {
                                Part::Local(r) => buf.extend_from_slice(&local(s, r)?),
                                Part::Base(r) | Part::Copy(r) => {
                                    buf.extend_from_slice(&base.read(r).await.map_err(UploadError::Local)?)
                                }
                                Part::Zero(n) => buf.resize(buf.len() + n as usize, 0),
                                Part::Chunk(..) | Part::Mixed(_) => {
                                    return Err(UploadError::Local("a chunk cannot be sent as bytes".into()));
                                }
                            }
                        }
                        let n = buf.len() as u64;
                        (PartSource::Bytes(Bytes::from(buf)), n)
                    }
                };
                let receipt =
                    super::stream::with_retries(|| store.upload_part(id, number, src.clone(), Some(offset))).await?;
                Ok::<_, UploadError>((receipt, sent))
            })
            .buffer_unordered(self.parallel)
            .try_collect()
            .await?;
        receipts.sort_by_key(|(r, _)| r.number);
        let sent = receipts.iter().map(|(_, n)| n).sum();
        Ok((receipts.into_iter().map(|(r, _)| r).collect(), sent))
    }
}

/// A content-defined chunk: where it is in the new content, and its blake3.
type HashedChunk = (Range<u64>, [u8; 32]);

fn parts_copy(parts: &[Part]) -> bool {
    parts.iter().any(|p| matches!(p, Part::Copy(_)))
}

/// Local bytes of `r` (all written locally).
fn local(s: &Staged, r: Range<u64>) -> Result<Bytes, UploadError> {
    s.local_bytes(r).map_err(|e| UploadError::Local(e.to_string()))
}

fn version_of(m: ObjectMeta) -> Result<RemoteVersion, UploadError> {
    let etag = m
        .etag
        .ok_or_else(|| UploadError::Store(StoreError::Protocol("no ETag for the new version".into())))?;
    Ok(RemoteVersion { etag, size: m.size })
}

#[cfg(test)]
mod tests;
