//! The command line as a user meets it: daemon mode, failures with their reasons, the cache
//! lock, Ctrl-C, `fusermount3 -u`, `cache stats|clear`, configuration precedence.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit_once(')').unwrap().1.trim_start().starts_with('Z'))
        .unwrap_or(false)
}

fn wait_gone(pid: u32) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[test]
fn daemon_mode_returns_when_ready_and_unmount_stops_the_daemon() {
    let store = Store::new();
    let data = bytes(5 * MIB, 1);
    store.write("d/f.bin", &data);
    let server = store.serve();
    let place = Place::new();
    let (mnt, cache) = (&place.mnt, &place.cache);
    let out = place.mount(&server.url());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("mounted"));
    // Usable the moment `mount` returned.
    assert_eq!(hash_file(&mnt.join("d/f.bin")).unwrap(), hash(&data));
    let pid = lock_pid(cache);
    assert!(alive(pid));
    assert_eq!(std::fs::metadata(cache).unwrap().permissions().mode() & 0o777, 0o700);
    let out = afs(&["unmount", s(mnt)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!is_mounted(mnt));
    assert!(wait_gone(pid), "the daemon did not exit");
    // Unmounting what is not mounted is an error with a reason.
    let out = afs(&["unmount", s(mnt)]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not mounted"), "{}", stderr(&out));
}

#[test]
fn an_unreachable_remote_fails_the_mount_with_the_reason() {
    let place = Place::new();
    // Port 9 (discard) on loopback: nothing listens there.
    let start = Instant::now();
    let out = place.mount("http://127.0.0.1:9");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("cannot use the remote http://127.0.0.1:9"), "{err}");
    assert!(err.to_lowercase().contains("connect"), "{err}");
    assert!(!is_mounted(&place.mnt));
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_failed_mount_never_shows_the_password_of_the_url() {
    let place = Place::new();
    let out = place.mount("http://alice:hunter2-secret@127.0.0.1:9/store");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("cannot use the remote http://127.0.0.1:9/store"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn a_plain_web_server_mounts_by_its_index_and_kind_artifact_names_it() {
    let www = tempfile::tempdir().unwrap();
    let body: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(www.path().join("data.bin"), &body).unwrap();
    let mut py = Command::new("python3")
        .args(["-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory"])
        .arg(www.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(py.stdout.take().unwrap()), &mut line).unwrap();
    // "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
    let port = line.split_whitespace().nth(5).unwrap().to_string();
    let url = format!("http://127.0.0.1:{port}");
    let place = Place::new();
    // Told it is the built-in server, the mount names what it found instead.
    let out = place.mount_with(&url, &["--kind", "artifact"], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is not an artifactfs server"), "{}", stderr(&out));
    assert!(!is_mounted(&place.mnt));
    // Detected, it is a plain server with HTML index pages: listed and read.
    let out = place.mount(&url);
    assert!(out.status.success(), "{}", stderr(&out));
    let names: Vec<_> = std::fs::read_dir(&place.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["data.bin".to_string()]);
    let read = std::fs::read(place.mnt.join("data.bin")).unwrap();
    assert_eq!(blake3::hash(&read), blake3::hash(&body));
    let out = afs(&["unmount", s(&place.mnt)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let _ = py.kill();
    let _ = py.wait();
}

#[test]
fn a_second_daemon_on_the_same_cache_dir_refuses() {
    let store = Store::new();
    store.write("f", b"x");
    let server = store.serve();
    let (a, b) = (Place::new(), Place::new());
    let out = a.mount(&server.url());
    assert!(out.status.success(), "{}", stderr(&out));
    let out = b.mount_with_cache(&server.url(), &a.cache);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("is in use by another artifactfs mount"), "{err}");
    assert!(err.contains(&format!("pid {}", lock_pid(&a.cache))), "{err}");
    assert!(!is_mounted(&b.mnt));
    // Mounting on a mount point twice is refused too.
    let out = a.mount_with_cache(&server.url(), &b.cache);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already a mount point"), "{}", stderr(&out));
}

#[test]
fn ctrl_c_ends_a_foreground_mount() {
    let store = Store::new();
    store.write("f", b"abc");
    let server = store.serve();
    let place = Place::new();
    let mnt = &place.mnt;
    let mut child = Command::new(bin())
        .args([
            "mount",
            &server.url(),
            s(mnt),
            "--foreground",
            "--cache-dir",
            s(&place.cache),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while !is_mounted(mnt) {
        assert!(Instant::now() < end, "never mounted");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"abc");
    // SAFETY: plain syscall.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < end, "still running after Ctrl-C");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(!is_mounted(mnt));
}

#[test]
fn fusermount3_u_ends_a_daemon_mount() {
    let store = Store::new();
    store.write("f", b"abc");
    let server = store.serve();
    let place = Place::new();
    let (mnt, cache) = (&place.mnt, &place.cache);
    assert!(place.mount(&server.url()).status.success());
    let pid = lock_pid(cache);
    let st = Command::new("fusermount3").arg("-u").arg(mnt).status().unwrap();
    assert!(st.success());
    assert!(wait_gone(pid));
}

#[test]
fn cache_stats_and_clear() {
    let store = Store::new();
    let data = bytes(6 * MIB, 2);
    store.write("f.bin", &data);
    let server = store.serve();
    let place = Place::new();
    let (mnt, cache) = (&place.mnt, &place.cache);
    // Without passthrough, so that the second read reaches the daemon and counts as a hit.
    assert!(
        place
            .mount_with(&server.url(), &["--passthrough=false"], &[])
            .status
            .success()
    );
    assert_eq!(hash_file(&mnt.join("f.bin")).unwrap(), hash(&data));
    // Drop the kernel's copy, so the second read reaches the daemon and its disk cache.
    let f = std::fs::File::open(mnt.join("f.bin")).unwrap();
    // SAFETY: plain syscall on an open fd.
    unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, libc::POSIX_FADV_DONTNEED) };
    drop(f);
    assert_eq!(hash_file(&mnt.join("f.bin")).unwrap(), hash(&data));
    let stats = |cache: &Path| -> serde_json::Value {
        let o = afs(&["cache", "stats", "--json", "--cache-dir", s(cache)]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let st = stats(cache);
    assert!(st["bytes"].as_u64().unwrap() >= data.len() as u64, "{st}");
    assert_eq!(st["versions"], 1);
    assert!(st["in_use_by"].as_str().unwrap().contains("pid"), "{st}");
    assert_eq!(st["remotes"][0]["remote"], server.url());
    // A running mount saves its counters every 2 s.
    std::thread::sleep(Duration::from_millis(2500));
    let live = stats(cache);
    assert_eq!(
        live["counters"]["fetched_bytes"].as_u64(),
        Some(data.len() as u64),
        "{live}"
    );
    // Clearing a cache a mount uses is refused.
    let o = afs(&["cache", "clear", "--cache-dir", s(cache)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("in use"), "{}", stderr(&o));
    assert!(afs(&["unmount", s(mnt)]).status.success());
    let st = stats(cache);
    assert_eq!(st["complete_versions"], 1, "{st}");
    assert!(st["in_use_by"].is_null());
    let c = &st["counters"];
    assert!(c["hit_bytes"].as_u64().unwrap() > 0, "the second read was a hit: {c}");
    assert_eq!(c["fetched_bytes"].as_u64().unwrap(), data.len() as u64, "{c}");
    let text = afs(&["cache", "stats", "--cache-dir", s(cache)]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("hit rate"));
    // Filters: another remote's versions, or versions read within the day, are kept.
    let o = afs(&[
        "cache",
        "clear",
        "--cache-dir",
        s(cache),
        "--remote",
        "http://elsewhere:1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stats(cache)["versions"], 1);
    let o = afs(&["cache", "clear", "--cache-dir", s(cache), "--older-than", "1d"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stats(cache)["versions"], 1);
    let o = afs(&["cache", "clear", "--cache-dir", s(cache), "--remote", &server.url()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("(1 versions)"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(stats(cache)["bytes"], 0);
    let o = afs(&["cache", "clear", "--cache-dir", s(cache)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stats(cache)["bytes"], 0);
}

#[test]
fn flags_override_the_config_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("m.toml");
    std::fs::write(
        &cfg,
        "[mount]\nremote = \"http://127.0.0.1:1234\"\n[cache]\nmax_size = \"2GiB\"\n[metadata]\nttl = \"5s\"\n",
    )
    .unwrap();
    let o = afs(&[
        "mount",
        "/tmp/x",
        "--config",
        s(&cfg),
        "--metadata-ttl",
        "7s",
        "--print-config",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let v: toml::Value = toml::from_str(&text).unwrap();
    assert_eq!(v["mount"]["remote"].as_str(), Some("http://127.0.0.1:1234"));
    assert_eq!(v["cache"]["max_size"].as_str(), Some("2GiB"));
    assert_eq!(v["metadata"]["ttl"].as_str(), Some("7s"), "the flag wins");
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[cache]\nmax_sise = 1\n").unwrap();
    let o = afs(&["mount", "http://x", "/tmp/x", "--config", s(&bad), "--print-config"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("max_sise"), "{}", stderr(&o));
    let o = afs(&[
        "mount",
        "http://127.0.0.1:1",
        s(&tmp.path().join("missing")),
        "--foreground",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("mount point"), "{}", stderr(&o));
}

/// Every subcommand, nested ones included, as `(path, command)`.
fn subcommands() -> Vec<(Vec<String>, clap::Command)> {
    use clap::CommandFactory;
    fn walk(prefix: &[String], cmd: &clap::Command, out: &mut Vec<(Vec<String>, clap::Command)>) {
        for sub in cmd.get_subcommands() {
            let mut path = prefix.to_vec();
            path.push(sub.get_name().to_string());
            out.push((path.clone(), sub.clone()));
            walk(&path, sub, out);
        }
    }
    let mut out = Vec::new();
    walk(&[], &artifactfs::cli::Cli::command(), &mut out);
    out
}

#[test]
fn shell_completions_name_every_subcommand_and_load_in_bash() {
    let subs = subcommands();
    assert!(
        subs.iter().any(|(p, _)| p == &["cache", "stats"]),
        "nested subcommands are walked"
    );
    let out = afs(&["completions", "bash"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bash = String::from_utf8(out.stdout).unwrap();
    for (path, _) in &subs {
        let name = path.last().unwrap();
        assert!(
            bash.contains(name.as_str()),
            "the bash completion lacks `{}`",
            path.join(" ")
        );
    }
    assert!(
        bash.contains("--cache-dir") && bash.contains("--metadata-ttl"),
        "mount flags"
    );
    // Sourced by bash, it registers a completion for artifactfs.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("artifactfs.bash");
    std::fs::write(&file, &bash).unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p artifactfs", s(&file)))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("artifactfs"));

    let zsh = afs(&["completions", "zsh"]);
    assert!(String::from_utf8_lossy(&zsh.stdout).starts_with("#compdef artifactfs"));
    let fish = String::from_utf8(afs(&["completions", "fish"]).stdout).unwrap();
    assert!(
        fish.contains("complete -c artifactfs") && fish.contains("cache-dir"),
        "{fish}"
    );
    let out = afs(&["completions", "tcsh"]);
    assert!(!out.status.success());
}

#[test]
fn man_pages_cover_every_subcommand_and_the_mount_flags() {
    use clap::CommandFactory;
    let dir = tempfile::tempdir().unwrap();
    let out = afs(&["man", "--dir", s(&dir.path().join("man1"))]);
    assert!(out.status.success(), "{}", stderr(&out));
    let read = |name: &str| {
        std::fs::read_to_string(dir.path().join("man1").join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    // roff writes a dash as `\-`.
    let roff = |s: &str| s.replace('-', "\\-");
    let main = read("artifactfs.1");
    assert!(main.starts_with(".ie"), "roff: {}", &main[..main.len().min(80)]);
    for (path, _) in subcommands() {
        let page = format!("artifactfs-{}.1", path.join("-"));
        let text = read(&page);
        assert!(
            text.contains(&roff(&format!("artifactfs-{}", path.join("-")))),
            "{page} names itself"
        );
        if path.len() == 1 {
            assert!(main.contains(&roff(&path[0])), "artifactfs.1 lacks `{}`", path[0]);
        }
    }
    let mount = read("artifactfs-mount.1");
    let cmd = artifactfs::cli::Cli::command();
    let mut flags = 0;
    for arg in cmd.find_subcommand("mount").unwrap().get_arguments() {
        if let Some(long) = arg.get_long() {
            assert!(
                mount.contains(&roff(&format!("--{long}"))),
                "artifactfs-mount.1 lacks --{long}"
            );
            flags += 1;
        }
    }
    assert!(flags >= 20, "{flags}");
    assert!(mount.contains("fuse.artifactfs"), "the fstab note");
    let listed: Vec<String> = std::fs::read_dir(dir.path().join("man1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(listed.len(), subcommands().len() + 1, "{listed:?}");
}

#[test]
fn serve_limit_rate_paces_each_answer() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let data = bytes(2 * MIB, 7);
    std::fs::write(dir.path().join("f.bin"), &data).unwrap();
    let mut server = Command::new(bin())
        .args(["serve", s(dir.path()), "--listen", "127.0.0.1:0", "--limit-rate", "2M"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .expect("the address")
        .to_string();
    // 2 MiB at 2 MiB/s: a second, less the last 64 KiB piece's share.
    let start = Instant::now();
    let out = Command::new("curl")
        .args(["-sf", &format!("{url}/f.bin")])
        .output()
        .unwrap();
    let took = start.elapsed();
    server.kill().unwrap();
    server.wait().unwrap();
    assert!(out.status.success());
    assert!(out.stdout == data, "bytes differ");
    assert!(took >= Duration::from_millis(950), "{took:?}");
}
