//! What a reference log-prob depends on besides the pair itself: the base model's files, the
//! tokenizer and template, truncation, dtype, device class and the dpo build computing it.
//! Its digest names the cache's namespace; any change gives a fresh, empty namespace.
//!
//! ```
//! let mut fp = dpo::refcache::Fingerprint::default();
//! fp.insert("dtype", "f32");
//! let before = fp.digest();
//! fp.insert("max_length", "512");
//! assert_ne!(before, fp.digest());
//! ```
use crate::fsutil::sha256_file;
use crate::config::CommonArgs;
use crate::setup::Loaded;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// Named components (file hashes, settings); the digest is over all of them, in key order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub components: BTreeMap<String, String>,
}

impl Fingerprint {
    pub fn insert(&mut self, key: &str, value: impl Into<String>) {
        self.components.insert(key.to_string(), value.into());
    }

    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for (k, v) in &self.components {
            for part in [k, v] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part.as_bytes());
            }
        }
        h.finalize().into()
    }

    /// First 16 hex digits of the digest: the namespace folder name.
    pub fn short(&self) -> String {
        self.digest()[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The fingerprint of a run's reference log-probs (hashes every model file: once per run).
    pub fn for_run(common: &CommonArgs, loaded: &Loaded) -> Result<Self> {
        let mut fp = Self::default();
        model_files(&mut fp, &loaded.model_dir)?;
        fp.insert("model", loaded.model_dir.display().to_string());
        if let Some(t) = &common.template_file {
            fp.insert("template_file", sha256_file(t).with_context(|| format!("hashing --template-file {}", t.display()))?);
        }
        fp.insert("template", common.template.clone());
        fp.insert("format", common.format.clone());
        fp.insert("max_length", common.max_length.to_string());
        fp.insert("max_prompt_length", common.max_prompt_length.to_string());
        fp.insert("dtype", format!("{:?}", loaded.model.dtype()));
        fp.insert("device", if loaded.device.is_cpu() { "cpu" } else { "cuda" });
        fp.insert("pad_id", loaded.pad_id.to_string());
        fp.insert("dpo_version", env!("CARGO_PKG_VERSION"));
        fp.insert("dpo_build", build_id()?);
        Ok(fp)
    }
}

/// sha256 of every weight, config and tokenizer file of the model folder.
fn model_files(fp: &mut Fingerprint, dir: &Path) -> Result<()> {
    let mut files = crate::model::weights::safetensors_files(dir)?;
    files.extend(["config.json", "tokenizer.json", "tokenizer_config.json"].iter().map(|f| dir.join(f)));
    for f in files.iter().filter(|f| f.is_file()) {
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        fp.insert(&format!("file:{name}"), sha256_file(f)?);
    }
    Ok(())
}

/// sha256 of the running executable: another build may round differently, so its values are
/// never mixed with this one's (a cache is exact only for the code that filled it).
fn build_id() -> Result<String> {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(id) = ID.get() {
        return Ok(id.clone());
    }
    let exe = std::env::current_exe().context("locating the dpo executable")?;
    let id = sha256_file(&exe)?;
    Ok(ID.get_or_init(|| id).clone())
}
