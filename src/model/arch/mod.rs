//! The one description of a decoder architecture, resolved once from `config.json`: every
//! difference between the supported families (Llama 2/3, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3,
//! SmolLM3, OLMo 2) is a field here, and every code path — weight loading, the generic layer,
//! the CPU layer op, LoRA targets, merge — reads it instead of branching on the family.
//!
//! ```
//! let json = r#"{"model_type":"qwen3","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
//!   "num_attention_heads":4,"num_key_value_heads":2,"head_dim":24,"vocab_size":512,"rms_norm_eps":1e-6,
//!   "rope_theta":1000000.0}"#;
//! let arch = dpo::model::Architecture::from_json(json).unwrap();
//! assert_eq!(arch.qk_norm, Some(dpo::model::arch::QkNorm::PerHead));
//! assert_eq!(arch.q_width(), 96);
//! ```
mod from_config;
pub mod proj;
pub mod rope;

pub use proj::{Proj, ProjInput};
pub use rope::{Rope, RopeScaling};

use anyhow::{Context, Result};
use std::path::Path;

/// The `model_type`s dpo trains, and the family each one is.
pub const SUPPORTED_MODEL_TYPES: &[(&str, Family)] = &[
    ("llama", Family::Llama),
    ("mistral", Family::Mistral),
    ("qwen2", Family::Qwen2),
    ("qwen3", Family::Qwen3),
    ("gemma", Family::Gemma),
    ("gemma2", Family::Gemma2),
    ("gemma3_text", Family::Gemma3),
    ("phi3", Family::Phi3),
    ("smollm3", Family::SmolLm3),
    ("olmo2", Family::Olmo2),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma,
    Gemma2,
    Gemma3,
    Phi3,
    SmolLm3,
    Olmo2,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x·σ(x)` (`silu`).
    Silu,
    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` (`gelu_pytorch_tanh`).
    GeluTanh,
}

/// Where the RMSNorms sit around each sublayer (attention, MLP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormPlacement {
    /// `x + f(norm(x))` (Llama and most).
    Pre,
    /// `x + norm(f(norm(x)))` (Gemma 2/3).
    Sandwich,
    /// `x + norm(f(x))` (OLMo 2).
    Post,
}

/// RMSNorm on queries and keys, before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    /// Over each head's `head_dim` (Qwen3, Gemma 3).
    PerHead,
    /// Over all heads at once, before the split into heads (OLMo 2).
    AcrossHeads,
}

/// How an RMSNorm applies its weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RmsNormStyle {
    pub eps: f64,
    /// `x̂·(1 + w)` (Gemma) instead of `x̂·w`. The loaded weight already holds `1 + w`.
    pub unit_offset: bool,
    /// Multiply by the weight in f32 and then cast to the compute dtype (Gemma, OLMo 2), instead
    /// of casting `x̂` first (Llama). The same in f32; it decides the bf16 rounding.
    pub scale_in_f32: bool,
}

/// What differs from one decoder layer to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSpec {
    /// Sliding attention window in positions (`None`: full causal attention).
    pub window: Option<usize>,
    /// Index into [`Architecture::ropes`]; `None` for a layer without RoPE (SmolLM3's NoPE layers).
    pub rope: Option<usize>,
}

/// Everything the decoder needs, for every family, resolved from either key style.
#[derive(Debug, Clone)]
pub struct Architecture {
    pub family: Family,
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// The linears of each layer, in the order a forward pass uses them.
    pub projections: Vec<Proj>,
    /// The linears that carry a bias.
    pub biased: Vec<Proj>,
    pub activation: Activation,
    pub norm: RmsNormStyle,
    pub placement: NormPlacement,
    pub qk_norm: Option<QkNorm>,
    /// Multiplies `q·kᵀ`: `head_dim^-½`, or `query_pre_attn_scalar^-½` (Gemma 2/3).
    pub attn_scale: f64,
    /// `cap·tanh(s/cap)` on the scaled attention scores (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// `cap·tanh(z/cap)` on the logits (Gemma 2).
    pub final_softcap: Option<f64>,
    /// Multiplies the embeddings (`√hidden` for Gemma), in the compute dtype.
    pub embed_scale: Option<f64>,
    pub tie_word_embeddings: bool,
    /// The distinct RoPE settings (Gemma 3 has one for sliding and one for full layers).
    pub ropes: Vec<Rope>,
    pub layers: Vec<LayerSpec>,
    pub max_position_embeddings: usize,
    pub pad_token_id: Option<u32>,
}

impl Architecture {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        from_config::resolve(text)
    }

    /// `num_heads · head_dim`: the width of q and of the attention output.
    pub fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// `num_kv_heads · head_dim`: the width of k and of v.
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    pub fn has_bias(&self, p: Proj) -> bool {
        self.biased.contains(&p)
    }

    /// `(out, in)` features of a linear, and the first column it writes in its output buffer.
    pub fn proj_geometry(&self, p: Proj) -> ((usize, usize), usize) {
        p.geometry(self.hidden_size, self.q_width(), self.kv_width(), self.intermediate_size)
    }

    /// The checkpoint names of a layer's norms: attention pre/post, MLP pre/post.
    pub fn norm_names(&self) -> [Option<&'static str>; 4] {
        match self.placement {
            NormPlacement::Pre => [Some("input_layernorm"), None, Some("post_attention_layernorm"), None],
            NormPlacement::Sandwich => [
                Some("input_layernorm"),
                Some("post_attention_layernorm"),
                Some("pre_feedforward_layernorm"),
                Some("post_feedforward_layernorm"),
            ],
            NormPlacement::Post => [None, Some("post_attention_layernorm"), None, Some("post_feedforward_layernorm")],
        }
    }

    /// The widths of the q and k norm weights, where the family norms q and k.
    pub fn qk_norm_dims(&self) -> Option<(usize, usize)> {
        self.qk_norm.map(|kind| match kind {
            QkNorm::PerHead => (self.head_dim, self.head_dim),
            QkNorm::AcrossHeads => (self.q_width(), self.kv_width()),
        })
    }

    /// Every tensor a checkpoint of this architecture holds, with its shape, under the names
    /// transformers saves (`lm_head.weight` only when untied). The loader reads exactly these.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, v) = (self.hidden_size, self.vocab_size);
        let mut out =
            vec![("model.embed_tokens.weight".to_string(), vec![v, h]), ("model.norm.weight".to_string(), vec![h])];
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        for i in 0..self.num_layers {
            let layer = format!("model.layers.{i}");
            for name in self.norm_names().into_iter().flatten() {
                out.push((format!("{layer}.{name}.weight"), vec![h]));
            }
            if let Some((q, k)) = self.qk_norm_dims() {
                out.push((format!("{layer}.self_attn.q_norm.weight"), vec![q]));
                out.push((format!("{layer}.self_attn.k_norm.weight"), vec![k]));
            }
            for &p in &self.projections {
                let ((o, i), _) = self.proj_geometry(p);
                out.push((format!("{layer}.{}.weight", p.path()), vec![o, i]));
                if self.has_bias(p) {
                    out.push((format!("{layer}.{}.bias", p.path()), vec![o]));
                }
            }
        }
        out
    }

    /// A one-line account of what was resolved, for logs.
    pub fn summary(&self) -> String {
        let windows: Vec<String> = self.layers.iter().filter_map(|l| l.window).map(|w| w.to_string()).collect();
        let nope = self.layers.iter().filter(|l| l.rope.is_none()).count();
        let ropes: Vec<String> = self.ropes.iter().map(|r| format!("{:?} θ={}", r.scaling, r.theta)).collect();
        format!(
            "{} ({:?}): {} layers, hidden {}, {} heads / {} kv × {}, {:?} norms, {:?}, rope [{}]{}{}",
            self.model_type,
            self.family,
            self.num_layers,
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.placement,
            self.activation,
            ropes.join("; "),
            if windows.is_empty() { String::new() } else { format!(", sliding windows {}", windows.join(",")) },
            if nope > 0 { format!(", {nope} NoPE layers") } else { String::new() },
        )
    }
}
