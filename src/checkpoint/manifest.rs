//! `manifest.json` of a checkpoint: what it was trained from, and the sha256 of every file in
//! it, verified on load so a corrupt checkpoint is named instead of silently used.
//!
//! ```no_run
//! let files = dpo::checkpoint::manifest::hash_dir(std::path::Path::new("out/checkpoint-10")).unwrap();
//! assert!(files.values().all(|digest| digest.len() == 64));
//! ```
use crate::fsutil::sha256_file;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub dpo_version: String,
    pub step: usize,
    /// The subcommand that wrote it (`dpo train`, `dpo sft`, `dpo reward train`), which alone
    /// may resume it; absent in checkpoints of older builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// The model and dataset (as given, Hub commit, sha256 of every file read) and template.
    pub provenance: crate::provenance::Provenance,
    /// The metrics line of this step, as written to metrics.jsonl.
    pub metrics: serde_json::Value,
    /// sha256 of every other file in the checkpoint folder.
    pub files: BTreeMap<String, String>,
}

/// Hashes every file of `dir` except the manifest itself.
pub fn hash_dir(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_file() && name != MANIFEST_FILE {
            files.insert(name, sha256_file(&path)?);
        }
    }
    Ok(files)
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("checkpoint {} has no readable {MANIFEST_FILE}", dir.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))
    }

    /// Checks every listed file's sha256; names the first that differs or is missing.
    pub fn verify(&self, dir: &Path) -> Result<()> {
        for (name, want) in &self.files {
            let path = dir.join(name);
            if !path.is_file() {
                bail!("checkpoint file {} is missing", path.display());
            }
            let got = sha256_file(&path)?;
            if &got != want {
                bail!("checkpoint file {} is corrupt: sha256 {got} != {want} recorded in the manifest", path.display());
            }
        }
        Ok(())
    }
}
