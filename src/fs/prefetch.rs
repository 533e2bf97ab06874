//! Small files of a folder fetched together. Reading many small files one after another
//! costs a round trip each; when a reader opens a small file of a listed folder, the folder's
//! other small files are fetched in the background, in name order from the one opened. The
//! reader then finds them in the cache, and opens them in passthrough mode. Where the remote
//! has bundles (the built-in server, `?afs=bundle`), the files after the one opened come in
//! one response; the rest (and everything, elsewhere) one request per file, in parallel
//! (background requests: at most half of the remote's).
//!
//! Only where listings carry versions (ETags): a version fetched ahead must be the one the
//! next `open` asks for. Each folder listing is prefetched once, and at most
//! `prefetch_folder_bytes` of it. A folder not listed yet (its names were looked up one by
//! one) is listed first, in the background.

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::Arc;

use futures_util::StreamExt;

use super::name::ValidName;
use super::{ArtifactFs, Kind, ROOT, Table};
use crate::read::Reader;
use crate::store::{DynStore, ETag, join_path};

impl ArtifactFs {
    /// A small file `ino` was opened for reading: fetch its folder's other small files.
    pub(super) fn prefetch_siblings(&self, ino: u64, size: u64) {
        self.prefetch_in_folder(ino, size, true);
    }

    /// `may_list`: list the folder first if need be.
    fn prefetch_in_folder(&self, ino: u64, size: u64, may_list: bool) {
        let max_file = self.cfg.prefetch_small_files;
        if max_file == 0 || size > max_file || !self.store.capabilities().listing_etags {
            return;
        }
        let plans = {
            let mut t = self.table.lock();
            let Some(i) = t.inodes.get(&ino) else { return };
            let (parent, name) = (i.parent, i.name.clone());
            if t.dirs.get(&parent).is_none_or(|d| d.entries.is_none()) {
                // Not listed yet (its names were looked up one by one): list it, then look
                // again.
                if may_list && let Some(me) = self.me.upgrade() {
                    tokio::spawn(async move {
                        if me.listing(parent, false).await.is_ok_and(|l| l.is_some()) {
                            me.prefetch_in_folder(ino, size, false);
                        }
                    });
                }
                return;
            }
            // This folder, and the next listed folders beside it: `find`, `tar`, `cp -r` go
            // through folders in order, and the next ones' files are then in the cache when
            // the reader gets there.
            let next = self.next_listed_folders(&t, parent, FOLDERS_AHEAD);
            std::iter::once((parent, name))
                .chain(next.into_iter().map(|n| (n, String::new())))
                .filter_map(|(dir, opened)| self.plan_folder(&mut t, dir, opened))
                .collect::<Vec<_>>()
        };
        for plan in plans {
            self.fetch_folder(plan);
        }
    }

    /// Up to `n` folders after `dir` in its parent's listing (name order), as long as they
    /// are listed too.
    fn next_listed_folders(&self, t: &Table, dir: u64, n: usize) -> Vec<u64> {
        let Some(d) = t.inodes.get(&dir).filter(|_| dir != ROOT) else {
            return Vec::new();
        };
        let (Some(parent), Some(siblings)) = (
            t.inodes.get(&d.parent),
            t.dirs.get(&d.parent).and_then(|p| p.entries.as_ref()),
        ) else {
            return Vec::new();
        };
        // A range of the sorted listing, not a walk from its start: this runs at every open
        // of a small file.
        let Ok(me) = ValidName::from_remote(&d.name) else {
            return Vec::new();
        };
        siblings
            .range((Bound::Excluded(&me), Bound::Unbounded))
            .filter(|(_, c)| c.kind == Kind::Dir)
            .take(n)
            .map_while(|(name, _)| {
                let next = *t.by_path.get(&join_path(&parent.path, name.as_str()))?;
                t.dirs.get(&next)?.entries.as_ref()?;
                Some(next)
            })
            .collect()
    }

    /// The small files of listed folder `dir` to fetch, `opened` (the file being read, if
    /// any) left out. `None` when there is nothing to do, or this listing was prefetched
    /// already.
    fn plan_folder(&self, t: &mut Table, dir: u64, opened: String) -> Option<FolderPlan> {
        let (max_file, budget) = (self.cfg.prefetch_small_files, self.cfg.prefetch_folder_bytes);
        let dir_path = t.inodes.get(&dir)?.path.clone();
        let d = t.dirs.get_mut(&dir)?;
        let entries = d.entries.clone()?;
        if d.prefetched.as_ref().is_some_and(|p| Arc::ptr_eq(p, &entries)) {
            return None;
        }
        d.prefetched = Some(entries.clone());
        // In name order from the one opened (the order `cat *` and `find` go), then the
        // ones before it.
        let (after, before): (Vec<_>, Vec<_>) = entries
            .iter()
            .filter(|(n, c)| c.kind == Kind::File && c.size > 0 && c.size <= max_file && n.as_str() != opened)
            .partition(|(n, _)| n.as_str() > opened.as_str());
        let mut left = budget;
        let wanted = after
            .into_iter()
            .chain(before)
            .filter_map(|(n, c)| Some((join_path(&dir_path, n.as_str()), c.etag.clone()?, c.size)))
            .take_while(|(_, _, size)| {
                let fits = *size <= left;
                left = left.saturating_sub(*size);
                fits
            })
            .collect::<Vec<_>>();
        (!wanted.is_empty()).then_some(FolderPlan {
            dir: dir_path,
            opened,
            wanted,
        })
    }

    fn fetch_folder(&self, plan: FolderPlan) {
        let (max_file, budget) = (self.cfg.prefetch_small_files, self.cfg.prefetch_folder_bytes);
        tracing::debug!(
            dir = plan.dir,
            files = plan.wanted.len(),
            "prefetching the small files of a folder"
        );
        let (reader, store) = (self.reader.clone(), self.store.clone());
        // Readers of these files wait for the bundle instead of fetching them again (from
        // now on: a reader may come before the task below starts).
        let guard = (store.capabilities().bundles).then(|| {
            let keys = plan.wanted.iter().map(|(p, e, _)| (p.clone(), e.clone())).collect();
            Arc::new(reader.expect_bundle(keys))
        });
        tokio::spawn(async move {
            let left = match guard {
                Some(guard) => by_bundle(&reader, &store, &plan, max_file, budget, guard).await,
                None => plan.wanted,
            };
            if !left.is_empty() {
                tracing::debug!(files = left.len(), "prefetching the rest one file at a time");
            }
            // What no bundle brought: a request each. Opening cache files touches the disk:
            // not on a runtime thread.
            tokio::task::spawn_blocking(move || {
                for (path, etag, size) in left {
                    reader
                        .open_version(&path, &etag, size)
                        .prefetch(0..size, crate::read::Ahead::Bulk);
                }
            });
        });
    }
}

/// Small files of one folder to fetch: (path, version, size) in the order to fetch them.
struct FolderPlan {
    dir: String,
    opened: String,
    wanted: Vec<(String, ETag, u64)>,
}

/// Listed folders after the one being read whose small files are fetched ahead.
const FOLDERS_AHEAD: usize = 3;

/// Files put in the cache by one blocking task, and such tasks at once.
const BATCH_FILES: usize = 16;
const FILLS: usize = 4;

/// The last component of a remote path (a bundle names files by it).
fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or_default()
}

/// Puts bundled files in the cache (blocking). Returns those it could not.
fn fill(reader: &Arc<Reader>, files: Vec<((String, ETag, u64), bytes::Bytes)>) -> Vec<(String, ETag, u64)> {
    let mut refused = Vec::new();
    for ((path, etag, size), data) in files {
        if let Err(e) = reader.open_version(&path, &etag, size).fill_whole(&data) {
            tracing::debug!(path, "a bundled file was not cached: {e}");
            refused.push((path, etag, size));
        }
    }
    refused
}

/// Fetches the files of `plan` with one bundle request where the remote has them: the files
/// after the one opened in name order, as readers go. Returns the files it did not bring.
async fn by_bundle(
    reader: &Arc<Reader>,
    store: &DynStore,
    plan: &FolderPlan,
    max_file: u64,
    budget: u64,
    guard: Arc<crate::read::BundleGuard>,
) -> Vec<(String, ETag, u64)> {
    let dir = plan.dir.as_str();
    // Files read meanwhile (a reader may be ahead of the listing this plan came from) are
    // not asked for again: the bundle starts after the first ones, if known already.
    let (wanted, after) = {
        let (reader, mut wanted, mut after) = (reader.clone(), plan.wanted.clone(), plan.opened.clone());
        let opened = after.clone();
        let known = tokio::task::spawn_blocking(move || {
            let n = wanted
                .iter()
                .take_while(|(p, e, size)| file_name(p) > opened.as_str() && reader.knows_version(p, e, *size))
                .count();
            let known: Vec<_> = wanted.drain(..n).collect();
            (wanted, known)
        });
        let Ok((wanted, known)) = known.await else {
            return plan.wanted.clone();
        };
        guard.landed(&known.iter().map(|(p, e, _)| (p.clone(), e.clone())).collect::<Vec<_>>());
        if let Some((p, ..)) = known.last() {
            after = file_name(p).to_string();
        }
        (wanted, after)
    };
    if wanted.is_empty() {
        return wanted;
    }
    let after = (!after.is_empty()).then_some(after.as_str());
    let bundle = match store.bundle(dir, after, max_file, budget).await {
        Ok(Some(b)) => b,
        Ok(None) => return wanted,
        Err(e) => {
            tracing::debug!(dir, "bundle of small files: {e}");
            return wanted;
        }
    };
    let order: Vec<String> = wanted.iter().map(|w| file_name(&w.0).to_string()).collect();
    let mut wanted: HashMap<String, (String, ETag, u64)> =
        wanted.into_iter().map(|w| (file_name(&w.0).to_string(), w)).collect();
    // Batches of files taken from the bundle, then put in the cache by a few blocking tasks
    // at once (creating cache files waits on the disk).
    let mut refused = Vec::new();
    let mut files = bundle.ready_chunks(BATCH_FILES);
    let mut fills = futures_util::stream::FuturesUnordered::new();
    while let Some(batch) = files.next().await {
        let mut take = Vec::with_capacity(batch.len());
        let mut failed = false;
        for f in batch {
            match f {
                // Only the version the listing showed (the one the next open asks for).
                Ok(f) => match wanted.remove(&f.name) {
                    Some(w) if w.1 == f.etag => take.push((w, f.data)),
                    Some(w) => {
                        wanted.insert(f.name, w);
                    }
                    None => {}
                },
                Err(e) => {
                    tracing::debug!(dir, "bundle of small files cut: {e}");
                    failed = true;
                }
            }
        }
        let (reader, guard) = (reader.clone(), guard.clone());
        fills.push(tokio::task::spawn_blocking(move || {
            let keys: Vec<_> = take.iter().map(|((p, e, _), _)| (p.clone(), e.clone())).collect();
            let refused = fill(&reader, take);
            guard.landed(&keys);
            refused
        }));
        if fills.len() >= FILLS
            && let Some(done) = fills.next().await
        {
            refused.extend(done.unwrap_or_default());
        }
        if failed {
            break;
        }
    }
    while let Some(done) = fills.next().await {
        refused.extend(done.unwrap_or_default());
    }
    for r in refused {
        wanted.insert(file_name(&r.0).to_string(), r);
    }
    // What is left, in the plan's order.
    order.into_iter().filter_map(|n| wanted.remove(&n)).collect()
}
