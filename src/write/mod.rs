//! The write side: what a file being written holds locally, and how its changes reach the
//! remote (append, ranged write, upload sessions of base ranges and new bytes, whole files).

pub mod dirty;
pub mod journal;
pub mod plan;
pub mod staged;
pub mod stream;
pub mod upload;
