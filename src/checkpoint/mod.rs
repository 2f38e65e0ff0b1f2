//! What a run leaves on disk, written so that nothing is ever half-written.
pub mod atomic;
