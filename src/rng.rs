//! The project's own seeded random numbers (candle's CPU RNG cannot be seeded).
//!
//! One ChaCha8 stream per purpose, derived from the run seed, so LoRA init, dropout and
//! data order never disturb each other and a position in each can be saved and restored.
//!
//! ```
//! let mut a = dpo::rng::SeededRng::new(42, dpo::rng::Stream::LoraInit);
//! let mut b = dpo::rng::SeededRng::new(42, dpo::rng::Stream::LoraInit);
//! assert_eq!(a.uniform(), b.uniform());
//! ```
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

/// Independent random streams of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    LoraInit = 1,
    Dropout = 2,
    DataOrder = 3,
    /// Sampling the next token when generating.
    Sampling = 4,
}

#[derive(Debug, Clone)]
pub struct SeededRng {
    inner: ChaCha8Rng,
}

impl SeededRng {
    pub fn new(seed: u64, stream: Stream) -> Self {
        let mut inner = ChaCha8Rng::seed_from_u64(seed);
        inner.set_stream(stream as u64);
        Self { inner }
    }

    /// Uniform in `[0, 1)` with 24 bits of precision (exactly representable in f32).
    pub fn uniform(&mut self) -> f32 {
        (self.inner.next_u32() >> 8) as f32 / (1u32 << 24) as f32
    }

    /// Uniform integer in `0..n` without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.inner.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// Position in the stream (in 32-bit words), to save with a checkpoint.
    pub fn word_pos(&self) -> u128 {
        self.inner.get_word_pos()
    }

    pub fn set_word_pos(&mut self, pos: u128) {
        self.inner.set_word_pos(pos)
    }
}
