//! A store whose transfers keep to bandwidth limits (`--download-limit`, `--upload-limit`):
//! a token bucket per direction, holding a tenth of a second of bytes, so the rate over any
//! few seconds stays at the limit. Bodies coming in are paced as they arrive; bodies going
//! out wait for their bytes before they are sent.

use std::num::NonZeroU32;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::{
    Capabilities, Digests, DynStore, ETag, GetResponse, Head, Listing, ObjectMeta, PartReceipt, PartSource,
    Revalidated, Store, StoreKind, StoreResult, UploadId, WriteCondition,
};

/// Bytes per token: rates up to 4 TiB/s fit the limiter's 32-bit counts.
const UNIT: u64 = 1024;

/// One direction's bucket.
#[derive(Debug, Clone)]
pub struct Limit {
    bucket: Arc<DefaultDirectRateLimiter>,
    /// Units the bucket holds at most.
    burst: u32,
}

impl Limit {
    /// `bytes_per_sec` (at least 1 KiB/s).
    pub fn new(bytes_per_sec: u64) -> Limit {
        let per_sec = (bytes_per_sec / UNIT).clamp(1, u32::MAX as u64) as u32;
        let burst = (per_sec / 10).max(1);
        let quota = Quota::per_second(NonZeroU32::new(per_sec).expect("at least 1"))
            .allow_burst(NonZeroU32::new(burst).expect("at least 1"));
        Limit {
            bucket: Arc::new(RateLimiter::direct(quota)),
            burst,
        }
    }

    /// Waits until `n` more bytes may go.
    pub async fn take(&self, n: u64) {
        let mut units = n.div_ceil(UNIT);
        while units > 0 {
            // Never more than the bucket holds at once.
            let step = units.min(u64::from(self.burst)) as u32;
            let _ = self
                .bucket
                .until_n_ready(NonZeroU32::new(step).expect("not zero"))
                .await;
            units -= u64::from(step);
        }
    }
}

#[derive(Debug)]
pub struct LimitedStore {
    inner: DynStore,
    down: Option<Limit>,
    up: Option<Limit>,
}

impl LimitedStore {
    pub fn new(inner: DynStore, down: Option<Limit>, up: Option<Limit>) -> Self {
        LimitedStore { inner, down, up }
    }

    async fn send(&self, n: u64) {
        if let Some(l) = &self.up {
            l.take(n).await;
        }
    }
}

#[async_trait]
impl Store for LimitedStore {
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
        self.inner.list(dir, validator).await
    }

    async fn head(&self, path: &str, if_none_match: Option<&ETag>) -> StoreResult<Revalidated<Head>> {
        self.inner.head(path, if_none_match).await
    }

    async fn get(&self, path: &str, range: Option<Range<u64>>, if_match: Option<&ETag>) -> StoreResult<GetResponse> {
        let mut resp = self.inner.get(path, range, if_match).await?;
        if let Some(l) = self.down.clone() {
            resp.body = resp
                .body
                .then(move |piece| {
                    let l = l.clone();
                    async move {
                        if let Ok(b) = &piece {
                            l.take(b.len() as u64).await;
                        }
                        piece
                    }
                })
                .boxed();
        }
        Ok(resp)
    }

    async fn digests(&self, path: &str, etag: &ETag) -> StoreResult<Option<Digests>> {
        self.inner.digests(path, etag).await
    }

    async fn put(&self, path: &str, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        self.send(body.len() as u64).await;
        self.inner.put(path, body, cond).await
    }

    async fn delete(&self, path: &str, cond: WriteCondition) -> StoreResult<()> {
        self.inner.delete(path, cond).await
    }

    async fn mkdir(&self, path: &str) -> StoreResult<()> {
        self.inner.mkdir(path).await
    }

    async fn rmdir(&self, path: &str) -> StoreResult<()> {
        self.inner.rmdir(path).await
    }

    async fn rename(&self, from: &str, to: &str, cond: WriteCondition) -> StoreResult<()> {
        self.inner.rename(from, to, cond).await
    }

    async fn append(&self, path: &str, offset: u64, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        self.send(body.len() as u64).await;
        self.inner.append(path, offset, body, cond).await
    }

    async fn write_range(&self, path: &str, offset: u64, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        self.send(body.len() as u64).await;
        self.inner.write_range(path, offset, body, cond).await
    }

    async fn truncate(&self, path: &str, size: u64, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        self.inner.truncate(path, size, cond).await
    }

    async fn chunks(&self, path: &str, etag: &ETag) -> StoreResult<Vec<crate::protocol::CdcChunk>> {
        self.inner.chunks(path, etag).await
    }

    async fn has_chunks(&self, hashes: &[[u8; 32]]) -> StoreResult<Vec<bool>> {
        self.inner.has_chunks(hashes).await
    }

    async fn begin_upload(&self, path: &str, base: Option<ETag>) -> StoreResult<UploadId> {
        self.inner.begin_upload(path, base).await
    }

    async fn upload_part(
        &self,
        id: &UploadId,
        number: u32,
        src: PartSource,
        at: Option<u64>,
    ) -> StoreResult<PartReceipt> {
        if let PartSource::Bytes(b) = &src {
            self.send(b.len() as u64).await;
        }
        self.inner.upload_part(id, number, src, at).await
    }

    async fn commit_upload(
        &self,
        id: &UploadId,
        parts: Vec<PartReceipt>,
        cond: WriteCondition,
    ) -> StoreResult<ObjectMeta> {
        self.inner.commit_upload(id, parts, cond).await
    }

    async fn abort_upload(&self, id: &UploadId) -> StoreResult<()> {
        self.inner.abort_upload(id).await
    }
}
