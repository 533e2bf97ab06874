//! End to end: a real FUSE mount of a remote on 127.0.0.1, ordinary reads. Each test runs
//! on every remote kind (the built-in server, nginx WebDAV, Apache mod_dav; see
//! `common::remote`). Every test unmounts, also when it fails (the `Mount` guard).

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

on_remotes! {
    fn a_256mib_file_and_2000_small_files_read_back_identical_and_remount_fetches_nothing(r) needs [] {
        let big = bytes(256 * MIB + 12345, 1);
        r.write("models/big.bin", &big);
        let mut expect = BTreeMap::new();
        for i in 0..2000usize {
            let rel = format!("set/d{:02}/e{}/f{i:04}.dat", i % 20, i % 3);
            let data = bytes((i * 37) % 20_000, i as u64 + 10);
            r.write(&rel, &data);
            expect.insert(rel, hash(&data));
        }
        let cache = tempfile::tempdir().unwrap();
        let opts = || MountOpts {
            cache: Some(cache.path().join("c")),
            args: vec!["--concurrency".into(), "6".into()],
            ..MountOpts::default()
        };
        let mut m = r.mount_with(opts());
        assert_eq!(hash_file(&m.path("models/big.bin")).unwrap(), hash(&big));
        // Ranged GETs went in parallel, and never more than allowed (plus the odd lookup).
        // Readahead hands out a quarter window at a time (two 8 MiB GETs once the window is
        // 64 MiB); more overlap only when GETs take longer than the reader needs for a
        // quarter window, which a fast loopback remote on a busy machine may not.
        if let Some(max) = r.max_active() {
            assert!(max >= 2, "at most {max} request at once: fetches are not parallel");
            assert!(max <= 6 + 2, "{max} requests at once with --concurrency 6");
        }
        for (rel, h) in &expect {
            assert_eq!(&hash_file(&m.path(rel)).unwrap(), h, "{rel}");
        }
        let total: u64 = big.len() as u64
            + expect
                .keys()
                .map(|rel| std::fs::metadata(r.path(rel)).unwrap().len())
                .sum::<u64>();
        assert_eq!(r.wire().file_bytes_sent, total, "every byte fetched exactly once");
        // `ls -lR` sees the same tree as the remote's folder.
        assert_eq!(tree(&m.mnt), tree(&r.root()));
        let ls = Command::new("ls").arg("-lR").arg(&m.mnt).output().unwrap();
        assert!(ls.status.success());
        let listed = String::from_utf8_lossy(&ls.stdout);
        assert_eq!(listed.lines().filter(|l| l.starts_with('-')).count(), expect.len() + 1);
        assert!(listed.contains(&format!(" {} ", big.len())), "ls -l shows the size");
        assert!(m.unmount().status.success());

        // Remount on the same cache: the same reads fetch no data at all.
        let before = r.wire().file_bytes_sent;
        let _m = r.mount_with(opts());
        assert_eq!(hash_file(&_m.path("models/big.bin")).unwrap(), hash(&big));
        for (rel, h) in expect.iter().step_by(7) {
            assert_eq!(&hash_file(&_m.path(rel)).unwrap(), h, "{rel}");
        }
        assert_eq!(r.wire().file_bytes_sent, before, "remount fetched data bytes");
    }

    fn an_interrupted_read_resumes_from_the_chunks_present(r) needs [] {
        let data = bytes(96 * MIB, 2);
        r.write("f.bin", &data);
        let cache = tempfile::tempdir().unwrap();
        let opts = || MountOpts {
            cache: Some(cache.path().join("c")),
            ..MountOpts::default()
        };
        // Read the first 40 MiB, then the daemon dies (kill -9: no clean shutdown).
        let mut m = r.mount_with(opts());
        let mut f = std::fs::File::open(m.path("f.bin")).unwrap();
        let mut buf = vec![0u8; 40 * MIB];
        f.read_exact(&mut buf).unwrap();
        assert_eq!(&buf[..], &data[..40 * MIB]);
        drop(f);
        // Let the cache record what it has (it saves its chunk map at least once a second).
        std::thread::sleep(Duration::from_millis(1500));
        m.kill9_keep_mounted();
        // A dead mount is named as such, and `artifactfs unmount` clears it.
        let o = r.opts(MountOpts::default());
        let again = Command::new(bin())
            .arg("mount")
            .arg(r.url())
            .arg(&m.mnt)
            .args(&o.args)
            .envs(o.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap();
        assert!(!again.status.success());
        assert!(
            String::from_utf8_lossy(&again.stderr).contains("daemon is gone"),
            "{}",
            String::from_utf8_lossy(&again.stderr)
        );
        assert!(
            Command::new(bin())
                .arg("unmount")
                .arg(&m.mnt)
                .status()
                .unwrap()
                .success()
        );
        assert!(!is_mounted(&m.mnt));
        let first = r.wire().file_bytes_sent;
        assert!(first >= 40 * MIB as u64);

        let m = r.mount_with(opts());
        assert_eq!(hash_file(&m.path("f.bin")).unwrap(), hash(&data));
        let second = r.wire().file_bytes_sent - first;
        assert!(
            second <= data.len() as u64 - 40 * MIB as u64,
            "the second read fetched {second} bytes: it did not resume from the first 40 MiB"
        );
    }

    fn random_offset_reads_match(r) needs [] {
        let data = bytes(64 * MIB + 333, 3);
        r.write("r.bin", &data);
        let m = r.mount();
        let f = std::fs::File::open(m.path("r.bin")).unwrap();
        let mut x = 12345u64;
        for _ in 0..300 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            let off = (x >> 20) % data.len() as u64;
            let len = 1 + ((x >> 8) % 300_000) as usize;
            let mut buf = vec![0u8; len];
            let n = f.read_at(&mut buf, off).unwrap();
            let end = (off as usize + len).min(data.len());
            assert_eq!(&buf[..n], &data[off as usize..end], "at {off}+{len}");
            assert_eq!(n, end - off as usize);
        }
        drop(f);

        // A few small reads far apart fetch the chunks they touch, not the file.
        r.write("sparse.bin", &data);
        let before = r.wire().file_bytes_sent;
        let f = std::fs::File::open(m.path("sparse.bin")).unwrap();
        for i in 1..=6u64 {
            let off = i * 10 * MIB as u64 + 5000;
            let mut buf = vec![0u8; 4096];
            f.read_exact_at(&mut buf, off).unwrap();
            assert_eq!(&buf[..], &data[off as usize..off as usize + 4096]);
        }
        let fetched = r.wire().file_bytes_sent - before;
        assert!(
            fetched <= 12 * MIB as u64,
            "6 small random reads fetched {} MiB",
            fetched >> 20
        );
    }

    fn a_remote_change_after_the_ttl_is_seen_and_never_mixed_with_old_bytes(r) needs [] {
        let v1 = bytes(48 * MIB, 4);
        let v2 = bytes(48 * MIB, 5);
        r.write("f.bin", &v1);
        let m = r.mount_with(MountOpts {
                args: vec!["--metadata-ttl".into(), "1s".into()],
                ..MountOpts::default()
            },
        );
        // A handle held open across the change; it has read one chunk far from the start.
        let held = std::fs::File::open(m.path("f.bin")).unwrap();
        let mut b = vec![0u8; 4096];
        held.read_exact_at(&mut b, 40 * MIB as u64).unwrap();
        assert_eq!(&b[..], &v1[40 * MIB..40 * MIB + 4096]);

        assert_eq!(hash_file(&m.path("f.bin")).unwrap(), hash(&v1));
        r.write("f.bin", &v2);
        // Within the TTL the mount still shows v1 (cached), whole and unmixed.
        let h = hash_file(&m.path("f.bin")).unwrap();
        assert!(h == hash(&v1) || h == hash(&v2), "mixed bytes within the TTL");
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            hash_file(&m.path("f.bin")).unwrap(),
            hash(&v2),
            "the change is seen after the TTL"
        );

        // The old handle reads its own version, or fails; it never returns v2's bytes.
        for off in [0u64, 13 * MIB as u64, 40 * MIB as u64, 47 * MIB as u64] {
            let mut b = vec![0u8; 4096];
            match held.read_at(&mut b, off) {
                Ok(n) => assert_eq!(&b[..n], &v1[off as usize..off as usize + n], "old handle at {off}"),
                Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{e}"),
            }
        }
    }

    fn whole_file_answers_and_cut_bodies_never_give_wrong_bytes(r) needs [] {
        let a = bytes(24 * MIB + 7, 6);
        let b = bytes(24 * MIB + 9, 7);
        r.write("a.bin", &a);
        r.write("b.bin", &b);
        let (m, faults, _proxy) = r.mount_with_faults();
        // Cut the first three file bodies after 1.5 MiB.
        faults
            .truncate_after
            .store(3 * MIB as u64 / 2, std::sync::atomic::Ordering::Relaxed);
        faults.truncate.store(3, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(hash_file(&m.path("a.bin")).unwrap(), hash(&a));
        assert_eq!(
            faults.truncate.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "the cuts happened"
        );
        // Answer ranged requests with the whole file: the mount must still read the right bytes.
        faults
            .strip_range
            .store(1000, std::sync::atomic::Ordering::Relaxed);
        let f = std::fs::File::open(m.path("b.bin")).unwrap();
        let mut buf = vec![0u8; 10_000];
        f.read_exact_at(&mut buf, 20 * MIB as u64).unwrap();
        assert_eq!(&buf[..], &b[20 * MIB..20 * MIB + 10_000]);
        assert_eq!(hash_file(&m.path("b.bin")).unwrap(), hash(&b));
        assert!(
            m.log_text().contains("whole files"),
            "the switch to whole-file reads is logged"
        );
    }

    fn the_daemon_stays_within_its_memory_budget_while_8_readers_stream(r) needs [] {
        let files: Vec<Vec<u8>> = (0..8).map(|i| bytes(64 * MIB, 100 + i)).collect();
        for (i, d) in files.iter().enumerate() {
            r.write(&format!("s{i}.bin"), d);
        }
        let m = r.mount();
        let pid = m.pid();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut peak = (0u64, 0u64);
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Some((anon, rss)) = memory_of(pid) {
                        peak = (peak.0.max(anon), peak.1.max(rss));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                peak
            })
        };
        let readers: Vec<_> = (0..8)
            .map(|i| {
                let p = m.path(&format!("s{i}.bin"));
                std::thread::spawn(move || hash_file(&p).unwrap())
            })
            .collect();
        for (i, r) in readers.into_iter().enumerate() {
            assert_eq!(r.join().unwrap(), hash(&files[i]));
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let (anon, rss) = sampler.join().unwrap();
        eprintln!("daemon peak RssAnon {} MiB, VmRSS {} MiB", anon >> 20, rss >> 20);
        // The read engine's transfer budget is 64 MiB; the daemon as a whole stays under 96 MiB
        // of anonymous memory (cached bytes are file-backed pages, not counted here).
        assert!(anon < 96 << 20, "peak RssAnon {} MiB", anon >> 20);
    }

    fn unmount_with_a_file_held_open_completes(r) needs [] {
        r.write("f.bin", &bytes(3 * MIB, 8));
        let mut m = r.mount();
        let held = std::fs::File::open(m.path("f.bin")).unwrap();
        let start = Instant::now();
        let out = Command::new(bin())
            .args(["unmount", "--timeout", "1s"])
            .arg(&m.mnt)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "unmount took {:?}",
            start.elapsed()
        );
        assert!(!is_mounted(&m.mnt));
        // The daemon stopped even though the file is still open.
        let child = m.child.as_mut().unwrap();
        let end = Instant::now() + Duration::from_secs(5);
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < end, "the daemon is still running");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(held);
    }

    fn ordinary_tools_work_on_the_mount(r) needs [] {
        let src = tempfile::tempdir().unwrap();
        for i in 0..20 {
            std::fs::write(src.path().join(format!("m{i}.txt")), bytes(10_000 + i, i as u64)).unwrap();
        }
        let tar = r.path("x.tar");
        let st = Command::new("tar")
            .arg("-cf")
            .arg(&tar)
            .arg("-C")
            .arg(src.path())
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success());
        r.write("a", b"print me\n");
        let m = r.mount();
        let listed = Command::new("tar").arg("-tf").arg(m.path("x.tar")).output().unwrap();
        assert!(listed.status.success());
        assert_eq!(
            String::from_utf8_lossy(&listed.stdout)
                .lines()
                .filter(|l| l.ends_with(".txt"))
                .count(),
            20
        );
        let py = Command::new("python3")
            .arg("-c")
            .arg("import sys; print(open(sys.argv[1]).read(), end='')")
            .arg(m.path("a"))
            .output()
            .unwrap();
        assert_eq!(py.stdout, b"print me\n");
        let sha = Command::new("sha256sum").arg(m.path("x.tar")).output().unwrap();
        let sha_src = Command::new("sha256sum").arg(&tar).output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&sha.stdout).split_whitespace().next(),
            String::from_utf8_lossy(&sha_src.stdout).split_whitespace().next()
        );
        // A missing name is ENOENT.
        assert_eq!(
            std::fs::metadata(m.path("nope")).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
        // df works (statfs answers with the cache disk's figures).
        assert!(Command::new("df").arg(&m.mnt).status().unwrap().success());
    }

    fn the_servers_max_age_decides_how_long_metadata_is_trusted(r) needs [ServerMaxAge] {
        r.write("d/f", b"one");
        r.configure(|c| c.max_age = Some(Duration::from_secs(1)));
        // The mount's own TTL is long; the server says 1 s.
        let m = r.mount_with(MountOpts {
                args: vec!["--metadata-ttl".into(), "1h".into()],
                ..MountOpts::default()
            },
        );
        assert_eq!(std::fs::read(m.path("d/f")).unwrap(), b"one");
        r.write("d/f", b"two!");
        std::thread::sleep(Duration::from_millis(2200));
        assert_eq!(std::fs::read(m.path("d/f")).unwrap(), b"two!");
    }

    fn an_artifact_larger_than_the_cache_reads_correctly_and_the_cache_keeps_its_limit(r) needs [] {
        let data = bytes(96 * MIB, 9);
        r.write("huge.bin", &data);
        let mut m = r.mount_with(MountOpts {
                args: vec!["--max-cache-size".into(), "16M".into()],
                ..MountOpts::default()
            },
        );
        assert_eq!(hash_file(&m.path("huge.bin")).unwrap(), hash(&data));
        assert!(m.unmount().status.success());
        let out = Command::new(bin())
            .args(["cache", "stats", "--json", "--cache-dir"])
            .arg(&m.cache)
            .output()
            .unwrap();
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let used = st["bytes"].as_u64().unwrap();
        // Data is kept within the limit; the filesystem may add a few blocks of its own (ext4
        // counts the extent tree of a sparse file in its blocks).
        assert!(
            used <= 16 * MIB as u64 + 64 * 1024,
            "the cache holds {used} bytes: {st}"
        );
        let fetched = st["counters"]["fetched_bytes"].as_u64().unwrap();
        assert!(
            fetched <= data.len() as u64 * 11 / 10,
            "readahead thrashed: {fetched} bytes fetched for {}",
            data.len()
        );
        assert!(st["counters"]["punched_chunks"].as_u64().unwrap() > 0, "{st}");
    }

    fn odd_names_and_a_directory_of_many_pages_list_and_read(r) needs [] {
        let names = [
            "a b",
            "100%",
            "x#y?z",
            "ünïcödé ✓",
            "semi;colon",
            "plus+sign",
            "quote\"d",
            "-dash",
            ".hidden",
        ];
        for (i, n) in names.iter().enumerate() {
            r.write(&format!("odd/{n}"), &bytes(1000 + i, i as u64));
        }
        // More entries than one listing page (the client asks for 10,000): it follows the pages.
        for i in 0..10_050 {
            r.write(&format!("many/e{i:05}"), format!("{i}").as_bytes());
        }
        let m = r.mount();
        let mut listed: Vec<String> = std::fs::read_dir(m.path("odd"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        listed.sort();
        let mut want: Vec<String> = names
            .iter()
            .filter(|n| r.lists_dotfiles() || !n.starts_with('.'))
            .map(|s| s.to_string())
            .collect();
        want.sort();
        assert_eq!(listed, want);
        for (i, n) in names.iter().enumerate() {
            if !want.iter().any(|w| w == n) {
                continue;
            }
            assert_eq!(
                std::fs::read(m.path(&format!("odd/{n}"))).unwrap(),
                bytes(1000 + i, i as u64),
                "{n}"
            );
        }
        let many: Vec<_> = std::fs::read_dir(m.path("many")).unwrap().collect();
        assert_eq!(many.len(), 10_050);
        assert_eq!(std::fs::read(m.path("many/e10049")).unwrap(), b"10049");
        if let Some(pages) = r.list_pages() {
            assert!(pages >= 3, "the listing came in pages");
        }
    }

    fn remote_changes_reach_the_kernel_within_the_revalidation_interval(r) needs [] {
        r.write("d/a.txt", b"one");
        r.write("d/b.txt", b"bee");
        let m = r.mount_with(MountOpts {
            args: ["--metadata-ttl", "1s", "--revalidate-interval", "1s", "--metrics-addr", "127.0.0.1:0"]
                .map(String::from)
                .to_vec(),
            ..MountOpts::default()
        });
        let names = |m: &Mount| {
            let mut n: Vec<String> = std::fs::read_dir(m.path("d"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            n.sort();
            n
        };
        // ls -R: both folders listed.
        assert_eq!(std::fs::read_dir(&m.mnt).unwrap().count(), 1);
        assert_eq!(names(&m), ["a.txt", "b.txt"]);
        assert_eq!(std::fs::read(m.path("d/a.txt")).unwrap(), b"one");
        let asked = |m: &Mount| {
            metric(m, "artifactfs_fuse_calls_total{op=\"lookup\"}")
                + metric(m, "artifactfs_fuse_calls_total{op=\"getattr\"}")
        };
        // Across three TTLs and rounds, the kernel answers stat itself: its entries are
        // trusted for long because the rounds keep them honest. (After a readdir or a read
        // the kernel asks once for the atime it dropped: a stat first.)
        for f in ["d", "d/a.txt", "d/b.txt"] {
            std::fs::metadata(m.path(f)).unwrap();
        }
        let (before, rounds) = (asked(&m), metric(&m, "artifactfs_revalidated_folders_total"));
        for _ in 0..30 {
            for f in ["d", "d/a.txt", "d/b.txt"] {
                std::fs::metadata(m.path(f)).unwrap();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            asked(&m),
            before,
            "stat reached the daemon: the kernel's TTLs are short\n{}",
            metrics_of(&m.mnt)
        );
        // Two held folders (the root and d), about one round a second.
        let checked = metric(&m, "artifactfs_revalidated_folders_total") - rounds;
        assert!((3..=12).contains(&checked), "{checked} folders revalidated in 3 s");

        // Changes on the remote reach the kernel within about one interval, although it was
        // told to trust its entries for an hour.
        r.write("d/a.txt", b"two, longer");
        std::fs::remove_file(r.path("d/b.txt")).unwrap();
        r.write("d/c.txt", b"sea");
        let start = Instant::now();
        loop {
            let a = std::fs::read(m.path("d/a.txt")).unwrap_or_default();
            let seen = a == b"two, longer" && !m.path("d/b.txt").exists() && m.path("d/c.txt").exists();
            if seen {
                break;
            }
            assert!(a == b"one" || a == b"two, longer", "mixed bytes: {a:?}");
            assert!(start.elapsed() < Duration::from_secs(5), "changes not seen after 5 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(names(&m), ["a.txt", "c.txt"], "the kernel's kept listing was dropped");
        assert_eq!(std::fs::read(m.path("d/c.txt")).unwrap(), b"sea");
        // The kernel keeps the listing itself: listing again asks the daemon for no entries.
        let listed = |m: &Mount| {
            metric(m, "artifactfs_fuse_calls_total{op=\"readdir\"}")
                + metric(m, "artifactfs_fuse_calls_total{op=\"readdirplus\"}")
        };
        let before = listed(&m);
        assert_eq!(names(&m), ["a.txt", "c.txt"]);
        assert_eq!(listed(&m), before, "readdir reached the daemon for a kept listing");
        eprintln!("changes seen after {:?}", start.elapsed());
    }
}

/// nginx's HTML index (no WebDAV): sizes exact, times to the minute; every file opens and
/// reads (the version comes from a `HEAD`, whose time to the second is in the listed minute).
#[test]
fn an_nginx_html_index_mounts_and_reads() {
    use artifactfs::testing::web::{NginxMode, WebServer};
    let srv = WebServer::nginx(NginxMode::HtmlIndex).expect("nginx starts");
    let files: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| (format!("d/f{i}.bin"), bytes(100_000 + i * 7919, 40 + i as u64)))
        .collect();
    for (rel, data) in &files {
        srv.write(rel, data);
    }
    let m = Mount::new(&srv.url);
    assert_eq!(std::fs::read_dir(m.path("d")).unwrap().count(), files.len());
    for (rel, data) in &files {
        assert_eq!(
            std::fs::metadata(m.path(rel)).unwrap().len(),
            data.len() as u64,
            "{rel}"
        );
        assert_eq!(hash_file(&m.path(rel)).unwrap(), hash(data), "{rel}");
    }
    assert!(
        std::fs::write(m.path("d/new"), b"x").is_err(),
        "an index-only server is mounted read-only"
    );
}

/// A server that sends each answer at most 16 MiB/s (`serve --limit-rate`, as a server far
/// away or one that limits each connection): the mount opens more GETs at once while that
/// brings more bytes per second, where a number set by hand stays as it is.
#[test]
fn parallel_gets_grow_against_a_server_that_limits_each_answer() {
    let store = Store::new();
    let big = bytes(256 * MIB, 60);
    store.write("big.bin", &big);
    let small = bytes(48 * MIB, 61);
    store.write("small.bin", &small);
    let server = store.serve_with(|c| c.limit_rate = Some(16 << 20));

    let m = Mount::new(&server.url());
    assert_eq!(hash_file(&m.path("big.bin")).unwrap(), hash(&big));
    let st = status(&m);
    assert_eq!(st["concurrency"], 16, "the built-in server's start");
    assert_eq!(st["max_concurrency"], 64);
    let now = st["concurrency_now"].as_u64().unwrap();
    assert!(now >= 32, "still {now} requests at once");
    // One reader of one file: with 16 slots, half for readahead, at most 9 GETs at once.
    let most = server.stats().max_active;
    assert!(most > 9, "at most {most} requests at once");
    drop(m);

    server.restart_max_active();
    let m = Mount::with(
        &server.url(),
        MountOpts {
            args: vec!["--concurrency".into(), "16".into()],
            ..MountOpts::default()
        },
    );
    assert_eq!(hash_file(&m.path("small.bin")).unwrap(), hash(&small));
    let st = status(&m);
    assert_eq!(
        (st["concurrency_now"].as_u64(), st["max_concurrency"].as_u64()),
        (Some(16), Some(16))
    );
    let most = server.stats().max_active;
    assert!(most <= 16, "{most} requests at once with --concurrency 16");
}

/// The daemon's count of FUSE `READ` requests, from its metrics endpoint.
fn fuse_reads(m: &Mount) -> u64 {
    metric(m, "artifactfs_fuse_calls_total{op=\"read\"}")
}

/// One value of the mount's Prometheus metrics (0 when not there yet).
fn metric(m: &Mount, series: &str) -> u64 {
    metrics_of(&m.mnt)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

fn status(m: &Mount) -> serde_json::Value {
    status_of(&m.mnt)
}

fn drop_page_cache() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// Passthrough: once a file is complete in the cache, the kernel reads it straight from the
/// cache file (the daemon sees no `READ`), also after the page cache is dropped and through
/// `mmap`; writers wait for those readers (`ETXTBSY`); the cache never punches holes in a file
/// read that way; `--passthrough=false` reads through the daemon.
#[test]
fn a_complete_file_is_read_by_the_kernel_straight_from_the_cache() {
    use std::io::Write;
    let store = Store::new();
    let a = bytes(24 * MIB + 321, 61);
    let b = bytes(24 * MIB, 62);
    store.write("a.bin", &a);
    store.write("b.bin", &b);
    let server = store.serve();
    let cache = tempfile::tempdir().unwrap();
    let opts = |extra: &[&str]| MountOpts {
        cache: Some(cache.path().join("c")),
        args: ["--metrics-addr", "127.0.0.1:0", "--max-cache-size", "40M"]
            .iter()
            .chain(extra)
            .map(|a| a.to_string())
            .collect(),
        ..MountOpts::default()
    };
    let mut m = Mount::with(&server.url(), opts(&[]));
    assert_eq!(
        status(&m)["passthrough"],
        true,
        "root on this kernel: passthrough is on"
    );
    // Cold: through the daemon.
    assert_eq!(hash_file(&m.path("a.bin")).unwrap(), hash(&a));
    let cold_reads = fuse_reads(&m);
    assert!(cold_reads > 0);

    // Complete now: the next open is passthrough.
    let mut held = std::fs::File::open(m.path("a.bin")).unwrap();
    assert_eq!(status(&m)["passthrough_files"], 1);
    drop_page_cache();
    let mut got = Vec::new();
    held.read_to_end(&mut got).unwrap();
    assert!(got == a, "passthrough bytes differ");
    // SAFETY: read-only mapping of a file nobody truncates meanwhile.
    let map = unsafe { memmap2::Mmap::map(&held) }.unwrap();
    assert!(map[..] == a[..], "mapped bytes differ");
    drop(map);
    assert_eq!(fuse_reads(&m), cold_reads, "the daemon saw reads of a passthrough file");

    // Writers wait for passthrough readers.
    let w = std::fs::OpenOptions::new().append(true).open(m.path("a.bin"));
    assert_eq!(w.unwrap_err().raw_os_error(), Some(libc::ETXTBSY));
    let t = Command::new("truncate")
        .args(["-s", "5"])
        .arg(m.path("a.bin"))
        .output()
        .unwrap();
    assert!(!t.status.success(), "truncate of a passthrough file");

    // The cache (40 MiB) fills while the passthrough file is held: b's chunks go, a's stay.
    assert_eq!(hash_file(&m.path("b.bin")).unwrap(), hash(&b));
    drop_page_cache();
    let mut again = Vec::new();
    held.read_exact_at_all(&mut again);
    assert!(again == a, "a chunk of a passthrough file was punched out");
    drop(held);

    // Closed: a writer may open it again, and what it writes reads back.
    std::fs::OpenOptions::new()
        .append(true)
        .open(m.path("a.bin"))
        .unwrap()
        .write_all(b"tail")
        .unwrap();
    let mut a2 = a.clone();
    a2.extend_from_slice(b"tail");
    assert_eq!(hash_file(&m.path("a.bin")).unwrap(), hash(&a2));
    assert_eq!(hash_file(&store.path("a.bin")).unwrap(), hash(&a2));
    assert!(m.unmount().status.success());
    let st = afs(&["cache", "stats", "--json", "--cache-dir", s(&m.cache)]);
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert!(
        st["counters"]["punched_chunks"].as_u64().unwrap() > 0,
        "the cache was not under pressure while the passthrough file was held: {st}"
    );

    // Passthrough off: a complete file is read through the daemon.
    let m = Mount::with(&server.url(), opts(&["--passthrough=false"]));
    assert_eq!(status(&m)["passthrough"], false);
    assert_eq!(hash_file(&m.path("b.bin")).unwrap(), hash(&b));
    let first = fuse_reads(&m);
    drop_page_cache();
    assert_eq!(hash_file(&m.path("b.bin")).unwrap(), hash(&b));
    assert!(
        fuse_reads(&m) > first,
        "reads went around the daemon with passthrough off"
    );
}

trait ReadAll {
    fn read_exact_at_all(&self, out: &mut Vec<u8>);
}

impl ReadAll for std::fs::File {
    /// Reads the whole file with `pread` (the handle's offset is at its end).
    fn read_exact_at_all(&self, out: &mut Vec<u8>) {
        let len = self.metadata().unwrap().len() as usize;
        out.resize(len, 0);
        self.read_exact_at(out, 0).unwrap();
    }
}

/// A cache on a disk that fills up: reads still return the right bytes (served without the
/// cache when a chunk's blocks cannot be had), with an error from `fallocate`, never a SIGBUS.
#[test]
fn a_full_cache_disk_never_gives_wrong_bytes_nor_kills_the_daemon() {
    let store = Store::new();
    let data = bytes(40 * MIB + 17, 71);
    store.write("big.bin", &data);
    let server = store.serve();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12m", "tmpfs"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(ok.success(), "cannot mount a tmpfs");
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _disk = Umount(disk.clone());
    let config = dir.path().join("c.toml");
    // The cache believes it may grow to 1 GiB and keeps no free space: the disk fills.
    std::fs::write(&config, "[cache]\nmax_size = \"1GiB\"\nmin_free_percent = 0\n").unwrap();
    let m = Mount::with(
        &server.url(),
        MountOpts {
            cache: Some(disk.join("cache")),
            args: vec!["--config".into(), config.display().to_string()],
            ..MountOpts::default()
        },
    );
    for _ in 0..2 {
        assert_eq!(hash_file(&m.path("big.bin")).unwrap(), hash(&data));
    }
    let f = std::fs::File::open(m.path("big.bin")).unwrap();
    let mut buf = vec![0u8; 3 * MIB];
    f.read_exact_at(&mut buf, 33 * MIB as u64).unwrap();
    assert!(buf[..] == data[33 * MIB..36 * MIB]);
    drop(f);
    assert!(is_mounted(&m.mnt), "the daemon died: {}", m.log_text());
    let log = m.log_text();
    assert!(
        log.contains("cache disk full") || log.contains("short of free space"),
        "the disk never filled: {log}"
    );
    println!(
        "{}",
        log.lines()
            .filter(|l| l.contains("full") || l.contains("free space"))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let used = nix_df_used(&disk);
    assert!(used <= 12 * MIB as u64, "{used}");
}

/// Bytes used on the filesystem holding `p`.
fn nix_df_used(p: &std::path::Path) -> u64 {
    let out = Command::new("df")
        .args(["-B1", "--output=used"])
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Opening one small file of a listed folder fetches the folder's other small files in the
/// background: reading them afterwards sends no request. Larger files are left alone, and
/// `prefetch_small_files = 0` turns it off. A file of one chunk is checked against its tag:
/// no digests request.
#[test]
fn opening_a_small_file_fetches_its_folders_small_files_ahead() {
    let store = Store::new();
    let mut small = Vec::new();
    for i in 0..300usize {
        let rel = format!("many/f{i:03}.bin");
        let data = bytes(1000 + i * 13, 300 + i as u64);
        store.write(&rel, &data);
        small.push((rel, data));
    }
    let big = bytes(2 * MIB, 299);
    store.write("many/zz-big.bin", &big);
    let server = store.serve();
    let small_bytes: u64 = small.iter().map(|(_, d)| d.len() as u64).sum();

    let m = Mount::new(&server.url());
    let before = server.stats();
    assert_eq!(hash_file(&m.path("many/f000.bin")).unwrap(), hash(&small[0].1));
    // The rest arrives in the background.
    let end = Instant::now() + Duration::from_secs(20);
    while server.stats().file_bytes_sent - before.file_bytes_sent < small_bytes {
        assert!(Instant::now() < end, "prefetch stalled: {:?}", server.stats());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let fetched = server.stats();
    assert_eq!(
        fetched.file_bytes_sent - before.file_bytes_sent,
        small_bytes,
        "exactly the small files, not the big one"
    );
    for (rel, data) in &small {
        assert_eq!(hash_file(&m.path(rel)).unwrap(), hash(data), "{rel}");
    }
    let after = server.stats();
    assert_eq!(after.gets, fetched.gets, "reading the prefetched files sent requests");
    assert_eq!(after.digests, before.digests, "small files need no digests");
    // The built-in server sends them in one bundle: one request, not 299.
    assert_eq!(fetched.bundles - before.bundles, 1, "{fetched:?}");
    assert_eq!(fetched.bundled_files - before.bundled_files, 299);
    assert_eq!(fetched.gets - before.gets, 1, "only the file opened: {fetched:?}");
    drop(m);

    // Folders listed beside it: the next three are fetched ahead too (find, tar and cp -r
    // go through them in order), the rest when reached.
    for d in 0..6 {
        for f in 0..20u64 {
            store.write(&format!("seq/d{d}/f{f:02}"), &bytes(500 + f as usize, f + 10 * d));
        }
    }
    let m = Mount::new(&server.url());
    let listed = Command::new("ls").arg("-R").arg(m.path("seq")).output().unwrap();
    assert!(listed.status.success());
    let before = server.stats();
    assert_eq!(std::fs::read(m.path("seq/d1/f00")).unwrap(), bytes(500, 10));
    let end = Instant::now() + Duration::from_secs(20);
    while server.stats().bundled_files - before.bundled_files < 19 + 3 * 20 {
        assert!(Instant::now() < end, "folders ahead not fetched: {:?}", server.stats());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let now = server.stats();
    assert_eq!(now.bundles - before.bundles, 4, "d1 and the three after it: {now:?}");
    assert_eq!(now.bundled_files - before.bundled_files, 19 + 3 * 20);
    let gets = now.gets;
    for d in 2..5u64 {
        for f in 0..20u64 {
            let got = std::fs::read(m.path(&format!("seq/d{d}/f{f:02}"))).unwrap();
            assert!(got == bytes(500 + f as usize, f + 10 * d), "seq/d{d}/f{f:02}");
        }
    }
    assert_eq!(server.stats().gets, gets, "the folders ahead were read from the cache");
    drop(m);

    // Turned off: opening one file fetches that file only.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "[read]\nprefetch_small_files = 0\n").unwrap();
    let m = Mount::with(
        &server.url(),
        MountOpts {
            args: vec!["--config".into(), config.display().to_string()],
            ..MountOpts::default()
        },
    );
    let before = server.stats();
    assert_eq!(hash_file(&m.path("many/f001.bin")).unwrap(), hash(&small[1].1));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        server.stats().file_bytes_sent - before.file_bytes_sent,
        small[1].1.len() as u64
    );
}
