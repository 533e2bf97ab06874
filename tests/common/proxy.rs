//! An HTTP proxy between a mount and its server that breaks responses on purpose: it can drop
//! the `Range` header (the server then answers 200 with the whole file) or cut bodies short
//! after a number of bytes (the connection closes before `Content-Length` bytes).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use futures_util::StreamExt;

#[derive(Default)]
pub struct Faults {
    /// Ranged GETs still to be answered with the whole file.
    pub strip_range: AtomicU32,
    /// File GETs still to be cut short...
    pub truncate: AtomicU32,
    /// ...after this many body bytes.
    pub truncate_after: AtomicU64,
    /// Requests forwarded.
    pub requests: AtomicU64,
}

pub struct Proxy {
    pub addr: SocketAddr,
    pub faults: Arc<Faults>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Ctx {
    upstream: String,
    client: reqwest::Client,
    faults: Arc<Faults>,
}

async fn forward(State(ctx): State<Arc<Ctx>>, req: Request) -> Response {
    let f = &ctx.faults;
    f.requests.fetch_add(1, Ordering::Relaxed);
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let is_file_get = req.method() == http::Method::GET && !pq.contains("afs=");
    let mut headers = req.headers().clone();
    headers.remove(http::header::HOST);
    let ranged = headers.contains_key(http::header::RANGE);
    if ranged && take(&f.strip_range) {
        headers.remove(http::header::RANGE);
    }
    let method = req.method().clone();
    let body = axum::body::to_bytes(req.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let mut upstream = ctx
        .client
        .request(method, format!("{}{pq}", ctx.upstream))
        .headers(headers);
    if !body.is_empty() {
        upstream = upstream.body(body);
    }
    let resp = upstream.send().await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => return Response::builder().status(502).body(Body::from(e.to_string())).unwrap(),
    };
    let mut out = Response::builder().status(resp.status());
    for (k, v) in resp.headers() {
        out = out.header(k, v);
    }
    let cut = is_file_get && resp.status().is_success() && take(&f.truncate);
    let limit = f.truncate_after.load(Ordering::Relaxed);
    let stream = resp.bytes_stream();
    let body = if cut {
        let mut left = limit;
        let s = stream
            .map(move |piece| -> Result<bytes::Bytes, std::io::Error> {
                let b = piece.map_err(std::io::Error::other)?;
                if left == 0 {
                    return Err(std::io::Error::other("cut by the fault proxy"));
                }
                let n = (b.len() as u64).min(left);
                left -= n;
                Ok(b.slice(..n as usize))
            })
            .take_while(|r| std::future::ready(r.is_ok()))
            .chain(futures_util::stream::once(async {
                Err(std::io::Error::other("cut by the fault proxy"))
            }));
        Body::from_stream(s)
    } else {
        Body::from_stream(stream)
    };
    out.body(body).unwrap()
}

fn take(n: &AtomicU32) -> bool {
    n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1))
        .is_ok()
}

impl Proxy {
    pub fn start(upstream: &str) -> Proxy {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let faults = Arc::new(Faults::default());
        let ctx = Arc::new(Ctx {
            upstream: upstream.trim_end_matches('/').to_string(),
            // Transparent: redirects go back to the client as they are.
            client: reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            faults: faults.clone(),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let app = axum::Router::new().fallback(forward).with_state(ctx);
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stop_rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let addr = rx.recv().unwrap();
        Proxy {
            addr,
            faults,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
