//! The objective flags of `dpo train` and `dpo eval`: the preference loss (TRL's names, or a
//! weighted mix), its parameters, and KTO's weights. They build the run's [`Task`]: KTO's when
//! `--loss kto`, preference pairs otherwise.
//!
//! ```
//! use clap::Parser;
//! #[derive(Parser)]
//! struct Cli { #[command(flatten)] objective: dpo::config::ObjectiveArgs }
//! let cli = Cli::parse_from(["x", "--loss", "kto", "--beta", "0.2"]);
//! assert!(matches!(cli.objective.task().unwrap(), dpo::task::Task::Kto(_)));
//! ```
use crate::loss::{Explicit, LossKind, LossParams, Objective};
use crate::task::Task;
use clap::Args;
use serde::Serialize;

/// The loss and its parameters.
#[derive(Debug, Clone, Args, Serialize)]
pub struct ObjectiveArgs {
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
}

/// `loss = "sigmoid"`, `loss = "sigmoid,sft"`: written as the flag takes it.
fn comma_list<S: serde::Serializer>(kinds: &[LossKind], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(","))
}

/// The flags' ids (for clap's `conflicts_with_all`): every objective flag.
pub const FLAGS: [&str; 13] = [
    "loss",
    "loss_weights",
    "beta",
    "label_smoothing",
    "f_divergence",
    "f_alpha",
    "discopop_tau",
    "simpo_gamma",
    "cpo_alpha",
    "ld_alpha",
    "use_weighting",
    "desirable_weight",
    "undesirable_weight",
];

impl ObjectiveArgs {
    /// The objective these flags describe; a bad combination names the flags.
    pub fn objective(&self) -> Result<Objective, String> {
        let mut params = LossParams::new(self.beta);
        params.label_smoothing = self.label_smoothing;
        params.f_divergence = self.f_divergence;
        params.f_alpha = self.f_alpha.unwrap_or(1.0);
        params.discopop_tau = self.discopop_tau.unwrap_or(0.05);
        params.simpo_gamma = self.simpo_gamma.unwrap_or(0.5);
        params.cpo_alpha = self.cpo_alpha;
        params.desirable_weight = self.desirable_weight;
        params.undesirable_weight = self.undesirable_weight;
        let explicit = Explicit {
            f_alpha: self.f_alpha.is_some(),
            discopop_tau: self.discopop_tau.is_some(),
            simpo_gamma: self.simpo_gamma.is_some(),
        };
        Objective::new(&self.loss, &self.loss_weights, params, self.ld_alpha, self.use_weighting, explicit)
    }

    /// `dpo train`'s task: KTO's examples for `--loss kto`, preference pairs otherwise.
    pub fn task(&self) -> Result<Task, String> {
        Ok(Task::train(self.objective()?))
    }
}
