//! Content-defined chunks: the in-memory index from a chunk's blake3 hash to where the
//! server holds it, `GET /file?afs=chunks`, `POST /?afs=has-chunks`, reading a chunk for an
//! upload part by its hash, and the background job that chunks every served file after start.
//!
//! Owns the rule that a chunk is only ever handed out after checking it: an index entry names
//! a file version (path and identity), and using it means opening the file, checking the
//! identity, reading the range and comparing its blake3 with the hash. Entries that fail are
//! dropped. The index is filled by the digest store whenever a file's chunks become known.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};
use parking_lot::Mutex;

use super::Ctx;
use super::auth::{Claims, Reach};
use super::digests::{Identity, read_full_at};
use super::error::ServerError;
use super::paths::{self, HIDDEN_TEMP_PREFIX, Root, STATE_DIR_NAME};
use super::range::{Precondition, Validators, evaluate_preconditions};
use super::stats::Counter;
use super::{json_response, paths::Resolved};
use crate::protocol::{CdcChunk, ChunkList, HasChunksAnswer, HasChunksRequest, quote_etag};

/// Most hashes one `has-chunks` request may ask about.
pub const HAS_CHUNKS_MAX: usize = 10_000;
/// Places remembered per hash (the same chunk in several files).
const LOCATIONS_PER_HASH: usize = 4;
/// Bound of the index (entries over all hashes); past it new files are not indexed.
const INDEX_MAX_ENTRIES: usize = 1 << 22;

/// One place the server holds a chunk: a byte range of one file version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub rel: Arc<Path>,
    pub identity: Identity,
    pub offset: u64,
    pub len: u64,
}

#[derive(Default)]
struct Inner {
    by_hash: HashMap<[u8; 32], Vec<Location>>,
    /// Per file: its version and the hashes indexed for it.
    by_file: HashMap<Arc<Path>, (Identity, Vec<CdcRef>)>,
    entries: usize,
}

#[derive(Debug, Clone, Copy)]
struct CdcRef {
    hash: [u8; 32],
    offset: u64,
    len: u64,
}

/// blake3 hash → where the server holds that chunk.
#[derive(Default)]
pub struct ChunkIndex {
    inner: Mutex<Inner>,
}

pub fn parse_hash(hex_str: &str) -> Option<[u8; 32]> {
    let mut h = [0u8; 32];
    (hex_str.len() == 64 && hex::decode_to_slice(hex_str, &mut h).is_ok()).then_some(h)
}

impl Inner {
    fn remove_file(&mut self, rel: &Path) {
        let Some((key, (_, refs))) = self.by_file.remove_entry(rel) else {
            return;
        };
        for r in refs {
            if let Some(locs) = self.by_hash.get_mut(&r.hash) {
                let before = locs.len();
                locs.retain(|l| l.rel != key);
                self.entries -= before - locs.len();
                if locs.is_empty() {
                    self.by_hash.remove(&r.hash);
                }
            }
        }
    }

    fn add_file(&mut self, rel: Arc<Path>, id: Identity, refs: Vec<CdcRef>) {
        if self.entries + refs.len() > INDEX_MAX_ENTRIES {
            return;
        }
        for r in &refs {
            let locs = self.by_hash.entry(r.hash).or_default();
            if locs.iter().any(|l| l.rel == rel) {
                continue;
            }
            if locs.len() == LOCATIONS_PER_HASH {
                locs.remove(0);
                self.entries -= 1;
            }
            locs.push(Location {
                rel: Arc::clone(&rel),
                identity: id,
                offset: r.offset,
                len: r.len,
            });
            self.entries += 1;
        }
        self.by_file.insert(rel, (id, refs));
    }
}

impl ChunkIndex {
    /// `rel` now has version `id` with chunks `cdc`; what was indexed for it before goes.
    pub fn set_file(&self, rel: &Path, id: Identity, cdc: &[CdcChunk]) {
        let refs: Vec<CdcRef> = cdc
            .iter()
            .filter_map(|c| {
                parse_hash(&c.hash).map(|hash| CdcRef {
                    hash,
                    offset: c.offset,
                    len: c.len,
                })
            })
            .collect();
        let mut inner = self.inner.lock();
        if inner.by_file.get(rel).is_some_and(|(cur, _)| *cur == id) {
            return;
        }
        inner.remove_file(rel);
        inner.add_file(Arc::from(rel), id, refs);
    }

    pub fn remove_file(&self, rel: &Path) {
        self.inner.lock().remove_file(rel);
    }

    /// Files at `from` or under it are now at `to` (same versions).
    pub fn rekey(&self, from: &Path, to: &Path) {
        let mut inner = self.inner.lock();
        let moved: Vec<Arc<Path>> = inner.by_file.keys().filter(|p| p.starts_with(from)).cloned().collect();
        for old in moved {
            let Some((id, refs)) = inner.by_file.get(&*old).cloned() else {
                continue;
            };
            inner.remove_file(&old);
            let rest = old.strip_prefix(from).unwrap_or(Path::new(""));
            let dest = if rest.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(rest)
            };
            inner.remove_file(&dest);
            inner.add_file(Arc::from(dest.as_path()), id, refs);
        }
    }

    pub fn locations(&self, hash: &[u8; 32]) -> Vec<Location> {
        self.inner.lock().by_hash.get(hash).cloned().unwrap_or_default()
    }

    /// The version of `rel` the index describes.
    fn indexed_version(&self, rel: &Path) -> Option<Identity> {
        self.inner.lock().by_file.get(rel).map(|(id, _)| *id)
    }

    /// Drops what is indexed for `rel` if it still describes version `id`.
    fn drop_stale(&self, rel: &Path, id: Identity) {
        let mut inner = self.inner.lock();
        if inner.by_file.get(rel).is_some_and(|(cur, _)| *cur == id) {
            inner.remove_file(rel);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner.lock().entries
    }
}

/// `GET /file?afs=chunks`.
pub async fn serve_chunks(
    ctx: &Ctx,
    headers: &HeaderMap,
    target: &Resolved,
    file: Arc<File>,
) -> Result<Response, ServerError> {
    let (d, cdc) = ctx.store.get_with_chunks(&target.canon_rel, &file).await?;
    let v = Validators {
        etag: &d.etag,
        last_modified_secs: d.identity.mtime_secs(),
    };
    let etag = HeaderValue::from_str(&quote_etag(&d.etag)).map_err(|e| ServerError::Internal(e.to_string()))?;
    match evaluate_preconditions(headers, &v) {
        Precondition::Proceed => {}
        Precondition::Failed => {
            ctx.stats.bump(Counter::PreconditionFailed);
            return Err(ServerError::PreconditionFailed);
        }
        Precondition::NotModified => {
            ctx.stats.bump(Counter::NotModified);
            let mut resp = Response::new(axum::body::Body::empty());
            *resp.status_mut() = http::StatusCode::NOT_MODIFIED;
            resp.headers_mut().insert(header::ETAG, etag);
            return Ok(resp);
        }
    }
    let list = ChunkList {
        etag: d.etag.clone(),
        size: d.identity.size,
        chunks: cdc.to_vec(),
    };
    let mut resp = json_response(&list)?;
    resp.headers_mut().insert(header::ETAG, etag);
    Ok(resp)
}

/// `POST /?afs=has-chunks`: one answer per hash, true when an indexed location is still the
/// version it was indexed as (one `stat` per file named, per request).
/// With a token (`scope`), only files the token may read count: a scoped token cannot learn
/// what lies outside its prefix.
pub async fn serve_has_chunks(ctx: &Ctx, body: Bytes, scope: Option<Arc<Claims>>) -> Result<Response, ServerError> {
    let req: HasChunksRequest =
        serde_json::from_slice(&body).map_err(|e| ServerError::BadRequest(format!("has-chunks body: {e}")))?;
    if req.chunks.len() > HAS_CHUNKS_MAX {
        return Err(ServerError::BadRequest(format!(
            "at most {HAS_CHUNKS_MAX} hashes per request, not {}",
            req.chunks.len()
        )));
    }
    let hashes = req
        .chunks
        .iter()
        .map(|h| parse_hash(h).ok_or_else(|| ServerError::BadRequest(format!("{h:?} is not a hex blake3 hash"))))
        .collect::<Result<Vec<_>, _>>()?;
    // Chunks of files committed a moment ago are still being indexed in the background.
    ctx.store.settle_chunking(std::time::Duration::from_secs(10)).await;
    let index = Arc::clone(ctx.store.index());
    let root = Arc::clone(&ctx.root);
    let have = tokio::task::spawn_blocking(move || {
        let mut current: HashMap<Arc<Path>, bool> = HashMap::new();
        hashes
            .iter()
            .map(|h| {
                index
                    .locations(h)
                    .iter()
                    .filter(|loc| in_scope(scope.as_deref(), &loc.rel))
                    .any(|loc| {
                        *current.entry(Arc::clone(&loc.rel)).or_insert_with(|| {
                            let now = std::fs::metadata(root.path().join(&*loc.rel)).map(|m| Identity::of(&m));
                            let fresh = now.as_ref().is_ok_and(|id| *id == loc.identity);
                            if !fresh {
                                index.drop_stale(&loc.rel, loc.identity);
                            }
                            fresh
                        })
                    })
            })
            .collect::<Vec<bool>>()
    })
    .await
    .map_err(|e| ServerError::Internal(e.to_string()))?;
    json_response(&HasChunksAnswer { have })
}

/// The bytes of the chunk named `hash`, read from a file that still has it and checked against
/// the hash; `unknown_chunk` when no place does (failed places are dropped). Blocking.
/// Only files inside `scope` (a token's prefix) are used.
pub fn read_chunk(
    root: &Root,
    index: &ChunkIndex,
    hash: &[u8; 32],
    scope: Option<&Claims>,
) -> Result<Vec<u8>, ServerError> {
    for loc in index.locations(hash).into_iter().filter(|l| in_scope(scope, &l.rel)) {
        match read_location(root, &loc, hash) {
            Some(bytes) => return Ok(bytes),
            None => index.drop_stale(&loc.rel, loc.identity),
        }
    }
    Err(ServerError::UnknownChunk(hex::encode(hash)))
}

fn in_scope(scope: Option<&Claims>, rel: &Path) -> bool {
    scope.is_none_or(|c| c.reach(rel) == Reach::Inside)
}

fn read_location(root: &Root, loc: &Location, hash: &[u8; 32]) -> Option<Vec<u8>> {
    let file = paths::open_canonical(&root.path().join(&*loc.rel)).ok()?;
    if Identity::of_file(&file).ok()? != loc.identity {
        return None;
    }
    let mut buf = vec![0u8; usize::try_from(loc.len).ok()?];
    let got = read_full_at(&file, &mut buf, loc.offset).ok()?;
    (got == buf.len() && blake3::hash(&buf).as_bytes() == hash).then_some(buf)
}

/// Chunks every file under the root, one at a time, after the server started; stale hidden
/// temporary files (from writes cut off by a crash) met on the way are removed.
pub async fn index_everything(ctx: Arc<Ctx>, started: SystemTime) {
    let mut dirs = vec![PathBuf::new()];
    let mut files = 0u64;
    while let Some(rel) = dirs.pop() {
        let root = Arc::clone(&ctx.root);
        let r = rel.clone();
        let Ok(found) = tokio::task::spawn_blocking(move || read_dir_for_index(&root, &r, started)).await else {
            return;
        };
        let (subdirs, regular) = found;
        dirs.extend(subdirs);
        for (file_rel, canon) in regular {
            let opened = tokio::task::spawn_blocking(move || paths::open_canonical(&canon)).await;
            let Ok(Ok(file)) = opened else {
                continue;
            };
            let file = Arc::new(file);
            let known = Identity::of_file(&file)
                .ok()
                .is_some_and(|id| ctx.store.index().indexed_version(&file_rel) == Some(id));
            if known {
                continue;
            }
            if let Err(e) = ctx.store.get_with_chunks(&file_rel, &file).await {
                tracing::debug!(path = %file_rel.display(), error = %e, "background chunking failed");
            }
            files += 1;
        }
    }
    tracing::debug!(files, "background chunking done");
}

/// Sub-folders and regular files of one folder (symlinks are not followed: what they reach
/// inside the root is indexed under its own path). Blocking.
#[allow(clippy::type_complexity)]
fn read_dir_for_index(root: &Root, rel: &Path, started: SystemTime) -> (Vec<PathBuf>, Vec<(PathBuf, PathBuf)>) {
    let (mut dirs, mut files) = (Vec::new(), Vec::new());
    let dir = root.path().join(rel);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return (dirs, files);
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let path = entry.path();
        if rel.as_os_str().is_empty() && name == STATE_DIR_NAME || root.is_hidden(&path) {
            continue;
        }
        let Ok(ft) = entry.file_type() else { continue };
        if name.as_encoded_bytes().starts_with(HIDDEN_TEMP_PREFIX.as_bytes()) {
            let stale = entry.metadata().and_then(|m| m.modified()).is_ok_and(|m| m < started);
            if ft.is_file() && stale {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        if ft.is_dir() {
            dirs.push(rel.join(&name));
        } else if ft.is_file() {
            files.push((rel.join(&name), path));
        }
    }
    (dirs, files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> Identity {
        Identity {
            ino: n,
            size: 10,
            mtime_ns: 0,
            ctime_ns: 0,
        }
    }

    fn chunk(offset: u64, seed: &str) -> CdcChunk {
        CdcChunk {
            offset,
            len: 5,
            hash: blake3::hash(seed.as_bytes()).to_hex().to_string(),
        }
    }

    #[test]
    fn index_follows_files_and_moves() {
        let idx = ChunkIndex::default();
        let a = [chunk(0, "x"), chunk(5, "y")];
        idx.set_file(Path::new("d/a"), id(1), &a);
        idx.set_file(Path::new("b"), id(2), &[chunk(0, "x")]);
        let hx = parse_hash(&a[0].hash).unwrap();
        let hy = parse_hash(&a[1].hash).unwrap();
        assert_eq!(idx.locations(&hx).len(), 2);
        assert_eq!(idx.len(), 3);
        // A new version replaces what was indexed for the file.
        idx.set_file(Path::new("d/a"), id(3), &[chunk(0, "z")]);
        assert_eq!(idx.locations(&hx).len(), 1);
        assert!(idx.locations(&hy).is_empty());
        idx.rekey(Path::new("d"), Path::new("e"));
        let hz = parse_hash(&chunk(0, "z").hash).unwrap();
        assert_eq!(&*idx.locations(&hz)[0].rel, Path::new("e/a"));
        idx.drop_stale(Path::new("b"), id(9));
        assert_eq!(idx.locations(&hx).len(), 1);
        idx.drop_stale(Path::new("b"), id(2));
        assert!(idx.locations(&hx).is_empty());
        idx.remove_file(Path::new("e/a"));
        assert_eq!(idx.len(), 0);
    }
}
