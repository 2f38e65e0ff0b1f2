//! What a plot shows, read from a run or sweep folder: each run's `metrics.jsonl` (train
//! curves), its `eval_metrics.jsonl` / `eval_metrics.json` (held-out curve, or the point at the
//! last step) and its swept parameters.
//!
//! ```no_run
//! let runs = dpo::plot::series::read_runs(std::path::Path::new("runs/sweep")).unwrap();
//! for r in &runs { println!("{}: {} steps", r.name, r.steps.len()); }
//! ```
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::Path;

/// The metrics plotted, as named in metrics.jsonl (every run logs `loss`; the preference ones
/// are absent from supervised fine-tuning runs).
pub const METRICS: [&str; 5] = ["loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"];

/// Loss-specific metrics, plotted when a run logs them (`sft`/`cpo`/`orpo`'s NLL, ORPO's log
/// odds ratio, the policy entropy and token accuracy of DPO losses and SFT).
pub const OPTIONAL_METRICS: [&str; 4] = ["nll_loss", "log_odds_ratio", "entropy", "mean_token_accuracy"];

/// The metrics a set of runs has, in panel order.
pub fn metrics_of(runs: &[RunSeries]) -> Vec<&'static str> {
    METRICS.into_iter().chain(OPTIONAL_METRICS).filter(|m| runs.iter().any(|r| r.train.contains_key(m))).collect()
}

#[derive(Debug, Clone)]
pub struct RunSeries {
    pub name: String,
    pub steps: Vec<f64>,
    /// Per metric of [`METRICS`] (and of [`OPTIONAL_METRICS`] the run logs), one value per step.
    pub train: BTreeMap<&'static str, Vec<f64>>,
    pub eval: Option<BTreeMap<&'static str, f64>>,
    /// Held-out metrics over training (`eval_metrics.jsonl`, from --eval-steps): steps and,
    /// per metric, one value per evaluation. Empty when the run evaluated only at the end.
    pub eval_steps: Vec<f64>,
    pub eval_curve: BTreeMap<&'static str, Vec<f64>>,
    /// Swept parameters parsed from the folder name (`beta=0.1_lr=5e-6`).
    pub params: BTreeMap<String, String>,
}

/// The run in `dir`, or, for a sweep folder, every run folder in it (sorted by name).
pub fn read_runs(dir: &Path) -> Result<Vec<RunSeries>> {
    if dir.join(crate::train::METRICS_FILE).is_file() {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        return Ok(vec![read_run(dir, name, BTreeMap::new())?]);
    }
    let mut runs = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut dirs: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(crate::train::METRICS_FILE).is_file())
        .collect();
    dirs.sort();
    for d in dirs {
        let name = d.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let params =
            name.split('_').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        runs.push(read_run(&d, name, params)?);
    }
    if runs.is_empty() {
        bail!("{} holds no metrics.jsonl, neither itself nor in a run folder", dir.display());
    }
    Ok(runs)
}

/// Each metric's values, by its name.
type Values = BTreeMap<&'static str, Vec<f64>>;

/// `(steps, per-metric values)` of a JSON-lines metrics file.
fn read_curve(path: &Path) -> Result<(Vec<f64>, Values)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut steps = Vec::new();
    let mut values: BTreeMap<&'static str, Vec<f64>> =
        METRICS.iter().chain(&OPTIONAL_METRICS).map(|m| (*m, Vec::new())).collect();
    let mut lines = 0;
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        let get = |key: &str| {
            v[key].as_f64().with_context(|| format!("{}:{}: missing number {key:?}", path.display(), i + 1))
        };
        steps.push(get("step")?);
        get("loss")?;
        for m in METRICS.iter().chain(&OPTIONAL_METRICS) {
            if let Some(x) = v[*m].as_f64() {
                values.get_mut(m).unwrap().push(x);
            }
        }
        lines += 1;
    }
    // A metric is a series only when every line has it.
    values.retain(|_, v| v.len() == lines && lines > 0);
    Ok((steps, values))
}

fn read_run(dir: &Path, name: String, params: BTreeMap<String, String>) -> Result<RunSeries> {
    let (steps, train) = read_curve(&dir.join(crate::train::METRICS_FILE))?;
    let curve_path = dir.join(crate::train::EVAL_CURVE_FILE);
    let (eval_steps, eval_curve) =
        if curve_path.is_file() { read_curve(&curve_path)? } else { (Vec::new(), BTreeMap::new()) };
    let eval_path = dir.join(crate::train::EVAL_FILE);
    let eval = match std::fs::read_to_string(&eval_path) {
        Ok(t) => {
            let v: serde_json::Value =
                serde_json::from_str(&t).with_context(|| format!("{} is not JSON", eval_path.display()))?;
            Some(METRICS.iter().chain(&OPTIONAL_METRICS).filter_map(|m| v[*m].as_f64().map(|x| (*m, x))).collect())
        }
        Err(_) => None,
    };
    Ok(RunSeries { name, steps, train, eval, eval_steps, eval_curve, params })
}
