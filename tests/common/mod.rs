//! Helpers that make an end-to-end test read like the user's own commands: a store folder, the
//! built-in server on 127.0.0.1 port 0, a real mount in a temp dir that is always unmounted
//! (also when the test panics), and a fault-injecting proxy.
#![allow(dead_code)]

pub mod proxy;
pub mod remote;
pub mod s3;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use artifactfs::protocol::ServerStats;
use artifactfs::server::{ServerConfig, ServerHandle};

pub const MIB: usize = 1 << 20;

pub use artifactfs::testing::noise as bytes;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_artifactfs")
}

pub fn hash(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

pub fn hash_file(p: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(p)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize().to_hex().to_string());
        }
        h.update(&buf[..n]);
    }
}

/// A folder served as an artifact store.
pub struct Store {
    pub dir: tempfile::TempDir,
}

impl Store {
    pub fn new() -> Self {
        Store {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, data: &[u8]) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        // Written beside and renamed, as a publisher would: readers never see half a file.
        let tmp = p.with_extension("tmp-writing");
        std::fs::write(&tmp, data).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
    }

    pub fn serve(&self) -> Server {
        self.serve_with(|_| {})
    }

    pub fn serve_with(&self, f: impl FnOnce(&mut ServerConfig)) -> Server {
        let mut cfg = ServerConfig::local(self.dir.path());
        f(&mut cfg);
        Server {
            handle: ServerHandle::start(cfg).unwrap(),
        }
    }
}

pub struct Server {
    pub handle: ServerHandle,
}

impl Server {
    pub fn url(&self) -> String {
        self.handle.url()
    }

    pub fn stats(&self) -> ServerStats {
        self.handle.stats().snapshot()
    }

    pub fn restart_max_active(&self) {
        self.handle.stats().restart_max_active();
    }
}

/// A real mount of `url` in a temp dir, run in the foreground as a child process so the test
/// knows its pid. Dropping it unmounts (lazily if need be) and reaps the daemon.
pub struct Mount {
    pub dir: tempfile::TempDir,
    pub mnt: PathBuf,
    pub cache: PathBuf,
    pub child: Option<Child>,
    pub log: PathBuf,
}

#[derive(Default)]
pub struct MountOpts {
    pub cache: Option<PathBuf>,
    pub args: Vec<String>,
    /// Environment of the daemon (e.g. S3 credentials).
    pub env: Vec<(String, String)>,
}

/// `--cache-min-free 0` unless `args` set it: how full the test machine's disk happens to be
/// (CI machines run with little room left) must not shrink the cache a test counts on. The
/// tests of the free-space rule set it themselves.
fn host_disk_independent(args: &[String]) -> Vec<&'static str> {
    if args.iter().any(|a| a == "--cache-min-free") {
        vec![]
    } else {
        vec!["--cache-min-free", "0"]
    }
}

impl Mount {
    pub fn new(url: &str) -> Mount {
        Mount::with(url, MountOpts::default())
    }

    pub fn with(url: &str, opts: MountOpts) -> Mount {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let cache = opts.cache.clone().unwrap_or_else(|| dir.path().join("cache"));
        let log = dir.path().join("mount.log");
        let child = Command::new(bin())
            .arg("mount")
            .arg(url)
            .arg(&mnt)
            .arg("--foreground")
            .arg("--cache-dir")
            .arg(&cache)
            .args(&opts.args)
            .args(host_disk_independent(&opts.args))
            .env("RUST_LOG", "artifactfs=debug,info")
            .envs(opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut m = Mount {
            dir,
            mnt,
            cache,
            child: Some(child),
            log,
        };
        m.wait_mounted();
        m
    }

    fn wait_mounted(&mut self) {
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if is_mounted(&self.mnt) {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("mount exited with {status}: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("not mounted after 20 s: {}", self.log_text());
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `artifactfs unmount`, then waits for the daemon to exit.
    pub fn unmount(&mut self) -> Output {
        let out = Command::new(bin()).arg("unmount").arg(&self.mnt).output().unwrap();
        if let Some(mut c) = self.child.take() {
            let end = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() > end {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        out
    }

    /// Kills the daemon without letting it clean up (a crash); the dead mount stays.
    pub fn kill9_keep_mounted(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The log dies with the temp dir: its end goes with the failure.
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            eprintln!("--- the mount's log, last lines ---\n{tail}\n---");
        }
        if self.child.is_some() {
            let out = self.unmount();
            if !out.status.success() && is_mounted(&self.mnt) {
                force_unmount(&self.mnt);
            }
        }
        if is_mounted(&self.mnt) {
            force_unmount(&self.mnt);
        }
    }
}

pub fn force_unmount(mnt: &Path) {
    let c = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid C string.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

pub fn is_mounted(mnt: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = mnt.to_str().unwrap().replace(' ', "\\040");
    text.lines().any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// RssAnon and VmRSS of a process, in bytes.
pub fn memory_of(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = s.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
    };
    Some((field("RssAnon:")?, field("VmRSS:")?))
}

/// Every file under `root` (relative path → (is_dir, size)), sorted.
pub fn tree(root: &Path) -> Vec<(String, bool, u64)> {
    let mut out = Vec::new();
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, bool, u64)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().to_string();
            if dir == root && name == ".artifactfs" {
                continue;
            }
            let md = std::fs::metadata(e.path()).unwrap();
            let rel = e.path().strip_prefix(root).unwrap().to_string_lossy().to_string();
            out.push((rel, md.is_dir(), if md.is_dir() { 0 } else { md.len() }));
            if md.is_dir() {
                walk(root, &e.path(), out);
            }
        }
    }
    walk(root, root, &mut out);
    out
}

/// `artifactfs ARGS…`, waited for.
/// `artifactfs status MNT --json`.
pub fn status_of(mnt: &Path) -> serde_json::Value {
    serde_json::from_slice(&afs(&["status", s(mnt), "--json"]).stdout).unwrap()
}

/// The Prometheus metrics of the daemon of `mnt` (mounted with `--metrics-addr`).
pub fn metrics_of(mnt: &Path) -> String {
    let addr = status_of(mnt)["metrics_addr"]
        .as_str()
        .expect("the metrics address")
        .to_string();
    let out = Command::new("curl")
        .args(["-sf", &format!("http://{addr}/metrics")])
        .output()
        .unwrap();
    assert!(out.status.success(), "GET /metrics of {addr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a Python script with `args`; panics with its stderr when it fails.
pub fn python(script: &str, args: &[&Path]) -> Output {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

pub fn afs(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// The pid a cache directory's lock file names (the daemon using it).
pub fn lock_pid(cache: &Path) -> u32 {
    let text = std::fs::read_to_string(cache.join("lock")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("pid "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A temp dir with a mount point and a cache dir, for mounts made the way a user makes them
/// (`artifactfs mount` as a daemon, mount(8)). Whatever gets mounted there is unmounted when
/// this is dropped, whatever happens.
pub struct Place {
    pub tmp: tempfile::TempDir,
    pub mnt: PathBuf,
    pub cache: PathBuf,
}

impl Place {
    pub fn new() -> Place {
        let tmp = tempfile::tempdir().unwrap();
        let (mnt, cache) = (tmp.path().join("mnt"), tmp.path().join("cache"));
        std::fs::create_dir(&mnt).unwrap();
        Place { tmp, mnt, cache }
    }

    /// `artifactfs mount URL MNT --cache-dir CACHE` (daemon mode).
    pub fn mount(&self, url: &str) -> Output {
        self.mount_with_cache(url, &self.cache)
    }

    pub fn mount_with_cache(&self, url: &str, cache: &Path) -> Output {
        afs(&[
            "mount",
            url,
            s(&self.mnt),
            "--cache-dir",
            s(cache),
            "--cache-min-free",
            "0",
        ])
    }

    /// The same with `extra` flags and environment (`ARTIFACTFS_TOKEN` only from `env`).
    pub fn mount_with(&self, url: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
        let mut args = vec!["mount", url, s(&self.mnt), "--cache-dir", s(&self.cache)];
        args.extend_from_slice(extra);
        if !extra.contains(&"--cache-min-free") {
            args.extend_from_slice(&["--cache-min-free", "0"]);
        }
        Command::new(bin())
            .args(&args)
            .env_remove("ARTIFACTFS_TOKEN")
            .envs(env.iter().copied())
            .output()
            .unwrap()
    }

    /// The daemon holding this place's cache.
    pub fn daemon_pid(&self) -> u32 {
        lock_pid(&self.cache)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = afs(&["unmount", s(&self.mnt)]);
            if is_mounted(&self.mnt) {
                force_unmount(&self.mnt);
            }
        }
    }
}
