//! artifactfs: mount a remote artifact store as a local directory.
//!
//! Layers, each in its own module (see `docs/ARCHITECTURE.md`):
//! `store` (remotes) → `cache` (persistent chunk cache) → `read` (fetch planning) →
//! `fs` (filesystem logic, no fuser types) → `fs::fuse` (thin kernel adapter); `server` is the
//! built-in artifact server and `cli` the command line.

pub mod cache;
pub mod cli;
pub mod fs;
pub mod metrics;
pub mod protocol;
pub mod read;
pub mod server;
pub mod store;
#[doc(hidden)]
pub mod testing;
pub mod write;
