//! The filesystem core against the in-memory store, without a kernel: the version/inode
//! rules, TTLs, negative lookups, listings, and errors.

use std::ffi::OsStr;
use std::sync::atomic::Ordering;

use super::*;
use crate::cache::{Cache, CacheConfig};
use crate::read::{ReadConfig, Reader};
use crate::store::faulty::{Fault, FaultyStore, Op};
use crate::store::memory::MemoryStore;
use crate::store::{Capabilities, Store, StoreError};

struct Env {
    _dir: tempfile::TempDir,
    mem: Arc<MemoryStore>,
    faulty: Arc<FaultyStore>,
    fs: Arc<ArtifactFs>,
    inval: Arc<Recorder>,
    cfg: FsConfig,
}

impl Env {
    /// Another filesystem on the same cache, write area and remote, as the next mount after
    /// a crash of this one sees them.
    fn next_run(&self) -> Arc<ArtifactFs> {
        ArtifactFs::new(self.fs.reader().clone(), self.cfg.clone())
    }
}

#[derive(Default)]
struct Recorder(Mutex<Vec<(u64, String)>>);

impl Invalidator for Recorder {
    fn entry(&self, parent: u64, name: &str) {
        self.0.lock().push((parent, name.to_string()));
    }

    /// Recorded with an empty name.
    fn inode(&self, ino: u64) {
        self.0.lock().push((ino, String::new()));
    }
}

fn env_with(mem: MemoryStore, ttl: Duration) -> Env {
    env_cfg(mem, ttl, false)
}

fn env_cfg(mem: MemoryStore, ttl: Duration, read_only: bool) -> Env {
    env_full(mem, ttl, read_only, None)
}

/// With `--write-back=DELAY`.
fn env_write_back(delay: Duration) -> Env {
    env_full(MemoryStore::new(), Duration::from_secs(60), false, Some(delay))
}

fn env_full(mem: MemoryStore, ttl: Duration, read_only: bool, write_back: Option<Duration>) -> Env {
    env_tuned(mem, |c| {
        c.metadata_ttl = ttl;
        c.negative_ttl = ttl;
        c.read_only = read_only;
        c.write_back = write_back;
    })
}

/// A filesystem whose configuration `tune` changes from the default.
fn env_tuned(mem: MemoryStore, tune: impl FnOnce(&mut FsConfig)) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(mem);
    let faulty = FaultyStore::new(mem.clone());
    let cache = Cache::open(
        &CacheConfig {
            dir: dir.path().to_path_buf(),
            max_size: 1 << 30,
            chunk_size: 1 << 20,
            min_free: 0.0,
            expire_after: None,
        },
        "test",
    )
    .unwrap();
    let reader = Reader::new(
        faulty.clone(),
        Some(cache),
        ReadConfig {
            retries: 1,
            ..ReadConfig::default()
        },
        Handle::current(),
    );
    let mut cfg = FsConfig {
        staging_dir: dir.path().join("pending"),
        ..FsConfig::default()
    };
    tune(&mut cfg);
    let fs = ArtifactFs::new(reader, cfg.clone());
    let inval = Arc::new(Recorder::default());
    fs.set_invalidator(inval.clone());
    Env {
        _dir: dir,
        mem,
        faulty,
        fs,
        inval,
        cfg,
    }
}

use tokio::runtime::Handle;

fn env(ttl: Duration) -> Env {
    env_with(MemoryStore::new(), ttl)
}

async fn resolve(fs: &ArtifactFs, path: &str) -> Result<Entry, FsError> {
    let mut ino = ROOT;
    let mut last = None;
    for part in path.split('/') {
        let e = fs.lookup(ino, OsStr::new(part)).await?;
        ino = e.attr.ino;
        last = Some(e);
    }
    Ok(last.expect("non-empty path"))
}

async fn read_fh(fs: &ArtifactFs, fh: u64, off: u64, len: u32) -> Result<Vec<u8>, FsError> {
    fs.read(fh, off, len, |r| r.map(<[u8]>::to_vec)).await
}

async fn cat(fs: &ArtifactFs, path: &str) -> Result<Vec<u8>, FsError> {
    let e = resolve(fs, path).await?;
    let o = fs.open(e.attr.ino, false, false).await?;
    let mut out = Vec::new();
    loop {
        let b = read_fh(fs, o.fh, out.len() as u64, 1 << 20).await?;
        if b.is_empty() {
            break;
        }
        out.extend_from_slice(&b);
    }
    fs.release_handle(o.fh).await.unwrap();
    Ok(out)
}

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_resolve_read_and_keep_their_inode_number() {
    let e = env(Duration::from_secs(60));
    e.mem.insert("models/v1/weights.bin", vec![7u8; 3 * MIB + 5]);
    e.mem.insert("README", b"hello".to_vec());
    let a = resolve(&e.fs, "models/v1/weights.bin").await.unwrap();
    assert_eq!(a.attr.kind, Kind::File);
    assert_eq!(a.attr.size, 3 * MIB as u64 + 5);
    assert_eq!(a.attr.blocks, (3 * MIB as u64 + 5).div_ceil(512));
    assert!(a.ttl > Duration::from_secs(50));
    assert_eq!(
        cat(&e.fs, "models/v1/weights.bin").await.unwrap(),
        vec![7u8; 3 * MIB + 5]
    );
    let b = resolve(&e.fs, "models/v1/weights.bin").await.unwrap();
    assert_eq!(a.attr.ino, b.attr.ino, "same version, same inode");
    assert_eq!(cat(&e.fs, "README").await.unwrap(), b"hello");
    let d = resolve(&e.fs, "models").await.unwrap();
    assert_eq!((d.attr.kind, d.attr.perm), (Kind::Dir, 0o555));
    assert!(matches!(resolve(&e.fs, "README/x").await, Err(FsError::NotDir)));
    assert!(matches!(e.fs.open(d.attr.ino, false, false).await, Err(FsError::IsDir)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_gets_a_new_inode_and_the_old_one_goes_stale() {
    let e = env(Duration::from_millis(200));
    let old: Vec<u8> = (0..40 * MIB).map(|i| (i % 251) as u8).collect();
    e.mem.insert("f", old.clone());
    let a = resolve(&e.fs, "f").await.unwrap();
    let h = e.fs.open(a.attr.ino, false, false).await.unwrap();
    // Cache one chunk far from the start (a random read: no readahead).
    let o = 30 * MIB as u64;
    assert_eq!(read_fh(&e.fs, h.fh, o, 100).await.unwrap(), &old[o as usize..][..100]);
    let new = vec![1u8; 40 * MIB];
    e.mem.insert("f", new.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = resolve(&e.fs, "f").await.unwrap();
    assert_ne!(a.attr.ino, b.attr.ino, "a new version is a new inode");
    assert!(
        e.inval.0.lock().iter().any(|(p, n)| *p == ROOT && n == "f"),
        "the kernel was told"
    );
    // Opening the old inode sends the kernel back to lookup.
    assert!(matches!(e.fs.open(a.attr.ino, false, false).await, Err(FsError::Stale)));
    // The handle opened before the change reads its own version or fails; never new bytes.
    assert_eq!(read_fh(&e.fs, h.fh, o, 100).await.unwrap(), &old[o as usize..][..100]);
    assert!(matches!(
        read_fh(&e.fs, h.fh, 10 * MIB as u64, 100).await,
        Err(FsError::Stale)
    ));
    e.fs.release_handle(h.fh).await.unwrap();
    assert_eq!(cat(&e.fs, "f").await.unwrap(), new);
    // The old inode still answers getattr with its own size, for whoever holds it.
    let old_attr = e.fs.getattr(a.attr.ino).await.unwrap();
    assert_eq!(old_attr.attr.size, old.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_files_revalidate_without_moving() {
    let e = env(Duration::from_millis(100));
    e.mem.insert("d/f", vec![3u8; 1000]);
    let a = resolve(&e.fs, "d/f").await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let g = e.fs.getattr(a.attr.ino).await.unwrap();
    assert_eq!(g.attr.ino, a.attr.ino);
    assert!(g.ttl > Duration::from_millis(50), "revalidated and trusted again");
    let b = resolve(&e.fs, "d/f").await.unwrap();
    assert_eq!(a.attr.ino, b.attr.ino);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_files_disappear_after_the_ttl() {
    let e = env(Duration::from_millis(100));
    e.mem.insert("d/f", vec![3u8; 10]);
    e.mem.insert("d/g", vec![3u8; 10]);
    let dir = resolve(&e.fs, "d").await.unwrap();
    e.fs.opendir(dir.attr.ino).await.unwrap();
    let f = resolve(&e.fs, "d/f").await.unwrap();
    e.mem.remove("d/f");
    assert!(resolve(&e.fs, "d/f").await.is_ok(), "trusted within the TTL");
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(matches!(resolve(&e.fs, "d/f").await, Err(FsError::NotFound)));
    assert!(matches!(e.fs.open(f.attr.ino, false, false).await, Err(FsError::Stale)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_revalidation_tells_the_kernel_what_changed_and_earns_long_ttls() {
    let e = env_tuned(MemoryStore::new(), |c| {
        c.revalidate_interval = Some(Duration::from_secs(60));
        c.metadata_ttl = Duration::from_millis(100);
    });
    e.mem.insert("d/a", vec![1u8; 10]);
    e.mem.insert("d/b", vec![2u8; 10]);
    e.mem.insert("e/x", vec![3u8; 10]);
    // ls -R of the root and d.
    e.fs.releasedir(e.fs.opendir(ROOT).await.unwrap());
    let d = resolve(&e.fs, "d").await.unwrap();
    e.fs.releasedir(e.fs.opendir(d.attr.ino).await.unwrap());
    let a = resolve(&e.fs, "d/a").await.unwrap();
    assert_eq!(
        a.ttl,
        revalidate::KERNEL_TTL,
        "a listed folder's entries are kept honest"
    );
    let b = resolve(&e.fs, "d/b").await.unwrap();
    // Known through a HEAD only (folder e never listed): the ordinary TTL.
    assert_eq!(d.ttl, revalidate::KERNEL_TTL);
    let x = resolve(&e.fs, "e/x").await.unwrap();
    assert!(x.ttl <= Duration::from_millis(100), "{:?}", x.ttl);
    // Listings are trusted across rounds, whatever metadata.ttl says.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let lists = e.mem.stats.lists.load(Ordering::Relaxed);
    assert_eq!(e.fs.getattr(a.attr.ino).await.unwrap().attr.size, 10);
    assert_eq!(
        e.mem.stats.lists.load(Ordering::Relaxed),
        lists,
        "no request in the foreground"
    );

    e.mem.insert("d/a", vec![9u8; 20]);
    e.mem.remove("d/b");
    e.mem.insert("d/c", vec![4u8; 5]);
    e.inval.0.lock().clear();
    // The root and d (held by the kernel and listed); e was never listed.
    assert_eq!(e.fs.revalidate_round().await, 2);
    let told: Vec<String> = e
        .inval
        .0
        .lock()
        .iter()
        .filter(|(p, _)| *p == d.attr.ino)
        .map(|(_, n)| n.clone())
        .collect();
    for name in ["a", "b", "c"] {
        assert!(
            told.contains(&name.to_string()),
            "the kernel was not told of {name}: {told:?}"
        );
    }
    assert!(
        told.contains(&String::new()),
        "the kernel keeps d's old listing: {told:?}"
    );
    assert!(e.fs.kernel_may_keep_listing(d.attr.ino));
    assert!(!e.fs.kernel_may_keep_listing(x.attr.ino), "never listed");
    let a2 = resolve(&e.fs, "d/a").await.unwrap();
    assert_ne!(a2.attr.ino, a.attr.ino, "a new version is a new inode");
    assert_eq!(cat(&e.fs, "d/a").await.unwrap(), vec![9u8; 20]);
    assert!(matches!(resolve(&e.fs, "d/b").await, Err(FsError::NotFound)));
    assert!(matches!(e.fs.open(b.attr.ino, false, false).await, Err(FsError::Stale)));
    assert_eq!(resolve(&e.fs, "d/c").await.unwrap().attr.size, 5);

    // Nothing changed: a round tells the kernel nothing. A folder the kernel forgot is not
    // revalidated.
    e.inval.0.lock().clear();
    let held = e.fs.table.lock().inodes[&d.attr.ino].lookups;
    e.fs.forget(d.attr.ino, held);
    assert_eq!(e.fs.revalidate_round().await, 1, "only the root is left");
    assert!(e.inval.0.lock().is_empty(), "{:?}", e.inval.0.lock());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_names_are_remembered_for_the_negative_ttl() {
    let e = env(Duration::from_millis(200));
    e.mem.insert("a/x", vec![1]);
    assert!(matches!(resolve(&e.fs, "a/nope").await, Err(FsError::NotFound)));
    let heads = e.mem.stats.heads.load(Ordering::Relaxed);
    e.mem.insert("a/nope", vec![2]);
    assert!(
        matches!(resolve(&e.fs, "a/nope").await, Err(FsError::NotFound)),
        "negative answer cached"
    );
    assert_eq!(e.mem.stats.heads.load(Ordering::Relaxed), heads, "no request for it");
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(resolve(&e.fs, "a/nope").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_directory_answers_lookups_without_requests() {
    let e = env(Duration::from_secs(60));
    for i in 0..50 {
        e.mem.insert(&format!("d/f{i:02}"), vec![i as u8; 10]);
    }
    let d = resolve(&e.fs, "d").await.unwrap();
    let fh = e.fs.opendir(d.attr.ino).await.unwrap();
    let mut names = Vec::new();
    e.fs.readdir(fh, 0, |item, _| {
        names.push(item.name.clone());
        false
    })
    .unwrap();
    assert_eq!(names.len(), 52);
    assert_eq!(&names[..3], &[".", "..", "f00"]);
    // Plain readdir makes no inodes: the table holds what the kernel references.
    assert!(
        e.fs.table.lock().inodes.len() <= 2,
        "{} inodes",
        e.fs.table.lock().inodes.len()
    );
    let mut inos = Vec::new();
    e.fs.readdir(fh, 2, |item, _| {
        inos.push(item.ino);
        false
    })
    .unwrap();
    // Resuming at an offset continues where the kernel stopped.
    let mut rest = Vec::new();
    e.fs.readdir(fh, 40, |item, _| {
        rest.push(item.name.clone());
        false
    })
    .unwrap();
    assert_eq!(rest.len(), 12);
    let (lists, heads) = (
        e.mem.stats.lists.load(Ordering::Relaxed),
        e.mem.stats.heads.load(Ordering::Relaxed),
    );
    for (i, ino) in inos.iter().enumerate() {
        let found = resolve(&e.fs, &format!("d/f{i:02}")).await.unwrap();
        assert_eq!(found.attr.ino, *ino, "readdir and lookup agree on inode numbers");
    }
    assert!(matches!(resolve(&e.fs, "d/zzz").await, Err(FsError::NotFound)));
    assert_eq!(e.mem.stats.lists.load(Ordering::Relaxed), lists);
    assert_eq!(e.mem.stats.heads.load(Ordering::Relaxed), heads);
    e.fs.releasedir(fh);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_lookups_use_head_then_list_the_directory() {
    let e = env(Duration::from_secs(60));
    for i in 0..10 {
        e.mem.insert(&format!("d/f{i}"), vec![1]);
    }
    resolve(&e.fs, "d/f0").await.unwrap();
    resolve(&e.fs, "d/f1").await.unwrap();
    let lists = e.mem.stats.lists.load(Ordering::Relaxed);
    resolve(&e.fs, "d/f2").await.unwrap();
    assert_eq!(
        e.mem.stats.lists.load(Ordering::Relaxed),
        lists + 1,
        "listed at the third lookup"
    );
    let heads = e.mem.stats.heads.load(Ordering::Relaxed);
    for i in 3..10 {
        resolve(&e.fs, &format!("d/f{i}")).await.unwrap();
    }
    assert_eq!(e.mem.stats.heads.load(Ordering::Relaxed), heads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readdirplus_counts_lookups_and_forget_releases_them() {
    let e = env(Duration::from_secs(60));
    e.mem.insert("d/a", vec![1]);
    e.mem.insert("d/b", vec![2, 2]);
    let d = resolve(&e.fs, "d").await.unwrap();
    let fh = e.fs.opendir(d.attr.ino).await.unwrap();
    let mut seen = Vec::new();
    e.fs.readdirplus(fh, 0, |item, entry, _| {
        seen.push((item.name.clone(), entry.attr.size, entry.attr.ino));
        false
    })
    .unwrap();
    assert_eq!(seen.len(), 4);
    let (_, size, ino_b) = seen[3].clone();
    assert_eq!(size, 2);
    e.fs.forget(ino_b, 1);
    // Forgotten, and found again from the listing with the same number.
    let b = resolve(&e.fs, "d/b").await.unwrap();
    assert_eq!(b.attr.ino, ino_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_names_that_cannot_be_files_are_skipped() {
    let e = env(Duration::from_secs(60));
    e.mem.insert("d/ok", vec![1]);
    e.mem.insert(&format!("d/{}", "n".repeat(300)), vec![1]);
    e.mem.insert("d/a\0b", vec![1]);
    let d = resolve(&e.fs, "d").await.unwrap();
    let fh = e.fs.opendir(d.attr.ino).await.unwrap();
    let mut names = Vec::new();
    e.fs.readdir(fh, 2, |item, _| {
        names.push(item.name.clone());
        false
    })
    .unwrap();
    assert_eq!(names, vec!["ok"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_remote_serves_cached_metadata_or_fails_with_eio() {
    let e = env(Duration::from_millis(100));
    e.mem.insert("d/f", b"cached".to_vec());
    let d = resolve(&e.fs, "d").await.unwrap();
    e.fs.opendir(d.attr.ino).await.unwrap();
    assert_eq!(cat(&e.fs, "d/f").await.unwrap(), b"cached");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let down = StoreError::Unavailable("connection refused".into());
    e.faulty.inject_always(Fault::Fail(Op::List, down.clone()));
    e.faulty.inject_always(Fault::Fail(Op::Head, down.clone()));
    e.faulty.inject_always(Fault::Fail(Op::Get, down));
    // Stale-if-error: the listing and the cached bytes still serve.
    assert_eq!(cat(&e.fs, "d/f").await.unwrap(), b"cached");
    // What was never seen cannot be served: EIO with the reason.
    let err = resolve(&e.fs, "other").await.unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    assert!(err.to_string().contains("connection refused"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_without_etags_learn_the_version_from_the_first_get() {
    let caps = Capabilities {
        listing_etags: false,
        ..MemoryStore::new().capabilities()
    };
    let e = env_with(MemoryStore::new().with_capabilities(caps), Duration::from_secs(60));
    e.mem.insert("d/f", b"abc".to_vec());
    e.mem.insert("d/g", b"one".to_vec());
    let d = resolve(&e.fs, "d").await.unwrap();
    let fh = e.fs.opendir(d.attr.ino).await.unwrap();
    e.fs.releasedir(fh);
    let heads = e.mem.stats.heads.load(Ordering::Relaxed);
    let gets = e.mem.stats.gets.load(Ordering::Relaxed);
    assert_eq!(cat(&e.fs, "d/f").await.unwrap(), b"abc");
    assert_eq!(e.mem.stats.heads.load(Ordering::Relaxed), heads, "no HEAD at open");
    assert_eq!(
        e.mem.stats.gets.load(Ordering::Relaxed),
        gets + 1,
        "one GET: version and bytes"
    );
    // Changed (another size) between the listing and the open: ESTALE, then the new bytes.
    let g = resolve(&e.fs, "d/g").await.unwrap();
    e.mem.insert("d/g", b"longer".to_vec());
    let err = e.fs.open(g.attr.ino, false, false).await.unwrap_err();
    assert_eq!(err.errno(), libc::ESTALE);
    assert_eq!(cat(&e.fs, "d/g").await.unwrap(), b"longer");
}

mod write;

#[test]
fn listing_times_to_the_minute_match_the_precise_time_of_that_minute() {
    use std::time::{Duration, UNIX_EPOCH};
    let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
    let minute = 1_800_000_000; // a whole minute
    // nginx's HTML index: 12:34 for a file changed at 12:34:56.
    assert!(super::listed_time_matches(at(minute), at(minute + 56)));
    assert!(super::listed_time_matches(at(1_800_000_123), at(1_800_000_123)));
    // A precise listing time that differs is another version; so is another minute.
    assert!(!super::listed_time_matches(at(1_800_000_123), at(1_800_000_124)));
    assert!(!super::listed_time_matches(at(minute), at(minute + 60)));
}

/// A large file read whole through an ordinary handle: once its last handle is released, the
/// kernel is told to drop the inode's page cache (the next open is passthrough, and the kernel
/// would otherwise drop those pages during that open, in the reader's time). A file not
/// complete keeps its pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_read_whole_has_its_page_cache_dropped_at_the_last_release() {
    let e = env(Duration::from_secs(60));
    let data = crate::testing::noise(72 * MIB, 12);
    e.mem.insert("big", data.clone());
    let f = resolve(&e.fs, "big").await.unwrap();
    let dropped = |e: &Env| e.inval.0.lock().iter().any(|(p, n)| *p == f.attr.ino && n.is_empty());
    // One chunk far from the start (a random read: no readahead): not complete.
    let o = e.fs.open(f.attr.ino, false, false).await.unwrap();
    assert!(o.passthrough.is_none());
    let at = 30 * MIB as u64;
    assert_eq!(
        read_fh(&e.fs, o.fh, at, 100).await.unwrap(),
        &data[at as usize..][..100]
    );
    e.fs.release_handle(o.fh).await.unwrap();
    assert!(!dropped(&e), "an incomplete file keeps its pages");
    // Read whole by two handles: only the last release drops the pages.
    let a = e.fs.open(f.attr.ino, false, false).await.unwrap();
    let b = e.fs.open(f.attr.ino, false, false).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < data.len() {
        seen.extend(read_fh(&e.fs, a.fh, seen.len() as u64, 1 << 20).await.unwrap());
    }
    assert!(seen == data);
    e.fs.release_handle(a.fh).await.unwrap();
    assert!(!dropped(&e), "another handle still reads through the page cache");
    e.fs.release_handle(b.fh).await.unwrap();
    assert!(dropped(&e), "the last release of a complete file drops its pages");
    let p = e.fs.open(f.attr.ino, false, false).await.unwrap();
    assert!(p.passthrough.is_some(), "the next open is passthrough");
    e.fs.release_handle(p.fh).await.unwrap();
    // A small file keeps its pages (and the kernel its attributes, which the drop would cost).
    e.mem.insert("small", data[..MIB].to_vec());
    let s = resolve(&e.fs, "small").await.unwrap();
    assert_eq!(cat(&e.fs, "small").await.unwrap(), &data[..MIB]);
    assert!(!e.inval.0.lock().iter().any(|(p, n)| *p == s.attr.ino && n.is_empty()));
}
