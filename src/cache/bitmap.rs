//! A fixed-size bitmap of atomics: one bit per chunk, set with release and read with acquire
//! ordering, so a reader that sees a chunk's bit also sees the chunk's bytes.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub struct Bitmap {
    words: Box<[AtomicU64]>,
    len: u64,
}

impl Bitmap {
    pub fn new(len: u64) -> Self {
        let words = (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Bitmap { words, len }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn get(&self, i: u64) -> bool {
        debug_assert!(i < self.len);
        self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; returns whether it was clear before.
    pub fn set(&self, i: u64) -> bool {
        let bit = 1 << (i % 64);
        self.words[(i / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// Clears bit `i`; returns whether it was set before.
    pub fn clear(&self, i: u64) -> bool {
        let bit = 1 << (i % 64);
        self.words[(i / 64) as usize].fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire).count_ones() as u64)
            .sum()
    }

    /// The bits as words, to carry them over to another bitmap of the same length.
    pub fn words(&self) -> Vec<u64> {
        self.words.iter().map(|w| w.load(Ordering::Acquire)).collect()
    }

    /// A bitmap of `len` bits from [`Bitmap::words`], keeping only the bits also set in `mask`.
    pub fn from_words_masked(len: u64, words: &[u64], mask: &Bitmap) -> Self {
        let out = Bitmap::new(len);
        for (i, w) in out.words.iter().enumerate() {
            let v = words.get(i).copied().unwrap_or(0) & mask.words[i].load(Ordering::Acquire);
            w.store(v, Ordering::Relaxed);
        }
        out
    }

    /// Hex of the bits, little-endian words, for persisting.
    pub fn to_hex(&self) -> String {
        let mut bytes = Vec::with_capacity(self.words.len() * 8);
        for w in self.words.iter() {
            bytes.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        hex::encode(bytes)
    }

    /// The inverse of [`Bitmap::to_hex`]; `None` when it does not fit `len` bits.
    pub fn from_hex(len: u64, s: &str) -> Option<Self> {
        let bytes = hex::decode(s).ok()?;
        let map = Bitmap::new(len);
        if bytes.len() != map.words.len() * 8 {
            return None;
        }
        for (w, b) in map.words.iter().zip(bytes.chunks_exact(8)) {
            w.store(u64::from_le_bytes(b.try_into().ok()?), Ordering::Relaxed);
        }
        // Bits past `len` would claim chunks that do not exist.
        if (len..map.words.len() as u64 * 64)
            .any(|i| map.words[(i / 64) as usize].load(Ordering::Relaxed) & (1 << (i % 64)) != 0)
        {
            return None;
        }
        Some(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_count_and_persist() {
        let b = Bitmap::new(130);
        assert!(b.set(0) && b.set(64) && b.set(129));
        assert!(!b.set(64));
        assert_eq!(b.count(), 3);
        assert!(b.get(0) && !b.get(1));
        let c = Bitmap::from_hex(130, &b.to_hex()).unwrap();
        assert_eq!((0..130).filter(|&i| c.get(i)).collect::<Vec<_>>(), vec![0, 64, 129]);
        assert!(c.clear(64) && !c.clear(64));
        assert!(Bitmap::from_hex(129, &b.to_hex()).is_none(), "bit 129 past the end");
        assert!(Bitmap::from_hex(300, &b.to_hex()).is_none(), "wrong length");
    }
}
