//! `artifactfs warm PATH…` and `artifactfs status MOUNTPOINT`: clients of a running mount's
//! control socket.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::control::{Request, Status, WarmUpdate, ask, mount_of};
use super::{StatusArgs, WarmArgs, human};
use crate::read::warm::FileProgress;

/// Files at least this large get a bar of their own while they are fetched.
const OWN_BAR: u64 = 64 << 20;

/// At most this many per-file bars at once.
const MAX_FILE_BARS: usize = 4;

pub fn warm(a: WarmArgs) -> Result<(), String> {
    let mut paths = a.paths.clone();
    if let Some(list) = &a.list {
        let text = std::fs::read_to_string(list).map_err(|e| format!("{}: {e}", list.display()))?;
        paths.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(PathBuf::from),
        );
    }
    if paths.is_empty() {
        return Err("nothing to warm: give paths, or --list FILE".into());
    }
    let show = !a.no_progress && std::io::stdout().is_terminal();
    if let Some(remote) = &a.remote {
        let rels: Vec<String> = paths
            .iter()
            .map(|p| p.to_string_lossy().trim_matches('/').to_string())
            .collect();
        let start = Instant::now();
        let last = warm_remote(remote, &a, rels, show)?;
        return summarize(&last, start);
    }
    // Paths grouped by mount, each group in the order given (the priority order).
    let mut groups: Vec<(PathBuf, Vec<String>)> = Vec::new();
    for p in &paths {
        let (mnt, rel) = mount_of(p)?;
        match groups.iter_mut().find(|(m, _)| *m == mnt) {
            Some((_, v)) => v.push(rel),
            None => groups.push((mnt, vec![rel])),
        }
    }
    let start = Instant::now();
    let mut last = Vec::new();
    for (mnt, rels) in groups {
        last.extend(warm_mount(&mnt, rels, show)?);
    }
    summarize(&last, start)
}

/// Prints what was warmed and what failed.
fn summarize(last: &[FileProgress], start: Instant) -> Result<(), String> {
    let failed: Vec<_> = last.iter().filter(|f| f.error.is_some()).collect();
    let bytes: u64 = last.iter().filter(|f| f.error.is_none()).map(|f| f.size).sum();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "warmed {} files, {} in {:.1} s ({}/s)",
        last.len() - failed.len(),
        human(bytes),
        secs,
        human((bytes as f64 / secs.max(0.001)) as u64)
    );
    for f in &failed {
        eprintln!("failed: {}: {}", f.path, f.error.as_deref().unwrap_or("?"));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("{} of {} could not be warmed", failed.len(), last.len()))
    }
}

/// Warms `rels` of `remote` into a cache directory no mount is using, in this process.
fn warm_remote(remote: &str, a: &WarmArgs, rels: Vec<String>, show: bool) -> Result<Vec<FileProgress>, String> {
    use std::sync::Arc;
    let cfg = match &a.config {
        Some(f) => super::config::Config::load(f)?,
        None => super::config::Config::default(),
    };
    cfg.validate()?;
    let dir = a
        .cache_dir
        .clone()
        .or_else(|| cfg.cache.dir.clone())
        .unwrap_or_else(super::config::default_cache_dir);
    let token = cfg.auth.resolve_token()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let opts = crate::store::open::RemoteOptions {
        http: cfg.http.clone(),
        web: cfg.web.clone(),
        s3: cfg.s3.clone(),
        token,
    };
    let store = rt
        .block_on(crate::store::open::open(remote, &opts))
        .map_err(|e| crate::store::http::redact_urls(&format!("cannot use the remote {remote}: {e}")))?;
    let cache = crate::cache::Cache::open(
        &crate::cache::CacheConfig {
            dir: dir.clone(),
            max_size: cfg.cache.max_size.0,
            chunk_size: cfg.cache.chunk_size.0,
            min_free: f64::from(cfg.cache.min_free_percent) / 100.0,
            expire_after: None,
        },
        &format!("artifactfs warm of {}", store.id()),
    )
    .map_err(|e| format!("{e} (to warm the cache of a running mount, give paths inside the mount)"))?;
    let (concurrency, max_concurrency, _) = cfg.concurrency_range(store.kind());
    let reader = crate::read::Reader::new(
        store,
        Some(cache.clone()),
        crate::read::ReadConfig {
            concurrency,
            max_concurrency,
            ..crate::read::ReadConfig::default()
        },
        rt.handle().clone(),
    );
    let warm = Arc::new(rt.block_on(crate::read::warm::resolve(&reader, &rels)));
    let task = rt.spawn(crate::read::warm::run(reader, warm.clone()));
    let bars = show.then(Bars::new);
    while !task.is_finished() {
        if let Some(b) = &bars {
            b.update(&warm.progress());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let files = warm.progress();
    if let Some(b) = bars {
        b.update(&files);
        b.finish();
    }
    cache.persist();
    Ok(files)
}

/// Warms `rels` in the mount at `mnt`, showing progress; returns the files' final state.
fn warm_mount(mnt: &std::path::Path, rels: Vec<String>, show: bool) -> Result<Vec<FileProgress>, String> {
    let lines = ask(mnt, &Request::Warm { paths: rels })?;
    let bars = show.then(Bars::new);
    for line in lines {
        let u: WarmUpdate = serde_json::from_str(&line?).map_err(|e| format!("bad answer from the mount: {e}"))?;
        if let Some(b) = &bars {
            b.update(&u.files);
        }
        if u.finished {
            if let Some(b) = bars {
                b.finish();
            }
            return Ok(u.files);
        }
    }
    Err(format!("the mount at {} stopped answering", mnt.display()))
}

/// The total bar, and one bar per large file in progress.
struct Bars {
    multi: MultiProgress,
    total: ProgressBar,
    files: std::cell::RefCell<BTreeMap<String, ProgressBar>>,
}

impl Bars {
    fn new() -> Bars {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout_with_hz(10));
        let total = multi.add(ProgressBar::new(0));
        total.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {percent}% {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        Bars {
            multi,
            total,
            files: Default::default(),
        }
    }

    fn update(&self, files: &[FileProgress]) {
        let size: u64 = files.iter().map(|f| f.size).sum();
        let done: u64 = files.iter().map(|f| if f.finished { f.size } else { f.done }).sum();
        let finished = files.iter().filter(|f| f.finished).count();
        self.total.set_length(size);
        self.total.set_position(done);
        self.total.set_message(format!("{finished}/{} files", files.len()));
        let mut bars = self.files.borrow_mut();
        for f in files.iter().filter(|f| f.size >= OWN_BAR) {
            let running = !f.finished && f.done > 0;
            match (bars.get(&f.path), running) {
                (Some(b), true) => b.set_position(f.done),
                (Some(_), false) => {
                    if let Some(b) = bars.remove(&f.path) {
                        b.finish_and_clear();
                    }
                }
                (None, true) if bars.len() < MAX_FILE_BARS => {
                    let b = self.multi.add(ProgressBar::new(f.size));
                    b.set_style(
                        ProgressStyle::with_template(
                            "  {msg:40!} [{bar:20}] {bytes}/{total_bytes} {binary_bytes_per_sec}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    b.set_message(f.path.clone());
                    b.set_position(f.done);
                    bars.insert(f.path.clone(), b);
                }
                _ => {}
            }
        }
    }

    fn finish(self) {
        for (_, b) in self.files.into_inner() {
            b.finish_and_clear();
        }
        self.total.finish();
    }
}

pub fn status(a: StatusArgs) -> Result<(), String> {
    let mnt = std::path::absolute(&a.mountpoint).map_err(|e| e.to_string())?;
    let line = ask(&mnt, &Request::Status)?
        .next()
        .ok_or("the mount did not answer")??;
    let s: Status = serde_json::from_str(&line).map_err(|e| format!("bad answer from the mount: {e}"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?);
        return Ok(());
    }
    let reads = s.hit_bytes + s.miss_bytes;
    println!("mount point       {}", s.mountpoint.display());
    println!("remote            {}", s.remote);
    println!(
        "daemon            pid {}, up {}",
        s.pid,
        humantime::format_duration(Duration::from_secs(s.uptime_secs))
    );
    println!(
        "requests now      {} (at most {} now, {} at first, up to {})",
        s.requests_in_flight, s.concurrency_now, s.concurrency, s.max_concurrency
    );
    println!(
        "fetching          {}/s ({} fetched in all)",
        human(s.fetch_rate),
        human(s.fetched_bytes)
    );
    if reads > 0 {
        println!(
            "cache hit rate    {:.1}% of {} read",
            100.0 * s.hit_bytes as f64 / reads as f64,
            human(reads)
        );
    } else {
        println!("cache hit rate    no reads yet");
    }
    println!("cache size        {}", human(s.cache_bytes));
    println!("open files        {}", s.open_files);
    if s.passthrough {
        println!(
            "passthrough       on ({} open files read by the kernel directly)",
            s.passthrough_files
        );
    } else {
        println!("passthrough       off (every read goes through the daemon)");
    }
    println!("pending uploads   {}", s.pending_uploads);
    Ok(())
}
