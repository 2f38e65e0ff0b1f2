//! Where the tokens of one decoding forward sit against the keys already cached: each row's new
//! tokens take the next cache slots, and the prompts of a batch are padded on the left, so every
//! row has the same number of slots and its real tokens end at the same slot. A new token sees
//! the real keys before it and itself (a pad sees only itself, so nothing it computes is NaN),
//! inside the layer's sliding window, counted in slots (equal to positions: left padding shifts a
//! whole row).
//!
//! ```
//! use dpo::nn::kv_layout::KvLayout;
//! // Two prompts, of 3 tokens and 1 (left-padded by 2), prefilled in one forward.
//! let prefill = KvLayout::prefill(&[3, 1]);
//! assert_eq!(prefill.positions, [0, 1, 2, 0, 0, 0]); // pads take position 0, as transformers
//! assert!(!prefill.visible(1, 2, 0, None)); // row 1's token never sees the pads
//! let step = prefill.next_step();
//! assert_eq!((step.past, step.new, step.positions.clone()), (3, 1, vec![3, 1]));
//! ```
use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLayout {
    pub rows: usize,
    /// Keys already in the cache, per row.
    pub past: usize,
    /// New tokens per row in this forward.
    pub new: usize,
    /// `[rows · (past + new)]`: whether each slot holds a real token (left pads do not).
    pub real: Vec<bool>,
    /// `[rows · new]`: the RoPE position of each new token.
    pub positions: Vec<u32>,
}

impl KvLayout {
    /// A left-padded batch of prompts of these lengths, all fed at once.
    pub fn prefill(lengths: &[usize]) -> Self {
        let len = lengths.iter().copied().max().unwrap_or(0);
        let mut real = Vec::with_capacity(lengths.len() * len);
        let mut positions = Vec::with_capacity(lengths.len() * len);
        for &n in lengths {
            let pads = len - n;
            real.extend((0..len).map(|j| j >= pads));
            positions.extend((0..len).map(|j| j.saturating_sub(pads) as u32));
        }
        Self { rows: lengths.len(), past: 0, new: len, real, positions }
    }

    /// The next forward: one new real token per row, after everything so far.
    pub fn next_step(&self) -> Self {
        let (slots, next) = (self.slots(), self.slots() + 1);
        let mut real = Vec::with_capacity(self.rows * next);
        let mut positions = Vec::with_capacity(self.rows);
        for r in 0..self.rows {
            let row = &self.real[r * slots..(r + 1) * slots];
            real.extend_from_slice(row);
            real.push(true);
            positions.push(row.iter().filter(|&&x| x).count() as u32);
        }
        Self { rows: self.rows, past: slots, new: 1, real, positions }
    }

    /// Cache slots per row after this forward.
    pub fn slots(&self) -> usize {
        self.past + self.new
    }

    /// May new token `i` of `row` attend to slot `j`?
    pub fn visible(&self, row: usize, i: usize, j: usize, window: Option<usize>) -> bool {
        let q = self.past + i;
        if j == q {
            return true;
        }
        let real = |k: usize| self.real[row * self.slots() + k];
        j < q && real(q) && real(j) && window.is_none_or(|w| q - j < w)
    }

    /// Additive mask `[rows, 1, new, past + new]`: 0 where visible, −inf elsewhere.
    pub fn mask(&self, window: Option<usize>, dtype: DType, device: &Device) -> Result<Tensor> {
        let (n, s) = (self.new, self.slots());
        let mut m = vec![f32::NEG_INFINITY; self.rows * n * s];
        for r in 0..self.rows {
            for i in 0..n {
                for j in 0..s {
                    if self.visible(r, i, j, window) {
                        m[(r * n + i) * s + j] = 0.0;
                    }
                }
            }
        }
        Tensor::from_vec(m, (self.rows, 1, n, s), device)?.to_dtype(dtype)
    }
}
