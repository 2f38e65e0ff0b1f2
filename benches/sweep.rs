//! A 3 β × 3 lr `dpo sweep` (one process: model loaded once, reference log-probs computed
//! once) against the 9 equivalent separate `dpo train` runs, wall time of each, on a random
//! Llama large enough for compute to dominate (issue 5's target: sweep ≤ 0.7× separate).
//! Two variants: `train_only` (each run only trains) and `with_eval` (each run also scores the
//! held-out split at the end, as a sweep that picks its best run does).
//!
//! Shape knobs: DPO_SWEEP_{HIDDEN (512), LAYERS (8), VOCAB (512), STEPS (4), BATCH (4)};
//! tokenizer and data are the bundled tiny-llama's and orca pairs (train / test). Needs
//! `cargo build --release` first (it runs target/release/dpo). DPO_SWEEP_KEEP=1 keeps the runs.
//!
//! `cargo bench --bench sweep` — the last line printed is one JSON object.
mod common;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn knob(name: &str, default: usize) -> usize {
    std::env::var(format!("DPO_SWEEP_{name}")).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A model folder: the tiny-llama tokenizer with a larger random decoder.
fn write_model(dir: &Path, hidden: usize, layers: usize) {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-llama");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny.join("config.json")).unwrap()).unwrap();
    let heads = hidden / 32;
    cfg["hidden_size"] = hidden.into();
    cfg["intermediate_size"] = (hidden * 11 / 4).into();
    cfg["vocab_size"] = knob("VOCAB", 512).into();
    cfg["num_hidden_layers"] = layers.into();
    cfg["num_attention_heads"] = heads.into();
    cfg["num_key_value_heads"] = heads.into();
    cfg["head_dim"] = 32.into();
    common::write_model_dir(dir, &cfg, 0.03);
}

fn dpo(args: &[String]) {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/dpo");
    let o = Command::new(&bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e} (cargo build --release first)", bin.display()));
    assert!(o.status.success(), "dpo {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
}

fn main() {
    let (hidden, layers, steps, batch) = (knob("HIDDEN", 512), knob("LAYERS", 8), knob("STEPS", 4), knob("BATCH", 4));
    let root = std::env::temp_dir().join(format!("dpo-sweep-bench-{}", std::process::id()));
    let model = root.join("model");
    write_model(&model, hidden, layers);
    let data_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/orca_dpo_pairs");
    let mut base = format!(
        "model = {:?}\ndataset = {:?}\ndevice = \"cpu\"\nmax_steps = {steps}\nbatch_size = {batch}\nlora_targets = \"all\"\nlora_r = 16\n",
        model.display(),
        data_dir.join("train.jsonl").display()
    );
    let mut results = serde_json::Map::new();
    for variant in ["train_only", "with_eval"] {
        if variant == "with_eval" {
            // The held-out split a sweep picks its best run by: each run ends with an eval.
            base += &format!("eval_dataset = {:?}\n", data_dir.join("test.jsonl").display());
        }
        let dir = root.join(variant);
        std::fs::create_dir_all(&dir).unwrap();
        let (separate, sweep) = compare(&dir, &base);
        println!(
            "{variant}: 9 separate `dpo train` runs {separate:.2} s; one 3x3 `dpo sweep` {sweep:.2} s; ratio {:.3}",
            sweep / separate
        );
        results.insert(
            variant.into(),
            serde_json::json!({"separate_s": separate, "sweep_s": sweep, "ratio": sweep / separate}),
        );
    }
    if std::env::var_os("DPO_SWEEP_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
    println!(
        "{}",
        serde_json::json!({"bench": "sweep", "hidden": hidden, "layers": layers, "vocab": knob("VOCAB", 512), "steps": steps,
            "batch_size": batch, "train_only": results["train_only"], "with_eval": results["with_eval"]})
    );
}

/// Wall time of the 9 separate runs and of the one sweep, for the base config `base`.
fn compare(root: &Path, base: &str) -> (f64, f64) {
    let config = root.join("base.toml");
    std::fs::write(&config, base).unwrap();
    let (betas, lrs) = (["0.05", "0.1", "0.5"], ["1e-4", "5e-4", "1e-3"]);
    let s = |p: &PathBuf| p.display().to_string();
    let t = Instant::now();
    for b in betas {
        for lr in lrs {
            let out = root.join(format!("separate/beta={b}_lr={lr}"));
            dpo(&[
                "train".into(),
                "--config".into(),
                s(&config),
                "--beta".into(),
                b.into(),
                "--lr".into(),
                lr.into(),
                "--output-dir".into(),
                s(&out),
            ]);
        }
    }
    let separate = t.elapsed().as_secs_f64();
    let t = Instant::now();
    dpo(&[
        "sweep".into(),
        "--config".into(),
        s(&config),
        "--beta".into(),
        betas.join(","),
        "--lr".into(),
        lrs.join(","),
        "--output-dir".into(),
        s(&root.join("sweep")),
    ]);
    (separate, t.elapsed().as_secs_f64())
}
