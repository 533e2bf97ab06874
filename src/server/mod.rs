//! The built-in artifact server, `artifactfs serve DIR`: the reference implementation of
//! `docs/PROTOCOL.md`.
//!
//! This file owns the public API (bind, serve, a thread-backed handle for tests and blocking
//! callers), startup (journal replay before serving, then background chunking and upload
//! expiry) and shutdown, and the dispatch of a request to its operation. The rules live in
//! their own files: `paths` (request path → file), `range` (Range and conditionals),
//! `digests` (chunk digests, ETags, sidecars), `scan` (hashing and content-defined chunking),
//! `listing` (folder pages), `files` (file answers), `body` (streaming), `chunks` (chunk
//! index, `chunks`, `has-chunks`), `writes` (PUT, DELETE, mkdir, move, writes in place),
//! `uploads` (upload sessions), `durable` (temporary files, fsync, renames), `journal` (redo
//! records), `locks` (one lock per path), `query`, `stats`, `error` (status and JSON of
//! failures), `auth` (tokens: who may do what), `tls` (the TLS listener).

pub mod auth;
mod body;
mod bundle;
mod chunks;
mod digests;
mod durable;
mod error;
mod files;
mod journal;
mod listing;
mod locks;
mod paths;
mod query;
mod range;
mod scan;
mod stats;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_auth;
#[cfg(test)]
mod tests_write;
mod tls;
mod uploads;
mod writes;

use std::fs::File;
use std::future::Future;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use futures_util::FutureExt;
use http::{HeaderValue, Method, StatusCode, header};
use serde::Serialize;
use tokio::net::TcpListener;

pub use error::ServerError;
pub use stats::Stats;

use body::Guarded;
use chunks::ChunkIndex;
use digests::DigestStore;
use durable::StateDirs;
use journal::Journal;
use listing::DirCache;
use locks::PathLocks;
use paths::{Resolved, Root, parse_request_path};
use query::{Op, Query};
use uploads::{PartSource, Uploads};
use writes::{InPlace, WriteState};

use crate::protocol::{DIGEST_CHUNK_SIZE, KIND_HEADER, LIST_MAX_LIMIT, PROTOCOL, ServerCapabilities, ServerInfo};

/// How long a graceful shutdown waits for responses still being sent.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Default of [`ServerConfig::upload_ttl`].
pub const DEFAULT_UPLOAD_TTL: Duration = Duration::from_secs(3600);
/// Largest `has-chunks` request body.
const HAS_CHUNKS_BODY_MAX: usize = 2 << 20;

/// What to serve and where.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The served folder.
    pub root: PathBuf,
    pub listen: SocketAddr,
    /// Where digests are kept; `root/.artifactfs` when `None`.
    pub state_dir: Option<PathBuf>,
    /// Sent as `Cache-Control: max-age=N` on file answers when set.
    pub max_age: Option<Duration>,
    /// An upload session without a request for this long is dropped with its parts.
    pub upload_ttl: Duration,
    /// When set, every request needs a token signed with this secret (`auth`).
    pub token_secret: Option<Arc<auth::Secret>>,
    /// Serve on a non-loopback address without tokens.
    pub allow_anonymous: bool,
    /// Serve HTTPS with this certificate chain and key (PEM files).
    pub tls: Option<TlsFiles>,
    /// Send each file answer at most this many bytes per second.
    pub limit_rate: Option<u64>,
}

/// The PEM files of `serve --tls-cert --tls-key`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ServerConfig {
    /// Serves `root` on `127.0.0.1` at a port the system picks.
    pub fn local(root: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            root: root.into(),
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            state_dir: None,
            max_age: None,
            upload_ttl: DEFAULT_UPLOAD_TTL,
            token_secret: None,
            allow_anonymous: false,
            tls: None,
            limit_rate: None,
        }
    }

    /// The same, with upload sessions expiring after `ttl` (tests use short ones).
    pub fn with_upload_ttl(mut self, ttl: Duration) -> ServerConfig {
        self.upload_ttl = ttl;
        self
    }
}

/// What every request handler shares.
struct Ctx {
    root: Arc<Root>,
    store: Arc<DigestStore>,
    dirs: Arc<DirCache>,
    stats: Arc<Stats>,
    max_age: Option<Duration>,
    /// `None` when the state folder cannot hold temporary files and the journal: the server
    /// then serves reads only.
    writes: Option<Arc<WriteState>>,
    uploads: Option<Arc<Uploads>>,
    started: SystemTime,
    /// Tokens are required when set.
    secret: Option<Arc<auth::Secret>>,
    /// Bytes per second of each file answer at most.
    limit_rate: Option<u64>,
}

/// A server whose listener is bound, not yet serving.
pub struct Server {
    listener: TcpListener,
    addr: SocketAddr,
    ctx: Arc<Ctx>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Server {
    /// Checks the served folder, prepares the state folder and binds the listener.
    pub async fn bind(cfg: ServerConfig) -> Result<Server, ServerError> {
        if cfg.token_secret.is_none() && !cfg.listen.ip().is_loopback() && !cfg.allow_anonymous {
            return Err(ServerError::Config(format!(
                "refusing to serve {} without tokens to every host that can reach it: give \
                 --token-secret-file FILE (or {}), listen on 127.0.0.1, or pass --allow-anonymous",
                cfg.listen,
                auth::SECRET_ENV
            )));
        }
        let tls = cfg.tls.as_ref().map(tls::acceptor).transpose()?;
        let root_err = |source| ServerError::Root {
            path: cfg.root.clone(),
            source,
        };
        let canon = std::fs::canonicalize(&cfg.root).map_err(root_err)?;
        if !std::fs::metadata(&canon).map_err(root_err)?.is_dir() {
            return Err(root_err(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "not a folder",
            )));
        }
        let state_dir = cfg
            .state_dir
            .clone()
            .unwrap_or_else(|| canon.join(paths::STATE_DIR_NAME));
        let started = SystemTime::now();
        let store = Arc::new(DigestStore::with_index(
            &state_dir,
            Some(canon.clone()),
            Arc::new(ChunkIndex::default()),
        ));
        let writes = prepare_writes(&state_dir, &canon).await;
        let uploads = writes
            .as_ref()
            .map(|w| Arc::new(Uploads::new(w.dirs.uploads.clone(), cfg.upload_ttl)));
        let root = Arc::new(Root::new(canon, &state_dir));
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: cfg.listen,
            source,
        })?;
        tracing::info!(
            root = %root.path().display(),
            %addr,
            tls = tls.is_some(),
            tokens = cfg.token_secret.is_some(),
            "artifact server bound"
        );
        let ctx = Arc::new(Ctx {
            root,
            store,
            dirs: Arc::new(DirCache::default()),
            stats: Arc::new(Stats::default()),
            max_age: cfg.max_age,
            writes,
            uploads,
            started,
            secret: cfg.token_secret.clone(),
            limit_rate: cfg.limit_rate,
        });
        Ok(Server {
            listener,
            addr,
            ctx,
            tls,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.ctx.stats)
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets answers in progress finish
    /// (at most [`SHUTDOWN_GRACE`]) and returns.
    pub async fn run_until<F: Future<Output = ()> + Send + 'static>(self, shutdown: F) -> Result<(), ServerError> {
        let indexing = tokio::spawn(chunks::index_everything(Arc::clone(&self.ctx), self.ctx.started));
        let expiry = self
            .ctx
            .uploads
            .clone()
            .map(|u| tokio::spawn(uploads::expire_forever(u)));
        let _stop_background = AbortOnDrop(vec![Some(indexing), expiry]);
        let app = Router::new().fallback(handle).with_state(self.ctx);
        let stop = shutdown.boxed().shared();
        let serve = async {
            match self.tls {
                Some(acceptor) => {
                    let listener = tls::TlsListener::new(self.listener, acceptor);
                    axum::serve(listener, app).with_graceful_shutdown(stop.clone()).await
                }
                None => {
                    let listener = self.listener.tap_io(|tcp| {
                        if let Err(e) = tcp.set_nodelay(true) {
                            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                        }
                    });
                    axum::serve(listener, app).with_graceful_shutdown(stop.clone()).await
                }
            }
        };
        let deadline = async {
            stop.clone().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            res = serve => res.map_err(|source| ServerError::Io { context: "serving".into(), source }),
            () = deadline => {
                tracing::warn!("answers still in progress after the shutdown grace period; closing");
                Ok(())
            }
        }
    }
}

/// Background tasks that end with the server.
struct AbortOnDrop(Vec<Option<tokio::task::JoinHandle<()>>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in self.0.iter().flatten() {
            t.abort();
        }
    }
}

/// Prepares the state folders of writes and redoes what the journal holds (before anything
/// is served); `None`, with a warning, when the state folder cannot be written.
async fn prepare_writes(state_dir: &std::path::Path, root: &std::path::Path) -> Option<Arc<WriteState>> {
    let (state_dir, root) = (state_dir.to_path_buf(), root.to_path_buf());
    let prepared = tokio::task::spawn_blocking(move || -> std::io::Result<WriteState> {
        let dirs = StateDirs::prepare(&state_dir)?;
        let journal = Journal::new(dirs.journal.clone());
        let redone = journal.replay(&root)?;
        if redone > 0 {
            tracing::info!(redone, "finished writes cut off by the last stop");
        }
        Ok(WriteState {
            dirs,
            journal,
            locks: Arc::new(PathLocks::default()),
        })
    })
    .await;
    match prepared {
        Ok(Ok(w)) => Some(Arc::new(w)),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "state folder not writable; serving reads only");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "preparing writes failed; serving reads only");
            None
        }
    }
}

/// Runs blocking file-system work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServerError> + Send + 'static,
) -> Result<T, ServerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServerError::Internal(e.to_string()))?
}

/// A server on its own thread with its own tokio runtime; shuts down and joins on drop.
pub struct ServerHandle {
    addr: SocketAddr,
    scheme: &'static str,
    stats: Arc<Stats>,
    #[cfg(test)]
    ctx: Arc<Ctx>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerHandle {
    pub fn start(cfg: ServerConfig) -> Result<ServerHandle, ServerError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("artifactfs-server".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(source) => {
                        let context = "starting the server runtime".into();
                        let _ = ready_tx.send(Err(ServerError::Io { context, source }));
                        return;
                    }
                };
                rt.block_on(async move {
                    let server = match Server::bind(cfg).await {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok((server.local_addr(), server.scheme(), Arc::clone(&server.ctx))));
                    let stop = async {
                        let _ = stop_rx.await;
                    };
                    if let Err(e) = server.run_until(stop).await {
                        tracing::error!(error = %e, "artifact server failed");
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(2));
            })
            .map_err(|source| ServerError::Io {
                context: "starting the server thread".into(),
                source,
            })?;
        match ready_rx.recv() {
            Ok(Ok((addr, scheme, ctx))) => Ok(ServerHandle {
                addr,
                scheme,
                stats: Arc::clone(&ctx.stats),
                #[cfg(test)]
                ctx,
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(ServerError::Internal("the server thread ended at start".into()))
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT` (`https` with TLS), with `127.0.0.1` when the server listens on every
    /// address.
    pub fn url(&self) -> String {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(Ipv4Addr::LOCALHOST.into());
        }
        format!("{}://{addr}", self.scheme)
    }

    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// The digest store (tests look at how much was hashed).
    #[cfg(test)]
    fn store(&self) -> &Arc<DigestStore> {
        &self.ctx.store
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What `artifactfs serve` runs: binds, prints `listening on http(s)://ADDR` (one line, flushed),
/// serves until SIGINT or SIGTERM, then shuts down gracefully.
pub fn serve_blocking(cfg: ServerConfig) -> Result<(), ServerError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| ServerError::Io {
            context: "starting the server runtime".into(),
            source,
        })?;
    rt.block_on(async move {
        let server = Server::bind(cfg).await?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}://{}", server.scheme(), server.local_addr())
            .and_then(|()| out.flush())
            .map_err(|source| ServerError::Io {
                context: "writing to stdout".into(),
                source,
            })?;
        drop(out);
        server.run_until(shutdown_signal()).await
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down");
}

/// Every request: count it, answer it, log it, keep it active until its body is gone.
async fn handle(State(ctx): State<Arc<Ctx>>, req: Request) -> Response {
    let guard = ctx.stats.begin_request();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let resp = dispatch(&ctx, req).await.unwrap_or_else(IntoResponse::into_response);
    tracing::debug!(%method, %uri, status = resp.status().as_u16(), "request");
    resp.map(|b| Body::new(Guarded::new(b, guard)))
}

async fn dispatch(ctx: &Arc<Ctx>, req: Request) -> Result<Response, ServerError> {
    let method = req.method().clone();
    if method == Method::HEAD {
        ctx.stats.bump(stats::Counter::Heads);
    }
    // Before anything else: without a valid token, nothing is looked at.
    let claims = authenticate(ctx, req.headers())?;
    let query = Query::parse(req.uri().query())?;
    let is_read = method == Method::GET || method == Method::HEAD;
    match query.op {
        Op::Info if is_read => return json_response(&server_info(ctx.writes.is_some())),
        Op::Stats if is_read => return json_response(&ctx.stats.snapshot()),
        Op::HasChunks if method == Method::POST => {
            if let Some(c) = &claims {
                c.allows(&parse_request_path(req.uri().path())?.rel, true)?;
            }
            writes::write_state(ctx)?;
            let body = durable::small_body(req.into_body(), HAS_CHUNKS_BODY_MAX).await?;
            return chunks::serve_has_chunks(ctx, body, claims.map(Arc::new)).await;
        }
        _ => {}
    }
    let req_path = parse_request_path(req.uri().path())?;
    if let Some(c) = &claims {
        c.allows(&req_path.rel, !is_read)?;
    }
    if !is_read {
        if let Some(c) = &claims {
            check_write_scope(ctx, c, &req_path, &query).await?;
        }
        return dispatch_write(ctx, method, query, req_path, claims, req).await;
    }
    if !matches!(query.op, Op::Plain | Op::List | Op::Digests | Op::Chunks | Op::Bundle) {
        return Err(ServerError::MethodNotAllowed);
    }
    let root = Arc::clone(&ctx.root);
    let rp = req_path.clone();
    let target = tokio::task::spawn_blocking(move || open_target(&root, &rp))
        .await
        .map_err(|e| ServerError::Internal(e.to_string()))??;
    if let Some(c) = &claims {
        // A symlink inside the scope may lead outside it.
        let (Target::Dir(res) | Target::File(_, res)) = &target;
        c.allows(&res.canon_rel, false)?;
    }
    let shown = req_path.rel.to_string_lossy().into_owned();
    let headers = req.headers();
    match (target, query.op) {
        (Target::Dir(dir), Op::List) | (Target::Dir(dir), Op::Plain) if method == Method::GET => {
            let scope = claims.map(Arc::new);
            listing::serve_listing(ctx, headers, dir, shown, query.limit, query.after, scope).await
        }
        (Target::Dir(dir), Op::Bundle) if method == Method::GET => {
            let limits = bundle::Limits::new(query.max_file, query.max_total);
            bundle::serve_bundle(ctx, dir, query.after, limits, claims.map(Arc::new)).await
        }
        (Target::File(..), Op::Bundle) => Err(ServerError::BadRequest(format!("{shown} is a file, not a folder"))),
        (Target::Dir(_), Op::Digests | Op::Chunks) => {
            Err(ServerError::BadRequest(format!("{shown} is a folder, not a file")))
        }
        // HEAD of a folder (info and stats were answered above).
        (Target::Dir(_), _) => {
            let mut resp = StatusCode::OK.into_response();
            resp.headers_mut().insert(KIND_HEADER, HeaderValue::from_static("dir"));
            Ok(resp)
        }
        (Target::File(..), Op::List) => Err(ServerError::BadRequest(format!("{shown} is a file, not a folder"))),
        (Target::File(..), _) if req_path.trailing_slash => {
            Err(ServerError::NotFound(format!("{shown}/ (a file, not a folder)")))
        }
        (Target::File(file, res), Op::Digests) => files::serve_digests(ctx, headers, &res, file).await,
        (Target::File(file, res), Op::Chunks) if method == Method::GET => {
            chunks::serve_chunks(ctx, headers, &res, file).await
        }
        (Target::File(file, res), _) => files::serve_file(ctx, &method, headers, &res, file).await,
    }
}

/// `PUT`, `POST` and `DELETE`: which write the method and `afs=` select.
async fn dispatch_write(
    ctx: &Arc<Ctx>,
    method: Method,
    query: Query,
    path: paths::RequestPath,
    claims: Option<auth::Claims>,
    req: Request,
) -> Result<Response, ServerError> {
    let (parts, body) = req.into_parts();
    let h = &parts.headers;
    let need = |v: Option<u64>, name: &str| v.ok_or_else(|| ServerError::BadRequest(format!("{name}=N is missing")));
    match (method, query.op) {
        (Method::PUT, Op::Plain) => writes::put(ctx, &path, h, body).await,
        (Method::DELETE, Op::Plain) => writes::delete(ctx, &path, h).await,
        (Method::POST, Op::Mkdir) => writes::mkdir(ctx, &path).await,
        (Method::POST, Op::Move) => writes::move_path(ctx, &path, h, query.to.as_deref(), query.replace).await,
        (Method::POST, Op::Append) => {
            let op = InPlace::Append {
                offset: need(query.offset, "offset")?,
            };
            writes::in_place(ctx, &path, h, op, body).await
        }
        (Method::POST, Op::Write) => {
            let op = InPlace::Write {
                offset: need(query.offset, "offset")?,
            };
            writes::in_place(ctx, &path, h, op, body).await
        }
        (Method::POST, Op::Truncate) => {
            let op = InPlace::Truncate {
                size: need(query.size, "size")?,
            };
            writes::in_place(ctx, &path, h, op, body).await
        }
        (Method::POST, Op::Upload) => uploads::start(ctx, &path, h).await,
        (Method::PUT, Op::Part) => {
            let source = match (query.copy, query.chunk) {
                (Some(_), Some(_)) => {
                    return Err(ServerError::BadRequest("a part is copy= or chunk=, not both".into()));
                }
                (Some((a, b)), None) => PartSource::Copy(a, b),
                (None, Some(hash)) => PartSource::Chunk(hash, claims.map(Arc::new)),
                (None, None) => PartSource::Body(body),
            };
            uploads::part(ctx, &path, query.upload.as_deref(), query.part, query.offset, source).await
        }
        (Method::POST, Op::Commit) => uploads::commit(ctx, &path, h, query.upload.as_deref(), body).await,
        (Method::DELETE, Op::Upload) => uploads::abort(ctx, &path, query.upload.as_deref()).await,
        _ => Err(ServerError::MethodNotAllowed),
    }
}

/// The token's claims when the server requires tokens (`None` when it does not); `401` when
/// the request has no valid token. The token itself is never logged.
fn authenticate(ctx: &Ctx, headers: &http::HeaderMap) -> Result<Option<auth::Claims>, ServerError> {
    let Some(secret) = &ctx.secret else {
        return Ok(None);
    };
    auth::bearer(headers.get(header::AUTHORIZATION))
        .and_then(|token| auth::verify(secret, token, SystemTime::now()))
        .map(Some)
        .map_err(ServerError::from)
}

/// A write's path after following symlinks, and a move's destination, must be in scope too.
async fn check_write_scope(
    ctx: &Ctx,
    claims: &auth::Claims,
    path: &paths::RequestPath,
    query: &Query,
) -> Result<(), ServerError> {
    let to = match (&query.op, query.to.as_deref()) {
        (Op::Move, Some(to)) => {
            let to = paths::parse_decoded_path(to)?;
            claims.allows(&to.rel, true)?;
            Some(to)
        }
        _ => None,
    };
    let root = Arc::clone(&ctx.root);
    let path = path.clone();
    let resolved = blocking(move || {
        let mut rels = vec![root.resolve_existing_prefix(&path.rel)];
        if let Some(to) = to {
            rels.push(root.resolve_existing_prefix(&to.rel));
        }
        Ok(rels)
    })
    .await?;
    for rel in resolved.into_iter().flatten() {
        claims.allows(&rel, true)?;
    }
    Ok(())
}

enum Target {
    File(Arc<File>, Resolved),
    Dir(Resolved),
}

/// Resolves the request path and opens a regular file (its identity is then taken from the
/// open descriptor, never from the path again). Blocking.
fn open_target(root: &Root, req: &paths::RequestPath) -> Result<Target, ServerError> {
    let res = root.resolve(req)?;
    let shown = || req.rel.display().to_string();
    let meta = std::fs::metadata(&res.canon).map_err(|e| ServerError::io(shown(), e))?;
    if meta.is_dir() {
        return Ok(Target::Dir(res));
    }
    if !meta.is_file() {
        return Err(ServerError::NotFound(format!("{} is not a file", shown())));
    }
    let file = paths::open_canonical(&res.canon).map_err(|e| ServerError::io(shown(), e))?;
    let meta = file.metadata().map_err(|e| ServerError::io(shown(), e))?;
    if !meta.is_file() {
        return Err(ServerError::NotFound(format!("{} is not a file", shown())));
    }
    Ok(Target::File(Arc::new(file), res))
}

fn server_info(writable: bool) -> ServerInfo {
    ServerInfo {
        protocol: PROTOCOL.to_string(),
        server: format!("artifactfs {}", env!("CARGO_PKG_VERSION")),
        chunk_size: DIGEST_CHUNK_SIZE,
        max_list_limit: LIST_MAX_LIMIT,
        capabilities: ServerCapabilities {
            ranges: true,
            listing_etags: true,
            digests: true,
            writes: writable,
            partial_writes: writable,
            content_chunks: writable,
            bundles: true,
        },
    }
}

fn json_response<T: Serialize>(value: &T) -> Result<Response, ServerError> {
    let json = serde_json::to_vec(value).map_err(|e| ServerError::Internal(e.to_string()))?;
    Ok(json_bytes_response(json))
}

fn json_bytes_response(json: Vec<u8>) -> Response {
    let mut resp = Response::new(Body::from(json));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
