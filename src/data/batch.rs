//! A micro-batch of pairs as the model sees it.
//!
//! Packed (the default, [`PairBatch::new`]): one row per pair, `[prompt | chosen | rejected]`,
//! right-padded. Both responses take positions from the end of the prompt on, and each sees
//! the prompt and itself only ([`TokenLayout`]), so the prompt is computed once for both —
//! exact, and a quarter to a half less work on typical data. Unshared
//! ([`PairBatch::unshared`]): `2·pairs` rows `prompt + response`, as TRL lays them out.
//!
//! Either way only response tokens are scored (prompt masked, EOS included): `predictor_rows`
//! lists, for each scored token, the flat index of the hidden state that predicts it, and
//! `sequence_of_token` sums
//! them into per-sequence log-probs, chosen sequences first, then rejected.
//!
//! ```
//! # use dpo::data::{PairBatch, TokenizedPair};
//! let pair = TokenizedPair { prompt: vec![1, 7], chosen: vec![8, 2], rejected: vec![9, 9, 2] };
//! let packed = PairBatch::new(&[pair.clone()], 3, &candle_core::Device::Cpu).unwrap();
//! assert_eq!(packed.ids.dims(), &[1, 7]);
//! let unshared = PairBatch::unshared(&[pair], 3, &candle_core::Device::Cpu).unwrap();
//! assert_eq!(unshared.ids.dims(), &[2, 5]);
//! ```
use super::TokenizedPair;
use crate::nn::layout::{PAD, SHARED, TokenLayout};
use candle_core::{Device, Result, Tensor};

pub struct PairBatch {
    pub pairs: usize,
    /// `[rows, len]` u32, right-padded.
    pub ids: Tensor,
    pub layout: TokenLayout,
    /// `[scored]` u32: flat index (`row·len + t`) of the hidden state predicting each scored token.
    pub predictor_rows: Tensor,
    /// The scored token ids.
    pub targets: Vec<u32>,
    /// `[2·pairs, scored]` f32 0/1: which sequence each scored token belongs to (the matrix that
    /// sums token log-probs into sequence log-probs).
    pub sequence_of_token: Tensor,
    /// Scored tokens per sequence (chosen sequences, then rejected).
    pub response_tokens: Vec<usize>,
    /// Per scored token: its sequence, and its index within that response.
    pub token_owner: Vec<(usize, usize)>,
    /// The chosen sequences' prompt tokens after BOS, scored too (ORPO's NLL covers them).
    pub prompt: Option<PromptScoring>,
    /// Flat index (`row·len + t`) of each sequence's last non-pad token (chosen, then rejected).
    pub last_rows: Vec<u32>,
    /// KTO: each example's label (its completion in the chosen slot, a mismatched completion
    /// for the KL estimate in the rejected slot).
    pub labels: Option<Vec<bool>>,
    /// Tokens of the `2·pairs` prompt+response sequences (a shared prompt counts twice), the
    /// unit of tokens/s whatever the layout.
    pub tokens: usize,
}

/// Scored prompt tokens of the chosen sequences: token `t ≥ 1` of pair `i`'s prompt, predicted
/// from position `t − 1` of the row holding pair `i`'s chosen sequence.
pub struct PromptScoring {
    pub predictor_rows: Tensor,
    pub targets: Vec<u32>,
    /// `[pairs, scored prompt tokens]` 0/1.
    pub pair_of_token: Tensor,
    /// Scored prompt tokens per pair (prompt length − 1).
    pub tokens: Vec<usize>,
}

/// One row being assembled: tokens, positions, segments; and the scored tokens.
struct RowBuilder {
    ids: Vec<u32>,
    positions: Vec<u32>,
    segments: Vec<u8>,
}

impl RowBuilder {
    fn push(&mut self, tokens: &[u32], first_position: usize, segment: u8) {
        self.ids.extend_from_slice(tokens);
        self.positions.extend((first_position..first_position + tokens.len()).map(|p| p as u32));
        self.segments.extend(std::iter::repeat_n(segment, tokens.len()));
    }
}

/// A scored response: sequence index, row, where its predicting hidden states start.
struct Scored<'a> {
    sequence: usize,
    row: usize,
    /// In-row index of the hidden state predicting the response's first token (the prompt's last).
    first_predictor: usize,
    /// In-row index of the response's first token.
    start: usize,
    tokens: &'a [u32],
}

impl PairBatch {
    /// Packed rows `[prompt | chosen | rejected]`: the prompt is run once per pair.
    pub fn new(pairs: &[TokenizedPair], pad_id: u32, device: &Device) -> Result<Self> {
        let n = pairs.len();
        let mut rows = Vec::with_capacity(n);
        let mut scored = Vec::with_capacity(2 * n);
        for (i, p) in pairs.iter().enumerate() {
            let (pl, cl) = (p.prompt.len(), p.chosen.len());
            let mut row = RowBuilder { ids: Vec::new(), positions: Vec::new(), segments: Vec::new() };
            row.push(&p.prompt, 0, SHARED);
            row.push(&p.chosen, pl, 1);
            row.push(&p.rejected, pl, 2);
            rows.push(row);
            scored.push(Scored { sequence: i, row: i, first_predictor: pl - 1, start: pl, tokens: &p.chosen });
            scored.push(Scored {
                sequence: n + i,
                row: i,
                first_predictor: pl - 1,
                start: pl + cl,
                tokens: &p.rejected,
            });
        }
        Self::assemble(pairs, rows, scored, pad_id, device)
    }

    /// `2·pairs` rows `prompt + response` (chosen rows, then rejected), as TRL lays them out.
    pub fn unshared(pairs: &[TokenizedPair], pad_id: u32, device: &Device) -> Result<Self> {
        let n = pairs.len();
        let mut rows = Vec::with_capacity(2 * n);
        let mut scored = Vec::with_capacity(2 * n);
        let responses = pairs.iter().map(|p| (p, &p.chosen)).chain(pairs.iter().map(|p| (p, &p.rejected)));
        for (s, (p, response)) in responses.enumerate() {
            let pl = p.prompt.len();
            let mut row = RowBuilder { ids: Vec::new(), positions: Vec::new(), segments: Vec::new() };
            row.push(&p.prompt, 0, SHARED);
            row.push(response, pl, SHARED);
            rows.push(row);
            scored.push(Scored { sequence: s, row: s, first_predictor: pl - 1, start: pl, tokens: response });
        }
        Self::assemble(pairs, rows, scored, pad_id, device)
    }

    fn assemble(
        pairs: &[TokenizedPair],
        rows: Vec<RowBuilder>,
        mut scored: Vec<Scored>,
        pad_id: u32,
        device: &Device,
    ) -> Result<Self> {
        let len = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        let (mut ids, mut positions, mut segments) = (Vec::new(), Vec::new(), Vec::new());
        for r in &rows {
            let pad = len - r.ids.len();
            ids.extend(r.ids.iter().copied().chain(std::iter::repeat_n(pad_id, pad)));
            let last = r.positions.last().map_or(0, |p| p + 1);
            positions.extend(r.positions.iter().copied().chain(std::iter::repeat_n(last, pad)));
            segments.extend(r.segments.iter().copied().chain(std::iter::repeat_n(PAD, pad)));
        }
        scored.sort_by_key(|s| s.sequence);
        let sequences = scored.len();
        let (mut flat_rows, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
        for s in &scored {
            for (k, &tok) in s.tokens.iter().enumerate() {
                let predictor = if k == 0 { s.first_predictor } else { s.start + k - 1 };
                flat_rows.push((s.row * len + predictor) as u32);
                targets.push(tok);
                owner.push((s.sequence, k));
            }
        }
        // Each sequence's last token that is not the pad id (where a reward model reads its score,
        // as transformers' sequence classification does): the response's, or the prompt's last.
        let last_rows = scored
            .iter()
            .map(|s| {
                let kept = s.tokens.iter().rposition(|&t| t != pad_id);
                (s.row * len + kept.map_or(s.first_predictor, |k| s.start + k)) as u32
            })
            .collect();
        let total = targets.len();
        let mut seg = vec![0f32; sequences * total];
        for (j, &(s, _)) in owner.iter().enumerate() {
            seg[s * total + j] = 1.0;
        }
        let n_rows = rows.len();
        Ok(Self {
            pairs: pairs.len(),
            ids: Tensor::from_vec(ids, (n_rows, len), device)?,
            layout: TokenLayout::new(n_rows, len, positions, segments),
            predictor_rows: Tensor::from_vec(flat_rows, total, device)?,
            targets,
            sequence_of_token: Tensor::from_vec(seg, (sequences, total), device)?,
            response_tokens: scored.iter().map(|s| s.tokens.len()).collect(),
            token_owner: owner,
            last_rows,
            prompt: None,
            labels: None,
            // A completion without a rejected response (supervised fine-tuning) is one sequence.
            tokens: pairs
                .iter()
                .map(|p| (1 + usize::from(!p.rejected.is_empty())) * p.prompt.len() + p.chosen.len() + p.rejected.len())
                .sum(),
        })
    }

    /// LD-DPO's length-desensitised sums: in each pair, the response tokens past the shorter
    /// response's length weigh `alpha` instead of 1 (policy and reference alike).
    pub fn with_ld_alpha(mut self, alpha: f64) -> Result<Self> {
        let (n, total) = (self.pairs, self.targets.len());
        let shared: Vec<usize> = (0..n).map(|i| self.response_tokens[i].min(self.response_tokens[n + i])).collect();
        let mut w = vec![0f32; 2 * n * total];
        for (j, &(s, k)) in self.token_owner.iter().enumerate() {
            w[s * total + j] = if k < shared[s % n] { 1.0 } else { alpha as f32 };
        }
        self.sequence_of_token = Tensor::from_vec(w, (2 * n, total), self.ids.device())?;
        Ok(self)
    }

    /// Also scores each chosen sequence's prompt tokens after BOS (rows laid out by [`PairBatch::new`]
    /// or [`PairBatch::unshared`]: pair `i`'s chosen sequence starts row `i`).
    pub fn with_prompt_scoring(mut self, pairs: &[TokenizedPair]) -> Result<Self> {
        let len = self.layout.len;
        let (mut rows, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
        for (i, p) in pairs.iter().enumerate() {
            for t in 1..p.prompt.len() {
                rows.push((i * len + t - 1) as u32);
                targets.push(p.prompt[t]);
                owner.push(i);
            }
        }
        let m = targets.len();
        let mut sum = vec![0f32; pairs.len() * m];
        for (j, &i) in owner.iter().enumerate() {
            sum[i * m + j] = 1.0;
        }
        let device = self.ids.device().clone();
        self.prompt = Some(PromptScoring {
            predictor_rows: Tensor::from_vec(rows, m, &device)?,
            targets,
            pair_of_token: Tensor::from_vec(sum, (pairs.len(), m), &device)?,
            tokens: pairs.iter().map(|p| p.prompt.len().saturating_sub(1)).collect(),
        });
        Ok(self)
    }
}
