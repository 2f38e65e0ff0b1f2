//! The grid of a sweep: which values of β, learning rate and loss each run gets, the run
//! folders' names, and the per-run `train` settings (config file < `--set` < grid values).
//!
//! ```
//! let grid = dpo::sweep::plan::Grid::parse(Some("0.1,0.5"), Some("1e-3"), None).unwrap();
//! let names: Vec<String> = grid.points().iter().map(|p| p.name()).collect();
//! assert_eq!(names, ["beta=0.1_lr=1e-3", "beta=0.5_lr=1e-3"]);
//! ```
use crate::config::{RunSettings, SftArgs, TrainArgs, UsageError, expand_config_file, parse_setting, table_flags};
use anyhow::{Context, Result, bail};
use clap::Parser;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Swept parameters, in the order they name run folders.
pub const PARAMS: [&str; 3] = ["loss", "beta", "lr"];

/// The values given for each swept parameter (an empty list: not swept).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Grid {
    pub loss: Vec<String>,
    pub beta: Vec<String>,
    pub lr: Vec<String>,
}

/// One run of the grid: `(parameter, value)` in [`PARAMS`] order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point(pub Vec<(String, String)>);

impl Point {
    /// Folder name: `beta=0.1_lr=5e-6`.
    pub fn name(&self) -> String {
        self.0.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("_")
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

impl Grid {
    /// Comma lists for β, lr and loss; numbers are checked here, so a typo fails before any run.
    pub fn parse(beta: Option<&str>, lr: Option<&str>, loss: Option<&str>) -> Result<Self> {
        let list = |flag: &str, v: Option<&str>, numeric: bool| -> Result<Vec<String>> {
            let Some(v) = v else { return Ok(Vec::new()) };
            let items: Vec<String> = v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
            for item in &items {
                if numeric && !item.parse::<f64>().is_ok_and(|x| x.is_finite() && x > 0.0) {
                    bail!(UsageError(format!("--{flag} {v}: {item:?} is not a positive number")));
                }
                if !numeric {
                    check_loss(item).map_err(|e| UsageError(format!("--{flag} {v}: {e}")))?;
                }
            }
            if items.is_empty() {
                bail!(UsageError(format!("--{flag} needs at least one value")));
            }
            Ok(items)
        };
        Ok(Self { beta: list("beta", beta, true)?, lr: list("lr", lr, true)?, loss: list("loss", loss, false)? })
    }

    /// The `train` flag of a grid value: a `+`-joined loss mix is `--loss a,b`.
    fn flag(key: &str, value: &str) -> String {
        if key == "loss" { format!("--loss={}", value.replace('+', ",")) } else { format!("--{key}={value}") }
    }

    fn values(&self, key: &str) -> &[String] {
        match key {
            "loss" => &self.loss,
            "beta" => &self.beta,
            _ => &self.lr,
        }
    }

    /// Every combination, the last parameter varying fastest.
    pub fn points(&self) -> Vec<Point> {
        let mut points = vec![Point(Vec::new())];
        for key in PARAMS {
            let values = self.values(key);
            if values.is_empty() {
                continue;
            }
            points = points
                .into_iter()
                .flat_map(|p| {
                    values.iter().map(move |v| Point([p.0.clone(), vec![(key.to_string(), v.clone())]].concat()))
                })
                .collect();
        }
        points
    }
}

/// A sweep's loss value: one of TRL's loss names, or a `+`-joined mix (`sigmoid+sft`, weighted
/// by the config's `loss_weights`).
fn check_loss(item: &str) -> std::result::Result<(), String> {
    use clap::ValueEnum;
    for name in item.split('+') {
        if crate::loss::LossKind::from_str(name, false).is_err() {
            let known: Vec<String> =
                crate::loss::LossKind::value_variants().iter().map(|k| k.name().to_string()).collect();
            return Err(format!("{name:?} is not a loss; the losses are {}", known.join(", ")));
        }
    }
    Ok(())
}

/// What a sweep runs, saved as `OUTPUT/sweep_plan.json` so `--resume OUTPUT` repeats it exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub config: PathBuf,
    pub sets: Vec<String>,
    pub grid: Grid,
    pub output_dir: PathBuf,
    pub eval_dataset: Option<PathBuf>,
    /// `halving`: successive halving on eval reward accuracy (see [`super::halving`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stop: Option<String>,
    /// The runs are `dpo sft` runs (the config is an sft config), not `dpo train` runs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sft: bool,
}

pub const PLAN_FILE: &str = "sweep_plan.json";

impl Plan {
    pub fn read(output_dir: &Path) -> Result<Self> {
        let path = output_dir.join(PLAN_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("--resume {}: reading {}", output_dir.display(), path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))
    }

    pub fn run_dir(&self, point: &Point) -> PathBuf {
        self.output_dir.join(point.name())
    }

    /// The settings of one run: config file, then `--set`, then the grid values, with the run
    /// folder as output and (unless the config names one) `OUTPUT/ref-cache` shared.
    pub fn settings(&self, point: &Point) -> Result<RunSettings> {
        let subcommand = if self.sft { "sft" } else { "train" };
        let mut flags =
            vec!["dpo".to_string(), subcommand.to_string(), "--config".to_string(), self.config.display().to_string()];
        for set in &self.sets {
            let table = parse_setting(set).map_err(|e| UsageError(format!("{e:#}")))?;
            if let Some(key) = table
                .keys()
                .find(|k| PARAMS.contains(&k.as_str()) && !self.grid.values(k).is_empty() || *k == "output_dir")
            {
                bail!(UsageError(format!("--set {set}: {key} is set by the sweep itself")));
            }
            let origin = |_: &str| format!("--set {set}");
            let set_flags = if self.sft {
                table_flags::<SftArgs>(table, &origin)
            } else {
                table_flags::<TrainArgs>(table, &origin)
            };
            flags.extend(set_flags.map_err(|e| UsageError(format!("{e:#}")))?);
        }
        for (k, v) in &point.0 {
            flags.push(Grid::flag(k, v));
        }
        if !self.output_dir.as_os_str().is_empty() {
            flags.push(format!("--output-dir={}", self.run_dir(point).display()));
        }
        if let Some(eval) = &self.eval_dataset {
            flags.push(format!("--eval-dataset={}", eval.display()));
        }
        let bad_flags = |e: clap::Error| UsageError(format!("run {}: {e}", point.name()));
        let settings = if self.sft {
            let expanded = expand_config_file::<SftArgs>(flags)?;
            SftArgs::try_parse_from(&expanded[1..]).map_err(bad_flags)?.settings()
        } else {
            let expanded = expand_config_file::<TrainArgs>(flags)?;
            let mut args = TrainArgs::try_parse_from(&expanded[1..]).map_err(bad_flags)?;
            args.reference.ref_cache.get_or_insert_with(|| self.output_dir.join("ref-cache"));
            args.settings()
        };
        settings.with_context(|| format!("run {}", point.name()))
    }
}
