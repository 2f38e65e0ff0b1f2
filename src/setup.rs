//! What `train` and `eval` both do first: open the device, resolve `--model` / `--dataset` (local
//! paths or Hub repo ids), load the model and tokenizer, and index and audit the pairs.
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
use crate::data::audit::Audit;
use crate::data::pipeline::Pipeline;
use crate::data::{PairTokenizer, TokenizedPair};
use crate::hub::{self, Hub};
use crate::loss::Objective;
use crate::model::weights::mmap_weights;
use crate::model::{Architecture, CausalLm};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use std::path::PathBuf;

pub struct Loaded {
    pub model: CausalLm,
    pub tokenizer: PairTokenizer,
    pub device: Device,
    /// Fills right padding; never scored, so any valid id works.
    pub pad_id: u32,
    /// The local folder the model was loaded from (a Hub cache snapshot for repo ids).
    pub model_dir: PathBuf,
}

/// `--model` as a local folder: itself, or the Hub cache snapshot of a repo id.
pub fn model_dir(common: &CommonArgs) -> Result<PathBuf> {
    if hub::is_repo_id(&common.model) {
        let hub = Hub::new(common.offline)?;
        return hub::model::resolve(&hub, &common.model.to_string_lossy(), common.revision.as_deref());
    }
    Ok(common.model.clone())
}

/// `--dataset` as local files: a file itself; the files of `--split` of a local folder or of a
/// Hub dataset repo.
pub fn dataset_files(common: &CommonArgs) -> Result<Vec<PathBuf>> {
    if common.dataset.is_dir() {
        return hub::dataset::resolve_local(&common.dataset, common.dataset_config.as_deref(), &common.split);
    }
    if hub::is_repo_id(&common.dataset) {
        let hub = Hub::new(common.offline)?;
        let repo = common.dataset.to_string_lossy();
        return hub::dataset::resolve(
            &hub,
            &repo,
            common.dataset_revision.as_deref(),
            common.dataset_config.as_deref(),
            &common.split,
        );
    }
    Ok(vec![common.dataset.clone()])
}

/// A model folder opened without its weights: what the data pipeline and the memory plan need.
pub struct ModelFiles {
    pub arch: Architecture,
    pub tokenizer: PairTokenizer,
    pub device: Device,
    pub dtype: DType,
    pub pad_id: u32,
    pub model_dir: PathBuf,
}

/// Resolves `--model`, reads its config.json and tokenizer; no weights yet.
pub fn open_model(common: &CommonArgs) -> Result<ModelFiles> {
    let device = common.device.open()?;
    let dtype = common.dtype.resolve(&device);
    let dir = model_dir(common)?;
    let arch = Architecture::from_file(&dir.join("config.json"))?;
    let tokenizer = PairTokenizer::from_model_dir(&dir)?;
    let pad_id = arch.pad_token_id.unwrap_or(tokenizer.eos_id());
    Ok(ModelFiles { arch, tokenizer, device, dtype, pad_id, model_dir: dir })
}

impl ModelFiles {
    /// Memory-maps the weights and builds the model.
    pub fn load(self) -> Result<Loaded> {
        let vb = mmap_weights(&self.model_dir, self.dtype, &self.device)?;
        let model = CausalLm::from_weights(self.arch, vb, self.dtype, &self.device)
            .with_context(|| format!("loading the weights in {}", self.model_dir.display()))?;
        eprintln!("model: {}; layers run on the {} path", model.arch().summary(), model.path());
        Ok(Loaded {
            model,
            tokenizer: self.tokenizer,
            device: self.device,
            pad_id: self.pad_id,
            model_dir: self.model_dir,
        })
    }
}

pub fn load_model(common: &CommonArgs) -> Result<Loaded> {
    open_model(common)?.load()
}

/// The run's pairs, addressed by index (the trainer asks for them in its seeded order). Only the
/// byte offset of each row is held; `get` re-reads and tokenizes the row.
pub struct Dataset {
    pipeline: Pipeline,
    /// KTO on preference pairs: example `2i` is pair `i`'s chosen response (desirable),
    /// `2i + 1` its rejected one (undesirable).
    unpair: bool,
    /// Pairs cut by --max-length / --max-prompt-length.
    pub truncated: usize,
    /// What the pre-flight pass found.
    pub audit: Audit,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.pipeline.len() * if self.unpair { 2 } else { 1 }
    }

    pub fn is_empty(&self) -> bool {
        self.pipeline.is_empty()
    }

    /// Pair `i` (0-based, file order among usable rows), tokenized and truncated.
    pub fn get(&self, i: usize) -> Result<TokenizedPair> {
        Ok(self.labeled(i)?.0)
    }

    /// Example `i` with its label: a pair's label is `None`; an unpaired (KTO) example has its
    /// completion in `chosen`, nothing in `rejected`.
    pub fn labeled(&self, i: usize) -> Result<(TokenizedPair, Option<bool>)> {
        if !self.unpair {
            return self.pipeline.labeled(i);
        }
        let pair = self.pipeline.pair(i / 2)?;
        let desirable = i % 2 == 0;
        let completion = if desirable { pair.chosen } else { pair.rejected };
        Ok((TokenizedPair { prompt: pair.prompt, chosen: completion, rejected: Vec::new() }, Some(desirable)))
    }
}

/// Reads, audits and indexes every pair of `--dataset`; refuses data with more than
/// `--max-skip-ratio` unusable rows.
pub fn load_pairs(common: &CommonArgs, loaded: &Loaded) -> Result<Dataset> {
    read_pairs(common, &loaded.tokenizer, loaded.model.arch().vocab_size, &loaded.model_dir)
}

/// As [`load_pairs`], before the weights are loaded.
pub fn load_pairs_for(common: &CommonArgs, files: &ModelFiles) -> Result<Dataset> {
    read_pairs(common, &files.tokenizer, files.arch.vocab_size, &files.model_dir)
}

fn read_pairs(
    common: &CommonArgs,
    tokenizer: &PairTokenizer,
    vocab_size: usize,
    model_dir: &std::path::Path,
) -> Result<Dataset> {
    let files = dataset_files(common)?;
    let settings = common.data_settings(Some(vocab_size));
    let (pipeline, audit) = Pipeline::build(&files, settings, tokenizer.clone(), model_dir)?;
    audit.check_skip_ratio(common.max_skip_ratio)?;
    if audit.rows_skipped > 0 {
        eprintln!(
            "skipped {} of {} rows: {}",
            audit.rows_skipped,
            audit.rows_read,
            audit.skipped.iter().take(3).map(|b| b.to_string()).collect::<Vec<_>>().join("; ")
        );
    }
    let unpaired_rows = pipeline.format() == crate::data::schema::Format::Unpaired;
    let kto = objective(common)?.unpaired();
    if unpaired_rows && !kto {
        bail!(
            "{}: the rows are unpaired (prompt, completion, label): train on them with --loss kto",
            common.dataset.display()
        );
    }
    // KTO on preference pairs: each pair becomes its desirable and its undesirable example.
    let unpair = kto && !unpaired_rows;
    Ok(Dataset { pipeline, unpair, truncated: audit.truncated, audit })
}

/// The objective `--loss` and its parameters describe; a bad combination is a usage error.
pub fn objective(common: &CommonArgs) -> Result<Objective> {
    common.objective().map_err(|msg| crate::config::UsageError(msg).into())
}
