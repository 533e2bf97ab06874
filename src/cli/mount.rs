//! `artifactfs mount`: resolve the configuration, become a daemon (unless `--foreground`),
//! connect to the remote, lock the cache, mount, report ready, serve until unmounted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fuser::{MountOption, SessionACL};

use super::config::Config;
use super::daemon::{self, Forked, Ready};
use super::registry::{self, MountRecord};
use super::{MountArgs, logging, unmount};
use crate::cache::{Cache, CacheConfig};
use crate::fs::fuse::{ChannelInvalidator, FuseAdapter};
use crate::fs::{ArtifactFs, FsConfig};
use crate::read::{ReadConfig, ReadaheadConfig, Reader};
use crate::store::DynStore;

/// Everything a mount needs, resolved from defaults, the config file and the flags.
#[derive(Debug)]
pub struct Resolved {
    pub cfg: Config,
    pub remote: String,
    pub mountpoint: PathBuf,
    pub cache_dir: PathBuf,
    /// The mount's source in the mount table, when not `artifactfs:REMOTE`.
    pub fsname: Option<String>,
    /// The token sent to the built-in server (resolved now: files are read before the
    /// daemon changes its directory, and a bad one fails at once).
    pub token: Option<crate::store::http::BearerToken>,
}

pub fn resolve(a: &MountArgs) -> Result<Resolved, String> {
    let mut cfg = match &a.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let (remote, mountpoint) = match &a.second {
        Some(m) => (a.first.clone(), m.clone()),
        None => (
            cfg.mount
                .remote
                .clone()
                .ok_or("no remote: give REMOTE MOUNTPOINT, or set mount.remote in the config")?,
            PathBuf::from(&a.first),
        ),
    };
    if let Some(d) = &a.cache_dir {
        cfg.cache.dir = Some(d.clone());
    }
    if a.read_only {
        cfg.mount.read_only = true;
    }
    if a.allow_other {
        cfg.mount.allow_other = true;
    }
    if let Some(s) = a.max_cache_size {
        cfg.cache.max_size = s;
    }
    if let Some(p) = a.cache_min_free {
        cfg.cache.min_free_percent = p;
    }
    if let Some(t) = a.metadata_ttl {
        cfg.metadata.ttl = t;
    }
    if let Some(t) = a.revalidate_interval {
        cfg.metadata.revalidate_interval = t;
    }
    if let Some(l) = &a.log_level {
        cfg.log.level = l.clone();
    }
    if let Some(f) = &a.log_file {
        cfg.log.file = Some(f.clone());
    }
    if let Some(d) = a.slow_threshold {
        cfg.log.slow_threshold = d;
    }
    if let Some(addr) = a.metrics_addr {
        cfg.log.metrics_addr = Some(addr);
    }
    if let Some(f) = &a.metrics_file {
        cfg.log.metrics_file = Some(f.clone());
    }
    if let Some(n) = a.threads {
        cfg.mount.threads = n;
    }
    if a.uid.is_some() {
        cfg.mount.uid = a.uid;
    }
    if a.gid.is_some() {
        cfg.mount.gid = a.gid;
    }
    if a.file_mode.is_some() {
        cfg.mount.file_mode = a.file_mode;
    }
    if a.dir_mode.is_some() {
        cfg.mount.dir_mode = a.dir_mode;
    }
    if let Some(d) = a.write_back {
        cfg.write.write_back = true;
        cfg.write.write_back_delay = d;
    }
    if let Some(k) = a.kind {
        cfg.web.kind = k;
    }
    if let Some(n) = a.concurrency {
        cfg.read.concurrency = Some(n);
    }
    if let Some(n) = a.max_concurrency {
        cfg.read.max_concurrency = Some(n);
    }
    if let Some(r) = a.bandwidth_limit {
        cfg.performance.download_limit = Some(r);
        cfg.performance.upload_limit = Some(r);
    }
    if let Some(r) = a.download_limit {
        cfg.performance.download_limit = Some(r);
    }
    if let Some(r) = a.upload_limit {
        cfg.performance.upload_limit = Some(r);
    }
    if !a.mirrors.is_empty() {
        cfg.web.mirrors = a.mirrors.clone();
    }
    if let Some(p) = a.partial_put {
        cfg.web.partial_put = Some(p);
    }
    if let Some(p) = a.passthrough {
        cfg.read.passthrough = p;
    }
    if let Some(i) = a.incremental {
        cfg.write.incremental = i;
    }
    if let Some(e) = &a.endpoint_url {
        cfg.s3.endpoint_url = Some(e.clone());
    }
    if let Some(r) = &a.region {
        cfg.s3.region = Some(r.clone());
    }
    if let Some(p) = &a.profile {
        cfg.s3.profile = Some(p.clone());
    }
    if let Some(s) = a.addressing_style {
        cfg.s3.addressing_style = s;
    }
    if let Some(f) = &a.ca_bundle {
        cfg.s3.ca_bundle = Some(f.clone());
        cfg.http.ca_bundle = Some(f.clone());
    }
    if a.insecure_skip_tls_verify {
        cfg.s3.insecure_skip_tls_verify = true;
        cfg.http.insecure_skip_tls_verify = true;
    }
    if let Some(f) = &a.token_file {
        cfg.auth.token_file = Some(f.clone());
    }
    cfg.mount.remote = Some(remote.clone());
    cfg.validate()?;
    let abs = |p: &Path| std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()));
    let cache_dir = abs(&cfg.cache.dir.clone().unwrap_or_else(super::config::default_cache_dir))?;
    cfg.cache.dir = Some(cache_dir.clone());
    if let Some(f) = &cfg.log.file {
        cfg.log.file = Some(abs(f)?);
    }
    if let Some(f) = &cfg.log.metrics_file {
        cfg.log.metrics_file = Some(abs(f)?);
    }
    // The daemon changes its directory: a relative CA bundle must still be found.
    if let Some(f) = &cfg.s3.ca_bundle {
        cfg.s3.ca_bundle = Some(abs(f)?);
    }
    if let Some(n) = &a.fsname
        && (n.is_empty() || n.contains(','))
    {
        return Err(format!("--fsname {n:?} must be non-empty and without commas"));
    }
    if let Some(f) = &cfg.http.ca_bundle {
        cfg.http.ca_bundle = Some(abs(f)?);
    }
    let token = cfg.auth.resolve_token()?;
    Ok(Resolved {
        fsname: a.fsname.clone(),
        remote,
        mountpoint: abs(&mountpoint)?,
        cache_dir,
        cfg,
        token,
    })
}

pub fn run(a: MountArgs) -> Result<(), String> {
    let r = resolve(&a)?;
    if a.print_config {
        print!("{}", toml::to_string(&r.cfg).map_err(|e| e.to_string())?);
        return Ok(());
    }
    if unmount::is_mounted(&r.mountpoint) {
        let dead = std::fs::metadata(&r.mountpoint)
            .err()
            .is_some_and(|e| e.raw_os_error() == Some(libc::ENOTCONN));
        if dead {
            return Err(format!(
                "{0} is already a mount point whose daemon is gone; run `artifactfs unmount {0}` first",
                r.mountpoint.display()
            ));
        }
        return Err(format!("{} is already a mount point", r.mountpoint.display()));
    }
    match std::fs::metadata(&r.mountpoint) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("{} is not a directory", r.mountpoint.display())),
        Err(e) => return Err(format!("mount point {}: {e}", r.mountpoint.display())),
    }
    let log_path = r
        .cfg
        .log
        .file
        .clone()
        .unwrap_or_else(|| r.cache_dir.join("artifactfs.log"));
    let mut ready = if a.foreground {
        match &r.cfg.log.file {
            Some(f) => logging::init_file(&r.cfg.log.level, f).map_err(|e| format!("{}: {e}", f.display()))?,
            None => logging::init_stderr(&r.cfg.log.level),
        }
        Ready::none()
    } else {
        match daemon::daemonize(&log_path).map_err(|e| format!("cannot start the daemon: {e}"))? {
            Forked::Parent(Ok(msg)) => {
                println!("{msg}");
                return Ok(());
            }
            Forked::Parent(Err(e)) => return Err(e),
            Forked::Child(ready) => {
                // stderr is the log file now.
                logging::init_file(&r.cfg.log.level, &log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
                ready
            }
        }
    };
    match serve(&r, &mut ready) {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::error!("{e}");
            ready.fail(&e);
            Err(e)
        }
    }
}

fn serve(r: &Resolved, ready: &mut Ready) -> Result<(), String> {
    let cfg = &r.cfg;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("afs-io")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let opts = crate::store::open::RemoteOptions {
        http: cfg.http.clone(),
        web: cfg.web.clone(),
        s3: cfg.s3.clone(),
        token: r.token.clone(),
    };
    let store: DynStore = rt.block_on(crate::store::open::open(&r.remote, &opts)).map_err(|e| {
        // Never show credentials given in the URL.
        crate::store::http::redact_urls(&format!("cannot use the remote {}: {e}", r.remote))
    })?;
    // Bandwidth limits, then every request counted and timed (metrics, slow-operation log).
    let (down, up) = (cfg.performance.download_limit, cfg.performance.upload_limit);
    if down.is_some() || up.is_some() {
        tracing::info!(download = ?down.map(|r| r.to_string()), upload = ?up.map(|r| r.to_string()), "bandwidth limits (per second)");
    }
    let limit = |r: Option<super::config::ByteSize>| r.map(|r| crate::store::limited::Limit::new(r.0));
    let store: DynStore = Arc::new(crate::store::metered::MeteredStore::new(store, limit(down), limit(up)));
    let metrics = crate::metrics::get();
    metrics.set_slow_threshold(cfg.log.slow_threshold);
    let owner = format!("mount {} of {}", r.mountpoint.display(), store.id());
    let cache = Cache::open(
        &CacheConfig {
            dir: r.cache_dir.clone(),
            max_size: cfg.cache.max_size.0,
            chunk_size: cfg.cache.chunk_size.0,
            min_free: f64::from(cfg.cache.min_free_percent) / 100.0,
            expire_after: cfg.cache.expire_after,
        },
        &owner,
    )
    .map_err(|e| e.to_string())?;
    rt.spawn(cache.clone().run_evictor());
    metrics.add_cache(cache.clone());
    if let Some(addr) = cfg.log.metrics_addr {
        let bound = rt
            .block_on(crate::metrics::serve(addr))
            .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
        tracing::info!(%bound, "metrics at http://{bound}/metrics");
    }
    rt.spawn(cache.clone().run_counter_saver(Duration::from_secs(2)));
    let (concurrency, max_concurrency, from) = cfg.concurrency_range(store.kind());
    tracing::info!(
        concurrency,
        max_concurrency,
        from,
        "requests to the remote in flight at once"
    );
    let reader = Reader::new(
        store.clone(),
        Some(cache.clone()),
        ReadConfig {
            max_request: cfg.read.max_request.0,
            readahead: ReadaheadConfig {
                initial: cfg.read.readahead_initial.0,
                max: cfg.read.readahead_max.0,
            },
            sequential_slack: cfg.mount.kernel_readahead.0.max(4 << 20),
            concurrency,
            max_concurrency,
            memory_budget: cfg.read.memory_budget.0,
            verify: cfg.read.verify,
            retries: cfg.read.retries,
            ..ReadConfig::default()
        },
        rt.handle().clone(),
    );
    // Writes need a remote that takes them.
    let read_only = cfg.mount.read_only || !store.capabilities().writes;
    if read_only && !cfg.mount.read_only {
        tracing::info!(remote = store.id(), "the remote takes no writes: mounting read-only");
    }
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let fs = ArtifactFs::new(
        reader,
        FsConfig {
            metadata_ttl: cfg.metadata.ttl,
            negative_ttl: cfg.metadata.negative_ttl,
            stale_if_error: cfg.metadata.stale_if_error,
            revalidate_interval: Some(cfg.metadata.revalidate_interval).filter(|d| !d.is_zero()),
            uid: cfg.mount.uid.unwrap_or(uid),
            gid: cfg.mount.gid.unwrap_or(gid),
            file_mode: cfg.mount.file_mode.unwrap_or(if read_only { 0o444 } else { 0o644 }),
            dir_mode: cfg.mount.dir_mode.unwrap_or(if read_only { 0o555 } else { 0o755 }),
            block_size: cfg.cache.chunk_size.0 as u32,
            statfs_dir: Some(r.cache_dir.clone()),
            read_only,
            staging_dir: cache.write_area(),
            upload: crate::write::plan::PlanConfig {
                put_max: cfg.write.put_max.0,
                part_size: cfg.write.part_size.0,
                incremental: cfg.write.incremental,
            },
            upload_parallel: cfg.write.parallel_parts,
            write_back: cfg.write.write_back.then_some(cfg.write.write_back_delay),
            passthrough: cfg.read.passthrough,
            prefetch_small_files: cfg.read.prefetch_small_files.0,
            prefetch_folder_bytes: cfg.read.prefetch_folder_bytes.0,
        },
    );
    // What a previous run journaled goes first.
    let (sent, left) = rt.block_on(fs.replay_journal());
    if sent + left > 0 {
        tracing::info!(sent, left, "write-back journal replayed");
    }
    let mut options = vec![
        MountOption::FSName(r.fsname.clone().unwrap_or_else(|| format!("artifactfs:{}", store.id()))),
        // As a kernel option, not fuser's Subtype (which only fusermount3 sees): the mount's
        // type is then `fuse.artifactfs` also when root mounts directly, as fstab and
        // mount(8) name it.
        MountOption::CUSTOM("subtype=artifactfs".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
    ];
    if read_only {
        options.push(MountOption::RO);
    }
    if cfg.mount.allow_other {
        options.push(MountOption::DefaultPermissions);
    }
    let mut fc = fuser::Config::default();
    fc.mount_options = options;
    fc.acl = if cfg.mount.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    fc.n_threads = Some(cfg.mount.threads);
    fc.clone_fd = true;
    // The control socket exists before the mount does: whoever sees the mount can ask it.
    let control = super::control::Control::new(
        fs.clone(),
        fs.reader().clone(),
        cache.clone(),
        store.id().to_string(),
        r.mountpoint.clone(),
    );
    let listener = {
        let _rt = rt.enter();
        super::control::listen(&registry::socket_path(&r.mountpoint))
    };
    let session = fuser::Session::new(FuseAdapter::new(fs.clone(), rt.handle().clone()), &r.mountpoint, &fc)
        .map_err(|e| format!("cannot mount at {}: {e}", r.mountpoint.display()))?;
    fs.set_invalidator(ChannelInvalidator::start(session.notifier()));
    fs.start_revalidation(rt.handle());
    if cfg.mount.kernel_readahead.0 > 0 {
        set_kernel_readahead(&r.mountpoint, cfg.mount.kernel_readahead.0);
    }
    let record = MountRecord {
        pid: std::process::id(),
        mountpoint: r.mountpoint.clone(),
        remote: store.id().to_string(),
        cache_dir: r.cache_dir.clone(),
        unmount_timeout_ms: cfg.mount.unmount_timeout.as_millis() as u64,
    };
    if let Err(e) = registry::write(&record) {
        tracing::warn!("cannot record the mount (artifactfs unmount will still work by path): {e}");
    }
    if let Some(l) = listener {
        rt.spawn(control.serve(l));
    }
    let done = Arc::new(AtomicBool::new(false));
    rt.spawn(on_signal(
        r.mountpoint.clone(),
        cfg.mount.unmount_timeout,
        done.clone(),
        cache.clone(),
    ));
    tracing::info!(remote = store.id(), mountpoint = %r.mountpoint.display(), "mounted");
    ready.ok(&format!("mounted {} at {}", store.id(), r.mountpoint.display()));
    let result = session.run();
    done.store(true, Ordering::Release);
    tracing::info!(mountpoint = %r.mountpoint.display(), "unmounted");
    let pending = fs.pending_uploads();
    if pending > 0 {
        tracing::info!(
            pending,
            "sending pending uploads (at most {:?})",
            cfg.mount.unmount_timeout
        );
        let left = rt.block_on(fs.drain(cfg.mount.unmount_timeout));
        if !left.is_empty() {
            tracing::warn!(
                left = left.len(),
                paths = ?left,
                "uploads not sent within the unmount timeout; they stay in the journal and go at the next mount"
            );
        }
    }
    registry::remove(&r.mountpoint);
    drop(fs);
    cache.persist();
    if let Some(f) = &cfg.log.metrics_file {
        let mut summary = metrics.summary();
        let c = cache.session_counters();
        summary["cache"] = serde_json::json!({
            "hit_bytes": c.hit_bytes,
            "miss_bytes": c.miss_bytes,
            "fetched_bytes": c.fetched_bytes,
            "evicted_versions": c.evicted_versions,
            "bytes": cache.used(),
        });
        let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
        if let Err(e) = std::fs::write(f, text + "\n") {
            tracing::warn!(file = %f.display(), "cannot write the metrics summary: {e}");
        }
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    result.map_err(|e| format!("the FUSE session ended with an error: {e}"))
}

/// On SIGINT/SIGTERM: unmount (detaching when files are open), give open files the unmount
/// timeout to be closed, then stop, which cuts them off.
async fn on_signal(mnt: PathBuf, timeout: Duration, done: Arc<AtomicBool>, cache: Arc<Cache>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        tracing::warn!("cannot listen for signals");
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    tracing::info!("signal received, unmounting");
    let was_mounted = unmount::is_mounted(&mnt);
    if was_mounted {
        match tokio::task::spawn_blocking({
            let mnt = mnt.clone();
            move || unmount::detach(&mnt)
        })
        .await
        {
            Ok(Ok(false)) => return,
            Ok(Ok(true)) => tracing::info!("files still open; the mount point is detached, waiting up to {timeout:?}"),
            Ok(Err(e)) => tracing::warn!("{e}"),
            Err(_) => {}
        }
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if done.load(Ordering::Acquire) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if done.load(Ordering::Acquire) {
        return;
    }
    tracing::warn!("stopping with files still open; they are cut off");
    cache.persist();
    registry::remove(&mnt);
    std::process::exit(0);
}

/// Raises the kernel's readahead for the mount (`read_ahead_kb` of its backing device).
fn set_kernel_readahead(mnt: &Path, bytes: u64) {
    let Some((dev, _)) = unmount::mount_entry(mnt) else {
        return;
    };
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&path, (bytes / 1024).to_string()) {
        Ok(()) => tracing::debug!("{path} = {}", bytes / 1024),
        Err(e) => tracing::debug!("cannot raise the kernel readahead ({path}): {e}"),
    }
}
