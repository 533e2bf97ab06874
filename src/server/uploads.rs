//! Upload sessions (`docs/PROTOCOL.md`, "Upload sessions"): a new version of one file built
//! from parts, each new bytes, a range of the session's base version, or a chunk the server
//! holds; committed atomically like a `PUT`.
//!
//! Owns the sessions (in memory; their parts in `<state>/uploads/<id>/<part>`), their expiry
//! after `upload_ttl` without a request, and the rule that a part's file and its tag change
//! together (a retried part replaces both under the session's lock). Sessions do not survive a
//! restart: the server clears `uploads/` when it starts.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use parking_lot::Mutex;

use super::chunks::{self, parse_hash};
use super::digests::{FileDigests, Identity, read_full_at};
use super::durable::{TempFile, body_to_file, copy_range, small_body};
use super::error::ServerError;
use super::paths::RequestPath;
use super::scan;
use super::stats::Counter;
use super::writes::{
    Existing, check_conditions, existing, keep_permissions, persist_and_install, resolve, write_response, write_state,
};
use super::{Ctx, blocking, json_response};
use crate::protocol::{CommitRequest, PartStored, UploadStarted};

/// Largest commit body (10,000 part references fit many times over).
const COMMIT_BODY_MAX: usize = 4 << 20;
/// Copy buffer for ranges of the base version.
const COPY_BUF: usize = 1 << 20;

/// The version a session's `copy=` parts read from, kept open so a replaced file stays
/// readable; a change in place shows in its identity.
struct Base {
    file: Arc<File>,
    identity: Identity,
}

#[derive(Debug, Clone)]
struct PartInfo {
    tag: String,
    size: u64,
}

struct SessionState {
    parts: HashMap<u32, PartInfo>,
    last_used: Instant,
    /// Requests of the session in progress; a session in use does not expire.
    active: usize,
    ended: bool,
}

pub struct Session {
    id: String,
    /// The target, relative to the served folder.
    rel: PathBuf,
    dir: PathBuf,
    base: Option<Base>,
    state: Mutex<SessionState>,
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

    /// Ends a session: it leaves the map at once, its folder is removed. Blocking.
    fn end(&self, session: &Session) {
        session.state.lock().ended = true;
        self.sessions.lock().remove(&session.id);
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
    Chunk(String),
}

/// `PUT /file?afs=part&upload=ID&part=K[&copy=A-B | &chunk=HASH]`.
pub async fn part(
    ctx: &Arc<Ctx>,
    req: &RequestPath,
    upload: Option<&str>,
    part: Option<u32>,
    source: PartSource,
) -> Result<Response, ServerError> {
    let ups = uploads(ctx)?;
    let t = resolve(ctx, req).await?;
    let use_ = ups.use_session(upload, &t.rel)?;
    let session = Arc::clone(&use_.0);
    let part = part.ok_or_else(|| ServerError::BadRequest("part=K is missing".into()))?;
    let sdir = session.dir.clone();
    let temp = blocking(move || {
        TempFile::create_in(&sdir, &format!("{part}.tmp-")).map_err(|source| ServerError::Io {
            context: "creating a part".into(),
            source,
        })
    })
    .await?;
    let (size, tag) = match source {
        PartSource::Body(body) => {
            let writer = temp.file.try_clone().map_err(|source| ServerError::Io {
                context: "part file".into(),
                source,
            })?;
            let r = body_to_file(body, writer, &ctx.stats).await?;
            (r.len, r.blake3)
        }
        PartSource::Copy(a, b) => {
            let s = Arc::clone(&session);
            let tf = temp.file.try_clone().map_err(|source| ServerError::Io {
                context: "part file".into(),
                source,
            })?;
            let (len, tag) = blocking(move || copy_base_range(&s, a, b, &tf)).await?;
            ctx.stats.add_parts_copied(len);
            (len, tag)
        }
        PartSource::Chunk(hash) => {
            let h = parse_hash(&hash)
                .ok_or_else(|| ServerError::BadRequest(format!("{hash:?} is not a hex blake3 hash")))?;
            let (root, index) = (Arc::clone(&ctx.root), Arc::clone(ctx.store.index()));
            let tf = temp.file.try_clone().map_err(|source| ServerError::Io {
                context: "part file".into(),
                source,
            })?;
            let len = blocking(move || {
                let bytes = chunks::read_chunk(&root, &index, &h)?;
                std::os::unix::fs::FileExt::write_all_at(&tf, &bytes, 0).map_err(|source| ServerError::Io {
                    context: "writing a part".into(),
                    source,
                })?;
                Ok(bytes.len() as u64)
            })
            .await?;
            ctx.stats.add_parts_copied(len);
            (len, hash.to_ascii_lowercase())
        }
    };
    let s = Arc::clone(&session);
    let tag2 = tag.clone();
    blocking(move || {
        let mut temp = temp;
        let mut st = s.state.lock();
        if st.ended {
            return Err(ServerError::NoSuchUpload(s.id.clone()));
        }
        std::fs::rename(&temp.path, s.dir.join(part.to_string())).map_err(|source| ServerError::Io {
            context: "storing a part".into(),
            source,
        })?;
        temp.disarm();
        st.parts.insert(part, PartInfo { tag: tag2, size });
        Ok(())
    })
    .await?;
    drop(use_);
    json_response(&PartStored { part, tag, size })
}

/// Copies bytes `a..=b` of the session's base into `out`; returns the length and hex blake3.
/// Blocking.
fn copy_base_range(session: &Session, a: u64, b: u64, out: &File) -> Result<(u64, String), ServerError> {
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
    let io = |source| ServerError::Io {
        context: "copying from the base version".into(),
        source,
    };
    if Identity::of_file(&base.file).map_err(io)? != base.identity {
        return Err(changed());
    }
    let len = b - a + 1;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; COPY_BUF.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let want = ((len - done) as usize).min(buf.len());
        let got = read_full_at(&base.file, &mut buf[..want], a + done).map_err(io)?;
        if got < want {
            return Err(changed());
        }
        hasher.update(&buf[..want]);
        std::os::unix::fs::FileExt::write_all_at(out, &buf[..want], done).map_err(io)?;
        done += want as u64;
    }
    if Identity::of_file(&base.file).map_err(io)? != base.identity {
        return Err(changed());
    }
    Ok((len, hasher.finalize().to_hex().to_string()))
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
    // The parts as stored now; a listed part missing or with another tag ends here.
    let parts: Vec<(u32, PartInfo)> = {
        let st = session.state.lock();
        commit
            .parts
            .iter()
            .map(|p| match st.parts.get(&p.part) {
                Some(info) if info.tag.eq_ignore_ascii_case(&p.tag) => Ok((p.part, info.clone())),
                Some(_) => Err(ServerError::BadPart(format!("part {} has another tag", p.part))),
                None => Err(ServerError::BadPart(format!("part {} was not stored", p.part))),
            })
            .collect::<Result<_, _>>()?
    };
    let tt = t.clone();
    let current = blocking(move || existing(&tt)).await?;
    if matches!(current, Existing::Dir) {
        return Err(ServerError::IsDir(t.shown));
    }
    check_conditions(ctx, headers, &t, &current).await?;
    let created = matches!(current, Existing::Nothing);
    let (ctx2, w2, s2) = (Arc::clone(ctx), Arc::clone(w), Arc::clone(&session));
    let d = blocking(move || -> Result<Arc<FileDigests>, ServerError> {
        let io = |context: &'static str| {
            move |source| ServerError::Io {
                context: context.into(),
                source,
            }
        };
        let temp = w2.dirs.temp_for(&t.parent).map_err(io("creating a temporary file"))?;
        keep_permissions(&temp.file, &current);
        let mut ends = Vec::with_capacity(parts.len());
        let mut at = 0u64;
        for (k, info) in &parts {
            let f = File::open(s2.dir.join(k.to_string())).map_err(io("opening a part"))?;
            copy_range(&f, 0, &temp.file, at, info.size)
                .map_err(|_| ServerError::BadPart(format!("part {k} is damaged")))?;
            at += info.size;
            ends.push(at);
        }
        let found = scan::scan(&temp.file, at, ends).map_err(io("hashing the new version"))?;
        ctx2.store.count_hashed(at);
        for ((k, info), got) in parts.iter().zip(&found.segments) {
            if hex::encode(got) != info.tag.to_ascii_lowercase() {
                return Err(ServerError::BadPart(format!("part {k} changed while it was committed")));
            }
        }
        let d = persist_and_install(&ctx2, temp, &t, found)?;
        Ok(d)
    })
    .await?;
    drop(use_);
    let (u2, s3) = (Arc::clone(ups), Arc::clone(&session));
    blocking(move || {
        u2.end(&s3);
        Ok(())
    })
    .await?;
    ctx.stats.bump(Counter::Writes);
    write_response(created, &d)
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
