//! A store that wraps any other and injects faults into its answers: failed requests, bodies
//! cut short (with or without an error), a whole object sent for a ranged request (200 for
//! 206), a response declaring another range than asked, and an ETag that is not the one asked
//! for. Each fault is armed for a number of matching calls, then disarms itself.

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;

use super::{
    BundleStream, Capabilities, Digests, DynStore, ETag, GetResponse, Head, Listing, ObjectMeta, PartReceipt,
    PartSource, Revalidated, Store, StoreError, StoreResult, UploadId, WriteCondition,
};

/// Which store call a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    List,
    Head,
    Get,
    Digests,
    /// Any write that makes or removes something (put, delete, mkdir, rename, append,
    /// ranged write, truncate, opening and committing an upload session).
    Write,
    /// Storing one part of an upload session.
    Part,
}

#[derive(Debug, Clone)]
pub enum Fault {
    /// The call fails with this error before anything is sent.
    Fail(Op, StoreError),
    /// A `GET` body stops after this many bytes; with `error` the stream says so, without it
    /// the stream just ends (as a server closing the connection early).
    CutBody { after: u64, error: bool },
    /// A ranged `GET` is answered with the whole object and `200`.
    IgnoreRange,
    /// A ranged `GET` answer declares (and carries) a range shifted by this many bytes.
    ShiftRange(u64),
    /// A `GET` answer carries another ETag than the object's.
    FlipEtag,
    /// A `GET` answer carries no ETag at all.
    DropEtag,
    /// A `GET` body has its first byte flipped (bit rot on the way).
    CorruptBody,
    /// A `GET` is answered this much later (a slow remote).
    Delay(std::time::Duration),
    /// A `GET` panics (a bug in the code that answers it).
    Panic,
    /// Each `GET` body comes at most this many bytes per second, in pieces of at most 64 KiB
    /// (a remote that limits each connection, as nginx's `limit_rate`, or a long path).
    Throttle(u64),
    /// A digests answer carries wrong CRC32C values (and right blake3 ones): a reader that
    /// checks the CRC32C refuses every chunk.
    WrongCrc32c,
}

impl Fault {
    fn op(&self) -> Op {
        match self {
            Fault::Fail(op, _) => *op,
            Fault::WrongCrc32c => Op::Digests,
            _ => Op::Get,
        }
    }
}

#[derive(Debug)]
struct Armed {
    fault: Fault,
    /// Calls left; `None` = every call.
    left: Option<u32>,
}

#[derive(Debug)]
pub struct FaultyStore {
    inner: DynStore,
    armed: Mutex<Vec<Armed>>,
}

impl FaultyStore {
    pub fn new(inner: DynStore) -> Arc<Self> {
        Arc::new(FaultyStore {
            inner,
            armed: Mutex::new(Vec::new()),
        })
    }

    /// Arms `fault` for the next `times` matching calls.
    pub fn inject(&self, fault: Fault, times: u32) {
        self.armed.lock().push(Armed {
            fault,
            left: Some(times),
        });
    }

    /// Arms `fault` for every matching call until [`FaultyStore::clear`].
    pub fn inject_always(&self, fault: Fault) {
        self.armed.lock().push(Armed { fault, left: None });
    }

    pub fn clear(&self) {
        self.armed.lock().clear();
    }

    /// Faults still armed.
    pub fn pending(&self) -> usize {
        self.armed.lock().len()
    }

    fn take(&self, op: Op, pred: impl Fn(&Fault) -> bool) -> Option<Fault> {
        let mut armed = self.armed.lock();
        let i = armed.iter().position(|a| a.fault.op() == op && pred(&a.fault))?;
        let fault = armed[i].fault.clone();
        if let Some(left) = &mut armed[i].left {
            *left -= 1;
            if *left == 0 {
                armed.remove(i);
            }
        }
        Some(fault)
    }

    fn fail(&self, op: Op) -> StoreResult<()> {
        match self.take(op, |f| matches!(f, Fault::Fail(..))) {
            Some(Fault::Fail(_, e)) => Err(e),
            _ => Ok(()),
        }
    }
}

type Body = futures_util::stream::BoxStream<'static, StoreResult<Bytes>>;

fn cut(body: Body, after: u64, error: bool) -> Body {
    let head = body.scan(after, |left, item| {
        let out = match item {
            Ok(_) if *left == 0 => None,
            Ok(b) => {
                let n = (b.len() as u64).min(*left);
                *left -= n;
                Some(Ok(b.slice(..n as usize)))
            }
            Err(e) => Some(Err(e)),
        };
        std::future::ready(out)
    });
    let tail = error.then(|| Err(StoreError::BodyCut(format!("injected: body cut after {after} bytes"))));
    head.chain(futures_util::stream::iter(tail)).boxed()
}

/// Paces `body` to `rate` bytes per second from its first piece on.
fn throttle(body: Body, rate: u64) -> Body {
    const PIECE: usize = 64 << 10;
    let pieces = body.flat_map(|item| {
        let split: Vec<StoreResult<Bytes>> = match item {
            Ok(b) => (0..b.len())
                .step_by(PIECE)
                .map(|at| Ok(b.slice(at..(at + PIECE).min(b.len()))))
                .collect(),
            Err(e) => vec![Err(e)],
        };
        futures_util::stream::iter(split)
    });
    let start = tokio::time::Instant::now();
    pieces
        .scan(0u64, move |sent, item| {
            if let Ok(b) = &item {
                *sent += b.len() as u64;
            }
            let due = start + std::time::Duration::from_secs_f64(*sent as f64 / rate.max(1) as f64);
            async move {
                tokio::time::sleep_until(due).await;
                Some(item)
            }
        })
        .boxed()
}

#[async_trait]
impl Store for FaultyStore {
    fn id(&self) -> &str {
        self.inner.id()
    }

    fn kind(&self) -> crate::store::StoreKind {
        self.inner.kind()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn list(&self, dir: &str, validator: Option<&str>) -> StoreResult<Revalidated<Listing>> {
        self.fail(Op::List)?;
        self.inner.list(dir, validator).await
    }

    async fn head(&self, path: &str, if_none_match: Option<&ETag>) -> StoreResult<Revalidated<Head>> {
        self.fail(Op::Head)?;
        self.inner.head(path, if_none_match).await
    }

    async fn get(&self, path: &str, range: Option<Range<u64>>, if_match: Option<&ETag>) -> StoreResult<GetResponse> {
        self.fail(Op::Get)?;
        if range.is_some() && self.take(Op::Get, |f| matches!(f, Fault::IgnoreRange)).is_some() {
            return self.inner.get(path, None, if_match).await;
        }
        let shifted = match &range {
            Some(_) => match self.take(Op::Get, |f| matches!(f, Fault::ShiftRange(_))) {
                Some(Fault::ShiftRange(by)) => Some(by),
                _ => None,
            },
            None => None,
        };
        let asked = range.clone().map(|r| match shifted {
            Some(by) => r.start + by..r.end + by,
            None => r,
        });
        if self.take(Op::Get, |f| matches!(f, Fault::Panic)).is_some() {
            panic!("injected: a GET of {path} panics");
        }
        if let Some(Fault::Delay(d)) = self.take(Op::Get, |f| matches!(f, Fault::Delay(_))) {
            tokio::time::sleep(d).await;
        }
        let mut resp = self.inner.get(path, asked, if_match).await?;
        if self.take(Op::Get, |f| matches!(f, Fault::FlipEtag)).is_some() {
            resp.etag = Some(ETag::new("\"flipped-by-fault-injection\""));
        }
        if self.take(Op::Get, |f| matches!(f, Fault::DropEtag)).is_some() {
            resp.etag = None;
        }
        if let Some(Fault::CutBody { after, error }) = self.take(Op::Get, |f| matches!(f, Fault::CutBody { .. })) {
            resp.body = cut(resp.body, after, error);
        }
        if let Some(Fault::Throttle(rate)) = self.take(Op::Get, |f| matches!(f, Fault::Throttle(_))) {
            resp.body = throttle(resp.body, rate);
        }
        if self.take(Op::Get, |f| matches!(f, Fault::CorruptBody)).is_some() {
            let mut first = true;
            resp.body = resp
                .body
                .map(move |piece| {
                    piece.map(|b| {
                        if std::mem::take(&mut first) && !b.is_empty() {
                            let mut v = b.to_vec();
                            v[0] ^= 0xff;
                            Bytes::from(v)
                        } else {
                            b
                        }
                    })
                })
                .boxed();
        }
        Ok(resp)
    }

    async fn digests(&self, path: &str, etag: &ETag) -> StoreResult<Option<Digests>> {
        self.fail(Op::Digests)?;
        let mut d = self.inner.digests(path, etag).await?;
        if self.take(Op::Digests, |f| matches!(f, Fault::WrongCrc32c)).is_some()
            && let Some(crc) = d.as_mut().and_then(|d| d.crc32c.as_mut())
        {
            for c in crc {
                *c ^= 1;
            }
        }
        Ok(d)
    }

    async fn put(&self, path: &str, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        self.fail(Op::Write)?;
        self.inner.put(path, body, cond).await
    }

    async fn delete(&self, path: &str, cond: WriteCondition) -> StoreResult<()> {
        self.fail(Op::Write)?;
        self.inner.delete(path, cond).await
    }

    async fn mkdir(&self, path: &str) -> StoreResult<()> {
        self.fail(Op::Write)?;
        self.inner.mkdir(path).await
    }

    async fn rmdir(&self, path: &str) -> StoreResult<()> {
        self.fail(Op::Write)?;
        self.inner.rmdir(path).await
    }

    async fn rename(&self, from: &str, to: &str, cond: WriteCondition) -> StoreResult<()> {
        self.fail(Op::Write)?;
        self.inner.rename(from, to, cond).await
    }

    async fn append(&self, path: &str, offset: u64, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        self.fail(Op::Write)?;
        self.inner.append(path, offset, body, cond).await
    }

    async fn write_range(&self, path: &str, offset: u64, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        self.fail(Op::Write)?;
        self.inner.write_range(path, offset, body, cond).await
    }

    async fn truncate(&self, path: &str, size: u64, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        self.fail(Op::Write)?;
        self.inner.truncate(path, size, cond).await
    }

    async fn chunks(&self, path: &str, etag: &ETag) -> StoreResult<Vec<crate::protocol::CdcChunk>> {
        self.inner.chunks(path, etag).await
    }

    async fn bundle(
        &self,
        dir: &str,
        after: Option<&str>,
        max_file: u64,
        max_total: u64,
    ) -> StoreResult<Option<BundleStream>> {
        self.fail(Op::Get)?;
        self.inner.bundle(dir, after, max_file, max_total).await
    }

    async fn has_chunks(&self, hashes: &[[u8; 32]]) -> StoreResult<Vec<bool>> {
        self.inner.has_chunks(hashes).await
    }

    async fn begin_upload(&self, path: &str, base: Option<ETag>) -> StoreResult<UploadId> {
        self.fail(Op::Write)?;
        self.inner.begin_upload(path, base).await
    }

    async fn upload_part(
        &self,
        id: &UploadId,
        number: u32,
        src: PartSource,
        at: Option<u64>,
    ) -> StoreResult<PartReceipt> {
        self.fail(Op::Part)?;
        self.inner.upload_part(id, number, src, at).await
    }

    async fn commit_upload(
        &self,
        id: &UploadId,
        parts: Vec<PartReceipt>,
        cond: WriteCondition,
    ) -> StoreResult<ObjectMeta> {
        self.fail(Op::Write)?;
        self.inner.commit_upload(id, parts, cond).await
    }

    async fn abort_upload(&self, id: &UploadId) -> StoreResult<()> {
        self.inner.abort_upload(id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Content;
    use crate::store::memory::MemoryStore;

    async fn collect(r: GetResponse) -> (Vec<u8>, Option<StoreError>) {
        let mut out = Vec::new();
        let mut body = r.body;
        while let Some(b) = body.next().await {
            match b {
                Ok(b) => out.extend_from_slice(&b),
                Err(e) => return (out, Some(e)),
            }
        }
        (out, None)
    }

    #[tokio::test]
    async fn faults_fire_the_given_number_of_times() {
        let mem = Arc::new(MemoryStore::new());
        mem.insert("f", vec![7u8; 300_000]);
        let s = FaultyStore::new(mem);
        s.inject(Fault::Fail(Op::Get, StoreError::Unavailable("x".into())), 2);
        assert!(s.get("f", None, None).await.is_err());
        assert!(s.get("f", None, None).await.is_err());
        assert!(s.get("f", None, None).await.is_ok());
        assert_eq!(s.pending(), 0);
    }

    #[tokio::test]
    async fn cut_bodies_with_and_without_error() {
        let mem = Arc::new(MemoryStore::new());
        mem.insert("f", vec![7u8; 300_000]);
        let s = FaultyStore::new(mem);
        s.inject(
            Fault::CutBody {
                after: 100_000,
                error: false,
            },
            1,
        );
        let (b, e) = collect(s.get("f", None, None).await.unwrap()).await;
        assert_eq!((b.len(), e.is_none()), (100_000, true));
        s.inject(
            Fault::CutBody {
                after: 100_000,
                error: true,
            },
            1,
        );
        let (b, e) = collect(s.get("f", None, None).await.unwrap()).await;
        assert_eq!(b.len(), 100_000);
        assert!(matches!(e, Some(StoreError::BodyCut(_))));
    }

    #[tokio::test]
    async fn range_faults_change_what_is_declared() {
        let mem = Arc::new(MemoryStore::new());
        mem.insert("f", vec![7u8; 300_000]);
        let s = FaultyStore::new(mem);
        s.inject(Fault::IgnoreRange, 1);
        let r = s.get("f", Some(0..10), None).await.unwrap();
        assert_eq!(r.content, Content::Whole { size: Some(300_000) });
        s.inject(Fault::ShiftRange(5), 1);
        let r = s.get("f", Some(0..10), None).await.unwrap();
        assert_eq!(
            r.content,
            Content::Partial {
                range: 5..15,
                total: Some(300_000)
            }
        );
        s.inject(Fault::FlipEtag, 1);
        let r = s.get("f", Some(0..10), None).await.unwrap();
        assert_eq!(r.etag, Some(ETag::new("\"flipped-by-fault-injection\"")));
    }
}
