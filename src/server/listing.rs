//! Paged JSON listings of folders (`?afs=list`, or a plain `GET` of a folder) with their own
//! `ETag`, and the per-folder cache of sorted names.
//!
//! Owns which entries a listing shows (files and folders, symlinks only when they stay inside
//! the served folder, UTF-8 names only, never the state folder) and their order (bytewise by
//! name). The names of a folder are cached keyed on the folder's `(ino, mtime_ns, ctime_ns)`;
//! entries are stat'ed per page, so sizes and tags are always current.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use parking_lot::Mutex;

use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};

use super::auth::{Claims, Reach};
use super::digests::{DigestStore, Identity, SMALL_FILE_MAX};
use super::error::ServerError;
use super::paths::{self, Resolved, Root, STATE_DIR_NAME};
use super::range::none_match;
use super::stats::Counter;
use super::{Ctx, json_bytes_response};
use crate::protocol::{EntryKind, KIND_HEADER, ListEntry, ListPage, quote_etag};

/// Folders whose names are cached at once.
const DIR_CACHE_MAX: usize = 1024;
/// A folder changed this recently may still change within the same timestamp tick, so its
/// names are not cached yet.
const RACY_WINDOW: Duration = Duration::from_secs(1);
/// Small files hashed at once while answering one page.
const PAGE_HASH_CONCURRENCY: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DirKey {
    ino: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

/// Sorted names of one folder, valid while its key is unchanged.
type CachedNames = (DirKey, Arc<Vec<String>>);

/// Sorted UTF-8 names of recently listed folders.
#[derive(Default)]
pub struct DirCache {
    map: Mutex<HashMap<PathBuf, CachedNames>>,
}

impl DirCache {
    /// The folder's names, sorted, without non-UTF-8 names (warned) and without the state
    /// folder at the root. Blocking.
    pub(super) fn sorted_names(&self, dir: &Path, at_root: bool) -> Result<Arc<Vec<String>>, ServerError> {
        let shown = || dir.display().to_string();
        let key = dir_key(dir).map_err(|e| ServerError::io(shown(), e))?;
        if let Some((k, names)) = self.map.lock().get(dir)
            && *k == key
        {
            return Ok(Arc::clone(names));
        }
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| ServerError::io(shown(), e))? {
            let entry = entry.map_err(|e| ServerError::io(shown(), e))?;
            match entry.file_name().into_string() {
                Ok(name) if at_root && name == STATE_DIR_NAME => {}
                Ok(name) => names.push(name),
                Err(raw) => tracing::warn!(
                    dir = %dir.display(),
                    name = ?raw,
                    "leaving a name that is not UTF-8 out of the listing"
                ),
            }
        }
        names.sort_unstable();
        let names = Arc::new(names);
        let unchanged = dir_key(dir).is_ok_and(|k| k == key);
        if unchanged && !is_racy(key) {
            let mut map = self.map.lock();
            if map.len() >= DIR_CACHE_MAX
                && let Some(evict) = map.keys().next().cloned()
            {
                map.remove(&evict);
            }
            map.insert(dir.to_path_buf(), (key, Arc::clone(&names)));
        }
        Ok(names)
    }
}

fn dir_key(dir: &Path) -> std::io::Result<DirKey> {
    let id = Identity::of(&std::fs::metadata(dir)?);
    Ok(DirKey {
        ino: id.ino,
        mtime_ns: id.mtime_ns,
        ctime_ns: id.ctime_ns,
    })
}

fn is_racy(key: DirKey) -> bool {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    let newest = key.mtime_ns.max(key.ctime_ns);
    newest > now - RACY_WINDOW.as_nanos() as i64
}

/// A file of the page whose tag is not known yet.
struct Unhashed {
    index: usize,
    rel: PathBuf,
    canon: PathBuf,
    identity: Identity,
}

/// One page of the folder `dir`, shown as `shown_path`. With `scope` (a token's), entries
/// that lead outside it (symlinks) are left out.
#[allow(clippy::too_many_arguments)]
pub async fn list_page(
    root: &Arc<Root>,
    dirs: &Arc<DirCache>,
    store: &Arc<DigestStore>,
    dir: Resolved,
    shown_path: String,
    limit: usize,
    after: Option<String>,
    scope: Option<Arc<Claims>>,
) -> Result<ListPage, ServerError> {
    let (root2, dirs2, store2) = (Arc::clone(root), Arc::clone(dirs), Arc::clone(store));
    let (mut page, unhashed) = tokio::task::spawn_blocking(move || {
        let window = Window {
            limit,
            after: after.as_deref(),
            scope: scope.as_deref(),
        };
        page_blocking(&root2, &dirs2, &store2, &dir, shown_path, window)
    })
    .await
    .map_err(|e| ServerError::Internal(e.to_string()))??;

    // Small files are hashed now (sharing jobs with concurrent requests); large ones in the
    // background, and their tag is left out of this page.
    let (small, large): (Vec<_>, Vec<_>) = unhashed.into_iter().partition(|u| u.identity.size <= SMALL_FILE_MAX);
    for u in large {
        store.hash_in_background(u.rel, u.canon);
    }
    let mut tags = futures_util::stream::iter(small)
        .map(|u| async move {
            let canon = u.canon.clone();
            let file = tokio::task::spawn_blocking(move || paths::open_canonical(&canon))
                .await
                .ok()?
                .ok()?;
            let d = store.get(&u.rel, &Arc::new(file)).await.ok()?;
            // Only a tag of the version whose size and mtime the entry shows.
            (d.identity == u.identity).then(|| (u.index, d.etag.clone()))
        })
        .buffer_unordered(PAGE_HASH_CONCURRENCY);
    while let Some(tag) = tags.next().await {
        if let Some((index, etag)) = tag {
            page.entries[index].etag = Some(etag);
        }
    }
    Ok(page)
}

/// Which entries a page holds.
struct Window<'a> {
    limit: usize,
    after: Option<&'a str>,
    scope: Option<&'a Claims>,
}

fn page_blocking(
    root: &Root,
    dirs: &DirCache,
    store: &DigestStore,
    dir: &Resolved,
    shown_path: String,
    Window { limit, after, scope }: Window<'_>,
) -> Result<(ListPage, Vec<Unhashed>), ServerError> {
    let names = dirs.sorted_names(&dir.canon, dir.canon_rel.as_os_str().is_empty())?;
    let start = after.map_or(0, |a| names.partition_point(|n| n.as_str() <= a));
    let mut entries: Vec<ListEntry> = Vec::new();
    let mut unhashed = Vec::new();
    let mut next = None;
    for name in &names[start..] {
        let Some((entry, rel, canon, identity)) = stat_entry(root, dir, name) else {
            continue;
        };
        if scope.is_some_and(|c| c.reach(&rel) != Reach::Inside) {
            continue;
        }
        if entries.len() == limit {
            next = entries.last().map(|e| e.name.clone());
            break;
        }
        let mut entry = entry;
        if entry.kind == EntryKind::File {
            match store.known_blocking(&rel, identity) {
                Some(d) => entry.etag = Some(d.etag.clone()),
                None => unhashed.push(Unhashed {
                    index: entries.len(),
                    rel,
                    canon,
                    identity,
                }),
            }
        }
        entries.push(entry);
    }
    let page = ListPage {
        path: shown_path,
        entries,
        next,
    };
    Ok((page, unhashed))
}

/// The entry for `name` in `dir`, its digest key, canonical path and identity; `None` for
/// what a listing leaves out (and for names that vanished meanwhile).
pub(super) fn stat_entry(root: &Root, dir: &Resolved, name: &str) -> Option<(ListEntry, PathBuf, PathBuf, Identity)> {
    let path = dir.canon.join(name);
    let lmeta = std::fs::symlink_metadata(&path).ok()?;
    let (meta, rel, canon) = if lmeta.file_type().is_symlink() {
        let target = std::fs::canonicalize(&path).ok()?;
        let resolved = root.check_canonical(target, name).ok()?;
        let meta = std::fs::metadata(&resolved.canon).ok()?;
        (meta, resolved.canon_rel, resolved.canon)
    } else {
        if root.is_hidden(&path) {
            return None;
        }
        (lmeta, dir.canon_rel.join(name), path)
    };
    let kind = if meta.is_file() {
        EntryKind::File
    } else if meta.is_dir() {
        EntryKind::Dir
    } else {
        return None;
    };
    let identity = Identity::of(&meta);
    let entry = ListEntry {
        name: name.to_string(),
        kind,
        size: if kind == EntryKind::File { meta.size() } else { 0 },
        mtime_ns: identity.mtime_ns,
        etag: None,
    };
    Some((entry, rel, canon, identity))
}

/// `GET` of a folder: one page as JSON, with its own `ETag`, or `304` when `If-None-Match`
/// names it.
pub async fn serve_listing(
    ctx: &Ctx,
    headers: &HeaderMap,
    dir: Resolved,
    shown_path: String,
    limit: usize,
    after: Option<String>,
    scope: Option<Arc<Claims>>,
) -> Result<Response, ServerError> {
    ctx.stats.bump(Counter::Lists);
    let page = list_page(&ctx.root, &ctx.dirs, &ctx.store, dir, shown_path, limit, after, scope).await?;
    let json = serde_json::to_vec(&page).map_err(|e| ServerError::Internal(e.to_string()))?;
    let tag = page_etag(&json);
    let etag = HeaderValue::from_str(&quote_etag(&tag)).map_err(|e| ServerError::Internal(e.to_string()))?;
    let mut resp = if none_match(headers, &tag) {
        ctx.stats.bump(Counter::NotModified);
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        json_bytes_response(json)
    };
    let h = resp.headers_mut();
    h.insert(header::ETAG, etag);
    h.insert(KIND_HEADER, HeaderValue::from_static("dir"));
    if let Some(max_age) = ctx.max_age
        && let Ok(v) = HeaderValue::from_str(&format!("max-age={}", max_age.as_secs()))
    {
        h.insert(header::CACHE_CONTROL, v);
    }
    Ok(resp)
}

/// The strong tag of a serialized page.
pub fn page_etag(json: &[u8]) -> String {
    hex::encode(&blake3::hash(json).as_bytes()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::paths::parse_request_path;

    struct Fixture {
        _tmp: tempfile::TempDir,
        root: Arc<Root>,
        dirs: Arc<DirCache>,
        store: Arc<DigestStore>,
    }

    fn fixture(build: impl FnOnce(&Path)) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("root");
        std::fs::create_dir(&dir).unwrap();
        build(&dir);
        let canon = std::fs::canonicalize(&dir).unwrap();
        let state = canon.join(STATE_DIR_NAME);
        let store = Arc::new(DigestStore::new(&state));
        Fixture {
            root: Arc::new(Root::new(canon, &state)),
            dirs: Arc::new(DirCache::default()),
            store,
            _tmp: tmp,
        }
    }

    async fn page(f: &Fixture, path: &str, limit: usize, after: Option<&str>) -> ListPage {
        let dir = f.root.resolve(&parse_request_path(path).unwrap()).unwrap();
        list_page(
            &f.root,
            &f.dirs,
            &f.store,
            dir,
            path.trim_matches('/').to_string(),
            limit,
            after.map(str::to_string),
            None,
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn lists_sorted_pages_with_kinds_sizes_and_tags() {
        let f = fixture(|d| {
            std::fs::write(d.join("b"), b"bb").unwrap();
            std::fs::write(d.join("a"), b"a").unwrap();
            std::fs::create_dir(d.join("C")).unwrap();
            std::fs::write(d.join("C/inner"), b"x").unwrap();
            std::os::unix::fs::symlink("/etc", d.join("out")).unwrap();
            std::os::unix::fs::symlink("b", d.join("to-b")).unwrap();
            std::os::unix::fs::symlink("missing", d.join("dangling")).unwrap();
        });
        let p = page(&f, "/", 2, None).await;
        let names: Vec<_> = p.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["C", "a"]);
        assert_eq!(p.next.as_deref(), Some("a"));
        assert_eq!((p.entries[0].kind, p.entries[0].size), (EntryKind::Dir, 0));
        assert_eq!(p.entries[0].etag, None);
        let want = crate::protocol::etag_from_digests(
            1,
            crate::protocol::DIGEST_CHUNK_SIZE,
            &crate::protocol::chunk_digests(b"a", crate::protocol::DIGEST_CHUNK_SIZE),
        );
        assert_eq!(p.entries[1].etag.as_deref(), Some(want.as_str()));

        let p = page(&f, "/", 2, Some("a")).await;
        let names: Vec<_> = p.entries.iter().map(|e| e.name.as_str()).collect();
        // `.artifactfs`, `dangling` and `out` are left out; `to-b` is the file `b`.
        assert_eq!(names, ["b", "to-b"]);
        assert_eq!(p.next, None);
        assert_eq!(p.entries[1].size, 2);
        assert_eq!(p.entries[0].etag, p.entries[1].etag);
        assert!(p.entries[0].etag.is_some());

        let p = page(&f, "/C/", 10, None).await;
        assert_eq!(p.path, "C");
        assert_eq!(p.entries.len(), 1);
    }

    #[tokio::test]
    async fn large_files_without_known_tags_are_hashed_in_the_background() {
        let f = fixture(|d| {
            std::fs::write(d.join("big"), vec![7u8; SMALL_FILE_MAX as usize + 1]).unwrap();
        });
        let p = page(&f, "/", 10, None).await;
        assert_eq!(p.entries[0].etag, None);
        let mut tagged = None;
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let p = page(&f, "/", 10, None).await;
            if p.entries[0].etag.is_some() {
                tagged = p.entries[0].etag.clone();
                break;
            }
        }
        assert!(tagged.is_some(), "background hashing never finished");
        assert_eq!(f.store.files_hashed(), 1);
    }

    #[test]
    fn names_are_cached_until_the_folder_changes() {
        let f = fixture(|d| std::fs::write(d.join("x"), b"").unwrap());
        let dir = f.root.path().to_path_buf();
        let old = SystemTime::now() - Duration::from_secs(60);
        let set_old = || {
            std::fs::File::open(&dir).unwrap().set_modified(old).unwrap();
        };
        set_old();
        // ctime is now; the first listing is racy and not cached.
        let first = f.dirs.sorted_names(&dir, true).unwrap();
        assert_eq!(*first, ["x"]);
        assert!(f.dirs.map.lock().is_empty());
        // Simulate an old folder by inserting under its real key.
        let key = dir_key(&dir).unwrap();
        f.dirs
            .map
            .lock()
            .insert(dir.clone(), (key, Arc::new(vec!["cached".into()])));
        assert_eq!(*f.dirs.sorted_names(&dir, true).unwrap(), ["cached"]);
        std::fs::write(dir.join("y"), b"").unwrap();
        assert_eq!(*f.dirs.sorted_names(&dir, true).unwrap(), ["x", "y"]);
    }
}
