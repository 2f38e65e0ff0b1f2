//! Where each token of a batch row sits: its position (for RoPE) and its segment (for the
//! attention mask). This is what lets chosen and rejected share one pass over their prompt:
//! a row `[prompt | chosen | rejected]` gives both responses positions `P, P+1, …`, and each
//! response sees the prompt and itself, never the other response.
//!
//! ```
//! use dpo::nn::layout::{TokenLayout, PAD};
//! // One row: prompt of 2, chosen of 2, rejected of 1, one pad.
//! let l = TokenLayout::new(1, 6, vec![0, 1, 2, 3, 2, 0], vec![0, 0, 1, 1, 2, PAD]);
//! assert!(l.visible(0, 4, 0, None));  // rejected sees the prompt
//! assert!(!l.visible(0, 4, 3, None)); // but not the chosen response
//! ```
use candle_core::{DType, Device, Result, Tensor};

/// Segment of padding: sees only itself, seen by nobody.
pub const PAD: u8 = u8::MAX;
/// Segment 0 is shared: every later token of the row may attend to it.
pub const SHARED: u8 = 0;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLayout {
    pub rows: usize,
    pub len: usize,
    /// `[rows · len]` RoPE positions.
    pub positions: Vec<u32>,
    /// `[rows · len]` segment ids: `SHARED`, a branch id, or `PAD`.
    pub segments: Vec<u8>,
}

impl TokenLayout {
    pub fn new(rows: usize, len: usize, positions: Vec<u32>, segments: Vec<u8>) -> Self {
        assert_eq!(positions.len(), rows * len);
        assert_eq!(segments.len(), rows * len);
        Self { rows, len, positions, segments }
    }

    /// Plain causal rows of `len` tokens, no padding.
    pub fn causal(rows: usize, len: usize) -> Self {
        let positions = (0..rows).flat_map(|_| 0..len as u32).collect();
        Self::new(rows, len, positions, vec![SHARED; rows * len])
    }

    /// May query `i` attend to key `j` of `row`? (Earlier in the row, same or shared segment,
    /// inside the sliding window counted in positions.)
    pub fn visible(&self, row: usize, i: usize, j: usize, window: Option<usize>) -> bool {
        let at = |k: usize| row * self.len + k;
        if i == j {
            return true;
        }
        let (si, sj) = (self.segments[at(i)], self.segments[at(j)]);
        if j > i || si == PAD || sj == PAD || !(sj == SHARED || sj == si) {
            return false;
        }
        let (pi, pj) = (self.positions[at(i)] as usize, self.positions[at(j)] as usize);
        window.is_none_or(|w| pi - pj < w)
    }

    /// Additive mask `[rows, 1, len, len]`: 0 where visible, −inf elsewhere.
    pub fn mask(&self, window: Option<usize>, dtype: DType, device: &Device) -> Result<Tensor> {
        let n = self.len;
        let mut m = vec![f32::NEG_INFINITY; self.rows * n * n];
        for r in 0..self.rows {
            for i in 0..n {
                for j in 0..=i {
                    if self.visible(r, i, j, window) {
                        m[(r * n + i) * n + j] = 0.0;
                    }
                }
            }
        }
        Tensor::from_vec(m, (self.rows, 1, n, n), device)?.to_dtype(dtype)
    }

    pub fn positions_tensor(&self, device: &Device) -> Result<Tensor> {
        Tensor::from_vec(self.positions.clone(), (self.rows, self.len), device)
    }
}

/// A rectangle of the attention matrix that is not entirely masked: a run of queries
/// `[q_start, q_start + q_len)` of one row and the keys they may see (by index), with the
/// additive mask inside the rectangle. Computing only these skips the `chosen × rejected`
/// blocks and the padding that a dense `[len, len]` matrix would spend work on.
#[derive(Debug, Clone)]
pub struct AttentionBlock {
    pub q_start: usize,
    pub q_len: usize,
    pub keys: Vec<u32>,
    /// `[q_len, keys.len()]`, 0 or −inf.
    pub mask: Vec<f32>,
}

impl TokenLayout {
    /// Per row, the blocks covering every non-pad query: one per run of same-segment tokens,
    /// seeing the shared runs before it and itself. Pad queries get no block (their output is 0:
    /// nothing reads it).
    pub fn attention_blocks(&self, window: Option<usize>) -> Vec<Vec<AttentionBlock>> {
        (0..self.rows)
            .map(|r| {
                let seg = &self.segments[r * self.len..(r + 1) * self.len];
                let mut runs: Vec<(usize, usize)> = Vec::new(); // (start, end) of same-segment runs
                for (i, &s) in seg.iter().enumerate() {
                    match runs.last_mut() {
                        Some((start, end)) if seg[*start] == s && *end == i => *end = i + 1,
                        _ => runs.push((i, i + 1)),
                    }
                }
                runs.iter()
                    .filter(|(start, _)| seg[*start] != PAD)
                    .map(|&(start, end)| {
                        let keys: Vec<u32> = runs
                            .iter()
                            .filter(|(ks, ke)| *ks < end && (seg[*ks] == SHARED || *ks == start) && *ke <= end)
                            .flat_map(|&(ks, ke)| (ks as u32)..(ke as u32))
                            .collect();
                        let mut mask = Vec::with_capacity((end - start) * keys.len());
                        for i in start..end {
                            for &j in &keys {
                                let ok = (j as usize) <= i && self.visible(r, i, j as usize, window);
                                mask.push(if ok { 0.0 } else { f32::NEG_INFINITY });
                            }
                        }
                        AttentionBlock { q_start: start, q_len: end - start, keys, mask }
                    })
                    .collect()
            })
            .collect()
    }
}
