//! Settings: each subcommand's flags as one typed struct, and TOML config files whose keys are
//! the flag names ([`mod@file`]).
//!
//! The training subcommands share [`CommonArgs`] (model, data, device) and [`RunArgs`] (the run:
//! output, LoRA or full, optimizer, checkpoints, held-out evaluation); `dpo train` adds the
//! objective ([`ObjectiveArgs`]) and the reference cache. Each builds its [`Task`] and hands the
//! trainer one [`RunSettings`]: no flag of one task is a flag of another.
//!
//! ```
//! use clap::Parser;
//! let args = dpo::config::TrainArgs::try_parse_from(["train", "--model", "m", "--dataset", "d.jsonl", "--beta", "0.2"]).unwrap();
//! assert_eq!(args.objective.beta, 0.2);
//! let settings = args.settings().unwrap();
//! assert_eq!(settings.task.command(), "dpo train");
//! ```
use crate::task::Task;
use anyhow::Result;
use clap::{Args, Parser};
use serde::Serialize;
use std::path::{Path, PathBuf};

mod common;
pub mod file;
pub mod objective;
mod run;
pub mod validate;
pub use common::{CommonArgs, ModelArgs, Placement, TemplateArgs};
pub use file::{expand_config_file, expand_with_file, find_flag, parse_setting, table_flags};
pub use objective::ObjectiveArgs;
pub use run::{Adjustable, Checkpointing, LoraArgs, RunArgs};
pub use validate::validate;

/// `dpo train`: DPO and its relatives (or KTO) on preference data.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(name = "train", args_override_self = true)]
pub struct TrainArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub objective: ObjectiveArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub reference: ReferenceArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
}

/// Where the frozen reference's log-probs are kept between runs (a resumed run may change it:
/// cached values are bit-identical to computed ones).
#[derive(Debug, Clone, Args, Serialize)]
pub struct ReferenceArgs {
    /// Reference log-prob cache folder: cached pairs skip the reference forward (bit-identical
    /// results); `auto` = OUTPUT's parent/.dpo-ref-cache, shared by runs.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ref_cache: Option<PathBuf>,
}

/// `dpo sft`: supervised fine-tuning on completions.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(name = "sft", args_override_self = true)]
pub struct SftArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
}

/// `dpo reward train`: a Bradley–Terry reward model on preference pairs.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(name = "train", args_override_self = true)]
pub struct RewardArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
}

/// One training run's settings, whatever its subcommand: what the trainer reads.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub task: Task,
    pub common: CommonArgs,
    pub run: RunArgs,
    /// `--ref-cache` as given (`dpo train` only).
    pub ref_cache: Option<PathBuf>,
    /// The subcommand's settings as TOML (`train_config.toml`): loadable with `--config`,
    /// compared with a checkpoint's on resume.
    pub config_toml: String,
}

impl RunSettings {
    /// Where the reference cache is, `auto` resolved to `OUTPUT/../.dpo-ref-cache`.
    pub fn ref_cache_dir(&self) -> Option<PathBuf> {
        let dir = self.ref_cache.as_ref()?;
        if dir.as_os_str() != "auto" {
            return Some(dir.clone());
        }
        let output = &self.run.output_dir;
        let parent = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Some(parent.join(".dpo-ref-cache"))
    }

    /// The config keys a resumed run may change (the [`Adjustable`], [`Placement`] and
    /// [`ReferenceArgs`] groups).
    pub fn adjustable_keys() -> Vec<String> {
        fn keys<G: Args>() -> Vec<String> {
            G::augment_args(clap::Command::new("keys")).get_arguments().map(|a| a.get_id().to_string()).collect()
        }
        [keys::<Adjustable>(), keys::<Placement>(), keys::<ReferenceArgs>()].concat()
    }
}

impl TrainArgs {
    /// The checked settings of this run, its task built from the objective flags.
    pub fn settings(&self) -> Result<RunSettings> {
        let task = self.objective.task().map_err(UsageError)?;
        validate::validate(&self.common, &self.run, &task)?;
        Ok(RunSettings {
            task,
            common: self.common.clone(),
            run: self.run.clone(),
            ref_cache: self.reference.ref_cache.clone(),
            config_toml: toml::to_string(self)?,
        })
    }
}

impl SftArgs {
    pub fn settings(&self) -> Result<RunSettings> {
        settings_of(self, Task::Sft, &self.common, &self.run)
    }
}

impl RewardArgs {
    pub fn settings(&self) -> Result<RunSettings> {
        settings_of(self, Task::Reward, &self.common, &self.run)
    }
}

fn settings_of<A: Serialize>(args: &A, task: Task, common: &CommonArgs, run: &RunArgs) -> Result<RunSettings> {
    validate::validate(common, run, &task)?;
    Ok(RunSettings {
        task,
        common: common.clone(),
        run: run.clone(),
        ref_cache: None,
        config_toml: toml::to_string(args)?,
    })
}

/// The command-line name of a choice (`hh-rlhf`, `bf16`).
pub fn name_of<T: clap::ValueEnum>(choice: &T) -> String {
    choice.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default()
}

/// A mistake in how dpo was called (bad config file key or value): exit code 2, like a bad flag.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}
