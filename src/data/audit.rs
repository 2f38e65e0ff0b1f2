//! The pre-flight audit of a dataset: rows read and skipped (with reasons and positions),
//! token-length percentiles, truncation, chosen == rejected, double BOS/EOS, tokenization
//! boundary mismatches, and the first example with its boundaries. `dpo data inspect` prints it;
//! `dpo train` and `dpo eval` compute it while indexing and refuse data with too many bad rows.
//!
//! ```
//! let mut a = dpo::data::audit::Audit::default();
//! a.rows_read = 100;
//! a.rows_used = 99;
//! a.skip(dpo::data::reader::BadRow { at: "d.jsonl:7".into(), reason: "malformed JSON".into() });
//! assert!(a.check_skip_ratio(0.01).is_ok());
//! assert!(a.check_skip_ratio(0.001).is_err());
//! ```
use super::reader::BadRow;
use super::tokenize::{PairChecks, TokenizedPair};
use anyhow::{Result, bail};
use serde::Serialize;
use std::collections::BTreeMap;

/// Skipped rows kept verbatim (the rest are only counted).
const KEEP_BAD_ROWS: usize = 100;

#[derive(Debug, Default, Serialize)]
pub struct Audit {
    pub files: Vec<String>,
    pub format: String,
    pub template: String,
    pub rows_read: usize,
    pub rows_used: usize,
    pub rows_skipped: usize,
    /// Skip counts per reason (the reason up to its first parenthesis).
    pub skip_reasons: BTreeMap<String, usize>,
    /// The first skipped rows, with positions.
    pub skipped: Vec<BadRow>,
    pub tokens: Lengths,
    pub truncated: usize,
    /// Tokens of the longest pair after truncation, prompt + chosen + rejected (one packed row).
    pub longest_pair: usize,
    /// Response tokens (chosen + rejected) of the pair with the most, after truncation.
    pub longest_responses: usize,
    pub truncated_prompt: usize,
    pub truncated_response: usize,
    pub chosen_equals_rejected: usize,
    pub double_bos: usize,
    pub double_eos: usize,
    pub boundary_mismatches: usize,
    pub first_example: Option<FirstExample>,
    #[serde(skip)]
    lens: [Vec<u32>; 3],
}

/// Token-length percentiles (before truncation) of prompts, chosen and rejected responses.
#[derive(Debug, Default, Serialize)]
pub struct Lengths {
    pub prompt: Percentiles,
    pub chosen: Percentiles,
    pub rejected: Percentiles,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Percentiles {
    pub min: u32,
    pub p50: u32,
    pub p90: u32,
    pub p99: u32,
    pub max: u32,
}

/// The first usable example as rendered text, boundaries visible.
#[derive(Debug, Clone, Serialize)]
pub struct FirstExample {
    pub at: String,
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    pub prompt_tokens: usize,
    pub chosen_tokens: usize,
    pub rejected_tokens: usize,
}

impl Audit {
    pub fn skip(&mut self, bad: BadRow) {
        self.rows_skipped += 1;
        let key = bad.reason.split(" (").next().unwrap_or_default().to_string();
        *self.skip_reasons.entry(key).or_default() += 1;
        if self.skipped.len() < KEEP_BAD_ROWS {
            self.skipped.push(bad);
        }
    }

    /// Records a usable pair: `pair` before truncation, `cut` after it.
    pub fn record(&mut self, pair: &TokenizedPair, cut: &TokenizedPair, checks: PairChecks, same_text: bool) {
        self.rows_used += 1;
        let responses = cut.chosen.len() + cut.rejected.len();
        self.longest_pair = self.longest_pair.max(cut.prompt.len() + responses);
        self.longest_responses = self.longest_responses.max(responses);
        for (v, n) in self.lens.iter_mut().zip([pair.prompt.len(), pair.chosen.len(), pair.rejected.len()]) {
            v.push(n as u32);
        }
        if pair != cut {
            self.truncated += 1;
            self.truncated_prompt += usize::from(pair.prompt.len() != cut.prompt.len());
            self.truncated_response +=
                usize::from(pair.chosen.len() != cut.chosen.len() || pair.rejected.len() != cut.rejected.len());
        }
        self.chosen_equals_rejected += usize::from(same_text);
        self.double_bos += usize::from(checks.double_bos);
        self.double_eos += usize::from(checks.double_eos);
        self.boundary_mismatches += usize::from(checks.boundary_mismatch);
    }

    /// Computes the percentiles; call once all rows are recorded.
    pub fn finish(&mut self) {
        let mut p = self.lens.iter_mut().map(|v| percentiles(v));
        self.tokens = Lengths { prompt: p.next().unwrap(), chosen: p.next().unwrap(), rejected: p.next().unwrap() };
        self.lens = Default::default();
    }

    /// Fails when more than `max_ratio` of the rows read are unusable, or none is usable.
    pub fn check_skip_ratio(&self, max_ratio: f64) -> Result<()> {
        let examples = || self.skipped.iter().take(5).map(|b| b.to_string()).collect::<Vec<_>>().join("; ");
        let files = self.files.join(", ");
        if self.rows_used == 0 {
            let why = if self.rows_read == 0 { "the files hold no rows".to_string() } else { examples() };
            bail!("{files}: the dataset has no usable rows ({} read): {why}", self.rows_read);
        }
        let ratio = self.rows_skipped as f64 / self.rows_read.max(1) as f64;
        if ratio > max_ratio {
            bail!(
                "{files}: {} of {} rows are unusable ({:.1}%, more than --max-skip-ratio {max_ratio}): {}",
                self.rows_skipped,
                self.rows_read,
                100.0 * ratio,
                examples()
            );
        }
        Ok(())
    }
}

fn percentiles(v: &mut [u32]) -> Percentiles {
    if v.is_empty() {
        return Percentiles::default();
    }
    v.sort_unstable();
    let at = |q: f64| v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
    Percentiles { min: v[0], p50: at(0.5), p90: at(0.9), p99: at(0.99), max: v[v.len() - 1] }
}
