//! Finds and memory-maps a model folder's safetensors weights (single file or sharded).
//!
//! ```no_run
//! let files = dpo::model::weights::safetensors_files(std::path::Path::new("tiny-llama")).unwrap();
//! assert!(!files.is_empty());
//! ```
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// The safetensors files holding a model's weights: `model.safetensors`, or every shard
/// named by `model.safetensors.index.json`. Pickle checkpoints are refused, never loaded.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        return shards_from_index(&index);
    }
    let pickle =
        ["pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt"].iter().find(|f| dir.join(f).exists());
    if let Some(p) = pickle {
        bail!(
            "{} holds only pickle weights ({p}); dpo loads safetensors only, because unpickling can run arbitrary code. \
             Convert the checkpoint with transformers' save_pretrained (which writes safetensors).",
            dir.display()
        );
    }
    bail!("no {SINGLE_FILE} or {INDEX_FILE} in {}", dir.display())
}

fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no \"weight_map\" object", index.display()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let file =
            file.as_str().with_context(|| format!("{}: weight_map[{tensor:?}] is not a file name", index.display()))?;
        shards.insert(file.to_string());
    }
    shards
        .into_iter()
        .map(|f| {
            let p = dir.join(&f);
            if p.is_file() { Ok(p) } else { bail!("{} names shard {f}, which is missing", index.display()) }
        })
        .collect()
}

/// Memory-maps the weights; tensors are converted to `dtype` when taken (bf16 → f32 upcasts).
pub fn mmap_weights(dir: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let files = safetensors_files(dir)?;
    for f in &files {
        check_safetensors_header(f)?;
    }
    // SAFETY: the files are mapped read-only; dpo never writes to a model folder it loads from.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
        .with_context(|| format!("memory-mapping the weights in {}", dir.display()))?;
    Ok(vb)
}

/// The dtype the weights are stored in (that of the first tensor of the first file).
pub fn stored_dtype(dir: &Path) -> Result<DType> {
    use std::io::Read;
    let file = safetensors_files(dir)?.into_iter().next().context("no weights file")?;
    let mut f = std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n).with_context(|| format!("{} is not a safetensors file", file.display()))?;
    let len = u64::from_le_bytes(n).min(100_000_000) as usize;
    let mut header = vec![0u8; len];
    f.read_exact(&mut header).with_context(|| format!("{} is truncated", file.display()))?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).with_context(|| format!("{} is corrupt", file.display()))?;
    let dtype = json
        .as_object()
        .and_then(|o| o.iter().find(|(k, _)| *k != "__metadata__"))
        .and_then(|(_, v)| v.get("dtype")?.as_str());
    Ok(match dtype {
        Some("BF16") => DType::BF16,
        Some("F16") => DType::F16,
        _ => DType::F32,
    })
}

/// Reads the header so a truncated or corrupt file fails here with its name, not deep in a matmul.
fn check_safetensors_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .with_context(|| format!("{} is not a safetensors file (shorter than 8 bytes)", path.display()))?;
    let header_len = u64::from_le_bytes(n);
    if header_len.saturating_add(8) > len || header_len > 100_000_000 {
        bail!("{} is corrupt or truncated: header of {header_len} bytes in a {len}-byte file", path.display());
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header)?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .with_context(|| format!("{} is corrupt: its header is not valid JSON", path.display()))?;
    let data_len = len - 8 - header_len;
    if let Some(obj) = json.as_object() {
        for (name, info) in obj.iter().filter(|(k, _)| *k != "__metadata__") {
            let end = info
                .get("data_offsets")
                .and_then(|o| o.get(1))
                .and_then(|e| e.as_u64())
                .with_context(|| format!("{}: tensor {name} has no data_offsets", path.display()))?;
            if end > data_len {
                bail!("{} is truncated: tensor {name} ends at byte {end} of {data_len}", path.display());
            }
        }
    }
    Ok(())
}
