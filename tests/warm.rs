//! `artifactfs warm` and `artifactfs status` against a real mount of the built-in server on
//! 127.0.0.1: what warm fetches is counted by the server, and reading afterwards fetches
//! nothing more.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::*;

fn afs(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

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
    let m = Mount::new(&server.url());

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
