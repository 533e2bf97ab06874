//! Warm-up: fetching whole files into the cache ahead of their readers (`artifactfs warm`).
//!
//! Paths are resolved on the remote (a folder stands for every file below it), in the order
//! given, which is the priority order: files start in that order, a few at a time. Each file
//! is fetched in windows, so a warm-up never holds more than a few of the remote's request
//! slots and readers of other files keep getting theirs. A file that fails is reported and
//! the others go on.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::Serialize;

use super::{Ahead, ReadError, Reader, Version};
use crate::store::{ETag, EntryKind, Head, Revalidated, StoreError, join_path};

/// Files fetched at once.
const FILES_AT_ONCE: usize = 4;

/// Bytes of one file asked for at once (a few requests' worth).
const WINDOW: u64 = 32 << 20;

/// One file of a warm-up, and how far it got.
#[derive(Debug)]
pub struct WarmFile {
    pub path: String,
    pub size: u64,
    etag: Option<ETag>,
    done: AtomicU64,
    finished: AtomicBool,
    error: Mutex<Option<String>>,
}

/// What a client is shown of one file.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct FileProgress {
    pub path: String,
    pub size: u64,
    pub done: u64,
    pub finished: bool,
    pub error: Option<String>,
}

/// A warm-up in progress: its files, and paths that named nothing.
#[derive(Debug, Default)]
pub struct Warm {
    pub files: Vec<Arc<WarmFile>>,
    /// Paths given that could not be resolved, with the reason.
    pub unresolved: Vec<(String, String)>,
}

impl Warm {
    pub fn progress(&self) -> Vec<FileProgress> {
        self.files
            .iter()
            .map(|f| FileProgress {
                path: f.path.clone(),
                size: f.size,
                done: f.done.load(Ordering::Relaxed),
                finished: f.finished.load(Ordering::Acquire),
                error: f.error.lock().clone(),
            })
            .chain(self.unresolved.iter().map(|(p, e)| FileProgress {
                path: p.clone(),
                size: 0,
                done: 0,
                finished: true,
                error: Some(e.clone()),
            }))
            .collect()
    }
}

/// Resolves `paths` (relative to the remote's root; `""` is the root) to the files to fetch,
/// in order, each once.
pub async fn resolve(reader: &Reader, paths: &[String]) -> Warm {
    let mut warm = Warm::default();
    let mut seen = std::collections::HashSet::new();
    for p in paths {
        let p = p.trim_matches('/').to_string();
        let found = if p.is_empty() {
            Ok(Revalidated::Modified(Head::Dir {
                mtime: std::time::SystemTime::UNIX_EPOCH,
            }))
        } else {
            reader.store().head(&p, None).await
        };
        match found {
            Ok(Revalidated::Modified(Head::File(m))) => {
                if seen.insert(p.clone()) {
                    warm.files.push(file(p, m.size, m.etag));
                }
            }
            Ok(Revalidated::Modified(Head::Dir { .. })) => {
                if let Err(e) = walk(reader, &p, &mut warm, &mut seen).await {
                    warm.unresolved.push((p, e.to_string()));
                }
            }
            Ok(Revalidated::NotModified) => unreachable!("no validator was sent"),
            Err(StoreError::NotFound) => warm.unresolved.push((p, "no such file or folder".into())),
            Err(e) => warm.unresolved.push((p, e.to_string())),
        }
    }
    warm
}

fn file(path: String, size: u64, etag: Option<ETag>) -> Arc<WarmFile> {
    Arc::new(WarmFile {
        path,
        size,
        etag,
        done: AtomicU64::new(0),
        finished: AtomicBool::new(false),
        error: Mutex::new(None),
    })
}

/// Every file below `dir`, depth first, in name order.
async fn walk(
    reader: &Reader,
    dir: &str,
    warm: &mut Warm,
    seen: &mut std::collections::HashSet<String>,
) -> Result<(), StoreError> {
    let mut todo = VecDeque::from([dir.to_string()]);
    while let Some(d) = todo.pop_front() {
        let Revalidated::Modified(listing) = reader.store().list(&d, None).await? else {
            unreachable!("no validator was sent")
        };
        let mut entries = listing.entries;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let mut subdirs = Vec::new();
        for e in entries {
            let path = join_path(&d, &e.name);
            match e.kind {
                EntryKind::Dir => subdirs.push(path),
                EntryKind::File => {
                    if seen.insert(path.clone()) {
                        warm.files.push(file(path, e.size, e.etag));
                    }
                }
            }
        }
        // Depth first: a folder's subfolders come before its next sibling folder.
        for s in subdirs.into_iter().rev() {
            todo.push_front(s);
        }
    }
    Ok(())
}

/// Fetches every file of `warm` into the cache; returns when all are done or failed.
pub async fn run(reader: Arc<Reader>, warm: Arc<Warm>) {
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..FILES_AT_ONCE.min(warm.files.len()))
        .map(|_| {
            let (reader, warm, next) = (reader.clone(), warm.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(f) = warm.files.get(i) else { return };
                    if let Err(e) = warm_one(&reader, f).await {
                        tracing::warn!(path = %f.path, "warm-up failed: {e}");
                        *f.error.lock() = Some(e.to_string());
                    }
                    f.finished.store(true, Ordering::Release);
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
}

async fn warm_one(reader: &Arc<Reader>, f: &WarmFile) -> Result<(), ReadError> {
    if f.size == 0 {
        return Ok(());
    }
    let v = match &f.etag {
        Some(t) => reader.open_version(&f.path, t, f.size),
        None => reader.open_current(&f.path, f.size).await?,
    };
    v.warm(|done| f.done.store(done, Ordering::Relaxed)).await
}

impl Version {
    /// Fetches every chunk of this version that the cache lacks, a window at a time, calling
    /// `progress` with the bytes present so far.
    pub async fn warm(self: &Arc<Self>, progress: impl Fn(u64)) -> Result<(), ReadError> {
        let Some(file) = self.file.clone() else {
            return Err(ReadError::Integrity("warming up needs the cache".into()));
        };
        let present = || (file.present_count() * file.chunk_size()).min(self.size);
        progress(present());
        let mut pos = 0;
        while pos < self.size {
            let end = (pos + WINDOW).min(self.size);
            let chunks = file.chunks_of(&(pos..end));
            if !chunks.clone().all(|i| file.is_present(i)) {
                self.start_flights(chunks, 0..0, Ahead::Bulk);
                self.ensure(&file, pos..end, false).await?;
            }
            progress(present());
            pos = end;
        }
        Ok(())
    }
}
