//! `artifactfs warm` and `artifactfs status` against a real mount of the built-in server on
//! 127.0.0.1: what warm fetches is counted by the server, and reading afterwards fetches
//! nothing more.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::*;

#[test]
fn warm_fetches_folders_and_files_once_and_reports_what_failed() {
    let store = Store::new();
    let mut want = Vec::new();
    for i in 0..30usize {
        let rel = format!("set/d{}/f{i:02}.bin", i % 3);
        let data = bytes(1000 + i * 3001, i as u64);
        store.write(&rel, &data);
        want.push((rel, data));
    }
    let big = bytes(40 * MIB + 17, 99);
    store.write("models/big.bin", &big);
    store.write("other/not-warmed.bin", &bytes(5 * MIB, 7));
    let server = store.serve();
    // Reads through the daemon (no passthrough), so that they count as cache hits below.
    let m = Mount::with(
        &server.url(),
        MountOpts {
            args: vec!["--passthrough=false".into()],
            ..MountOpts::default()
        },
    );

    let out = afs(&[
        "warm",
        s(&m.path("models/big.bin")),
        s(&m.path("set")),
        s(&m.path("missing.bin")),
        "--no-progress",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // One path named nothing: reported at the end, the rest warmed, the exit status says so.
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("warmed 31 files"), "{stdout}");
    assert!(
        stderr.contains("failed: missing.bin: no such file or folder"),
        "{stderr}"
    );
    assert!(!stdout.contains('\r'), "no bar when stdout is not a terminal");
    let total: u64 = big.len() as u64 + want.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
    assert_eq!(
        server.stats().file_bytes_sent,
        total,
        "each byte fetched once, nothing else"
    );

    // Reading it all now comes from the cache.
    for (rel, data) in &want {
        assert_eq!(std::fs::read(m.path(rel)).unwrap(), *data, "{rel}");
    }
    assert_eq!(hash_file(&m.path("models/big.bin")).unwrap(), hash(&big));
    assert_eq!(
        server.stats().file_bytes_sent,
        total,
        "reads after warm fetched nothing"
    );

    // Warming again fetches nothing and succeeds.
    let out = afs(&["warm", s(&m.path("set")), "--no-progress"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(server.stats().file_bytes_sent, total);

    // status: live figures, through a socket only its user can use.
    let out = afs(&["status", s(&m.mnt), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["remote"], server.url());
    assert_eq!(st["fetched_bytes"].as_u64().unwrap(), total);
    assert!(st["hit_bytes"].as_u64().unwrap() >= total, "{st}");
    assert_eq!(st["pid"].as_u64().unwrap(), m.pid() as u64);
    assert_eq!(st["concurrency"], 16, "the built-in server's default");
    let sock = std::path::PathBuf::from(st["socket"].as_str().unwrap());
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", sock.display());
    let text = afs(&["status", s(&m.mnt)]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("cache hit rate"));
}

#[test]
fn warm_shows_a_progress_bar_on_a_terminal_and_takes_a_priority_list() {
    let store = Store::new();
    for i in 0..4 {
        store.write(&format!("f{i}.bin"), &bytes(80 * MIB, i));
    }
    let server = store.serve();
    let m = Mount::new(&server.url());
    let list = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        list.path(),
        format!(
            "# highest priority first\n{}\n{}\n",
            m.path("f2.bin").display(),
            m.path("f0.bin").display()
        ),
    )
    .unwrap();
    // `script` gives the command a pseudo-terminal.
    let cmd = format!("{} warm --list {}", bin(), list.path().display());
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{tty}");
    assert!(tty.contains("2/2 files"), "{tty}");
    assert!(tty.contains("100%"), "{tty}");
    assert!(tty.contains("ETA"), "{tty}");
    assert!(tty.contains("MiB/s"), "{tty}");
    assert!(tty.contains("warmed 2 files, 160.0 MiB"), "{tty}");
    assert_eq!(
        server.stats().file_bytes_sent,
        160 * MIB as u64,
        "only the listed files"
    );
}

#[test]
fn warm_outside_a_mount_and_status_of_no_mount_fail_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = afs(&["warm", s(dir.path()), "--no-progress"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not inside an artifactfs mount"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = afs(&["status", s(dir.path())]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach the mount"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_concurrency_limit_follows_the_flag_then_the_kinds_setting() {
    let store = Store::new();
    store.write("a", b"x");
    let server = store.serve();
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "[performance]\nconcurrency = 5\n[performance.artifact]\nconcurrency = 7\n",
    )
    .unwrap();
    let limit = |args: Vec<String>| {
        let m = Mount::with(
            &server.url(),
            MountOpts {
                args,
                ..MountOpts::default()
            },
        );
        let out = afs(&["status", s(&m.mnt), "--json"]);
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        st["concurrency"].as_u64().unwrap()
    };
    let cfg = vec!["--config".to_string(), config.path().display().to_string()];
    assert_eq!(limit(cfg.clone()), 7, "the kind's setting wins over the global one");
    let mut with_flag = cfg;
    with_flag.extend(["--concurrency".to_string(), "3".to_string()]);
    assert_eq!(limit(with_flag), 3, "the remote's own setting wins");
}

#[test]
fn metrics_are_served_logged_when_slow_and_summarized_at_unmount() {
    let store = Store::new();
    let data = bytes(12 * MIB + 5, 3);
    store.write("d/f.bin", &data);
    let server = store.serve();
    let summary = tempfile::NamedTempFile::new().unwrap();
    let mut m = Mount::with(
        &server.url(),
        MountOpts {
            args: vec![
                "--metrics-addr".into(),
                "127.0.0.1:0".into(),
                "--metrics-file".into(),
                summary.path().display().to_string(),
                "--slow-threshold".into(),
                "1ms".into(),
            ],
            ..MountOpts::default()
        },
    );
    assert_eq!(hash_file(&m.path("d/f.bin")).unwrap(), hash(&data));
    let text = metrics_of(&m.mnt);
    let value = |line_start: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .unwrap_or_else(|| panic!("no {line_start} in {text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse::<f64>()
            .unwrap() as u64
    };
    assert_eq!(value("artifactfs_fetched_bytes_total"), data.len() as u64, "{text}");
    assert!(value("artifactfs_remote_requests_total{op=\"get\"}") >= 1, "{text}");
    assert!(value("artifactfs_fuse_calls_total{op=\"read\"}") >= 1, "{text}");
    let read = value("artifactfs_cache_miss_bytes_total") + value("artifactfs_cache_hit_bytes_total");
    assert_eq!(read, data.len() as u64, "every byte read is a hit or a miss: {text}");
    assert!(text.contains("artifactfs_remote_request_seconds_bucket{le="), "{text}");
    // Reading 12 MiB over the network takes more than 1 ms somewhere.
    assert!(m.log_text().contains("slow operation"), "{}", m.log_text());
    assert!(m.unmount().status.success());
    let sum: serde_json::Value = serde_json::from_slice(&std::fs::read(summary.path()).unwrap()).unwrap();
    assert_eq!(sum["fetched_bytes"], data.len() as u64, "{sum}");
    assert!(sum["operations"]["remote.get"]["count"].as_u64().unwrap() >= 1, "{sum}");
    assert!(sum["operations"]["fuse.read"]["count"].as_u64().unwrap() >= 1, "{sum}");
    assert_eq!(sum["cache"]["fetched_bytes"], data.len() as u64, "{sum}");
}

#[test]
fn bandwidth_limits_hold_each_way() {
    let store = Store::new();
    let data = bytes(100 * MIB, 4);
    store.write("big.bin", &data);
    let server = store.serve();
    let m = Mount::with(
        &server.url(),
        MountOpts {
            args: vec![
                "--download-limit".into(),
                "20M".into(),
                "--upload-limit".into(),
                "10M".into(),
            ],
            ..MountOpts::default()
        },
    );
    let start = std::time::Instant::now();
    assert_eq!(hash_file(&m.path("big.bin")).unwrap(), hash(&data));
    let secs = start.elapsed().as_secs_f64();
    let rate = data.len() as f64 / secs / MIB as f64;
    eprintln!("download: {rate:.2} MiB/s with a limit of 20 MiB/s ({secs:.2} s)");
    assert!(rate <= 20.0 * 1.05, "downloads at {rate:.2} MiB/s");
    assert!(
        rate >= 20.0 * 0.7,
        "the limit slowed reads far below it: {rate:.2} MiB/s"
    );

    let up = bytes(40 * MIB, 5);
    let start = std::time::Instant::now();
    std::fs::write(m.path("up.bin"), &up).unwrap();
    let secs = start.elapsed().as_secs_f64();
    let rate = up.len() as f64 / secs / MIB as f64;
    eprintln!("upload: {rate:.2} MiB/s with a limit of 10 MiB/s ({secs:.2} s)");
    assert!(rate <= 10.0 * 1.05, "uploads at {rate:.2} MiB/s");
    assert_eq!(hash_file(&store.dir.path().join("up.bin")).unwrap(), hash(&up));
}

#[test]
fn mounts_are_private_unless_allow_other_and_show_the_owner_and_modes_asked() {
    use std::os::unix::fs::MetadataExt;
    let store = Store::new();
    store.write("d/f", b"hello");
    let server = store.serve();
    // Another user (nobody) trying to list the mount.
    let as_nobody = |dir: &std::path::Path| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "ls"])
            .arg(dir)
            .output()
            .unwrap()
    };
    let m = Mount::new(&server.url());
    let out = as_nobody(&m.mnt);
    assert!(!out.status.success(), "another user listed a private mount");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(m);
    let m = Mount::with(
        &server.url(),
        MountOpts {
            args: [
                "--allow-other",
                "--uid",
                "4242",
                "--gid",
                "4343",
                "--file-mode",
                "0600",
                "--dir-mode",
                "0751",
            ]
            .map(String::from)
            .to_vec(),
            ..MountOpts::default()
        },
    );
    let f = std::fs::metadata(m.path("d/f")).unwrap();
    assert_eq!((f.uid(), f.gid(), f.mode() & 0o7777), (4242, 4343, 0o600));
    let d = std::fs::metadata(m.path("d")).unwrap();
    assert_eq!((d.uid(), d.gid(), d.mode() & 0o7777), (4242, 4343, 0o751));
    // With --allow-other other users get in, and the kernel checks the modes shown: nobody
    // may pass through 0751 folders but not list them, nor read a 0600 file.
    let nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = nobody(&["ls", s(&m.mnt)]);
    assert!(!out.status.success(), "0751: not listable by others");
    let out = nobody(&["stat", s(&m.path("d/f"))]);
    assert!(
        out.status.success(),
        "0751: others may pass: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = nobody(&["cat", s(&m.path("d/f"))]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    assert_eq!(std::fs::read(m.path("d/f")).unwrap(), b"hello", "root reads it");
}

#[test]
fn warm_without_a_mount_fills_the_cache_a_later_mount_reads_from() {
    let store = Store::new();
    let mut total = 0;
    for i in 0..6u64 {
        let d = bytes(3 * MIB + i as usize * 777, 60 + i);
        total += d.len() as u64;
        store.write(&format!("set/f{i}"), &d);
    }
    store.write("elsewhere.bin", &bytes(MIB, 70));
    let server = store.serve();
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().join("c");
    let out = afs(&[
        "warm",
        "--remote",
        &server.url(),
        "--cache-dir",
        s(&cache_dir),
        "set",
        "--no-progress",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("warmed 6 files"));
    assert_eq!(server.stats().file_bytes_sent, total);
    // A mount of the same remote on that cache reads the set without fetching it.
    let m = Mount::with(
        &server.url(),
        MountOpts {
            cache: Some(cache_dir.clone()),
            ..MountOpts::default()
        },
    );
    for i in 0..6u64 {
        let want = bytes(3 * MIB + i as usize * 777, 60 + i);
        assert_eq!(hash_file(&m.path(&format!("set/f{i}"))).unwrap(), hash(&want));
    }
    assert_eq!(server.stats().file_bytes_sent, total, "the mount fetched nothing");
    // The cache of a running mount is warmed through the mount, not beside it.
    let out = afs(&[
        "warm",
        "--remote",
        &server.url(),
        "--cache-dir",
        s(&cache_dir),
        "elsewhere.bin",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("give paths inside the mount"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
