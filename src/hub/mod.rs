//! The Hugging Face Hub: `--model org/name` and `--dataset org/name` resolved to local files
//! through the standard huggingface_hub cache (`$HF_HUB_CACHE` or `$HF_HOME/hub`,
//! `models--org--name/{blobs,refs,snapshots}`), downloading with `hf-hub` only what is missing.
//!
//! Online and offline share one path: list the repo's files (the Hub API online, the cached
//! snapshot folder offline), then fetch each needed file (`local_files_only` offline). Offline is
//! `--offline` or `HF_HUB_OFFLINE=1`. The token (`HF_TOKEN` or the token file) is read by
//! `hf-hub` and never printed.
//!
//! ```no_run
//! let hub = dpo::hub::Hub::new(true).unwrap();
//! let dir = dpo::hub::model::resolve(&hub, "tiny/llama", None).unwrap();
//! assert!(dir.join("config.json").is_file());
//! ```
pub mod cache;
pub mod dataset;
pub mod glob;
pub mod model;

use anyhow::{Context, Result, anyhow};
use hf_hub::{HFClientSync, HFError};
use std::path::{Path, PathBuf};

/// Model or dataset repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Model,
    Dataset,
}

impl Kind {
    fn plural(self) -> &'static str {
        match self {
            Kind::Model => "models",
            Kind::Dataset => "datasets",
        }
    }
}

/// A Hub client plus the offline switch.
pub struct Hub {
    client: HFClientSync,
    pub offline: bool,
}

impl Hub {
    /// `offline` is `--offline`; `HF_HUB_OFFLINE=1` turns it on too.
    pub fn new(offline: bool) -> Result<Self> {
        let client = HFClientSync::new().map_err(|e| anyhow!("cannot set up the Hugging Face Hub client: {e}"))?;
        Ok(Self { client, offline: offline || offline_from_env() })
    }

    /// The cache root (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub fn cache_dir(&self) -> PathBuf {
        hf_hub::resolve_cache_dir()
    }

    /// The files of `repo` at `revision` (paths relative to the repo root, sorted).
    pub fn list_files(&self, kind: Kind, repo: &str, revision: Option<&str>) -> Result<Vec<String>> {
        let cached = || cache::snapshot_files(&self.cache_dir(), kind, repo, revision);
        if self.offline {
            return cached().ok_or_else(|| offline_miss(kind, repo, revision, None));
        }
        let (owner, name) = split(repo)?;
        let listed = match kind {
            Kind::Model => self
                .client
                .model(owner, name)
                .list_tree()
                .maybe_revision(revision.map(String::from))
                .recursive(true)
                .send(),
            Kind::Dataset => self
                .client
                .dataset(owner, name)
                .list_tree()
                .maybe_revision(revision.map(String::from))
                .recursive(true)
                .send(),
        };
        match listed {
            Ok(entries) => {
                let mut files: Vec<String> = entries
                    .into_iter()
                    .filter_map(|e| match e {
                        hf_hub::repository::RepoTreeEntry::File { path, .. } => Some(path),
                        _ => None,
                    })
                    .collect();
                files.sort();
                Ok(files)
            }
            // No network but a cached snapshot: what Python does too.
            Err(e) if matches!(e, HFError::Request { .. }) => cached().ok_or_else(|| explain(e, kind, repo, revision)),
            Err(e) => Err(explain(e, kind, repo, revision)),
        }
    }

    /// One file of `repo`, from the cache or downloaded into it; returns its snapshot path.
    pub fn fetch(&self, kind: Kind, repo: &str, revision: Option<&str>, file: &str) -> Result<PathBuf> {
        let (owner, name) = split(repo)?;
        let rev = revision.map(String::from);
        let got = match kind {
            Kind::Model => self
                .client
                .model(owner, name)
                .download_file()
                .filename(file)
                .maybe_revision(rev)
                .local_files_only(self.offline)
                .send(),
            Kind::Dataset => self
                .client
                .dataset(owner, name)
                .download_file()
                .filename(file)
                .maybe_revision(rev)
                .local_files_only(self.offline)
                .send(),
        };
        got.map_err(|e| match e {
            HFError::LocalEntryNotFound { .. } => offline_miss(kind, repo, revision, Some(file)),
            e => explain(e, kind, repo, revision),
        })
    }
}

/// `HF_HUB_OFFLINE` set to 1/true/yes/on.
pub fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Whether `arg` names a Hub repo rather than a local path: it does not exist on disk and reads
/// `owner/name` (letters, digits, `-`, `_`, `.`).
pub fn is_repo_id(arg: &Path) -> bool {
    if arg.exists() {
        return false;
    }
    let Some(s) = arg.to_str() else { return false };
    let ok = |part: &str| {
        !part.is_empty()
            && !part.starts_with('.')
            && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(s.split_once('/'), Some((o, n)) if ok(o) && ok(n) && !n.contains('/'))
}

fn split(repo: &str) -> Result<(&str, &str)> {
    repo.split_once('/').with_context(|| format!("{repo:?} is not a Hub repo id (expected owner/name)"))
}

fn describe(kind: Kind, repo: &str, revision: Option<&str>) -> String {
    let what = match kind {
        Kind::Model => "model",
        Kind::Dataset => "dataset",
    };
    match revision {
        Some(r) => format!("{what} {repo} (revision {r})"),
        None => format!("{what} {repo}"),
    }
}

fn offline_miss(kind: Kind, repo: &str, revision: Option<&str>, file: Option<&str>) -> anyhow::Error {
    let what = describe(kind, repo, revision);
    let file = file.map(|f| format!("{f} of ")).unwrap_or_default();
    anyhow!(
        "{file}{what} is not in the Hub cache ({}) and offline mode is on (--offline or HF_HUB_OFFLINE=1): \
         run once without --offline to download it, or point HF_HOME at a cache that has it",
        hf_hub::resolve_cache_dir().display()
    )
}

/// One sentence per failure: which repo, and what to do. Never includes the token.
pub fn explain(e: HFError, kind: Kind, repo: &str, revision: Option<&str>) -> anyhow::Error {
    let what = describe(kind, repo, revision);
    let login = "log in with `hf auth login` or set HF_TOKEN to a token with access";
    match e {
        HFError::AuthRequired { .. } => anyhow!("{what} needs authentication (401): {login}"),
        HFError::Forbidden { .. } => anyhow!(
            "{what} is gated or private (403): accept its conditions on https://huggingface.co/{}{repo}, then {login}",
            if kind == Kind::Dataset { "datasets/" } else { "" }
        ),
        HFError::RepoNotFound { .. } => {
            anyhow!("{what} was not found on the Hub (404): check the spelling, or {login} if it is private")
        }
        HFError::RevisionNotFound { revision, .. } => {
            anyhow!("{what} has no revision {revision:?}: pass an existing branch, tag or commit")
        }
        HFError::EntryNotFound { path, .. } => anyhow!("{what} has no file {path}"),
        HFError::LocalEntryNotFound { path } => offline_miss(kind, repo, revision, Some(&path)),
        HFError::Request { .. } => anyhow!(
            "cannot reach the Hub for {what} (network error) and it is not cached: check the connection or HF_ENDPOINT, or use --offline with a filled cache"
        ),
        other => anyhow!("{what}: Hub request failed: {other}"),
    }
}
