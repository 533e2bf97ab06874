//! The remotes the end-to-end suites run on, behind one face: the built-in server, nginx with
//! WebDAV, Apache `mod_dav` and an S3 server (s3s-fs), each over a folder the test can look
//! into, each counting the bytes it sends and receives. A test body is written once ([`crate::on_remotes!`]) and runs
//! on every remote; a remote that lacks what a test needs is skipped, by name, with the reason
//! (printed, and listed by `scripts/test.sh` at the end).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use artifactfs::server::ServerConfig;
use artifactfs::testing::web::{NginxMode, WebServer};

use super::s3::{S3Server, Wire as S3Wire};
use super::{Mount, MountOpts, Server, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Builtin,
    Nginx,
    Apache,
    S3,
}

impl Kind {
    pub fn has(self, need: Need) -> bool {
        matches!(
            (self, need),
            (Kind::Builtin, _)
                | (Kind::Apache, Need::PartialUpdates)
                | (Kind::S3, Need::PartialUpdates | Need::ParallelParts)
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Builtin => "builtin",
            Kind::Nginx => "nginx",
            Kind::Apache => "apache",
            Kind::S3 => "s3",
        }
    }
}

/// What a test needs of a remote beyond reading files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Appends and range writes sent as the change alone (partial writes or server-side copy).
    PartialUpdates,
    /// Rewritten files sent as the chunks that changed (content-defined chunks).
    ChunkDedup,
    /// New files streamed in parallel parts while they are written (upload sessions).
    ParallelParts,
    /// The server says how long metadata stays valid (`Cache-Control: max-age`).
    ServerMaxAge,
}

impl Need {
    pub fn lacking(self) -> &'static str {
        match self {
            Need::PartialUpdates => "no partial writes and no server-side copy",
            Need::ChunkDedup => "no content-defined chunks",
            Need::ParallelParts => "no upload sessions",
            Need::ServerMaxAge => "no server-set max-age",
        }
    }
}

// One per test: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Backend {
    Builtin {
        store: Store,
        server: Option<Server>,
        addr: SocketAddr,
        cfg: Box<dyn Fn(&mut ServerConfig) + Send>,
    },
    Web(WebServer),
    S3 {
        dir: tempfile::TempDir,
        server: Option<S3Server>,
        addr: SocketAddr,
        wire: std::sync::Arc<S3Wire>,
        /// Another writer of the bucket, through the S3 API.
        client: artifactfs::store::s3::S3Store,
        rt: tokio::runtime::Runtime,
    },
}

/// Bytes counted by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Wire {
    /// Bytes of files sent (response bodies of file reads).
    pub file_bytes_sent: u64,
    /// Bytes received (requests).
    pub received: u64,
}

pub struct Remote {
    pub kind: Kind,
    backend: Backend,
}

impl Remote {
    pub fn start(kind: Kind) -> Remote {
        Remote::start_with(kind, |_| {})
    }

    /// `cfg` sets up the built-in server (other kinds have nothing to set).
    pub fn start_with(kind: Kind, cfg: impl Fn(&mut ServerConfig) + Send + 'static) -> Remote {
        let backend = match kind {
            Kind::Builtin => {
                let store = Store::new();
                let server = store.serve_with(&cfg);
                let addr = server.handle.addr();
                Backend::Builtin {
                    store,
                    server: Some(server),
                    addr,
                    cfg: Box::new(cfg),
                }
            }
            Kind::Nginx => Backend::Web(WebServer::nginx(NginxMode::Dav).expect("nginx starts")),
            Kind::Apache => Backend::Web(WebServer::apache().expect("apache starts")),
            Kind::S3 => {
                let dir = tempfile::tempdir().unwrap();
                std::fs::create_dir(dir.path().join(super::s3::BUCKET)).unwrap();
                let server = S3Server::restart(dir.path(), "127.0.0.1:0".parse().unwrap(), Default::default());
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                let client = rt.block_on(server.store(""));
                Backend::S3 {
                    addr: server.addr,
                    wire: server.wire.clone(),
                    server: Some(server),
                    dir,
                    client,
                    rt,
                }
            }
        };
        Remote { kind, backend }
    }

    pub fn url(&self) -> String {
        match &self.backend {
            Backend::Builtin { addr, .. } => format!("http://{addr}"),
            Backend::Web(w) => w.url.clone(),
            Backend::S3 { .. } => format!("s3://{}/", super::s3::BUCKET),
        }
    }

    /// The mount options this remote needs (S3: endpoint, region, credentials), with `o`'s.
    pub fn opts(&self, mut o: MountOpts) -> MountOpts {
        if let Backend::S3 { addr, .. } = &self.backend {
            let mut base = super::s3::mount_opts(&format!("http://{addr}"));
            base.args.append(&mut o.args);
            base.env.append(&mut o.env);
            base.cache = o.cache;
            return base;
        }
        o
    }

    /// A mount of this remote.
    pub fn mount(&self) -> Mount {
        self.mount_with(MountOpts::default())
    }

    pub fn mount_with(&self, o: MountOpts) -> Mount {
        Mount::with(&self.url(), self.opts(o))
    }

    /// A mount whose object reads can be broken on purpose: through a fault proxy, or on S3
    /// (signed requests, which a proxy would break) by the server itself after it checked them.
    pub fn mount_with_faults(&self) -> (Mount, std::sync::Arc<super::proxy::Faults>, Option<super::proxy::Proxy>) {
        match &self.backend {
            Backend::S3 { wire, .. } => (self.mount(), wire.faults.clone(), None),
            _ => {
                let proxy = super::proxy::Proxy::start(&self.url());
                let m = Mount::new(&proxy.url());
                (m, proxy.faults.clone(), Some(proxy))
            }
        }
    }

    /// The folder the remote serves.
    pub fn root(&self) -> PathBuf {
        match &self.backend {
            Backend::Builtin { store, .. } => store.dir.path().to_path_buf(),
            Backend::Web(w) => w.root.clone(),
            // s3s-fs keeps the objects of a bucket as files in its folder.
            Backend::S3 { dir, .. } => dir.path().join(super::s3::BUCKET),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }

    /// Publishes a file on the remote, behind any mount's back.
    pub fn write(&self, rel: &str, data: &[u8]) {
        match &self.backend {
            Backend::Builtin { store, .. } => store.write(rel, data),
            Backend::Web(w) => w.write(rel, data),
            Backend::S3 { client, rt, .. } => rt
                .block_on(artifactfs::store::Store::put(
                    client,
                    rel,
                    bytes::Bytes::copy_from_slice(data),
                    artifactfs::store::WriteCondition::None,
                ))
                .map(|_| ())
                .unwrap_or_else(|e| panic!("put {rel}: {e}")),
        }
    }

    /// What the remote holds at `rel`.
    pub fn stored(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.path(rel)).unwrap_or_else(|e| panic!("{rel} on the remote: {e}"))
    }

    pub fn has(&self, need: Need) -> bool {
        self.kind.has(need)
    }

    /// Whether listings show names starting with a dot (nginx's WebDAV listings do not;
    /// such files are still found by name).
    pub fn lists_dotfiles(&self) -> bool {
        self.kind != Kind::Nginx
    }

    /// Whether folders can be renamed (S3 has no rename: refused with EPERM, as documented).
    pub fn renames_folders(&self) -> bool {
        self.kind != Kind::S3
    }

    /// The most a 4 KiB change to a large cached file may send: the change and some protocol,
    /// or on S3 one minimum-size multipart part (5 MiB) beside server-side copies.
    pub fn small_change_budget(&self) -> u64 {
        match self.kind {
            Kind::S3 => (5 << 20) + (256 << 10),
            _ => 64 << 10,
        }
    }

    /// What the server counted so far.
    pub fn wire(&self) -> Wire {
        match &self.backend {
            Backend::Builtin { server, .. } => {
                let s = server.as_ref().expect("the server is up").stats();
                Wire {
                    file_bytes_sent: s.file_bytes_sent,
                    received: s.bytes_received,
                }
            }
            Backend::Web(w) => {
                let log = settled(w);
                Wire {
                    file_bytes_sent: log
                        .iter()
                        .filter(|r| {
                            // File reads: not folder pages, nor the probe of `?afs=info`.
                            r.method == "GET"
                                && (r.status == 200 || r.status == 206)
                                && !r.uri.ends_with('/')
                                && !r.uri.contains('?')
                        })
                        .map(|r| r.body_out)
                        .sum(),
                    received: log.iter().map(|r| r.bytes_in).sum(),
                }
            }
            Backend::S3 { wire, .. } => Wire {
                file_bytes_sent: wire.file_sent(),
                received: wire.received(),
            },
        }
    }

    /// Listing requests so far, where listings come in pages (the built-in server).
    pub fn list_pages(&self) -> Option<u64> {
        match &self.backend {
            Backend::Builtin { server, .. } => server.as_ref().map(|s| s.stats().lists),
            Backend::Web(_) => None,
            Backend::S3 { wire, .. } => Some(wire.requests().iter().filter(|r| r.is_list()).count() as u64),
        }
    }

    /// Starts counting the most requests at once afresh (from those in flight now).
    pub fn restart_max_active(&self) {
        match &self.backend {
            Backend::Builtin { server, .. } => {
                if let Some(s) = server.as_ref() {
                    s.restart_max_active();
                }
            }
            Backend::Web(_) => {}
            Backend::S3 { wire, .. } => wire.max_active.store(
                wire.active.load(std::sync::atomic::Ordering::SeqCst),
                std::sync::atomic::Ordering::SeqCst,
            ),
        }
    }

    /// Most requests the server handled at once, where it counts them.
    pub fn max_active(&self) -> Option<u64> {
        match &self.backend {
            Backend::Builtin { server, .. } => server.as_ref().map(|s| s.stats().max_active),
            Backend::Web(_) => None,
            Backend::S3 { wire, .. } => Some(wire.max_active()),
        }
    }

    /// Restarts the built-in server with `f` applied to its configuration.
    pub fn configure(&mut self, f: impl Fn(&mut ServerConfig) + Send + 'static) {
        if let Backend::Builtin { cfg, .. } = &mut self.backend {
            *cfg = Box::new(f);
        }
        self.stop();
        self.restart();
    }

    /// The server goes away (connections refused from now on).
    pub fn stop(&mut self) {
        match &mut self.backend {
            Backend::Builtin { server, .. } => drop(server.take()),
            Backend::Web(w) => w.stop(),
            Backend::S3 { server, .. } => drop(server.take()),
        }
    }

    /// The server comes back on the same address, over the same folder.
    pub fn restart(&mut self) {
        match &mut self.backend {
            Backend::Builtin {
                store,
                server,
                addr,
                cfg,
            } => {
                let at = *addr;
                *server = Some(store.serve_with(|c| {
                    cfg(c);
                    c.listen = at;
                }));
            }
            Backend::Web(w) => w.restart().expect("the server restarts"),
            Backend::S3 {
                dir,
                server,
                addr,
                wire,
                ..
            } => *server = Some(S3Server::restart(dir.path(), *addr, wire.clone())),
        }
    }
}

/// The request log once it stopped growing (a request is logged just after its answer).
fn settled(w: &WebServer) -> Vec<artifactfs::testing::web::Logged> {
    let mut last = w.requests();
    loop {
        std::thread::sleep(Duration::from_millis(30));
        let now = w.requests();
        if now.len() == last.len() {
            return now;
        }
        last = now;
    }
}

/// Runs `body` on a fresh remote of `kind`, or skips it (said on stderr and recorded in the
/// file `AFS_SKIPPED` names) when the remote lacks one of `needs`.
pub fn run(test: &str, kind: Kind, needs: &[Need], body: fn(&mut Remote)) {
    if let Some(n) = needs.iter().find(|n| !kind.has(**n)) {
        let line = format!("{test}::{}: {}", kind.name(), n.lacking());
        eprintln!("SKIPPED {line}");
        if let Ok(path) = std::env::var("AFS_SKIPPED")
            && let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path)
        {
            let _ = writeln!(f, "{line}");
        }
        return;
    }
    body(&mut Remote::start(kind));
}

/// Defines each test body once and a `#[test]` per remote kind, named `<test>::<kind>`
/// (`cargo test nginx` runs a suite on nginx alone):
///
/// ```ignore
/// on_remotes! {
///     /// What it proves.
///     fn reads_back(r) needs [] { ... }
/// }
/// ```
#[macro_export]
macro_rules! on_remotes {
    ($( $(#[$meta:meta])* fn $name:ident($r:ident) needs [$($need:ident),*] $body:block )*) => {$(
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[allow(unused_imports)]
            use common::remote::{run, Kind, Need, Remote};

            fn body($r: &mut Remote) $body

            #[test]
            fn builtin() {
                run(stringify!($name), Kind::Builtin, &[$(Need::$need),*], body);
            }

            #[test]
            fn nginx() {
                run(stringify!($name), Kind::Nginx, &[$(Need::$need),*], body);
            }

            #[test]
            fn apache() {
                run(stringify!($name), Kind::Apache, &[$(Need::$need),*], body);
            }

            #[test]
            fn s3() {
                run(stringify!($name), Kind::S3, &[$(Need::$need),*], body);
            }
        }
    )*};
}
