//! LoRA: low-rank adapters on the frozen linear layers, in peft's format.
//!
//! `y = W·x (+ b) + (alpha / r) · B·A·dropout(x)`, A `[r, in]` Kaiming-uniform like peft,
//! B `[out, r]` zero, so a fresh adapter leaves the model unchanged. The reference model
//! is the same layers with the adapter switched off ([`crate::nn::LoraMode::Off`]).
//!
//! ```
//! let cfg = dpo::lora::LoraConfig::new(8, 16.0, 0.0, "q_proj,v").unwrap();
//! assert_eq!(cfg.scale(), 2.0);
//! assert!(cfg.targets("model.layers.0.self_attn.v_proj"));
//! ```
pub mod adapter;

use anyhow::{Result, bail};

use crate::model::arch::{Architecture, Proj, proj};

/// `target_modules` meaning every linear layer of the family (peft's `all-linear`).
pub const ALL_LINEAR: &str = "all-linear";

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// peft `target_modules`: module names (`q_proj`), full module paths, or [`ALL_LINEAR`]
    /// until [`LoraConfig::resolve`] turns it into the family's module names.
    pub targets: Vec<String>,
    /// peft's rank-stabilised scaling `alpha / sqrt(r)`; only ever read from an adapter.
    pub use_rslora: bool,
    /// peft's `task_type`: what the adapted model is.
    pub task_type: AdapterTask,
}

/// peft's `task_type` of an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdapterTask {
    /// `CAUSAL_LM`: the language model itself.
    #[default]
    CausalLm,
    /// `SEQ_CLS`: a reward model, its `score` head saved in full (`modules_to_save`).
    SequenceClassification,
}

impl AdapterTask {
    pub fn peft_name(self) -> &'static str {
        match self {
            AdapterTask::CausalLm => "CAUSAL_LM",
            AdapterTask::SequenceClassification => "SEQ_CLS",
        }
    }
}

/// `--lora-targets`: a comma list of the family's linears, or `all`; parsed when the flags are,
/// checked against the family ([`LoraConfig::resolve`]) before any weight is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraTargets(Vec<String>);

impl std::str::FromStr for LoraTargets {
    type Err = String;

    fn from_str(list: &str) -> std::result::Result<Self, String> {
        let targets = parse_targets(list).map_err(|e| format!("{e:#}"))?;
        if targets.is_empty() {
            return Err("no linear named: give a comma list such as q,v, or all".into());
        }
        Ok(Self(targets))
    }
}

impl std::fmt::Display for LoraTargets {
    /// As the flag takes it, with peft's module names: `q_proj,v_proj`, `all`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|t| if t == ALL_LINEAR { "all" } else { t.as_str() }).collect();
        f.write_str(&names.join(","))
    }
}

impl serde::Serialize for LoraTargets {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// What is wrong with a LoRA rank, alpha or dropout: `(key, value, the rule)`. The one
/// definition of their ranges, for flags and adapter files alike.
pub fn hyper_problem(r: usize, alpha: f64, dropout: f64) -> Option<(&'static str, String, &'static str)> {
    if r == 0 {
        return Some(("lora_r", r.to_string(), "must be at least 1"));
    }
    if !(alpha.is_finite() && alpha > 0.0) {
        return Some(("lora_alpha", alpha.to_string(), "must be a positive number"));
    }
    if !(dropout.is_finite() && (0.0..1.0).contains(&dropout)) {
        return Some(("lora_dropout", dropout.to_string(), "must be in [0, 1)"));
    }
    None
}

impl LoraConfig {
    /// `targets`: a comma list of linears (`q,k,v,o,gate,up,down`, `qkv,gate_up` for fused
    /// families; with or without `_proj`), or `all`.
    pub fn new(r: usize, alpha: f64, dropout: f64, targets: &str) -> Result<Self> {
        let targets: LoraTargets = targets.parse().map_err(anyhow::Error::msg)?;
        Self::with_targets(r, alpha, dropout, &targets)
    }

    /// From the flags: `--lora-r`, `--lora-alpha`, `--lora-dropout`, `--lora-targets`.
    pub fn with_targets(r: usize, alpha: f64, dropout: f64, targets: &LoraTargets) -> Result<Self> {
        Self::validated(r, alpha, dropout, targets.0.clone(), false)
    }

    pub fn validated(r: usize, alpha: f64, dropout: f64, targets: Vec<String>, use_rslora: bool) -> Result<Self> {
        if let Some((key, value, rule)) = hyper_problem(r, alpha, dropout) {
            bail!("{key} = {value} is out of range: {rule}");
        }
        if targets.is_empty() {
            bail!("lora targets are empty");
        }
        Ok(Self { r, alpha, dropout, targets, use_rslora, task_type: AdapterTask::CausalLm })
    }

    pub fn scale(&self) -> f64 {
        if self.use_rslora { self.alpha / (self.r as f64).sqrt() } else { self.alpha / self.r as f64 }
    }

    /// Whether the module at `path` (`model.layers.0.self_attn.q_proj`) is targeted, as peft
    /// matches a `target_modules` list: the whole path, or its trailing `.name`.
    pub fn targets(&self, path: &str) -> bool {
        self.targets.iter().any(|t| path == t || path.ends_with(&format!(".{t}")))
    }

    /// The targets for this family: `all-linear` becomes its linears; where the family fuses
    /// linears, the names of their parts become the fused one (`q`, `k`, `v` → `qkv_proj` and
    /// `gate`, `up` → `gate_up_proj` on Phi-3); a name it does not have is an error listing
    /// the ones it has.
    pub fn resolve(&self, arch: &Architecture) -> Result<Self> {
        let modules: Vec<&str> = arch.projections.iter().map(|p| p.module()).collect();
        if self.targets.iter().any(|t| t == ALL_LINEAR) {
            return Ok(Self { targets: modules.iter().map(|m| m.to_string()).collect(), ..self.clone() });
        }
        let mut targets: Vec<String> = Vec::new();
        for t in &self.targets {
            let (scope, name) = t.rsplit_once('.').map_or(("", t.as_str()), |(s, n)| (s, n));
            let fused = match name {
                "q_proj" | "k_proj" | "v_proj" => "qkv_proj",
                "gate_proj" | "up_proj" => "gate_up_proj",
                _ => "",
            };
            let resolved = if modules.contains(&name) {
                t.clone()
            } else if modules.contains(&fused) {
                if scope.is_empty() { fused.to_string() } else { format!("{scope}.{fused}") }
            } else {
                bail!(
                    "LoRA target {name}: {} has no such linear; its linears are {}",
                    arch.model_type,
                    modules.join(", ")
                );
            };
            if !targets.contains(&resolved) {
                targets.push(resolved);
            }
        }
        Ok(Self { targets, ..self.clone() })
    }
}

/// Parses `q,v` / `q_proj,v_proj` / `all` into module names, in forward order, de-duplicated.
pub fn parse_targets(list: &str) -> Result<Vec<String>> {
    let list = list.trim();
    if list == "all" || list == ALL_LINEAR {
        return Ok(vec![ALL_LINEAR.to_string()]);
    }
    let wanted = list.split(',').filter(|s| !s.trim().is_empty()).map(Proj::parse_short).collect::<Result<Vec<_>>>()?;
    Ok(proj::ALL.iter().filter(|p| wanted.contains(p)).map(|p| p.module().to_string()).collect())
}
