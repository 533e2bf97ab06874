//! Where running mounts say who they are, so `artifactfs unmount MOUNTPOINT` can find the
//! daemon to stop: one small JSON file per mount point in the user's runtime directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountRecord {
    pub pid: u32,
    pub mountpoint: PathBuf,
    pub remote: String,
    pub cache_dir: PathBuf,
    pub unmount_timeout_ms: u64,
}

fn runtime_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("artifactfs");
    }
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        PathBuf::from("/run/artifactfs")
    } else {
        std::env::temp_dir().join(format!("artifactfs-{uid}"))
    }
}

fn record_path(mountpoint: &Path) -> PathBuf {
    let h = blake3::hash(mountpoint.as_os_str().as_encoded_bytes()).to_hex();
    runtime_dir().join("mounts").join(format!("{}.json", &h[..24]))
}

/// The control socket of the mount at `mountpoint` (see `control`).
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    record_path(mountpoint).with_extension("sock")
}

pub fn write(rec: &MountRecord) -> std::io::Result<()> {
    let p = record_path(&rec.mountpoint);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(rec).map_err(std::io::Error::other)?)?;
    std::fs::rename(tmp, p)
}

/// The record of a live daemon mounted at `mountpoint`, if any.
pub fn find(mountpoint: &Path) -> Option<MountRecord> {
    let rec: MountRecord = serde_json::from_slice(&std::fs::read(record_path(mountpoint)).ok()?).ok()?;
    crate::cli::daemon::is_alive(rec.pid).then_some(rec)
}

pub fn remove(mountpoint: &Path) {
    let _ = std::fs::remove_file(record_path(mountpoint));
    let _ = std::fs::remove_file(socket_path(mountpoint));
}
