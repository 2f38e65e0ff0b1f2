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
use crate::provenance::Source;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

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

    /// The fingerprint of reference log-probs computed with the model `model` (every file it
    /// was read from) under `settings`, by this dpo build.
    pub fn new(model: &Source, settings: &[(&str, String)]) -> Result<Self> {
        let mut fp = Self::default();
        for (name, hash) in &model.files {
            fp.insert(&format!("file:{name}"), hash.clone());
        }
        fp.insert("model", model.source.clone());
        for (key, value) in settings {
            fp.insert(key, value.clone());
        }
        fp.insert("dpo_version", env!("CARGO_PKG_VERSION"));
        fp.insert("dpo_build", build_id()?);
        Ok(fp)
    }
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
