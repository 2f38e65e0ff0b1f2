//! What a run was computed from: for the model and the dataset, the `--model` / `--dataset`
//! given, the Hub commit they resolved to (when they came through the Hub cache) and the
//! sha256 of every file read — the model's weights, config and tokenizer files, the dataset's
//! data files. Checkpoint manifests and the reference cache's fingerprint record it;
//! `--verify-resume` recomputes it and refuses a run whose inputs changed, naming the file.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let model = dpo::provenance::Source::model("tiny/llama", std::path::Path::new("snapshot"))?;
//! let data = dpo::provenance::Source::files("d.jsonl", &[std::path::PathBuf::from("d.jsonl")])?;
//! let p = dpo::provenance::Provenance { model, dataset: data, template: "orca".into() };
//! p.check_same_as(&p)?;
//! # Ok(()) }
//! ```
use crate::fsutil::sha256_file;
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The model files a run reads besides its weights.
pub const MODEL_METADATA_FILES: &[&str] = &["config.json", "tokenizer.json", "tokenizer_config.json"];

/// One input: what was asked for, the commit it resolved to, the hash of every file read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Source {
    /// The `--model` / `--dataset` given (a path or a Hub repo id).
    pub source: String,
    /// The Hub commit of the snapshot the files were read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// File name (relative to the snapshot or folder) → sha256.
    pub files: BTreeMap<String, String>,
}

/// Everything a run's numbers depend on outside its settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub model: Source,
    pub dataset: Source,
    pub template: String,
}

impl Source {
    /// A model folder (a Hub snapshot for repo ids): its weights and metadata files.
    pub fn model(source: &str, dir: &Path) -> Result<Self> {
        let mut files = crate::model::weights::safetensors_files(dir)?;
        files.extend(MODEL_METADATA_FILES.iter().map(|f| dir.join(f)).filter(|f| f.is_file()));
        Self::files(source, &files)
    }

    /// Data (or any) files read for `source`.
    pub fn files(source: &str, files: &[PathBuf]) -> Result<Self> {
        let commit = files.iter().find_map(|f| hub_snapshot(f)).map(|(commit, _)| commit);
        let mut hashes = BTreeMap::new();
        for f in files {
            let name = match hub_snapshot(f) {
                Some((_, relative)) => relative,
                None if files.len() == 1 || f.parent().is_some_and(|p| files.iter().all(|g| g.parent() == Some(p))) => {
                    f.file_name().unwrap_or_default().to_string_lossy().into_owned()
                }
                None => f.display().to_string(),
            };
            hashes.insert(name, sha256_file(f)?);
        }
        Ok(Self { source: source.to_string(), commit, files: hashes })
    }
}

/// `(commit, path inside the snapshot)` of a file under a Hub cache's `snapshots/<commit>/`.
fn hub_snapshot(path: &Path) -> Option<(String, String)> {
    let parts: Vec<String> = path.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    let i = parts.iter().rposition(|p| p == "snapshots")?;
    let commit = parts.get(i + 1)?;
    if commit.len() != 40 || !commit.chars().all(|c| c.is_ascii_hexdigit()) || i + 2 >= parts.len() {
        return None;
    }
    Some((commit.clone(), parts[i + 2..].join("/")))
}

impl Provenance {
    /// Refuses when any input differs from `saved`, naming what changed.
    pub fn check_same_as(&self, saved: &Provenance) -> Result<()> {
        for (what, now, then) in [("model", &self.model, &saved.model), ("dataset", &self.dataset, &saved.dataset)] {
            if now.commit != then.commit {
                bail!(
                    "the {what} {} resolved to commit {:?}, but the checkpoint was trained on {:?}",
                    now.source,
                    now.commit,
                    then.commit
                );
            }
            for (file, hash) in &then.files {
                match now.files.get(file) {
                    None => {
                        bail!("the {what} {} no longer has {file}, which the checkpoint was trained on", now.source)
                    }
                    Some(h) if h != hash => bail!(
                        "the {what} {} changed since the checkpoint: {file} has sha256 {h}, was {hash}",
                        now.source
                    ),
                    Some(_) => {}
                }
            }
            if let Some(extra) = now.files.keys().find(|f| !then.files.contains_key(*f)) {
                bail!("the {what} {} has {extra}, which the checkpoint was not trained on", now.source);
            }
        }
        if self.template != saved.template {
            bail!("the template is {:?}, but the checkpoint was trained with {:?}", self.template, saved.template);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_snapshot_paths_give_commit_and_relative_name() {
        let c = "a".repeat(40);
        let p = PathBuf::from(format!("/h/hub/datasets--o--d/snapshots/{c}/data/train.jsonl"));
        assert_eq!(hub_snapshot(&p), Some((c, "data/train.jsonl".into())));
        assert_eq!(hub_snapshot(Path::new("/tmp/snapshots/short/x.jsonl")), None);
    }
}
