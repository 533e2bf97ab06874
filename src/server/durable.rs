//! The durable file operations every write is built from: the state folders (`tmp`,
//! `journal`, `uploads`), temporary files that become a target by an atomic rename (with a
//! hidden temporary beside the target when the state folder is on another filesystem),
//! `fsync` of files and folders, in-kernel copies (`copy_file_range`), and streaming a request
//! body into a file.
//!
//! Owns the order "write, fsync the file, rename, fsync the folder"; does not know what a
//! write means (`writes.rs`, `uploads.rs`) nor how it is journaled (`journal.rs`).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use futures_util::StreamExt;

use super::error::ServerError;
use super::paths::HIDDEN_TEMP_PREFIX;
use super::stats::Stats;

/// Frames of a request body queued between the network and the blocking writer.
const BODY_QUEUE: usize = 8;
/// Buffer of the copy fallback when `copy_file_range` cannot be used.
const COPY_BUF: usize = 1 << 20;

/// The folders under the state folder that writes use.
#[derive(Debug)]
pub struct StateDirs {
    pub tmp: PathBuf,
    pub journal: PathBuf,
    pub uploads: PathBuf,
    tmp_dev: u64,
}

impl StateDirs {
    /// Creates the folders; leftovers in `tmp` and `uploads` (a previous run's unfinished
    /// writes and sessions) are removed. The journal is left for replay.
    pub fn prepare(state_dir: &Path) -> io::Result<StateDirs> {
        let tmp = state_dir.join("tmp");
        let journal = state_dir.join("journal");
        let uploads = state_dir.join("uploads");
        for d in [&tmp, &uploads] {
            if d.exists() {
                std::fs::remove_dir_all(d)?;
            }
        }
        for d in [&tmp, &journal, &uploads] {
            std::fs::create_dir_all(d)?;
        }
        let tmp_dev = std::fs::metadata(&tmp)?.dev();
        Ok(StateDirs {
            tmp,
            journal,
            uploads,
            tmp_dev,
        })
    }

    /// A new temporary file that will become a file in `parent`: in `tmp` when that is on the
    /// same filesystem (so the final rename is atomic), else hidden beside the target.
    pub fn temp_for(&self, parent: &Path) -> io::Result<TempFile> {
        if std::fs::metadata(parent)?.dev() == self.tmp_dev {
            TempFile::create_in(&self.tmp, "")
        } else {
            TempFile::create_in(parent, HIDDEN_TEMP_PREFIX)
        }
    }
}

/// A new temporary file that will become a file in `parent`: in `dir` (a folder of the state
/// folder) named `prefix…` when both are on the same filesystem, else hidden beside the target.
pub fn temp_in_or_beside(dir: &Path, prefix: &str, parent: &Path) -> io::Result<TempFile> {
    if std::fs::metadata(parent)?.dev() == std::fs::metadata(dir)?.dev() {
        TempFile::create_in(dir, prefix)
    } else {
        TempFile::create_in(parent, HIDDEN_TEMP_PREFIX)
    }
}

/// A name no other file of this process uses.
pub fn unique_name(prefix: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
}

/// Creates a file that must not exist yet, readable and writable.
pub fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// A temporary file, removed on drop unless it was renamed over its target.
#[derive(Debug)]
pub struct TempFile {
    pub path: PathBuf,
    pub file: File,
    persisted: bool,
}

impl TempFile {
    pub fn create_in(dir: &Path, prefix: &str) -> io::Result<TempFile> {
        loop {
            let path = dir.join(unique_name(prefix));
            match create_new(&path) {
                Ok(file) => {
                    return Ok(TempFile {
                        path,
                        file,
                        persisted: false,
                    });
                }
                // A leftover of an earlier process with the same pid.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The file was moved away by the caller: do not remove it on drop.
    pub fn disarm(&mut self) {
        self.persisted = true;
    }

    /// fsync, rename over `target`, fsync the target's folder. When the rename crosses
    /// filesystems (EXDEV: a folder under the root is another mount), the bytes are copied
    /// into a hidden temporary beside the target first. Returns the renamed file, open.
    pub fn persist(mut self, target: &Path) -> io::Result<File> {
        self.file.sync_all()?;
        let parent = target
            .parent()
            .ok_or_else(|| io::Error::other("target has no parent"))?;
        match std::fs::rename(&self.path, target) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                let beside = TempFile::create_in(parent, HIDDEN_TEMP_PREFIX)?;
                let len = self.file.metadata()?.len();
                copy_range(&self.file, 0, &beside.file, 0, len)?;
                return beside.persist(target);
            }
            Err(e) => return Err(e),
        }
        self.persisted = true;
        fsync_dir(parent)?;
        let file = self.file.try_clone()?;
        Ok(file)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Copies `len` bytes from `src` at `src_off` to `dst` at `dst_off`, in the kernel when it
/// can (`copy_file_range`), else through a buffer. A source shorter than `len` is an error.
pub fn copy_range(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64) -> io::Result<()> {
    let (mut done, mut kernel) = (0u64, true);
    let mut buf = Vec::new();
    while done < len {
        let want = len - done;
        if kernel {
            let mut off_in = (src_off + done) as libc::loff_t;
            let mut off_out = (dst_off + done) as libc::loff_t;
            // SAFETY: both descriptors are open for the duration of the call, and the offset
            // pointers are to locals.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    want.min(1 << 30) as usize,
                    0,
                )
            };
            if n > 0 {
                done += n as u64;
                continue;
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "source shorter than the copy",
                ));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP | libc::EPERM) => {
                    kernel = false;
                    continue;
                }
                _ => return Err(e),
            }
        }
        buf.resize(want.min(COPY_BUF as u64) as usize, 0);
        let got = super::digests::read_full_at(src, &mut buf, src_off + done)?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "source shorter than the copy",
            ));
        }
        dst.write_all_at(&buf[..got], dst_off + done)?;
        done += got as u64;
    }
    Ok(())
}

/// What a request body became once written to a file.
#[derive(Debug)]
pub struct Received {
    pub len: u64,
    /// Hex blake3 of the body.
    pub blake3: String,
}

/// Where the bytes of a request body go, frame by frame, on a blocking thread.
pub trait BodySink: Send + 'static {
    type Output: Send + 'static;
    /// Takes the next frame of the body.
    fn write(&mut self, frame: &[u8]) -> io::Result<()>;
    /// The whole body arrived and was written. A sink that is dropped without `finish` saw a
    /// body cut off, or a write fail.
    fn finish(self) -> Result<Self::Output, ServerError>;
}

/// Appends to a file from its current position, hashing the body.
struct FileSink {
    file: File,
    hasher: blake3::Hasher,
    len: u64,
}

impl BodySink for FileSink {
    type Output = Received;

    fn write(&mut self, frame: &[u8]) -> io::Result<()> {
        self.file.write_all(frame)?;
        self.hasher.update(frame);
        self.len += frame.len() as u64;
        Ok(())
    }

    fn finish(self) -> Result<Received, ServerError> {
        Ok(Received {
            len: self.len,
            blake3: self.hasher.finalize().to_hex().to_string(),
        })
    }
}

/// Streams a request body into `file` (from its current position) on a blocking thread,
/// counting the bytes in `bytes_received` as they arrive. The file is not fsynced here.
pub async fn body_to_file(body: Body, file: File, stats: &Stats) -> Result<Received, ServerError> {
    let sink = FileSink {
        file,
        hasher: blake3::Hasher::new(),
        len: 0,
    };
    body_to_sink(body, sink, stats).await
}

/// Streams a request body into `sink` on a blocking thread, counting the bytes in
/// `bytes_received` as they arrive. The sink is finished only when the whole body arrived and
/// every frame was written; otherwise it is dropped (on the blocking thread, after its last
/// write), and the body's or the write's error is returned.
pub async fn body_to_sink<S: BodySink>(body: Body, sink: S, stats: &Stats) -> Result<S::Output, ServerError> {
    // `None` marks the end of a body that arrived whole.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<bytes::Bytes>>(BODY_QUEUE);
    let writer = tokio::task::spawn_blocking(move || -> Result<Option<S::Output>, ServerError> {
        let mut sink = sink;
        while let Some(frame) = rx.blocking_recv() {
            match frame {
                Some(frame) => sink.write(&frame).map_err(|source| ServerError::Io {
                    context: "writing the request body".into(),
                    source,
                })?,
                None => return sink.finish().map(Some),
            }
        }
        Ok(None)
    });
    let mut stream = body.into_data_stream();
    let mut failed = None;
    loop {
        match stream.next().await {
            Some(Ok(bytes)) => {
                stats.add_bytes_received(bytes.len() as u64);
                if tx.send(Some(bytes)).await.is_err() {
                    // The writer stopped: its error is reported below.
                    break;
                }
            }
            Some(Err(e)) => {
                failed = Some(ServerError::BadRequest(format!("reading the request body: {e}")));
                break;
            }
            None => {
                let _ = tx.send(None).await;
                break;
            }
        }
    }
    drop(tx);
    let written = writer.await.map_err(|e| ServerError::Internal(e.to_string()))?;
    match (failed, written) {
        (Some(e), _) => Err(e),
        (None, Ok(Some(out))) => Ok(out),
        (None, Ok(None)) => Err(ServerError::Internal("the body writer stopped early".into())),
        (None, Err(e)) => Err(e),
    }
}

/// Reads a small request body (JSON) whole; larger than `limit` is a `400`.
pub async fn small_body(body: Body, limit: usize) -> Result<bytes::Bytes, ServerError> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|e| ServerError::BadRequest(format!("request body (at most {limit} bytes): {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_files_vanish_unless_persisted_and_copies_are_exact() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = StateDirs::prepare(&tmp.path().join("state")).unwrap();
        let t = dirs.temp_for(tmp.path()).unwrap();
        let p = t.path.clone();
        assert!(p.starts_with(&dirs.tmp));
        drop(t);
        assert!(!p.exists());

        let t = dirs.temp_for(tmp.path()).unwrap();
        t.file.write_all_at(b"hello world", 0).unwrap();
        let target = tmp.path().join("target");
        let f = t.persist(&target).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"hello world");
        assert_eq!(f.metadata().unwrap().ino(), std::fs::metadata(&target).unwrap().ino());

        let dst = TempFile::create_in(tmp.path(), "x").unwrap();
        copy_range(&f, 6, &dst.file, 2, 5).unwrap();
        assert_eq!(std::fs::read(&dst.path).unwrap(), b"\0\0world");
        assert!(copy_range(&f, 6, &dst.file, 0, 50).is_err());

        // Leftovers of a previous run are cleared, the journal is kept.
        std::fs::write(dirs.tmp.join("old"), b"x").unwrap();
        std::fs::write(dirs.journal.join("rec"), b"x").unwrap();
        let again = StateDirs::prepare(&tmp.path().join("state")).unwrap();
        assert!(!again.tmp.join("old").exists());
        assert!(again.journal.join("rec").exists());
    }

    #[test]
    fn a_state_folder_on_another_filesystem_puts_temporaries_beside_the_target() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            return;
        }
        let state = tempfile::tempdir_in(shm).unwrap();
        let root = tempfile::tempdir().unwrap();
        if std::fs::metadata(state.path()).unwrap().dev() == std::fs::metadata(root.path()).unwrap().dev() {
            return;
        }
        let dirs = StateDirs::prepare(state.path()).unwrap();
        let t = dirs.temp_for(root.path()).unwrap();
        assert!(t.path.starts_with(root.path()));
        assert!(super::super::paths::is_hidden_temp(&t.path));
        t.file.write_all_at(b"x", 0).unwrap();
        t.persist(&root.path().join("f")).unwrap();
        // A temp in the state folder renamed across filesystems falls back to a copy.
        let across = TempFile::create_in(&dirs.tmp, "").unwrap();
        across.file.write_all_at(b"across", 0).unwrap();
        across.persist(&root.path().join("g")).unwrap();
        assert_eq!(std::fs::read(root.path().join("g")).unwrap(), b"across");
        let names: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
