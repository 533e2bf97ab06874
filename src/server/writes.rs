//! The write operations on paths (`docs/PROTOCOL.md`, "Writes"): `PUT`, `DELETE`, `mkdir`,
//! `move`, and the journaled writes in place `append`, `write` and `truncate`.
//!
//! Owns the order every write follows: resolve the target, take the path's lock, look at what
//! is there (kind, then conditionals), only then read the body, make the change durable
//! (`durable.rs`, `journal.rs`), install the new version's digests, and answer. Upload
//! sessions live in `uploads.rs` and share the helpers at the end of this file.

use std::fs::{File, Permissions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};

use super::digests::{FileDigests, Identity};
use super::durable::{StateDirs, body_to_file, fsync_dir};
use super::error::ServerError;
use super::journal::{self, Journal, Record};
use super::locks::PathLocks;
use super::paths::{RequestPath, WriteTarget, parse_decoded_path};
use super::range::{Validators, write_needs_tag, write_preconditions_pass};
use super::scan;
use super::stats::Counter;
use super::{Ctx, blocking, json_response};
use crate::protocol::{WriteResult, quote_etag};

/// What writes need besides the read side: the state folders, the journal, the path locks.
pub struct WriteState {
    pub dirs: StateDirs,
    pub journal: Journal,
    pub locks: Arc<PathLocks>,
}

/// The write state, or `405` when the server could not prepare its state folder.
pub fn write_state(ctx: &Ctx) -> Result<&Arc<WriteState>, ServerError> {
    ctx.writes.as_ref().ok_or(ServerError::MethodNotAllowed)
}

/// What is at a write's target now.
pub enum Existing {
    Nothing,
    File(Arc<File>),
    Dir,
}

/// Looks at the target without following a symlink that appeared since it was resolved.
/// Blocking.
pub fn existing(t: &WriteTarget) -> Result<Existing, ServerError> {
    let meta = match std::fs::symlink_metadata(&t.path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Existing::Nothing),
        Err(e) => return Err(ServerError::io(&t.shown, e)),
    };
    if meta.is_dir() {
        return Ok(Existing::Dir);
    }
    if !meta.is_file() {
        return Err(ServerError::Forbidden(format!("{} is not a regular file", t.shown)));
    }
    let file = super::paths::open_canonical(&t.path).map_err(|e| ServerError::io(&t.shown, e))?;
    Ok(Existing::File(Arc::new(file)))
}

/// Resolves a write's target (blocking, on a blocking thread).
pub async fn resolve(ctx: &Ctx, req: &RequestPath) -> Result<WriteTarget, ServerError> {
    let (root, req) = (Arc::clone(&ctx.root), req.clone());
    blocking(move || root.resolve_for_write(&req)).await
}

/// Evaluates `If-Match` / `If-None-Match` / `If-Unmodified-Since` against what is at the
/// target, hashing the current file only when a tag is compared. Returns the current file's
/// digests when they were needed.
pub async fn check_conditions(
    ctx: &Ctx,
    headers: &HeaderMap,
    t: &WriteTarget,
    current: &Existing,
) -> Result<Option<Arc<FileDigests>>, ServerError> {
    let digests = match current {
        Existing::File(f) if write_needs_tag(headers) => Some(ctx.store.get(&t.rel, f).await?),
        _ => None,
    };
    let validators = match (current, &digests) {
        (Existing::Nothing, _) => None,
        (_, Some(d)) => Some(Validators {
            etag: &d.etag,
            last_modified_secs: d.identity.mtime_secs(),
        }),
        // A folder, or a file whose tag no condition needs: only its existence counts.
        _ => Some(Validators {
            etag: "",
            last_modified_secs: i64::MIN,
        }),
    };
    if write_preconditions_pass(headers, validators.as_ref()) {
        Ok(digests)
    } else {
        ctx.stats.bump(Counter::PreconditionFailed);
        Err(ServerError::PreconditionFailed)
    }
}

/// `200`/`201` with the new version's `WriteResult` and `ETag`.
pub fn write_response(created: bool, d: &FileDigests) -> Result<Response, ServerError> {
    let result = WriteResult {
        etag: d.etag.clone(),
        size: d.identity.size,
        mtime_ns: d.identity.mtime_ns,
    };
    let mut resp = json_response(&result)?;
    *resp.status_mut() = if created { StatusCode::CREATED } else { StatusCode::OK };
    let etag = HeaderValue::from_str(&quote_etag(&d.etag)).map_err(|e| ServerError::Internal(e.to_string()))?;
    resp.headers_mut().insert(header::ETAG, etag);
    Ok(resp)
}

fn io_err(context: &str) -> impl Fn(io::Error) -> ServerError + '_ {
    move |source| ServerError::Io {
        context: context.to_string(),
        source,
    }
}

/// Renames the finished temporary file over the target and installs the digests of the
/// bytes `scan` found in it. Blocking.
pub fn persist_and_install(
    ctx: &Ctx,
    temp: super::durable::TempFile,
    t: &WriteTarget,
    found: scan::Scan,
) -> Result<Arc<FileDigests>, ServerError> {
    let file = temp
        .persist(&t.path)
        .map_err(io_err("renaming the new version into place"))?;
    let id = Identity::of_file(&file).map_err(io_err("stat of the new version"))?;
    Ok(ctx
        .store
        .install(&t.rel, FileDigests::new(id, found.digests).with_cdc(found.cdc)))
}

/// Gives a new version the permissions of the file it replaces.
pub fn keep_permissions(temp: &File, current: &Existing) {
    if let Existing::File(f) = current
        && let Ok(meta) = f.metadata()
    {
        let _ = temp.set_permissions(Permissions::from_mode(meta.permissions().mode() & 0o7777));
    }
}

/// `PUT /file`: the body becomes the file, through a temporary file renamed over it.
pub async fn put(ctx: &Arc<Ctx>, req: &RequestPath, headers: &HeaderMap, body: Body) -> Result<Response, ServerError> {
    let w = write_state(ctx)?;
    let t = resolve(ctx, req).await?;
    let _guard = w.locks.lock(&t.rel).await;
    let tt = t.clone();
    let current = blocking(move || existing(&tt)).await?;
    if matches!(current, Existing::Dir) {
        return Err(ServerError::IsDir(t.shown));
    }
    if req.trailing_slash {
        return Err(ServerError::BadRequest(format!(
            "{}/: a file has no trailing slash",
            t.shown
        )));
    }
    check_conditions(ctx, headers, &t, &current).await?;
    let created = matches!(current, Existing::Nothing);
    let (w2, parent) = (Arc::clone(w), t.parent.clone());
    let temp = blocking(move || w2.dirs.temp_for(&parent).map_err(io_err("creating a temporary file"))).await?;
    keep_permissions(&temp.file, &current);
    let writer = temp.file.try_clone().map_err(io_err("temporary file"))?;
    let received = body_to_file(body, writer, &ctx.stats).await?;
    let ctx2 = Arc::clone(ctx);
    let d = blocking(move || {
        let found = scan::scan(&temp.file, received.len, Vec::new()).map_err(io_err("hashing the new version"))?;
        ctx2.store.count_hashed(received.len);
        persist_and_install(&ctx2, temp, &t, found)
    })
    .await?;
    ctx.stats.bump(Counter::Writes);
    write_response(created, &d)
}

/// `DELETE /file` and `DELETE /dir/` (an empty folder).
pub async fn delete(ctx: &Arc<Ctx>, req: &RequestPath, headers: &HeaderMap) -> Result<Response, ServerError> {
    let w = write_state(ctx)?;
    let t = resolve(ctx, req).await.map_err(|e| match e {
        ServerError::NoParent(p) => ServerError::NotFound(p),
        other => other,
    })?;
    let _guard = w.locks.lock(&t.rel).await;
    let tt = t.clone();
    let current = blocking(move || existing(&tt)).await?;
    match &current {
        Existing::Nothing => return Err(ServerError::NotFound(t.shown)),
        Existing::Dir if !req.trailing_slash => {
            return Err(ServerError::IsDir(format!("{} (a folder is removed as {0}/)", t.shown)));
        }
        Existing::File(_) if req.trailing_slash => {
            return Err(ServerError::NotFound(format!("{}/ (a file, not a folder)", t.shown)));
        }
        _ => {}
    }
    check_conditions(ctx, headers, &t, &current).await?;
    let ctx2 = Arc::clone(ctx);
    let is_dir = matches!(current, Existing::Dir);
    blocking(move || {
        if is_dir {
            std::fs::remove_dir(&t.path).map_err(|e| match e.raw_os_error() {
                Some(libc::ENOTEMPTY) | Some(libc::EEXIST) => ServerError::NotEmpty(t.shown.clone()),
                _ => ServerError::io(&t.shown, e),
            })?;
        } else {
            std::fs::remove_file(&t.path).map_err(|e| ServerError::io(&t.shown, e))?;
            ctx2.store.forget(&t.rel);
        }
        fsync_dir(&t.parent).map_err(io_err("fsync of the folder"))
    })
    .await?;
    ctx.stats.bump(Counter::Writes);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /dir/?afs=mkdir`.
pub async fn mkdir(ctx: &Arc<Ctx>, req: &RequestPath) -> Result<Response, ServerError> {
    let w = write_state(ctx)?;
    let t = resolve(ctx, req).await?;
    let _guard = w.locks.lock(&t.rel).await;
    blocking(move || {
        match std::fs::symlink_metadata(&t.path) {
            Ok(_) => return Err(ServerError::Exists(t.shown)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ServerError::io(&t.shown, e)),
        }
        std::fs::create_dir(&t.path).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => ServerError::Exists(t.shown.clone()),
            _ => ServerError::io(&t.shown, e),
        })?;
        fsync_dir(&t.parent).map_err(io_err("fsync of the folder"))
    })
    .await?;
    ctx.stats.bump(Counter::Writes);
    Ok(StatusCode::CREATED.into_response())
}

/// `rename(2)`, or `renameat2(RENAME_NOREPLACE)` when the destination must not exist.
fn rename(from: &Path, to: &Path, replace: bool) -> io::Result<()> {
    if replace {
        return std::fs::rename(from, to);
    }
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: both strings are NUL-terminated and live across the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `POST /path?afs=move&to=/new/path[&replace=false]`.
pub async fn move_path(
    ctx: &Arc<Ctx>,
    req: &RequestPath,
    headers: &HeaderMap,
    to: Option<&str>,
    replace: bool,
) -> Result<Response, ServerError> {
    let w = write_state(ctx)?;
    let to = to.ok_or_else(|| ServerError::BadRequest("move needs to=/destination".into()))?;
    let dest_req = parse_decoded_path(to)?;
    let src = resolve(ctx, req).await.map_err(|e| match e {
        ServerError::NoParent(p) => ServerError::NotFound(p),
        other => other,
    })?;
    let dst = resolve(ctx, &dest_req).await?;
    if dst.rel == src.rel || dst.rel.starts_with(&src.rel) {
        return Err(ServerError::BadMove(format!(
            "{} into itself ({})",
            src.shown, dst.shown
        )));
    }
    let _guards = w.locks.lock_two(&src.rel, &dst.rel).await;
    let (s2, d2) = (src.clone(), dst.clone());
    let (current, at_dest) = blocking(move || Ok((existing(&s2)?, existing(&d2)?))).await?;
    match (&current, &at_dest) {
        (Existing::Nothing, _) => return Err(ServerError::NotFound(src.shown)),
        (Existing::File(_), Existing::Dir) => return Err(ServerError::IsDir(dst.shown)),
        (Existing::Dir, Existing::File(_)) => return Err(ServerError::NotDir(dst.shown)),
        _ => {}
    }
    let digests = check_conditions(ctx, headers, &src, &current).await?;
    if !replace && !matches!(at_dest, Existing::Nothing) {
        ctx.stats.bump(Counter::PreconditionFailed);
        return Err(ServerError::PreconditionFailed);
    }
    let digests = match (&current, digests) {
        (Existing::File(f), None) => Some(ctx.store.get(&src.rel, f).await?),
        (_, d) => d,
    };
    let ctx2 = Arc::clone(ctx);
    let file = match &current {
        Existing::File(f) => Some(Arc::clone(f)),
        _ => None,
    };
    let moved = blocking(move || {
        rename(&src.path, &dst.path, replace).map_err(|e| match e.raw_os_error() {
            Some(libc::EEXIST) if !replace => ServerError::PreconditionFailed,
            Some(libc::ENOTEMPTY) | Some(libc::EEXIST) => ServerError::NotEmpty(dst.shown.clone()),
            Some(libc::EINVAL) => ServerError::BadMove(format!("{} into itself", src.shown)),
            Some(libc::EXDEV) => {
                ServerError::BadMove(format!("{} and {} are on different filesystems", src.shown, dst.shown))
            }
            _ => ServerError::io(&src.shown, e),
        })?;
        fsync_dir(&dst.parent).map_err(io_err("fsync of the folder"))?;
        if src.parent != dst.parent {
            fsync_dir(&src.parent).map_err(io_err("fsync of the folder"))?;
        }
        match (file, digests) {
            (Some(f), Some(d)) => {
                // The content is the same; rename(2) changed the inode's ctime.
                let id = Identity::of_file(&f).map_err(io_err("stat of the moved file"))?;
                ctx2.store.forget(&src.rel);
                ctx2.store.forget(&dst.rel);
                let mut moved = FileDigests::new(id, d.digests.clone());
                moved.cdc = d.cdc.clone();
                Ok(Some(ctx2.store.install(&dst.rel, moved)))
            }
            _ => {
                ctx2.store.renamed(&src.rel, &dst.rel);
                Ok(None)
            }
        }
    })
    .await
    .inspect_err(|e| {
        if matches!(e, ServerError::PreconditionFailed) {
            ctx.stats.bump(Counter::PreconditionFailed);
        }
    })?;
    ctx.stats.bump(Counter::Writes);
    match moved {
        Some(d) => write_response(false, &d),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

/// Which write in place.
#[derive(Debug, Clone, Copy)]
pub enum InPlace {
    Append { offset: u64 },
    Write { offset: u64 },
    Truncate { size: u64 },
}

/// `append`, `write` and `truncate`: journaled, applied in place, digests updated from the
/// old version's (only the touched 1 MiB chunks and the content-defined chunks from the first
/// one the change can move are computed again).
pub async fn in_place(
    ctx: &Arc<Ctx>,
    req: &RequestPath,
    headers: &HeaderMap,
    op: InPlace,
    body: Body,
) -> Result<Response, ServerError> {
    let w = write_state(ctx)?;
    let t = resolve(ctx, req).await.map_err(|e| match e {
        ServerError::NoParent(p) => ServerError::NotFound(p),
        other => other,
    })?;
    let _guard = w.locks.lock(&t.rel).await;
    let tt = t.clone();
    let current = blocking(move || existing(&tt)).await?;
    match &current {
        Existing::Nothing => return Err(ServerError::NotFound(t.shown)),
        Existing::Dir => return Err(ServerError::IsDir(t.shown)),
        Existing::File(_) if req.trailing_slash => {
            return Err(ServerError::NotFound(format!("{}/ (a file, not a folder)", t.shown)));
        }
        Existing::File(_) => {}
    }
    check_conditions(ctx, headers, &t, &current).await?;
    let tt = t.clone();
    let file =
        Arc::new(blocking(move || journal::open_target(&tt.path).map_err(|e| ServerError::io(&tt.shown, e))).await?);
    // The old version's digests: the base of the incremental update (hashed now if unknown).
    let old = ctx.store.get(&t.rel, &file).await?;
    let old_size = old.identity.size;
    match op {
        InPlace::Append { offset } if offset != old_size => {
            return Err(ServerError::OffsetMismatch { offset, size: old_size });
        }
        InPlace::Write { offset } if offset > old_size => {
            return Err(ServerError::RangeNotSatisfiable { size: old_size });
        }
        _ => {}
    }
    let w2 = Arc::clone(w);
    let pending = blocking(move || w2.journal.begin().map_err(io_err("starting a journal record"))).await?;
    let (offset, len, hash, new_size) = match op {
        InPlace::Append { offset } | InPlace::Write { offset } => {
            let writer = pending.data.try_clone().map_err(io_err("journal record"))?;
            let received = match body_to_file(body, writer, &ctx.stats).await {
                Ok(r) => r,
                Err(e) => {
                    w.journal.abandon(pending);
                    return Err(e);
                }
            };
            let end = offset + received.len;
            (offset, received.len, received.blake3, old_size.max(end))
        }
        InPlace::Truncate { size } => (size.min(old_size), 0, String::new(), size),
    };
    if len == 0 && new_size == old_size {
        // Nothing changes: no record, no new version.
        w.journal.abandon(pending);
        return write_response(false, &old);
    }
    let dirty = match op {
        InPlace::Truncate { size } => size.min(old_size)..size.max(old_size),
        _ => offset..offset + len,
    };
    let record = Record::new(&t.rel, old.identity, offset, len, hash, new_size);
    let (ctx2, w2) = (Arc::clone(ctx), Arc::clone(w));
    let d = blocking(move || {
        if let Err(e) = w2.journal.commit(&pending, &record) {
            w2.journal.abandon(pending);
            return Err(io_err("writing the journal record")(e));
        }
        let applied = journal::apply(&file, &pending.data, &record).or_else(|e| {
            tracing::warn!(path = %t.shown, error = %e, "applying a journal record failed; trying again");
            journal::apply(&file, &pending.data, &record)
        });
        if let Err(e) = applied {
            // Dropping the record keeps a later redo from clobbering writes made after this
            // one; the file may hold part of the change, as after any failed local write.
            tracing::error!(path = %t.shown, error = %e, "applying a journal record failed twice");
            let _ = w2.journal.finish(&pending.id);
            return Err(io_err("writing in place")(e));
        }
        w2.journal
            .finish(&pending.id)
            .map_err(io_err("removing the journal record"))?;
        new_digests(&ctx2, &t, &file, &old, new_size, dirty)
    })
    .await?;
    ctx.stats.bump(Counter::Writes);
    write_response(false, &d)
}

/// Digests and chunks of the version a write in place made, from the old version's. Blocking.
fn new_digests(
    ctx: &Ctx,
    t: &WriteTarget,
    file: &File,
    old: &FileDigests,
    new_size: u64,
    dirty: std::ops::Range<u64>,
) -> Result<Arc<FileDigests>, ServerError> {
    let id = Identity::of_file(file).map_err(io_err("stat after writing"))?;
    let old_size = old.identity.size;
    let (digests, hashed) =
        scan::rehash(file, &old.digests, old_size, new_size, dirty.clone()).map_err(io_err("hashing after writing"))?;
    let (cdc, chunked) = match &old.cdc {
        Some(cdc) => scan::rechunk(file, cdc, old_size, new_size, dirty),
        None => scan::chunk_file(file, new_size).map(|c| (c, new_size)),
    }
    .map_err(io_err("chunking after writing"))?;
    ctx.store.count_hashed(hashed + chunked);
    if Identity::of_file(file).map_err(io_err("stat after writing"))? != id {
        // Changed behind the server's back while it was hashed: no tag can be vouched for.
        return Err(ServerError::Busy(format!("{} changed while it was written", t.shown)));
    }
    Ok(ctx.store.install(&t.rel, FileDigests::new(id, digests).with_cdc(cdc)))
}
