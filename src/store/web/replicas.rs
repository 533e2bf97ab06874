//! Several base URLs serving the same tree (mirrors). File reads are spread over the healthy
//! ones, round robin; a replica that fails (connection refused, 5xx after its retries) is
//! taken out, and a background check puts it back once its base URL answers again. The first
//! URL is the primary: listings and metadata go there first, writes only there.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::Url;

#[derive(Debug)]
pub struct Replica {
    pub base: Url,
    /// Safe to log (no credentials).
    pub id: String,
    up: AtomicBool,
}

impl Replica {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }
}

#[derive(Debug)]
pub struct Replicas {
    all: Vec<Replica>,
    next: AtomicUsize,
}

impl Replicas {
    /// `bases`: (base URL, id), the primary first. Never empty.
    pub fn new(bases: Vec<(Url, String)>) -> Self {
        assert!(!bases.is_empty(), "a remote has at least one URL");
        Replicas {
            all: bases
                .into_iter()
                .map(|(base, id)| Replica {
                    base,
                    id,
                    up: AtomicBool::new(true),
                })
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// How many URLs (the primary and its mirrors).
    pub fn count(&self) -> usize {
        self.all.len()
    }

    pub fn primary(&self) -> &Replica {
        &self.all[0]
    }

    pub fn get(&self, i: usize) -> &Replica {
        &self.all[i]
    }

    /// The order to try replicas in for a file read: the healthy ones starting at the next
    /// in turn, then the ones marked down (a last resort: the mark may be out of date).
    pub fn for_read(&self) -> Vec<usize> {
        let n = self.all.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let ring = (0..n).map(|k| (start + k) % n);
        let (up, down): (Vec<usize>, Vec<usize>) = ring.partition(|&i| self.all[i].is_up());
        up.into_iter().chain(down).collect()
    }

    /// The order for metadata: the primary first unless it is down.
    pub fn for_metadata(&self) -> Vec<usize> {
        let (up, down): (Vec<usize>, Vec<usize>) = (0..self.all.len()).partition(|&i| self.all[i].is_up());
        up.into_iter().chain(down).collect()
    }

    pub fn mark_down(&self, i: usize, why: &str) {
        if self.all.len() > 1 && self.all[i].up.swap(false, Ordering::AcqRel) {
            tracing::warn!(replica = %self.all[i].id, "replica taken out: {why}");
        }
    }

    pub fn mark_up(&self, i: usize) {
        if !self.all[i].up.swap(true, Ordering::AcqRel) {
            tracing::info!(replica = %self.all[i].id, "replica healthy again, back in");
        }
    }

    /// Checks the replicas marked down every `every`, as long as `this` is alive: a replica
    /// whose base URL answers without a server error is put back.
    pub fn spawn_health_checks(this: &Arc<Self>, client: reqwest::Client, every: Duration) {
        if this.all.len() < 2 {
            return;
        }
        let weak = Arc::downgrade(this);
        // Never a busy loop, whatever the configuration says.
        let every = every.max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(r) = weak.upgrade() else { return };
                for i in 0..r.all.len() {
                    if r.all[i].is_up() {
                        continue;
                    }
                    let answer = client
                        .head(r.all[i].base.clone())
                        .timeout(every.max(Duration::from_secs(1)))
                        .send()
                        .await;
                    match answer {
                        Ok(resp) if !resp.status().is_server_error() => r.mark_up(i),
                        Ok(resp) => tracing::debug!(replica = %r.all[i].id, status = %resp.status(), "still down"),
                        Err(e) => tracing::debug!(replica = %r.all[i].id, "still down: {e}"),
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Replicas {
        Replicas::new(
            (0..3)
                .map(|i| {
                    let u = Url::parse(&format!("http://h{i}/")).unwrap();
                    (u, format!("h{i}"))
                })
                .collect(),
        )
    }

    #[test]
    fn reads_rotate_and_skip_replicas_that_are_down() {
        let r = three();
        let firsts: Vec<usize> = (0..6).map(|_| r.for_read()[0]).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
        r.mark_down(1, "test");
        for _ in 0..6 {
            let o = r.for_read();
            assert_ne!(o[0], 1);
            assert_eq!(*o.last().unwrap(), 1, "a replica that is down is the last resort");
        }
        assert_eq!(r.for_metadata(), [0, 2, 1]);
        r.mark_down(0, "test");
        assert_eq!(r.for_metadata(), [2, 0, 1]);
        r.mark_up(0);
        r.mark_up(1);
        assert_eq!(r.for_metadata(), [0, 1, 2]);
    }

    #[test]
    fn a_single_url_is_never_taken_out() {
        let r = Replicas::new(vec![(Url::parse("http://h/").unwrap(), "h".into())]);
        r.mark_down(0, "test");
        assert!(r.primary().is_up());
    }
}
