//! The memory plan of a training run: the expected peak memory — frozen weights, adapter and
//! optimizer, activations, workspace — from the architecture, the device and dtype, the layer
//! path, activation recomputation and the batch geometry, computed before any weight is loaded.
//! `train` prints it, refuses to start when it exceeds the memory the device has (naming the
//! flags that would bring it down), and `--dry-run` stops after printing it.
//!
//! The activation terms count what each path keeps per token and layer (the CPU layer op's
//! saved buffers; the generic layer's graph, measured), plus one layer's backward working set,
//! the head's logits and the attention tiles. On CPU the plan was checked against measured peak
//! RSS with `cargo bench --bench dpo_step`, which prints both.
//!
//! ```
//! let arch = dpo::model::Architecture::from_json(r#"{"model_type":"llama","hidden_size":512,
//!   "intermediate_size":1408,"num_hidden_layers":8,"num_attention_heads":8,"vocab_size":32000,
//!   "rms_norm_eps":1e-6}"#).unwrap();
//! let geo = dpo::train::memory::Geometry { rows: 2, row_len: 768, scored: 1024, lora_params: 1_261_568, lora_ranks: 112 };
//! let plan = dpo::train::memory::MemoryPlan::estimate(&arch, &dpo::train::memory::Setup::cpu_f32(false), &geo);
//! assert!(plan.total() > plan.weights);
//! ```
use crate::model::arch::{Architecture, NormPlacement};
use crate::model::{LayerPath, tiled_attention};
use anyhow::{Result, bail};
use candle_core::{DType, Device};
use serde::Serialize;

/// The shape of the largest micro-batch: packed rows `[prompt | chosen | rejected]`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Geometry {
    /// Pairs per micro-batch (one packed row each).
    pub rows: usize,
    /// Tokens in the longest row.
    pub row_len: usize,
    /// Scored (response) tokens in the micro-batch.
    pub scored: usize,
    /// Trainable LoRA parameters.
    pub lora_params: usize,
    /// Σ r over the adapted linears of one layer (the LoRA `x·Aᵀ` kept per token).
    pub lora_ranks: usize,
}

/// How the run computes.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    pub path: LayerPath,
    /// Compute dtype of weights and activations.
    pub dtype: DType,
    /// Bytes per element of the checkpoint's weights as stored (mapped into memory on CPU).
    pub stored_bytes: usize,
    pub recompute: bool,
    pub cuda: bool,
}

impl Setup {
    /// The default CPU run: the CPU layer op, f32, f32 weights on disk.
    pub fn cpu_f32(recompute: bool) -> Self {
        Self { path: LayerPath::CpuOp, dtype: DType::F32, stored_bytes: 4, recompute, cuda: false }
    }
}

/// Expected peak memory, in bytes.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MemoryPlan {
    pub weights: u64,
    pub adapter_and_optimizer: u64,
    pub activations: u64,
    pub workspace: u64,
}

const MIB: f64 = 1024.0 * 1024.0;

/// What the process holds besides tensors (code, tokenizer, allocator caches), on CPU.
const CPU_BASELINE: u64 = 40 << 20;

impl MemoryPlan {
    pub fn total(&self) -> u64 {
        self.weights + self.adapter_and_optimizer + self.activations + self.workspace
    }

    pub fn estimate(arch: &Architecture, setup: &Setup, geo: &Geometry) -> Self {
        let numel: usize = arch.weight_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        let e = setup.dtype.size_in_bytes() as u64;
        // On CPU the file is memory-mapped: its pages count once, plus a converted copy when the
        // compute dtype differs from the stored one. On CUDA only the device copy counts.
        let weights = if setup.cuda || setup.stored_bytes == setup.dtype.size_in_bytes() {
            numel as u64 * e
        } else {
            numel as u64 * (e + setup.stored_bytes as u64)
        };
        // The parameters, their gradient (and its accumulated copy), AdamW's two moments: f32.
        let adapter_and_optimizer = geo.lora_params as u64 * 4 * 5;
        let tokens = (geo.rows * geo.row_len) as u64;
        let (per_token_layer, one_layer) = match setup.path {
            LayerPath::CpuOp => cpu_op_floats(arch, geo),
            LayerPath::Generic => generic_floats(arch, geo),
        };
        let f = |floats: f64, bytes: u64| (floats * tokens as f64) as u64 * bytes;
        let layers = arch.num_layers as f64;
        // Kept across layers: everything (plain), or each layer's input (recomputation), which
        // also re-creates one layer's saved set at the backward's peak.
        let kept = if setup.recompute {
            f(2.0 * arch.hidden_size as f64 * layers + one_layer, e)
        } else {
            f(per_token_layer * layers, e)
        };
        let backward = f(backward_floats(arch), e);
        let head = match setup.path {
            // The fused head keeps the scored rows' f32 logits for its backward.
            LayerPath::CpuOp => (geo.scored * arch.vocab_size) as u64 * 4,
            LayerPath::Generic => 0,
        };
        let activations = kept + backward + head + (geo.scored * arch.hidden_size) as u64 * e;
        // One attention tile per (row, head) and, on the generic path, one head chunk (logits,
        // softmax and gradient, f32).
        let tile = (geo.rows * arch.num_heads * tiled_attention::TILE.min(geo.row_len) * geo.row_len) as u64 * 4;
        let head_chunk = (8u64 << 20) * 4 * 4;
        let workspace = match setup.path {
            LayerPath::CpuOp => {
                (if setup.cuda { 0 } else { CPU_BASELINE }) + (arch.vocab_size * arch.hidden_size) as u64 / 8
            }
            LayerPath::Generic => (if setup.cuda { 256 << 20 } else { CPU_BASELINE }) + 4 * tile + head_chunk,
        };
        Self { weights, adapter_and_optimizer, activations, workspace }
    }

    /// One line per term, GiB with two decimals.
    pub fn describe(&self) -> String {
        let g = |b: u64| b as f64 / (1024.0 * MIB);
        format!(
            "{:.2} GiB = weights {:.2} + adapter and optimizer {:.2} + activations {:.2} + workspace {:.2}",
            g(self.total()),
            g(self.weights),
            g(self.adapter_and_optimizer),
            g(self.activations),
            g(self.workspace)
        )
    }

    pub fn total_mib(&self) -> f64 {
        self.total() as f64 / MIB
    }
}

/// Floats per token: `(kept per layer, one layer's full saved set)` for the CPU layer op.
fn cpu_op_floats(arch: &Architecture, geo: &Geometry) -> (f64, f64) {
    let (h, q, kv, i) = (arch.hidden_size, arch.q_width(), arch.kv_width(), arch.intermediate_size);
    let width = q + 2 * kv;
    let pre = usize::from(arch.placement != NormPlacement::Post);
    let post = usize::from(arch.placement != NormPlacement::Pre);
    let qk = usize::from(arch.qk_norm.is_some());
    let saved =
        pre * h + qk * width + width + q + arch.num_heads + post * h + h + pre * h + 3 * i + post * h + geo.lora_ranks;
    // Plus the layer's output, which the next layer holds as its input.
    ((saved + h) as f64, saved as f64)
}

/// Measured on CPU (`dpo_step` at three shapes, see README): candle's backward holds gradients
/// beside the graph's outputs, about 1.65× what the op count below gives.
const GENERIC_GRAPH_FACTOR: f64 = 1.65;

/// The generic layer's graph, per token: `(kept per layer, one recomputed layer's peak)`. Each
/// composite op keeps its output, and LoRA, q/k/v reshapes, RoPE, GQA repeats and the MLP's
/// products each add one copy; a recomputed layer holds its graph and, while it back-propagates,
/// most of that again in gradients.
fn generic_floats(arch: &Architecture, geo: &Geometry) -> (f64, f64) {
    let (h, q, kv, i) =
        (arch.hidden_size as f64, arch.q_width() as f64, arch.kv_width() as f64, arch.intermediate_size as f64);
    let norms = match arch.placement {
        NormPlacement::Pre => 2.0,
        NormPlacement::Sandwich => 4.0,
        NormPlacement::Post => 2.0,
    };
    let qk = if arch.qk_norm.is_some() { 3.0 * (q + kv) } else { 0.0 };
    let attention = 3.0 * (q + 2.0 * kv) + 4.0 * (q + kv) + 2.0 * q + 2.0 * q + qk;
    let mlp = 5.0 * i;
    let residual = 4.0 * h;
    let lora = 3.0 * geo.lora_ranks as f64 + 2.0 * (q + 2.0 * kv + h + 2.0 * i + h) * (geo.lora_ranks > 0) as u8 as f64;
    let per_layer = (norms * 3.0 * h + attention + mlp + residual + lora) * GENERIC_GRAPH_FACTOR;
    (per_layer, 1.8 * per_layer)
}

/// One layer's backward working set, per token.
fn backward_floats(arch: &Architecture) -> f64 {
    let (h, q, kv, i) = (arch.hidden_size, arch.q_width(), arch.kv_width(), arch.intermediate_size);
    (3 * i + 4 * h + q + 2 * (q + 2 * kv)) as f64
}

/// The memory a device has for this run: free device memory on CUDA, available RAM on CPU
/// (`None` when it cannot be told).
pub fn available(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => {
            let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
            let kb: u64 =
                meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            // The device's context is current once it was created.
            candle_core::cuda_backend::cudarc::driver::result::mem_get_info().ok().map(|(free, _)| free as u64)
        }
        _ => None,
    }
}

/// Adapter parameters and `Σ r` per layer of a LoRA config (targets resolved) on `arch`.
pub fn lora_geometry(arch: &Architecture, lora: &crate::lora::LoraConfig) -> (usize, usize) {
    let (mut params, mut ranks) = (0, 0);
    for &p in &arch.projections {
        let path = format!("model.layers.0.{}", p.path());
        if lora.targets(&path) {
            let ((out, inp), _) = arch.proj_geometry(p);
            params += lora.r * (out + inp) * arch.num_layers;
            ranks += lora.r;
        }
    }
    (params, ranks)
}

/// The plan of a training run, from its settings, the opened model and its data: the largest
/// micro-batch is `--batch-size` rows as long as the longest pair.
pub fn plan_run(
    args: &crate::config::RunArgs,
    files: &crate::setup::ModelFiles,
    data: &crate::data::Dataset,
) -> Result<(MemoryPlan, Setup, Geometry)> {
    let (lora_params, lora_ranks) = if args.full {
        // Every weight trained: its gradient (and accumulated copy) and two AdamW moments.
        (files.arch.weight_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum(), 0)
    } else {
        let l = &args.lora;
        let lora = match &l.init_adapter {
            Some(dir) => crate::lora::adapter::read_config(dir)?,
            None => crate::lora::LoraConfig::with_targets(l.r(), l.alpha(), l.dropout(), &l.targets())?,
        }
        .resolve(&files.arch)?;
        lora_geometry(&files.arch, &lora)
    };
    let geo = Geometry {
        rows: args.batch_size,
        row_len: data.audit.longest_pair,
        scored: args.batch_size * data.audit.longest_responses,
        lora_params,
        lora_ranks,
    };
    let setup = Setup {
        path: if args.full {
            LayerPath::Generic
        } else {
            LayerPath::choose(files.layer_path, &files.arch, &files.device, files.dtype)
        },
        dtype: files.dtype,
        stored_bytes: crate::model::weights::stored_dtype(&files.model_dir)?.size_in_bytes(),
        // Recomputation re-runs frozen layers; full fine-tuning trains them.
        recompute: !args.full && args.adjustable.gradient_checkpointing.enabled(&files.device),
        cuda: files.device.is_cuda(),
    };
    Ok((MemoryPlan::estimate(&files.arch, &setup, &geo), setup, geo))
}

/// Refuses a plan larger than `budget` bytes, naming the flags that would bring it down.
pub fn check(
    plan: &MemoryPlan,
    budget: u64,
    what: &str,
    setup: &Setup,
    geo: &Geometry,
    batch_size: usize,
) -> Result<()> {
    if plan.total() <= budget {
        return Ok(());
    }
    let mut levers = Vec::new();
    if !setup.recompute {
        levers.push("--gradient-checkpointing on (keeps one layer's activations instead of all)".to_string());
    }
    if batch_size > 1 {
        levers.push(format!(
            "--batch-size {} with --grad-accum (same effective batch, fewer pairs at once)",
            batch_size.div_ceil(2)
        ));
    }
    levers.push(format!("--max-length / --max-prompt-length (the longest pair is {} tokens)", geo.row_len));
    if setup.dtype == DType::F32 && setup.cuda {
        levers.push("--dtype bf16 (half the weights and activations)".into());
    }
    if geo.lora_ranks == 0 {
        levers.push("LoRA instead of --full (gradients and AdamW moments for a fraction of the weights)".into());
    } else {
        levers.push("--lora-r / --lora-targets (fewer adapter and optimizer bytes)".into());
    }
    bail!(
        "the memory plan needs {} but {what} {:.2} GiB; bring it down with: {}",
        plan.describe(),
        budget as f64 / (1024.0 * MIB),
        levers.join("; ")
    )
}
