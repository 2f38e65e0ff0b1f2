//! `dpo sweep`: runs equal standalone `dpo train` runs bit for bit (CPU), the summary files,
//! dry-run and resume, and `dpo plot` on the result.
mod common;
use common::*;
use std::process::{Command, Output};

fn dpo(args: &[&str]) -> Output {
    Command::new(bin()).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap()
}


#[test]
fn sweep_runs_match_standalone_train_and_write_summaries_and_plots() {
    let dir = scratch("sweep");
    let out = dir.join("sweep");
    let eval = orca("test");
    let (o_s, e_s) = (out.to_str().unwrap(), eval.to_str().unwrap());
    let sweep_args = ["sweep", "--config", "configs/quickstart.toml", "--beta", "0.1,0.5", "--lr", "5e-3", "--set", "max_steps=3", "--set", "device=cpu", "--eval-dataset", e_s, "--output-dir", o_s];

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
    let t = dpo(&["train", "--config", "configs/quickstart.toml", "--beta", "0.5", "--lr", "5e-3", "--max-steps", "3", "--device", "cpu", "--output-dir", alone.to_str().unwrap(), "--eval-dataset", e_s]);
    assert_eq!(t.status.code(), Some(0), "{}", String::from_utf8_lossy(&t.stderr));
    let run = out.join("beta=0.5_lr=5e-3");
    assert_eq!(metrics_without_timing(&run), metrics_without_timing(&alone), "a sweep run equals a standalone train");
    assert_eq!(std::fs::read(run.join("eval_metrics.json")).unwrap(), std::fs::read(alone.join("eval_metrics.json")).unwrap());
    assert_eq!(std::fs::read(run.join("adapter_model.safetensors")).unwrap(), std::fs::read(alone.join("adapter_model.safetensors")).unwrap());

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
    let o = dpo(&["sweep", "--config", "configs/quickstart.toml", "--loss", "sigmoid,nosuch", "--set", "max_steps=1", "--output-dir", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "an invalid grid value is a usage error before any run: {}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("loss"));
}
