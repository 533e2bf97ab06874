//! Upload sessions (`docs/PROTOCOL.md`, "Upload sessions"): a new version of one file built
//! from parts, each new bytes, a range of the session's base version, or a chunk the server
//! holds; committed atomically like a `PUT`.
//!
//! Owns the sessions (in memory), their expiry after `upload_ttl` without a request, and where
//! a part's bytes are: a part sent without `offset` in its own file `<state>/uploads/<id>/<part>`;
//! a part sent with `offset` written in place into the session's assembly file (in the same
//! folder, or hidden beside the target when that is on another filesystem), with the 1 MiB
//! digests of its aligned pieces computed as it arrives. A part's bytes and its record change
//! together under the session's lock (a retried part replaces both), and an in-place write
//! that ends marks every in-place record whose bytes it may have overwritten as lost.
//!
//! A commit whose parts are intact in-place parts tiling the file from 0 renames the assembly
//! file over the target: no copy, and only the 1 MiB chunks no part hashed are read; the
//! content-defined chunks follow in the background. Any other commit copies the parts into a
//! new file and hashes it whole, checking every part against its tag. Sessions do not survive
//! a restart: the server clears `uploads/` when it starts.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use parking_lot::Mutex;

use super::auth::Claims;
use super::chunks::{self, parse_hash};
use super::digests::{FileDigests, Identity, read_full_at};
use super::durable::{BodySink, TempFile, body_to_file, body_to_sink, copy_range, small_body, temp_in_or_beside};
use super::error::ServerError;
use super::paths::RequestPath;
use super::paths::WriteTarget;
use super::scan::{self, ChunkSums, Known};
use super::stats::Counter;
use super::writes::{
    Existing, check_conditions, existing, keep_permissions, persist_and_install, resolve, write_response, write_state,
};
use super::{Ctx, blocking, json_response};
use crate::protocol::{CommitRequest, Crc32c, DIGEST_CHUNK_SIZE, PartStored, UploadStarted};

/// Largest commit body (10,000 part references fit many times over).
const COMMIT_BODY_MAX: usize = 4 << 20;
/// Copy buffer for ranges of the base version.
const COPY_BUF: usize = 1 << 20;
/// Name prefix of a session's assembly file in its folder.
const ASSEMBLY_PREFIX: &str = "assembly-";
/// Largest `offset` of a part (a file offset is a signed 64-bit number).
const OFFSET_MAX: u64 = i64::MAX as u64;

/// The version a session's `copy=` parts read from, kept open so a replaced file stays
/// readable; a change in place shows in its identity.
struct Base {
    file: Arc<File>,
    identity: Identity,
}

/// Where a stored part's bytes are.
#[derive(Debug, Clone)]
enum Place {
    /// In its own file, `<session folder>/<part>`.
    File,
    /// Bytes `offset..offset + size` of the assembly file. `pieces` are the sums of its
    /// 1 MiB pieces from `offset` on (the last one possibly short) when `offset` is a multiple
    /// of the chunk size, else empty. `intact` turns false when another in-place write may have
    /// overwritten some of its bytes.
    InPlace {
        offset: u64,
        pieces: Arc<ChunkSums>,
        intact: bool,
    },
}

#[derive(Debug, Clone)]
struct PartInfo {
    tag: String,
    size: u64,
    place: Place,
}

impl PartInfo {
    fn range(&self) -> Option<Range<u64>> {
        match self.place {
            Place::InPlace { offset, .. } => Some(offset..offset + self.size),
            Place::File => None,
        }
    }
}

/// The file in-place parts are written into, which a commit renames over the target.
struct Assembly {
    temp: TempFile,
    file: Arc<File>,
}

struct SessionState {
    parts: HashMap<u32, PartInfo>,
    last_used: Instant,
    /// Requests of the session in progress; a session in use does not expire.
    active: usize,
    ended: bool,
    /// Made by the first in-place part.
    assembly: Option<Assembly>,
    /// In-place writes running, each with the ranges other in-place writes that ended while it
    /// ran may have written.
    writing: HashMap<u64, Vec<Range<u64>>>,
    next_write: u64,
    /// A commit took the assembly file: parts sent meanwhile go to their own files.
    committing: bool,
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

impl SessionState {
    /// The in-place write `ticket` ended having written (at most) `range`: the records whose
    /// bytes it may have overwritten are lost, and the writes still running learn of it.
    /// Returns the ranges that writes which ended while it ran may have written.
    fn end_write(&mut self, ticket: u64, range: &Range<u64>) -> Vec<Range<u64>> {
        let foreign = self.writing.remove(&ticket).unwrap_or_default();
        if range.is_empty() {
            return foreign;
        }
        for others in self.writing.values_mut() {
            others.push(range.clone());
        }
        for info in self.parts.values_mut() {
            if info.range().is_some_and(|r| overlaps(&r, range))
                && let Place::InPlace { intact, .. } = &mut info.place
            {
                *intact = false;
            }
        }
        foreign
    }
}

pub struct Session {
    id: String,
    /// The target, relative to the served folder.
    rel: PathBuf,
    dir: PathBuf,
    base: Option<Base>,
    state: Mutex<SessionState>,
}

impl Session {
    fn gone(&self) -> ServerError {
        ServerError::NoSuchUpload(self.id.clone())
    }

    /// Starts writing `part` into the assembly file at `offset` (the assembly is made near
    /// `parent`, the target's folder, on first use); `None` while a commit holds the assembly.
    /// Blocking.
    fn begin_in_place(
        self: &Arc<Self>,
        part: u32,
        offset: u64,
        parent: &Path,
    ) -> Result<Option<InPlaceWrite>, ServerError> {
        let mut st = self.state.lock();
        if st.ended {
            return Err(self.gone());
        }
        if st.committing {
            return Ok(None);
        }
        let file = match &st.assembly {
            Some(a) => Arc::clone(&a.file),
            None => {
                let io = |source| ServerError::Io {
                    context: "creating the assembly file".into(),
                    source,
                };
                let temp = temp_in_or_beside(&self.dir, ASSEMBLY_PREFIX, parent).map_err(io)?;
                let file = Arc::new(temp.file.try_clone().map_err(io)?);
                st.assembly = Some(Assembly {
                    temp,
                    file: Arc::clone(&file),
                });
                file
            }
        };
        let ticket = st.next_write;
        st.next_write += 1;
        st.writing.insert(ticket, Vec::new());
        Ok(Some(InPlaceWrite {
            session: Arc::clone(self),
            ticket,
            file,
            part,
            offset,
            written: 0,
            reach: 0,
            hasher: Some(PartHasher::new(Some(offset))),
        }))
    }

    /// Hands the assembly file to a commit whose `parts` (as it saw them) tile the file from 0,
    /// when they are still exactly those records, intact, and no in-place write is running;
    /// parts sent from now on go to their own files.
    fn claim_assembly(&self, parts: &[(u32, PartInfo)]) -> Option<Assembly> {
        let mut st = self.state.lock();
        if st.ended || st.committing || !st.writing.is_empty() {
            return None;
        }
        let unchanged = parts.iter().all(|(k, seen)| {
            st.parts.get(k).is_some_and(|cur| {
                cur.tag == seen.tag
                    && cur.size == seen.size
                    && matches!(
                        (&cur.place, &seen.place),
                        (Place::InPlace { offset: a, intact: true, .. }, Place::InPlace { offset: b, .. }) if a == b
                    )
            })
        });
        if !unchanged {
            return None;
        }
        let assembly = st.assembly.take()?;
        st.committing = true;
        Some(assembly)
    }

    /// A commit that claimed the assembly failed before changing it: it is the session's again.
    fn give_back(&self, assembly: Assembly) {
        let mut st = self.state.lock();
        st.assembly = Some(assembly);
        st.committing = false;
    }

    /// A commit that claimed the assembly failed after changing it: its parts are lost.
    fn assembly_lost(&self) {
        let mut st = self.state.lock();
        st.committing = false;
        for info in st.parts.values_mut() {
            if let Place::InPlace { intact, .. } = &mut info.place {
                *intact = false;
            }
        }
    }
}

/// Hashes a part's bytes as they arrive: its tag (blake3 of all of it) and, when the part
/// starts at a multiple of the 1 MiB digest chunk size in the file, the sums of each 1 MiB
/// piece (the last one possibly short).
struct PartHasher {
    tag: blake3::Hasher,
    pieces: Option<ChunkSums>,
    piece: blake3::Hasher,
    piece_crc: Crc32c,
    piece_len: u64,
}

impl PartHasher {
    /// `offset`: where the part goes in the file, when it is written in place.
    fn new(offset: Option<u64>) -> PartHasher {
        PartHasher {
            tag: blake3::Hasher::new(),
            pieces: offset
                .filter(|o| o.is_multiple_of(DIGEST_CHUNK_SIZE))
                .map(|_| ChunkSums::default()),
            piece: blake3::Hasher::new(),
            piece_crc: Crc32c::new(),
            piece_len: 0,
        }
    }

    fn update(&mut self, mut data: &[u8]) {
        self.tag.update(data);
        let Some(pieces) = &mut self.pieces else {
            return;
        };
        while !data.is_empty() {
            let take = ((DIGEST_CHUNK_SIZE - self.piece_len) as usize).min(data.len());
            self.piece.update(&data[..take]);
            self.piece_crc.update(&data[..take]);
            self.piece_len += take as u64;
            data = &data[take..];
            if self.piece_len == DIGEST_CHUNK_SIZE {
                pieces.push(*self.piece.finalize().as_bytes(), self.piece_crc.finalize());
                self.piece.reset();
                self.piece_crc.reset();
                self.piece_len = 0;
            }
        }
    }

    /// The hex tag and the pieces' sums.
    fn finish(self) -> (String, ChunkSums) {
        let mut pieces = self.pieces.unwrap_or_default();
        if self.piece_len > 0 {
            pieces.push(*self.piece.finalize().as_bytes(), self.piece_crc.finalize());
        }
        (self.tag.finalize().to_hex().to_string(), pieces)
    }
}

/// One part being written into the assembly file. It ends on the thread that wrote it,
/// completed (`finish`: the record is stored) or not (dropped); either way the records whose
/// bytes it may have overwritten are marked lost.
struct InPlaceWrite {
    session: Arc<Session>,
    ticket: u64,
    file: Arc<File>,
    part: u32,
    offset: u64,
    written: u64,
    /// End of what may have been written: a failed write may have written some of its bytes.
    reach: u64,
    /// `None` once finished.
    hasher: Option<PartHasher>,
}

impl InPlaceWrite {
    fn put(&mut self, data: &[u8]) -> io::Result<()> {
        let hasher = self
            .hasher
            .as_mut()
            .ok_or_else(|| io::Error::other("part already stored"))?;
        self.reach = self.written + data.len() as u64;
        self.file.write_all_at(data, self.offset + self.written)?;
        hasher.update(data);
        self.written = self.reach;
        Ok(())
    }

    /// Stores the record of the part, intact unless a write that ended while it ran may have
    /// overwritten some of it.
    fn store(mut self) -> Result<PartStored, ServerError> {
        let hasher = self
            .hasher
            .take()
            .ok_or_else(|| ServerError::Internal("part stored twice".into()))?;
        let (tag, pieces) = hasher.finish();
        let range = self.offset..self.offset + self.written;
        let session = &self.session;
        let mut st = session.state.lock();
        let foreign = st.end_write(self.ticket, &range);
        if st.ended {
            return Err(session.gone());
        }
        let info = PartInfo {
            tag: tag.clone(),
            size: self.written,
            place: Place::InPlace {
                offset: self.offset,
                pieces: Arc::new(pieces),
                intact: !foreign.iter().any(|r| overlaps(r, &range)),
            },
        };
        if let Some(PartInfo { place: Place::File, .. }) = st.parts.insert(self.part, info) {
            let _ = std::fs::remove_file(session.dir.join(self.part.to_string()));
        }
        Ok(PartStored {
            part: self.part,
            tag,
            size: self.written,
        })
    }
}

impl Drop for InPlaceWrite {
    fn drop(&mut self) {
        if self.hasher.is_some() {
            let range = self.offset..self.offset + self.reach;
            self.session.state.lock().end_write(self.ticket, &range);
        }
    }
}

impl BodySink for InPlaceWrite {
    type Output = PartStored;

    fn write(&mut self, frame: &[u8]) -> io::Result<()> {
        self.put(frame)
    }

    fn finish(self) -> Result<PartStored, ServerError> {
        self.store()
    }
}

/// Marks a session in use while a request works on it.
struct InUse(Arc<Session>);

impl Drop for InUse {
    fn drop(&mut self) {
        let mut st = self.0.state.lock();
        st.active -= 1;
        st.last_used = Instant::now();
    }
}

/// Every open session.
pub struct Uploads {
    dir: PathBuf,
    ttl: Duration,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
}

impl Uploads {
    pub fn new(dir: PathBuf, ttl: Duration) -> Uploads {
        Uploads {
            dir,
            ttl,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The session `id` of the file `rel`, marked in use; `no_such_upload` when there is none
    /// (never opened, ended, expired, or opened for another file).
    fn use_session(&self, id: Option<&str>, rel: &std::path::Path) -> Result<InUse, ServerError> {
        let id = id.ok_or_else(|| ServerError::BadRequest("upload=ID is missing".into()))?;
        let gone = || ServerError::NoSuchUpload(id.to_string());
        let session = self.sessions.lock().get(id).cloned().ok_or_else(gone)?;
        {
            let mut st = session.state.lock();
            if st.ended || session.rel != rel || (st.active == 0 && st.last_used.elapsed() > self.ttl) {
                return Err(gone());
            }
            st.active += 1;
        }
        Ok(InUse(session))
    }

    /// Ends a session: it leaves the map at once, its folder and assembly file are removed.
    /// Blocking.
    fn end(&self, session: &Session) {
        let assembly = {
            let mut st = session.state.lock();
            st.ended = true;
            st.assembly.take()
        };
        self.sessions.lock().remove(&session.id);
        drop(assembly);
        let _ = std::fs::remove_dir_all(&session.dir);
    }

    /// Drops the sessions idle for longer than the TTL. Blocking.
    pub fn expire(&self) -> usize {
        let expired: Vec<Arc<Session>> = self
            .sessions
            .lock()
            .values()
            .filter(|s| {
                let st = s.state.lock();
                st.active == 0 && st.last_used.elapsed() > self.ttl
            })
            .cloned()
            .collect();
        for s in &expired {
            tracing::debug!(upload = %s.id, "upload session expired");
            self.end(s);
        }
        expired.len()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.sessions.lock().len()
    }
}

/// Expires idle sessions every quarter of the TTL (between 10 ms and 60 s).
pub async fn expire_forever(uploads: Arc<Uploads>) {
    let every = (uploads.ttl() / 4).clamp(Duration::from_millis(10), Duration::from_secs(60));
    loop {
        tokio::time::sleep(every).await;
        let u = Arc::clone(&uploads);
        if tokio::task::spawn_blocking(move || u.expire()).await.is_err() {
            return;
        }
    }
}

fn new_id() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seed = format!("{}-{nanos}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
    blake3::hash(seed.as_bytes()).to_hex()[..32].to_string()
}

fn uploads(ctx: &Ctx) -> Result<&Arc<Uploads>, ServerError> {
    write_state(ctx)?;
    ctx.uploads.as_ref().ok_or(ServerError::MethodNotAllowed)
}

/// `POST /file?afs=upload`.
pub async fn start(ctx: &Arc<Ctx>, req: &RequestPath, headers: &HeaderMap) -> Result<Response, ServerError> {
    let ups = uploads(ctx)?;
    let t = resolve(ctx, req).await?;
    let tt = t.clone();
    let current = blocking(move || existing(&tt)).await?;
    if matches!(current, Existing::Dir) {
        return Err(ServerError::IsDir(t.shown));
    }
    // With If-Match the current version becomes the base; other conditions wait for commit.
    let base = if headers.contains_key(http::header::IF_MATCH) {
        check_conditions(ctx, headers, &t, &current).await?;
        match &current {
            Existing::File(f) => {
                let d = ctx.store.get(&t.rel, f).await?;
                Some(Base {
                    file: Arc::clone(f),
                    identity: d.identity,
                })
            }
            _ => None,
        }
    } else {
        None
    };
    let id = new_id();
    let dir = ups.dir.join(&id);
    let d2 = dir.clone();
    blocking(move || {
        std::fs::create_dir(&d2).map_err(|source| ServerError::Io {
            context: "creating the upload folder".into(),
            source,
        })
    })
    .await?;
    let session = Arc::new(Session {
        id: id.clone(),
        rel: t.rel,
        dir,
        base,
        state: Mutex::new(SessionState {
            parts: HashMap::new(),
            last_used: Instant::now(),
            active: 0,
            ended: false,
            assembly: None,
            writing: HashMap::new(),
            next_write: 0,
            committing: false,
        }),
    });
    ups.sessions.lock().insert(id.clone(), session);
    let mut resp = json_response(&UploadStarted {
        upload: id,
        expires_in_s: ups.ttl().as_secs_f64().ceil() as u64,
    })?;
    *resp.status_mut() = StatusCode::CREATED;
    Ok(resp)
}

/// What a part is made of.
pub enum PartSource {
    Body(Body),
    Copy(u64, u64),
    /// A chunk by hash, taken only from files the request's token may read (`None`: any).
    Chunk(String, Option<Arc<Claims>>),
}

fn io_err(context: &'static str) -> impl Fn(io::Error) -> ServerError {
    move |source| ServerError::Io {
        context: context.into(),
        source,
    }
}

/// `PUT /file?afs=part&upload=ID&part=K[&offset=N][&copy=A-B | &chunk=HASH]`.
pub async fn part(
    ctx: &Arc<Ctx>,
    req: &RequestPath,
    upload: Option<&str>,
    part: Option<u32>,
    offset: Option<u64>,
    source: PartSource,
) -> Result<Response, ServerError> {
    let ups = uploads(ctx)?;
    let t = resolve(ctx, req).await?;
    let use_ = ups.use_session(upload, &t.rel)?;
    let session = Arc::clone(&use_.0);
    let part = part.ok_or_else(|| ServerError::BadRequest("part=K is missing".into()))?;
    if let PartSource::Chunk(hash, _) = &source
        && parse_hash(hash).is_none()
    {
        return Err(ServerError::BadRequest(format!("{hash:?} is not a hex blake3 hash")));
    }
    let in_place = match offset {
        Some(o) if o > OFFSET_MAX => {
            return Err(ServerError::BadRequest(format!("offset must be at most {OFFSET_MAX}")));
        }
        Some(o) => {
            let (s, parent) = (Arc::clone(&session), t.parent.clone());
            blocking(move || s.begin_in_place(part, o, &parent)).await?
        }
        None => None,
    };
    let stored = match in_place {
        Some(w) => in_place_part(ctx, &session, w, source).await?,
        None => file_part(ctx, &session, part, source).await?,
    };
    drop(use_);
    json_response(&stored)
}

/// A part written into the assembly file at its offset.
async fn in_place_part(
    ctx: &Arc<Ctx>,
    session: &Arc<Session>,
    mut w: InPlaceWrite,
    source: PartSource,
) -> Result<PartStored, ServerError> {
    match source {
        PartSource::Body(body) => body_to_sink(body, w, &ctx.stats).await,
        PartSource::Copy(a, b) => {
            let (s, stats) = (Arc::clone(session), Arc::clone(&ctx.stats));
            blocking(move || {
                let len = copy_base_range(&s, a, b, &mut |data| w.put(data))?;
                stats.add_parts_copied(len);
                w.store()
            })
            .await
        }
        PartSource::Chunk(hash, scope) => {
            let h = parse_hash(&hash).ok_or_else(|| ServerError::BadRequest(format!("{hash:?} is not a hash")))?;
            let (root, index, stats) = (
                Arc::clone(&ctx.root),
                Arc::clone(ctx.store.index()),
                Arc::clone(&ctx.stats),
            );
            blocking(move || {
                let bytes = chunks::read_chunk(&root, &index, &h, scope.as_deref())?;
                w.put(&bytes).map_err(io_err("writing a part"))?;
                stats.add_parts_copied(bytes.len() as u64);
                w.store()
            })
            .await
        }
    }
}

/// A part in its own file (sent without `offset`, or while a commit holds the assembly).
async fn file_part(
    ctx: &Arc<Ctx>,
    session: &Arc<Session>,
    part: u32,
    source: PartSource,
) -> Result<PartStored, ServerError> {
    let sdir = session.dir.clone();
    let temp = blocking(move || TempFile::create_in(&sdir, &format!("{part}.tmp-")).map_err(io_err("creating a part")))
        .await?;
    let tf = temp.file.try_clone().map_err(io_err("part file"))?;
    let (size, tag) = match source {
        PartSource::Body(body) => {
            let r = body_to_file(body, tf, &ctx.stats).await?;
            (r.len, r.blake3)
        }
        PartSource::Copy(a, b) => {
            let s = Arc::clone(session);
            let (len, tag) = blocking(move || {
                let (mut hasher, mut at) = (PartHasher::new(None), 0u64);
                let len = copy_base_range(&s, a, b, &mut |data| {
                    tf.write_all_at(data, at)?;
                    hasher.update(data);
                    at += data.len() as u64;
                    Ok(())
                })?;
                Ok((len, hasher.finish().0))
            })
            .await?;
            ctx.stats.add_parts_copied(len);
            (len, tag)
        }
        PartSource::Chunk(hash, scope) => {
            let h = parse_hash(&hash).ok_or_else(|| ServerError::BadRequest(format!("{hash:?} is not a hash")))?;
            let (root, index) = (Arc::clone(&ctx.root), Arc::clone(ctx.store.index()));
            let len = blocking(move || {
                let bytes = chunks::read_chunk(&root, &index, &h, scope.as_deref())?;
                tf.write_all_at(&bytes, 0).map_err(io_err("writing a part"))?;
                Ok(bytes.len() as u64)
            })
            .await?;
            ctx.stats.add_parts_copied(len);
            (len, hash.to_ascii_lowercase())
        }
    };
    let s = Arc::clone(session);
    let tag2 = tag.clone();
    blocking(move || {
        let mut temp = temp;
        let mut st = s.state.lock();
        if st.ended {
            return Err(s.gone());
        }
        std::fs::rename(&temp.path, s.dir.join(part.to_string())).map_err(io_err("storing a part"))?;
        temp.disarm();
        st.parts.insert(
            part,
            PartInfo {
                tag: tag2,
                size,
                place: Place::File,
            },
        );
        Ok(())
    })
    .await?;
    Ok(PartStored { part, tag, size })
}

/// Hands bytes `a..=b` of the session's base to `out`, in order; returns the length.
/// Blocking.
fn copy_base_range(
    session: &Session,
    a: u64,
    b: u64,
    out: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> Result<u64, ServerError> {
    let base = session
        .base
        .as_ref()
        .ok_or_else(|| ServerError::BadRequest("copy= needs a session opened with If-Match (a base)".into()))?;
    if b >= base.identity.size {
        return Err(ServerError::RangeNotSatisfiable {
            size: base.identity.size,
        });
    }
    let changed = || ServerError::PreconditionFailed;
    let io = io_err("copying from the base version");
    if Identity::of_file(&base.file).map_err(&io)? != base.identity {
        return Err(changed());
    }
    let len = b - a + 1;
    let mut buf = vec![0u8; COPY_BUF.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let want = ((len - done) as usize).min(buf.len());
        let got = read_full_at(&base.file, &mut buf[..want], a + done).map_err(&io)?;
        if got < want {
            return Err(changed());
        }
        out(&buf[..want]).map_err(io_err("writing a part"))?;
        done += want as u64;
    }
    if Identity::of_file(&base.file).map_err(&io)? != base.identity {
        return Err(changed());
    }
    Ok(len)
}

/// Whether `parts` are in-place parts that follow each other from offset 0.
fn tile_from_zero(parts: &[(u32, PartInfo)]) -> bool {
    let mut at = 0;
    parts.iter().all(|(_, info)| match info.place {
        Place::InPlace { offset, .. } if offset == at => {
            at += info.size;
            true
        }
        _ => false,
    })
}

/// `POST /file?afs=commit&upload=ID`.
pub async fn commit(
    ctx: &Arc<Ctx>,
    req: &RequestPath,
    headers: &HeaderMap,
    upload: Option<&str>,
    body: Body,
) -> Result<Response, ServerError> {
    let ups = uploads(ctx)?;
    let w = write_state(ctx)?;
    let t = resolve(ctx, req).await?;
    let use_ = ups.use_session(upload, &t.rel)?;
    let session = Arc::clone(&use_.0);
    let body = small_body(body, COMMIT_BODY_MAX).await?;
    let commit: CommitRequest =
        serde_json::from_slice(&body).map_err(|e| ServerError::BadRequest(format!("commit body: {e}")))?;
    let _guard = w.locks.lock(&t.rel).await;
    // The parts as stored now; a listed part missing, with another tag, or lost ends here.
    let (parts, assembly): (Vec<(u32, PartInfo)>, Option<Arc<File>>) = {
        let st = session.state.lock();
        if st.ended {
            return Err(session.gone());
        }
        let parts = commit
            .parts
            .iter()
            .map(|p| match st.parts.get(&p.part) {
                Some(info) if !info.tag.eq_ignore_ascii_case(&p.tag) => {
                    Err(ServerError::BadPart(format!("part {} has another tag", p.part)))
                }
                Some(PartInfo {
                    place: Place::InPlace { intact: false, .. },
                    ..
                }) => Err(ServerError::BadPart(format!(
                    "part {} was overwritten by another part written in place; send it again",
                    p.part
                ))),
                Some(info) => Ok((p.part, info.clone())),
                None => Err(ServerError::BadPart(format!("part {} was not stored", p.part))),
            })
            .collect::<Result<_, _>>()?;
        (parts, st.assembly.as_ref().map(|a| Arc::clone(&a.file)))
    };
    let tt = t.clone();
    let current = blocking(move || existing(&tt)).await?;
    if matches!(current, Existing::Dir) {
        return Err(ServerError::IsDir(t.shown));
    }
    check_conditions(ctx, headers, &t, &current).await?;
    let created = matches!(current, Existing::Nothing);
    let (ctx2, w2, s2, rel) = (Arc::clone(ctx), Arc::clone(w), Arc::clone(&session), t.rel.clone());
    let (d, new_file) = blocking(move || {
        if tile_from_zero(&parts)
            && let Some(claimed) = s2.claim_assembly(&parts)
        {
            let (d, file) = commit_in_place(&ctx2, &s2, claimed, &parts, &t, &current)?;
            return Ok((d, Some(file)));
        }
        let d = commit_by_copy(&ctx2, &w2, &s2, assembly.as_deref(), &parts, &t, &current)?;
        Ok((d, None))
    })
    .await?;
    drop(use_);
    let (u2, s3) = (Arc::clone(ups), Arc::clone(&session));
    blocking(move || {
        u2.end(&s3);
        Ok(())
    })
    .await?;
    if let Some(file) = new_file {
        ctx.store.chunk_in_background(rel, Arc::new(file));
    }
    ctx.stats.bump(Counter::Writes);
    write_response(created, &d)
}

/// The commit of in-place parts tiling the file from 0: the assembly file becomes the new
/// version as it is (cut to the parts' end), its digests made from the parts' pieces and the
/// chunks no piece covers. Its content-defined chunks are left to the caller. Blocking.
fn commit_in_place(
    ctx: &Ctx,
    session: &Session,
    assembly: Assembly,
    parts: &[(u32, PartInfo)],
    t: &WriteTarget,
    current: &Existing,
) -> Result<(Arc<FileDigests>, File), ServerError> {
    let runs: Vec<Known<'_>> = parts
        .iter()
        .filter_map(|(_, info)| match &info.place {
            Place::InPlace { offset, pieces, .. } => Some(Known {
                offset: *offset,
                len: info.size,
                pieces,
            }),
            Place::File => None,
        })
        .collect();
    let size: u64 = parts.iter().map(|(_, info)| info.size).sum();
    let digests = match scan::digests_from_pieces(&assembly.file, size, &runs) {
        Ok((digests, read)) => {
            ctx.store.count_hashed(read);
            digests
        }
        Err(e) => {
            session.give_back(assembly);
            return Err(io_err("hashing the new version")(e));
        }
    };
    keep_permissions(&assembly.temp.file, current);
    let persisted = assembly
        .temp
        .file
        .set_len(size)
        .and_then(|()| assembly.temp.persist(&t.path));
    let file = persisted.map_err(|e| {
        session.assembly_lost();
        io_err("renaming the new version into place")(e)
    })?;
    // From here on the parts are the target's bytes, whatever happens.
    session.assembly_lost();
    let id = Identity::of_file(&file).map_err(io_err("stat of the new version"))?;
    let d = ctx.store.install(&t.rel, FileDigests::new(id, digests));
    Ok((d, file))
}

/// Any other commit: the parts are copied into a new file, which is hashed whole (every part
/// checked against its tag) and renamed over the target. Blocking.
fn commit_by_copy(
    ctx: &Ctx,
    w: &super::writes::WriteState,
    session: &Session,
    assembly: Option<&File>,
    parts: &[(u32, PartInfo)],
    t: &WriteTarget,
    current: &Existing,
) -> Result<Arc<FileDigests>, ServerError> {
    let temp = w
        .dirs
        .temp_for(&t.parent)
        .map_err(io_err("creating a temporary file"))?;
    keep_permissions(&temp.file, current);
    let mut ends = Vec::with_capacity(parts.len());
    let mut at = 0u64;
    for (k, info) in parts {
        let damaged = |_| ServerError::BadPart(format!("part {k} is damaged"));
        match info.place {
            Place::File => {
                let f = File::open(session.dir.join(k.to_string())).map_err(io_err("opening a part"))?;
                copy_range(&f, 0, &temp.file, at, info.size).map_err(damaged)?;
            }
            Place::InPlace { offset, .. } => {
                let f = assembly.ok_or_else(|| ServerError::BadPart(format!("part {k} is lost")))?;
                copy_range(f, offset, &temp.file, at, info.size).map_err(damaged)?;
            }
        }
        at += info.size;
        ends.push(at);
    }
    let found = scan::scan(&temp.file, at, ends).map_err(io_err("hashing the new version"))?;
    ctx.store.count_hashed(at);
    for ((k, info), got) in parts.iter().zip(&found.segments) {
        if hex::encode(got) != info.tag.to_ascii_lowercase() {
            return Err(ServerError::BadPart(format!("part {k} changed while it was committed")));
        }
    }
    persist_and_install(ctx, temp, t, found)
}

/// `DELETE /file?afs=upload&upload=ID`.
pub async fn abort(ctx: &Arc<Ctx>, req: &RequestPath, upload: Option<&str>) -> Result<Response, ServerError> {
    let ups = uploads(ctx)?;
    let t = resolve(ctx, req).await?;
    let use_ = ups.use_session(upload, &t.rel)?;
    let (u2, s) = (Arc::clone(ups), Arc::clone(&use_.0));
    drop(use_);
    blocking(move || {
        u2.end(&s);
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(dir: &Path) -> Arc<Session> {
        Arc::new(Session {
            id: "s".into(),
            rel: PathBuf::from("f"),
            dir: dir.to_path_buf(),
            base: None,
            state: Mutex::new(SessionState {
                parts: HashMap::new(),
                last_used: Instant::now(),
                active: 0,
                ended: false,
                assembly: None,
                writing: HashMap::new(),
                next_write: 0,
                committing: false,
            }),
        })
    }

    /// Whether in-place part `k` is intact (`None`: no such in-place part).
    fn intact(s: &Session, k: u32) -> Option<bool> {
        match s.state.lock().parts.get(&k)?.place {
            Place::InPlace { intact, .. } => Some(intact),
            Place::File => None,
        }
    }

    #[test]
    fn in_place_writes_that_may_overwrite_each_other_lose_their_parts() {
        let tmp = tempfile::tempdir().unwrap();
        let (s, dir) = (session(tmp.path()), tmp.path());
        let begin = |k, offset| s.begin_in_place(k, offset, dir).unwrap().unwrap();
        // Overlapping writes at once: whichever wrote last, neither can vouch for its bytes.
        let (mut a, mut b) = (begin(1, 0), begin(2, 5));
        a.put(b"0123456789").unwrap();
        b.put(b"abcdefghij").unwrap();
        a.store().unwrap();
        assert_eq!(intact(&s, 1), Some(true));
        b.store().unwrap();
        assert_eq!((intact(&s, 1), intact(&s, 2)), (Some(false), Some(false)));
        // Disjoint writes at once keep each other.
        let (mut c, mut d) = (begin(3, 100), begin(4, 110));
        c.put(&[1; 10]).unwrap();
        d.put(&[2; 10]).unwrap();
        d.store().unwrap();
        c.store().unwrap();
        assert_eq!((intact(&s, 3), intact(&s, 4)), (Some(true), Some(true)));
        // A write cut off loses what it reached; a write running then learns of it too.
        let (mut e, mut g) = (begin(5, 105), begin(6, 95));
        e.put(&[3; 2]).unwrap();
        drop(e);
        assert_eq!(
            (intact(&s, 3), intact(&s, 4), intact(&s, 5)),
            (Some(false), Some(true), None)
        );
        g.put(&[4; 20]).unwrap();
        let stored = g.store().unwrap();
        assert_eq!((stored.part, stored.size), (6, 20));
        assert_eq!((intact(&s, 4), intact(&s, 6)), (Some(false), Some(false)));
        // Empty parts touch nothing.
        let h = begin(7, 0);
        h.store().unwrap();
        assert_eq!(intact(&s, 7), Some(true));
        let f = std::fs::read(s.state.lock().assembly.as_ref().unwrap().temp.path.clone()).unwrap();
        assert_eq!(&f[95..115], &[4; 20]);

        // A running write keeps a commit from taking the assembly; once taken, parts go to
        // their own files until it is given back.
        let running = begin(8, 200);
        assert!(s.claim_assembly(&[]).is_none());
        drop(running);
        let claimed = s.claim_assembly(&[]).unwrap();
        assert!(s.begin_in_place(9, 0, dir).unwrap().is_none());
        s.give_back(claimed);
        drop(begin(9, 0));
        // A commit that saw other records than there are now does not take it either.
        let seen = s.state.lock().parts.get(&7).cloned().unwrap();
        begin(7, 0).store().unwrap();
        assert!(s.claim_assembly(&[(7, seen.clone())]).is_some());
        let mut changed = seen;
        changed.tag = "0".repeat(64);
        s.assembly_lost();
        assert!(s.claim_assembly(&[(7, changed)]).is_none());
    }

    #[test]
    fn part_hashes_give_the_tag_and_the_aligned_pieces() {
        let bytes: Vec<u8> = (0..(2 * DIGEST_CHUNK_SIZE as usize + 77))
            .map(|i| (i * 7) as u8)
            .collect();
        for offset in [Some(0), Some(3 * DIGEST_CHUNK_SIZE), Some(5), None] {
            let mut h = PartHasher::new(offset);
            for piece in bytes.chunks(65_537) {
                h.update(piece);
            }
            let (tag, pieces) = h.finish();
            assert_eq!(tag, blake3::hash(&bytes).to_hex().as_str());
            let want = if offset.is_some_and(|o| o % DIGEST_CHUNK_SIZE == 0) {
                ChunkSums::of(&bytes)
            } else {
                ChunkSums::default()
            };
            assert_eq!(pieces, want, "{offset:?}");
        }
    }
}
