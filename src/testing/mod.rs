//! Helpers shared by the tests of every module and by the end-to-end tests (which link the
//! library as it is built for users, hence not behind `cfg(test)`). Not part of the API.

pub mod web;

/// Deterministic pseudo-random bytes: incompressible, with no period (content-defined
/// chunking finds real boundaries in it), and different for every seed.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    // splitmix64 spreads the seed, xorshift64 generates.
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let mut x = (z ^ (z >> 31)) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds_give_different_bytes() {
        let a = super::noise(64, 2);
        assert_ne!(a, super::noise(64, 3));
        assert_eq!(a, super::noise(64, 2));
        assert_eq!(super::noise(13, 0).len(), 13);
    }
}
