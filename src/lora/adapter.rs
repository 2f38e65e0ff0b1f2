//! Adapters on disk in peft's format, and attaching them to a model.
//!
//! `adapter_model.safetensors` holds `base_model.model.<module>.lora_A.weight` `[r, in]` and
//! `.lora_B.weight` `[out, r]`; `adapter_config.json` is a peft `LoraConfig`. Python's peft,
//! vLLM and friends load what [`save`] writes unchanged.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let mut model = dpo::model::CausalLm::load(std::path::Path::new("m"), candle_core::DType::F32, &candle_core::Device::Cpu, dpo::model::LayerPath::CpuOp)?;
//! let cfg = dpo::lora::LoraConfig::new(8, 16.0, 0.0, "q,v")?;
//! let (cfg, params) = dpo::lora::adapter::attach_fresh(&mut model, &cfg, 42)?;
//! dpo::lora::adapter::save(std::path::Path::new("out"), &params, &cfg, "my/base")?;
//! # Ok(()) }
//! ```
use super::{ALL_LINEAR, AdapterTask, LoraConfig};
use crate::fsutil::atomic;
use crate::model::CausalLm;
use crate::model::arch::proj;
use crate::nn::linear::LoraWeights;
use crate::rng::{SeededRng, Stream};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor, Var};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// A reward model's `score` head (hidden → 1) as peft saves it for `SEQ_CLS` adapters.
pub const SCORE_KEY: &str = "base_model.model.score.weight";
pub const CONFIG_FILE: &str = "adapter_config.json";

/// A trainable tensor with its peft key.
#[derive(Debug, Clone)]
pub struct NamedParam {
    pub name: String,
    pub var: Var,
}

fn peft_key(module: &str, which: &str) -> String {
    format!("base_model.model.{module}.{which}.weight")
}

/// Attaches fresh adapters: A Kaiming-uniform (peft's `a = √5`, i.e. U(±1/√in)), B = 0.
/// Returns the config with its targets resolved for the model's family.
pub fn attach_fresh(model: &mut CausalLm, cfg: &LoraConfig, seed: u64) -> Result<(LoraConfig, Vec<NamedParam>)> {
    let mut rng = SeededRng::new(seed, Stream::LoraInit);
    let device = model.device().clone();
    let cfg = cfg.resolve(model.arch())?;
    let params = attach(model, &cfg, |_path, out_dim, in_dim| {
        let bound = 1.0 / (in_dim as f32).sqrt();
        let a: Vec<f32> = (0..cfg.r * in_dim).map(|_| (rng.uniform() * 2.0 - 1.0) * bound).collect();
        let a = Tensor::from_vec(a, (cfg.r, in_dim), &device)?;
        let b = Tensor::zeros((out_dim, cfg.r), DType::F32, &device)?;
        Ok((a, b))
    })?;
    Ok((cfg, params))
}

/// Attaches the adapter saved in `dir` (peft format). `dropout` overrides the saved rate when given.
pub fn attach_from_dir(
    model: &mut CausalLm,
    dir: &Path,
    dropout: Option<f64>,
) -> Result<(LoraConfig, Vec<NamedParam>)> {
    let mut cfg = read_config(dir)?.resolve(model.arch()).with_context(|| format!("adapter {}", dir.display()))?;
    if let Some(p) = dropout {
        cfg.dropout = p;
    }
    let weights_path = dir.join(WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load(&weights_path, model.device())
        .with_context(|| format!("reading adapter weights {}", weights_path.display()))?;
    let tensors: HashMap<String, Tensor> =
        tensors.into_iter().map(|(k, v)| (k.replace(".default.weight", ".weight"), v)).collect();
    // A reward model's score head is attached by `attach_score_head`.
    let mut used = usize::from(tensors.contains_key(SCORE_KEY));
    let params = attach(model, &cfg, |path, out_dim, in_dim| {
        let get = |which: &str, shape: (usize, usize)| -> Result<Tensor> {
            let key = peft_key(path, which);
            let t = tensors.get(&key).with_context(|| format!("{}: missing tensor {key}", weights_path.display()))?;
            if t.dims() != [shape.0, shape.1] {
                bail!("{}: {key} has shape {:?}, expected {:?}", weights_path.display(), t.dims(), [shape.0, shape.1]);
            }
            Ok(t.to_dtype(DType::F32)?)
        };
        used += 2;
        Ok((get("lora_A", (cfg.r, in_dim))?, get("lora_B", (out_dim, cfg.r))?))
    })?;
    if used != tensors.len() {
        let expected: Vec<String> = params.iter().map(|p| p.name.clone()).collect();
        let extra: Vec<&String> = tensors.keys().filter(|k| !expected.contains(k)).collect();
        bail!("{}: tensors that match no targeted layer of this model: {extra:?}", weights_path.display());
    }
    Ok((cfg, params))
}

/// Attaches a reward model's `score` head (`[1, hidden]`, f32, trained in full): from `dir`'s
/// adapter file when it holds one ([`SCORE_KEY`]), else fresh, `N(0, 0.02²)` from the seed (as
/// transformers initialises `score` with `initializer_range` 0.02).
pub fn attach_score_head(model: &mut CausalLm, dir: Option<&Path>, seed: u64) -> Result<NamedParam> {
    let hidden = model.arch().hidden_size;
    let saved = match dir {
        Some(d) => {
            let path = d.join(WEIGHTS_FILE);
            let mut tensors = candle_core::safetensors::load(&path, model.device())
                .with_context(|| format!("reading adapter weights {}", path.display()))?;
            tensors.remove(SCORE_KEY).map(|t| (t, path))
        }
        None => None,
    };
    let w = match saved {
        Some((t, path)) => {
            if t.dims() != [1, hidden] {
                bail!("{}: {SCORE_KEY} has shape {:?}, expected [1, {hidden}]", path.display(), t.dims());
            }
            t.to_dtype(DType::F32)?
        }
        None => {
            let mut rng = SeededRng::new(seed, Stream::LoraInit);
            // Box–Muller from the seeded uniform stream.
            let normal: Vec<f32> = (0..hidden)
                .map(|_| {
                    let (u, v) = (rng.uniform().max(f32::MIN_POSITIVE), rng.uniform());
                    0.02 * (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
                })
                .collect();
            Tensor::from_vec(normal, (1, hidden), model.device())?
        }
    };
    let var = Var::from_tensor(&w)?;
    model.set_score_head(var.clone())?;
    Ok(NamedParam { name: SCORE_KEY.to_string(), var })
}

/// Walks the model's linear layers and attaches an adapter to each targeted one.
fn attach(
    model: &mut CausalLm,
    cfg: &LoraConfig,
    mut make: impl FnMut(&str, usize, usize) -> Result<(Tensor, Tensor)>,
) -> Result<Vec<NamedParam>> {
    let mut params = Vec::new();
    for (path, _, layer) in model.linear_layers_mut() {
        if !cfg.targets(&path) {
            continue;
        }
        let (out_dim, in_dim) = layer.dims();
        let (a, b) = make(&path, out_dim, in_dim)?;
        let (a, b) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
        params.push(NamedParam { name: peft_key(&path, "lora_A"), var: a.clone() });
        params.push(NamedParam { name: peft_key(&path, "lora_B"), var: b.clone() });
        layer.attach(LoraWeights { a, b, scale: cfg.scale(), dropout: cfg.dropout as f32 });
    }
    Ok(params)
}

/// Reads a peft `adapter_config.json`, refusing what dpo cannot reproduce exactly.
pub fn read_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let j: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let field = |name: &str| j.get(name).filter(|v| !v.is_null());
    let peft_type = field("peft_type").and_then(|v| v.as_str()).unwrap_or("");
    if peft_type != "LORA" {
        bail!("{}: peft_type is {peft_type:?}; dpo reads LORA adapters only", path.display());
    }
    for unsupported in ["use_dora", "use_qalora"] {
        if field(unsupported).and_then(|v| v.as_bool()) == Some(true) {
            bail!("{}: {unsupported} adapters are not supported", path.display());
        }
    }
    if let Some(bias) = field("bias").and_then(|v| v.as_str())
        && bias != "none"
    {
        bail!("{}: bias = {bias:?} is not supported (only \"none\")", path.display());
    }
    for per_layer in ["rank_pattern", "alpha_pattern"] {
        if field(per_layer).and_then(|v| v.as_object()).is_some_and(|o| !o.is_empty()) {
            bail!("{}: per-layer {per_layer} is not supported", path.display());
        }
    }
    let r =
        field("r").and_then(|v| v.as_u64()).with_context(|| format!("{}: missing integer field r", path.display()))?;
    let alpha = field("lora_alpha")
        .and_then(|v| v.as_f64())
        .with_context(|| format!("{}: missing number field lora_alpha", path.display()))?;
    let dropout = field("lora_dropout").and_then(|v| v.as_f64()).unwrap_or(0.0);
    let targets = match field("target_modules") {
        Some(serde_json::Value::Array(a)) => {
            a.iter().filter_map(|v| v.as_str()).map(str::to_string).collect::<Vec<_>>()
        }
        Some(serde_json::Value::String(s)) if s == ALL_LINEAR => vec![ALL_LINEAR.to_string()],
        Some(other) => {
            bail!("{}: target_modules {other} is not supported (give a list of module names)", path.display())
        }
        None => bail!("{}: missing field target_modules", path.display()),
    };
    // Module names or full module paths (peft matches either); each must end in a linear dpo knows.
    let known: Vec<&str> = proj::ALL.iter().map(|p| p.module()).collect();
    for t in targets.iter().filter(|t| *t != ALL_LINEAR) {
        let name = t.rsplit('.').next().unwrap_or(t);
        if !known.contains(&name) {
            bail!("{}: target module {t:?} is not one of {}", path.display(), known.join(", "));
        }
    }
    let use_rslora = field("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false);
    let mut cfg = LoraConfig::validated(r as usize, alpha, dropout, targets, use_rslora)
        .with_context(|| format!("in {}", path.display()))?;
    if field("task_type").and_then(|v| v.as_str()) == Some(AdapterTask::SequenceClassification.peft_name()) {
        cfg.task_type = AdapterTask::SequenceClassification;
    }
    Ok(cfg)
}

/// Writes `adapter_model.safetensors` and `adapter_config.json` into `dir`, each atomically.
pub fn save(dir: &Path, params: &[NamedParam], cfg: &LoraConfig, base_model: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tensors: Vec<(String, Tensor)> = params.iter().map(|p| (p.name.clone(), p.var.as_tensor().clone())).collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(tensors, Some(metadata)).context("serialising the adapter")?;
    atomic::write_bytes(&dir.join(WEIGHTS_FILE), &bytes)?;
    let config = serde_json::to_string_pretty(&peft_config_json(cfg, base_model))?;
    atomic::write_bytes(&dir.join(CONFIG_FILE), config.as_bytes())
}

fn peft_config_json(cfg: &LoraConfig, base_model: &str) -> serde_json::Value {
    json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": if cfg.alpha.fract() == 0.0 { json!(cfg.alpha as i64) } else { json!(cfg.alpha) },
        "lora_dropout": cfg.dropout,
        "modules_to_save": match cfg.task_type {
            AdapterTask::SequenceClassification => json!(["score"]),
            AdapterTask::CausalLm => json!(null),
        },
        "peft_type": "LORA",
        "r": cfg.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": cfg.targets,
        "task_type": cfg.task_type.peft_name(),
        "use_dora": false,
        "use_rslora": cfg.use_rslora,
    })
}
