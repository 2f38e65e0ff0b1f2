//! Turning a step's logits into the next token, as transformers' `generate` does: the
//! non-warping processor (repetition penalty) on the raw logits, then, when sampling, the
//! warpers in transformers' fixed order — temperature → top-k → top-p → min-p — each on the
//! previous one's output; a removed token's score is `−inf`. Greedy decoding takes the argmax
//! of the raw logits (lowest index on a tie).
//!
//! ```
//! use dpo::generate::processors::{Decoding, process};
//! let d = Decoding { top_k: 2, ..Decoding::sampling() };
//! let mut scores = vec![1.0, 3.0, 2.0, 0.5];
//! process(&mut scores, &[], &d);
//! assert_eq!(scores.iter().filter(|s| s.is_finite()).count(), 2);
//! ```
use serde::Serialize;

/// How each next token is chosen (transformers' generation settings).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Decoding {
    /// Sample from the processed distribution; otherwise greedy.
    pub do_sample: bool,
    pub temperature: f64,
    /// Keep the `top_k` largest scores (ties at the threshold all kept); 0: off.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1: off.
    pub top_p: f64,
    /// Remove tokens less likely than `min_p` times the most likely one.
    pub min_p: Option<f64>,
    /// Divide positive (multiply negative) scores of tokens already in the sequence; 1: off.
    pub repetition_penalty: f64,
}

impl Decoding {
    /// transformers' global defaults: greedy, and for sampling temperature 1 with top-k 50.
    pub fn greedy() -> Self {
        Self { do_sample: false, temperature: 1.0, top_k: 50, top_p: 1.0, min_p: None, repetition_penalty: 1.0 }
    }

    /// Sampling with transformers' global defaults (top-k 50 applies unless set otherwise).
    pub fn sampling() -> Self {
        Self { do_sample: true, ..Self::greedy() }
    }
}

/// Applies the processors `d` enables to one row's `scores` (in place); `previous` are the row's
/// real tokens so far (prompt and generated, left pads excluded).
pub fn process(scores: &mut [f32], previous: &[u32], d: &Decoding) {
    if d.repetition_penalty != 1.0 {
        repetition_penalty(scores, previous, d.repetition_penalty as f32);
    }
    if !d.do_sample {
        return;
    }
    if d.temperature != 1.0 {
        let t = d.temperature as f32;
        scores.iter_mut().for_each(|s| *s /= t);
    }
    if d.top_k > 0 {
        top_k(scores, d.top_k);
    }
    if d.top_p < 1.0 {
        top_p(scores, d.top_p);
    }
    if let Some(m) = d.min_p {
        min_p(scores, m as f32);
    }
}

/// Each id that occurs in `previous` (once, however often): `s·p` if `s < 0`, else `s/p`.
fn repetition_penalty(scores: &mut [f32], previous: &[u32], p: f32) {
    let mut seen = std::collections::BTreeSet::new();
    for &id in previous {
        if seen.insert(id) {
            let s = &mut scores[id as usize];
            *s = if *s < 0.0 { *s * p } else { *s / p };
        }
    }
}

/// Keeps scores `>=` the `k`-th largest (ties at the threshold kept), the rest `−inf`.
fn top_k(scores: &mut [f32], k: usize) {
    let k = k.min(scores.len()).max(1);
    let mut sorted: Vec<f32> = scores.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let threshold = sorted[k - 1];
    scores.iter_mut().filter(|s| **s < threshold).for_each(|s| *s = f32::NEG_INFINITY);
}

/// `softmax(scores)` in f32, as torch computes it (max subtracted, then normalised).
pub fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = scores.iter().map(|&s| (s - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// Sorted ascending, removes tokens whose cumulative probability is `<= 1 − p`, never the
/// largest: a token is kept iff the mass ranked above it is below `p`.
fn top_p(scores: &mut [f32], p: f64) {
    let probs = softmax(scores);
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let threshold = (1.0 - p) as f32;
    let mut cum = 0f32;
    for (rank, &i) in order.iter().enumerate() {
        cum += probs[i];
        if cum <= threshold && rank + 1 < order.len() {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

/// Removes tokens with probability `< m · max probability` (strictly), keeping at least one.
fn min_p(scores: &mut [f32], m: f32) {
    let probs = softmax(scores);
    let top = probs.iter().copied().fold(0f32, f32::max);
    for (s, p) in scores.iter_mut().zip(&probs) {
        if *p < m * top {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// The greedy choice: the largest score, the lowest index on a tie.
pub fn argmax(scores: &[f32]) -> usize {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best
}

/// A draw from `softmax(scores)` with the uniform `u` in `[0, 1)` (inverse CDF).
pub fn sample(scores: &[f32], u: f32) -> usize {
    let probs = softmax(scores);
    let total: f32 = probs.iter().sum();
    let target = u * total;
    let mut cum = 0f32;
    let mut last = argmax(scores);
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            cum += p;
            last = i;
            if cum > target {
                return i;
            }
        }
    }
    last
}
