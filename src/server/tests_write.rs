//! End-to-end tests of the write side.
