//! What crosses the wire to the remote, in one wrapper the daemon puts around its store (the
//! engine does not know): every request counted and timed by operation ([`crate::metrics`]; a
//! slow one is logged), the bytes of bodies each way counted, and, with bandwidth limits,
//! paced ([`super::limited::Limit`]).

use std::ops::Range;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;

use super::limited::Limit;
use super::{
    BundleStream, Capabilities, Digests, DynStore, ETag, GetResponse, Head, Listing, ObjectMeta, PartReceipt,
    PartSource, Revalidated, Store, StoreKind, StoreResult, UploadId, WriteCondition,
};
use crate::metrics;

#[derive(Debug)]
pub struct MeteredStore {
    inner: DynStore,
    /// Bytes per second each way, when limited.
    down: Option<Limit>,
    up: Option<Limit>,
}

impl MeteredStore {
    pub fn new(inner: DynStore, down: Option<Limit>, up: Option<Limit>) -> Self {
        MeteredStore { inner, down, up }
    }

    /// `n` bytes are about to go out: counted, and held back to the upload limit.
    async fn sending(&self, n: u64) {
        if let Some(l) = &self.up {
            l.take(n).await;
        }
        metrics::get().sent(n);
    }
}

/// Runs `f`, recording it as operation `op` on `what`.
async fn timed<T>(op: &'static str, what: &str, f: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
    let start = Instant::now();
    let r = f.await;
    // "Not found" and "changed" are answers, not failures of the remote.
    let ok = match &r {
        Ok(_) => true,
        Err(e) => matches!(e, super::StoreError::NotFound | super::StoreError::PreconditionFailed),
    };
    metrics::get().remote(op, start.elapsed(), ok, what);
    r
}

#[async_trait]
impl Store for MeteredStore {
    fn id(&self) -> &str {
        self.inner.id()
    }

    fn kind(&self) -> StoreKind {
        self.inner.kind()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn list(&self, dir: &str, validator: Option<&str>) -> StoreResult<Revalidated<Listing>> {
        timed("list", dir, self.inner.list(dir, validator)).await
    }

    async fn head(&self, path: &str, if_none_match: Option<&ETag>) -> StoreResult<Revalidated<Head>> {
        timed("head", path, self.inner.head(path, if_none_match)).await
    }

    /// Timed until the answer's headers; the body's bytes are counted as they arrive.
    async fn get(&self, path: &str, range: Option<Range<u64>>, if_match: Option<&ETag>) -> StoreResult<GetResponse> {
        let mut resp = timed("get", path, self.inner.get(path, range, if_match)).await?;
        let down = self.down.clone();
        resp.body = resp
            .body
            .then(move |piece| {
                let down = down.clone();
                async move {
                    if let Ok(b) = &piece {
                        if let Some(l) = &down {
                            l.take(b.len() as u64).await;
                        }
                        metrics::get().fetched(b.len() as u64);
                    }
                    piece
                }
            })
            .boxed();
        Ok(resp)
    }

    async fn digests(&self, path: &str, etag: &ETag) -> StoreResult<Option<Digests>> {
        timed("digests", path, self.inner.digests(path, etag)).await
    }

    async fn put(&self, path: &str, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        self.sending(body.len() as u64).await;
        timed("put", path, self.inner.put(path, body, cond)).await
    }

    async fn delete(&self, path: &str, cond: WriteCondition) -> StoreResult<()> {
        timed("delete", path, self.inner.delete(path, cond)).await
    }

    async fn mkdir(&self, path: &str) -> StoreResult<()> {
        timed("mkdir", path, self.inner.mkdir(path)).await
    }

    async fn rmdir(&self, path: &str) -> StoreResult<()> {
        timed("rmdir", path, self.inner.rmdir(path)).await
    }

    async fn rename(&self, from: &str, to: &str, cond: WriteCondition) -> StoreResult<()> {
        timed("rename", from, self.inner.rename(from, to, cond)).await
    }

    async fn append(&self, path: &str, offset: u64, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        self.sending(body.len() as u64).await;
        timed("append", path, self.inner.append(path, offset, body, cond)).await
    }

    async fn write_range(&self, path: &str, offset: u64, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        self.sending(body.len() as u64).await;
        timed("write_range", path, self.inner.write_range(path, offset, body, cond)).await
    }

    async fn truncate(&self, path: &str, size: u64, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        timed("truncate", path, self.inner.truncate(path, size, cond)).await
    }

    async fn chunks(&self, path: &str, etag: &ETag) -> StoreResult<Vec<crate::protocol::CdcChunk>> {
        timed("chunks", path, self.inner.chunks(path, etag)).await
    }

    async fn bundle(
        &self,
        dir: &str,
        after: Option<&str>,
        max_file: u64,
        max_total: u64,
    ) -> StoreResult<Option<BundleStream>> {
        let Some(files) = timed("bundle", dir, self.inner.bundle(dir, after, max_file, max_total)).await? else {
            return Ok(None);
        };
        let down = self.down.clone();
        Ok(Some(
            files
                .then(move |file| {
                    let down = down.clone();
                    async move {
                        if let Ok(f) = &file {
                            if let Some(l) = &down {
                                l.take(f.data.len() as u64).await;
                            }
                            metrics::get().fetched(f.data.len() as u64);
                        }
                        file
                    }
                })
                .boxed(),
        ))
    }

    async fn has_chunks(&self, hashes: &[[u8; 32]]) -> StoreResult<Vec<bool>> {
        timed("has_chunks", "", self.inner.has_chunks(hashes)).await
    }

    async fn begin_upload(&self, path: &str, base: Option<ETag>) -> StoreResult<UploadId> {
        timed("begin_upload", path, self.inner.begin_upload(path, base)).await
    }

    async fn upload_part(
        &self,
        id: &UploadId,
        number: u32,
        src: PartSource,
        at: Option<u64>,
    ) -> StoreResult<PartReceipt> {
        if let PartSource::Bytes(b) = &src {
            self.sending(b.len() as u64).await;
        }
        timed("upload_part", "", self.inner.upload_part(id, number, src, at)).await
    }

    async fn commit_upload(
        &self,
        id: &UploadId,
        parts: Vec<PartReceipt>,
        cond: WriteCondition,
    ) -> StoreResult<ObjectMeta> {
        timed("commit_upload", "", self.inner.commit_upload(id, parts, cond)).await
    }

    async fn abort_upload(&self, id: &UploadId) -> StoreResult<()> {
        timed("abort_upload", "", self.inner.abort_upload(id)).await
    }
}
