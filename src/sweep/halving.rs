//! `dpo sweep --early-stop halving`: successive halving on held-out reward accuracy.
//!
//! Every run trains to the first rung (`max_steps / 2^k`, k = ⌈log₂ runs⌉), pauses there with a
//! checkpoint and an eval line, and the better half (eval reward accuracy, then eval loss)
//! continues to twice the steps; the rest stop. The last run standing trains to `max_steps`.
//! A run that continues resumes from its own checkpoint, so it is bit-identical to the same run
//! trained in one go. Nothing but the run folders holds the state: `--resume` recomputes each
//! rung's ranking from the runs' `eval_metrics.jsonl`.
//!
//! ```
//! // 9 runs of 200 steps: rungs at 12, 25, 50, 100 and 200 steps (9 → 5 → 3 → 2 → 1 runs).
//! assert_eq!(dpo::sweep::halving::rungs(9, 200), vec![12, 25, 50, 100, 200]);
//! ```
use super::summary::{Row, Status, Summary};
use super::{PlannedRun, Segment, Shared, finished_row, read_run, train_segment};
use crate::config::RunSettings;
use crate::train::EVAL_CURVE_FILE;
use anyhow::{Context, Result, bail};
use std::path::Path;

/// The step counts at which runs are ranked, ending with `total`.
pub fn rungs(runs: usize, total: usize) -> Vec<usize> {
    let halvings = runs.max(1).next_power_of_two().trailing_zeros() as usize;
    let mut steps: Vec<usize> = (0..halvings).map(|i| (total >> (halvings - i)).max(1)).collect();
    steps.push(total);
    steps.dedup();
    steps
}

/// Runs the plan's runs by successive halving, filling `rows`.
pub(crate) fn run(
    plan: &super::plan::Plan,
    runs: &[(PlannedRun, RunSettings)],
    rows: &mut [Row],
    shared: &mut Shared,
) -> Result<()> {
    let first = &runs.first().context("the sweep has no runs")?.1;
    let total = crate::train::plan::StepPlan::new(&first.run, shared.data.len()).total_steps;
    let rungs = rungs(runs.len(), total);
    eprintln!("successive halving: rungs at steps {rungs:?}");
    let mut alive: Vec<usize> = (0..runs.len()).collect();
    // Wall time of each run's segments in this process (a run is trained in pieces).
    let mut spent = vec![0f64; runs.len()];
    for &rung in &rungs {
        let last = rung == total;
        for &i in &alive {
            if shared.stop.received().is_some() {
                return Ok(());
            }
            let (planned, args) = &runs[i];
            let done = if last {
                planned.output_dir.join(super::RUN_FILE).is_file()
            } else {
                eval_at(&planned.output_dir, rung)?.is_some()
            };
            if done {
                if last {
                    rows[i] = finished_row(planned, &read_run(&planned.output_dir)?);
                }
                continue;
            }
            eprintln!("sweep run {}: to step {rung}", planned.name);
            let started = std::time::Instant::now();
            let segment = train_segment(planned, args.clone(), (!last).then_some(rung), shared);
            spent[i] += started.elapsed().as_secs_f64();
            rows[i] = match segment {
                Segment::Finished(row) | Segment::Failed(row) => Row { seconds: spent[i], ..row },
                Segment::Paused => Row { status: Status::Pending, ..rows[i].clone() },
                Segment::Interrupted(e) => {
                    rows[i].error = Some(format!("{e:#}"));
                    Summary::new(rows.to_vec()).write(&plan.output_dir)?;
                    return Err(e);
                }
            };
            Summary::new(rows.to_vec()).write(&plan.output_dir)?;
        }
        alive.retain(|&i| rows[i].status != Status::Failed);
        if last {
            break;
        }
        let mut ranked: Vec<(usize, (f64, f64))> = alive
            .iter()
            .map(|&i| Ok((i, eval_at(&runs[i].0.output_dir, rung)?.context("a paused run has no eval line")?)))
            .collect::<Result<_>>()?;
        // Best first: higher reward accuracy, then lower eval loss; ties keep grid order.
        ranked.sort_by(|(i, a), (j, b)| b.0.total_cmp(&a.0).then(a.1.total_cmp(&b.1)).then(i.cmp(j)));
        let keep = ranked.len().div_ceil(2);
        for &(i, _) in &ranked[keep..] {
            rows[i] = Row { seconds: spent[i], ..stopped_row(&runs[i].0, rung)? };
        }
        alive = ranked[..keep].iter().map(|&(i, _)| i).collect();
        alive.sort_unstable();
        Summary::new(rows.to_vec()).write(&plan.output_dir)?;
    }
    Ok(())
}

/// The line of a run's JSONL log (`metrics.jsonl`, `eval_metrics.jsonl`) for `step`, if any.
fn line_at_step(dir: &Path, file: &str, step: usize) -> Result<Option<serde_json::Value>> {
    let path = dir.join(file);
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
    for (n, line) in text.lines().enumerate() {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}:{}", path.display(), n + 1))?;
        if v["step"].as_u64() == Some(step as u64) {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// `(eval reward accuracy, eval loss)` the run logged at `step`, if it did.
fn eval_at(dir: &Path, step: usize) -> Result<Option<(f64, f64)>> {
    let Some(v) = line_at_step(dir, EVAL_CURVE_FILE, step)? else { return Ok(None) };
    match (v["rewards/accuracies"].as_f64(), v["loss"].as_f64()) {
        (Some(acc), Some(loss)) => Ok(Some((acc, loss))),
        _ => bail!("{}: the step {step} line has no rewards/accuracies or loss", dir.join(EVAL_CURVE_FILE).display()),
    }
}

/// The row of a run dropped at `step`: its train loss and eval metrics at that step.
fn stopped_row(r: &PlannedRun, step: usize) -> Result<Row> {
    let find = |file: &str| -> Result<serde_json::Value> {
        line_at_step(&r.output_dir, file, step)?
            .with_context(|| format!("{} has no line for step {step}", r.output_dir.join(file).display()))
    };
    let (train, eval) = (find(crate::train::METRICS_FILE)?, find(EVAL_CURVE_FILE)?);
    Ok(Row {
        status: Status::Stopped,
        stopped_at_step: Some(step),
        final_train_loss: train["loss"].as_f64(),
        eval_loss: eval["loss"].as_f64(),
        eval_reward_accuracy: eval["rewards/accuracies"].as_f64(),
        eval_reward_margin: eval["rewards/margins"].as_f64(),
        ..super::pending_row(r)
    })
}

#[cfg(test)]
mod tests {
    use super::rungs;

    #[test]
    fn rungs_halve_until_one_run_is_left() {
        assert_eq!(rungs(4, 8), vec![2, 4, 8]);
        assert_eq!(rungs(2, 10), vec![5, 10]);
        assert_eq!(rungs(1, 10), vec![10]);
        // Too few steps for every halving: rungs collapse, never to step 0.
        assert_eq!(rungs(9, 4), vec![1, 2, 4]);
    }
}
