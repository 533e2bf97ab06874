//! An in-memory remote with the semantics of the strictest real one: versions identified by
//! content-derived ETags, conditional requests, directories implied by keys (as in S3) or
//! made explicitly, and upload sessions that combine new bytes with ranges of a base version.
//! Unit tests of the engine run against it; it also counts what it serves.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;

use super::{
    Capabilities, Content, Digests, DirEntry, ETag, EntryKind, GetResponse, Head, Listing, ObjectMeta, PartReceipt,
    PartSource, Revalidated, Store, StoreError, StoreResult, UploadId, WriteCondition,
};
use crate::protocol;

/// Chunk size of the digests this store serves (as the built-in server).
pub const CHUNK: u64 = protocol::DIGEST_CHUNK_SIZE;

#[derive(Debug, Clone)]
struct Object {
    data: Bytes,
    etag: ETag,
    mtime: SystemTime,
}

#[derive(Debug)]
struct Upload {
    path: String,
    base: Option<(ETag, Bytes)>,
    parts: BTreeMap<u32, Bytes>,
}

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<String, Object>,
    dirs: BTreeSet<String>,
    uploads: HashMap<String, Upload>,
    next_upload: u64,
}

/// Counters of what the store served.
#[derive(Debug, Default)]
pub struct MemoryStats {
    pub lists: AtomicU64,
    pub heads: AtomicU64,
    pub gets: AtomicU64,
    pub digests: AtomicU64,
    pub bytes_served: AtomicU64,
    /// New bytes received by writes (put, append, write, byte parts).
    pub bytes_received: AtomicU64,
}

#[derive(Debug)]
pub struct MemoryStore {
    id: String,
    caps: Capabilities,
    /// Stream bodies in pieces of this size, as a network would.
    piece: usize,
    /// Serve CRC32C beside the blake3 digests (a server older than them does not).
    crc32c: bool,
    state: Mutex<State>,
    pub stats: MemoryStats,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

fn etag_of(data: &[u8]) -> ETag {
    let digests = protocol::chunk_digests(data, CHUNK);
    ETag::from_bare(&protocol::etag_from_digests(data.len() as u64, CHUNK, &digests))
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore {
            id: "memory://test".into(),
            caps: Capabilities {
                ranged_reads: true,
                listing_etags: true,
                digest_chunk_size: Some(CHUNK),
                etags_from_digests: true,
                writes: true,
                partial_writes: true,
                server_side_copy: true,
                rename: true,
                content_chunks: true,
                min_part_size: 0,
                ..Capabilities::read_only()
            },
            piece: 64 << 10,
            crc32c: true,
            state: Mutex::new(State::default()),
            stats: MemoryStats::default(),
        }
    }

    pub fn with_capabilities(mut self, caps: Capabilities) -> Self {
        self.caps = caps;
        self
    }

    /// Serves blake3 digests only, as a server from before CRC32C.
    pub fn without_crc32c(mut self) -> Self {
        self.crc32c = false;
        self
    }

    pub fn with_id(mut self, id: &str) -> Self {
        self.id = id.into();
        self
    }

    /// Sets `path` to `data` (a new version), as another writer of the remote would.
    pub fn insert(&self, path: &str, data: impl Into<Bytes>) -> ETag {
        let data = data.into();
        let etag = etag_of(&data);
        self.state.lock().objects.insert(
            path.to_string(),
            Object {
                data,
                etag: etag.clone(),
                mtime: SystemTime::now(),
            },
        );
        etag
    }

    pub fn remove(&self, path: &str) {
        self.state.lock().objects.remove(path);
    }

    pub fn object(&self, path: &str) -> Option<(Bytes, ETag)> {
        self.state
            .lock()
            .objects
            .get(path)
            .map(|o| (o.data.clone(), o.etag.clone()))
    }

    pub fn bytes_served(&self) -> u64 {
        self.stats.bytes_served.load(Ordering::Relaxed)
    }

    fn current(&self, path: &str) -> StoreResult<Object> {
        self.state.lock().objects.get(path).cloned().ok_or(StoreError::NotFound)
    }

    fn is_dir(state: &State, path: &str) -> bool {
        if path.is_empty() || state.dirs.contains(path) {
            return true;
        }
        let prefix = format!("{path}/");
        state
            .objects
            .range(prefix.clone()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(&prefix))
            || state
                .dirs
                .range(prefix.clone()..)
                .next()
                .is_some_and(|k| k.starts_with(&prefix))
    }

    fn check(cond: &WriteCondition, current: Option<&Object>) -> StoreResult<()> {
        match (cond, current) {
            (WriteCondition::None, _) => Ok(()),
            (WriteCondition::Matches(t), Some(o)) if &o.etag == t => Ok(()),
            (WriteCondition::Absent, None) => Ok(()),
            _ => Err(StoreError::PreconditionFailed),
        }
    }

    fn store_object(state: &mut State, path: &str, data: Bytes) -> ObjectMeta {
        let etag = etag_of(&data);
        let mtime = SystemTime::now();
        let size = data.len() as u64;
        state.objects.insert(
            path.to_string(),
            Object {
                data,
                etag: etag.clone(),
                mtime,
            },
        );
        ObjectMeta {
            size,
            mtime,
            etag: Some(etag),
            max_age: None,
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn id(&self) -> &str {
        &self.id
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    async fn list(&self, dir: &str, validator: Option<&str>) -> StoreResult<Revalidated<Listing>> {
        self.stats.lists.fetch_add(1, Ordering::Relaxed);
        let state = self.state.lock();
        if !Self::is_dir(&state, dir) {
            return Err(StoreError::NotFound);
        }
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let mut entries: BTreeMap<String, DirEntry> = BTreeMap::new();
        for (k, o) in state.objects.range(prefix.clone()..) {
            let Some(rest) = k.strip_prefix(&prefix) else { break };
            match rest.split_once('/') {
                None => {
                    entries.insert(
                        rest.to_string(),
                        DirEntry {
                            name: rest.to_string(),
                            kind: EntryKind::File,
                            size: o.data.len() as u64,
                            mtime: o.mtime,
                            etag: self.caps.listing_etags.then(|| o.etag.clone()),
                        },
                    );
                }
                Some((sub, _)) => {
                    entries.entry(sub.to_string()).or_insert_with(|| DirEntry {
                        name: sub.to_string(),
                        kind: EntryKind::Dir,
                        size: 0,
                        mtime: SystemTime::UNIX_EPOCH,
                        etag: None,
                    });
                }
            }
        }
        for d in state.dirs.range(prefix.clone()..) {
            let Some(rest) = d.strip_prefix(&prefix) else { break };
            let sub = rest.split('/').next().unwrap_or(rest);
            if !sub.is_empty() {
                entries.entry(sub.to_string()).or_insert_with(|| DirEntry {
                    name: sub.to_string(),
                    kind: EntryKind::Dir,
                    size: 0,
                    mtime: SystemTime::UNIX_EPOCH,
                    etag: None,
                });
            }
        }
        let entries: Vec<DirEntry> = entries.into_values().collect();
        let mut h = blake3::Hasher::new();
        for e in &entries {
            h.update(e.name.as_bytes());
            h.update(&[0]);
            h.update(&e.size.to_le_bytes());
            if let Some(t) = &e.etag {
                h.update(t.as_str().as_bytes());
            }
        }
        let v = h.finalize().to_hex().to_string();
        if validator == Some(v.as_str()) {
            return Ok(Revalidated::NotModified);
        }
        Ok(Revalidated::Modified(Listing {
            entries,
            validator: Some(v),
            max_age: None,
        }))
    }

    async fn head(&self, path: &str, if_none_match: Option<&ETag>) -> StoreResult<Revalidated<Head>> {
        self.stats.heads.fetch_add(1, Ordering::Relaxed);
        let state = self.state.lock();
        if let Some(o) = state.objects.get(path) {
            if if_none_match == Some(&o.etag) {
                return Ok(Revalidated::NotModified);
            }
            return Ok(Revalidated::Modified(Head::File(ObjectMeta {
                size: o.data.len() as u64,
                mtime: o.mtime,
                etag: Some(o.etag.clone()),
                max_age: None,
            })));
        }
        if Self::is_dir(&state, path) {
            return Ok(Revalidated::Modified(Head::Dir {
                mtime: SystemTime::UNIX_EPOCH,
            }));
        }
        Err(StoreError::NotFound)
    }

    async fn get(&self, path: &str, range: Option<Range<u64>>, if_match: Option<&ETag>) -> StoreResult<GetResponse> {
        self.stats.gets.fetch_add(1, Ordering::Relaxed);
        let obj = self.current(path)?;
        if let Some(t) = if_match
            && *t != obj.etag
        {
            return Err(StoreError::PreconditionFailed);
        }
        let size = obj.data.len() as u64;
        let (data, content) = match range.filter(|_| self.caps.ranged_reads) {
            Some(r) => {
                if r.start >= size || r.is_empty() {
                    return Err(StoreError::RangeNotSatisfiable { size: Some(size) });
                }
                let end = r.end.min(size);
                (
                    obj.data.slice(r.start as usize..end as usize),
                    Content::Partial {
                        range: r.start..end,
                        total: Some(size),
                    },
                )
            }
            None => (obj.data.clone(), Content::Whole { size: Some(size) }),
        };
        let pieces: Vec<StoreResult<Bytes>> = (0..data.len())
            .step_by(self.piece.max(1))
            .map(|i| Ok(data.slice(i..(i + self.piece).min(data.len()))))
            .collect();
        let served = &self.stats.bytes_served;
        served.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(GetResponse {
            etag: Some(obj.etag),
            content,
            body: futures_util::stream::iter(pieces).boxed(),
        })
    }

    async fn digests(&self, path: &str, etag: &ETag) -> StoreResult<Option<Digests>> {
        let Some(chunk) = self.caps.digest_chunk_size else {
            return Ok(None);
        };
        self.stats.digests.fetch_add(1, Ordering::Relaxed);
        let obj = self.current(path)?;
        if obj.etag != *etag {
            return Err(StoreError::PreconditionFailed);
        }
        Ok(Some(Digests {
            chunk_size: chunk,
            digests: protocol::chunk_digests(&obj.data, chunk),
            crc32c: self.crc32c.then(|| protocol::chunk_crc32c(&obj.data, chunk)),
        }))
    }

    async fn put(&self, path: &str, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        self.stats
            .bytes_received
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        let mut state = self.state.lock();
        Self::check(&cond, state.objects.get(path))?;
        Ok(Self::store_object(&mut state, path, body))
    }

    async fn delete(&self, path: &str, cond: WriteCondition) -> StoreResult<()> {
        let mut state = self.state.lock();
        let current = state.objects.get(path).ok_or(StoreError::NotFound)?;
        Self::check(&cond, Some(current))?;
        state.objects.remove(path);
        Ok(())
    }

    async fn mkdir(&self, path: &str) -> StoreResult<()> {
        let mut state = self.state.lock();
        if state.objects.contains_key(path) || Self::is_dir(&state, path) {
            return Err(StoreError::Conflict("exists".into()));
        }
        let parent = path.rsplit_once('/').map_or("", |(p, _)| p);
        if !Self::is_dir(&state, parent) {
            return Err(StoreError::Conflict("no_parent".into()));
        }
        state.dirs.insert(path.to_string());
        Ok(())
    }

    async fn rmdir(&self, path: &str) -> StoreResult<()> {
        let mut state = self.state.lock();
        let prefix = format!("{path}/");
        if state.objects.keys().any(|k| k.starts_with(&prefix)) || state.dirs.iter().any(|d| d.starts_with(&prefix)) {
            return Err(StoreError::Conflict("not_empty".into()));
        }
        if !state.dirs.remove(path) {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn rename(&self, from: &str, to: &str, cond: WriteCondition) -> StoreResult<()> {
        if !self.caps.rename {
            return Err(StoreError::Unsupported("rename"));
        }
        let mut state = self.state.lock();
        if let Some(obj) = state.objects.get(from) {
            Self::check(&cond, Some(obj))?;
            if Self::is_dir(&state, to) {
                return Err(StoreError::Conflict("is_dir".into()));
            }
            let obj = state.objects.remove(from).ok_or(StoreError::NotFound)?;
            state.objects.insert(to.to_string(), obj);
            return Ok(());
        }
        if !Self::is_dir(&state, from) || from.is_empty() {
            return Err(StoreError::NotFound);
        }
        if to.starts_with(&format!("{from}/")) {
            return Err(StoreError::Conflict("bad_move".into()));
        }
        // A folder: everything under it moves.
        let (old, new) = (format!("{from}/"), format!("{to}/"));
        let keys: Vec<String> = state.objects.keys().filter(|k| k.starts_with(&old)).cloned().collect();
        for k in keys {
            if let Some(o) = state.objects.remove(&k) {
                state.objects.insert(format!("{new}{}", &k[old.len()..]), o);
            }
        }
        let dirs: Vec<String> = state
            .dirs
            .iter()
            .filter(|d| *d == from || d.starts_with(&old))
            .cloned()
            .collect();
        for d in dirs {
            state.dirs.remove(&d);
            state.dirs.insert(format!("{to}{}", &d[from.len()..]));
        }
        Ok(())
    }

    async fn append(&self, path: &str, offset: u64, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        if !self.caps.partial_writes {
            return Err(StoreError::Unsupported("append"));
        }
        self.stats
            .bytes_received
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        let mut state = self.state.lock();
        let current = state.objects.get(path);
        Self::check(&cond, current)?;
        let old = current.map(|o| o.data.clone()).ok_or(StoreError::NotFound)?;
        if old.len() as u64 != offset {
            return Err(StoreError::OffsetMismatch { size: old.len() as u64 });
        }
        let mut data = Vec::with_capacity(old.len() + body.len());
        data.extend_from_slice(&old);
        data.extend_from_slice(&body);
        Ok(Self::store_object(&mut state, path, data.into()))
    }

    async fn write_range(&self, path: &str, offset: u64, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        if !self.caps.partial_writes {
            return Err(StoreError::Unsupported("ranged writes"));
        }
        self.stats
            .bytes_received
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        let mut state = self.state.lock();
        let current = state.objects.get(path);
        Self::check(&cond, current)?;
        let mut data = current.map(|o| o.data.to_vec()).ok_or(StoreError::NotFound)?;
        if offset > data.len() as u64 {
            return Err(StoreError::RangeNotSatisfiable {
                size: Some(data.len() as u64),
            });
        }
        let end = offset as usize + body.len();
        if end > data.len() {
            data.resize(end, 0);
        }
        data[offset as usize..end].copy_from_slice(&body);
        Ok(Self::store_object(&mut state, path, data.into()))
    }

    async fn truncate(&self, path: &str, size: u64, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        if !self.caps.partial_writes {
            return Err(StoreError::Unsupported("truncate"));
        }
        let mut state = self.state.lock();
        let current = state.objects.get(path);
        Self::check(&cond, current)?;
        let mut data = current.map(|o| o.data.to_vec()).ok_or(StoreError::NotFound)?;
        data.resize(size as usize, 0);
        Ok(Self::store_object(&mut state, path, data.into()))
    }

    async fn chunks(&self, path: &str, etag: &ETag) -> StoreResult<Vec<protocol::CdcChunk>> {
        let obj = self.current(path)?;
        if obj.etag != *etag {
            return Err(StoreError::PreconditionFailed);
        }
        Ok(protocol::cdc_chunks(&obj.data))
    }

    async fn has_chunks(&self, hashes: &[[u8; 32]]) -> StoreResult<Vec<bool>> {
        let state = self.state.lock();
        let held: std::collections::HashSet<String> = state
            .objects
            .values()
            .flat_map(|o| protocol::cdc_chunks(&o.data))
            .map(|c| c.hash)
            .collect();
        Ok(hashes.iter().map(|h| held.contains(&hex::encode(h))).collect())
    }

    async fn begin_upload(&self, path: &str, base: Option<ETag>) -> StoreResult<UploadId> {
        let mut state = self.state.lock();
        let base = match base {
            None => None,
            Some(t) => {
                let o = state.objects.get(path).ok_or(StoreError::NotFound)?;
                if o.etag != t {
                    return Err(StoreError::PreconditionFailed);
                }
                Some((t, o.data.clone()))
            }
        };
        state.next_upload += 1;
        let id = format!("u{}", state.next_upload);
        state.uploads.insert(
            id.clone(),
            Upload {
                path: path.to_string(),
                base,
                parts: BTreeMap::new(),
            },
        );
        Ok(UploadId {
            path: path.to_string(),
            id,
        })
    }

    async fn upload_part(
        &self,
        id: &UploadId,
        number: u32,
        src: PartSource,
        _at: Option<u64>,
    ) -> StoreResult<PartReceipt> {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let up = state.uploads.get_mut(&id.id).ok_or(StoreError::NoSuchUpload)?;
        if let PartSource::Bytes(b) = &src {
            self.stats.bytes_received.fetch_add(b.len() as u64, Ordering::Relaxed);
        }
        let data = match src {
            // Received, as a remote would: the caller's buffer (often a mapping of a staging
            // file) is not kept.
            PartSource::Bytes(b) => bytes::Bytes::copy_from_slice(&b),
            PartSource::Chunk(hash) => {
                let hex = hex::encode(hash);
                let found = state.objects.values().find_map(|o| {
                    protocol::cdc_chunks(&o.data)
                        .into_iter()
                        .find(|c| c.hash == hex)
                        .map(|c| o.data.slice(c.offset as usize..(c.offset + c.len) as usize))
                });
                found.ok_or(StoreError::UnknownChunk)?
            }
            PartSource::CopyFromBase(r) => {
                let (_, base) = up.base.as_ref().ok_or(StoreError::Unsupported("copy without a base"))?;
                if r.end > base.len() as u64 || r.start > r.end {
                    return Err(StoreError::RangeNotSatisfiable {
                        size: Some(base.len() as u64),
                    });
                }
                base.slice(r.start as usize..r.end as usize)
            }
        };
        let tag = blake3::hash(&data).to_hex().to_string();
        let len = data.len() as u64;
        up.parts.insert(number, data);
        Ok(PartReceipt { number, tag, len })
    }

    async fn commit_upload(
        &self,
        id: &UploadId,
        parts: Vec<PartReceipt>,
        cond: WriteCondition,
    ) -> StoreResult<ObjectMeta> {
        let mut state = self.state.lock();
        let up = state.uploads.remove(&id.id).ok_or(StoreError::NoSuchUpload)?;
        let mut out = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let data = up
                .parts
                .get(&p.number)
                .ok_or(StoreError::Protocol(format!("part {} missing", p.number)))?;
            if blake3::hash(data).to_hex().as_str() != p.tag {
                return Err(StoreError::Protocol(format!("part {} changed", p.number)));
            }
            if i + 1 < parts.len() && (data.len() as u64) < self.caps.min_part_size {
                return Err(StoreError::Refused {
                    status: 400,
                    message: format!("part {} smaller than the minimum", p.number),
                });
            }
            out.extend_from_slice(data);
        }
        Self::check(&cond, state.objects.get(&up.path))?;
        let path = up.path.clone();
        Ok(Self::store_object(&mut state, &path, out.into()))
    }

    async fn abort_upload(&self, id: &UploadId) -> StoreResult<()> {
        self.state
            .lock()
            .uploads
            .remove(&id.id)
            .ok_or(StoreError::NoSuchUpload)
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(r: GetResponse) -> Vec<u8> {
        let mut out = Vec::new();
        let mut body = r.body;
        while let Some(b) = body.next().await {
            out.extend_from_slice(&b.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn listing_implies_directories_and_revalidates() {
        let s = MemoryStore::new();
        s.insert("a/b/c.bin", vec![1u8; 10]);
        s.insert("a/x", vec![2u8; 3]);
        let Revalidated::Modified(l) = s.list("a", None).await.unwrap() else {
            panic!()
        };
        let names: Vec<_> = l.entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
        assert_eq!(names, vec![("b", EntryKind::Dir), ("x", EntryKind::File)]);
        assert_eq!(
            s.list("a", l.validator.as_deref()).await.unwrap(),
            Revalidated::NotModified
        );
        s.insert("a/y", vec![0u8]);
        assert!(matches!(
            s.list("a", l.validator.as_deref()).await.unwrap(),
            Revalidated::Modified(_)
        ));
        assert_eq!(
            s.list("nope", None).await.unwrap_err().to_string(),
            StoreError::NotFound.to_string()
        );
    }

    #[tokio::test]
    async fn conditional_get_and_ranges() {
        let s = MemoryStore::new();
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let t = s.insert("f", data.clone());
        let r = s.get("f", Some(10..100_010), Some(&t)).await.unwrap();
        assert_eq!(
            r.content,
            Content::Partial {
                range: 10..100_010,
                total: Some(200_000)
            }
        );
        assert_eq!(read_all(r).await, &data[10..100_010]);
        s.insert("f", vec![9u8; 5]);
        assert!(matches!(
            s.get("f", Some(0..1), Some(&t)).await,
            Err(StoreError::PreconditionFailed)
        ));
        assert!(matches!(
            s.get("f", Some(5..6), None).await,
            Err(StoreError::RangeNotSatisfiable { size: Some(5) })
        ));
    }

    #[tokio::test]
    async fn upload_session_combines_new_bytes_and_base_ranges() {
        let s = MemoryStore::new().with_capabilities(Capabilities {
            min_part_size: 4,
            ..MemoryStore::new().capabilities()
        });
        let base = s.insert("f", b"0123456789".to_vec());
        let id = s.begin_upload("f", Some(base.clone())).await.unwrap();
        let p2 = s
            .upload_part(&id, 2, PartSource::Bytes(Bytes::from_static(b"XY")), None)
            .await
            .unwrap();
        let p1 = s
            .upload_part(&id, 1, PartSource::CopyFromBase(0..8), None)
            .await
            .unwrap();
        // Someone else writes in between: the commit must not overwrite them.
        let theirs = s.insert("f", b"theirs".to_vec());
        let err = s
            .commit_upload(&id, vec![p1.clone(), p2.clone()], WriteCondition::Matches(base))
            .await;
        assert!(matches!(err, Err(StoreError::PreconditionFailed)));
        assert_eq!(s.object("f").unwrap().1, theirs);

        let base = s.insert("f", b"0123456789".to_vec());
        let id = s.begin_upload("f", Some(base.clone())).await.unwrap();
        let p2 = s
            .upload_part(&id, 2, PartSource::Bytes(Bytes::from_static(b"XY")), None)
            .await
            .unwrap();
        let p1 = s
            .upload_part(&id, 1, PartSource::CopyFromBase(0..8), None)
            .await
            .unwrap();
        let meta = s
            .commit_upload(&id, vec![p1, p2], WriteCondition::Matches(base))
            .await
            .unwrap();
        assert_eq!(&s.object("f").unwrap().0[..], b"01234567XY");
        assert_eq!(meta.etag, Some(etag_of(b"01234567XY")));
    }

    #[tokio::test]
    async fn append_names_its_offset() {
        let s = MemoryStore::new();
        let t = s.insert("log", b"abc".to_vec());
        assert!(matches!(
            s.append("log", 2, Bytes::from_static(b"d"), WriteCondition::None).await,
            Err(StoreError::OffsetMismatch { size: 3 })
        ));
        s.append("log", 3, Bytes::from_static(b"d"), WriteCondition::Matches(t))
            .await
            .unwrap();
        assert_eq!(&s.object("log").unwrap().0[..], b"abcd");
    }
}
