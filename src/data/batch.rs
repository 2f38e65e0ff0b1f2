//! A micro-batch of pairs as the model sees it: chosen and rejected sequences stacked into one
//! right-padded `[2·pairs, seq]` id tensor, plus where the scored response tokens are.
//!
//! Row `i` is pair `i`'s chosen sequence, row `pairs + i` its rejected one. Only response
//! tokens are scored (prompt masked, EOS included): `rows` lists, for each scored token `t`,
//! the flat position `t − 1` whose hidden state predicts it; `segments` sums them per sequence.
//!
//! ```no_run
//! # use dpo::data::{PairBatch, TokenizedPair};
//! let pair = TokenizedPair { prompt: vec![1, 7], chosen: vec![8, 2], rejected: vec![9, 9, 2] };
//! let batch = PairBatch::new(&[pair], 3, &candle_core::Device::Cpu).unwrap();
//! assert_eq!(batch.ids.dims(), &[2, 5]);
//! ```
use super::TokenizedPair;
use candle_core::{Device, Result, Tensor};

pub struct PairBatch {
    pub pairs: usize,
    /// `[2·pairs, seq]` u32, right-padded.
    pub ids: Tensor,
    /// `[scored]` u32: flat index (`row·seq + t − 1`) of the hidden state predicting each scored token.
    pub rows: Tensor,
    /// `[scored]` u32: the scored token ids.
    pub targets: Tensor,
    /// `[2·pairs, scored]` f32 0/1: which sequence each scored token belongs to.
    pub segments: Tensor,
    /// Scored tokens per sequence (chosen rows, then rejected rows).
    pub response_tokens: Vec<usize>,
    /// Real (non-pad) tokens in the batch.
    pub tokens: usize,
}

impl PairBatch {
    pub fn new(pairs: &[TokenizedPair], pad_id: u32, device: &Device) -> Result<Self> {
        let sequences: Vec<(&[u32], &[u32])> = pairs
            .iter()
            .map(|p| (p.prompt.as_slice(), p.chosen.as_slice()))
            .chain(pairs.iter().map(|p| (p.prompt.as_slice(), p.rejected.as_slice())))
            .collect();
        let seq = sequences.iter().map(|(p, r)| p.len() + r.len()).max().unwrap_or(0);
        let n = sequences.len();
        let mut ids = vec![pad_id; n * seq];
        let (mut rows, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
        let mut response_tokens = Vec::with_capacity(n);
        for (s, (prompt, response)) in sequences.iter().enumerate() {
            let row = &mut ids[s * seq..(s + 1) * seq];
            row[..prompt.len()].copy_from_slice(prompt);
            row[prompt.len()..prompt.len() + response.len()].copy_from_slice(response);
            for (k, &tok) in response.iter().enumerate() {
                let t = prompt.len() + k;
                rows.push((s * seq + t - 1) as u32);
                targets.push(tok);
                owner.push(s);
            }
            response_tokens.push(response.len());
        }
        let scored = rows.len();
        let mut segments = vec![0f32; n * scored];
        for (j, &s) in owner.iter().enumerate() {
            segments[s * scored + j] = 1.0;
        }
        Ok(Self {
            pairs: pairs.len(),
            ids: Tensor::from_vec(ids, (n, seq), device)?,
            rows: Tensor::from_vec(rows, scored, device)?,
            targets: Tensor::from_vec(targets, scored, device)?,
            segments: Tensor::from_vec(segments, (n, scored), device)?,
            response_tokens,
            tokens: sequences.iter().map(|(p, r)| p.len() + r.len()).sum(),
        })
    }
}
