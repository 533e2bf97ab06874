//! Live counters of the server (`?afs=stats`), shared by every request.
//!
//! Owns only counting: a request holds an [`ActiveGuard`] for as long as its response (body
//! included) is alive, so a client that drops a body half-way still leaves `active` right.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::protocol::ServerStats;

/// The counters of `protocol::ServerStats`, as atomics.
#[derive(Debug, Default)]
pub struct Stats {
    requests: AtomicU64,
    file_bytes_sent: AtomicU64,
    gets: AtomicU64,
    ranged_gets: AtomicU64,
    heads: AtomicU64,
    lists: AtomicU64,
    digests: AtomicU64,
    not_modified: AtomicU64,
    precondition_failed: AtomicU64,
    active: AtomicU64,
    max_active: AtomicU64,
    writes: AtomicU64,
    bytes_received: AtomicU64,
    parts_copied_bytes: AtomicU64,
    bundles: AtomicU64,
    bundled_files: AtomicU64,
}

/// One counter that handlers bump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counter {
    Gets,
    RangedGets,
    Heads,
    Lists,
    Digests,
    NotModified,
    PreconditionFailed,
    Writes,
    Bundles,
    BundledFiles,
}

impl Stats {
    pub fn snapshot(&self) -> ServerStats {
        ServerStats {
            requests: self.requests.load(Relaxed),
            file_bytes_sent: self.file_bytes_sent.load(Relaxed),
            gets: self.gets.load(Relaxed),
            ranged_gets: self.ranged_gets.load(Relaxed),
            heads: self.heads.load(Relaxed),
            lists: self.lists.load(Relaxed),
            digests: self.digests.load(Relaxed),
            not_modified: self.not_modified.load(Relaxed),
            precondition_failed: self.precondition_failed.load(Relaxed),
            active: self.active.load(Relaxed),
            max_active: self.max_active.load(Relaxed),
            writes: self.writes.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
            parts_copied_bytes: self.parts_copied_bytes.load(Relaxed),
            bundles: self.bundles.load(Relaxed),
            bundled_files: self.bundled_files.load(Relaxed),
        }
    }

    /// Counts the most requests at once afresh, from those in flight now.
    pub fn restart_max_active(&self) {
        self.max_active.store(self.active.load(Relaxed), Relaxed);
    }

    /// Zeroes every counter; `active` stays live and `max_active` restarts from it.
    pub fn reset(&self) {
        for c in [
            &self.requests,
            &self.file_bytes_sent,
            &self.gets,
            &self.ranged_gets,
            &self.heads,
            &self.lists,
            &self.digests,
            &self.not_modified,
            &self.precondition_failed,
            &self.writes,
            &self.bytes_received,
            &self.parts_copied_bytes,
            &self.bundles,
            &self.bundled_files,
        ] {
            c.store(0, Relaxed);
        }
        self.max_active.store(self.active.load(Relaxed), Relaxed);
    }

    pub(crate) fn bump(&self, counter: Counter) {
        let c = match counter {
            Counter::Gets => &self.gets,
            Counter::RangedGets => &self.ranged_gets,
            Counter::Heads => &self.heads,
            Counter::Lists => &self.lists,
            Counter::Digests => &self.digests,
            Counter::NotModified => &self.not_modified,
            Counter::PreconditionFailed => &self.precondition_failed,
            Counter::Writes => &self.writes,
            Counter::Bundles => &self.bundles,
            Counter::BundledFiles => &self.bundled_files,
        };
        c.fetch_add(1, Relaxed);
    }

    pub(crate) fn add_file_bytes(&self, n: u64) {
        self.file_bytes_sent.fetch_add(n, Relaxed);
    }

    pub(crate) fn add_bytes_received(&self, n: u64) {
        self.bytes_received.fetch_add(n, Relaxed);
    }

    pub(crate) fn add_parts_copied(&self, n: u64) {
        self.parts_copied_bytes.fetch_add(n, Relaxed);
    }

    /// Counts a new request and marks it active until the guard is dropped.
    pub(crate) fn begin_request(self: &Arc<Self>) -> ActiveGuard {
        self.requests.fetch_add(1, Relaxed);
        let now = self.active.fetch_add(1, Relaxed) + 1;
        self.max_active.fetch_max(now, Relaxed);
        ActiveGuard {
            stats: Arc::clone(self),
        }
    }
}

/// Keeps a request counted in `active`; decrements on drop.
#[derive(Debug)]
pub(crate) struct ActiveGuard {
    stats: Arc<Stats>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.stats.active.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_tracks_active_and_max() {
        let s = Arc::new(Stats::default());
        let a = s.begin_request();
        let b = s.begin_request();
        assert_eq!((s.snapshot().active, s.snapshot().max_active), (2, 2));
        drop(a);
        s.bump(Counter::Gets);
        s.add_file_bytes(10);
        let snap = s.snapshot();
        assert_eq!((snap.requests, snap.active, snap.max_active), (2, 1, 2));
        assert_eq!((snap.gets, snap.file_bytes_sent), (1, 10));
        s.reset();
        let snap = s.snapshot();
        assert_eq!((snap.requests, snap.gets, snap.file_bytes_sent), (0, 0, 0));
        assert_eq!((snap.active, snap.max_active), (1, 1));
        drop(b);
        assert_eq!(s.snapshot().active, 0);
    }
}
