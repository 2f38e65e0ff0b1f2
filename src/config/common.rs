//! Flags shared by every subcommand that reads a model and data: the model and where it computes
//! ([`ModelArgs`], also all `dpo generate` needs), the data (local paths or Hub repo ids), how
//! rows are read and prompts rendered ([`TemplateArgs`]), and truncation.
//!
//! ```
//! use clap::Parser;
//! #[derive(Parser)]
//! struct Cli { #[command(flatten)] common: dpo::config::CommonArgs }
//! let cli = Cli::parse_from(["x", "--model", "tiny/llama", "--dataset", "tiny/orca_dpo_pairs", "--offline"]);
//! assert!(cli.common.model.offline && cli.common.split == "train");
//! ```
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;

/// Settings shared by every subcommand that reads a model and data.
#[derive(Debug, Clone, Args, Serialize)]
pub struct CommonArgs {
    /// TOML file whose keys are flag names; command-line flags override it.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub model: ModelArgs,
    /// Preference data: a .jsonl/.json/.jsonl.gz/.parquet file or a Hub dataset repo id (org/name).
    #[arg(long)]
    pub dataset: PathBuf,
    /// Dataset revision on the Hub: branch, tag or commit.
    #[arg(long)]
    pub dataset_revision: Option<String>,
    /// Named dataset config (README.md `configs:`) of a Hub dataset.
    #[arg(long)]
    pub dataset_config: Option<String>,
    /// Split of a Hub dataset.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Row schema.
    #[arg(long, value_enum, default_value = "auto")]
    pub format: crate::data::schema::FormatChoice,
    /// Column holding the prompt (default: question for orca, prompt otherwise).
    #[arg(long)]
    pub prompt_column: Option<String>,
    /// Column holding the chosen response (default: chosen).
    #[arg(long)]
    pub chosen_column: Option<String>,
    /// Column holding the rejected response (default: rejected).
    #[arg(long)]
    pub rejected_column: Option<String>,
    #[command(flatten)]
    #[serde(flatten)]
    pub render: TemplateArgs,
    /// Refuse to run when more than this fraction of rows is unusable.
    #[arg(long, default_value_t = 0.01)]
    pub max_skip_ratio: f64,
    /// Longest prompt + response, in tokens; longer pairs are truncated.
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    /// Prompts longer than this keep their end when a pair must be truncated.
    #[arg(long, default_value_t = 512)]
    pub max_prompt_length: usize,
}

/// The model and where it computes.
#[derive(Debug, Clone, Args, Serialize)]
pub struct ModelArgs {
    /// Model folder (config.json, tokenizer.json, safetensors weights) or Hub repo id (org/name).
    #[arg(long = "model", value_name = "MODEL")]
    #[serde(rename = "model")]
    pub path: PathBuf,
    /// Model revision on the Hub: branch, tag or commit.
    #[arg(long)]
    pub revision: Option<String>,
    /// Use only the Hub cache, never the network (also HF_HUB_OFFLINE=1); for the dataset too.
    #[arg(long)]
    pub offline: bool,
    /// Where the run computes (a resumed run may move).
    #[command(flatten)]
    #[serde(flatten)]
    pub placement: Placement,
    /// Base-weight compute dtype (auto: f32 on CPU, bf16 on CUDA).
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: crate::device::DTypeChoice,
    /// The layer path asked for: the CPU op where it computes the family exactly, unless the
    /// environment forces the generic path (`DPO_LAYER_PATH=generic`, read once by the CLI).
    #[arg(skip)]
    #[serde(skip)]
    pub layer_path: crate::model::LayerPath,
}

/// How prompts are rendered.
#[derive(Debug, Clone, Args, Serialize)]
pub struct TemplateArgs {
    /// Prompt template (auto: chat for conversational data with a chat template, orca for orca rows, raw for string prompts).
    #[arg(long, value_enum, default_value = "auto")]
    pub template: crate::data::template::TemplateChoice,
    /// A Jinja chat template file used instead of the tokenizer's.
    #[arg(long)]
    pub template_file: Option<PathBuf>,
}

/// The device: the one setting of [`CommonArgs`] that never changes the math of a run.
#[derive(Debug, Clone, Args, Serialize)]
pub struct Placement {
    /// cpu | cuda | cuda:N | auto.
    #[arg(long, default_value = "auto")]
    pub device: crate::device::DeviceSpec,
}

impl CommonArgs {
    /// The data settings of these flags, for rows holding what `rows` says.
    pub fn data_settings(&self, vocab_size: Option<usize>, rows: crate::data::Rows) -> crate::data::pipeline::Settings {
        crate::data::pipeline::Settings {
            format: self.format,
            columns: crate::data::schema::Columns {
                prompt: self.prompt_column.clone(),
                chosen: self.chosen_column.clone(),
                rejected: self.rejected_column.clone(),
            },
            template: self.render.template,
            template_file: self.render.template_file.clone(),
            max_length: self.max_length,
            max_prompt_length: self.max_prompt_length,
            vocab_size,
            rows,
        }
    }
}
