//! A causal language model of any supported family, built from its [`Architecture`]: the
//! embedding, the decoder layers, the final norm and the head. The forward pass returns hidden
//! states; [`CausalLm::token_logps`] projects only the positions that are scored, which is all
//! DPO needs.
//!
//! Each layer runs on one of two paths that compute the same function:
//! - the CPU layer op ([`super::cpu_layer`], f32 on CPU, the default there): one op per layer
//!   with a hand-written backward;
//! - the generic layer ([`super::generic_layer`], any device and dtype): candle compositions.
//!
//! `DPO_LAYER_PATH=generic` forces the generic path (the tests run both).
//!
//! ```no_run
//! # use dpo::model::CausalLm; use dpo::nn::LoraMode;
//! # fn main() -> anyhow::Result<()> {
//! let model = CausalLm::load(std::path::Path::new("tiny-llama"), candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! let ids = candle_core::Tensor::new(&[[1u32, 5, 9]], &candle_core::Device::Cpu)?;
//! let logits = model.logits(&ids, &mut LoraMode::Off)?; // [1, 3, vocab]
//! # Ok(()) }
//! ```
use super::arch::rope::RopeTables;
use super::arch::{Architecture, LayerSpec, Proj};
use super::chunked_head;
use super::cpu_layer;
use super::fused;
use super::generic_layer::{self, PassShared};
use super::recompute;
use super::token_stats::TokenStats;
use super::weights::mmap_weights;
use crate::nn::layout::TokenLayout;
use crate::nn::ops::frozen_matmul;
use crate::nn::{LoraLinear, LoraMode};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::path::Path;
use std::sync::Arc;

/// Which implementation runs the decoder layers and the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerPath {
    /// One [`cpu_layer`] op per layer and the [`fused`] head (CPU, f32).
    CpuOp,
    /// candle compositions on any device and dtype.
    Generic,
}

impl std::fmt::Display for LayerPath {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            LayerPath::CpuOp => "CPU-op",
            LayerPath::Generic => "generic",
        })
    }
}

impl LayerPath {
    /// The path a model runs on when `wanted` is asked for.
    pub fn choose(wanted: LayerPath, arch: &Architecture, device: &Device, dtype: DType) -> LayerPath {
        match wanted {
            LayerPath::CpuOp if cpu_layer::supports(arch, device, dtype).is_ok() => LayerPath::CpuOp,
            _ => LayerPath::Generic,
        }
    }

    /// The path a model loads on: the CPU op where it can, unless [`PATH_ENV`] says `generic`.
    pub fn default_for(arch: &Architecture, device: &Device, dtype: DType) -> LayerPath {
        let forced_generic = std::env::var(PATH_ENV).is_ok_and(|v| v == "generic");
        Self::choose(if forced_generic { LayerPath::Generic } else { LayerPath::CpuOp }, arch, device, dtype)
    }
}

/// The environment variable that forces [`LayerPath::Generic`].
pub const PATH_ENV: &str = "DPO_LAYER_PATH";

pub struct CausalLm {
    arch: Arc<Architecture>,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Tensor,
    dtype: DType,
    device: Device,
    path: LayerPath,
    /// Activation recomputation: each layer keeps only its input for backward.
    recompute: bool,
    /// A reward model's `score` head `[1, hidden]` (f32, trainable), read at each sequence's
    /// last token.
    score_head: Option<candle_core::Var>,
    /// Full fine-tuning: every weight is a trainable Var (with its name).
    full: bool,
    trainable: Vec<(String, candle_core::Var)>,
    /// Training has begun: the reference may no longer be computed from these weights.
    reference_sealed: bool,
}

/// One decoder layer's frozen weights, named by what the description says it has.
#[derive(Clone)]
pub struct DecoderLayer {
    /// Attention pre, attention post, MLP pre, MLP post (see [`Architecture::norm_names`]);
    /// Gemma's already hold `1 + w`.
    pub norms: [Option<Tensor>; 4],
    /// q and k norm weights.
    pub qk_norm: Option<[Tensor; 2]>,
    /// The family's linears, in [`Architecture::projections`] order.
    pub linears: Vec<(Proj, LoraLinear)>,
    pub spec: LayerSpec,
}

impl DecoderLayer {
    pub fn linear(&self, p: Proj) -> &LoraLinear {
        &self.linears.iter().find(|(q, _)| *q == p).expect("the description lists every linear it loads").1
    }
}

impl CausalLm {
    /// Loads `config.json` and the safetensors weights of a model folder.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let arch = Architecture::from_file(&dir.join("config.json"))?;
        let vb = mmap_weights(dir, dtype, device)?;
        Self::from_weights(arch, vb, dtype, device).with_context(|| format!("loading the weights in {}", dir.display()))
    }

    pub fn from_weights(arch: Architecture, vb: VarBuilder, dtype: DType, device: &Device) -> Result<Self> {
        let (h, v) = (arch.hidden_size, arch.vocab_size);
        let embed = vb.get((v, h), "model.embed_tokens.weight")?;
        let layers = (0..arch.num_layers)
            .map(|i| load_layer(&arch, &vb.pp(format!("model.layers.{i}")), i, dtype))
            .collect::<Result<Vec<_>>>()?;
        let norm = norm_weight(&arch, &vb, "model.norm.weight", h, dtype)?;
        // A checkpoint without lm_head.weight ties it to the embeddings, as transformers does.
        let lm_head = if !arch.tie_word_embeddings && vb.contains_tensor("lm_head.weight") {
            vb.get((v, h), "lm_head.weight")?
        } else {
            embed.clone()
        };
        let mut model = Self {
            arch: Arc::new(arch),
            embed,
            layers,
            norm,
            lm_head,
            dtype,
            device: device.clone(),
            path: LayerPath::Generic,
            recompute: false,
            score_head: None,
            full: false,
            trainable: Vec::new(),
            reference_sealed: false,
        };
        model.path = LayerPath::default_for(&model.arch, device, dtype);
        Ok(model)
    }

    pub fn arch(&self) -> &Architecture {
        &self.arch
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn path(&self) -> LayerPath {
        self.path
    }

    /// Asks for a path; the CPU op is taken only where [`cpu_layer::supports`] says it computes
    /// this model exactly (otherwise the generic path runs: never different math).
    pub fn set_path(&mut self, wanted: LayerPath) {
        self.path = LayerPath::choose(wanted, &self.arch, &self.device, self.dtype);
    }

    /// Activation recomputation (gradient checkpointing): each layer keeps only its input and
    /// is re-run in backward, on either path. Same numbers, a fraction of the memory.
    pub fn set_recompute(&mut self, on: bool) {
        self.recompute = on;
    }

    pub fn recompute(&self) -> bool {
        self.recompute
    }

    /// Final-norm hidden states `[rows, len, hidden]` for `ids` `[rows, len]` laid out as
    /// `layout` says (positions, and which tokens may see which).
    pub fn forward_layout(&self, ids: &Tensor, layout: &TokenLayout, mode: &mut LoraMode) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.arch.hidden_size))?;
        if let Some(scale) = self.arch.embed_scale {
            // transformers multiplies by the scale cast to the weights' dtype.
            x = (x * round_to(scale, self.dtype)?)?;
        }
        let ropes: Vec<Arc<RopeTables>> =
            self.arch.ropes.iter().map(|r| r.tables(&layout.positions).map(Arc::new)).collect::<Result<_>>()?;
        let eps = self.arch.norm.eps;
        if self.path == LayerPath::CpuOp {
            x = self.cpu_layers(x, layout, &ropes, mode)?;
            return Ok(fused::rms_norm(&x, &self.norm, eps)?);
        }
        let shared = Arc::new(PassShared::new(&self.arch, layout, &ropes, self.dtype, &self.device)?);
        for layer in &self.layers {
            x = if self.recompute {
                recompute::layer(layer, &x, &shared, mode)?
            } else {
                generic_layer::forward(layer, &x, &shared, mode)?
            };
        }
        Ok(generic_layer::rms_norm(&x, &self.norm, &self.arch.norm)?)
    }

    /// The layers as [`cpu_layer`] ops (CPU, f32): one op per layer, hand-written backward.
    fn cpu_layers(
        &self,
        mut x: Tensor,
        layout: &TokenLayout,
        ropes: &[Arc<RopeTables>],
        mode: &mut LoraMode,
    ) -> Result<Tensor> {
        let mut geometries: Vec<(Option<usize>, Arc<cpu_layer::Geometry>)> = Vec::new();
        for layer in &self.layers {
            let window = layer.spec.window;
            let geo = match geometries.iter().find(|(w, _)| *w == window) {
                Some((_, g)) => g.clone(),
                None => {
                    let g = Arc::new(cpu_layer::Geometry::new(layout, window));
                    geometries.push((window, g.clone()));
                    g
                }
            };
            let rope = layer.spec.rope.map(|i| ropes[i].clone());
            x = cpu_layer::forward(
                &cpu_layer::LayerParams::new(&self.arch, layer, self.recompute),
                &geo,
                rope,
                &x,
                mode,
            )?;
        }
        Ok(x)
    }

    /// Final-norm hidden states of plain causal rows (no padding).
    pub fn forward(&self, ids: &Tensor, mode: &mut LoraMode) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.forward_layout(ids, &TokenLayout::causal(b, t), mode)
    }

    /// Logits at every position, `[batch, seq, vocab]` (f32, soft-capped where the family caps).
    pub fn logits(&self, ids: &Tensor, mode: &mut LoraMode) -> Result<Tensor> {
        let hidden = self.forward(ids, mode)?;
        Ok(generic_layer::softcap(
            &frozen_matmul(&hidden, &self.lm_head)?.to_dtype(DType::F32)?,
            self.arch.final_softcap,
        )?)
    }

    /// Makes this a reward model (sequence classification with one label): `score` reads the
    /// final hidden state at each sequence's last token.
    pub fn set_score_head(&mut self, w: candle_core::Var) {
        self.score_head = Some(w);
    }

    /// `score · h` for final hidden states `[n, hidden]` (in f32): a reward per row.
    pub fn rewards(&self, hidden_rows: &Tensor) -> Result<Tensor> {
        let w = self.score_head.as_ref().context("this model has no score head (not a reward model)")?;
        Ok(hidden_rows.to_dtype(DType::F32)?.matmul(&w.as_tensor().t()?)?.squeeze(1)?)
    }

    /// `log p(target | position)` for selected hidden states `[n, hidden]` and targets `[n]`:
    /// lm_head and the log-softmax run on these rows only (in f32).
    pub fn token_logps(&self, hidden_rows: &Tensor, targets: &[u32]) -> Result<Tensor> {
        self.head(hidden_rows, targets, None)
    }

    /// As [`CausalLm::token_logps`], with what TRL logs about each scored token's distribution.
    pub fn token_logps_with_stats(&self, hidden_rows: &Tensor, targets: &[u32]) -> Result<(Tensor, TokenStats)> {
        let sink = fused::StatsSink::default();
        let logps = self.head(hidden_rows, targets, Some(&sink))?;
        let stats = sink.lock().expect("stats sink").take().unwrap_or_default();
        Ok((logps, stats))
    }

    fn head(&self, hidden_rows: &Tensor, targets: &[u32], stats: Option<&fused::StatsSink>) -> Result<Tensor> {
        let cap = self.arch.final_softcap;
        if self.full {
            // The fused heads compute no dW; full fine-tuning trains lm_head too.
            return Ok(chunked_head::trainable_logps(hidden_rows, &self.lm_head, targets, cap, stats)?);
        }
        Ok(match self.path {
            LayerPath::CpuOp => fused::lm_head_logps(hidden_rows, &self.lm_head, targets, cap, stats)?,
            LayerPath::Generic => chunked_head::lm_head_logps(hidden_rows, &self.lm_head, targets, cap, stats)?,
        })
    }

    /// Full fine-tuning: makes every weight a trainable f32 [`Var`](candle_core::Var) and returns
    /// them with the model's own tensor names (a tied head shares the embedding's). The generic
    /// path runs from then on (the CPU layer op computes no weight gradients) and linears use
    /// candle's matmul, which computes dW. Refused for bf16 weights (f32 master weights are
    /// needed) and for Gemma-style `1 + w` norms (the stored tensor is not the trained one).
    pub fn make_trainable(&mut self) -> Result<Vec<(String, candle_core::Var)>> {
        if self.full {
            return Ok(self.trainable.clone());
        }
        anyhow::ensure!(
            self.dtype == DType::F32,
            "--full trains f32 master weights: pass --dtype f32 (the model computes in {:?})",
            self.dtype
        );
        anyhow::ensure!(
            !self.arch.norm.unit_offset,
            "--full is not supported for families whose norms are stored as 1 + w (Gemma)"
        );
        anyhow::ensure!(self.score_head.is_none(), "--full is not supported for reward models");
        let mut out = Vec::new();
        let mut var = |name: String, t: &mut Tensor| -> Result<()> {
            let v = candle_core::Var::from_tensor(&t.to_dtype(DType::F32)?)?;
            *t = v.as_tensor().clone();
            out.push((name, v));
            Ok(())
        };
        let tied = self.lm_head.id() == self.embed.id();
        var("model.embed_tokens.weight".into(), &mut self.embed)?;
        let names = self.arch.norm_names();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (slot, name) in layer.norms.iter_mut().zip(names) {
                if let (Some(t), Some(name)) = (slot.as_mut(), name) {
                    var(format!("model.layers.{i}.{name}.weight"), t)?;
                }
            }
            if let Some([q, k]) = layer.qk_norm.as_mut() {
                var(format!("model.layers.{i}.self_attn.q_norm.weight"), q)?;
                var(format!("model.layers.{i}.self_attn.k_norm.weight"), k)?;
            }
            for (p, linear) in layer.linears.iter_mut() {
                let (w, b) = linear.weights_mut();
                var(format!("model.layers.{i}.{}.weight", p.path()), w)?;
                if let Some(b) = b {
                    var(format!("model.layers.{i}.{}.bias", p.path()), b)?;
                }
            }
        }
        var("model.norm.weight".into(), &mut self.norm)?;
        if tied {
            self.lm_head = self.embed.clone();
        } else {
            var("lm_head.weight".into(), &mut self.lm_head)?;
        }
        self.path = LayerPath::Generic;
        self.full = true;
        self.trainable = out.clone();
        Ok(out)
    }

    /// Full fine-tuning starts: from now on the reference must come from the cache filled
    /// before (by this same code path, so policy = reference exactly at step 1).
    pub fn seal_reference(&mut self) {
        self.reference_sealed = self.full;
    }

    /// The weights are being trained in full, so they are no longer the reference.
    pub fn reference_sealed(&self) -> bool {
        self.reference_sealed
    }

    /// Every linear layer with its module path (`model.layers.3.mlp.up_proj`), in model order.
    pub fn linear_layers_mut(&mut self) -> Vec<(String, Proj, &mut LoraLinear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (p, linear) in layer.linears.iter_mut() {
                out.push((format!("model.layers.{i}.{}", p.path()), *p, linear));
            }
        }
        out
    }
}

/// `x` rounded to `dtype` (what a Python scalar becomes when cast to the weights' dtype).
fn round_to(x: f64, dtype: DType) -> Result<f64> {
    Ok(Tensor::new(x as f32, &Device::Cpu)?.to_dtype(dtype)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// A norm weight as the layers use it: `1 + w` for Gemma's norms; f32 where the family scales
/// in f32.
fn norm_weight(arch: &Architecture, vb: &VarBuilder, name: &str, dim: usize, dtype: DType) -> Result<Tensor> {
    let w = vb.get(dim, name)?;
    let w = if arch.norm.scale_in_f32 { w.to_dtype(DType::F32)? } else { w };
    Ok(if arch.norm.unit_offset {
        (w + 1.0)?.to_dtype(if arch.norm.scale_in_f32 { DType::F32 } else { dtype })?
    } else {
        w
    })
}

fn load_layer(arch: &Architecture, vb: &VarBuilder, index: usize, dtype: DType) -> Result<DecoderLayer> {
    let h = arch.hidden_size;
    let names = arch.norm_names();
    let mut norms: [Option<Tensor>; 4] = Default::default();
    for (slot, name) in norms.iter_mut().zip(names) {
        if let Some(name) = name {
            *slot = Some(norm_weight(arch, vb, &format!("{name}.weight"), h, dtype)?);
        }
    }
    let qk_norm = match arch.qk_norm_dims() {
        None => None,
        Some((q, k)) => {
            let att = vb.pp("self_attn");
            Some([
                norm_weight(arch, &att, "q_norm.weight", q, dtype)?,
                norm_weight(arch, &att, "k_norm.weight", k, dtype)?,
            ])
        }
    };
    let linears = arch
        .projections
        .iter()
        .map(|&p| {
            let ((out_dim, in_dim), _) = arch.proj_geometry(p);
            let lvb = vb.pp(p.path());
            let w = lvb.get((out_dim, in_dim), "weight")?;
            let b = if arch.has_bias(p) { Some(lvb.get(out_dim, "bias")?) } else { None };
            Ok((p, LoraLinear::frozen(w, b)))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(DecoderLayer { norms, qk_norm, linears, spec: arch.layers[index] })
}
