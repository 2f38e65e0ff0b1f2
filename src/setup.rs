//! What every subcommand that reads a model and data does first: open the device, resolve
//! `--model` / `--dataset` (local paths or Hub repo ids), load the model and tokenizer, and index
//! and audit the rows the task reads.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let common: dpo::config::CommonArgs = todo!();
//! let loaded = dpo::setup::load_model(&common.model)?;
//! let data = dpo::setup::load_rows(&common, &loaded, &dpo::task::Task::Sft)?;
//! println!("{} pairs, {} truncated", data.len(), data.truncated);
//! # Ok(()) }
//! ```
use crate::config::{CommonArgs, ModelArgs};
use crate::data::pipeline::Pipeline;
use crate::data::{Dataset, PairTokenizer, Rows};
use crate::hub::{self, Hub};
use crate::lora::adapter::NamedParam;
use crate::model::weights::mmap_weights;
use crate::model::{Architecture, CausalLm, LayerPath};
use crate::task::Task;
use anyhow::{Context, Result};
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
pub fn model_dir(model: &ModelArgs) -> Result<PathBuf> {
    if hub::is_repo_id(&model.path) {
        let hub = Hub::new(model.offline)?;
        return hub::model::resolve(&hub, &model.path.to_string_lossy(), model.revision.as_deref());
    }
    Ok(model.path.clone())
}

/// `--dataset` as local files: a file itself; the files of `--split` of a local folder or of a
/// Hub dataset repo.
pub fn dataset_files(common: &CommonArgs) -> Result<Vec<PathBuf>> {
    if common.dataset.is_dir() {
        return hub::dataset::resolve_local(&common.dataset, common.dataset_config.as_deref(), &common.split);
    }
    if hub::is_repo_id(&common.dataset) {
        let hub = Hub::new(common.model.offline)?;
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
    /// The layer path asked for ([`crate::model::LayerPath::choose`] decides).
    pub layer_path: LayerPath,
}

/// Resolves `--model`, reads its config.json and tokenizer; no weights yet.
pub fn open_model(model: &ModelArgs) -> Result<ModelFiles> {
    let device = model.placement.device.open()?;
    let dtype = model.dtype.resolve(&device);
    let dir = model_dir(model)?;
    let arch = Architecture::from_file(&dir.join("config.json"))?;
    let tokenizer = PairTokenizer::from_model_dir(&dir)?;
    let pad_id = arch.pad_token_id.unwrap_or(tokenizer.eos_id());
    Ok(ModelFiles { arch, tokenizer, device, dtype, pad_id, model_dir: dir, layer_path: model.layer_path })
}

impl ModelFiles {
    /// Memory-maps the weights and builds the model, frozen.
    pub fn load(self) -> Result<Loaded> {
        let vb = mmap_weights(&self.model_dir, self.dtype, &self.device)?;
        let model = CausalLm::from_weights(self.arch.clone(), vb, self.dtype, &self.device, self.layer_path)
            .with_context(|| format!("loading the weights in {}", self.model_dir.display()))?;
        Ok(self.loaded(model))
    }

    /// Full fine-tuning: the model with every weight trainable, and the weights with their
    /// checkpoint names.
    pub fn load_trainable(self) -> Result<(Loaded, Vec<NamedParam>)> {
        let vb = mmap_weights(&self.model_dir, self.dtype, &self.device)?;
        let (model, named) = CausalLm::trainable(self.arch.clone(), vb, &self.device)
            .with_context(|| format!("loading the weights in {}", self.model_dir.display()))?;
        let params = named.into_iter().map(|(name, var)| NamedParam { name, var }).collect();
        Ok((self.loaded(model), params))
    }

    fn loaded(self, model: CausalLm) -> Loaded {
        eprintln!("model: {}; layers run on the {} path", model.arch().summary(), model.path());
        Loaded { model, tokenizer: self.tokenizer, device: self.device, pad_id: self.pad_id, model_dir: self.model_dir }
    }
}

pub fn load_model(model: &ModelArgs) -> Result<Loaded> {
    open_model(model)?.load()
}

/// Reads, audits and indexes every row of `--dataset` as `task` reads them; refuses data with
/// more than `--max-skip-ratio` unusable rows.
pub fn load_rows(common: &CommonArgs, loaded: &Loaded, task: &Task) -> Result<Dataset> {
    read_rows(common, &loaded.tokenizer, loaded.model.arch().vocab_size, &loaded.model_dir, task.rows())
}

/// As [`load_rows`], before the weights are loaded.
pub fn load_rows_for(common: &CommonArgs, files: &ModelFiles, task: &Task) -> Result<Dataset> {
    read_rows(common, &files.tokenizer, files.arch.vocab_size, &files.model_dir, task.rows())
}

fn read_rows(
    common: &CommonArgs,
    tokenizer: &PairTokenizer,
    vocab_size: usize,
    model_dir: &std::path::Path,
    rows: Rows,
) -> Result<Dataset> {
    let files = dataset_files(common)?;
    let settings = common.data_settings(Some(vocab_size), rows);
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
    Ok(Dataset::new(pipeline, audit, rows))
}
