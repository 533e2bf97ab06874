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

/// Pages of the first `len` bytes of `f` that the kernel holds in its page cache (`mincore`
/// over a read-only mapping, which faults nothing in).
pub fn resident_pages(f: &std::fs::File, len: usize) -> usize {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return 0;
    }
    // SAFETY: a read-only shared mapping of an open file, unmapped before returning; mincore
    // writes one byte per page into a vector of that many bytes.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(addr, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        let mut vec = vec![0u8; len.div_ceil(4096)];
        let rc = libc::mincore(addr, len, vec.as_mut_ptr());
        libc::munmap(addr, len);
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        vec.iter().filter(|b| **b & 1 == 1).count()
    }
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
