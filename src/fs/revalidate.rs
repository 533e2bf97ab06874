//! Background revalidation. Every `revalidate_interval` (60 s by default) the folders the
//! kernel holds are listed again, conditionally where the remote has validators (a `304`
//! costs a few hundred bytes), and what changed is acted on at once: a changed or removed
//! file moves off its inode and the kernel forgets its dentry, a new name is made known (the
//! kernel may remember it absent). Since the kernel hears of every change this way, it is
//! given long entry and attribute TTLs ([`KERNEL_TTL`]) for what those folders hold, and
//! `ls -lR`, `stat` and path lookups of an unchanged tree never wait for the remote nor, once
//! the kernel knows a name, for the daemon.
//!
//! A folder whose listing carries `Cache-Control: max-age` is left out: the remote's word
//! decides how long it is trusted, as without background revalidation. The interval is never
//! longer than `metadata.ttl`.
//!
//! The cost: one listing request per folder per interval, for the folders whose dentries the
//! kernel keeps (a folder it forgot is no longer revalidated, and is listed again when next
//! used). Files known only through a `HEAD` (their folder never listed) keep the ordinary
//! `metadata.ttl`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::{ArtifactFs, Inode, ROOT, Table};

/// What the kernel is told to trust for entries and attributes of files in revalidated
/// folders. Long: changes reach it as invalidations. Not unbounded, so that a missed
/// invalidation (the kernel refused one) heals.
pub const KERNEL_TTL: Duration = Duration::from_secs(3600);

/// Rounds never come closer than this.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Folders listed at once in a round.
const PARALLEL: usize = 4;

impl ArtifactFs {
    /// Starts the background revalidation task (when `revalidate_interval` is set). It ends
    /// with the filesystem.
    pub fn start_revalidation(self: &Arc<Self>, rt: &tokio::runtime::Handle) {
        let Some(interval) = self.interval() else { return };
        let me = Arc::downgrade(self);
        rt.spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(fs) = me.upgrade() else { return };
                let (folders, took) = {
                    let t = Instant::now();
                    (fs.revalidate_round().await, t.elapsed())
                };
                if took > interval {
                    tracing::warn!(
                        folders,
                        seconds = took.as_secs_f64(),
                        "background revalidation takes longer than metadata.revalidate_interval"
                    );
                }
            }
        });
    }

    /// Lists again every folder the kernel holds whose listing the remote has not confirmed
    /// since this round began. Returns how many folders it looked at.
    pub async fn revalidate_round(&self) -> usize {
        let since = Instant::now();
        let folders: Vec<u64> = {
            let t = self.table.lock();
            t.dirs
                .iter()
                .filter(|(ino, d)| d.entries.is_some() && d.max_age.is_none() && Self::held(&t, **ino))
                .map(|(ino, _)| *ino)
                .collect()
        };
        let n = folders.len();
        futures_util::stream::iter(folders)
            .map(|dir| async move {
                if let Err(e) = self.listing_since(dir, false, Some(since)).await {
                    tracing::debug!(dir, "background revalidation: {e}");
                }
            })
            .buffer_unordered(PARALLEL)
            .for_each(|()| async {})
            .await;
        crate::metrics::get().revalidated(n as u64);
        n
    }

    /// Whether the kernel may keep folder `ino`'s listing (`FOPEN_CACHE_DIR`): rounds keep
    /// it honest, and invalidate it when it changes.
    pub fn kernel_may_keep_listing(&self, ino: u64) -> bool {
        let t = self.table.lock();
        self.interval().is_some()
            && t.dirs
                .get(&ino)
                .is_some_and(|d| d.entries.is_some() && d.max_age.is_none())
            && Self::held(&t, ino)
    }

    /// How often rounds run: `revalidate_interval`, or `metadata_ttl` when that is shorter
    /// (the TTL is the longest a change may go unseen).
    fn interval(&self) -> Option<Duration> {
        self.cfg
            .revalidate_interval
            .map(|i| i.min(self.cfg.metadata_ttl).max(MIN_INTERVAL))
    }

    /// Whether the kernel holds folder `ino` (and so may hold dentries in it).
    fn held(t: &Table, ino: u64) -> bool {
        ino == ROOT || t.inodes.get(&ino).is_some_and(|i| i.current && i.lookups > 0)
    }

    /// Whether background revalidation vouches for `i`: its folder's listing is kept fresh,
    /// and it is the remote's (not a file being written here, whose attributes change with
    /// every write).
    pub(super) fn kept_honest(&self, t: &Table, i: &Inode) -> bool {
        self.interval().is_some()
            && i.current
            && i.local.is_none()
            && !i.pending_create
            && !i.path.is_empty()
            && t.dirs
                .get(&i.parent)
                .is_some_and(|d| d.entries.is_some() && d.max_age.is_none())
            && Self::held(t, i.parent)
    }

    /// The root's attributes never change; with revalidation rounds on, the kernel keeps
    /// them as long as the rest.
    pub(super) fn root_ttl(&self) -> Duration {
        match self.interval() {
            Some(_) => KERNEL_TTL,
            None => self.cfg.metadata_ttl,
        }
    }

    /// How long a listing is trusted: what the remote said (`max_age`), else
    /// `metadata.ttl`, or with background revalidation at least two intervals, so that it
    /// never lapses between rounds.
    pub(super) fn listing_ttl(&self, max_age: Option<Duration>) -> Duration {
        match (max_age, self.interval()) {
            (Some(a), _) => a,
            (None, Some(i)) => self.cfg.metadata_ttl.max(i * 2),
            (None, None) => self.cfg.metadata_ttl,
        }
    }
}
