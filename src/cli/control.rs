//! The control socket of a running mount: a Unix socket (mode 0600) beside the mount's record
//! in the user's runtime directory. `artifactfs status` and `artifactfs warm` talk to it: one
//! JSON request line, then JSON answer lines (`warm` streams its progress about every 100 ms
//! until it is done; closing the connection stops it).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::cache::Cache;
use crate::fs::ArtifactFs;
use crate::read::Reader;
use crate::read::warm::FileProgress;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Fetch these paths (relative to the mount's root) into the cache, in this order.
    Warm {
        paths: Vec<String>,
    },
}

/// Live figures of a mount.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub remote: String,
    pub mountpoint: PathBuf,
    pub pid: u32,
    pub uptime_secs: u64,
    /// Requests to the remote in flight now; how many at once at first (the setting), now,
    /// and at most (the number grows while more requests at once bring more bytes per second).
    pub requests_in_flight: usize,
    pub concurrency: usize,
    #[serde(default)]
    pub concurrency_now: usize,
    #[serde(default)]
    pub max_concurrency: usize,
    /// Bytes fetched from the remote per second, over the last second.
    pub fetch_rate: u64,
    pub fetched_bytes: u64,
    /// Bytes read through the mount that the cache had, and that it had not.
    pub hit_bytes: u64,
    pub miss_bytes: u64,
    pub open_files: usize,
    /// Whether files complete in the cache are read by the kernel directly, and how many
    /// open handles are read that way now.
    #[serde(default)]
    pub passthrough: bool,
    #[serde(default)]
    pub passthrough_files: usize,
    /// Files whose changes are waiting to be sent (write-back).
    pub pending_uploads: usize,
    pub cache_bytes: u64,
    /// This control socket.
    pub socket: PathBuf,
    /// Where Prometheus metrics are served (`--metrics-addr`), if they are.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// A line of a `warm` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WarmUpdate {
    pub files: Vec<FileProgress>,
    pub finished: bool,
}

/// The daemon's side.
pub struct Control {
    pub fs: Arc<ArtifactFs>,
    pub reader: Arc<Reader>,
    pub cache: Arc<Cache>,
    pub remote: String,
    pub mountpoint: PathBuf,
    started: Instant,
    rate: AtomicU64,
}

impl Control {
    pub fn new(
        fs: Arc<ArtifactFs>,
        reader: Arc<Reader>,
        cache: Arc<Cache>,
        remote: String,
        mountpoint: PathBuf,
    ) -> Arc<Self> {
        Arc::new(Control {
            fs,
            reader,
            cache,
            remote,
            mountpoint,
            started: Instant::now(),
            rate: AtomicU64::new(0),
        })
    }

    fn status(&self) -> Status {
        let c = self.cache.session_counters();
        Status {
            remote: self.remote.clone(),
            mountpoint: self.mountpoint.clone(),
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            requests_in_flight: self.reader.requests_in_flight(),
            concurrency: self.reader.config().concurrency,
            concurrency_now: self.reader.concurrency_now().0,
            max_concurrency: self.reader.concurrency_now().1,
            fetch_rate: self.rate.load(Ordering::Relaxed),
            fetched_bytes: c.fetched_bytes,
            hit_bytes: c.hit_bytes,
            miss_bytes: c.miss_bytes,
            open_files: self.fs.open_files(),
            passthrough: self.fs.passthrough_enabled(),
            passthrough_files: self.fs.passthrough_handles(),
            pending_uploads: self.fs.pending_uploads(),
            cache_bytes: self.cache.used(),
            socket: super::registry::socket_path(&self.mountpoint),
            metrics_addr: crate::metrics::get().endpoint(),
        }
    }

    /// Listens on `path` until the runtime stops. Only the mounting user can connect (the
    /// socket is 0600 in a 0700 directory).
    pub async fn serve(self: Arc<Self>, listener: tokio::net::UnixListener) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut last = me.cache.session_counters().fetched_bytes;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = me.cache.session_counters().fetched_bytes;
                me.rate.store(now.saturating_sub(last), Ordering::Relaxed);
                last = now;
            }
        });
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.answer(conn).await {
                    tracing::debug!("control connection: {e}");
                }
            });
        }
    }

    async fn answer(&self, conn: tokio::net::UnixStream) -> std::io::Result<()> {
        let (rd, mut wr) = conn.into_split();
        let mut line = String::new();
        tokio::io::BufReader::new(rd).read_line(&mut line).await?;
        let req: Request = serde_json::from_str(&line).map_err(std::io::Error::other)?;
        match req {
            Request::Status => send(&mut wr, &self.status()).await,
            Request::Warm { paths } => {
                tracing::info!(?paths, "warm-up asked");
                let warm = Arc::new(crate::read::warm::resolve(&self.reader, &paths).await);
                let task = tokio::spawn(crate::read::warm::run(self.reader.clone(), warm.clone()));
                // Stops the warm-up if the client goes away.
                let _abort = AbortOnDrop(task.abort_handle());
                loop {
                    let finished = task.is_finished();
                    send(
                        &mut wr,
                        &WarmUpdate {
                            files: warm.progress(),
                            finished,
                        },
                    )
                    .await?;
                    if finished {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn send<T: Serialize>(wr: &mut tokio::net::unix::OwnedWriteHalf, v: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    line.push(b'\n');
    wr.write_all(&line).await
}

/// Binds the control socket at `path` (within a tokio runtime), or says why not.
pub fn listen(path: &Path) -> Option<tokio::net::UnixListener> {
    match bind(path) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(path = %path.display(), "no control socket (status and warm will not reach this mount): {e}");
            None
        }
    }
}

fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    // A socket left by a daemon that died.
    let _ = std::fs::remove_file(path);
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// The client's side: sends `req` to the mount at `mountpoint` and returns the answer lines.
pub fn ask(mountpoint: &Path, req: &Request) -> Result<impl Iterator<Item = Result<String, String>> + use<>, String> {
    let path = super::registry::socket_path(mountpoint);
    let mut conn = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        format!(
            "cannot reach the mount at {} ({}): {e}",
            mountpoint.display(),
            path.display()
        )
    })?;
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    conn.write_all(&line).map_err(|e| e.to_string())?;
    Ok(BufReader::new(conn).lines().map(|l| l.map_err(|e| e.to_string())))
}

/// The mount `path` is in: its mount point (the nearest ancestor with a live daemon) and the
/// path relative to it.
pub fn mount_of(path: &Path) -> Result<(PathBuf, String), String> {
    let absolute = std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // As given (how mount points are recorded), then with symbolic links resolved.
    let candidates = [Some(absolute), std::fs::canonicalize(path).ok()];
    for abs in candidates.into_iter().flatten() {
        for at in abs.ancestors() {
            if super::registry::find(at).is_some() {
                let rel = abs.strip_prefix(at).unwrap_or(Path::new(""));
                let rel = rel
                    .to_str()
                    .ok_or_else(|| format!("{}: not a UTF-8 path", path.display()))?;
                return Ok((at.to_path_buf(), rel.to_string()));
            }
        }
    }
    Err(format!("{} is not inside an artifactfs mount", path.display()))
}
