//! `dpo sweep`: runs equal standalone `dpo train` runs bit for bit (CPU), the summary files,
//! dry-run and resume, and `dpo plot` on the result.
mod common;
use common::*;

#[test]
fn sweep_runs_match_standalone_train_and_write_summaries_and_plots() {
    let dir = scratch("sweep");
    let out = dir.join("sweep");
    let eval = orca("test");
    let (o_s, e_s) = (out.to_str().unwrap(), eval.to_str().unwrap());
    let sweep_args = [
        "sweep",
        "--config",
        "configs/quickstart.toml",
        "--beta",
        "0.1,0.5",
        "--lr",
        "5e-3",
        "--set",
        "max_steps=3",
        "--set",
        "device=cpu",
        "--eval-dataset",
        e_s,
        "--output-dir",
        o_s,
    ];

    let plan = dpo(&[&sweep_args[..], &["--dry-run", "--json"]].concat());
    assert_eq!(plan.status.code(), Some(0), "{}", String::from_utf8_lossy(&plan.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(plan["runs"].as_array().unwrap().len(), 2);
    assert!(!out.exists(), "--dry-run trains nothing");

    let o = dpo(&[&sweep_args[..], &["--json"]].concat());
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["finished"], 2);
    assert!(summary["best"].is_string());
    assert!(out.join("sweep_summary.md").is_file() && out.join("sweep_summary.json").is_file());
    let row = &summary["rows"][1];
    assert!(row["eval_reward_accuracy"].is_f64() && row["final_train_loss"].is_f64(), "{row}");

    let alone = dir.join("alone");
    let t = dpo(&[
        "train",
        "--config",
        "configs/quickstart.toml",
        "--beta",
        "0.5",
        "--lr",
        "5e-3",
        "--max-steps",
        "3",
        "--device",
        "cpu",
        "--output-dir",
        alone.to_str().unwrap(),
        "--eval-dataset",
        e_s,
    ]);
    assert_eq!(t.status.code(), Some(0), "{}", String::from_utf8_lossy(&t.stderr));
    let run = out.join("beta=0.5_lr=5e-3");
    assert_eq!(metrics_without_timing(&run), metrics_without_timing(&alone), "a sweep run equals a standalone train");
    assert_eq!(
        std::fs::read(run.join("eval_metrics.json")).unwrap(),
        std::fs::read(alone.join("eval_metrics.json")).unwrap()
    );
    assert_eq!(
        std::fs::read(run.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(alone.join("adapter_model.safetensors")).unwrap()
    );

    let again = dpo(&["sweep", "--resume", o_s, "--json"]);
    assert_eq!(again.status.code(), Some(0), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stderr).contains("(finished)"), "resume skips finished runs");

    let p = dpo(&["plot", o_s]);
    assert_eq!(p.status.code(), Some(0), "{}", String::from_utf8_lossy(&p.stderr));
    let png = std::fs::read(out.join("curves.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let svg = std::fs::read_to_string(out.join("curves.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("beta=0.5_lr=5e-3") && svg.contains("reward accuracy"));
}

#[test]
fn an_invalid_grid_value_is_a_usage_error_before_any_run() {
    let dir = scratch("sweep-fail");
    let out = dir.join("s");
    let o = dpo(&[
        "sweep",
        "--config",
        "configs/quickstart.toml",
        "--loss",
        "sigmoid,nosuch",
        "--set",
        "max_steps=1",
        "--output-dir",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "an invalid grid value is a usage error before any run: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("loss"));
}

#[test]
fn early_stop_halving_keeps_the_better_half_at_each_rung_and_the_survivor_equals_a_full_run() {
    let dir = scratch("sweep-halving");
    let out = dir.join("sweep");
    let eval = orca("test");
    let (o_s, e_s) = (out.to_str().unwrap(), eval.to_str().unwrap());
    // 4 runs of 8 steps: rungs at 2, 4 and 8 steps (4 → 2 → 1 runs).
    let args = [
        "sweep",
        "--config",
        "configs/quickstart.toml",
        "--beta",
        "0.1,0.5",
        "--lr",
        "1e-3,5e-3",
        "--set",
        "max_steps=8",
        "--set",
        "device=cpu",
        "--eval-dataset",
        e_s,
        "--output-dir",
        o_s,
        "--early-stop",
        "halving",
        "--json",
    ];
    let o = dpo(&args);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((summary["finished"].as_u64(), summary["stopped"].as_u64()), (Some(1), Some(3)), "{summary}");
    let rows = summary["rows"].as_array().unwrap();
    let stopped_at = |step: u64| rows.iter().filter(|r| r["stopped_at_step"].as_u64() == Some(step)).count();
    assert_eq!((stopped_at(2), stopped_at(4)), (2, 1), "{summary}");
    let survivor = rows.iter().find(|r| r["status"] == "finished").unwrap();
    assert_eq!(summary["best"], survivor["name"]);

    // At each rung the dropped runs ranked below the ones that went on (accuracy, then loss).
    let eval_at = |name: &str, step: u64| -> (f64, f64) {
        let text = std::fs::read_to_string(out.join(name).join("eval_metrics.jsonl")).unwrap();
        let v: serde_json::Value = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["step"] == step)
            .unwrap();
        (v["rewards/accuracies"].as_f64().unwrap(), v["loss"].as_f64().unwrap())
    };
    let better = |a: (f64, f64), b: (f64, f64)| a.0 > b.0 || (a.0 == b.0 && a.1 <= b.1);
    // Past a rung: not stopped there or earlier.
    let went_on = |r: &serde_json::Value, step: u64| r["stopped_at_step"].as_u64().is_none_or(|s| s > step);
    for step in [2u64, 4] {
        for kept in rows.iter().filter(|r| went_on(r, step)) {
            for dropped in rows.iter().filter(|r| r["stopped_at_step"].as_u64() == Some(step)) {
                let (k, d) =
                    (eval_at(kept["name"].as_str().unwrap(), step), eval_at(dropped["name"].as_str().unwrap(), step));
                assert!(better(k, d), "step {step}: kept {} {k:?} vs dropped {} {d:?}", kept["name"], dropped["name"]);
            }
        }
    }
    // A dropped run's row holds its metrics at the step it stopped, and its checkpoint is there.
    let dropped = rows.iter().find(|r| r["stopped_at_step"].as_u64() == Some(2)).unwrap();
    let name = dropped["name"].as_str().unwrap();
    assert_eq!(dropped["eval_reward_accuracy"].as_f64().unwrap(), eval_at(name, 2).0);
    assert!(out.join(name).join("checkpoint-2").is_dir());
    assert!(std::fs::read_to_string(out.join("sweep_summary.md")).unwrap().contains("stopped at step 2 (halving)"));

    // The survivor paused at steps 2 and 4 and resumed: it equals the same run trained in one go.
    let params: Vec<(String, String)> = serde_json::from_value(survivor["params"].clone()).unwrap();
    let mut train = vec![
        "train".to_string(),
        "--config".into(),
        "configs/quickstart.toml".into(),
        "--max-steps".into(),
        "8".into(),
        "--device".into(),
        "cpu".into(),
    ];
    for (k, v) in &params {
        train.extend([format!("--{k}"), v.clone()]);
    }
    let alone = dir.join("alone");
    train.extend(["--output-dir".into(), alone.display().to_string()]);
    let t = dpo(&train.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(t.status.code(), Some(0), "{}", String::from_utf8_lossy(&t.stderr));
    let run = out.join(survivor["name"].as_str().unwrap());
    assert_eq!(metrics_without_timing(&run), metrics_without_timing(&alone));
    assert_eq!(
        std::fs::read(run.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(alone.join("adapter_model.safetensors")).unwrap()
    );

    // Resuming a finished halving sweep recomputes the same outcome without training.
    let again = dpo(&["sweep", "--resume", o_s, "--json"]);
    assert_eq!(again.status.code(), Some(0), "{}", String::from_utf8_lossy(&again.stderr));
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["best"], summary["best"]);
    assert_eq!(again["stopped"], summary["stopped"]);

    // Without held-out pairs there is nothing to rank by: a usage error.
    let no_eval = dpo(&[
        "sweep",
        "--config",
        "configs/quickstart.toml",
        "--beta",
        "0.1,0.5",
        "--set",
        "max_steps=2",
        "--output-dir",
        dir.join("x").to_str().unwrap(),
        "--early-stop",
        "halving",
    ]);
    assert_eq!(no_eval.status.code(), Some(2), "{}", String::from_utf8_lossy(&no_eval.stderr));
}
