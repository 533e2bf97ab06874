//! Pure planning of reads: which chunks a read needs, how far to read ahead, and how to cut
//! the missing chunks into ranged requests. No I/O here, so every rule is unit-tested.

use std::ops::Range;

/// Readahead settings (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadaheadConfig {
    /// Window after the first sequential read.
    pub initial: u64,
    /// The window doubles per sequential read up to this.
    pub max: u64,
}

/// Per-handle readahead state: a window that grows while reads are sequential and collapses
/// on a random read, so random readers fetch only what they touch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readahead {
    /// Furthest byte read so far by the sequential stream.
    next: u64,
    window: u64,
    /// Furthest byte already handed out for prefetching: each byte is prefetched once.
    issued: u64,
    /// Never reads ahead (bounded internal reads: they know exactly what they need).
    off: bool,
}

impl Readahead {
    /// A state that never prefetches.
    pub fn disabled() -> Self {
        Readahead {
            off: true,
            ..Readahead::default()
        }
    }

    /// Records a read of `range` and returns the bytes to prefetch beyond it that were not
    /// handed out before (possibly none).
    ///
    /// A read counts as sequential when it starts within `slack` of where the stream was:
    /// the kernel issues several readahead requests at once and they reach us in any order.
    pub fn on_read(&mut self, range: &Range<u64>, size: u64, cfg: &ReadaheadConfig, slack: u64) -> Range<u64> {
        if self.off {
            return range.end..range.end;
        }
        let sequential =
            range.start <= self.next.saturating_add(slack) && range.start.saturating_add(slack) >= self.next;
        if sequential {
            self.window = if self.window == 0 {
                cfg.initial
            } else {
                (self.window * 2).min(cfg.max)
            };
            self.next = self.next.max(range.end);
        } else {
            self.window = 0;
            self.next = range.end;
            self.issued = range.end;
        }
        let end = self.next.saturating_add(self.window).min(size);
        let start = self.next.max(self.issued).min(end);
        // Once the window stops growing, each read frees only its own length of it: hand that
        // out in steps of a quarter window, so ranged requests stay long (one 1 MiB request per
        // 1 MiB read cost a request, a disk reservation and a response of overhead each).
        if end < size && end - start < self.window / 4 {
            return start..start;
        }
        self.issued = self.issued.max(end);
        start..end
    }

    pub fn window(&self) -> u64 {
        self.window
    }
}

/// Cuts the chunks in `wanted` that `missing` says are missing into runs of at most
/// `max_chunks` consecutive chunks: one ranged request each.
pub fn runs(wanted: Range<u64>, max_chunks: u64, mut missing: impl FnMut(u64) -> bool) -> Vec<Range<u64>> {
    let max_chunks = max_chunks.max(1);
    let mut out = Vec::new();
    let mut i = wanted.start;
    while i < wanted.end {
        if !missing(i) {
            i += 1;
            continue;
        }
        // `missing` is asked once per chunk: it may change between two calls (a fetch landing),
        // and a run must never be empty.
        let start = i;
        i += 1;
        while i < wanted.end && i - start < max_chunks && missing(i) {
            i += 1;
        }
        out.push(start..i);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const CFG: ReadaheadConfig = ReadaheadConfig {
        initial: 4 * MIB,
        max: 64 * MIB,
    };

    #[test]
    fn sequential_reads_grow_the_window_to_its_bound() {
        let mut ra = Readahead::default();
        let size = 1 << 40;
        let mut windows = Vec::new();
        let mut handed = MIB;
        for i in 0..5 {
            let r = ra.on_read(&(i * MIB..(i + 1) * MIB), size, &CFG, 2 * MIB);
            assert_eq!(r.start, handed, "each byte is handed out once, without gaps");
            assert_eq!(
                r.end,
                (i + 1) * MIB + ra.window(),
                "the window reaches ahead of the stream"
            );
            handed = r.end;
            windows.push(ra.window() / MIB);
        }
        assert_eq!(windows, vec![4, 8, 16, 32, 64]);
    }

    #[test]
    fn a_full_window_is_handed_out_in_quarter_window_steps() {
        let mut ra = Readahead::default();
        let size = 1 << 40;
        let mut handed = 0;
        for i in 0..200 {
            let r = ra.on_read(&(i * MIB..(i + 1) * MIB), size, &CFG, 2 * MIB);
            if !r.is_empty() {
                if handed > 0 {
                    assert_eq!(r.start, handed, "each byte is handed out once, without gaps");
                }
                if i > 5 {
                    assert_eq!(r.end - r.start, 16 * MIB, "a quarter of the 64 MiB window at a time");
                }
                handed = r.end;
            }
            // From the fifth read on, the window is at its bound.
            let ahead = handed - (i + 1) * MIB;
            assert!(
                i < 4 || (ahead > 64 * MIB - 16 * MIB && ahead <= 64 * MIB),
                "never more than a quarter window short: {ahead} at read {i}"
            );
        }
        // The tail of a file is handed out whatever its length.
        let mut ra = Readahead::default();
        let size = 70 * MIB;
        let mut end = 0;
        for i in 0..70 {
            let r = ra.on_read(&(i * MIB..(i + 1) * MIB), size, &CFG, 2 * MIB);
            end = end.max(r.end);
        }
        assert_eq!(end, size);
    }

    #[test]
    fn reordered_kernel_requests_still_count_as_sequential() {
        let mut ra = Readahead::default();
        ra.on_read(&(0..MIB), 1 << 40, &CFG, 2 * MIB);
        ra.on_read(&(2 * MIB..3 * MIB), 1 << 40, &CFG, 2 * MIB);
        ra.on_read(&(MIB..2 * MIB), 1 << 40, &CFG, 2 * MIB);
        assert_eq!(ra.window(), 16 * MIB);
    }

    #[test]
    fn a_random_read_collapses_the_window() {
        let mut ra = Readahead::default();
        for i in 0..4 {
            ra.on_read(&(i * MIB..(i + 1) * MIB), 1 << 40, &CFG, 2 * MIB);
        }
        let r = ra.on_read(&(900 * MIB..900 * MIB + 4096), 1 << 40, &CFG, 2 * MIB);
        assert!(r.is_empty());
        assert_eq!(ra.window(), 0);
        // Random 4 KiB reads keep fetching nothing extra.
        let r = ra.on_read(&(5 * MIB..5 * MIB + 4096), 1 << 40, &CFG, 2 * MIB);
        assert!(r.is_empty());
    }

    #[test]
    fn prefetch_stops_at_the_end_of_the_file() {
        let mut ra = Readahead::default();
        let r = ra.on_read(&(0..MIB), 3 * MIB, &CFG, 2 * MIB);
        assert_eq!(r, MIB..3 * MIB);
        let r = ra.on_read(&(2 * MIB..3 * MIB), 3 * MIB, &CFG, 2 * MIB);
        assert!(r.is_empty());
    }

    #[test]
    fn a_stream_resumed_after_a_random_read_prefetches_again() {
        let mut ra = Readahead::default();
        ra.on_read(&(0..MIB), 1 << 40, &CFG, 2 * MIB);
        ra.on_read(&(500 * MIB..500 * MIB + 10), 1 << 40, &CFG, 2 * MIB);
        let r = ra.on_read(&(500 * MIB + 10..501 * MIB), 1 << 40, &CFG, 2 * MIB);
        assert_eq!(r, 501 * MIB..505 * MIB);
    }

    #[test]
    fn runs_skip_present_chunks_and_respect_the_request_size() {
        let present = [2u64, 3, 9];
        let r = runs(0..12, 4, |i| !present.contains(&i));
        assert_eq!(r, vec![0..2, 4..8, 8..9, 10..12]);
        assert!(runs(0..0, 4, |_| true).is_empty());
        assert_eq!(runs(5..6, 0, |_| true), vec![5..6]);
    }
}
