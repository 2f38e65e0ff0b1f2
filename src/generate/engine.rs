//! Decoding a batch of prompts with a KV cache: the prompts left-padded and run in one forward,
//! then one token per row per forward until every row has stopped — as transformers' `generate`
//! does, so the tokens and log-probs agree with it (a finished row is fed the pad token until
//! the batch ends, and never changes the other rows).
//!
//! A row stops at any of the end ids (the token is kept, `finish_reason` `eos`), when a stop
//! condition of its own says so (`stop`), or after `max_new_tokens` (`length`).
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let model: dpo::model::CausalLm = todo!();
//! use dpo::generate::engine::{Limits, generate};
//! use dpo::generate::processors::Decoding;
//! let limits = Limits { max_new_tokens: 24, eos: vec![2], pad_id: 3 };
//! let mut rng = dpo::rng::SeededRng::new(0, dpo::rng::Stream::Sampling);
//! let out = generate(&model, &mut dpo::nn::LoraMode::Off, &[vec![1, 5, 9]], &limits, &Decoding::greedy(), &mut rng, &mut |_, _| false)?;
//! println!("{:?} ({:?})", out[0].ids, out[0].finish);
//! # Ok(()) }
//! ```
use super::processors::{self, Decoding};
use crate::model::CausalLm;
use crate::model::kv_cache::KvCache;
use crate::nn::LoraMode;
use crate::nn::kv_layout::KvLayout;
use crate::rng::SeededRng;
use anyhow::Result;
use candle_core::{DType, Tensor};
use serde::Serialize;

/// When rows end, and what fills finished and padded slots.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_new_tokens: usize,
    /// Ids that end a row (kept in its output).
    pub eos: Vec<u32>,
    /// Left padding, and what finished rows are fed.
    pub pad_id: u32,
}

/// Why a row ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    Eos,
    Stop,
    Length,
}

/// One row's output.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The new ids (the end id included when it stopped there).
    pub ids: Vec<u32>,
    /// `log p(id | prefix)` of each new id under the model's own distribution (the raw logits,
    /// before any processor), in f64.
    pub step_logps: Vec<f64>,
    pub finish: Finish,
}

impl Generated {
    /// The summed log-prob of the new ids.
    pub fn logprob(&self) -> f64 {
        self.step_logps.iter().sum()
    }
}

/// Decodes every prompt (ids, BOS included) as one batch. `stop(row, ids)` says whether a row's
/// new ids so far end it (stop strings). With `mode` the adapters are on or off.
pub fn generate(
    model: &CausalLm,
    mode: &mut LoraMode,
    prompts: &[Vec<u32>],
    limits: &Limits,
    decoding: &Decoding,
    rng: &mut SeededRng,
    stop: &mut dyn FnMut(usize, &[u32]) -> bool,
) -> Result<Vec<Generated>> {
    let rows = prompts.len();
    let mut out: Vec<Generated> =
        (0..rows).map(|_| Generated { ids: Vec::new(), step_logps: Vec::new(), finish: Finish::Length }).collect();
    if rows == 0 || limits.max_new_tokens == 0 {
        return Ok(out);
    }
    let mut cache = KvCache::new(model.arch().num_layers);
    let mut kv = KvLayout::prefill(&prompts.iter().map(Vec::len).collect::<Vec<_>>());
    let mut ids = left_padded(prompts, limits.pad_id, kv.new, model)?;
    let mut done = vec![false; rows];
    for _step in 0..limits.max_new_tokens {
        let logits = last_logits(model, &ids, &kv, &mut cache, mode)?;
        let mut next = vec![limits.pad_id; rows];
        for r in 0..rows {
            if done[r] {
                continue;
            }
            let row = &logits[r];
            let previous: Vec<u32> = prompts[r].iter().chain(&out[r].ids).copied().collect();
            let id = choose(row, &previous, decoding, rng) as u32;
            out[r].step_logps.push(log_softmax_at(row, id as usize));
            out[r].ids.push(id);
            next[r] = id;
            if limits.eos.contains(&id) {
                (done[r], out[r].finish) = (true, Finish::Eos);
            } else if stop(r, &out[r].ids) {
                (done[r], out[r].finish) = (true, Finish::Stop);
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        kv = kv.next_step();
        ids = Tensor::from_vec(next, (rows, 1), model.device())?;
    }
    Ok(out)
}

/// `[rows, len]` prompt ids, padded on the left.
fn left_padded(prompts: &[Vec<u32>], pad: u32, len: usize, model: &CausalLm) -> Result<Tensor> {
    let mut flat = Vec::with_capacity(prompts.len() * len);
    for p in prompts {
        flat.extend(std::iter::repeat_n(pad, len - p.len()));
        flat.extend_from_slice(p);
    }
    Ok(Tensor::from_vec(flat, (prompts.len(), len), model.device())?)
}

/// The forward of this step's tokens, and each row's logits at its last one (f32, on the host).
fn last_logits(
    model: &CausalLm,
    ids: &Tensor,
    kv: &KvLayout,
    cache: &mut KvCache,
    mode: &mut LoraMode,
) -> Result<Vec<Vec<f32>>> {
    let hidden = model.forward_cached(ids, kv, cache, mode)?;
    let last = hidden.narrow(1, kv.new - 1, 1)?.squeeze(1)?;
    let logits = model.logits_of(&last)?;
    Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

/// The next id of a row: the processors, then the argmax or a seeded draw.
fn choose(logits: &[f32], previous: &[u32], d: &Decoding, rng: &mut SeededRng) -> usize {
    let mut scores = logits.to_vec();
    processors::process(&mut scores, previous, d);
    if d.do_sample { processors::sample(&scores, rng.uniform()) } else { processors::argmax(&scores) }
}

/// `log_softmax(logits)[i]`, in f64.
fn log_softmax_at(logits: &[f32], i: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&z| (z as f64 - max).exp()).sum();
    logits[i] as f64 - max - sum.ln()
}
