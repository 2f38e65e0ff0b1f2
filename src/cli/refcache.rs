//! `dpo ref-cache build|info|clear`: fill a reference log-prob cache ahead of training (the
//! micro-batches a `train` with the same flags will use, and its `--eval-dataset`), show
//! what a cache folder holds (every segment verified), or delete it.
//!
//! ```text
//! dpo ref-cache build --config configs/quickstart.toml --ref-cache runs/ref-cache
//! dpo ref-cache info runs/ref-cache --json
//! dpo ref-cache clear runs/ref-cache
//! ```
use crate::config::TrainArgs;
use crate::refcache::{self, Fingerprint, META_FILE};
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // one value per process, parsed once
pub enum RefCacheCommand {
    /// Compute and store the reference log-probs a `train` with these flags will need.
    Build(TrainArgs),
    /// What a cache folder holds (per settings namespace), each segment verified.
    Info(DirArgs),
    /// Delete a cache folder's namespaces.
    Clear(DirArgs),
}

#[derive(Debug, Clone, Parser)]
pub struct DirArgs {
    /// The cache folder (what --ref-cache names).
    pub dir: PathBuf,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: RefCacheCommand, layer_path: crate::model::LayerPath) -> Result<()> {
    match cmd {
        RefCacheCommand::Build(mut a) => {
            a.common.model.layer_path = layer_path;
            build(&a)
        }
        RefCacheCommand::Info(a) => info(&a),
        RefCacheCommand::Clear(a) => clear(&a),
    }
}

#[derive(Debug, Serialize)]
struct BuildReport {
    dir: PathBuf,
    pairs_cached: usize,
    computed: usize,
    reused: usize,
}

fn build(args: &TrainArgs) -> Result<()> {
    let mut args = args.clone();
    args.reference.ref_cache.get_or_insert_with(|| PathBuf::from("auto"));
    let settings = args.settings()?;
    if !settings.task.needs_reference() {
        bail!(crate::config::UsageError(format!(
            "--loss {} is reference-free: it needs no reference cache",
            settings.task.name()
        )));
    }
    let loaded = crate::setup::load_model(&settings.common.model)?;
    let data = crate::setup::load_rows(&settings.common, &loaded, &settings.task)?;
    let mut cache = crate::train::reference::open_cache(&settings, &loaded)?.context("no --ref-cache")?;
    let eval = crate::train::load_eval_rows(&settings, &loaded)?;
    crate::train::reference::precompute_reference(&settings, &loaded, &data, eval.as_ref(), &mut cache)?;
    cache.flush()?;
    let report = BuildReport {
        dir: cache.dir().to_path_buf(),
        pairs_cached: cache.len(),
        computed: cache.misses,
        reused: cache.hits,
    };
    if args.run.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{}: {} pairs cached ({} computed now, {} already there)",
            report.dir.display(),
            report.pairs_cached,
            report.computed,
            report.reused
        );
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct Namespace {
    dir: PathBuf,
    fingerprint: Fingerprint,
    segments: usize,
    entries: usize,
    bytes: u64,
    /// `None` when every segment verifies; otherwise why not (the next run rebuilds it).
    problem: Option<String>,
}

/// Namespace folders of a cache (those with a meta.json).
fn namespaces(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading reference cache {}", dir.display()))?;
    let mut out: Vec<PathBuf> =
        entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join(META_FILE).is_file()).collect();
    out.sort();
    Ok(out)
}

fn inspect(ns: &Path) -> Result<Namespace> {
    let meta = ns.join(META_FILE);
    let fingerprint: Fingerprint = serde_json::from_str(&std::fs::read_to_string(&meta)?)
        .with_context(|| format!("{} is corrupt", meta.display()))?;
    let digest = fingerprint.digest();
    let (mut entries, mut bytes, mut problem) = (0, 0, None);
    let segments = refcache::segments(ns)?;
    if ns.file_name().is_some_and(|n| n.to_string_lossy() != fingerprint.short()) {
        problem = Some(format!("{} does not match its folder name", meta.display()));
    }
    for seg in &segments {
        let data = std::fs::read(seg)?;
        bytes += data.len() as u64;
        match refcache::segment::decode(&data, &digest) {
            Ok(e) => entries += e.len(),
            Err(e) => problem = problem.or(Some(format!("{}: {e:#}", seg.display()))),
        }
    }
    Ok(Namespace { dir: ns.to_path_buf(), fingerprint, segments: segments.len(), entries, bytes, problem })
}

fn info(args: &DirArgs) -> Result<()> {
    let list = namespaces(&args.dir)?.iter().map(|ns| inspect(ns)).collect::<Result<Vec<_>>>()?;
    if args.json {
        println!("{}", serde_json::json!({ "dir": args.dir, "namespaces": list }));
        return Ok(());
    }
    println!("{}: {} settings namespace(s)", args.dir.display(), list.len());
    for ns in &list {
        let c = &ns.fingerprint.components;
        let get = |k: &str| c.get(k).map(String::as_str).unwrap_or("?");
        println!(
            "  {}: {} pairs in {} segment(s), {} bytes; model {}, dtype {}, device {}, max_length {}, template {}",
            ns.dir.file_name().unwrap_or_default().to_string_lossy(),
            ns.entries,
            ns.segments,
            ns.bytes,
            get("model"),
            get("dtype"),
            get("device"),
            get("max_length"),
            get("template"),
        );
        if let Some(p) = &ns.problem {
            println!("    INVALID: {p} (the next run using it clears and rebuilds it)");
        }
    }
    Ok(())
}

fn clear(args: &DirArgs) -> Result<()> {
    if !args.dir.exists() {
        bail!("{} does not exist", args.dir.display());
    }
    let list = namespaces(&args.dir)?;
    for ns in &list {
        std::fs::remove_dir_all(ns).with_context(|| format!("removing {}", ns.display()))?;
    }
    let empty = std::fs::read_dir(&args.dir).map(|mut d| d.next().is_none()).unwrap_or(false);
    if empty {
        std::fs::remove_dir(&args.dir).with_context(|| format!("removing {}", args.dir.display()))?;
    }
    if args.json {
        println!("{}", serde_json::json!({ "dir": args.dir, "removed_namespaces": list.len() }));
    } else {
        println!("removed {} namespace(s) from {}", list.len(), args.dir.display());
    }
    Ok(())
}
