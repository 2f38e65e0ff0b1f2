//! What TRL logs about the policy's next-token distribution at each scored token, computed from
//! the logits the head already holds (detached, f32): entropy, the vocabulary-mean logit,
//! whether the target is the argmax, and `log Σ_v p(v)²` (WPO's weights).
//!
//! ```
//! let mut s = dpo::model::token_stats::TokenStats::default();
//! s.push_row(&[0.0, 0.0], 1);
//! assert!((s.entropy[0] - 2f32.ln()).abs() < 1e-6);
//! assert!(!s.top1[0]); // the first argmax (index 0) is not the target
//! ```
//!
//! A row's log-sum-exp comes out of the same pass, identical to the plain head's:
//! ```
//! # use dpo::model::{kernels, token_stats::TokenStats};
//! for n in 990..1030 {
//!     let row: Vec<f32> = (0..n).map(|i| ((i * 7919 + n) % 113) as f32 / 29.0).collect();
//!     let lse = TokenStats::default().push_row(&row, 3);
//!     assert_eq!(lse.to_bits(), kernels::log_sum_exp(&row).to_bits());
//! }
//! ```
use super::kernels;

/// Where a head leaves its [`TokenStats`] (a head op cannot return them beside its tensor).
pub type StatsSink = std::sync::Arc<std::sync::Mutex<Option<TokenStats>>>;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenStats {
    pub entropy: Vec<f32>,
    pub mean_logit: Vec<f32>,
    /// The target is the (first) argmax.
    pub top1: Vec<bool>,
    pub log_sum_sq: Vec<f32>,
}

impl TokenStats {
    /// The statistics of one row of logits whose target is `target`; returns the row's
    /// log-sum-exp, bit for bit [`kernels::log_sum_exp`]'s (the head takes its log-prob from it
    /// instead of a second pass over the row).
    pub fn push_row(&mut self, row: &[f32], target: usize) -> f32 {
        let max = kernels::row_max(row);
        let argmax = row.iter().position(|&x| x == max).unwrap_or(0);
        let [s1, s2, s3, sum] = kernels::softmax_moments(row, max);
        let lse = max + s1.ln();
        self.entropy.push(lse - s2 / s1);
        self.mean_logit.push(sum / row.len() as f32);
        self.top1.push(argmax == target);
        self.log_sum_sq.push(s3.ln() - 2.0 * s1.ln());
        lse
    }

    pub fn extend(&mut self, other: TokenStats) {
        self.entropy.extend(other.entropy);
        self.mean_logit.extend(other.mean_logit);
        self.top1.extend(other.top1);
        self.log_sum_sq.extend(other.log_sum_sq);
    }

    /// Keeps the first `n` tokens' statistics.
    pub fn truncate(&mut self, n: usize) {
        self.entropy.truncate(n);
        self.mean_logit.truncate(n);
        self.top1.truncate(n);
        self.log_sum_sq.truncate(n);
    }

    pub fn len(&self) -> usize {
        self.entropy.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entropy.is_empty()
    }
}
