//! A store that counts what goes to the remote ([`crate::metrics`]): each request by operation,
//! its time and whether it failed, the bytes of bodies each way; a request slower than the
//! threshold is logged. The daemon wraps its remote in it; the engine does not know.

use std::ops::Range;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;

use super::{
    Capabilities, Digests, DynStore, ETag, GetResponse, Head, Listing, ObjectMeta, PartReceipt, PartSource,
    Revalidated, Store, StoreKind, StoreResult, UploadId, WriteCondition,
};
use crate::metrics;

#[derive(Debug)]
pub struct MeteredStore {
    inner: DynStore,
}

impl MeteredStore {
    pub fn new(inner: DynStore) -> Self {
        MeteredStore { inner }
    }
}

/// Runs `f`, recording it as operation `op` on `what`.
async fn timed<T>(op: &str, what: &str, f: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
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
        resp.body = resp
            .body
            .inspect(|piece| {
                if let Ok(b) = piece {
                    metrics::get().fetched(b.len() as u64);
                }
            })
            .boxed();
        Ok(resp)
    }

    async fn digests(&self, path: &str, etag: &ETag) -> StoreResult<Option<Digests>> {
        timed("digests", path, self.inner.digests(path, etag)).await
    }

    async fn put(&self, path: &str, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        let n = body.len() as u64;
        let r = timed("put", path, self.inner.put(path, body, cond)).await;
        metrics::get().sent(n);
        r
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
        let n = body.len() as u64;
        let r = timed("append", path, self.inner.append(path, offset, body, cond)).await;
        metrics::get().sent(n);
        r
    }

    async fn write_range(&self, path: &str, offset: u64, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        let n = body.len() as u64;
        let r = timed("write_range", path, self.inner.write_range(path, offset, body, cond)).await;
        metrics::get().sent(n);
        r
    }

    async fn truncate(&self, path: &str, size: u64, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        timed("truncate", path, self.inner.truncate(path, size, cond)).await
    }

    async fn chunks(&self, path: &str, etag: &ETag) -> StoreResult<Vec<crate::protocol::CdcChunk>> {
        timed("chunks", path, self.inner.chunks(path, etag)).await
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
        let n = match &src {
            PartSource::Bytes(b) => b.len() as u64,
            _ => 0,
        };
        let r = timed("upload_part", "", self.inner.upload_part(id, number, src, at)).await;
        metrics::get().sent(n);
        r
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
