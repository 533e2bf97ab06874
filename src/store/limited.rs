//! Bandwidth limits (`--download-limit`, `--upload-limit`): a token bucket per direction,
//! holding a tenth of a second of bytes, so the rate over any few seconds stays at the limit.
//! The daemon's store wrapper ([`super::metered`]) paces bodies coming in as they arrive and
//! makes bodies going out wait for their bytes.

use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Bytes per token: rates up to 4 TiB/s fit the limiter's 32-bit counts.
const UNIT: u64 = 1024;

/// One direction's bucket.
#[derive(Debug, Clone)]
pub struct Limit {
    bucket: Arc<DefaultDirectRateLimiter>,
    /// Units the bucket holds at most.
    burst: u32,
}

impl Limit {
    /// `bytes_per_sec` (at least 1 KiB/s).
    pub fn new(bytes_per_sec: u64) -> Limit {
        let per_sec = (bytes_per_sec / UNIT).clamp(1, u32::MAX as u64) as u32;
        let burst = (per_sec / 10).max(1);
        let quota = Quota::per_second(NonZeroU32::new(per_sec).expect("at least 1"))
            .allow_burst(NonZeroU32::new(burst).expect("at least 1"));
        Limit {
            bucket: Arc::new(RateLimiter::direct(quota)),
            burst,
        }
    }

    /// Waits until `n` more bytes may go.
    pub async fn take(&self, n: u64) {
        let mut units = n.div_ceil(UNIT);
        while units > 0 {
            // Never more than the bucket holds at once.
            let step = units.min(u64::from(self.burst)) as u32;
            let _ = self
                .bucket
                .until_n_ready(NonZeroU32::new(step).expect("not zero"))
                .await;
            units -= u64::from(step);
        }
    }
}
