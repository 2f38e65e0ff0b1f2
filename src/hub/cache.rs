//! The huggingface_hub cache layout, read directly: `<cache>/<kind>s--org--name/refs/<revision>`
//! holds a commit hash, `snapshots/<commit>/` holds (symlinks to) the downloaded files.
//!
//! ```no_run
//! use dpo::hub::{Kind, cache};
//! let files = cache::snapshot_files(std::path::Path::new("hf_home/hub"), Kind::Dataset, "tiny/orca_dpo_pairs", None);
//! assert!(files.unwrap().contains(&"README.md".to_string()));
//! ```
use super::Kind;
use std::path::{Path, PathBuf};

/// `models--org--name` (or `datasets--…`).
pub fn repo_folder(kind: Kind, repo: &str) -> String {
    format!("{}--{}", kind.plural(), repo.replace('/', "--"))
}

/// The snapshot folder of `revision` (a branch/tag in `refs/`, or a commit hash), if cached.
pub fn snapshot_dir(cache: &Path, kind: Kind, repo: &str, revision: Option<&str>) -> Option<PathBuf> {
    let root = cache.join(repo_folder(kind, repo));
    let revision = revision.unwrap_or("main");
    let commit = match std::fs::read_to_string(root.join("refs").join(revision)) {
        Ok(c) => c.trim().to_string(),
        Err(_) if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) => revision.to_string(),
        Err(_) => return None,
    };
    let dir = root.join("snapshots").join(commit);
    dir.is_dir().then_some(dir)
}

/// Every file of a cached snapshot, relative to the repo root with `/` separators, sorted.
pub fn snapshot_files(cache: &Path, kind: Kind, repo: &str, revision: Option<&str>) -> Option<Vec<String>> {
    let dir = snapshot_dir(cache, kind, repo, revision)?;
    let mut out = Vec::new();
    walk(&dir, "", &mut out);
    out.sort();
    Some(out)
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
        let path = e.path();
        if path.is_dir() {
            walk(&path, &rel, out);
        } else if path.is_file() {
            out.push(rel);
        }
    }
}
