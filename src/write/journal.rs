//! The write-back journal: with `--write-back`, `close` and `fsync` return once a file's
//! changes are durable here, and uploads follow in the background. Each entry is the file's
//! staging file (its local bytes, at their offsets) plus a small JSON record beside it: where
//! the file goes on the remote and which version the changes apply to.
//!
//! Order of writes, so a crash at any point loses nothing `fsync` acknowledged: the staging
//! file is synced first, then the record is written to a temporary name, synced, renamed into
//! place, and the directory synced. The next mount of the same remote with the same cache
//! directory sends every recorded entry before it serves.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::staged::{Staged, StagedState};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The remote the file belongs to (`Store::id`).
    pub remote: String,
    /// The file's path on the remote.
    pub path: String,
    pub state: StagedState,
}

#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

/// The record file of a staging file.
fn record_path(data: &Path) -> PathBuf {
    data.with_extension("json")
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Journal {
    pub fn new(dir: PathBuf) -> Self {
        Journal { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes `staged`'s changes durable: after this returns they survive a crash, and its
    /// staging file stays when the `Staged` goes, until [`Journal::done`].
    pub fn record(&self, remote: &str, path: &str, staged: &Staged) -> io::Result<()> {
        staged.keep_file(true);
        staged.sync_data()?;
        let rec = Record {
            remote: remote.to_string(),
            path: path.to_string(),
            state: staged.state(),
        };
        let dest = record_path(staged.path());
        let tmp = dest.with_extension("json.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(&rec).map_err(io::Error::other)?)?;
        f.sync_all()?;
        fs::rename(&tmp, &dest)?;
        sync_dir(&self.dir)
    }

    /// The changes of `staged` reached the remote: its record goes (the staging file goes
    /// with the `Staged`).
    pub fn done(&self, staged: &Staged) {
        staged.keep_file(false);
        let p = record_path(staged.path());
        match fs::remove_file(&p) {
            Ok(()) => {
                let _ = sync_dir(&self.dir);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove {}: {e}", p.display()),
        }
    }

    /// Whether `staged` has a record.
    pub fn is_recorded(&self, staged: &Staged) -> bool {
        record_path(staged.path()).exists()
    }

    /// Every entry for `remote` a previous run left, reopened. Entries that cannot be read
    /// are reported and left in place.
    pub fn pending(&self, remote: &str) -> Vec<(Record, Staged)> {
        let mut out = Vec::new();
        let Ok(rd) = fs::read_dir(&self.dir) else { return out };
        let mut paths: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().and_then(|x| x.to_str()) == Some("json"))
            .collect();
        paths.sort();
        for p in paths {
            let rec: Record = match fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("journal entry {} unreadable, left in place: {e}", p.display());
                    continue;
                }
            };
            if rec.remote != remote {
                continue;
            }
            match Staged::restore(p.with_extension("data"), &rec.state) {
                Ok(s) => out.push((rec, s)),
                Err(e) => tracing::warn!("journal entry {} unusable, left in place: {e}", p.display()),
            }
        }
        out
    }

    /// Removes staging files no record needs (left by a crash before anything was fsync'd).
    pub fn clean_orphans(&self) {
        let Ok(rd) = fs::read_dir(&self.dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let is_data = name.starts_with("w-") && name.ends_with(".data");
            if (is_data && !record_path(&p).exists()) || name.ends_with(".json.tmp") {
                let _ = fs::remove_file(&p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ETag;
    use crate::write::staged::RemoteVersion;

    #[test]
    fn recorded_entries_come_back_after_a_crash() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::new(d.path().to_path_buf());
        let mut s = Staged::modify(
            d.path().join("w-1-1.data"),
            RemoteVersion {
                etag: ETag::new("\"base\""),
                size: 10,
            },
        )
        .unwrap();
        s.write(10, b"appended").unwrap();
        j.record("http://r", "dir/f", &s).unwrap();
        assert!(j.is_recorded(&s));
        // A crash: the process goes without dropping anything.
        std::mem::forget(s);
        let mut n = Staged::create(d.path().join("w-1-2.data")).unwrap();
        n.write(0, b"never fsync'd").unwrap();
        std::mem::forget(n);
        j.clean_orphans();
        assert!(!d.path().join("w-1-2.data").exists(), "no record: not needed");
        let mut back = j.pending("http://r");
        assert_eq!(back.len(), 1);
        let (rec, staged) = back.pop().unwrap();
        assert_eq!(rec.path, "dir/f");
        assert_eq!(staged.size(), 18);
        let mut b = [0u8; 8];
        staged.read_local(10, &mut b).unwrap();
        assert_eq!(&b, b"appended");
        assert!(j.pending("http://other").is_empty());
        j.done(&staged);
        drop(staged);
        assert!(j.pending("http://r").is_empty());
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_change_inside_a_remote_file_comes_back_after_a_crash() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::new(d.path().to_path_buf());
        let base = RemoteVersion {
            etag: ETag::new("\"base\""),
            size: 3 << 20,
        };
        let mut s = Staged::modify(d.path().join("w-1-1.data"), base.clone()).unwrap();
        s.write(100, b"inside").unwrap();
        j.record("http://r", "f", &s).unwrap();
        std::mem::forget(s);
        // As an earlier version left it: the file ends after the last byte written.
        let mut t = Staged::modify(d.path().join("w-1-2.data"), base).unwrap();
        t.write(200, b"short").unwrap();
        j.record("http://r", "g", &t).unwrap();
        std::mem::forget(t);
        File::options()
            .write(true)
            .open(d.path().join("w-1-2.data"))
            .unwrap()
            .set_len(205)
            .unwrap();
        let back = j.pending("http://r");
        assert_eq!(back.len(), 2, "both entries are usable");
        for ((rec, staged), (path, at, want)) in back.iter().zip([("f", 100, &b"inside"[..]), ("g", 200, b"short")]) {
            assert_eq!(rec.path, path);
            assert_eq!(staged.size(), 3 << 20);
            let mut b = vec![0u8; want.len()];
            staged.read_local(at, &mut b).unwrap();
            assert_eq!(b, want);
        }
    }
}
