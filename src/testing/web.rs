//! Real web servers for tests: nginx (Debian `nginx-extras`, for WebDAV listings) and Apache
//! `mod_dav`, each started on 127.0.0.1 over its own temp folder, logging every request with
//! its bytes in and out, and stopped on drop.
//!
//! nginx gets its listening socket bound here on port 0 and handed over (`NGINX` environment
//! variable, the way nginx passes sockets to a new binary). Apache cannot take a socket, so
//! it gets a port found free just before it starts, and another if that one was taken.

use std::io;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What an nginx test server offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NginxMode {
    /// WebDAV writes and `PROPFIND` listings (`dav` + `dav_ext`), JSON index too.
    Dav,
    /// A read-only JSON index.
    JsonIndex,
    /// A read-only HTML index.
    HtmlIndex,
    /// A read-only HTML index that ignores `Range` (whole files only).
    NoRanges,
}

/// One request as the server logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub method: String,
    pub uri: String,
    pub status: u16,
    /// Bytes received, headers included.
    pub bytes_in: u64,
    /// Bytes sent, headers included.
    pub bytes_out: u64,
    /// Bytes of the response body.
    pub body_out: u64,
}

#[derive(Debug)]
pub struct WebServer {
    pub url: String,
    pub root: PathBuf,
    /// A private folder (config, logs, the served root), removed on drop.
    dir: PathBuf,
    child: Child,
    log: PathBuf,
    launch: Launch,
}

/// How the server process is started (again, after [`WebServer::stop`]).
#[derive(Debug)]
enum Launch {
    Nginx { bin: PathBuf, conf: PathBuf },
    Apache { bin: PathBuf, conf: PathBuf },
}

impl Launch {
    fn spawn(&self, dir: &Path, sock: Option<TcpListener>) -> io::Result<Child> {
        match self {
            Launch::Nginx { bin, conf } => {
                let sock = sock.ok_or_else(|| io::Error::other("nginx needs its socket"))?;
                let fd = sock.as_raw_fd();
                let mut cmd = Command::new(bin);
                // The socket survives exec into nginx only: cleared in the child, so that no
                // other process a test starts inherits it.
                unsafe {
                    cmd.pre_exec(move || clear_cloexec(fd));
                }
                cmd.arg("-c")
                    .arg(conf)
                    .arg("-p")
                    .arg(dir)
                    .arg("-e")
                    .arg(dir.join("logs/error.log"))
                    .env("NGINX", format!("{fd};"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
            }
            Launch::Apache { bin, conf } => Command::new(bin)
                .arg("-f")
                .arg(conf)
                .arg("-DFOREGROUND")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn(),
        }
    }
}

fn find(candidates: &[&str]) -> io::Result<PathBuf> {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not installed (scripts/test.sh installs it)", candidates[0]),
            )
        })
}

impl WebServer {
    pub fn nginx(mode: NginxMode) -> io::Result<Self> {
        Self::nginx_on(mode, TcpListener::bind("127.0.0.1:0")?)
    }

    /// nginx listening on `sock` (bound by the caller).
    pub fn nginx_on(mode: NginxMode, sock: TcpListener) -> io::Result<Self> {
        let bin = find(&["/usr/sbin/nginx", "/usr/bin/nginx"])?;
        let dir = private_dir()?;
        let root = dir.join("root");
        for d in ["root", "tmp", "logs"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let port = sock.local_addr()?.port();
        let location = match mode {
            NginxMode::Dav => {
                "dav_methods PUT DELETE MKCOL COPY MOVE; dav_ext_methods PROPFIND OPTIONS; \
                 dav_access user:rw group:r all:r; create_full_put_path off; \
                 autoindex on; autoindex_format json;"
            }
            NginxMode::JsonIndex => "autoindex on; autoindex_format json;",
            NginxMode::HtmlIndex => "autoindex on;",
            NginxMode::NoRanges => "autoindex on; max_ranges 0;",
        };
        let dav_module = if mode == NginxMode::Dav {
            let m = find(&["/usr/lib/nginx/modules/ngx_http_dav_ext_module.so"])?;
            format!("load_module {};", m.display())
        } else {
            String::new()
        };
        let d = dir.display();
        let log = dir.join("logs/access.log");
        let conf = format!(
            "{dav_module}
daemon off;
master_process on;
worker_processes 1;
{user}
pid {d}/nginx.pid;
error_log {d}/logs/error.log;
events {{ worker_connections 256; }}
http {{
  log_format wire '$request_method $request_uri $status $request_length $bytes_sent $body_bytes_sent';
  access_log {log} wire;
  client_body_temp_path {d}/tmp;
  client_max_body_size 0;
  types {{ application/octet-stream bin; text/plain txt; }}
  server {{
    listen 127.0.0.1:{port};
    root {root};
    location / {{ {location} }}
  }}
}}
",
            user = if is_root() { "user root;" } else { "" },
            log = log.display(),
            root = root.display(),
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let launch = Launch::Nginx { bin, conf: conf_path };
        let child = launch.spawn(&dir, Some(sock))?;
        let s = WebServer {
            url: format!("http://127.0.0.1:{port}"),
            root,
            dir,
            child,
            log,
            launch,
        };
        s.wait_ready()?;
        Ok(s)
    }

    /// Apache with `mod_dav` (partial `PUT` with `Content-Range`) and an HTML index.
    pub fn apache() -> io::Result<Self> {
        let bin = find(&["/usr/sbin/apache2", "/usr/sbin/httpd"])?;
        let modules = find(&["/usr/lib/apache2/modules", "/usr/lib64/httpd/modules"])?;
        let mut last = None;
        for _ in 0..5 {
            match Self::apache_once(&bin, &modules) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("apache did not start")))
    }

    fn apache_once(bin: &Path, modules: &Path) -> io::Result<Self> {
        let dir = private_dir()?;
        let root = dir.join("root");
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(dir.join("logs"))?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let d = dir.display();
        let m = modules.display();
        let log = dir.join("logs/access.log");
        // Apache refuses to serve as root: it runs as www-data, which owns the tree.
        let user = if is_root() { "User www-data\nGroup www-data" } else { "" };
        let conf = format!(
            "ServerRoot {d}
ServerName 127.0.0.1
PidFile {d}/httpd.pid
Listen 127.0.0.1:{port}
LoadModule mpm_event_module {m}/mod_mpm_event.so
LoadModule authz_core_module {m}/mod_authz_core.so
LoadModule dav_module {m}/mod_dav.so
LoadModule dav_fs_module {m}/mod_dav_fs.so
LoadModule autoindex_module {m}/mod_autoindex.so
LoadModule dir_module {m}/mod_dir.so
{user}
ErrorLog {d}/logs/error.log
LogFormat \"%m %U%q %>s %I %O %B\" wire
CustomLog {log} wire
DavLockDB {d}/davlock/db
DocumentRoot {root}
<Directory {root}>
  Dav On
  Options +Indexes
  Require all granted
</Directory>
",
            log = log.display(),
            root = root.display(),
        );
        std::fs::create_dir_all(dir.join("davlock"))?;
        let conf_path = dir.join("httpd.conf");
        std::fs::write(&conf_path, conf)?;
        if is_root() {
            let out = Command::new("chown")
                .args(["-R", "www-data:www-data"])
                .arg(&root)
                .arg(dir.join("davlock"))
                .arg(dir.join("logs"))
                .status()?;
            if !out.success() {
                return Err(io::Error::other("cannot give the tree to www-data"));
            }
        }
        let launch = Launch::Apache {
            bin: bin.to_path_buf(),
            conf: conf_path,
        };
        let child = launch.spawn(&dir, None)?;
        let s = WebServer {
            url: format!("http://127.0.0.1:{port}"),
            root,
            dir,
            child,
            log,
            launch,
        };
        s.wait_ready()?;
        Ok(s)
    }

    fn wait_ready(&self) -> io::Result<()> {
        let addr = self.url.trim_start_matches("http://").to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(&addr).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let err = std::fs::read_to_string(self.dir.join("logs/error.log")).unwrap_or_default();
                return Err(io::Error::other(format!("the server did not start: {err}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The file `rel` under the served root.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Puts a file in the served tree (as its owner would: written beside, renamed). A file
    /// replaced gets an mtime in a later second than the one it replaces: these servers'
    /// version tags are the mtime in seconds and the size, so a same-size replacement within
    /// the same second would be invisible to every client (`docs/SEMANTICS.md`).
    pub fn write(&self, rel: &str, data: &[u8]) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().expect("a file in a folder")).expect("mkdir");
        let before = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
        let tmp = p.with_extension("tmp-writing");
        std::fs::write(&tmp, data).expect("write");
        std::fs::rename(&tmp, &p).expect("rename");
        if let Some(old) = before {
            let secs = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
            let now = std::fs::metadata(&p).and_then(|m| m.modified()).expect("mtime");
            if secs(now) <= secs(old) {
                let later = std::time::UNIX_EPOCH + Duration::from_secs(secs(old) + 1);
                std::fs::File::options()
                    .write(true)
                    .open(&p)
                    .and_then(|f| f.set_modified(later))
                    .expect("set mtime");
            }
        }
        self.give_away(&p);
    }

    pub fn mkdir(&self, rel: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(&p).expect("mkdir");
        self.give_away(&p);
    }

    /// Apache runs as www-data: what a test puts in its tree must be www-data's.
    fn give_away(&self, p: &Path) {
        if is_root() && self.dir.join("davlock").exists() {
            let mut cmd = Command::new("chown");
            cmd.arg("www-data:www-data");
            let mut at = Some(p);
            while let Some(q) = at.filter(|q| q.starts_with(&self.root)) {
                cmd.arg(q);
                at = q.parent();
            }
            let _ = cmd.status();
        }
    }

    /// Every request logged so far. Servers log a request once it is answered.
    pub fn requests(&self) -> Vec<Logged> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let [method, uri, status, bytes_in, bytes_out, body_out] = f.as_slice() else {
                    return None;
                };
                Some(Logged {
                    method: method.to_string(),
                    uri: uri.to_string(),
                    status: status.parse().ok()?,
                    bytes_in: bytes_in.parse().unwrap_or(0),
                    bytes_out: bytes_out.parse().unwrap_or(0),
                    body_out: body_out.parse().unwrap_or(0),
                })
            })
            .collect()
    }

    /// Waits until at least `n` requests are logged (the log trails the answer a little).
    pub fn requests_at_least(&self, n: usize) -> Vec<Logged> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = self.requests();
            if r.len() >= n || Instant::now() > deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the server again on the same address, over the same tree (after [`Self::stop`]).
    pub fn restart(&mut self) -> io::Result<()> {
        if let Ok(None) = self.child.try_wait() {
            return Ok(());
        }
        let sock = match self.launch {
            Launch::Nginx { .. } => Some(TcpListener::bind(self.url.trim_start_matches("http://"))?),
            Launch::Apache { .. } => None,
        };
        self.child = self.launch.spawn(&self.dir, sock)?;
        self.wait_ready()
    }

    /// Stops the server (as a crash would, or a machine going away).
    pub fn stop(&mut self) {
        // SIGTERM: nginx and Apache both stop at once, closing their connections.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn private_dir() -> io::Result<PathBuf> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("afs-web-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn clear_cloexec(fd: i32) -> io::Result<()> {
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
