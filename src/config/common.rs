//! Flags shared by `train` and `eval`: where the model and the pairs come from (local paths or
//! Hub repo ids), how rows are read and prompts rendered, the loss, and the device.
//!
//! ```
//! use clap::Parser;
//! #[derive(Parser)]
//! struct Cli { #[command(flatten)] common: dpo::config::CommonArgs }
//! let cli = Cli::parse_from(["x", "--model", "tiny/llama", "--dataset", "tiny/orca_dpo_pairs", "--offline"]);
//! assert!(cli.common.offline && cli.common.split == "train");
//! ```
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;

/// Settings shared by `train` and `eval`: model, data, template, loss and devices.
#[derive(Debug, Clone, Args, Serialize)]
pub struct CommonArgs {
    /// TOML file whose keys are flag names; command-line flags override it.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Model folder (config.json, tokenizer.json, safetensors weights) or Hub repo id (org/name).
    #[arg(long)]
    pub model: PathBuf,
    /// Model revision on the Hub: branch, tag or commit.
    #[arg(long)]
    pub revision: Option<String>,
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
    /// Use only the Hub cache, never the network (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
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
    /// Prompt template (auto: chat for conversational data with a chat template, orca for orca rows, raw for string prompts).
    #[arg(long, value_enum, default_value = "auto")]
    pub template: crate::data::template::TemplateChoice,
    /// A Jinja chat template file used instead of the tokenizer's.
    #[arg(long)]
    pub template_file: Option<PathBuf>,
    /// Refuse to run when more than this fraction of rows is unusable.
    #[arg(long, default_value_t = 0.01)]
    pub max_skip_ratio: f64,
    /// The preference loss, by TRL's name; a comma list mixes losses (TRL's MPO) with --loss-weights.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "sigmoid")]
    #[serde(serialize_with = "comma_list")]
    pub loss: Vec<crate::loss::LossKind>,
    /// Weight of each loss of --loss, in order (default: 1 each).
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub loss_weights: Vec<f64>,
    /// DPO temperature β (ORPO's λ, IPO's τ).
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// Label smoothing ε: cDPO for sigmoid; exo_pair, robust, aot, aot_unpaired, simpo, cpo.
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// f-divergence of the log-ratios (sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop).
    #[arg(long, value_enum, default_value = "reverse_kl")]
    pub f_divergence: crate::loss::FDivergence,
    /// α of --f-divergence alpha_divergence [default: 1.0].
    #[arg(long)]
    pub f_alpha: Option<f64>,
    /// DiscoPOP's temperature τ [default: 0.05].
    #[arg(long)]
    pub discopop_tau: Option<f64>,
    /// SimPO's target reward margin γ [default: 0.5].
    #[arg(long)]
    pub simpo_gamma: Option<f64>,
    /// Weight of the chosen NLL added to cpo [default: 1.0] or simpo [default: 0].
    #[arg(long)]
    pub cpo_alpha: Option<f64>,
    /// LD-DPO: response tokens past the shorter response's length weigh α in every sum.
    #[arg(long)]
    pub ld_alpha: Option<f64>,
    /// WPO: weight each pair's loss by the policy's (detached) probability of both responses.
    #[arg(long)]
    pub use_weighting: bool,
    /// KTO: weight of the desirable examples' losses.
    #[arg(long, default_value_t = 1.0)]
    pub desirable_weight: f64,
    /// KTO: weight of the undesirable examples' losses.
    #[arg(long, default_value_t = 1.0)]
    pub undesirable_weight: f64,
    /// Longest prompt + response, in tokens; longer pairs are truncated.
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    /// Prompts longer than this keep their end when a pair must be truncated.
    #[arg(long, default_value_t = 512)]
    pub max_prompt_length: usize,
    /// cpu | cuda | cuda:N | auto.
    #[arg(long, default_value = "auto")]
    pub device: crate::device::DeviceSpec,
    /// What is trained: `dpo` (preference pairs) or `sft` (completions); set by the subcommand
    /// (`dpo sft` is `dpo train --stage sft`) and kept in a run's config for resuming.
    #[arg(long, value_enum, default_value = "dpo", hide = true)]
    pub stage: Stage,
    /// Base-weight compute dtype (auto: f32 on CPU, bf16 on CUDA).
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: crate::device::DTypeChoice,
}

/// The training stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    Dpo,
    Sft,
    /// A Bradley–Terry reward model (`dpo reward train`).
    Reward,
}

/// `loss = "sigmoid"`, `loss = "sigmoid,sft"`: written as the flag takes it.
fn comma_list<S: serde::Serializer>(kinds: &[crate::loss::LossKind], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(","))
}

impl CommonArgs {
    /// `dpo sft`'s and `dpo reward`'s objectives; preference-loss flags are refused rather than
    /// ignored.
    fn supervised_objective(&self) -> std::result::Result<crate::loss::Objective, String> {
        let defaults = self.loss == [crate::loss::LossKind::Sigmoid]
            && self.loss_weights.is_empty()
            && self.label_smoothing == 0.0;
        let defaults = defaults && self.f_divergence == crate::loss::FDivergence::ReverseKl && !self.use_weighting;
        let defaults = defaults && self.desirable_weight == 1.0 && self.undesirable_weight == 1.0;
        let unset = [self.f_alpha, self.discopop_tau, self.simpo_gamma, self.cpo_alpha, self.ld_alpha]
            .iter()
            .all(Option::is_none);
        if !(defaults && unset) {
            let what = if self.stage == Stage::Sft {
                "dpo sft trains on completions with the token-mean NLL"
            } else {
                "dpo reward trains a Bradley–Terry reward model"
            };
            return Err(format!(
                "{what}: --loss and the preference-loss flags (--loss-weights, --label-smoothing, --f-divergence, --ld-alpha, --use-weighting, ...) do not apply"
            ));
        }
        Ok(if self.stage == Stage::Sft {
            crate::loss::Objective::supervised()
        } else {
            crate::loss::Objective::reward_model()
        })
    }

    /// The training objective these flags describe; a bad combination is a [`super::UsageError`]
    /// naming the flags.
    pub fn objective(&self) -> std::result::Result<crate::loss::Objective, String> {
        if self.stage != Stage::Dpo {
            return self.supervised_objective();
        }
        let mut params = crate::loss::LossParams::new(self.beta);
        params.label_smoothing = self.label_smoothing;
        params.f_divergence = self.f_divergence;
        params.f_alpha = self.f_alpha.unwrap_or(1.0);
        params.discopop_tau = self.discopop_tau.unwrap_or(0.05);
        params.simpo_gamma = self.simpo_gamma.unwrap_or(0.5);
        params.cpo_alpha = self.cpo_alpha;
        params.desirable_weight = self.desirable_weight;
        params.undesirable_weight = self.undesirable_weight;
        let explicit = crate::loss::Explicit {
            f_alpha: self.f_alpha.is_some(),
            discopop_tau: self.discopop_tau.is_some(),
            simpo_gamma: self.simpo_gamma.is_some(),
        };
        crate::loss::Objective::new(&self.loss, &self.loss_weights, params, self.ld_alpha, self.use_weighting, explicit)
    }

    /// The data settings of these flags.
    pub fn data_settings(&self, vocab_size: Option<usize>) -> crate::data::pipeline::Settings {
        crate::data::pipeline::Settings {
            format: self.format,
            columns: crate::data::schema::Columns {
                prompt: self.prompt_column.clone(),
                chosen: self.chosen_column.clone(),
                rejected: self.rejected_column.clone(),
            },
            template: self.template,
            template_file: self.template_file.clone(),
            max_length: self.max_length,
            max_prompt_length: self.max_prompt_length,
            vocab_size,
            completions: self.stage == Stage::Sft,
        }
    }
}
