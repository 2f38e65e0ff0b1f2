//! One decoder for the Llama family: Llama, Mistral (sliding window) and Qwen2 (q/k/v biases,
//! tied embeddings) differ only in their [`ModelConfig`].
//!
//! The forward pass returns hidden states; [`Llama::logits`] projects every position and
//! [`Llama::token_logps`] only the positions that are scored, which is all DPO needs.
//!
//! ```no_run
//! # use dpo::model::Llama; use dpo::lora::LoraMode;
//! # fn main() -> anyhow::Result<()> {
//! let model = Llama::load(std::path::Path::new("tiny-llama"), candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! let ids = candle_core::Tensor::new(&[[1u32, 5, 9]], &candle_core::Device::Cpu)?;
//! let logits = model.logits(&ids, &mut LoraMode::Off)?; // [1, 3, vocab]
//! # Ok(()) }
//! ```
use super::config::ModelConfig;
use super::cpu_layer;
use super::fused;
use super::layout::TokenLayout;
use super::ops::{RopeTable, frozen_matmul, repeat_kv, rms_norm, rope};
use super::weights::mmap_weights;
use crate::lora::{LoraLinear, LoraMode};
use anyhow::{Context, Result};
use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Llama {
    cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Tensor,
    rope: RopeTable,
    dtype: DType,
    device: Device,
    /// Forward passes run with adapters off / on (observability: tests check a cache hit
    /// really skips the reference forward).
    forwards: [AtomicUsize; 2],
    /// Run each layer as one [`cpu_layer`] op and the head with the [`fused`] ops (f32 on CPU)
    /// instead of candle compositions.
    fused: bool,
}

/// What one composite forward pass shares across layers: masks per attention window, RoPE tables.
struct PassContext<'a, 'm> {
    /// Per attention window: the dense additive mask.
    masks: Vec<(Option<usize>, Tensor)>,
    cos: Tensor,
    sin: Tensor,
    eps: f64,
    mode: &'a mut LoraMode<'m>,
}

struct DecoderLayer {
    input_norm: Tensor,
    attn: Attention,
    post_attn_norm: Tensor,
    mlp: Mlp,
    window: Option<usize>,
}

struct Attention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    o_proj: LoraLinear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

struct Mlp {
    gate_proj: LoraLinear,
    up_proj: LoraLinear,
    down_proj: LoraLinear,
}

impl Llama {
    /// Loads `config.json` and the safetensors weights of a model folder.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let vb = mmap_weights(dir, dtype, device)?;
        Self::from_weights(cfg, vb, dtype, device).with_context(|| format!("loading the weights in {}", dir.display()))
    }

    pub fn from_weights(cfg: ModelConfig, vb: VarBuilder, dtype: DType, device: &Device) -> Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = vb.get((v, h), "model.embed_tokens.weight")?;
        let layers = (0..cfg.num_layers)
            .map(|i| DecoderLayer::load(&cfg, vb.pp(format!("model.layers.{i}")), cfg.layer_windows[i]))
            .collect::<Result<Vec<_>>>()?;
        let norm = vb.get(h, "model.norm.weight")?;
        // A checkpoint without lm_head.weight ties it to the embeddings, as transformers does.
        let lm_head = if !cfg.tie_word_embeddings && vb.contains_tensor("lm_head.weight") {
            vb.get((v, h), "lm_head.weight")?
        } else {
            embed.clone()
        };
        let rope = RopeTable::new(cfg.head_dim(), cfg.rope_theta, cfg.max_position_embeddings, dtype, device)?;
        let fused = device.is_cpu() && dtype == DType::F32;
        Ok(Self { cfg, embed, layers, norm, lm_head, rope, dtype, device: device.clone(), forwards: Default::default(), fused })
    }

    /// Forward passes so far: `(reference, adapters on)`.
    pub fn forward_counts(&self) -> (usize, usize) {
        (self.forwards[0].load(Ordering::Relaxed), self.forwards[1].load(Ordering::Relaxed))
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Chooses the CPU layer op and fused head (default for f32 on CPU) or the plain compositions.
    pub fn set_fused(&mut self, fused: bool) {
        self.fused = fused && self.device.is_cpu() && self.dtype == DType::F32;
    }

    /// Final-norm hidden states `[rows, len, hidden]` for `ids` `[rows, len]` laid out as
    /// `layout` says (positions, and which tokens may see which).
    pub fn forward_layout(&self, ids: &Tensor, layout: &TokenLayout, mode: &mut LoraMode) -> Result<Tensor> {
        let with_adapters = !matches!(mode, LoraMode::Off);
        self.forwards[usize::from(with_adapters)].fetch_add(1, Ordering::Relaxed);
        let (b, t) = ids.dims2()?;
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.cfg.hidden_size))?;
        let (cos, sin) = self.rope.tables(&layout.positions_tensor(&self.device)?)?;
        let eps = self.cfg.rms_norm_eps;
        if self.fused {
            x = self.cpu_layers(x, layout, &cos, &sin, mode)?;
            return Ok(fused::rms_norm(&x, &self.norm, eps)?);
        }
        let mut masks: Vec<(Option<usize>, Tensor)> = Vec::new();
        for layer in &self.layers {
            if !masks.iter().any(|(w, _)| *w == layer.window) {
                masks.push((layer.window, layout.mask(layer.window, self.dtype, &self.device)?));
            }
        }
        let mut ctx = PassContext { masks, cos, sin, eps, mode };
        for layer in &self.layers {
            x = layer.forward(&x, &mut ctx)?;
        }
        Ok(rms_norm(&x, &self.norm, eps)?)
    }

    /// The layers as [`cpu_layer`] ops (CPU, f32): one op per layer, hand-written backward.
    fn cpu_layers(&self, mut x: Tensor, layout: &TokenLayout, cos: &Tensor, sin: &Tensor, mode: &mut LoraMode) -> Result<Tensor> {
        let cos = std::sync::Arc::new(cos.flatten_all()?.to_vec1::<f32>()?);
        let sin = std::sync::Arc::new(sin.flatten_all()?.to_vec1::<f32>()?);
        let mut geometries: Vec<(Option<usize>, std::sync::Arc<cpu_layer::Geometry>)> = Vec::new();
        for layer in &self.layers {
            let geo = match geometries.iter().find(|(w, _)| *w == layer.window) {
                Some((_, g)) => g.clone(),
                None => {
                    let g = std::sync::Arc::new(cpu_layer::Geometry::new(layout, layer.window, cos.clone(), sin.clone()));
                    geometries.push((layer.window, g.clone()));
                    g
                }
            };
            x = cpu_layer::forward(&layer.cpu_params(self.cfg.rms_norm_eps), &geo, &x, mode)?;
        }
        Ok(x)
    }


    /// Final-norm hidden states of plain causal rows (no padding).
    pub fn forward(&self, ids: &Tensor, mode: &mut LoraMode) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.forward_layout(ids, &TokenLayout::causal(b, t), mode)
    }

    /// Logits at every position, `[batch, seq, vocab]` (f32).
    pub fn logits(&self, ids: &Tensor, mode: &mut LoraMode) -> Result<Tensor> {
        let hidden = self.forward(ids, mode)?;
        Ok(frozen_matmul(&hidden, &self.lm_head)?.to_dtype(DType::F32)?)
    }

    /// `log p(target | position)` for selected hidden states `[n, hidden]` and targets `[n]`:
    /// lm_head and the log-softmax run on these rows only (in f32).
    pub fn token_logps(&self, hidden_rows: &Tensor, targets: &[u32]) -> Result<Tensor> {
        if self.fused {
            return Ok(fused::lm_head_logps(hidden_rows, &self.lm_head, targets)?);
        }
        let logits = frozen_matmul(hidden_rows, &self.lm_head)?.to_dtype(DType::F32)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let targets = Tensor::new(targets, &self.device)?;
        Ok(logp.gather(&targets.unsqueeze(1)?.contiguous()?, 1)?.squeeze(1)?)
    }

    /// Every linear layer with its module path (`model.layers.3.mlp.up_proj`), in model order.
    pub fn linear_layers_mut(&mut self) -> Vec<(String, &mut LoraLinear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let a = &mut l.attn;
            let m = &mut l.mlp;
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
            out.push((format!("{p}.mlp.gate_proj"), &mut m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &mut m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
        }
        out
    }
}

fn linear(vb: &VarBuilder, name: &str, out_dim: usize, in_dim: usize, bias: bool) -> Result<LoraLinear> {
    let vb = vb.pp(name);
    let w = vb.get((out_dim, in_dim), "weight")?;
    let b = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
    Ok(LoraLinear::frozen(w, b))
}

impl DecoderLayer {
    fn load(cfg: &ModelConfig, vb: VarBuilder, window: Option<usize>) -> Result<Self> {
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
        let att = vb.pp("self_attn");
        let attn = Attention {
            q_proj: linear(&att, "q_proj", nh * hd, h, cfg.qkv_bias)?,
            k_proj: linear(&att, "k_proj", nkv * hd, h, cfg.qkv_bias)?,
            v_proj: linear(&att, "v_proj", nkv * hd, h, cfg.qkv_bias)?,
            o_proj: linear(&att, "o_proj", h, nh * hd, false)?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        };
        let mlp_vb = vb.pp("mlp");
        let mlp = Mlp {
            gate_proj: linear(&mlp_vb, "gate_proj", i, h, false)?,
            up_proj: linear(&mlp_vb, "up_proj", i, h, false)?,
            down_proj: linear(&mlp_vb, "down_proj", h, i, false)?,
        };
        Ok(Self {
            input_norm: vb.get(h, "input_layernorm.weight")?,
            attn,
            post_attn_norm: vb.get(h, "post_attention_layernorm.weight")?,
            mlp,
            window,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &mut PassContext) -> candle_core::Result<Tensor> {
        let mask = ctx.masks.iter().find(|(w, _)| *w == self.window).map(|(_, m)| m.clone()).expect("mask per window");
        let attn_out = self.attn.forward(&rms_norm(x, &self.input_norm, ctx.eps)?, &mask, ctx)?;
        let x = (x + attn_out)?;
        let mlp_out = self.mlp.forward(&rms_norm(&x, &self.post_attn_norm, ctx.eps)?, ctx.mode)?;
        x + mlp_out
    }

    fn cpu_params(&self, eps: f64) -> cpu_layer::LayerParams {
        let (a, m) = (&self.attn, &self.mlp);
        let linears = [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj];
        cpu_layer::LayerParams {
            input_norm: self.input_norm.clone(),
            post_norm: self.post_attn_norm.clone(),
            weights: linears.map(|l| l.weight().clone()),
            biases: [&a.q_proj, &a.k_proj, &a.v_proj].map(|l| l.bias().cloned()),
            lora: linears.map(|l| l.lora().cloned()),
            num_heads: a.num_heads,
            num_kv_heads: a.num_kv_heads,
            head_dim: a.head_dim,
            eps,
        }
    }
}

impl Attention {
    fn forward(&self, x: &Tensor, mask: &Tensor, ctx: &mut PassContext) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let heads = |y: Tensor, n: usize| y.reshape((b, t, n, self.head_dim))?.transpose(1, 2)?.contiguous();
        let q = heads(self.q_proj.forward(x, ctx.mode)?, self.num_heads)?;
        let q = rope(&q, &ctx.cos, &ctx.sin)?;
        let k = heads(self.k_proj.forward(x, ctx.mode)?, self.num_kv_heads)?;
        let k = rope(&k, &ctx.cos, &ctx.sin)?;
        let v = heads(self.v_proj.forward(x, ctx.mode)?, self.num_kv_heads)?;
        let n_rep = self.num_heads / self.num_kv_heads;
        let k = repeat_kv(k, n_rep)?;
        let v = repeat_kv(v, n_rep)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        // The composite softmax: candle's fused softmax_last_dim has no backward.
        let out = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)?;
        let out = out.transpose(1, 2)?.reshape((b, t, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&out, ctx.mode)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor, mode: &mut LoraMode) -> candle_core::Result<Tensor> {
        let gate = self.gate_proj.forward(x, mode)?;
        let up = self.up_proj.forward(x, mode)?;
        let act = (gate.silu()? * up)?;
        self.down_proj.forward(&act, mode)
    }
}
