//! One async lock per path, held for the whole of a write so writes to one path run one at a
//! time, in arrival order (`tokio::sync::Mutex` is fair).
//!
//! Owns only the map of locks: an entry lives while someone holds or waits for it and is
//! removed by the last guard to go.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::OwnedMutexGuard;

type Lock = Arc<tokio::sync::Mutex<()>>;

#[derive(Default)]
pub struct PathLocks {
    map: Mutex<HashMap<PathBuf, Lock>>,
}

/// Holds the lock of one path; dropping it lets the next writer in.
pub struct PathGuard {
    locks: Arc<PathLocks>,
    key: PathBuf,
    lock: Lock,
    guard: Option<OwnedMutexGuard<()>>,
}

impl PathLocks {
    /// Waits for the lock of `rel` (relative to the served folder).
    pub async fn lock(self: &Arc<Self>, rel: &Path) -> PathGuard {
        let lock = Arc::clone(self.map.lock().entry(rel.to_path_buf()).or_default());
        let guard = Arc::clone(&lock).lock_owned().await;
        PathGuard {
            locks: Arc::clone(self),
            key: rel.to_path_buf(),
            lock,
            guard: Some(guard),
        }
    }

    /// Locks of two paths (a move), taken in path order so two moves cannot deadlock.
    pub async fn lock_two(self: &Arc<Self>, a: &Path, b: &Path) -> (PathGuard, Option<PathGuard>) {
        if a == b {
            return (self.lock(a).await, None);
        }
        let (first, second) = if a < b { (a, b) } else { (b, a) };
        let g1 = self.lock(first).await;
        let g2 = self.lock(second).await;
        (g1, Some(g2))
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }
}

impl Drop for PathGuard {
    fn drop(&mut self) {
        let mut map = self.locks.map.lock();
        self.guard.take();
        // Ours and the map's: nobody else holds or waits.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_writer_at_a_time_in_order_and_entries_are_cleaned() {
        let locks = Arc::new(PathLocks::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = locks.lock(Path::new("a")).await;
        let mut tasks = Vec::new();
        for i in 0..5 {
            let (locks, order) = (Arc::clone(&locks), Arc::clone(&order));
            tasks.push(tokio::spawn(async move {
                let _g = locks.lock(Path::new("a")).await;
                order.lock().push(i);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }));
            // Arrival order is the order of the calls.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let other = locks.lock(Path::new("b")).await;
        assert_eq!(locks.len(), 2);
        drop(other);
        assert!(order.lock().is_empty());
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock(), [0, 1, 2, 3, 4]);
        assert_eq!(locks.len(), 0);
        let (g1, g2) = locks.lock_two(Path::new("y"), Path::new("x")).await;
        assert!(g2.is_some());
        drop((g1, g2));
        assert_eq!(locks.len(), 0);
    }
}
