//! Per-inode I/O modes. A file complete in the cache can be opened in *passthrough* mode: the
//! kernel then reads the cache file directly, with no request reaching the daemon. The kernel
//! refuses to mix passthrough opens and ordinary (page-cache) opens of one inode (the open
//! fails with `EIO`), so every open asks here which mode it may have:
//!
//! - a read-only open of a complete, checked version with no ordinary open of the inode gets
//!   passthrough (all passthrough opens of an inode share one backing file);
//! - any other read-only open is ordinary;
//! - an open for writing (and a truncation, and a write) needs the inode free of passthrough
//!   opens: the kernel would send writes to the cache file, behind our back. While a file is
//!   read in passthrough mode, opening it for writing fails with `ETXTBSY`, as writing a running
//!   program does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::FsError;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    ordinary: u32,
    passthrough: u32,
}

/// The open handles of each inode, by mode.
#[derive(Debug)]
pub struct IoModes {
    enabled: AtomicBool,
    inodes: Mutex<HashMap<u64, Counts>>,
    /// Woken whenever a handle closes.
    closed: tokio::sync::Notify,
}

/// The mode an open got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ordinary,
    Passthrough,
}

impl IoModes {
    pub fn new(enabled: bool) -> Self {
        IoModes {
            enabled: AtomicBool::new(enabled),
            inodes: Mutex::new(HashMap::new()),
            closed: tokio::sync::Notify::new(),
        }
    }

    /// Whether passthrough may be offered at all.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Turns passthrough off for good (the kernel or our privileges do not allow it).
    pub fn disable(&self) {
        self.enabled.store(false, Ordering::Release);
    }

    /// An ordinary open (or a change made without a handle, held for its duration). Refused
    /// while passthrough opens hold the inode.
    pub fn open_ordinary(&self, ino: u64) -> Result<(), FsError> {
        let mut m = self.inodes.lock();
        let c = m.entry(ino).or_default();
        if c.passthrough > 0 {
            return Err(FsError::Busy);
        }
        c.ordinary += 1;
        Ok(())
    }

    /// [`open_ordinary`](Self::open_ordinary), waiting up to `limit` for passthrough handles
    /// to close first. The kernel leaves passthrough mode when the last reader closes, but
    /// tells the daemon (`RELEASE`) in the background: `cat f; echo x >> f` would otherwise
    /// fail with `ETXTBSY` now and then. A reader that really holds the file costs the writer
    /// `limit` before the refusal.
    pub async fn open_ordinary_within(&self, ino: u64, limit: std::time::Duration) -> Result<(), FsError> {
        let wait = async {
            loop {
                let woken = self.closed.notified();
                match self.open_ordinary(ino) {
                    Err(FsError::Busy) => woken.await,
                    done => return done,
                }
            }
        };
        tokio::time::timeout(limit, wait).await.unwrap_or(Err(FsError::Busy))
    }

    /// A read-only open of a version complete in the cache: passthrough unless ordinary
    /// opens hold the inode (then `false`, and the caller opens it the ordinary way).
    pub fn open_passthrough(&self, ino: u64) -> bool {
        if !self.enabled() {
            return false;
        }
        let mut m = self.inodes.lock();
        let c = m.entry(ino).or_default();
        if c.ordinary > 0 {
            return false;
        }
        c.passthrough += 1;
        true
    }

    /// Whether passthrough opens hold the inode.
    pub fn in_passthrough(&self, ino: u64) -> bool {
        self.inodes.lock().get(&ino).is_some_and(|c| c.passthrough > 0)
    }

    /// A handle of `mode` closed.
    pub fn close(&self, ino: u64, mode: Mode) {
        let mut m = self.inodes.lock();
        if let Some(c) = m.get_mut(&ino) {
            match mode {
                Mode::Ordinary => c.ordinary = c.ordinary.saturating_sub(1),
                Mode::Passthrough => c.passthrough = c.passthrough.saturating_sub(1),
            }
            if *c == Counts::default() {
                m.remove(&ino);
            }
        }
        drop(m);
        self.closed.notify_waiters();
    }

    /// Waits up to `limit` for the ordinary handles of `ino` to close. The kernel sends a
    /// handle's `RELEASE` in the background after `close` returns, so a program that closes a
    /// file and opens it again (or the next program in a pipeline) often opens before the
    /// daemon hears of the close; without the wait that open could not be passthrough.
    /// Returns whether none is left.
    pub async fn ordinary_closed(&self, ino: u64, limit: std::time::Duration) -> bool {
        let none = || self.inodes.lock().get(&ino).is_none_or(|c| c.ordinary == 0);
        let wait = async {
            loop {
                let woken = self.closed.notified();
                if none() {
                    return;
                }
                woken.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }

    /// A passthrough open the kernel could not be given: it is served as an ordinary one.
    pub fn downgrade(&self, ino: u64) {
        let mut m = self.inodes.lock();
        let c = m.entry(ino).or_default();
        c.passthrough = c.passthrough.saturating_sub(1);
        c.ordinary += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passthrough_and_ordinary_opens_never_mix() {
        let io = IoModes::new(true);
        // Readers of a complete file share passthrough.
        assert!(io.open_passthrough(7));
        assert!(io.open_passthrough(7));
        // Any ordinary open is refused while they read: the kernel would fail it.
        assert!(matches!(io.open_ordinary(7), Err(FsError::Busy)));
        assert_eq!(FsError::Busy.errno(), libc::ETXTBSY);
        io.close(7, Mode::Passthrough);
        io.close(7, Mode::Passthrough);
        assert!(!io.in_passthrough(7));
        // Now an ordinary open may go; readers arriving meanwhile are ordinary too.
        io.open_ordinary(7).unwrap();
        assert!(!io.open_passthrough(7));
        io.open_ordinary(7).unwrap();
        io.close(7, Mode::Ordinary);
        io.close(7, Mode::Ordinary);
        assert!(io.inodes.lock().is_empty(), "closed inodes are forgotten");
        assert!(io.open_passthrough(7));
        // Other inodes are independent.
        io.open_ordinary(8).unwrap();
        assert!(io.open_passthrough(9));
    }

    #[tokio::test]
    async fn an_open_waits_briefly_for_releases_still_on_their_way() {
        let io = std::sync::Arc::new(IoModes::new(true));
        io.open_ordinary(3).unwrap();
        let limit = std::time::Duration::from_secs(5);
        let closer = io.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            closer.close(3, Mode::Ordinary);
        });
        assert!(io.ordinary_closed(3, limit).await, "the release came");
        assert!(io.open_passthrough(3));
        io.open_ordinary(4).unwrap();
        let t = std::time::Instant::now();
        assert!(!io.ordinary_closed(4, std::time::Duration::from_millis(20)).await);
        assert!(t.elapsed() < std::time::Duration::from_secs(1), "bounded");
    }

    #[tokio::test]
    async fn a_writer_waits_briefly_for_passthrough_releases_on_their_way() {
        let io = std::sync::Arc::new(IoModes::new(true));
        assert!(io.open_passthrough(5));
        let closer = io.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            closer.close(5, Mode::Passthrough);
        });
        let limit = std::time::Duration::from_secs(5);
        io.open_ordinary_within(5, limit).await.unwrap();
        assert!(!io.open_passthrough(5), "the writer holds it now");
        // A reader that stays: refused once the wait is over.
        assert!(io.open_passthrough(6));
        let t = std::time::Instant::now();
        let short = std::time::Duration::from_millis(30);
        assert!(matches!(io.open_ordinary_within(6, short).await, Err(FsError::Busy)));
        assert!(t.elapsed() >= short && t.elapsed() < limit);
    }

    #[test]
    fn a_refused_passthrough_becomes_ordinary_and_disabled_means_never() {
        let io = IoModes::new(true);
        assert!(io.open_passthrough(1));
        io.downgrade(1);
        io.disable();
        assert!(!io.in_passthrough(1));
        assert!(!io.open_passthrough(1));
        io.open_ordinary(1).unwrap();
        io.close(1, Mode::Ordinary);
        io.close(1, Mode::Ordinary);
        assert!(io.inodes.lock().is_empty());
        assert!(!io.open_passthrough(2));
    }
}
