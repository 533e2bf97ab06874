//! Streaming response bodies: a byte range of an open file, read ahead in positioned reads,
//! and a wrapper that keeps a request counted as active until its body is gone.
//!
//! Owns the guarantee that a body never mixes two versions: every read is followed by an
//! identity check of the open file, and a frame goes out only when its own check passed, so a
//! change ends the body with an error before its last bytes (hyper then closes the connection
//! short of `Content-Length`).
//!
//! Each read is its own short `spawn_blocking` task: a client that stops reading holds no
//! blocking thread, only the frames already read.

use std::collections::VecDeque;
use std::fs::File;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::task::JoinHandle;

use super::digests::{Identity, read_full_at};
use super::stats::{ActiveGuard, Stats};

/// Size of one positioned read, and of one body frame.
const READ_SIZE: u64 = 1 << 20;
/// Reads in flight or done but not yet handed to hyper; with the frame hyper is writing, at
/// most 3 MiB per response. Measured against nginx with sendfile (1 GiB over loopback,
/// alternating runs): one `curl` 1.07×, eight parallel ranged `curl`s 0.87×; three reads
/// ahead were no faster. Buffers are pooled ([`FrameBuf`]): that gained nothing against
/// nginx, but on two cores shared with a mount's daemon it saves a fifth of the server's CPU.
const READS_AHEAD: usize = 2;

/// Bytes `start..start + len` of `file`, which must keep `identity` throughout.
pub struct FileBody {
    file: Arc<File>,
    identity: Identity,
    /// Next offset to start a read at, and the end of the range.
    next: u64,
    end: u64,
    reads: VecDeque<JoinHandle<io::Result<Bytes>>>,
    /// Bytes not yet handed out; 0 once the body ended (also on error).
    remaining: u64,
    stats: Arc<Stats>,
}

impl FileBody {
    /// Starts reading ahead at once; must be called inside a tokio runtime.
    pub fn new(file: Arc<File>, identity: Identity, start: u64, len: u64, stats: Arc<Stats>) -> FileBody {
        let mut body = FileBody {
            file,
            identity,
            next: start,
            end: start + len,
            reads: VecDeque::with_capacity(READS_AHEAD),
            remaining: len,
            stats,
        };
        body.read_ahead();
        body
    }

    fn read_ahead(&mut self) {
        while self.reads.len() < READS_AHEAD && self.next < self.end {
            let want = (self.end - self.next).min(READ_SIZE) as usize;
            let (file, identity, offset) = (Arc::clone(&self.file), self.identity, self.next);
            self.reads.push_back(tokio::task::spawn_blocking(move || {
                read_frame(&file, identity, offset, want)
            }));
            self.next += want as u64;
        }
    }

    fn fail(&mut self, e: io::Error) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        tracing::warn!(error = %e, "ending a file body early");
        self.remaining = 0;
        self.reads.clear();
        Poll::Ready(Some(Err(e)))
    }
}

/// One `pread` of `want` bytes at `offset`, then the identity check that lets it go out.
fn read_frame(file: &File, identity: Identity, offset: u64, want: usize) -> io::Result<Bytes> {
    let mut buf = FrameBuf::take(want);
    let got = read_full_at(file, buf.as_mut(), offset)?;
    if got < want {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "file shrank while it was sent",
        ));
    }
    if Identity::of_file(file)? != identity {
        return Err(io::Error::other("file changed while it was sent"));
    }
    Ok(buf.freeze())
}

/// Idle frame buffers kept for the next response; more are dropped.
const POOL_MAX: usize = 16;
/// Frames this small are allocated as they come.
const POOL_MIN: usize = 64 << 10;

/// Idle [`READ_SIZE`] buffers of frames that went out.
struct Pool(parking_lot::Mutex<Vec<Box<[u8]>>>);

static POOL: Pool = Pool(parking_lot::Mutex::new(Vec::new()));

/// The buffer of one frame. A large one comes from a pool of [`READ_SIZE`] buffers and goes
/// back to it when hyper drops the frame, so a response neither zeroes its buffers nor
/// faults in new memory for each (12 % of the server's CPU in a cold read through the mount,
/// measured with `perf`). Only the first `len` bytes, which the read just wrote, are ever
/// handed out: a reused buffer shows nothing of an earlier frame.
struct FrameBuf {
    buf: Box<[u8]>,
    len: usize,
    pool: Option<&'static Pool>,
}

impl FrameBuf {
    fn take(len: usize) -> FrameBuf {
        FrameBuf::take_from(&POOL, len)
    }

    fn take_from(pool: &'static Pool, len: usize) -> FrameBuf {
        if !(POOL_MIN..=READ_SIZE as usize).contains(&len) {
            return FrameBuf {
                buf: vec![0; len].into_boxed_slice(),
                len,
                pool: None,
            };
        }
        let buf = pool
            .0
            .lock()
            .pop()
            .unwrap_or_else(|| vec![0; READ_SIZE as usize].into_boxed_slice());
        FrameBuf {
            buf,
            len,
            pool: Some(pool),
        }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }

    fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for FrameBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for FrameBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool {
            let mut idle = pool.0.lock();
            if idle.len() < POOL_MAX {
                idle.push(std::mem::take(&mut self.buf));
            }
        }
    }
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        self.read_ahead();
        let Some(front) = self.reads.front_mut() else {
            return self.fail(io::Error::other("file reader stopped"));
        };
        let done = ready!(Pin::new(front).poll(cx));
        self.reads.pop_front();
        match done {
            Ok(Ok(bytes)) => {
                let n = bytes.len() as u64;
                self.remaining = self.remaining.saturating_sub(n);
                self.stats.add_file_bytes(n);
                self.read_ahead();
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
            Ok(Err(e)) => self.fail(e),
            Err(join) => self.fail(io::Error::other(join)),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Pieces a paced body is cut into, so that its bytes flow evenly rather than in bursts of
/// whole frames.
const PACE_PIECE: usize = 64 << 10;

/// A body sent at most `rate` bytes per second from its first byte on (`serve --limit-rate`,
/// as nginx's `limit_rate`: each response, so each connection, gets that much).
pub struct Paced<B> {
    inner: B,
    rate: f64,
    start: Option<tokio::time::Instant>,
    sent: u64,
    /// The rest of a frame not sent yet.
    rest: Bytes,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> Paced<B> {
    pub fn new(inner: B, bytes_per_sec: u64) -> Paced<B> {
        Paced {
            inner,
            rate: bytes_per_sec.max(1) as f64,
            start: None,
            sent: 0,
            rest: Bytes::new(),
            wait: None,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Paced<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if let Some(w) = &mut this.wait {
            ready!(w.as_mut().poll(cx));
            this.wait = None;
        }
        if this.rest.is_empty() {
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.rest = data,
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                other => return Poll::Ready(other),
            }
        }
        let piece = this.rest.split_to(this.rest.len().min(PACE_PIECE));
        let start = *this.start.get_or_insert_with(tokio::time::Instant::now);
        this.sent += piece.len() as u64;
        // The next piece goes when this one's share of the time is over.
        let due = start + std::time::Duration::from_secs_f64(this.sent as f64 / this.rate);
        if due > tokio::time::Instant::now() {
            this.wait = Some(Box::pin(tokio::time::sleep_until(due)));
        }
        Poll::Ready(Some(Ok(Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut h = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        h.set_lower(h.lower() + rest);
        if let Some(u) = h.upper() {
            h.set_upper(u + rest);
        }
        h
    }
}

/// Any body, holding the request's [`ActiveGuard`] until it is finished or dropped.
pub struct Guarded<B> {
    inner: B,
    _guard: ActiveGuard,
}

impl<B> Guarded<B> {
    pub fn new(inner: B, guard: ActiveGuard) -> Guarded<B> {
        Guarded { inner, _guard: guard }
    }
}

impl<B: Body + Unpin> Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn setup(len: usize) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("f");
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        (tmp, p, data)
    }

    #[tokio::test]
    async fn a_paced_body_sends_its_bytes_no_faster_than_its_rate() {
        let (_tmp, p, data) = setup(2 * READ_SIZE as usize + 100);
        let file = Arc::new(File::open(&p).unwrap());
        let id = Identity::of_file(&file).unwrap();
        let stats = Arc::new(Stats::default());
        let len = data.len() as u64;
        let body = FileBody::new(file, id, 0, len, Arc::clone(&stats));
        // 4 MiB/s: the 2 MiB take half a second, less the last piece's share.
        let mut body = Paced::new(body, 4 * READ_SIZE);
        assert_eq!(body.size_hint().exact(), Some(len));
        let start = std::time::Instant::now();
        let mut got = Vec::new();
        while let Some(frame) = body.frame().await {
            let piece = frame.unwrap().into_data().unwrap();
            assert!(piece.len() <= PACE_PIECE);
            got.extend_from_slice(&piece);
        }
        let took = start.elapsed();
        assert!(got == data, "bytes differ");
        assert!(took >= std::time::Duration::from_millis(480), "{took:?}");
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn streams_the_range_and_counts_bytes() {
        let (_tmp, p, data) = setup(3 * READ_SIZE as usize + 10);
        let file = Arc::new(File::open(&p).unwrap());
        let id = Identity::of_file(&file).unwrap();
        let stats = Arc::new(Stats::default());
        let start = READ_SIZE - 3;
        let len = 2 * READ_SIZE + 7;
        let body = FileBody::new(file, id, start, len, Arc::clone(&stats));
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], &data[start as usize..(start + len) as usize]);
        assert_eq!(stats.snapshot().file_bytes_sent, len);
    }

    #[test]
    fn frame_buffers_go_back_to_the_pool_and_show_only_their_own_bytes() {
        let pool: &'static Pool = Box::leak(Box::new(Pool(parking_lot::Mutex::new(Vec::new()))));
        let mut a = FrameBuf::take_from(pool, READ_SIZE as usize);
        a.as_mut().fill(7);
        let first = a.as_ref().as_ptr();
        let bytes = a.freeze();
        let clone = bytes.slice(10..20);
        drop(bytes);
        assert!(pool.0.lock().is_empty(), "a slice of the frame still holds it");
        drop(clone);
        assert_eq!(pool.0.lock().len(), 1, "back once hyper let go");
        let mut b = FrameBuf::take_from(pool, 100_000);
        assert_eq!(b.as_ref().as_ptr(), first, "reused, not allocated");
        b.as_mut().fill(9);
        let bytes = b.freeze();
        assert_eq!(bytes.len(), 100_000);
        assert!(bytes.iter().all(|&x| x == 9), "nothing of the earlier frame");
        // Small frames are not pooled; the pool keeps at most POOL_MAX idle buffers.
        drop(FrameBuf::take_from(pool, 4096));
        let many: Vec<_> = (0..POOL_MAX + 3)
            .map(|_| FrameBuf::take_from(pool, READ_SIZE as usize))
            .collect();
        drop(bytes);
        drop(many);
        assert_eq!(pool.0.lock().len(), POOL_MAX);
    }

    #[tokio::test]
    async fn a_changed_file_ends_the_body_with_an_error() {
        let (_tmp, p, _) = setup(2 * READ_SIZE as usize);
        let file = Arc::new(File::open(&p).unwrap());
        let id = Identity::of_file(&file).unwrap();
        let stale = Identity {
            ctime_ns: id.ctime_ns - 1,
            ..id
        };
        let stats = Arc::new(Stats::default());
        let body = FileBody::new(file, stale, 0, 2 * READ_SIZE, Arc::clone(&stats));
        assert!(body.collect().await.is_err());
        assert_eq!(stats.snapshot().file_bytes_sent, 0);
    }

    #[tokio::test]
    async fn a_dropped_body_releases_the_active_guard() {
        let (_tmp, p, _) = setup(4 * READ_SIZE as usize);
        let file = Arc::new(File::open(&p).unwrap());
        let id = Identity::of_file(&file).unwrap();
        let stats = Arc::new(Stats::default());
        let guard = stats.begin_request();
        let mut body = Guarded::new(FileBody::new(file, id, 0, 4 * READ_SIZE, Arc::clone(&stats)), guard);
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().unwrap().len() as u64, READ_SIZE);
        assert_eq!(stats.snapshot().active, 1);
        drop(body);
        assert_eq!(stats.snapshot().active, 0);
        assert_eq!(stats.snapshot().file_bytes_sent, READ_SIZE);
    }
}
