//! `--write-back`: `close` and `fsync` record a file's changes in the journal (durable) and
//! return; an upload follows after the configured delay, retried with backoff while the
//! remote is unreachable. Unmounting drains what is pending (bounded by the unmount timeout);
//! what could not be sent stays journaled and is sent by the next mount before it serves.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use parking_lot::Mutex;

use super::{ArtifactFs, FsError};
use crate::write::upload::{BaseSource, UploadError};

#[derive(Debug)]
pub(crate) struct WriteBack {
    /// `--write-back`: `close`/`fsync` journal and return. Off, the journal still takes
    /// uploads that failed at `release`, to retry them.
    pub(crate) enabled: bool,
    pub(crate) delay: Duration,
    /// Inodes with an upload scheduled and not started yet.
    scheduled: Mutex<HashSet<u64>>,
    /// Uploads scheduled or running.
    outstanding: AtomicUsize,
}

impl WriteBack {
    pub(crate) fn new(mode: Option<Duration>) -> Self {
        WriteBack {
            enabled: mode.is_some(),
            delay: mode.unwrap_or(Duration::from_secs(1)),
            scheduled: Mutex::new(HashSet::new()),
            outstanding: AtomicUsize::new(0),
        }
    }
}

/// Reads a journaled file's base version through the read engine.
struct Base<'a>(Option<&'a Arc<crate::read::Version>>);

#[async_trait::async_trait]
impl BaseSource for Base<'_> {
    async fn read(&self, range: std::ops::Range<u64>) -> Result<bytes::Bytes, String> {
        let v = self.0.ok_or("the base version is unknown")?;
        super::mutate::read_all(v, range).await.map_err(|e| e.to_string())
    }
}

impl ArtifactFs {
    /// Records inode `ino`'s changes in the journal and schedules their upload.
    pub(super) async fn journal_inode(&self, ino: u64) -> Result<(), FsError> {
        let local = self.table.lock().inodes.get(&ino).and_then(|i| i.local.clone());
        let Some(l) = local else { return Ok(()) };
        let st = l.state.lock().await;
        if let Some(c) = &st.conflict {
            return Err(c.clone());
        }
        if st.unlinked || !st.staged.is_changed() {
            return Ok(());
        }
        self.journal
            .record(self.store.id(), &st.path, &st.staged)
            .map_err(|e| FsError::Local(format!("the write-back journal: {e}")))?;
        drop(st);
        self.schedule(ino);
        Ok(())
    }

    fn schedule(&self, ino: u64) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let wb = &self.write_back;
        if !wb.scheduled.lock().insert(ino) {
            return;
        }
        wb.outstanding.fetch_add(1, Ordering::AcqRel);
        let delay = wb.delay;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            me.write_back.scheduled.lock().remove(&ino);
            let mut backoff = ExponentialBuilder::default()
                .with_jitter()
                .with_min_delay(Duration::from_millis(500))
                .with_max_delay(Duration::from_secs(60))
                .without_max_times()
                .build();
            loop {
                match me.upload_inode(ino).await {
                    Ok(()) => break,
                    Err(e @ (FsError::Upload { .. } | FsError::Remote { .. } | FsError::Read { .. })) => {
                        let wait = backoff.next().unwrap_or(Duration::from_secs(60));
                        tracing::warn!("write-back: {e}; trying again in {wait:?}");
                        tokio::time::sleep(wait).await;
                    }
                    Err(e) => {
                        tracing::error!("write-back: {e}");
                        break;
                    }
                }
            }
            me.write_back.outstanding.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// Uploads scheduled or running.
    pub fn pending_uploads(&self) -> usize {
        self.write_back.outstanding.load(Ordering::Acquire)
    }

    /// Sends what is pending now (no more delay), waiting at most `timeout`. Returns how many
    /// files are still waiting (they stay in the journal).
    pub async fn drain(&self, timeout: Duration) -> usize {
        let wb = &self.write_back;
        let inos: Vec<u64> = wb.scheduled.lock().drain().collect();
        for ino in inos {
            // Sent here rather than by its delayed task (which then finds nothing to do).
            let _ = self.upload_inode(ino).await;
        }
        let end = Instant::now() + timeout;
        loop {
            let left = wb.outstanding.load(Ordering::Acquire);
            if left == 0 || Instant::now() >= end {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends what a previous run left in the journal for this remote. Returns (sent, left).
    pub async fn replay_journal(&self) -> (usize, usize) {
        let entries = self.journal.pending(self.store.id());
        let (mut sent, mut left) = (0, 0);
        for (rec, staged) in entries {
            let base = staged
                .remote()
                .map(|r| self.reader.open_version(&rec.path, &r.etag, r.size));
            match self.uploader.upload(&rec.path, &staged, &Base(base.as_ref())).await {
                Ok(_) => {
                    tracing::info!(path = rec.path, "sent a change a previous run had journaled");
                    self.journal.done(&staged);
                    sent += 1;
                }
                Err(e @ (UploadError::Conflict | UploadError::Store(crate::store::StoreError::Refused { .. }))) => {
                    // The whole local version, as at a `close`: the staging file holds only
                    // the bytes written here.
                    let kept = self.keep_copy(&rec.path, &staged, &base.iter().collect::<Vec<_>>()).await;
                    tracing::error!(
                        path = rec.path,
                        kept = %kept,
                        "a journaled change was not sent ({e}); the local version is kept"
                    );
                    self.journal.done(&staged);
                }
                Err(e) => {
                    tracing::warn!(path = rec.path, "a journaled change could not be sent yet: {e}");
                    staged.keep_file(true);
                    left += 1;
                }
            }
        }
        self.journal.clean_orphans();
        (sent, left)
    }
}
