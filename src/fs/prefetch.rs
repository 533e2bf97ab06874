//! Small files of a folder fetched together. Reading many small files one after another
//! costs a round trip each; when a reader opens a small file of a listed folder, the folder's
//! other small files are fetched in the background, in parallel (background requests: at most
//! half of the remote's), in name order from the one opened. The reader then finds them in
//! the cache, and opens them in passthrough mode.
//!
//! Only where listings carry versions (ETags): a version fetched ahead must be the one the
//! next `open` asks for. Each folder listing is prefetched once, and at most
//! `prefetch_folder_bytes` of it. A folder not listed yet (its names were looked up one by
//! one) is listed first, in the background.

use std::sync::Arc;

use super::{ArtifactFs, Kind};
use crate::store::join_path;

impl ArtifactFs {
    /// A small file `ino` was opened for reading: fetch its folder's other small files.
    pub(super) fn prefetch_siblings(&self, ino: u64, size: u64) {
        self.prefetch_in_folder(ino, size, true);
    }

    /// `may_list`: list the folder first if need be.
    fn prefetch_in_folder(&self, ino: u64, size: u64, may_list: bool) {
        let (max_file, budget) = (self.cfg.prefetch_small_files, self.cfg.prefetch_folder_bytes);
        if max_file == 0 || size > max_file || !self.store.capabilities().listing_etags {
            return;
        }
        let wanted = {
            let mut t = self.table.lock();
            let Some(i) = t.inodes.get(&ino) else { return };
            let (parent, name) = (i.parent, i.name.clone());
            let Some(dir_path) = t.inodes.get(&parent).map(|d| d.path.clone()) else {
                return;
            };
            let entries = t.dirs.get(&parent).and_then(|d| d.entries.clone());
            let Some(entries) = entries else {
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
            };
            let Some(d) = t.dirs.get_mut(&parent) else { return };
            if d.prefetched.as_ref().is_some_and(|p| Arc::ptr_eq(p, &entries)) {
                return;
            }
            d.prefetched = Some(entries.clone());
            // In name order from the one opened (the order `cat *` and `find` go), then the
            // ones before it.
            let (after, before): (Vec<_>, Vec<_>) = entries
                .iter()
                .filter(|(n, c)| c.kind == Kind::File && c.size > 0 && c.size <= max_file && n.as_str() != name)
                .partition(|(n, _)| n.as_str() > name.as_str());
            let mut left = budget;
            after
                .into_iter()
                .chain(before)
                .filter_map(|(n, c)| Some((join_path(&dir_path, n.as_str()), c.etag.clone()?, c.size)))
                .take_while(|(_, _, size)| {
                    let fits = *size <= left;
                    left = left.saturating_sub(*size);
                    fits
                })
                .collect::<Vec<_>>()
        };
        if wanted.is_empty() {
            return;
        }
        tracing::debug!(files = wanted.len(), "prefetching the small files of a folder");
        // Opening cache files touches the disk: not on the thread answering the kernel.
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            for (path, etag, size) in wanted {
                reader.open_version(&path, &etag, size).prefetch(0..size);
            }
        });
    }
}
