//! The redo journal of writes in place (`append`, `write`, `truncate`), in `<state>/journal/`.
//!
//! A record is two files: `<id>.data` (the bytes to write, empty for a truncation) and
//! `<id>.json` (what to do with them), and it counts once `<id>.json` exists. The order is:
//! bytes into `.data`, fsync; `.json` written beside, fsynced, renamed into place, folder
//! fsynced; then the change is applied to the target (`pwrite` of the bytes at `offset`, then
//! `set_len(new_size)`), the target fsynced, and the record removed (folder fsynced, so a
//! removed record never comes back after a crash). Applying a record is idempotent: it
//! carries the bytes and the size the file must end with, so a server that crashed anywhere
//! in between redoes it at its next start, before serving. A record whose target is not the
//! same inode any more (replaced or removed since) is dropped unapplied.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::digests::Identity;
use super::durable::{TempFile, copy_range, create_new, fsync_dir, unique_name};

const RECORD_FORMAT: u32 = 1;

/// What one record asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub format: u32,
    /// The target relative to the served folder, as hex of its bytes (names need not be UTF-8).
    pub path_hex: String,
    /// The target's identity before the change.
    pub before: Identity,
    /// Where the bytes of `.data` go (ignored when `len` is 0).
    pub offset: u64,
    pub len: u64,
    /// Hex blake3 of the bytes, checked before they are applied.
    pub blake3: String,
    /// The size the file has after the change.
    pub new_size: u64,
}

impl Record {
    pub fn new(rel: &Path, before: Identity, offset: u64, len: u64, blake3: String, new_size: u64) -> Record {
        Record {
            format: RECORD_FORMAT,
            path_hex: hex::encode(rel.as_os_str().as_bytes()),
            before,
            offset,
            len,
            blake3,
            new_size,
        }
    }

    fn rel(&self) -> Option<PathBuf> {
        let bytes = hex::decode(&self.path_hex).ok()?;
        Some(PathBuf::from(std::ffi::OsStr::from_bytes(&bytes)))
    }
}

/// The journal folder.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

/// A record being written: its bytes go into `data` first.
#[derive(Debug)]
pub struct Pending {
    pub id: String,
    pub data: File,
}

impl Journal {
    pub fn new(dir: PathBuf) -> Journal {
        Journal { dir }
    }

    fn data_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.data"))
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Starts a record; the caller streams the bytes into `data`.
    pub fn begin(&self) -> io::Result<Pending> {
        loop {
            let id = unique_name("");
            match create_new(&self.data_path(&id)) {
                Ok(data) => return Ok(Pending { id, data }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Makes the record durable: from here on, a crash is followed by a redo.
    pub fn commit(&self, pending: &Pending, record: &Record) -> io::Result<()> {
        pending.data.sync_all()?;
        let json = serde_json::to_vec(record).map_err(io::Error::other)?;
        let mut tmp = TempFile::create_in(&self.dir, ".rec-")?;
        io::Write::write_all(&mut tmp.file, &json)?;
        tmp.persist(&self.record_path(&pending.id))?;
        Ok(())
    }

    /// Removes a record whose change is applied and fsynced.
    pub fn finish(&self, id: &str) -> io::Result<()> {
        std::fs::remove_file(self.record_path(id))?;
        let _ = std::fs::remove_file(self.data_path(id));
        fsync_dir(&self.dir)
    }

    /// Drops a record that was never committed (its bytes only).
    pub fn abandon(&self, pending: Pending) {
        drop(pending.data);
        let _ = std::fs::remove_file(self.data_path(&pending.id));
    }

    /// Redoes every committed record under `root` and removes all records; returns how many
    /// were applied. Called before the server serves.
    pub fn replay(&self, root: &Path) -> io::Result<usize> {
        let mut applied = 0;
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        names.sort();
        for path in &names {
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            match self.redo(root, id) {
                Ok(true) => applied += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(record = %path.display(), error = %e, "cannot redo a journal record"),
            }
            let _ = std::fs::remove_file(self.record_path(id));
        }
        // What is left: bytes of records never committed, and temporaries.
        for path in names {
            if path.extension().is_some_and(|e| e != "json") || path.extension().is_none() {
                let _ = std::fs::remove_file(path);
            }
        }
        fsync_dir(&self.dir)?;
        Ok(applied)
    }

    fn redo(&self, root: &Path, id: &str) -> io::Result<bool> {
        let record: Record = serde_json::from_slice(&std::fs::read(self.record_path(id))?).map_err(io::Error::other)?;
        let rel = record.rel().ok_or_else(|| io::Error::other("bad path in record"))?;
        let target = match open_target(&root.join(&rel)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(path = %rel.display(), "journaled file is gone; record dropped");
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        if Identity::of_file(&target)?.ino != record.before.ino {
            tracing::warn!(path = %rel.display(), "journaled file was replaced; record dropped");
            return Ok(false);
        }
        let data = File::open(self.data_path(id))?;
        if record.len > 0 {
            let mut bytes = vec![0u8; usize::try_from(record.len).map_err(io::Error::other)?];
            let got = super::digests::read_full_at(&data, &mut bytes, 0)?;
            if got != bytes.len() || blake3::hash(&bytes).to_hex().as_str() != record.blake3 {
                return Err(io::Error::other("record bytes do not match their hash"));
            }
        }
        apply(&target, &data, &record)?;
        tracing::info!(path = %rel.display(), offset = record.offset, len = record.len, new_size = record.new_size, "journal record redone");
        Ok(true)
    }
}

/// Opens a served file for writing in place.
pub fn open_target(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

/// Applies a record's change to `target` and fsyncs it; idempotent.
pub fn apply(target: &File, data: &File, record: &Record) -> io::Result<()> {
    if record.len > 0 {
        copy_range(data, 0, target, record.offset, record.len)?;
    }
    if target.metadata()?.len() != record.new_size {
        target.set_len(record.new_size)?;
    }
    target.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn replay_redoes_committed_records_once_and_drops_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let j = Journal::new(tmp.path().join("journal"));
        std::fs::create_dir(tmp.path().join("journal")).unwrap();
        std::fs::write(root.join("f"), b"hello").unwrap();
        std::fs::write(root.join("g"), b"0123456789").unwrap();
        let id_of = |p: &str| Identity::of(&std::fs::metadata(root.join(p)).unwrap());

        // An append whose record is committed but not applied.
        let mut p = j.begin().unwrap();
        p.data.write_all(b" world").unwrap();
        let hash = blake3::hash(b" world").to_hex().to_string();
        j.commit(&p, &Record::new(Path::new("f"), id_of("f"), 5, 6, hash.clone(), 11))
            .unwrap();
        // A truncation, committed.
        let t = j.begin().unwrap();
        j.commit(&t, &Record::new(Path::new("g"), id_of("g"), 0, 0, String::new(), 4))
            .unwrap();
        // A record never committed: its bytes only.
        let mut never = j.begin().unwrap();
        never.data.write_all(b"zzz").unwrap();
        drop(never);

        assert_eq!(j.replay(&root).unwrap(), 2);
        assert_eq!(std::fs::read(root.join("f")).unwrap(), b"hello world");
        assert_eq!(std::fs::read(root.join("g")).unwrap(), b"0123");
        assert_eq!(std::fs::read_dir(tmp.path().join("journal")).unwrap().count(), 0);

        // Redo is idempotent: applying the same append again changes nothing.
        let mut p = j.begin().unwrap();
        p.data.write_all(b" world").unwrap();
        let rec = Record::new(Path::new("f"), id_of("f"), 5, 6, hash, 11);
        j.commit(&p, &rec).unwrap();
        assert_eq!(j.replay(&root).unwrap(), 1);
        assert_eq!(std::fs::read(root.join("f")).unwrap(), b"hello world");

        // A replaced file is not touched.
        let mut p = j.begin().unwrap();
        p.data.write_all(b"XX").unwrap();
        let rec = Record::new(
            Path::new("f"),
            id_of("f"),
            0,
            2,
            blake3::hash(b"XX").to_hex().to_string(),
            11,
        );
        j.commit(&p, &rec).unwrap();
        // (created before the old file goes, so it cannot reuse its inode number)
        std::fs::write(root.join("f.new"), b"replaced!!!").unwrap();
        std::fs::rename(root.join("f.new"), root.join("f")).unwrap();
        assert_eq!(j.replay(&root).unwrap(), 0);
        assert_eq!(std::fs::read(root.join("f")).unwrap(), b"replaced!!!");
    }
}
