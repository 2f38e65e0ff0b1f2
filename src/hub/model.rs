//! A model repo resolved to a local snapshot folder holding config.json, the tokenizer files and
//! safetensors weights (one file, or the index plus every shard it names). Pickle weights are
//! refused before anything is downloaded.
//!
//! ```no_run
//! let hub = dpo::hub::Hub::new(false).unwrap();
//! let dir = dpo::hub::model::resolve(&hub, "meta-llama/Llama-2-7b-hf", Some("main")).unwrap();
//! println!("{}", dir.display());
//! ```
use super::{Hub, Kind};
use anyhow::{Context, Result, bail};
use std::collections::BTreeSet;
use std::path::PathBuf;

const REQUIRED: &[&str] = &["config.json", "tokenizer.json"];
const OPTIONAL: &[&str] = &["tokenizer_config.json", "generation_config.json", "special_tokens_map.json"];
const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// Fetches what `CausalLm::load` and the tokenizer need; returns the snapshot folder.
pub fn resolve(hub: &Hub, repo: &str, revision: Option<&str>) -> Result<PathBuf> {
    let files = hub.list_files(Kind::Model, repo, revision)?;
    let has = |f: &str| files.iter().any(|x| x == f);
    let weights = weight_files(hub, repo, revision, &files)?;
    for f in REQUIRED {
        if !has(f) {
            bail!("model {repo} has no {f}{}", offline_hint(hub));
        }
    }
    let mut dir = None;
    for f in REQUIRED.iter().copied().chain(OPTIONAL.iter().copied().filter(|f| has(f))) {
        dir = Some(hub.fetch(Kind::Model, repo, revision, f)?);
    }
    for f in &weights {
        hub.fetch(Kind::Model, repo, revision, f)?;
    }
    let config = dir.expect("config.json was fetched");
    Ok(config.parent().context("snapshot path has no parent")?.to_path_buf())
}

/// `model.safetensors`, or the index plus its shards; pickle-only repos are refused.
fn weight_files(hub: &Hub, repo: &str, revision: Option<&str>, files: &[String]) -> Result<Vec<String>> {
    let has = |f: &str| files.iter().any(|x| x == f);
    if has(SINGLE) {
        return Ok(vec![SINGLE.to_string()]);
    }
    if has(INDEX) {
        let index = hub.fetch(Kind::Model, repo, revision, INDEX)?;
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let shards: BTreeSet<String> = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{} has no \"weight_map\" object", index.display()))?
            .values()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        let mut out = vec![INDEX.to_string()];
        out.extend(shards);
        return Ok(out);
    }
    if let Some(p) = files.iter().find(|f| f.ends_with(".bin") || f.ends_with(".pt") || f.ends_with(".pth")) {
        bail!(
            "model {repo} has only pickle weights ({p}); dpo loads safetensors only, because unpickling can run \
             arbitrary code: use a revision or fork of the repo with safetensors weights"
        );
    }
    bail!("model {repo} has no {SINGLE} or {INDEX}{}", offline_hint(hub))
}

fn offline_hint(hub: &Hub) -> &'static str {
    if hub.offline { " in the Hub cache (offline mode): run once without --offline to download it" } else { "" }
}
