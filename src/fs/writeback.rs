//! `--write-back`: `close` and `fsync` record a file's changes in the journal (durable) and
//! return; an upload follows after the configured delay, retried with backoff while the
//! remote is unreachable. Journal entries a previous run left and that cannot be sent when the
//! mount starts are retried by the same loop. Unmounting ends the delays and waits for the
//! uploads at most the unmount timeout; what could not be sent stays journaled and is sent by
//! the next mount before it serves.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use parking_lot::Mutex;
use tokio::sync::watch;

use super::{ArtifactFs, FsError};
use crate::store::StoreError;
use crate::write::journal::Record;
use crate::write::staged::Staged;
use crate::write::upload::{BaseSource, UploadError};

#[derive(Debug)]
pub(crate) struct WriteBack {
    /// `--write-back`: `close`/`fsync` journal and return. Off, the journal still takes
    /// uploads that failed at `release`, to retry them.
    pub(crate) enabled: bool,
    pub(crate) delay: Duration,
    /// Inodes with an upload scheduled and not started yet.
    scheduled: Mutex<HashSet<u64>>,
    /// Uploads scheduled or running, by job number.
    jobs: Mutex<HashMap<u64, Job>>,
    next_job: AtomicU64,
    /// Set at unmount: the delays end and the uploads go at once.
    now: watch::Sender<bool>,
}

/// What a background upload sends.
#[derive(Debug, Clone)]
enum Job {
    /// The changes of a file of this mount.
    Inode(u64),
    /// A journal entry a previous run left, for this path.
    Entry(String),
}

/// The work of a job, owned by its task.
enum Work {
    Inode(u64),
    Entry(Box<(Record, Staged)>),
}

/// How an upload attempt went.
enum Attempt {
    /// Sent.
    Done,
    /// Not sent, and settled for good: kept with the conflicts.
    Kept,
    /// May pass: tried again after a while.
    Retry(String),
    /// Will not pass: given up, said in the log.
    Failed(String),
}

impl WriteBack {
    pub(crate) fn new(mode: Option<Duration>) -> Self {
        WriteBack {
            enabled: mode.is_some(),
            delay: mode.unwrap_or(Duration::from_secs(1)),
            scheduled: Mutex::new(HashSet::new()),
            jobs: Mutex::new(HashMap::new()),
            next_job: AtomicU64::new(1),
            now: watch::channel(false).0,
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

/// Waits `d`, or less once the unmount asks for the uploads: at once for a delay
/// (`skip_when_draining`), else the wait in progress ends and later ones run in full.
async fn pause(now: &mut watch::Receiver<bool>, d: Duration, skip_when_draining: bool) {
    if *now.borrow_and_update() {
        if !skip_when_draining {
            tokio::time::sleep(d).await;
        }
        return;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = now.wait_for(|n| *n) => {}
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
        if !self.write_back.scheduled.lock().insert(ino) {
            return;
        }
        let delay = self.write_back.delay;
        self.spawn_job(Job::Inode(ino), Work::Inode(ino), delay, true);
    }

    /// Runs `work` in the background after `first_wait`, then again with backoff while it
    /// fails in a way that may pass.
    fn spawn_job(&self, job: Job, mut work: Work, first_wait: Duration, is_delay: bool) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let wb = &self.write_back;
        let id = wb.next_job.fetch_add(1, Ordering::Relaxed);
        wb.jobs.lock().insert(id, job);
        let mut now = wb.now.subscribe();
        tokio::spawn(async move {
            pause(&mut now, first_wait, is_delay).await;
            if let Work::Inode(ino) = &work {
                me.write_back.scheduled.lock().remove(ino);
            }
            let mut backoff = ExponentialBuilder::default()
                .with_jitter()
                .with_min_delay(Duration::from_millis(500))
                .with_max_delay(Duration::from_secs(60))
                .without_max_times()
                .build();
            loop {
                match me.attempt(&mut work).await {
                    Attempt::Done | Attempt::Kept => break,
                    Attempt::Retry(e) => {
                        let wait = backoff.next().unwrap_or(Duration::from_secs(60));
                        tracing::warn!("write-back: {e}; trying again in {wait:?}");
                        pause(&mut now, wait, false).await;
                    }
                    Attempt::Failed(e) => {
                        tracing::error!("write-back: {e}");
                        break;
                    }
                }
            }
            me.write_back.jobs.lock().remove(&id);
        });
    }

    async fn attempt(&self, work: &mut Work) -> Attempt {
        match work {
            Work::Inode(ino) => match self.upload_inode(*ino).await {
                Ok(()) => Attempt::Done,
                Err(e @ (FsError::Upload { .. } | FsError::Remote { .. } | FsError::Read { .. })) => {
                    Attempt::Retry(e.to_string())
                }
                Err(e) => Attempt::Failed(e.to_string()),
            },
            Work::Entry(entry) => {
                let (rec, staged) = &**entry;
                self.send_entry(rec, staged).await
            }
        }
    }

    /// Uploads scheduled or running.
    pub fn pending_uploads(&self) -> usize {
        self.write_back.jobs.lock().len()
    }

    /// Sends what is pending now (the delays end), waiting at most `timeout`. Returns the
    /// paths still waiting: they stay in the journal for the next mount.
    pub async fn drain(&self, timeout: Duration) -> Vec<String> {
        let wb = &self.write_back;
        wb.now.send_replace(true);
        let end = Instant::now() + timeout;
        loop {
            if wb.jobs.lock().is_empty() {
                return Vec::new();
            }
            if Instant::now() >= end {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let jobs: Vec<Job> = wb.jobs.lock().values().cloned().collect();
        let t = self.table.lock();
        let mut left: Vec<String> = jobs
            .into_iter()
            .map(|j| match j {
                Job::Inode(ino) => t
                    .inodes
                    .get(&ino)
                    .map(|i| i.path.clone())
                    .unwrap_or_else(|| format!("(inode {ino})")),
                Job::Entry(path) => path,
            })
            .collect();
        left.sort();
        left
    }

    /// Sends a journal entry a previous run left. A conflict or a refusal keeps the whole
    /// local version with the conflicts, as at a `close`.
    async fn send_entry(&self, rec: &Record, staged: &Staged) -> Attempt {
        let base = staged
            .remote()
            .map(|r| self.reader.open_version(&rec.path, &r.etag, r.size));
        match self.uploader.upload(&rec.path, staged, &Base(base.as_ref())).await {
            Ok(_) => {
                tracing::info!(path = rec.path, "sent a change a previous run had journaled");
                self.journal.done(staged);
                Attempt::Done
            }
            Err(e @ (UploadError::Conflict | UploadError::Store(StoreError::Refused { .. }))) => {
                let kept = self
                    .keep_copy(&rec.path, staged, &base.iter().collect::<Vec<_>>())
                    .await;
                tracing::error!(
                    path = rec.path,
                    kept = %kept,
                    "a journaled change was not sent ({e}); the local version is kept"
                );
                self.journal.done(staged);
                Attempt::Kept
            }
            Err(e) => Attempt::Retry(format!("{}: {e}", rec.path)),
        }
    }

    /// Sends what a previous run left in the journal for this remote. What cannot be sent yet
    /// is retried in the background while mounted. Returns (sent, left).
    pub async fn replay_journal(&self) -> (usize, usize) {
        let entries = self.journal.pending(self.store.id());
        let (mut sent, mut left) = (0, 0);
        for (rec, staged) in entries {
            // Its bytes stay on disk until it is settled, even if this run stops first.
            staged.keep_file(true);
            match self.send_entry(&rec, &staged).await {
                Attempt::Done => sent += 1,
                Attempt::Kept => {}
                Attempt::Retry(e) | Attempt::Failed(e) => {
                    tracing::warn!(
                        path = rec.path,
                        "a journaled change could not be sent yet: {e}; retrying in the background"
                    );
                    left += 1;
                    let job = Job::Entry(rec.path.clone());
                    self.spawn_job(
                        job,
                        Work::Entry(Box::new((rec, staged))),
                        Duration::from_millis(500),
                        false,
                    );
                }
            }
        }
        self.journal.clean_orphans();
        (sent, left)
    }
}
