//! What `train` and `eval` both do first: open the device, load the model and tokenizer,
//! read and tokenize the pairs.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let common: dpo::config::CommonArgs = todo!();
//! let loaded = dpo::setup::load_model(&common)?;
//! let data = dpo::setup::load_pairs(&common, &loaded)?;
//! println!("{} pairs, {} truncated", data.len(), data.truncated);
//! # Ok(()) }
//! ```
use crate::config::CommonArgs;
use crate::data::{PairTokenizer, Template, TokenizedPair, jsonl};
use crate::device::{parse_device, parse_dtype};
use crate::loss::{DpoLoss, LossKind};
use crate::model::Llama;
use anyhow::{Context, Result, bail};
use candle_core::Device;

pub struct Loaded {
    pub model: Llama,
    pub tokenizer: PairTokenizer,
    pub device: Device,
    /// Fills right padding; never scored, so any valid id works.
    pub pad_id: u32,
}

pub fn load_model(common: &CommonArgs) -> Result<Loaded> {
    let device = parse_device(&common.device)?;
    let dtype = parse_dtype(&common.dtype, &device)?;
    let model = Llama::load(&common.model, dtype, &device)?;
    let tokenizer = PairTokenizer::from_model_dir(&common.model)?;
    let pad_id = model.config().pad_token_id.unwrap_or(tokenizer.eos_id());
    Ok(Loaded { model, tokenizer, device, pad_id })
}

/// The run's pairs, addressed by index (the trainer asks for them in its seeded order).
pub struct Dataset {
    pairs: Vec<TokenizedPair>,
    /// Pairs cut by --max-length / --max-prompt-length.
    pub truncated: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Pair `i` (0-based, file order), tokenized and truncated.
    pub fn get(&self, i: usize) -> Result<TokenizedPair> {
        self.pairs.get(i).cloned().with_context(|| format!("pair {i} is out of range ({} pairs)", self.pairs.len()))
    }
}

/// Reads, templates, tokenizes and truncates every pair of `--dataset`.
pub fn load_pairs(common: &CommonArgs, loaded: &Loaded) -> Result<Dataset> {
    if common.max_prompt_length >= common.max_length {
        bail!(
            "--max-prompt-length ({}) must be smaller than --max-length ({})",
            common.max_prompt_length,
            common.max_length
        );
    }
    let template = Template::parse(&common.template)?;
    let examples = jsonl::read_orca(&common.dataset)?;
    let vocab = loaded.model.config().vocab_size;
    let mut truncated = 0;
    let mut pairs = Vec::with_capacity(examples.len());
    for (i, ex) in examples.iter().enumerate() {
        let mut pair = loaded
            .tokenizer
            .tokenize(&template.render(ex), ex)
            .with_context(|| format!("{}: pair {i}", common.dataset.display()))?;
        if let Some(bad) = pair.prompt.iter().chain(&pair.chosen).chain(&pair.rejected).find(|&&t| t as usize >= vocab) {
            bail!(
                "{}: pair {i} has token id {bad}, beyond the model's vocabulary of {vocab}: tokenizer and model do not match",
                common.dataset.display()
            );
        }
        truncated += usize::from(pair.truncate(common.max_length, common.max_prompt_length, loaded.tokenizer.bos_id()));
        pairs.push(pair);
    }
    Ok(Dataset { pairs, truncated })
}

pub fn dpo_loss(common: &CommonArgs) -> Result<DpoLoss> {
    let loss = DpoLoss { kind: LossKind::parse(&common.loss)?, beta: common.beta, label_smoothing: common.label_smoothing };
    loss.validate()?;
    Ok(loss)
}
