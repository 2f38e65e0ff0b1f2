//! The order in which a run visits its pairs: file order, or a seeded permutation per epoch.
//!
//! Position `n` of the stream is pair `order(epoch = n / len)[n % len]`, so any position can be
//! recomputed from (seed, n) alone — what a resumed run needs.
//!
//! ```
//! let o = dpo::data::order::PairOrder::new(10, Some(7));
//! let first: Vec<usize> = (0..10).map(|i| o.pair_at(i)).collect();
//! let mut sorted = first.clone(); sorted.sort();
//! assert_eq!(sorted, (0..10).collect::<Vec<_>>());
//! ```
use crate::rng::{SeededRng, Stream};
use std::cell::RefCell;

pub struct PairOrder {
    len: usize,
    seed: Option<u64>,
    /// The permutation of the epoch last asked for (epochs are visited in order).
    cached: RefCell<Option<(usize, Vec<usize>)>>,
}

impl PairOrder {
    /// `seed: None` keeps file order.
    pub fn new(len: usize, seed: Option<u64>) -> Self {
        assert!(len > 0, "an empty dataset has no order");
        Self { len, seed, cached: RefCell::new(None) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pair index at stream position `n` (epochs follow each other).
    pub fn pair_at(&self, n: usize) -> usize {
        let (epoch, i) = (n / self.len, n % self.len);
        let Some(seed) = self.seed else { return i };
        let mut cached = self.cached.borrow_mut();
        if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            *cached = Some((epoch, permutation(self.len, seed, epoch)));
        }
        cached.as_ref().unwrap().1[i]
    }
}

/// Fisher–Yates over `0..len` with a stream seeded by (seed, epoch).
fn permutation(len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = SeededRng::new(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15), Stream::DataOrder);
    let mut p: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}
