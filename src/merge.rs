//! `dpo merge`: fold a LoRA adapter into the base weights and write a plain model folder
//! (config.json, tokenizer files, sharded safetensors with an index, the base's tensor names)
//! that transformers and candle load like any other checkpoint.
//!
//! `W' = W + (alpha / r) · B · A`, computed in f32, then stored in `--dtype`.
//!
//! ```no_run
//! use clap::Parser;
//! let args = dpo::merge::MergeArgs::parse_from(["merge", "--model", "base", "--adapter", "out", "--output", "merged"]);
//! dpo::merge::run(&args).unwrap();
//! ```
use crate::fsutil::atomic;
use crate::lora::{LoraConfig, adapter};
use crate::model::Architecture;
use crate::model::weights::safetensors_files;
use anyhow::{Context, Result, bail};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Parser)]
#[command(name = "merge")]
pub struct MergeArgs {
    /// Base model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// peft LoRA adapter folder.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Folder to write the merged model to (must not exist yet).
    #[arg(long)]
    pub output: PathBuf,
    /// Stored dtype of the merged weights.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: crate::device::StoredDType,
    /// Largest shard, in bytes (transformers' default is 5 GB).
    #[arg(long, default_value_t = 5_000_000_000)]
    pub max_shard_size: u64,
}

const COPIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
];

pub fn run(args: &MergeArgs) -> Result<()> {
    let dtype = args.dtype.dtype();
    if args.output.exists() {
        bail!("{} already exists; choose a new --output folder", args.output.display());
    }
    let arch = Architecture::from_file(&args.model.join("config.json"))?;
    let lora = adapter::read_config(&args.adapter)?
        .resolve(&arch)
        .with_context(|| format!("adapter {}", args.adapter.display()))?;
    let adapter_path = args.adapter.join(adapter::WEIGHTS_FILE);
    let deltas_src = candle_core::safetensors::load(&adapter_path, &Device::Cpu)
        .with_context(|| format!("reading {}", adapter_path.display()))?;
    let files = safetensors_files(&args.model)?;
    // SAFETY: read-only mapping of files dpo does not modify.
    let base =
        unsafe { MmapedSafetensors::multi(&files) }.with_context(|| format!("mapping {}", args.model.display()))?;
    let mut names: Vec<String> = base.tensors().into_iter().map(|(n, _)| n).collect();
    names.sort();

    check_adapter(&arch, &lora, &deltas_src, &adapter_path, &args.model)?;
    let merged_modules = deltas_src.len() / 2;
    let merge_one = |name: &str| -> Result<Tensor> {
        let w = base.load(name, &Device::Cpu)?.to_dtype(DType::F32)?;
        let Some(module) = name.strip_suffix(".weight") else { return Ok(w.to_dtype(dtype)?) };
        let key = |which: &str| format!("base_model.model.{module}.{which}.weight");
        match (deltas_src.get(&key("lora_A")), deltas_src.get(&key("lora_B"))) {
            (Some(a), Some(b)) => {
                let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * lora.scale())?;
                Ok((w + delta)?.to_dtype(dtype)?)
            }
            _ => Ok(w.to_dtype(dtype)?),
        }
    };

    atomic::write_dir(&args.output, |tmp| write_merged(tmp, args, &names, &base, dtype, &merge_one))?;
    eprintln!("merged {merged_modules} LoRA modules into {}", args.output.display());
    Ok(())
}

/// Every adapter tensor must be an adapter of one of this architecture's linears, with its
/// shape, and every targeted linear must have both: checked before anything is written.
fn check_adapter(
    arch: &Architecture,
    lora: &LoraConfig,
    deltas_src: &HashMap<String, Tensor>,
    adapter_path: &Path,
    model: &Path,
) -> Result<()> {
    let expected = adapter_shapes(arch, lora);
    for (key, t) in deltas_src {
        let module = key
            .strip_prefix("base_model.model.")
            .and_then(|k| k.strip_suffix(".lora_A.weight").or_else(|| k.strip_suffix(".lora_B.weight")))
            .with_context(|| format!("{}: {key} is not a peft LoRA tensor name", adapter_path.display()))?;
        match expected.get(key) {
            None => bail!(
                "{}: {key} adapts {module}, which the base model in {} does not have (or its adapter_config.json does not target)",
                adapter_path.display(),
                model.display()
            ),
            Some(shape) if t.dims() != shape => {
                bail!(
                    "{}: {key} has shape {:?}; this {} model needs {shape:?}",
                    adapter_path.display(),
                    t.dims(),
                    arch.model_type
                )
            }
            Some(_) => {}
        }
    }
    if let Some(missing) = expected.keys().find(|k| !deltas_src.contains_key(*k)) {
        bail!("{}: missing {missing}, which adapter_config.json targets", adapter_path.display());
    }
    Ok(())
}

/// Writes the merged shards, their index, the config (in the new dtype) and the tokenizer files
/// into `tmp`.
fn write_merged(
    tmp: &Path,
    args: &MergeArgs,
    names: &[String],
    base: &MmapedSafetensors,
    dtype: DType,
    merge_one: &dyn Fn(&str) -> Result<Tensor>,
) -> Result<()> {
    let shards = plan_shards(names, base, dtype, args.max_shard_size)?;
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total_size = 0u64;
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        let mut tensors = Vec::with_capacity(shard.len());
        for name in shard {
            let t = merge_one(name)?;
            total_size += (t.elem_count() * dtype.size_in_bytes()) as u64;
            weight_map.insert(name.clone(), file.clone());
            tensors.push((name.clone(), t));
        }
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        std::fs::write(tmp.join(&file), safetensors::serialize(tensors, Some(meta))?)?;
    }
    let index = serde_json::json!({ "metadata": { "total_size": total_size }, "weight_map": weight_map });
    std::fs::write(tmp.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)?;
    write_config(&args.model.join("config.json"), &tmp.join("config.json"), dtype)?;
    for f in COPIED_FILES {
        let src = args.model.join(f);
        if src.is_file() {
            std::fs::copy(&src, tmp.join(f)).with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}

/// The adapter tensors a LoRA config puts on an architecture: peft key → `[r, in]` / `[out, r]`.
fn adapter_shapes(arch: &Architecture, lora: &LoraConfig) -> HashMap<String, Vec<usize>> {
    let mut out = HashMap::new();
    for i in 0..arch.num_layers {
        for &p in &arch.projections {
            let module = format!("model.layers.{i}.{}", p.path());
            if lora.targets(&module) {
                let ((o, inp), _) = arch.proj_geometry(p);
                out.insert(format!("base_model.model.{module}.lora_A.weight"), vec![lora.r, inp]);
                out.insert(format!("base_model.model.{module}.lora_B.weight"), vec![o, lora.r]);
            }
        }
    }
    out
}

/// Groups tensor names into shards of at most `max_bytes` (a larger tensor gets its own shard).
fn plan_shards(names: &[String], base: &MmapedSafetensors, dtype: DType, max_bytes: u64) -> Result<Vec<Vec<String>>> {
    let mut shards: Vec<Vec<String>> = vec![Vec::new()];
    let mut size = 0u64;
    for name in names {
        let bytes = (base.get(name)?.shape().iter().product::<usize>() * dtype.size_in_bytes()) as u64;
        if size + bytes > max_bytes && !shards.last().unwrap().is_empty() {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().unwrap().push(name.clone());
        size += bytes;
    }
    Ok(shards)
}

/// The base config.json with its dtype key(s) set to the merged dtype.
fn write_config(src: &Path, dst: &Path, dtype: DType) -> Result<()> {
    let text = std::fs::read_to_string(src).with_context(|| format!("reading {}", src.display()))?;
    let mut cfg: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", src.display()))?;
    let name = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    };
    let obj = cfg.as_object_mut().context("config.json is not an object")?;
    let had_torch_dtype = obj.contains_key("torch_dtype");
    obj.insert("dtype".into(), name.into());
    if had_torch_dtype {
        obj.insert("torch_dtype".into(), name.into());
    }
    std::fs::write(dst, serde_json::to_string_pretty(&cfg)?)?;
    Ok(())
}
