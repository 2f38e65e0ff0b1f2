//! `OUTPUT/sweep_summary.json` and `sweep_summary.md`: one row per run with its parameters,
//! final train loss, eval loss, eval reward accuracy and margin, and wall time; the best run
//! (highest eval reward accuracy, then lowest eval loss; lowest train loss without eval) marked.
//!
//! ```
//! use dpo::sweep::summary::{Row, Status, Summary};
//! let row = |name: &str, loss| Row { name: name.into(), params: vec![], status: Status::Finished, final_train_loss: Some(loss), eval_loss: None, eval_reward_accuracy: None, eval_reward_margin: None, seconds: 1.0, error: None, best: false, stopped_at_step: None };
//! let s = Summary::new(vec![row("a", 0.6), row("b", 0.4)]);
//! assert!(s.rows[1].best && s.all_finished());
//! ```
use crate::fsutil::atomic;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const JSON_FILE: &str = "sweep_summary.json";
pub const MD_FILE: &str = "sweep_summary.md";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Finished,
    Failed,
    /// Not run (the sweep was stopped before it).
    Pending,
    /// Dropped by `--early-stop halving` at `stopped_at_step` (its metrics are from that step).
    Stopped,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub name: String,
    pub params: Vec<(String, String)>,
    pub status: Status,
    pub final_train_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub eval_reward_accuracy: Option<f64>,
    pub eval_reward_margin: Option<f64>,
    /// Wall time of the run (the time of the run that finished it, when resumed).
    pub seconds: f64,
    pub error: Option<String>,
    pub best: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at_step: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub rows: Vec<Row>,
    /// Name of the best finished run.
    pub best: Option<String>,
    pub finished: usize,
    pub failed: usize,
    #[serde(default)]
    pub stopped: usize,
}

impl Summary {
    pub fn new(mut rows: Vec<Row>) -> Self {
        let best = best_index(&rows);
        for (i, r) in rows.iter_mut().enumerate() {
            r.best = Some(i) == best;
        }
        let count = |s| rows.iter().filter(|r| r.status == s).count();
        let (finished, failed, stopped) = (count(Status::Finished), count(Status::Failed), count(Status::Stopped));
        Self { best: best.map(|i| rows[i].name.clone()), finished, failed, stopped, rows }
    }

    /// Every run finished, or was dropped by early stopping as planned.
    pub fn all_finished(&self) -> bool {
        self.finished + self.stopped == self.rows.len()
    }

    /// Writes both files atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        atomic::write_bytes(&dir.join(JSON_FILE), serde_json::to_string_pretty(self)?.as_bytes())?;
        atomic::write_bytes(&dir.join(MD_FILE), self.markdown().as_bytes())
    }

    pub fn markdown(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.4}"));
        let mut md = String::from(
            "# Sweep summary\n\n| run | status | train loss | eval loss | eval reward acc | eval margin | seconds | best |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
        );
        for r in &self.rows {
            let status = match (&r.status, &r.error) {
                (Status::Failed, Some(e)) => format!("failed: {}", e.replace('|', "/").replace('\n', " ")),
                (Status::Stopped, _) => format!("stopped at step {} (halving)", r.stopped_at_step.unwrap_or(0)),
                (s, _) => format!("{s:?}").to_lowercase(),
            };
            md.push_str(&format!(
                "| {} | {status} | {} | {} | {} | {} | {:.1} | {} |\n",
                r.name,
                opt(r.final_train_loss),
                opt(r.eval_loss),
                opt(r.eval_reward_accuracy),
                opt(r.eval_reward_margin),
                r.seconds,
                if r.best { "★" } else { "" }
            ));
        }
        md.push_str(&format!("\n{} of {} runs finished, {} failed.", self.finished, self.rows.len(), self.failed));
        if self.stopped > 0 {
            md.push_str(&format!(
                " {} stopped early by successive halving (their metrics are from the step they stopped at).",
                self.stopped
            ));
        }
        if let Some(b) = &self.best {
            md.push_str(&format!(
                " Best: {b} (highest eval reward accuracy, then lowest eval loss; lowest train loss without eval)."
            ));
        }
        md.push('\n');
        md
    }
}

fn best_index(rows: &[Row]) -> Option<usize> {
    let key = |r: &Row| -> (f64, f64) {
        match r.eval_reward_accuracy {
            Some(acc) => (acc, -r.eval_loss.unwrap_or(f64::INFINITY)),
            None => (f64::NEG_INFINITY, -r.final_train_loss.unwrap_or(f64::INFINITY)),
        }
    };
    rows.iter()
        .enumerate()
        .filter(|(_, r)| r.status == Status::Finished)
        .max_by(|(_, a), (_, b)| key(a).partial_cmp(&key(b)).unwrap_or(std::cmp::Ordering::Equal))
        .map(|(i, _)| i)
}
