//! A real S3 server for tests: `s3s-fs` 0.14 (S3 over a folder) started in-process on
//! 127.0.0.1 port 0, with its own runtime thread, stopped on drop. It counts the bytes on the
//! wire each way (at the socket, headers included) and logs every request, so tests can say
//! what a mount sent and fetched.
//!
//! One quirk of s3s-fs is corrected in front of it: it answers `HEAD`/`GET` of a key that is a
//! folder on its disk (`a` when `a/x` exists) with 500 instead of 404 (it tries to read the
//! folder as a file); real S3 has no such key, so the wrapper answers 404 `NoSuchKey`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use artifactfs::store::s3::{S3Config, S3Store, client::static_credentials};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub const ACCESS_KEY: &str = "AKIAARTIFACTFSTEST01";
pub const SECRET_KEY: &str = "artifactfs-test-secret-not-a-real-one";
pub const BUCKET: &str = "artifacts";
pub const REGION: &str = "us-east-1";

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    /// `x-amz-copy-source` was set (CopyObject / UploadPartCopy).
    pub copy: bool,
}

impl Seen {
    pub fn is_list(&self) -> bool {
        self.method == "GET" && self.query.contains("list-type=2")
    }
}

/// Bytes at the server's sockets, and the requests.
#[derive(Default)]
pub struct Wire {
    /// Read by the server: what clients sent (request lines, headers, bodies).
    pub received: AtomicU64,
    /// Written by the server: what clients fetched.
    pub sent: AtomicU64,
    /// Bytes of object bodies sent by `GetObject` (exactly: counted on the response body).
    pub file_sent: AtomicU64,
    /// Requests being handled now, and the most at once.
    pub active: AtomicU64,
    pub max_active: AtomicU64,
    pub requests: Mutex<Vec<Seen>>,
    /// Faults injected into object reads, after the request was authenticated (a proxy in
    /// front would break the signature).
    pub faults: Arc<super::proxy::Faults>,
}

impl Wire {
    pub fn reset(&self) {
        self.received.store(0, Ordering::SeqCst);
        self.sent.store(0, Ordering::SeqCst);
        self.requests.lock().clear();
    }
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
    pub fn file_sent(&self) -> u64 {
        self.file_sent.load(Ordering::SeqCst)
    }
    pub fn max_active(&self) -> u64 {
        self.max_active.load(Ordering::SeqCst)
    }
    pub fn requests(&self) -> Vec<Seen> {
        self.requests.lock().clone()
    }
}

struct Counted<T> {
    inner: T,
    wire: Arc<Wire>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let n = (buf.filled().len() - before) as u64;
            self.wire.received.fetch_add(n, Ordering::SeqCst);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.wire.sent.fetch_add(*n as u64, Ordering::SeqCst);
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.wire.sent.fetch_add(*n as u64, Ordering::SeqCst);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

pub struct S3Server {
    /// The folder s3s-fs serves (buckets are its subfolders).
    pub root: PathBuf,
    _dir: Option<tempfile::TempDir>,
    pub addr: SocketAddr,
    pub wire: Arc<Wire>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// `/bucket/key…` → the file s3s-fs keeps it in, when the path names a key (not a bucket).
fn object_file(root: &Path, uri_path: &str) -> Option<PathBuf> {
    let decoded = percent_encoding::percent_decode_str(uri_path).decode_utf8().ok()?;
    let rest = decoded.strip_prefix('/')?;
    let (bucket, key) = rest.split_once('/')?;
    if key.is_empty() || key.ends_with('/') || key.split('/').any(|s| s == ".." || s == ".") {
        return None;
    }
    Some(root.join(bucket).join(key))
}

fn take(n: &std::sync::atomic::AtomicU32) -> bool {
    n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1))
        .is_ok()
}

impl S3Server {
    /// A server with one empty bucket, [`BUCKET`].
    pub fn start() -> S3Server {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(BUCKET)).unwrap();
        let mut s =
            S3Server::serve(dir.path(), "127.0.0.1:0".parse().unwrap(), Arc::default()).expect("the S3 server starts");
        s._dir = Some(dir);
        s
    }

    /// A server over `root` at `addr` (a restart: the same folder, address and counters).
    pub fn restart(root: &Path, addr: SocketAddr, wire: Arc<Wire>) -> S3Server {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match S3Server::serve(root, addr, wire.clone()) {
                Ok(s) => return s,
                Err(e) if std::time::Instant::now() > end => panic!("the S3 server restarts on {addr}: {e}"),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        }
    }

    fn serve(root: &Path, at: SocketAddr, wire: Arc<Wire>) -> std::io::Result<S3Server> {
        let std_listener = std::net::TcpListener::bind(at)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let dir = root.to_path_buf();
        let w = wire.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let fs = s3s_fs::FileSystem::new(&dir).unwrap();
                let mut b = s3s::service::S3ServiceBuilder::new(fs);
                b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
                let service = b.build();
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                let http = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                let mut conns = tokio::task::JoinSet::new();
                loop {
                    let socket = tokio::select! {
                        r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                        _ = &mut stop_rx => break,
                    };
                    let io = hyper_util::rt::TokioIo::new(Counted {
                        inner: socket,
                        wire: w.clone(),
                    });
                    let service = service.clone();
                    let dir = dir.clone();
                    let w = w.clone();
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let service = service.clone();
                        let dir = dir.clone();
                        let w = w.clone();
                        async move {
                            let method = req.method().to_string();
                            let seen = Seen {
                                method: method.clone(),
                                path: req.uri().path().to_string(),
                                query: req.uri().query().unwrap_or("").to_string(),
                                copy: req.headers().contains_key("x-amz-copy-source"),
                            };
                            let object_get =
                                method == "GET" && !seen.is_list() && object_file(&dir, &seen.path).is_some();
                            let seen_path = seen.path.clone();
                            w.requests.lock().push(seen);
                            let folder = (method == "GET" || method == "HEAD")
                                && object_file(&dir, req.uri().path()).is_some_and(|p| p.is_dir());
                            if folder {
                                let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
                                    <Error><Code>NoSuchKey</Code><Message>no such key</Message></Error>";
                                let resp = http::Response::builder()
                                    .status(404)
                                    .header("content-type", "application/xml")
                                    .body(if method == "HEAD" {
                                        s3s::Body::empty()
                                    } else {
                                        s3s::Body::from(body.to_string())
                                    })
                                    .unwrap();
                                return Ok::<_, s3s::HttpError>(resp);
                            }
                            let now = w.active.fetch_add(1, Ordering::SeqCst) + 1;
                            w.max_active.fetch_max(now, Ordering::SeqCst);
                            let resp = hyper::service::Service::call(&service, req).await;
                            w.active.fetch_sub(1, Ordering::SeqCst);
                            let mut resp = resp?;
                            if !(object_get && resp.status().is_success()) {
                                return Ok(resp);
                            }
                            w.faults.requests.fetch_add(1, Ordering::Relaxed);
                            if resp.status() == http::StatusCode::PARTIAL_CONTENT
                                && take(&w.faults.strip_range)
                                && let Some(file) = object_file(&dir, &seen_path)
                            {
                                // The whole object, as a server that ignores `Range` sends it.
                                let data = std::fs::read(&file).unwrap_or_default();
                                let mut whole = http::Response::builder().status(200);
                                for (k, v) in resp.headers() {
                                    if k != http::header::CONTENT_RANGE && k != http::header::CONTENT_LENGTH {
                                        whole = whole.header(k, v);
                                    }
                                }
                                resp = whole
                                    .header(http::header::CONTENT_LENGTH, data.len())
                                    .body(s3s::Body::from(data))
                                    .unwrap();
                            }
                            let cut = take(&w.faults.truncate).then(|| w.faults.truncate_after.load(Ordering::Relaxed));
                            // Count the object bytes as they leave; cut the body short if told.
                            let w = w.clone();
                            Ok(resp.map(move |body| {
                                let mut left = cut.unwrap_or(u64::MAX);
                                let frames = futures_util::StreamExt::map(
                                    http_body_util::BodyStream::new(body),
                                    move |f| -> Result<hyper::body::Frame<bytes::Bytes>, std::io::Error> {
                                        let f = f.map_err(std::io::Error::other)?;
                                        let Ok(mut d) = f.into_data() else {
                                            return Ok(hyper::body::Frame::data(bytes::Bytes::new()));
                                        };
                                        if left == 0 {
                                            return Err(std::io::Error::other("cut by the fault injection"));
                                        }
                                        if (d.len() as u64) > left {
                                            d.truncate(left as usize);
                                        }
                                        left -= d.len() as u64;
                                        w.file_sent.fetch_add(d.len() as u64, Ordering::SeqCst);
                                        Ok(hyper::body::Frame::data(d))
                                    },
                                );
                                let cut_end = futures_util::stream::iter(
                                    cut.map(|_| Err(std::io::Error::other("cut by the fault injection"))),
                                );
                                s3s::Body::http_body_unsync(http_body_util::StreamBody::new(
                                    futures_util::StreamExt::chain(frames, cut_end),
                                ))
                            }))
                        }
                    });
                    let http = http.clone();
                    conns.spawn(async move {
                        let _ = http.serve_connection(io, svc).await;
                    });
                }
                // Stopped: open connections are dropped too (clients see them close).
                conns.abort_all();
            });
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
        });
        Ok(S3Server {
            root: root.to_path_buf(),
            _dir: None,
            addr,
            wire,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `s3://BUCKET/prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    pub fn config(&self) -> S3Config {
        S3Config {
            endpoint_url: Some(self.endpoint()),
            region: Some(REGION.into()),
            ..S3Config::default()
        }
    }

    /// A store of `s3://BUCKET/prefix` with the test keys.
    pub async fn store(&self, prefix: &str) -> S3Store {
        S3Store::connect_with(
            &self.url(prefix),
            &self.config(),
            &Default::default(),
            Some(static_credentials(ACCESS_KEY, SECRET_KEY)),
        )
        .await
        .unwrap()
    }

    /// The mount flags and environment for this server.
    pub fn mount_opts(&self) -> super::MountOpts {
        mount_opts(&self.endpoint())
    }

    /// The file s3s-fs keeps `key` of the bucket in.
    pub fn file(&self, key: &str) -> PathBuf {
        self.root.join(BUCKET).join(key)
    }
}

/// The mount flags and environment for the S3 server at `endpoint` (credentials from the
/// environment, as a user would give them; no profile files or instance metadata are consulted).
pub fn mount_opts(endpoint: &str) -> super::MountOpts {
    super::MountOpts {
        args: vec![
            "--endpoint-url".into(),
            endpoint.into(),
            "--region".into(),
            REGION.into(),
        ],
        env: vec![
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
            ("AWS_CONFIG_FILE".into(), "/nonexistent/aws-config".into()),
            (
                "AWS_SHARED_CREDENTIALS_FILE".into(),
                "/nonexistent/aws-credentials".into(),
            ),
        ],
        ..Default::default()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
