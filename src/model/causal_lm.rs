//! A causal language model of any supported family, built from its [`Architecture`]: the
//! embedding, the decoder layers, the final norm and the head — weights and the math on them,
//! nothing else. The forward pass returns hidden states; [`CausalLm::token_logps`] projects only
//! the positions that are scored, which is all the losses need.
//!
//! Each layer runs on one of two paths that compute the same function, chosen when the model is
//! built ([`LayerPath`]):
//! - the CPU layer op ([`super::cpu_layer`], f32 on CPU, the default there): one op per layer
//!   with a hand-written backward;
//! - the generic layer ([`super::generic_layer`], any device and dtype): candle compositions.
//!
//! The [`Head`] says what the final hidden states become: log-probs through the frozen lm_head,
//! log-probs through an lm_head trained with every other weight ([`CausalLm::trainable`]), or a
//! reward model's score.
//!
//! ```no_run
//! # use dpo::model::{CausalLm, LayerPath}; use dpo::nn::LoraMode;
//! # fn main() -> anyhow::Result<()> {
//! let dir = std::path::Path::new("tiny-llama");
//! let model = CausalLm::load(dir, candle_core::DType::F32, &candle_core::Device::Cpu, LayerPath::CpuOp)?;
//! let ids = candle_core::Tensor::new(&[[1u32, 5, 9]], &candle_core::Device::Cpu)?;
//! let logits = model.logits(&ids, &mut LoraMode::Off)?; // [1, 3, vocab]
//! # Ok(()) }
//! ```
use super::arch::rope::RopeTables;
use super::arch::{Architecture, Proj};
use super::chunked_head;
use super::cpu_head;
use super::cpu_layer;
use super::generic_layer::{self, PassShared};
use super::kv_cache::KvCache;
use super::layer::{DecoderLayer, load_layer, norm_weight};
use super::recompute;
use super::token_stats::{StatsSink, TokenStats};
use super::weights::mmap_weights;
use crate::nn::kv_layout::KvLayout;
use crate::nn::layout::TokenLayout;
use crate::nn::ops::{frozen_matmul, softcap};
use crate::nn::{LoraLinear, LoraMode};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use std::path::Path;
use std::sync::Arc;

/// Which implementation runs the decoder layers and the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LayerPath {
    /// One [`cpu_layer`] op per layer and the [`cpu_head`] (CPU, f32), where
    /// [`cpu_layer::supports`] says it computes the family exactly; the generic path elsewhere.
    #[default]
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
    /// The path a model runs on when `wanted` is asked for: the CPU op only where it computes
    /// this model exactly (otherwise the generic path: never different math).
    pub fn choose(wanted: LayerPath, arch: &Architecture, device: &Device, dtype: DType) -> LayerPath {
        match wanted {
            LayerPath::CpuOp if cpu_layer::supports(arch, device, dtype).is_ok() => LayerPath::CpuOp,
            _ => LayerPath::Generic,
        }
    }
}

/// What the final hidden states become.
#[derive(Debug, Clone)]
pub enum Head {
    /// Log-probs through the frozen lm_head, on the path's own head op (no weight gradient).
    Frozen,
    /// Log-probs through an lm_head trained with every other weight (full fine-tuning):
    /// candle's matmul computes its gradient.
    Trained,
    /// A reward model's `score` head `[1, hidden]` (f32, trained), read at each sequence's last
    /// token; the lm_head is not used.
    Score(Var),
}

pub struct CausalLm {
    arch: Arc<Architecture>,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Tensor,
    head: Head,
    dtype: DType,
    device: Device,
    path: LayerPath,
    /// Activation recomputation: each layer keeps only its input for backward.
    recompute: bool,
}

/// Why full fine-tuning cannot train this model in `dtype`, if it cannot: known from the
/// description alone, before any weight is read.
pub fn full_training_unsupported(arch: &Architecture, dtype: DType) -> Option<String> {
    if dtype != DType::F32 {
        return Some(format!("--full trains f32 master weights: pass --dtype f32 (the run computes in {dtype:?})"));
    }
    if arch.norm.unit_offset {
        return Some(format!(
            "--full is not supported for {}: its norms are stored as 1 + w (Gemma), so the stored tensor is not the trained one",
            arch.model_type
        ));
    }
    None
}

impl CausalLm {
    /// Loads `config.json` and the safetensors weights of a model folder, frozen, on the path
    /// `path` asks for ([`LayerPath::choose`]).
    pub fn load(dir: &Path, dtype: DType, device: &Device, path: LayerPath) -> Result<Self> {
        let arch = Architecture::from_file(&dir.join("config.json"))?;
        let vb = mmap_weights(dir, dtype, device)?;
        Self::from_weights(arch, vb, dtype, device, path)
            .with_context(|| format!("loading the weights in {}", dir.display()))
    }

    /// The model with frozen weights (adapters may be attached to its linears), on the path
    /// `path` asks for ([`LayerPath::choose`]).
    pub fn from_weights(
        arch: Architecture,
        vb: VarBuilder,
        dtype: DType,
        device: &Device,
        path: LayerPath,
    ) -> Result<Self> {
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
        let path = LayerPath::choose(path, &arch, device, dtype);
        Ok(Self {
            arch: Arc::new(arch),
            embed,
            layers,
            norm,
            lm_head,
            head: Head::Frozen,
            dtype,
            device: device.clone(),
            path,
            recompute: false,
        })
    }

    /// Full fine-tuning: every weight an f32 [`Var`], returned with the model's own tensor names
    /// (a tied head shares the embedding's). The generic path runs (the CPU layer op computes no
    /// weight gradients) and linears use candle's matmul, which computes dW. Refused where
    /// [`full_training_unsupported`] says so.
    pub fn trainable(arch: Architecture, vb: VarBuilder, device: &Device) -> Result<(Self, Vec<(String, Var)>)> {
        if let Some(why) = full_training_unsupported(&arch, DType::F32) {
            bail!(why);
        }
        let mut model = Self::from_weights(arch, vb, DType::F32, device, LayerPath::Generic)?;
        let named = model.train_every_weight()?;
        model.head = Head::Trained;
        Ok((model, named))
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

    /// The same model on the path `wanted` asks for ([`LayerPath::choose`]): for comparing the
    /// two paths on one set of weights and adapters.
    pub fn on_path(mut self, wanted: LayerPath) -> Self {
        self.path = match self.head {
            Head::Trained => LayerPath::Generic,
            _ => LayerPath::choose(wanted, &self.arch, &self.device, self.dtype),
        };
        self
    }

    pub fn head(&self) -> &Head {
        &self.head
    }

    /// Activation recomputation (gradient checkpointing): each layer keeps only its input and
    /// is re-run in backward, on either path. Same numbers, a fraction of the memory.
    pub fn set_recompute(&mut self, on: bool) {
        self.recompute = on;
    }

    /// Final-norm hidden states `[rows, len, hidden]` for `ids` `[rows, len]` laid out as
    /// `layout` says (positions, and which tokens may see which).
    pub fn forward_layout(&self, ids: &Tensor, layout: &TokenLayout, mode: &mut LoraMode) -> Result<Tensor> {
        let mut x = self.embed_ids(ids)?;
        let ropes: Vec<Arc<RopeTables>> =
            self.arch.ropes.iter().map(|r| r.tables(&layout.positions).map(Arc::new)).collect::<Result<_>>()?;
        let eps = self.arch.norm.eps;
        if self.path == LayerPath::CpuOp {
            x = self.cpu_layers(x, layout, &ropes, mode)?;
            return Ok(cpu_head::rms_norm(&x, &self.norm, eps)?);
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

    /// Final-norm hidden states `[rows, new, hidden]` of a decoding forward: `ids` `[rows, new]`
    /// laid out as `kv` says, attending to what `cache` holds, to which their keys and values are
    /// added. Always the generic layer (the CPU op keeps no cache), inference only.
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        kv: &KvLayout,
        cache: &mut KvCache,
        mode: &mut LoraMode,
    ) -> Result<Tensor> {
        let x = self.embed_ids(ids)?;
        let ropes: Vec<Arc<RopeTables>> =
            self.arch.ropes.iter().map(|r| r.tables(&kv.positions).map(Arc::new)).collect::<Result<_>>()?;
        let shared = PassShared::decoding(&self.arch, kv, &ropes, self.dtype, &self.device)?;
        let mut x = x;
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = generic_layer::forward_cached(layer, &x, &shared, layer_cache, mode)?;
        }
        Ok(generic_layer::rms_norm(&x, &self.norm, &self.arch.norm)?)
    }

    /// The embeddings of `ids` `[rows, len]`, scaled where the family scales them.
    fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.arch.hidden_size))?;
        match self.arch.embed_scale {
            // transformers multiplies by the scale cast to the weights' dtype.
            Some(scale) => Ok((x * round_to(scale, self.dtype)?)?),
            None => Ok(x),
        }
    }

    /// Logits `[rows, vocab]` (f32, soft-capped where the family caps) of final hidden states
    /// `[rows, hidden]`.
    pub fn logits_of(&self, hidden_rows: &Tensor) -> Result<Tensor> {
        let z = frozen_matmul(hidden_rows, &self.lm_head)?.to_dtype(DType::F32)?;
        Ok(softcap(&z, self.arch.final_softcap)?)
    }

    /// Final-norm hidden states of plain causal rows (no padding).
    pub fn forward(&self, ids: &Tensor, mode: &mut LoraMode) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.forward_layout(ids, &TokenLayout::causal(b, t), mode)
    }

    /// Logits at every position, `[batch, seq, vocab]` (f32, soft-capped where the family caps).
    pub fn logits(&self, ids: &Tensor, mode: &mut LoraMode) -> Result<Tensor> {
        let hidden = self.forward(ids, mode)?;
        Ok(softcap(&frozen_matmul(&hidden, &self.lm_head)?.to_dtype(DType::F32)?, self.arch.final_softcap)?)
    }

    /// Makes this a reward model (sequence classification with one label): a [`Head::Score`]
    /// reads the final hidden state at each sequence's last token.
    pub fn set_score_head(&mut self, w: Var) -> Result<()> {
        if matches!(self.head, Head::Trained) {
            bail!("a model whose every weight is trained cannot take a reward model's score head");
        }
        self.head = Head::Score(w);
        Ok(())
    }

    /// `score · h` for final hidden states `[n, hidden]` (in f32): a reward per row.
    pub fn rewards(&self, hidden_rows: &Tensor) -> Result<Tensor> {
        let Head::Score(w) = &self.head else { bail!("this model has no score head (not a reward model)") };
        Ok(hidden_rows.to_dtype(DType::F32)?.matmul(&w.as_tensor().t()?)?.squeeze(1)?)
    }

    /// `log p(target | position)` for selected hidden states `[n, hidden]` and targets `[n]`:
    /// lm_head and the log-softmax run on these rows only (in f32).
    pub fn token_logps(&self, hidden_rows: &Tensor, targets: &[u32]) -> Result<Tensor> {
        self.head_logps(hidden_rows, targets, None)
    }

    /// As [`CausalLm::token_logps`], with what TRL logs about each scored token's distribution.
    pub fn token_logps_with_stats(&self, hidden_rows: &Tensor, targets: &[u32]) -> Result<(Tensor, TokenStats)> {
        let sink = StatsSink::default();
        let logps = self.head_logps(hidden_rows, targets, Some(&sink))?;
        let stats = sink.lock().expect("stats sink").take().unwrap_or_default();
        Ok((logps, stats))
    }

    fn head_logps(&self, hidden_rows: &Tensor, targets: &[u32], stats: Option<&StatsSink>) -> Result<Tensor> {
        let (w, cap) = (&self.lm_head, self.arch.final_softcap);
        Ok(match (&self.head, self.path) {
            (Head::Frozen, LayerPath::CpuOp) => cpu_head::lm_head_logps(hidden_rows, w, targets, cap, stats)?,
            (Head::Frozen, LayerPath::Generic) => chunked_head::lm_head_logps(hidden_rows, w, targets, cap, stats)?,
            // The frozen heads compute no dW; full fine-tuning trains lm_head too.
            (Head::Trained, _) => chunked_head::trainable_logps(hidden_rows, w, targets, cap, stats)?,
            (Head::Score(_), _) => bail!("a reward model scores sequences with its score head, not token log-probs"),
        })
    }

    /// Makes every weight an f32 [`Var`]; returns them with their checkpoint names.
    fn train_every_weight(&mut self) -> Result<Vec<(String, Var)>> {
        let mut out = Vec::new();
        let mut var = |name: String, t: &mut Tensor| -> Result<()> {
            let v = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
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
        Ok(out)
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
