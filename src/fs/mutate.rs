//! Changing the mount: files being written (their local state, reads through it, uploads at
//! `flush`/`fsync`/`release`), creation, truncation, removal, folders and renames.
//!
//! A file being written keeps its changes in a [`Staged`] file of the cache's write area; what
//! was not written is read from the version it started from. `close` and `fsync` return once
//! the remote holds the new version (see `docs/SEMANTICS.md`). Every upload is conditional on
//! the version it started from; a conflict keeps the local version in the cache directory.

use std::ffi::OsStr;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

use super::{ArtifactFs, Attr, Child, Entry, FileHandle, FsError, Inode, Kind, OpenReply, Table, ValidName, ino_hash};
use crate::read::{Lineage, Readahead, Version};
use crate::store::{WriteCondition, join_path};
use crate::write::staged::{Layer, RemoteVersion, Staged};
use crate::write::stream::{Streamer, mostly_known};
use crate::write::upload::{BaseSource, UploadError};

/// The local state of a file being written, shared by all its handles.
#[derive(Debug)]
pub(crate) struct LocalFile {
    pub(crate) state: tokio::sync::Mutex<LocalState>,
}

#[derive(Debug)]
pub(crate) struct LocalState {
    pub(crate) staged: Staged,
    /// Where the file is on the remote now (renames move it).
    pub(crate) path: String,
    /// The version read for bytes not written locally (rebased after each upload).
    pub(crate) base: Option<Arc<Version>>,
    /// The version the file was opened at, once uploads rebased `base`: the bytes not written
    /// locally are the same in both, and its cache already holds those that were read.
    pub(crate) opened: Option<Arc<Version>>,
    /// Removed while open: its changes are never sent.
    pub(crate) unlinked: bool,
    /// A conflict was found: later flushes report it again instead of uploading.
    pub(crate) conflict: Option<FsError>,
    /// Parts sent while the file is written (a file written from its start to its end).
    pub(crate) stream: Option<Streamer>,
    /// Streaming was ruled out for this file (a write out of order, content the remote
    /// holds, write-back mode).
    pub(crate) no_stream: bool,
}

impl LocalState {
    /// Whether the content is only what was written, from offset 0 to the end, with nothing
    /// kept of a remote version: what a stream can send.
    fn sequential(&self) -> bool {
        let s = &self.staged;
        let kept = s.remote().is_some() && s.unsent_keep() > 0;
        let mut ranges = s.unsent().ranges();
        let whole = match (ranges.next(), ranges.next()) {
            (Some(r), None) => r.start == 0 && r.end == s.size(),
            (None, None) => s.size() == 0,
            _ => false,
        };
        !kept && whole
    }

    /// Whether some bytes of a remote version are part of the content (then it is not all in
    /// the staging file, and cannot be streamed from it).
    fn keeps_remote(&self) -> bool {
        self.staged.remote().is_some() && self.staged.unsent_keep() > 0
    }

    /// Ends streaming for good (the session is given up; the file goes up at close).
    async fn stop_stream(&mut self) {
        self.no_stream = true;
        if let Some(s) = self.stream.take() {
            s.abort().await;
        }
    }
}

impl LocalState {
    /// The versions the base layer is read from, in order: the one the file was opened at
    /// (what was read is cached there), then the latest uploaded.
    fn base_versions(&self) -> Vec<&Arc<Version>> {
        self.opened.iter().chain(self.base.iter()).collect()
    }
}

/// Reads the base layer through the read engine (for whole-file uploads).
struct VersionSource<'a> {
    versions: Vec<&'a Arc<Version>>,
}

#[async_trait]
impl BaseSource for VersionSource<'_> {
    async fn read(&self, range: Range<u64>) -> Result<Bytes, String> {
        let ra = Mutex::new(Readahead::disabled());
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        read_base_into(&mut out, &self.versions, &ra, range)
            .await
            .map_err(|e| e.to_string())?;
        Ok(out.into())
    }
}

/// Appends `range` of the base layer to `out`, from the first of `versions` that still has
/// those bytes (an older version of ours whose remote copy is gone still serves what its
/// cache holds; the rest comes from the next).
async fn read_base_into(
    out: &mut Vec<u8>,
    versions: &[&Arc<Version>],
    ra: &Mutex<Readahead>,
    range: Range<u64>,
) -> Result<(), FsError> {
    let mut pos = range.start;
    for (k, v) in versions.iter().enumerate() {
        let last = k + 1 == versions.len();
        while pos < range.end {
            let n = (range.end - pos).min(1 << 20) as u32;
            let got = v
                .read(ra, pos, n, |r| {
                    r.map(|b| {
                        out.extend_from_slice(b);
                        b.len()
                    })
                })
                .await;
            match got {
                Ok(0) if !last => break,
                Ok(0) => return Err(FsError::Stale),
                Ok(n) => pos += n as u64,
                Err(crate::read::ReadError::Stale) if !last => break,
                Err(e) => return Err(FsError::read(&v.path, e)),
            }
        }
        if pos >= range.end {
            return Ok(());
        }
    }
    Err(FsError::Local("no base version to read from".into()))
}

/// Whether some cache holds every chunk of `range` of `v`.
fn cached(v: &Version, range: &Range<u64>) -> bool {
    v.cache_file()
        .is_some_and(|f| f.chunks_of(range).all(|i| f.is_present(i)))
}

/// Reads `range` of a version into memory, through the cache, without reading ahead.
pub(super) async fn read_all(v: &Arc<Version>, range: Range<u64>) -> Result<Bytes, FsError> {
    let ra = Mutex::new(Readahead::disabled());
    let mut out = Vec::with_capacity((range.end - range.start) as usize);
    read_base_into(&mut out, &[v], &ra, range).await?;
    Ok(out.into())
}

/// Files from this size have their page cache dropped at the last ordinary close once
/// complete (see `release_handle`): dropping 64 MiB of pages in an `open` costs about
/// 2.5 ms, far more than the attribute request the drop costs later.
const DROP_PAGES_MIN: u64 = 64 << 20;

impl ArtifactFs {
    fn writable(&self) -> Result<(), FsError> {
        if self.cfg.read_only {
            return Err(FsError::ReadOnly);
        }
        Ok(())
    }

    fn staging_path(&self) -> std::path::PathBuf {
        loop {
            let n = self.next_fh.fetch_add(1, Ordering::Relaxed);
            let p = self.cfg.staging_dir.join(format!("w-{}-{n}.data", std::process::id()));
            // Journal entries of an earlier run (whose pid may have been ours) stay until sent.
            if !p.exists() {
                return p;
            }
        }
    }

    /// The local state of file `ino`, made on first need from the version it holds.
    pub(super) async fn ensure_local(&self, ino: u64) -> Result<Arc<LocalFile>, FsError> {
        if let Some(l) = self.table.lock().inodes.get(&ino).and_then(|i| i.local.clone()) {
            return Ok(l);
        }
        let (path, etag, size) = self.file_version(ino).await?;
        let version = self.reader.open_version(&path, &etag, size);
        let staged = Staged::modify(self.staging_path(), RemoteVersion { etag, size })
            .map_err(|e| FsError::Local(e.to_string()))?;
        let mut t = self.table.lock();
        let i = t.inodes.get_mut(&ino).ok_or(FsError::NotFound)?;
        if let Some(l) = &i.local {
            // Made meanwhile by another handle.
            return Ok(l.clone());
        }
        let l = Arc::new(LocalFile {
            state: tokio::sync::Mutex::new(LocalState {
                staged,
                path,
                base: Some(version),
                opened: None,
                unlinked: false,
                conflict: None,
                stream: None,
                no_stream: self.write_back.enabled,
            }),
        });
        i.local = Some(l.clone());
        Ok(l)
    }

    /// `create`: a new, empty file, on the remote at its first upload.
    pub async fn create(&self, parent: u64, name: &OsStr) -> Result<(Entry, OpenReply), FsError> {
        self.writable()?;
        let name = ValidName::from_kernel(name)?;
        let staged = Staged::create(self.staging_path()).map_err(|e| FsError::Local(e.to_string()))?;
        let mut t = self.table.lock();
        let parent_path = match t.inodes.get(&parent) {
            Some(i) if i.kind == Kind::Dir => i.path.clone(),
            Some(_) => return Err(FsError::NotDir),
            None => return Err(FsError::NotFound),
        };
        let path = join_path(&parent_path, name.as_str());
        if let Some(&old) = t.by_path.get(&path) {
            self.supersede(&mut t, old);
        }
        let serial = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let mut ino = ino_hash(&[b"created", path.as_bytes(), &serial.to_le_bytes()]);
        while t.inodes.contains_key(&ino) {
            ino = ino.wrapping_add(1).max(2);
        }
        let now = SystemTime::now();
        t.inodes.insert(
            ino,
            Inode {
                parent,
                name: name.as_str().to_string(),
                path: path.clone(),
                kind: Kind::File,
                size: 0,
                mtime: now,
                etag: None,
                lookups: 1,
                current: true,
                valid_until: Instant::now() + self.cfg.metadata_ttl,
                local: Some(Arc::new(LocalFile {
                    state: tokio::sync::Mutex::new(LocalState {
                        staged,
                        path: path.clone(),
                        base: None,
                        opened: None,
                        unlinked: false,
                        conflict: None,
                        stream: None,
                        no_stream: self.write_back.enabled,
                    }),
                })),
                pending_create: true,
            },
        );
        t.by_path.insert(path, ino);
        t.negative.clear();
        set_child(
            &mut t,
            parent,
            &name,
            Some(Child {
                kind: Kind::File,
                size: 0,
                mtime: now,
                etag: None,
            }),
        );
        let entry = self.entry_of(&t, ino)?;
        drop(t);
        self.io.open_ordinary(ino)?;
        let fh = self.add_handle(ino, None, None);
        Ok((entry, OpenReply::ordinary(fh)))
    }

    /// A new handle of `ino`, whose I/O mode the caller has claimed (`passthrough` or not).
    pub(super) fn add_handle(
        &self,
        ino: u64,
        version: Option<Arc<Version>>,
        passthrough: Option<crate::cache::WholePin>,
    ) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files.lock().insert(
            fh,
            Arc::new(FileHandle {
                ino,
                version: version.map(OnceLock::from).unwrap_or_default(),
                readahead: Mutex::new(Readahead::default()),
                passthrough: Mutex::new(passthrough),
            }),
        );
        fh
    }

    /// `write`: into the file's local state.
    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        self.writable()?;
        let h = self.files.lock().get(&fh).cloned().ok_or(FsError::BadHandle)?;
        let l = self.ensure_local(h.ino).await?;
        let mut st = l.state.lock().await;
        let size = self.write_locked(&mut st, offset, data)?;
        if self.stream_due(&st) {
            self.stream_step(&mut st).await;
        }
        drop(st);
        self.touch(h.ino, size);
        Ok(data.len() as u32)
    }

    /// `write` done at once, when it can be: the file has local state and nobody holds it right
    /// now. The bytes go from the kernel's buffer straight into the staging file; starting or
    /// ending a stream, when due, runs afterwards in a task. `None`: take the general path.
    pub fn try_write_now(&self, fh: u64, offset: u64, data: &[u8]) -> Option<Result<u32, FsError>> {
        if self.cfg.read_only {
            return Some(Err(FsError::ReadOnly));
        }
        let h = self.files.lock().get(&fh).cloned()?;
        let l = self.table.lock().inodes.get(&h.ino).and_then(|i| i.local.clone())?;
        let mut st = l.state.try_lock().ok()?;
        let size = match self.write_locked(&mut st, offset, data) {
            Ok(size) => size,
            Err(e) => return Some(Err(e)),
        };
        let due = self.stream_due(&st);
        drop(st);
        self.touch(h.ino, size);
        if due && let Some(me) = self.me.upgrade() {
            tokio::spawn(async move {
                let mut st = l.state.lock().await;
                me.stream_step(&mut st).await;
            });
        }
        Some(Ok(data.len() as u32))
    }

    /// Writes into the staging file. With a stream running, the write happens under its
    /// claims: a write below what parts took ends the stream (the bytes are sent at close).
    fn write_locked(&self, st: &mut LocalState, offset: u64, data: &[u8]) -> Result<u64, FsError> {
        let local = |e: std::io::Error| FsError::Local(e.to_string());
        match st.stream.as_ref() {
            Some(stream) => {
                let claims = stream.claims();
                let below = offset < *claims;
                if !below {
                    st.staged.write(offset, data).map_err(local)?;
                }
                drop(claims);
                if below {
                    tracing::debug!(
                        path = st.path,
                        "a write over bytes already sent ends the streamed upload"
                    );
                    st.no_stream = true;
                    st.staged.write(offset, data).map_err(local)?;
                } else if let Some(stream) = st.stream.as_ref() {
                    // Only what was written without a gap may be sent: a write still on its way
                    // fills the gap.
                    stream.written(st.staged.unsent_prefix());
                }
            }
            None => st.staged.write(offset, data).map_err(local)?,
        }
        Ok(st.staged.size())
    }

    /// Whether a stream must be started (a first whole part is written) or given up.
    fn stream_due(&self, st: &LocalState) -> bool {
        if st.no_stream {
            return st.stream.is_some();
        }
        st.stream.is_none() && st.staged.unsent_prefix() >= self.cfg.upload.part_size && !st.keeps_remote()
    }

    /// Gives up a stream that was ruled out, or starts one.
    async fn stream_step(&self, st: &mut LocalState) {
        if st.no_stream {
            if st.stream.is_some() {
                st.stop_stream().await;
            }
            return;
        }
        if st.stream.is_none() && !st.keeps_remote() && st.staged.unsent_prefix() >= self.cfg.upload.part_size {
            self.start_stream(st).await;
        }
    }

    /// Starts streaming a file written from its start, unless the remote holds its content
    /// already (a copy, a save through a temp file: better deduplicated at close).
    async fn start_stream(&self, st: &mut LocalState) {
        let part = self.cfg.upload.part_size;
        let caps = self.store.capabilities();
        if !caps.writes {
            st.no_stream = true;
            return;
        }
        let mut prefix = vec![0u8; part as usize];
        if st.staged.read_local(0, &mut prefix).is_err() {
            st.no_stream = true;
            return;
        }
        let base = st.staged.remote().map(|r| r.etag.clone());
        if caps.content_chunks
            && self.cfg.upload.incremental
            && mostly_known(&self.store, &st.path, base.as_ref(), &prefix).await
        {
            st.no_stream = true;
            return;
        }
        let file = match std::fs::File::open(st.staged.path()) {
            Ok(f) => f,
            Err(_) => {
                st.no_stream = true;
                return;
            }
        };
        match Streamer::start(self.store.clone(), &st.path, file, part, self.cfg.upload_parallel).await {
            Ok(s) => {
                s.written(st.staged.unsent_prefix());
                st.stream = Some(s);
            }
            Err(e) => {
                tracing::debug!(path = st.path, "no streamed upload: {e}");
                st.no_stream = true;
            }
        }
    }

    /// The inode's size and mtime after a local change.
    fn touch(&self, ino: u64, size: u64) {
        let mut t = self.table.lock();
        if let Some(i) = t.inodes.get_mut(&ino) {
            i.size = size;
            i.mtime = SystemTime::now();
        }
    }

    /// Reads a file with local changes: written bytes from the write area, the rest from the
    /// version it started from, holes as zeros.
    pub(super) async fn read_local(
        &self,
        l: &LocalFile,
        h: &FileHandle,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, FsError> {
        let st = l.state.lock().await;
        let end = offset.saturating_add(size as u64).min(st.staged.size());
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        for (r, layer) in st.staged.layers(offset..end) {
            let n = (r.end - r.start) as usize;
            match layer {
                Layer::Local => {
                    let at = out.len();
                    out.resize(at + n, 0);
                    st.staged
                        .read_local(r.start, &mut out[at..])
                        .map_err(|e| FsError::Local(e.to_string()))?;
                }
                Layer::Zero => out.resize(out.len() + n, 0),
                Layer::Base => read_base_into(&mut out, &st.base_versions(), &h.readahead, r).await?,
            }
        }
        Ok(out)
    }

    /// `flush` / `fsync`: the remote holds the file's changes when this returns.
    pub async fn flush(&self, fh: u64) -> Result<(), FsError> {
        let Some(h) = self.files.lock().get(&fh).cloned() else {
            return Err(FsError::BadHandle);
        };
        self.sync_inode(h.ino).await
    }

    /// `close` / `fsync`: with write-back, once the changes are durable in the journal
    /// (uploaded in the background); without, once the remote holds them.
    pub(super) async fn sync_inode(&self, ino: u64) -> Result<(), FsError> {
        if self.write_back.enabled {
            return self.journal_inode(ino).await;
        }
        self.upload_inode(ino).await
    }

    /// Uploads what inode `ino` changed since its last upload.
    pub(super) async fn upload_inode(&self, ino: u64) -> Result<(), FsError> {
        let local = self.table.lock().inodes.get(&ino).and_then(|i| i.local.clone());
        let Some(l) = local else { return Ok(()) };
        let mut st = l.state.lock().await;
        if let Some(c) = &st.conflict {
            return Err(c.clone());
        }
        if st.unlinked || !st.staged.is_changed() {
            return Ok(());
        }
        let path = st.path.clone();
        let mut streamed = None;
        if let Some(stream) = st.stream.take() {
            if st.sequential() && st.staged.size() >= stream.sent_upto() {
                let cond = match st.staged.remote() {
                    Some(r) => WriteCondition::Matches(r.etag.clone()),
                    None => WriteCondition::Absent,
                };
                match stream.finish(st.staged.size(), cond).await {
                    Ok((meta, sent)) => match meta.etag {
                        Some(etag) => {
                            streamed = Some(Ok(Some(crate::write::upload::Outcome {
                                version: RemoteVersion { etag, size: meta.size },
                                plan: "stream",
                                bytes_sent: sent,
                            })))
                        }
                        None => tracing::warn!(path, "no ETag for the streamed version; uploading again"),
                    },
                    Err(crate::store::StoreError::PreconditionFailed) => streamed = Some(Err(UploadError::Conflict)),
                    Err(e) => tracing::warn!(path, "streamed upload failed, uploading again: {e}"),
                }
            } else {
                stream.abort().await;
            }
            st.no_stream = true;
        }
        let result = match streamed {
            Some(r) => r,
            None => {
                let src = VersionSource {
                    versions: st.base_versions(),
                };
                self.uploader.upload(&path, &st.staged, &src).await
            }
        };
        match result {
            Ok(None) => Ok(()),
            Ok(Some(o)) => {
                let v = o.version;
                // Where the new version equals the old one (not written locally), its bytes can
                // come from the old version's cache.
                if let Some(base) = &st.base {
                    let limit = base.size.min(v.size);
                    let same = st
                        .staged
                        .layers(0..limit)
                        .into_iter()
                        .filter(|(_, l)| *l == Layer::Base)
                        .map(|(r, _)| r)
                        .collect();
                    self.reader.record_lineage(
                        &path,
                        &v.etag,
                        Lineage {
                            from_etag: base.etag.clone(),
                            from_size: base.size,
                            same,
                        },
                    );
                }
                st.staged.uploaded(v.clone());
                self.journal.done(&st.staged);
                // Bytes not written locally are those of the new version too; the version the
                // file was opened at keeps serving those it has cached.
                let new = self.reader.open_version(&path, &v.etag, v.size);
                if let Some(old) = st.base.replace(new)
                    && st.opened.is_none()
                {
                    st.opened = Some(old);
                }
                drop(st);
                self.uploaded(ino, &v);
                Ok(())
            }
            Err(UploadError::Conflict) => {
                let kept = self.keep_conflicting(&st).await;
                tracing::error!(
                    path,
                    kept = %kept,
                    "the file changed on the remote since it was opened: not overwritten; the local version is kept"
                );
                let err = FsError::Conflict { path, kept };
                st.conflict = Some(err.clone());
                self.journal.done(&st.staged);
                drop(st);
                let mut t = self.table.lock();
                self.supersede(&mut t, ino);
                Err(err)
            }
            Err(UploadError::Store(e @ crate::store::StoreError::Refused { .. })) => {
                // Trying again would be refused again (and a journaled change would be retried
                // for ever): the local version is kept where the log says, as for a conflict.
                let kept = self.keep_conflicting(&st).await;
                tracing::error!(
                    path,
                    kept = %kept,
                    "the remote refused the change: {e}; not retried; the local version is kept"
                );
                let err = FsError::Refused {
                    path,
                    err: e.to_string(),
                    kept,
                };
                st.conflict = Some(err.clone());
                self.journal.done(&st.staged);
                Err(err)
            }
            Err(e) => Err(FsError::Upload {
                path,
                err: e.to_string(),
            }),
        }
    }

    /// Records a new version made by an upload of inode `ino`.
    fn uploaded(&self, ino: u64, v: &RemoteVersion) {
        let mut t = self.table.lock();
        let Some(i) = t.inodes.get_mut(&ino) else { return };
        i.etag = Some(v.etag.clone());
        i.size = v.size;
        i.pending_create = false;
        i.valid_until = Instant::now() + self.cfg.metadata_ttl;
        let (parent, name, mtime) = (i.parent, i.name.clone(), i.mtime);
        if let Ok(n) = ValidName::from_remote(&name) {
            set_child(
                &mut t,
                parent,
                &n,
                Some(Child {
                    kind: Kind::File,
                    size: v.size,
                    mtime,
                    etag: Some(v.etag.clone()),
                }),
            );
        }
    }

    /// Saves the local version of a file whose upload conflicted; returns where.
    async fn keep_conflicting(&self, st: &LocalState) -> String {
        self.keep_copy(&st.path, &st.staged, &st.base_versions()).await
    }

    /// Saves the whole content of a file whose change the remote did not take (a conflict, a
    /// refusal) in `<cache dir>/pending/conflicts/`: the bytes written locally from `staged`,
    /// the others from `versions` (their cache, or the remote while it still has them). Returns
    /// where, with a note when some bytes could not be read (zeros in the copy, whose name
    /// then ends in `.incomplete`).
    pub(super) async fn keep_copy(&self, path: &str, staged: &Staged, versions: &[&Arc<Version>]) -> String {
        let dir = self.cfg.staging_dir.join("conflicts");
        let mut content = Vec::new();
        let mut missing = 0u64;
        let mut local_ok = true;
        for (r, layer) in staged.layers(0..staged.size()) {
            let n = (r.end - r.start) as usize;
            match layer {
                Layer::Local => {
                    let at = content.len();
                    content.resize(at + n, 0);
                    local_ok &= staged.read_local(r.start, &mut content[at..]).is_ok();
                }
                Layer::Zero => content.resize(content.len() + n, 0),
                Layer::Base => {
                    // Piece by piece, so a chunk that cannot be read costs only its own bytes;
                    // once the remote failed, only cached pieces are tried.
                    let mut pos = r.start;
                    while pos < r.end {
                        let end = (((pos >> 20) + 1) << 20).min(r.end);
                        let piece = pos..end;
                        let at = content.len();
                        let try_it = missing == 0 || versions.iter().any(|v| cached(v, &piece));
                        let ra = Mutex::new(Readahead::disabled());
                        if !try_it
                            || read_base_into(&mut content, versions, &ra, piece.clone())
                                .await
                                .is_err()
                        {
                            missing += piece.end - piece.start;
                        }
                        content.resize(at + (piece.end - piece.start) as usize, 0);
                        pos = end;
                    }
                }
            }
        }
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let suffix = if missing > 0 || !local_ok { ".incomplete" } else { "" };
        let base = format!("{stamp}-{}", path.replace('/', "%2F"));
        let written = std::fs::create_dir_all(&dir).and_then(|_| {
            // A name of its own, also for two conflicts of one file within a second.
            let mut k = 0;
            loop {
                let name = match k {
                    0 => format!("{base}{suffix}"),
                    _ => format!("{base}-{k}{suffix}"),
                };
                let dest = dir.join(name);
                match std::fs::OpenOptions::new().write(true).create_new(true).open(&dest) {
                    Ok(mut f) => {
                        use std::io::Write;
                        f.write_all(&content)?;
                        f.sync_all()?;
                        return Ok(dest);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && k < 1000 => k += 1,
                    Err(e) => return Err(e),
                }
            }
        });
        match written {
            Ok(dest) if !local_ok => format!(
                "{} (the bytes written locally could not all be read: zeros)",
                dest.display()
            ),
            Ok(dest) if missing > 0 => format!(
                "{} ({missing} bytes not written locally could not be read: zeros)",
                dest.display()
            ),
            Ok(dest) => dest.display().to_string(),
            Err(e) => format!("nowhere ({}: {e})", dir.display()),
        }
    }

    /// `release`: the last close of a handle; sends what is left (writes through a shared
    /// mapping arrive after the last flush) and lets go of the local state when nobody holds
    /// the file any more.
    pub async fn release_handle(&self, fh: u64) -> Result<(), FsError> {
        let Some(h) = self.files.lock().remove(&fh) else {
            return Ok(());
        };
        let mode = match h.passthrough.lock().take() {
            Some(_) => super::iomode::Mode::Passthrough,
            None => super::iomode::Mode::Ordinary,
        };
        self.io.close(h.ino, mode);
        let result = self.sync_inode(h.ino).await;
        if let Err(e) = &result {
            tracing::error!("release: {e}");
            if matches!(
                e,
                FsError::Upload { .. } | FsError::Remote { .. } | FsError::Read { .. }
            ) {
                // The last chance was this close: journal the changes and keep trying in the
                // background (also across a restart).
                match self.journal_inode(h.ino).await {
                    Ok(()) => tracing::warn!("the upload will be retried in the background"),
                    Err(e) => tracing::error!("cannot journal the failed upload: {e}"),
                }
            }
        }
        let still_open = self.files.lock().values().any(|o| o.ino == h.ino);
        if !still_open
            && mode == super::iomode::Mode::Ordinary
            && self.io.enabled()
            && h.version
                .get()
                .is_some_and(|v| v.size >= DROP_PAGES_MIN && v.is_complete())
        {
            // The version is complete: the next open reads the cache file through passthrough,
            // and the kernel drops the inode's page cache as that open enters passthrough
            // mode, in the opener's time (40 ms for the 1 GiB a cold `cat` left). Dropped now,
            // by the notifier thread, nobody waits for it. (The kernel then asks for the
            // attributes again, once: not worth it for small files.)
            self.invalidate_inode(h.ino);
        }
        if !still_open {
            let mut t = self.table.lock();
            let done = t.inodes.get(&h.ino).and_then(|i| i.local.as_ref()).is_some_and(|l| {
                l.state
                    .try_lock()
                    .is_ok_and(|st| !st.staged.is_changed() || st.unlinked || st.conflict.is_some())
            });
            if done && let Some(i) = t.inodes.get_mut(&h.ino) {
                i.local = None;
            }
        }
        result
    }

    /// `setattr`: a size change truncates (uploaded at once when no handle is given: nothing
    /// else would send it); modes, owners and times are accepted and not kept (see
    /// `docs/SEMANTICS.md`).
    pub async fn setattr(&self, ino: u64, size: Option<u64>, fh: Option<u64>) -> Result<Entry, FsError> {
        if let Some(size) = size {
            self.writable()?;
            let kind = self
                .table
                .lock()
                .inodes
                .get(&ino)
                .map(|i| i.kind)
                .ok_or(FsError::NotFound)?;
            if kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            // Held for the change: refused while the kernel reads the file straight from the
            // cache, and no such reader starts meanwhile.
            self.io.open_ordinary_within(ino, super::RELEASE_WAIT).await?;
            let truncated = async {
                let l = self.ensure_local(ino).await?;
                let mut st = l.state.lock().await;
                if st.stream.as_ref().is_some_and(|s| size < s.sent_upto()) {
                    st.stop_stream().await;
                }
                st.staged.truncate(size).map_err(|e| FsError::Local(e.to_string()))?;
                drop(st);
                self.touch(ino, size);
                if fh.is_none() {
                    self.sync_inode(ino).await?;
                }
                Ok::<(), FsError>(())
            }
            .await;
            self.io.close(ino, super::iomode::Mode::Ordinary);
            truncated?;
        }
        let t = self.table.lock();
        let mut e = self.entry_of(&t, ino)?;
        if size.is_some() {
            e.ttl = self.cfg.metadata_ttl;
        }
        Ok(e)
    }

    /// `open` with `O_TRUNC` (the kernel passes it on with atomic truncation).
    pub(super) async fn truncate_on_open(&self, ino: u64) -> Result<(), FsError> {
        let l = self.ensure_local(ino).await?;
        let mut st = l.state.lock().await;
        if st.stream.is_some() {
            st.stop_stream().await;
        }
        // A file truncated to nothing may stream again.
        st.no_stream = self.write_back.enabled;
        st.staged.truncate(0).map_err(|e| FsError::Local(e.to_string()))?;
        drop(st);
        self.touch(ino, 0);
        Ok(())
    }

    /// The current child `name` of `parent`: its inode, looked up if need be.
    async fn child(&self, parent: u64, name: &OsStr) -> Result<(u64, String, Kind), FsError> {
        let e = self.lookup(parent, name).await?;
        // `lookup` counted a kernel reference that the kernel will not forget: take it back.
        let mut t = self.table.lock();
        let i = t.inodes.get_mut(&e.attr.ino).ok_or(FsError::NotFound)?;
        i.lookups = i.lookups.saturating_sub(1);
        Ok((e.attr.ino, i.path.clone(), i.kind))
    }

    /// `unlink` of a file.
    pub async fn unlink(&self, parent: u64, name: &OsStr) -> Result<(), FsError> {
        self.writable()?;
        let (ino, path, kind) = self.child(parent, name).await?;
        if kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        let (pending, etag, local) = {
            let t = self.table.lock();
            let i = t.inodes.get(&ino).ok_or(FsError::NotFound)?;
            (i.pending_create, i.etag.clone(), i.local.clone())
        };
        // Marked first, so no upload starts meanwhile; its journal record goes only once the
        // remove is done (a failed one leaves the file, changes and all).
        if let Some(l) = &local {
            let mut st = l.state.lock().await;
            st.unlinked = true;
            st.stop_stream().await;
        }
        if !pending {
            let cond = etag.map(WriteCondition::Matches).unwrap_or(WriteCondition::None);
            match self.store.delete(&path, cond).await {
                Ok(()) | Err(crate::store::StoreError::NotFound) => {}
                Err(e) => {
                    if let Some(l) = &local {
                        l.state.lock().await.unlinked = false;
                    }
                    return Err(FsError::remote(&path, e));
                }
            }
        }
        if let Some(l) = &local {
            self.discard_local(l).await;
        }
        self.removed(parent, name, ino);
        Ok(())
    }

    /// A child is gone: out of its parent's listing and off its inode.
    fn removed(&self, parent: u64, name: &OsStr, ino: u64) {
        let mut t = self.table.lock();
        if let Some(n) = name.to_str().and_then(|n| ValidName::from_remote(n).ok()) {
            set_child(&mut t, parent, &n, None);
        }
        self.supersede(&mut t, ino);
    }

    /// `mkdir`.
    pub async fn mkdir(&self, parent: u64, name: &OsStr) -> Result<Entry, FsError> {
        self.writable()?;
        let name = ValidName::from_kernel(name)?;
        let parent_path = self.dir_path(parent)?;
        let path = join_path(&parent_path, name.as_str());
        self.store.mkdir(&path).await.map_err(|e| FsError::remote(&path, e))?;
        let mut t = self.table.lock();
        let child = Child {
            kind: Kind::Dir,
            size: 0,
            mtime: SystemTime::now(),
            etag: None,
        };
        set_child(&mut t, parent, &name, Some(child.clone()));
        let ino = self.upsert(&mut t, parent, &name, &child, Instant::now() + self.cfg.metadata_ttl);
        // A new folder is empty: known without asking.
        let d = t.dirs.entry(ino).or_default();
        d.entries = Some(Arc::new(Default::default()));
        d.valid_until = Some(Instant::now() + self.cfg.metadata_ttl);
        self.referenced(&mut t, ino)
    }

    fn dir_path(&self, ino: u64) -> Result<String, FsError> {
        let t = self.table.lock();
        match t.inodes.get(&ino) {
            Some(i) if i.kind == Kind::Dir => Ok(i.path.clone()),
            Some(_) => Err(FsError::NotDir),
            None => Err(FsError::NotFound),
        }
    }

    /// `rmdir`.
    pub async fn rmdir(&self, parent: u64, name: &OsStr) -> Result<(), FsError> {
        self.writable()?;
        let (ino, path, kind) = self.child(parent, name).await?;
        if kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        // Files made here and not uploaded yet are children the remote does not know of.
        let has_pending = {
            let t = self.table.lock();
            t.inodes
                .values()
                .any(|i| i.parent == ino && i.current && i.pending_create)
        };
        if has_pending {
            return Err(FsError::NotEmpty);
        }
        self.store.rmdir(&path).await.map_err(|e| FsError::remote(&path, e))?;
        self.removed(parent, name, ino);
        Ok(())
    }

    /// `rename`. `no_replace`: fail when the destination exists (`RENAME_NOREPLACE`).
    pub async fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        no_replace: bool,
    ) -> Result<(), FsError> {
        self.writable()?;
        let (ino, from, kind) = self.child(parent, name).await?;
        let dest_name = ValidName::from_kernel(new_name)?;
        let to = join_path(&self.dir_path(new_parent)?, dest_name.as_str());
        if from == to {
            return Ok(());
        }
        if kind == Kind::Dir && (to.starts_with(&format!("{from}/"))) {
            return Err(FsError::Invalid("a folder cannot move into itself"));
        }
        let dest = match self.child(new_parent, new_name).await {
            Ok(d) => Some(d),
            Err(FsError::NotFound) => None,
            Err(e) => return Err(e),
        };
        if let Some((_, _, dk)) = &dest {
            if no_replace {
                return Err(FsError::Exists);
            }
            match (kind, dk) {
                (Kind::Dir, Kind::File) => return Err(FsError::NotDir),
                (Kind::File, Kind::Dir) => return Err(FsError::IsDir),
                _ => {}
            }
        }
        let (pending, etag) = {
            let t = self.table.lock();
            let i = t.inodes.get(&ino).ok_or(FsError::NotFound)?;
            (i.pending_create, i.etag.clone())
        };
        if !pending {
            let cond = match (kind, etag) {
                (Kind::File, Some(e)) => WriteCondition::Matches(e),
                _ => WriteCondition::None,
            };
            self.store
                .rename(&from, &to, cond)
                .await
                .map_err(|e| FsError::remote(&from, e))?;
        }
        // A file not on the remote yet moves here only: its upload will go to the new path
        // and replace what is there.
        let dest_version = dest.as_ref().and_then(|(dino, _, _)| {
            let t = self.table.lock();
            let d = t.inodes.get(dino)?;
            Some(RemoteVersion {
                etag: d.etag.clone()?,
                size: d.size,
            })
        });
        // The files being written that move (this one, or those in this folder) upload to
        // their new paths, and their journal records say so before the rename returns: a
        // crash after it replays them under the new names.
        let mut not_durable = None;
        for (local, new_path, this) in self.moving_locals(ino, &from, &to) {
            let mut st = local.state.lock().await;
            st.stop_stream().await;
            st.path = new_path;
            if this && pending {
                st.staged.replace_remote(dest_version.clone());
            }
            if self.journal.is_recorded(&st.staged)
                && let Err(e) = self.journal.record(self.store.id(), &st.path, &st.staged)
            {
                tracing::error!(
                    path = st.path,
                    "cannot record the rename in the write-back journal: {e}"
                );
                not_durable = Some(FsError::Local(format!("the write-back journal: {e}")));
            }
        }
        // The file replaced, if any: its changes are gone with it.
        if let Some((dino, _, _)) = &dest {
            let local = self.table.lock().inodes.get(dino).and_then(|i| i.local.clone());
            if let Some(l) = local {
                self.discard_local(&l).await;
            }
        }
        let mut t = self.table.lock();
        if let Some((dino, _, _)) = dest {
            self.supersede(&mut t, dino);
        }
        moved(&mut t, ino, &from, &to, new_parent, &dest_name);
        if let Some(n) = name.to_str().and_then(|n| ValidName::from_remote(n).ok()) {
            set_child(&mut t, parent, &n, None);
        }
        let child = t.inodes.get(&ino).map(|i| Child {
            kind: i.kind,
            size: i.size,
            mtime: i.mtime,
            etag: i.etag.clone(),
        });
        set_child(&mut t, new_parent, &dest_name, child);
        match not_durable {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The local states that a rename of inode `ino` from `from` to `to` moves, with their new
    /// paths, and whether each is `ino`'s own.
    fn moving_locals(&self, ino: u64, from: &str, to: &str) -> Vec<(Arc<LocalFile>, String, bool)> {
        let prefix = format!("{from}/");
        let t = self.table.lock();
        t.inodes
            .iter()
            .filter(|(n, i)| i.current && (**n == ino || i.path.starts_with(&prefix)))
            .filter_map(|(n, i)| {
                let l = i.local.clone()?;
                Some((l, format!("{to}{}", &i.path[from.len()..]), *n == ino))
            })
            .collect()
    }

    /// A file being written is removed or replaced: its changes are never sent, and its
    /// journal record goes.
    async fn discard_local(&self, l: &LocalFile) {
        let mut st = l.state.lock().await;
        st.unlinked = true;
        st.stop_stream().await;
        self.journal.done(&st.staged);
    }
}

/// Moves inode `ino` (and, for a folder, everything under it) from path `from` to `to`.
fn moved(t: &mut Table, ino: u64, from: &str, to: &str, new_parent: u64, new_name: &ValidName) {
    if let Some(i) = t.inodes.get_mut(&ino) {
        i.parent = new_parent;
        i.name = new_name.as_str().to_string();
    }
    let prefix = format!("{from}/");
    let affected: Vec<(u64, String)> = t
        .inodes
        .iter()
        .filter(|(n, i)| i.current && (**n == ino || i.path.starts_with(&prefix)))
        .map(|(n, i)| (*n, i.path.clone()))
        .collect();
    for (n, old) in affected {
        let new = format!("{to}{}", &old[from.len()..]);
        if t.by_path.get(&old) == Some(&n) {
            t.by_path.remove(&old);
        }
        if let Some(i) = t.inodes.get_mut(&n) {
            i.path = new.clone();
        }
        t.by_path.insert(new, n);
    }
}

/// Sets (or, with `None`, removes) `name` in the cached listing of `dir`, if it is listed.
pub(super) fn set_child(t: &mut Table, dir: u64, name: &ValidName, child: Option<Child>) {
    if let Some(d) = t.dirs.get_mut(&dir)
        && let Some(entries) = &mut d.entries
    {
        let map = Arc::make_mut(entries);
        match child {
            Some(c) => {
                map.insert(name.clone(), c);
            }
            None => {
                map.remove(name);
            }
        }
    }
}

impl ArtifactFs {
    /// Attributes of an inode (for replies after changes).
    pub fn attr(&self, ino: u64) -> Option<Attr> {
        let t = self.table.lock();
        t.inodes.get(&ino).map(|i| self.attr_of(ino, i))
    }
}
