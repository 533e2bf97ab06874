//! A set of byte ranges, kept sorted and merged: adjacent or overlapping ranges become one.
//! Tracks which bytes of a file were written locally.

use std::collections::BTreeMap;
use std::ops::Range;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start → end, disjoint and not touching.
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Adds `r`, merging it with every range it overlaps or touches.
    pub fn insert(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        // The range starting at or before `start` may reach it.
        if let Some((&s, &e)) = self.map.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
        }
        let covered: Vec<u64> = self.map.range(start..=end).map(|(&s, _)| s).collect();
        for s in covered {
            if let Some(e) = self.map.remove(&s) {
                end = end.max(e);
            }
        }
        self.map.insert(start, end);
    }

    /// Drops everything at or past `len`.
    pub fn truncate(&mut self, len: u64) {
        let past: Vec<u64> = self.map.range(len..).map(|(&s, _)| s).collect();
        for s in past {
            self.map.remove(&s);
        }
        if let Some((&s, e)) = self.map.range_mut(..len).next_back()
            && *e > len
        {
            *e = len;
            debug_assert!(s < len);
        }
    }

    pub fn ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.map.iter().map(|(&s, &e)| s..e)
    }

    /// Total bytes covered.
    pub fn len(&self) -> u64 {
        self.map.iter().map(|(s, e)| e - s).sum()
    }

    /// Whether every byte of `r` is covered.
    pub fn covers(&self, r: &Range<u64>) -> bool {
        if r.is_empty() {
            return true;
        }
        self.map.range(..=r.start).next_back().is_some_and(|(_, &e)| e >= r.end)
    }

    /// `r` cut into pieces, each either covered (`true`) or not (`false`), in order.
    pub fn split(&self, r: Range<u64>) -> Vec<(Range<u64>, bool)> {
        let mut out = Vec::new();
        let mut pos = r.start;
        let first = self
            .map
            .range(..=r.start)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(r.start);
        for (&s, &e) in self.map.range(first..r.end) {
            if e <= pos {
                continue;
            }
            if s > pos {
                out.push((pos..s.min(r.end), false));
            }
            let a = s.max(pos);
            let b = e.min(r.end);
            if a < b {
                out.push((a..b, true));
            }
            pos = b;
            if pos >= r.end {
                break;
            }
        }
        if pos < r.end {
            out.push((pos..r.end, false));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(rs: &[Range<u64>]) -> RangeSet {
        let mut s = RangeSet::new();
        for r in rs {
            s.insert(r.clone());
        }
        s
    }

    #[test]
    fn adjacent_and_overlapping_ranges_merge() {
        let s = set(&[10..20, 20..30, 5..12, 40..50, 45..47, 60..61]);
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![5..30, 40..50, 60..61]);
        assert_eq!(s.len(), 36);
        let s = set(&[0..10, 30..40, 5..35]);
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![0..40]);
        let s = set(&[10..20, 0..5, 5..10]);
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![0..20]);
    }

    #[test]
    fn truncation_cuts_and_drops() {
        let mut s = set(&[0..10, 20..30, 40..50]);
        s.truncate(25);
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![0..10, 20..25]);
        s.truncate(20);
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![0..10]);
        s.truncate(0);
        assert!(s.is_empty());
    }

    #[test]
    fn covers_and_split() {
        let s = set(&[10..20, 30..40]);
        assert!(s.covers(&(12..18)) && s.covers(&(10..20)) && !s.covers(&(15..25)));
        assert_eq!(
            s.split(0..50),
            vec![
                (0..10, false),
                (10..20, true),
                (20..30, false),
                (30..40, true),
                (40..50, false)
            ]
        );
        assert_eq!(s.split(15..35), vec![(15..20, true), (20..30, false), (30..35, true)]);
        assert_eq!(s.split(21..29), vec![(21..29, false)]);
        assert_eq!(s.split(10..20), vec![(10..20, true)]);
    }

    #[test]
    fn a_model_check_against_a_bitmap() {
        let mut x = 99u64;
        let mut s = RangeSet::new();
        let mut model = vec![false; 300];
        for _ in 0..2000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let a = (x >> 33) % 300;
            let b = (a + (x >> 20) % 40).min(300);
            if (x >> 60) == 0 {
                s.truncate(a);
                model[a as usize..].iter_mut().for_each(|m| *m = false);
            } else {
                s.insert(a..b);
                model[a as usize..b as usize].iter_mut().for_each(|m| *m = true);
            }
            let from_set: Vec<bool> = (0..300u64).map(|i| s.covers(&(i..i + 1))).collect();
            assert_eq!(from_set, model);
            let pieces = s.split(0..300);
            assert_eq!(pieces.iter().map(|(r, _)| r.end - r.start).sum::<u64>(), 300);
        }
    }
}
