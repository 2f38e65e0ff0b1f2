//! A dataset repo's split resolved to data files the way the `datasets` library does it: the
//! README.md YAML `configs:` → `data_files` globs per split, else the conventional names
//! (`train.jsonl`, `data/train-*.parquet`, a `train/` folder, …), else every data file is `train`.
//!
//! ```no_run
//! let hub = dpo::hub::Hub::new(true).unwrap();
//! let files = dpo::hub::dataset::resolve(&hub, "tiny/orca_dpo_pairs", None, None, "train").unwrap();
//! assert!(files[0].ends_with("orca_rlhf.jsonl"));
//! ```
use super::glob::matches;
use super::{Hub, Kind};
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// File endings dpo reads (see `data::reader`).
pub const DATA_EXTENSIONS: &[&str] = &[".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet"];

/// The local paths of `split`'s files (config `config`, default when `None`), fetched as needed.
pub fn resolve(
    hub: &Hub,
    repo: &str,
    revision: Option<&str>,
    config: Option<&str>,
    split: &str,
) -> Result<Vec<PathBuf>> {
    let files = hub.list_files(Kind::Dataset, repo, revision)?;
    let splits = match readme_configs(hub, repo, revision, &files)? {
        Some(configs) => configured_splits(repo, &configs, config)?,
        None => {
            if let Some(c) = config {
                bail!("dataset {repo} has no `configs:` in its README.md, so --dataset-config {c:?} names nothing");
            }
            conventional_splits(&files)
        }
    };
    let picked = pick_split(repo, &files, &splits, split, offline_note(hub))?;
    picked.into_iter().map(|f| hub.fetch(Kind::Dataset, repo, revision, f)).collect()
}

/// A local dataset folder resolved like a Hub repo: its README.md `configs:`, else the
/// conventional file names (`train.jsonl`, `data/test-*.parquet`, ...).
pub fn resolve_local(dir: &std::path::Path, config: Option<&str>, split: &str) -> Result<Vec<PathBuf>> {
    let label = dir.display().to_string();
    let mut files = Vec::new();
    list_relative(dir, dir, &mut files)?;
    files.sort();
    let readme = dir.join("README.md");
    let configs = match std::fs::read_to_string(&readme).ok().as_deref().and_then(front_matter) {
        Some(yaml) => {
            let meta: serde_yaml::Value = serde_yaml::from_str(yaml)
                .with_context(|| format!("{}: front matter is not valid YAML", readme.display()))?;
            meta.get("configs").and_then(|c| c.as_sequence()).cloned()
        }
        None => None,
    };
    let splits = match configs {
        Some(c) => configured_splits(&label, &c, config)?,
        None => conventional_splits(&files),
    };
    let picked = pick_split(&label, &files, &splits, split, "")?;
    Ok(picked.into_iter().map(|f| dir.join(f)).collect())
}

fn list_relative(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            list_relative(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    Ok(())
}

/// The files of `split` among `files`, given each split's glob patterns.
fn pick_split<'f>(
    repo: &str,
    files: &'f [String],
    splits: &BTreeMap<String, Vec<String>>,
    split: &str,
    note: &str,
) -> Result<Vec<&'f String>> {
    let patterns = splits.get(split).with_context(|| {
        format!(
            "dataset {repo} has no split {split:?}: its splits are {}; pass one with --split",
            splits.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    let picked: Vec<&String> =
        files.iter().filter(|f| patterns.iter().any(|p| matches(p.trim_start_matches("./"), f))).collect();
    if picked.is_empty() {
        bail!("dataset {repo}: split {split:?} names {} but no file matches{note}", patterns.join(", "));
    }
    eprintln!("dataset {repo} split {split}: {}", picked.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "));
    Ok(picked)
}

fn offline_note(hub: &Hub) -> &'static str {
    if hub.offline {
        " in the Hub cache (offline mode lists only downloaded files): run once without --offline"
    } else {
        ""
    }
}

/// The README's YAML front matter `configs:` list, if any.
fn readme_configs(
    hub: &Hub,
    repo: &str,
    revision: Option<&str>,
    files: &[String],
) -> Result<Option<Vec<serde_yaml::Value>>> {
    if !files.iter().any(|f| f == "README.md") {
        return Ok(None);
    }
    let path = hub.fetch(Kind::Dataset, repo, revision, "README.md")?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let Some(yaml) = front_matter(&text) else { return Ok(None) };
    let meta: serde_yaml::Value = serde_yaml::from_str(yaml)
        .with_context(|| format!("dataset {repo}: README.md front matter is not valid YAML"))?;
    Ok(meta.get("configs").and_then(|c| c.as_sequence()).cloned())
}

/// The text between a leading `---` line and the next `---` line.
pub fn front_matter(text: &str) -> Option<&str> {
    let rest = text.strip_prefix("---\n").or_else(|| text.strip_prefix("---\r\n"))?;
    let end = rest.find("\n---")?;
    Some(&rest[..end + 1])
}

/// split → glob patterns of the chosen config.
pub fn configured_splits(
    repo: &str,
    configs: &[serde_yaml::Value],
    name: Option<&str>,
) -> Result<BTreeMap<String, Vec<String>>> {
    let name_of =
        |c: &serde_yaml::Value| c.get("config_name").and_then(|n| n.as_str()).unwrap_or("default").to_string();
    let names: Vec<String> = configs.iter().map(name_of).collect();
    let chosen = match name {
        Some(n) => configs
            .iter()
            .find(|c| name_of(c) == n)
            .with_context(|| format!("dataset {repo} has no config {n:?}: its configs are {}", names.join(", ")))?,
        None => configs
            .iter()
            .find(|c| c.get("default").and_then(|d| d.as_bool()) == Some(true) || name_of(c) == "default")
            .or(if configs.len() == 1 { configs.first() } else { None })
            .with_context(|| {
                format!("dataset {repo} has several configs ({}): pick one with --dataset-config", names.join(", "))
            })?,
    };
    let data_files = chosen
        .get("data_files")
        .with_context(|| format!("dataset {repo}: config {:?} has no data_files", name_of(chosen)))?;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    match data_files {
        serde_yaml::Value::String(p) => out.entry("train".into()).or_default().push(p.clone()),
        serde_yaml::Value::Sequence(items) => {
            for item in items {
                match item {
                    serde_yaml::Value::String(p) => out.entry("train".into()).or_default().push(p.clone()),
                    m => {
                        let split = m.get("split").and_then(|s| s.as_str()).unwrap_or("train").to_string();
                        out.entry(split).or_default().extend(strings(m.get("path")));
                    }
                }
            }
        }
        serde_yaml::Value::Mapping(m) => {
            for (k, v) in m {
                if let Some(split) = k.as_str() {
                    out.entry(split.to_string()).or_default().extend(strings(Some(v)));
                }
            }
        }
        _ => {
            bail!("dataset {repo}: data_files of config {:?} is neither a path, a list nor a mapping", name_of(chosen))
        }
    }
    Ok(out)
}

fn strings(v: Option<&serde_yaml::Value>) -> Vec<String> {
    match v {
        Some(serde_yaml::Value::String(s)) => vec![s.clone()],
        Some(serde_yaml::Value::Sequence(items)) => items.iter().filter_map(|i| i.as_str().map(String::from)).collect(),
        _ => Vec::new(),
    }
}

const SPLIT_KEYWORDS: &[(&str, &[&str])] = &[
    ("train", &["train", "training"]),
    ("validation", &["validation", "valid", "dev", "val"]),
    ("test", &["test", "testing", "eval", "evaluation"]),
];

/// The `datasets` library's defaults: split keywords in file or folder names (`train-00000.parquet`,
/// `data/test.jsonl`, `train/x.jsonl`), else every data file in `train`. Returns literal paths.
pub fn conventional_splits(files: &[String]) -> BTreeMap<String, Vec<String>> {
    let data: Vec<&String> = files.iter().filter(|f| is_data_file(f)).collect();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (split, keywords) in SPLIT_KEYWORDS {
        for f in &data {
            if keywords.iter().any(|k| names_split(f, k)) {
                out.entry(split.to_string()).or_default().push(escape(f));
            }
        }
    }
    if out.is_empty() && !data.is_empty() {
        out.insert("train".into(), data.iter().map(|f| escape(f)).collect());
    }
    out
}

pub fn is_data_file(f: &str) -> bool {
    DATA_EXTENSIONS.iter().any(|e| f.ends_with(e))
}

/// `keyword` as a word of the file name or a folder name (separators `-._ ` and digits).
fn names_split(path: &str, keyword: &str) -> bool {
    let sep = |c: char| "-._ 0123456789".contains(c);
    let (dirs, name) = path.rsplit_once('/').unwrap_or(("", path));
    let in_name = name.match_indices(keyword).any(|(i, _)| {
        let before_ok = i == 0 || name[..i].ends_with(sep);
        let after = &name[i + keyword.len()..];
        before_ok && after.starts_with(sep)
    });
    let in_dir = dirs.split('/').any(|d| {
        d.match_indices(keyword).any(|(i, _)| {
            let after = &d[i + keyword.len()..];
            (i == 0 || d[..i].ends_with(sep)) && (after.is_empty() || after.starts_with(sep))
        })
    });
    in_name || in_dir
}

/// A literal path as a glob pattern.
fn escape(f: &str) -> String {
    f.chars().map(|c| if matches!(c, '*' | '?' | '[') { format!("[{c}]") } else { c.to_string() }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conventions_pick_splits_by_name() {
        let files: Vec<String> =
            ["README.md", "data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet", "train_prefs.jsonl"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let s = conventional_splits(&files);
        assert_eq!(s["train"], vec!["data/train-00000-of-00001.parquet", "train_prefs.jsonl"]);
        assert_eq!(s["test"], vec!["data/test-00000-of-00001.parquet"]);
        let s = conventional_splits(&["orca_rlhf.jsonl".to_string(), "README.md".to_string()]);
        assert_eq!(s["train"], vec!["orca_rlhf.jsonl"]);
    }

    #[test]
    fn readme_configs_map_splits_to_globs() {
        let yaml = "configs:\n- config_name: default\n  data_files:\n  - split: train_prefs\n    path: data/train_prefs-*\n  - split: test_prefs\n    path: data/test_prefs-*\n";
        let meta: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        let configs = meta["configs"].as_sequence().unwrap();
        let s = configured_splits("x/y", configs, None).unwrap();
        assert_eq!(s["train_prefs"], vec!["data/train_prefs-*"]);
        assert!(configured_splits("x/y", configs, Some("other")).unwrap_err().to_string().contains("default"));
        assert_eq!(front_matter("---\na: 1\n---\n# t\n"), Some("a: 1\n"));
    }
}
