//! The local state of one file being written: its bytes written locally (in a sparse file of
//! the cache directory's write area, at their own offsets), which ranges those are, its size,
//! and which remote version its changes apply to. Pure bookkeeping plus the staging file; the
//! decision of how to send the changes is `plan`, the sending is `upload`.
//!
//! The content of the file at offset `x` is, in this order: the local bytes when `x` was
//! written locally; else the base's bytes when `x < layer_limit`; else zero (a hole left by a
//! truncation and extension).

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::dirty::RangeSet;
use crate::store::ETag;

/// Everything of a [`Staged`] but its open file: what the write-back journal records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedState {
    pub overlay: Vec<(u64, u64)>,
    pub layer_limit: u64,
    pub size: u64,
    /// ETag (as the remote sent it) and size of the version the changes apply to.
    pub remote: Option<(String, u64)>,
    pub unsent: Vec<(u64, u64)>,
    pub unsent_keep: u64,
    pub changed: bool,
}

/// A version on the remote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteVersion {
    pub etag: ETag,
    pub size: u64,
}

#[derive(Debug)]
pub struct Staged {
    file: File,
    path: PathBuf,
    /// Everything written locally since the file was opened (read through it).
    overlay: RangeSet,
    /// Bytes `[0, layer_limit)` not in `overlay` are the base's (the version opened, whose
    /// bytes equal those of every version uploaded since, outside `overlay`).
    layer_limit: u64,
    size: u64,
    /// The version on the remote the next upload replaces (`None`: the file does not exist
    /// there yet).
    remote: Option<RemoteVersion>,
    /// Written since the last upload.
    unsent: RangeSet,
    /// Bytes `[0, unsent_keep)` of `remote` are unchanged since the last upload (outside
    /// `unsent`).
    unsent_keep: u64,
    /// Something changed since the last upload (writes, truncations, creation).
    changed: bool,
    /// Do not delete the staging file on drop.
    keep: std::sync::atomic::AtomicBool,
}

impl Staged {
    /// A new file, not on the remote yet.
    pub fn create(path: PathBuf) -> io::Result<Staged> {
        Self::new(path, None, true)
    }

    /// Changes to the existing `remote` version.
    pub fn modify(path: PathBuf, remote: RemoteVersion) -> io::Result<Staged> {
        Self::new(path, Some(remote), false)
    }

    fn new(path: PathBuf, remote: Option<RemoteVersion>, changed: bool) -> io::Result<Staged> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        let size = remote.as_ref().map_or(0, |r| r.size);
        // As long as the content, holes where nothing was written: the journal checks the
        // length when it reopens the file.
        file.set_len(size)?;
        Ok(Staged {
            file,
            path,
            overlay: RangeSet::new(),
            layer_limit: size,
            size,
            unsent_keep: size,
            remote,
            unsent: RangeSet::new(),
            changed,
            keep: Default::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn remote(&self) -> Option<&RemoteVersion> {
        self.remote.as_ref()
    }

    pub fn layer_limit(&self) -> u64 {
        self.layer_limit
    }

    /// Whether there is anything to upload.
    pub fn is_changed(&self) -> bool {
        self.changed
    }

    pub fn unsent(&self) -> &RangeSet {
        &self.unsent
    }

    pub fn unsent_keep(&self) -> u64 {
        self.unsent_keep
    }

    pub fn overlay(&self) -> &RangeSet {
        &self.overlay
    }

    /// How far the bytes written since the last upload run without a gap from offset 0 (the
    /// kernel's writes of one sequential writer can arrive out of order).
    pub fn unsent_prefix(&self) -> u64 {
        match self.unsent.ranges().next() {
            Some(r) if r.start == 0 => r.end,
            _ => 0,
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(data, offset)?;
        let r = offset..offset + data.len() as u64;
        self.overlay.insert(r.clone());
        self.unsent.insert(r.clone());
        self.size = self.size.max(r.end);
        self.changed = true;
        Ok(())
    }

    pub fn truncate(&mut self, size: u64) -> io::Result<()> {
        if size == self.size {
            return Ok(());
        }
        if size < self.size {
            self.overlay.truncate(size);
            self.unsent.truncate(size);
            self.layer_limit = self.layer_limit.min(size);
            self.unsent_keep = self.unsent_keep.min(size);
        }
        self.file.set_len(size)?;
        self.size = size;
        self.changed = true;
        Ok(())
    }

    /// The pieces of `range` (within the size): local bytes, base bytes, or zeros.
    pub fn layers(&self, range: Range<u64>) -> Vec<(Range<u64>, Layer)> {
        let range = range.start.min(self.size)..range.end.min(self.size);
        let mut out = Vec::new();
        for (r, local) in self.overlay.split(range) {
            if local {
                out.push((r, Layer::Local));
                continue;
            }
            if r.start < self.layer_limit {
                let mid = r.end.min(self.layer_limit);
                out.push((r.start..mid, Layer::Base));
                if mid < r.end {
                    out.push((mid..r.end, Layer::Zero));
                }
            } else {
                out.push((r, Layer::Zero));
            }
        }
        out
    }

    /// Local bytes of `range` without copying them (see [`map_range`]).
    pub fn local_bytes(&self, range: Range<u64>) -> io::Result<bytes::Bytes> {
        map_range(&self.file, range)
    }

    /// Reads local bytes (a range `layers` called `Local`).
    pub fn read_local(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// The changes are on the remote as version `now`.
    pub fn uploaded(&mut self, now: RemoteVersion) {
        self.unsent = RangeSet::new();
        self.unsent_keep = now.size;
        self.remote = Some(now);
        self.changed = false;
    }

    /// The state to record in the journal (the bytes are in [`Staged::path`]).
    pub fn state(&self) -> StagedState {
        let pairs = |r: &RangeSet| r.ranges().map(|r| (r.start, r.end)).collect();
        StagedState {
            overlay: pairs(&self.overlay),
            layer_limit: self.layer_limit,
            size: self.size,
            remote: self.remote.as_ref().map(|r| (r.etag.as_str().to_string(), r.size)),
            unsent: pairs(&self.unsent),
            unsent_keep: self.unsent_keep,
            changed: self.changed,
        }
    }

    /// Reopens a staging file the journal recorded.
    pub fn restore(path: PathBuf, st: &StagedState) -> io::Result<Staged> {
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let len = file.metadata()?.len();
        // Shorter is fine when every byte written locally is there (earlier versions did not
        // extend the file of a change to a remote file to its size); longer, the bytes past
        // the size were written after the record, and are not part of it.
        let written_end = st.overlay.iter().map(|&(_, b)| b).max().unwrap_or(0);
        if len < written_end.min(st.size) {
            return Err(io::Error::other(format!(
                "{}: {len} bytes, the journal says {}",
                path.display(),
                st.size
            )));
        }
        if len != st.size {
            file.set_len(st.size)?;
        }
        let set = |v: &[(u64, u64)]| {
            let mut r = RangeSet::new();
            for &(a, b) in v {
                r.insert(a..b);
            }
            r
        };
        Ok(Staged {
            file,
            path,
            overlay: set(&st.overlay),
            layer_limit: st.layer_limit,
            size: st.size,
            remote: st.remote.as_ref().map(|(e, size)| RemoteVersion {
                etag: ETag::new(e),
                size: *size,
            }),
            unsent: set(&st.unsent),
            unsent_keep: st.unsent_keep,
            changed: st.changed,
            keep: Default::default(),
        })
    }

    /// Makes the local bytes durable (before the journal says they exist).
    pub fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Whether the staging file stays when this is dropped (its journal entry still needs it).
    pub fn keep_file(&self, keep: bool) {
        self.keep.store(keep, std::sync::atomic::Ordering::Relaxed);
    }

    /// A file not uploaded yet was renamed over `remote`: its upload replaces that version
    /// (whose bytes are not part of this file).
    pub fn replace_remote(&mut self, remote: Option<RemoteVersion>) {
        self.remote = remote;
        self.unsent_keep = 0;
        self.unsent.insert(0..self.size);
        self.changed = true;
    }
}

/// The bytes of `range` of `file`, mapped rather than copied (the pages are the page cache's).
/// The caller must not change that range of the file while the bytes are in use.
pub fn map_range(file: &File, range: Range<u64>) -> io::Result<bytes::Bytes> {
    if range.is_empty() {
        return Ok(bytes::Bytes::new());
    }
    // SAFETY: sysconf cannot fail for _SC_PAGESIZE.
    let page = (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as u64;
    let start = range.start / page * page;
    let skip = (range.start - start) as usize;
    // SAFETY: a read-only private view of the file; the caller keeps the range unchanged
    // while the bytes are used (a stream stops, and its parts are dropped, on any write to a
    // range it sent).
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(start)
            .len(skip + (range.end - range.start) as usize)
            .map(file)?
    };
    Ok(bytes::Bytes::from_owner(map).slice(skip..))
}

/// Where the bytes of a piece of the file come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// Written locally (in the staging file).
    Local,
    /// The base version (the cache, or the remote).
    Base,
    /// A hole.
    Zero,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.keep.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(size: u64) -> RemoteVersion {
        RemoteVersion {
            etag: ETag::new("\"b\""),
            size,
        }
    }

    #[test]
    fn writes_truncations_and_extensions_make_layers() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Staged::modify(d.path().join("s"), remote(100)).unwrap();
        assert!(!s.is_changed());
        assert_eq!(s.layers(0..100), vec![(0..100, Layer::Base)]);
        s.write(10, b"abc").unwrap();
        s.truncate(50).unwrap();
        s.truncate(80).unwrap();
        s.write(60, b"xy").unwrap();
        assert_eq!(s.size(), 80);
        assert_eq!(
            s.layers(0..200),
            vec![
                (0..10, Layer::Base),
                (10..13, Layer::Local),
                (13..50, Layer::Base),
                (50..60, Layer::Zero),
                (60..62, Layer::Local),
                (62..80, Layer::Zero),
            ]
        );
        let mut b = [0u8; 3];
        s.read_local(10, &mut b).unwrap();
        assert_eq!(&b, b"abc");
        assert!(s.is_changed());
        assert_eq!(s.unsent_keep(), 50);
        s.uploaded(remote(80));
        assert!(!s.is_changed() && s.unsent().is_empty());
        assert_eq!(s.unsent_keep(), 80);
        // The read layers do not change with an upload.
        assert_eq!(s.layers(60..62), vec![(60..62, Layer::Local)]);
    }

    #[test]
    fn the_recorded_state_restores_the_same_layers() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        let mut s = Staged::modify(p.clone(), remote(100)).unwrap();
        s.write(10, b"abc").unwrap();
        s.truncate(50).unwrap();
        s.write(70, b"z").unwrap();
        s.sync_data().unwrap();
        let st = s.state();
        s.keep_file(true);
        let layers = s.layers(0..100);
        drop(s);
        let r = Staged::restore(p, &st).unwrap();
        assert_eq!(r.layers(0..100), layers);
        assert_eq!(r.state(), st);
        let mut b = [0u8; 3];
        r.read_local(10, &mut b).unwrap();
        assert_eq!(&b, b"abc");
    }

    #[test]
    fn a_new_file_is_changed_and_its_staging_file_goes_with_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("n");
        let s = Staged::create(p.clone()).unwrap();
        assert!(s.is_changed() && s.remote().is_none());
        assert_eq!(s.layers(0..10), vec![]);
        drop(s);
        assert!(!p.exists());
    }
}
