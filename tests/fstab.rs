//! mount(8) and fstab through the helper: `mount -t fuse.artifactfs URL DIR -o …` and an fstab
//! line with `mount DIR` mount through `/sbin/mount.fuse.artifactfs` (a link to this build),
//! and `umount DIR` ends the daemon. Needs root.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

const HELPER: &str = "/sbin/mount.fuse.artifactfs";
/// Where fuse3's generic mount.fuse finds `artifactfs` (mount(8) runs it with a standard PATH).
const ON_PATH: &str = "/usr/local/bin/artifactfs";

/// Both tests change what mount(8) finds in /sbin: one at a time.
static SYSTEM: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A link to this build, made only when nothing is at `path`, and removed on drop, even on
/// panic.
struct Link {
    path: &'static str,
    made: bool,
}

impl Link {
    /// None when something else is installed there: the test would not test this build.
    fn place(path: &'static str) -> Option<Link> {
        match std::fs::read_link(path) {
            Ok(target) if target == Path::new(bin()) => Some(Link { path, made: false }),
            Ok(_) => None,
            Err(_) if Path::new(path).exists() => None,
            Err(_) => {
                std::os::unix::fs::symlink(bin(), path).unwrap();
                Some(Link { path, made: true })
            }
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if self.made {
            let _ = std::fs::remove_file(self.path);
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn wait_gone(pid: u32) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn is_root() -> bool {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn mount_t_and_an_fstab_line_mount_through_the_helper_and_umount_ends_them() {
    if !is_root() {
        eprintln!("skipped: mount(8) with a helper in /sbin needs root");
        return;
    }
    let _one = SYSTEM.lock().unwrap_or_else(|e| e.into_inner());
    let Some(_link) = Link::place(HELPER) else {
        eprintln!("skipped: {HELPER} exists and is not a link to this build");
        return;
    };
    let store = Store::new();
    let data = bytes(3 * MIB + 17, 7);
    store.write("models/m.bin", &data);
    let server = store.serve();

    // mount -t fuse.artifactfs URL DIR -o …: returns once mounted, writable by default.
    let place = Place::new();
    let opts = format!("cache_dir={},metadata-ttl=5m", place.cache.display());
    let out = run(Command::new("mount")
        .args(["-t", "fuse.artifactfs", &server.url()])
        .arg(&place.mnt)
        .args(["-o", &opts]));
    assert!(out.status.success(), "mount: {}", text(&out));
    assert!(is_mounted(&place.mnt));
    assert_eq!(hash_file(&place.mnt.join("models/m.bin")).unwrap(), hash(&data));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == place.mnt.to_str())
        .unwrap();
    assert!(line.contains(" fuse.artifactfs "), "{line}");
    std::fs::write(place.mnt.join("new.txt"), b"hello").unwrap();
    assert_eq!(std::fs::read(store.path("new.txt")).unwrap(), b"hello");
    let pid = place.daemon_pid();
    let out = run(Command::new("umount").arg(&place.mnt));
    assert!(out.status.success(), "umount: {}", text(&out));
    assert!(!is_mounted(&place.mnt));
    assert!(wait_gone(pid), "the daemon outlived umount");

    // An fstab line (in a file of its own, not /etc/fstab) and `mount DIR`.
    let fstab = place.tmp.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# artifactfs\n{} {} fuse.artifactfs defaults,_netdev,nofail,x-systemd.automount,cache_dir={},read_only,metadata_ttl=5m 0 0\n",
            server.url(),
            place.mnt.display(),
            place.cache.display()
        ),
    )
    .unwrap();
    let out = run(Command::new("mount").arg("--fstab").arg(&fstab).arg(&place.mnt));
    assert!(out.status.success(), "mount from fstab: {}", text(&out));
    assert_eq!(hash_file(&place.mnt.join("models/m.bin")).unwrap(), hash(&data));
    let e = std::fs::write(place.mnt.join("other.txt"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "read_only from fstab: {e}");
    // `mount -a` sees the line is mounted (the source matches) and leaves it alone.
    let out = run(Command::new("mount").arg("--fstab").arg(&fstab).arg("-a"));
    assert!(out.status.success(), "mount -a again: {}", text(&out));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let lines: Vec<&str> = mountinfo
        .lines()
        .filter(|l| l.split(' ').nth(4) == place.mnt.to_str())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains(&format!(" fuse.artifactfs {} ", server.url())),
        "{}",
        lines[0]
    );
    let pid = place.daemon_pid();
    let out = run(Command::new("umount").arg(&place.mnt));
    assert!(out.status.success(), "umount: {}", text(&out));
    assert!(wait_gone(pid), "the daemon outlived umount");

    // An unknown option fails the mount with its name, and nothing is mounted.
    let out = run(Command::new("mount")
        .args(["-t", "fuse.artifactfs", &server.url()])
        .arg(&place.mnt)
        .args(["-o", "cache_dir=/tmp/x,metadata_tll=5m"]));
    assert!(!out.status.success());
    assert!(text(&out).contains("unknown option \"metadata_tll\""), "{}", text(&out));
    assert!(!is_mounted(&place.mnt));
}

#[test]
fn without_the_helper_link_fuse3s_mount_fuse_runs_artifactfs_from_the_path() {
    if !is_root() || !Path::new("/sbin/mount.fuse").exists() {
        eprintln!("skipped: needs root and fuse3's /sbin/mount.fuse");
        return;
    }
    let _one = SYSTEM.lock().unwrap_or_else(|e| e.into_inner());
    if std::fs::symlink_metadata(HELPER).is_ok() {
        eprintln!("skipped: {HELPER} is installed, so mount(8) uses it");
        return;
    }
    let Some(_link) = Link::place(ON_PATH) else {
        eprintln!("skipped: {ON_PATH} exists and is not a link to this build");
        return;
    };
    let store = Store::new();
    let data = bytes(MIB + 5, 3);
    store.write("a/b.bin", &data);
    let server = store.serve();
    let place = Place::new();
    // mount.fuse adds dev,suid; the daemon mounts nodev,nosuid all the same.
    let opts = format!("cache_dir={},read_only", place.cache.display());
    let out = run(Command::new("mount")
        .args(["-t", "fuse.artifactfs", &server.url()])
        .arg(&place.mnt)
        .args(["-o", &opts]));
    assert!(out.status.success(), "mount: {}", text(&out));
    assert_eq!(hash_file(&place.mnt.join("a/b.bin")).unwrap(), hash(&data));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == place.mnt.to_str())
        .unwrap();
    assert!(
        line.contains("ro,nosuid,nodev") && line.contains(" fuse.artifactfs "),
        "{line}"
    );
    let pid = place.daemon_pid();
    let out = run(Command::new("umount").arg(&place.mnt));
    assert!(out.status.success(), "umount: {}", text(&out));
    assert!(wait_gone(pid), "the daemon outlived umount");
}
