//! `artifactfs unmount`, and the unmount a daemon does on SIGINT/SIGTERM.
//!
//! An unmount never hangs on open files: when the kernel says the mount is busy, the mount
//! point is detached (lazy unmount, so it is free at once), the daemon keeps serving the files
//! still open until they are closed or the timeout passes, then stops, which cuts them off.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::UnmountArgs;
use super::daemon::is_alive;
use super::registry;

pub fn run(a: UnmountArgs) -> Result<(), String> {
    let mnt = std::path::absolute(&a.mountpoint).map_err(|e| format!("{}: {e}", a.mountpoint.display()))?;
    if !is_mounted(&mnt) {
        return Err(format!("{} is not mounted", mnt.display()));
    }
    let rec = registry::find(&mnt);
    let timeout = a
        .timeout
        .or(rec.as_ref().map(|r| Duration::from_millis(r.unmount_timeout_ms)))
        .unwrap_or(Duration::from_secs(10));
    let lazy = detach(&mnt)?;
    let Some(rec) = rec else {
        return Ok(());
    };
    if lazy {
        eprintln!(
            "artifactfs: {} is busy (files open); detached it, waiting up to {timeout:?} for them to be closed",
            mnt.display()
        );
    }
    // A write-back mount sends what its journal holds before it exits (within its own
    // unmount timeout): show it, and give it that time.
    let pending = journal_entries(&rec.cache_dir);
    let wait = if pending > 0 { timeout * 2 } else { timeout };
    if wait_exit_showing(rec.pid, wait, &rec.cache_dir, pending) {
        return Ok(());
    }
    // Files still open after the timeout: stop the daemon, which cuts them off.
    // SAFETY: plain syscall.
    unsafe { libc::kill(rec.pid as i32, libc::SIGTERM) };
    if wait_exit(rec.pid, Duration::from_secs(5)) {
        return Ok(());
    }
    // SAFETY: plain syscall.
    unsafe { libc::kill(rec.pid as i32, libc::SIGKILL) };
    if wait_exit(rec.pid, Duration::from_secs(2)) {
        registry::remove(&mnt);
        return Ok(());
    }
    Err(format!(
        "the daemon (pid {}) of {} does not stop",
        rec.pid,
        mnt.display()
    ))
}

/// Write-back journal records waiting in a cache directory.
fn journal_entries(cache_dir: &Path) -> u64 {
    std::fs::read_dir(cache_dir.join("pending"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().extension().and_then(|x| x.to_str()) == Some("json"))
                .count() as u64
        })
        .unwrap_or(0)
}

/// Waits for the daemon to exit; with pending uploads, shows them going (on a terminal).
fn wait_exit_showing(pid: u32, timeout: Duration, cache_dir: &Path, pending: u64) -> bool {
    if pending == 0 {
        return wait_exit(pid, timeout);
    }
    let bar = indicatif::ProgressBar::new(pending);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} sending pending uploads {pos}/{len} [{elapsed}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let end = Instant::now() + timeout;
    while is_alive(pid) {
        bar.set_position(pending.saturating_sub(journal_entries(cache_dir)));
        if Instant::now() >= end {
            bar.abandon();
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = journal_entries(cache_dir);
    bar.set_position(pending.saturating_sub(left));
    bar.finish();
    if left > 0 {
        eprintln!("artifactfs: {left} uploads could not be sent; they stay journaled and go at the next mount");
    }
    true
}

fn wait_exit(pid: u32, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while is_alive(pid) {
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Unmounts `mnt`; when it is busy, detaches it instead. Returns whether it was detached
/// lazily (files are still open on it).
pub fn detach(mnt: &Path) -> Result<bool, String> {
    match umount(mnt, false) {
        Ok(()) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            umount(mnt, true).map_err(|e| format!("cannot detach {}: {e}", mnt.display()))?;
            Ok(true)
        }
        Err(e) => Err(format!("cannot unmount {}: {e}", mnt.display())),
    }
}

fn umount(mnt: &Path, lazy: bool) -> io::Result<()> {
    let c = CString::new(mnt.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EPERM) {
        return Err(e);
    }
    // Not root: the setuid helper may unmount what this user mounted.
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd.arg(mnt).output()?;
    if out.status.success() {
        return Ok(());
    }
    let msg = String::from_utf8_lossy(&out.stderr);
    if msg.contains("busy") {
        return Err(io::Error::from_raw_os_error(libc::EBUSY));
    }
    Err(io::Error::other(msg.trim().to_string()))
}

/// One line of `/proc/self/mountinfo` for `mnt`: (major:minor, filesystem type).
pub fn mount_entry(mnt: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let point = unescape(fields.get(4)?);
        if Path::new(&point) != mnt {
            return None;
        }
        let sep = fields.iter().position(|f| *f == "-")?;
        Some((fields.get(2)?.to_string(), fields.get(sep + 1)?.to_string()))
    })
}

pub fn is_mounted(mnt: &Path) -> bool {
    mount_entry(mnt).is_some()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape(r"/tmp/a\040b"), PathBuf::from("/tmp/a b"));
        assert_eq!(unescape(r"/x\134y"), PathBuf::from(r"/x\y"));
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn the_root_is_mounted_and_a_temp_dir_is_not() {
        assert!(is_mounted(Path::new("/")));
        let d = tempfile::tempdir().unwrap();
        assert!(!is_mounted(d.path()));
    }
}
