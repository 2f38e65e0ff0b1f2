//! LoRA: low-rank adapters on the frozen linear layers, in peft's format.
//!
//! `y = W·x (+ b) + (alpha / r) · B·A·dropout(x)`, A `[r, in]` Kaiming-uniform like peft,
//! B `[out, r]` zero, so a fresh adapter leaves the model unchanged. The reference model
//! is the same layers with the adapter switched off ([`LoraMode::Off`]).
//!
//! ```
//! let cfg = dpo::lora::LoraConfig::new(8, 16.0, 0.0, "q_proj,v_proj").unwrap();
//! assert_eq!(cfg.scale(), 2.0);
//! ```
pub mod adapter;
pub mod linear;

pub use linear::{LoraLinear, LoraMode};

use anyhow::{Result, bail};

/// The linear layers LoRA can target, in peft's names.
pub const TARGETABLE: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Targeted module names, in `TARGETABLE` order.
    pub targets: Vec<String>,
    /// peft's rank-stabilised scaling `alpha / sqrt(r)`; only ever read from an adapter.
    pub use_rslora: bool,
}

impl LoraConfig {
    /// `targets`: a comma list of `q,k,v,o,gate,up,down` (with or without `_proj`), or `all`.
    pub fn new(r: usize, alpha: f64, dropout: f64, targets: &str) -> Result<Self> {
        Self::validated(r, alpha, dropout, parse_targets(targets)?, false)
    }

    pub fn validated(r: usize, alpha: f64, dropout: f64, targets: Vec<String>, use_rslora: bool) -> Result<Self> {
        if r == 0 {
            bail!("lora r must be at least 1");
        }
        if !(0.0..1.0).contains(&dropout) {
            bail!("lora dropout must be in [0, 1), got {dropout}");
        }
        if !alpha.is_finite() || alpha <= 0.0 {
            bail!("lora alpha must be positive, got {alpha}");
        }
        if targets.is_empty() {
            bail!("lora targets are empty");
        }
        Ok(Self { r, alpha, dropout, targets, use_rslora })
    }

    pub fn scale(&self) -> f64 {
        if self.use_rslora { self.alpha / (self.r as f64).sqrt() } else { self.alpha / self.r as f64 }
    }

    pub fn targets(&self, module: &str) -> bool {
        self.targets.iter().any(|t| t == module)
    }
}

/// Parses `q,v` / `q_proj,v_proj` / `all` into canonical, ordered, de-duplicated names.
pub fn parse_targets(list: &str) -> Result<Vec<String>> {
    let list = list.trim();
    if list == "all" || list == "all-linear" {
        return Ok(TARGETABLE.iter().map(|s| s.to_string()).collect());
    }
    let mut wanted = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let name = if item.ends_with("_proj") { item.to_string() } else { format!("{item}_proj") };
        if !TARGETABLE.contains(&name.as_str()) {
            bail!("unknown LoRA target {item:?}: choose from q,k,v,o,gate,up,down (or all)");
        }
        wanted.push(name);
    }
    Ok(TARGETABLE.iter().filter(|t| wanted.iter().any(|w| w == *t)).map(|s| s.to_string()).collect())
}
