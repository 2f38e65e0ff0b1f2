//! The model's `config.json`, read the way transformers reads it for the Llama family.
//!
//! ```no_run
//! let cfg = dpo::model::ModelConfig::from_file(std::path::Path::new("model/config.json")).unwrap();
//! assert!(cfg.head_dim() > 0);
//! ```
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::path::Path;

/// Architectures served by the one Llama-family implementation.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2"];

#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    max_position_embeddings: Option<usize>,
    hidden_act: Option<String>,
    pad_token_id: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

/// Everything the decoder needs, resolved from either the old or the transformers-5 keys.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (qwen2, or `attention_bias: true`).
    pub qkv_bias: bool,
    /// Sliding attention window per layer (`None` = full causal attention).
    pub layer_windows: Vec<Option<usize>>,
    pub max_position_embeddings: usize,
    pub pad_token_id: Option<u32>,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).context("config.json is not a valid Llama-family config")?;
        let model_type = raw.model_type.clone().unwrap_or_default();
        if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
            bail!(
                "unsupported model_type {:?}: dpo supports {}",
                model_type,
                SUPPORTED_MODEL_TYPES.join(", ")
            );
        }
        if let Some(act) = &raw.hidden_act
            && act != "silu"
        {
            bail!("unsupported hidden_act {act:?}: only silu is implemented");
        }
        if let Some(scaling) = &raw.rope_scaling
            && !scaling.is_null()
        {
            bail!("rope_scaling {scaling} is not supported yet (only plain RoPE)");
        }
        let rope_type = raw.rope_parameters.as_ref().and_then(|p| p.rope_type.clone());
        if let Some(t) = rope_type
            && t != "default"
        {
            bail!("rope_parameters.rope_type {t:?} is not supported yet (only \"default\")");
        }
        let rope_theta = raw
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(raw.rope_theta)
            .unwrap_or(10000.0);
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if raw.num_attention_heads % num_kv_heads != 0 {
            bail!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({num_kv_heads})",
                raw.num_attention_heads
            );
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads);
        let is_qwen2 = model_type == "qwen2";
        let layer_windows = layer_windows(&raw, &model_type)?;
        if raw.mlp_bias == Some(true) {
            bail!("mlp_bias: true is not supported");
        }
        Ok(Self {
            qkv_bias: is_qwen2 || raw.attention_bias == Some(true),
            // Llama/Mistral/Qwen2 configs default to untied; a file without lm_head is tied anyway.
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            model_type,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            layer_windows,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            pad_token_id: first_id(&raw.pad_token_id),
        })
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
}

/// Which layers use sliding-window attention, as transformers decides it.
fn layer_windows(raw: &RawConfig, model_type: &str) -> Result<Vec<Option<usize>>> {
    let n = raw.num_hidden_layers;
    if let Some(types) = &raw.layer_types {
        if types.len() != n {
            bail!("layer_types has {} entries for {n} layers", types.len());
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                "full_attention" => Ok(None),
                "sliding_attention" => Ok(Some(
                    raw.sliding_window.context("layer_types names sliding_attention but sliding_window is null")?,
                )),
                other => bail!("unknown layer type {other:?} in layer_types"),
            })
            .collect();
    }
    Ok(match model_type {
        "mistral" => vec![raw.sliding_window; n],
        "qwen2" if raw.use_sliding_window == Some(true) => {
            let from = raw.max_window_layers.unwrap_or(n);
            (0..n).map(|i| if i >= from { raw.sliding_window } else { None }).collect()
        }
        _ => vec![None; n],
    })
}

/// Token ids may be a number or a list (Llama 3 lists several EOS ids); take the first.
fn first_id(v: &Option<serde_json::Value>) -> Option<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| n as u32),
        Some(serde_json::Value::Array(a)) => a.first().and_then(|n| n.as_u64()).map(|n| n as u32),
        _ => None,
    }
}
