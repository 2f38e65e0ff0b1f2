//! Training behaviour: the golden 20-step run, adapters on disk, learning, gradient flow.
mod common;
use candle_core::{Device, Tensor};
use common::*;
use dpo::config::TrainArgs;
use dpo::lora::{LoraConfig, adapter};
use dpo::loss::{LossKind, Objective};
use dpo::nn::LoraMode;
use dpo::scoring::score_batch as score;
use dpo::task::Task;
use std::path::Path;
use std::process::Command;

/// train_ref.json's settings: golden LoRA init, AdamW lr 5e-3, constant, no clipping, batch 4, file order.
fn golden_run_args(out: &Path, steps: usize) -> TrainArgs {
    let adapter = golden_dir("tiny-llama").join("adapter");
    train_args(
        out,
        &[
            "--init-adapter",
            adapter.to_str().unwrap(),
            "--lr",
            "5e-3",
            "--lr-scheduler",
            "constant",
            "--max-grad-norm",
            "0",
            "--weight-decay",
            "0",
            "--batch-size",
            "4",
            "--no-shuffle",
            "--beta",
            "0.1",
            "--max-steps",
            &steps.to_string(),
        ],
    )
}

fn metrics_lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn assert_adapter_close(out: &Path, golden: &Path, tol: f64) {
    let got = load_safetensors(&out.join("adapter_model.safetensors"));
    let want = load_safetensors(golden);
    assert_eq!(got.len(), want.len());
    for (k, w) in &want {
        let g = got.get(k).unwrap_or_else(|| panic!("missing {k}"));
        assert_close(k, &to_vec(g), &to_vec(w), tol);
    }
}

#[test]
fn golden_twenty_step_run_matches_pytorch() {
    let reference = read_json(&fixtures().join("golden/train_ref.json"));
    let steps = reference["run20"]["steps"].as_array().unwrap();

    let out1 = scratch("golden_run_1");
    dpo::train::run(&golden_run_args(&out1, 1).settings().unwrap()).unwrap();
    assert_adapter_close(&out1, &golden_dir("tiny-llama").join("lora_after_step1.safetensors"), 1e-4);

    let out = scratch("golden_run_20");
    dpo::train::run(&golden_run_args(&out, 20).settings().unwrap()).unwrap();
    let lines = metrics_lines(&out);
    assert_eq!(lines.len(), 20);
    assert_eq!(steps.len(), 20, "golden steps");
    for (line, want) in lines.iter().zip(steps) {
        let step = line["step"].as_u64().unwrap();
        assert_eq!(step, want["step"].as_u64().unwrap());
        let (got, want_loss) = (line["loss"].as_f64().unwrap(), want["loss"].as_f64().unwrap());
        assert_close(&format!("step {step} loss"), &[got], &[want_loss], 1e-4);
        assert_eq!(
            line["rewards/accuracies"].as_f64().unwrap(),
            want["reward_accuracy"].as_f64().unwrap(),
            "step {step}"
        );
        assert_eq!(line["lr"].as_f64().unwrap(), 5e-3);
        assert!(line["tokens"].as_u64().unwrap() > 0);
    }
    assert_adapter_close(&out, &golden_dir("tiny-llama").join("lora_after_step20.safetensors"), 1e-4);
}

#[test]
fn written_adapter_has_pefts_keys_and_shapes_and_round_trips() {
    let out = scratch("roundtrip");
    dpo::train::run(&train_args(&out, &["--max-steps", "2", "--lr", "1e-2"]).settings().unwrap()).unwrap();
    let ours = load_safetensors(&out.join("adapter_model.safetensors"));
    let peft = load_safetensors(&golden_dir("tiny-llama").join("adapter/adapter_model.safetensors"));
    let shapes = |m: &std::collections::HashMap<String, Tensor>| {
        let mut v: Vec<(String, Vec<usize>)> = m.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
        v.sort();
        v
    };
    assert_eq!(shapes(&ours), shapes(&peft));

    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["lora_alpha"], 16);
    assert_eq!(cfg["target_modules"], serde_json::json!(["q_proj", "v_proj"]));

    // Reloading gives back exactly the saved tensors, and they change the model's output.
    let mut model = load("tiny-llama");
    let (read_cfg, params) = adapter::attach_from_dir(&mut model, &out, None).unwrap();
    assert_eq!(read_cfg, LoraConfig::new(8, 16.0, 0.0, "q,v").unwrap());
    for p in &params {
        assert_eq!(to_vec(p.var.as_tensor()), to_vec(&ours[&p.name]), "{}", p.name);
    }
    let b = batch(&golden_pairs());
    let on = dpo::scoring::response_logps(&model, &b, &mut LoraMode::On).unwrap();
    let off = dpo::scoring::response_logps(&model, &b, &mut LoraMode::Off).unwrap();
    assert!(to_vec(&on).iter().zip(to_vec(&off)).any(|(a, b)| (a - b).abs() > 1e-4), "trained adapter is a no-op");
}

#[test]
fn every_lora_tensor_receives_a_gradient_on_every_target() {
    let mut model = load("tiny-qwen2");
    let cfg = LoraConfig::new(4, 8.0, 0.1, "all").unwrap();
    let (_, params) = adapter::attach_fresh(&mut model, &cfg, 7).unwrap();
    assert_eq!(params.len(), 2 * 7 * 2, "A and B on 7 linears in 2 layers");
    // B starts at zero, which makes A's gradient exactly zero: move B off zero first.
    for p in params.iter().filter(|p| p.name.contains("lora_B")) {
        let noise = Tensor::randn(0f32, 0.1, p.var.shape(), &Device::Cpu).unwrap();
        p.var.set(&noise).unwrap();
    }
    let loss = Task::Preference(Objective::single(LossKind::Sigmoid, 0.1));
    let mut rng = dpo::rng::SeededRng::new(1, dpo::rng::Stream::Dropout);
    let dpo::scoring::Scored { loss: losses, .. } =
        score(&model, &batch(&golden_pairs()[..2]), &loss, &mut LoraMode::Train(&mut rng)).unwrap();
    let grads = losses.mean_all().unwrap().backward().unwrap();
    for p in &params {
        let g = grads.get(&p.var).unwrap_or_else(|| panic!("{} got no gradient: the graph is cut", p.name));
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0, "{} has an all-zero gradient", p.name);
    }
}

#[test]
fn fresh_adapter_is_seeded_and_leaves_the_model_unchanged() {
    let cfg = LoraConfig::new(8, 16.0, 0.0, "q,v").unwrap();
    let (mut a, mut b) = (load("tiny-llama"), load("tiny-llama"));
    let (_, pa) = adapter::attach_fresh(&mut a, &cfg, 3).unwrap();
    let (_, pb) = adapter::attach_fresh(&mut b, &cfg, 3).unwrap();
    for (x, y) in pa.iter().zip(&pb) {
        assert_eq!(to_vec(x.var.as_tensor()), to_vec(y.var.as_tensor()), "same seed, same init");
    }
    let a0 = pa.iter().find(|p| p.name.contains("lora_A")).unwrap();
    let bound = 1.0 / (64f64).sqrt();
    let values = to_vec(a0.var.as_tensor());
    assert!(values.iter().all(|v| v.abs() <= bound) && values.iter().any(|v| v.abs() > bound / 2.0));
    let batch = batch(&golden_pairs()[..2]);
    let on = dpo::scoring::response_logps(&a, &batch, &mut LoraMode::On).unwrap();
    let off = dpo::scoring::response_logps(&a, &batch, &mut LoraMode::Off).unwrap();
    assert_eq!(to_vec(&on), to_vec(&off), "B = 0: policy equals reference at init");
}

#[test]
fn gradient_accumulation_equals_one_big_batch() {
    let base = ["--lr", "1e-2", "--lr-scheduler", "constant", "--no-shuffle", "--max-steps", "3"];
    let one = scratch("accum_one");
    dpo::train::run(&train_args(&one, &[&base[..], &["--batch-size", "4"]].concat()).settings().unwrap()).unwrap();
    let split = scratch("accum_split");
    dpo::train::run(
        &train_args(&split, &[&base[..], &["--batch-size", "2", "--grad-accum", "2"]].concat()).settings().unwrap(),
    )
    .unwrap();
    let (a, b) = (metrics_lines(&one), metrics_lines(&split));
    assert_eq!((a.len(), b.len()), (3, 3), "metrics lines");
    for (x, y) in a.iter().zip(&b) {
        let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!((lx - ly).abs() < 1e-5, "loss {lx} vs {ly}");
        let (gx, gy) = (x["grad_norm"].as_f64().unwrap(), y["grad_norm"].as_f64().unwrap());
        assert!((gx - gy).abs() < 1e-5 * gx.max(1.0), "grad norm {gx} vs {gy}");
    }
    let (wa, wb) = (
        load_safetensors(&one.join("adapter_model.safetensors")),
        load_safetensors(&split.join("adapter_model.safetensors")),
    );
    for (k, t) in &wa {
        assert_close(k, &to_vec(&wb[k]), &to_vec(t), 1e-5);
    }
}

#[test]
fn two_hundred_steps_reach_held_out_reward_accuracy_of_point_nine() {
    let out = scratch("run200");
    let status = Command::new(bin())
        .args(["train", "--config", "configs/quickstart.toml", "--output-dir"])
        .arg(&out)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(metrics_lines(&out).len(), 200);
    let per_pair = out.join("test_pairs.jsonl");
    let output = Command::new(bin())
        .args(["eval", "--model"])
        .arg(model_dir("tiny-llama"))
        .arg("--dataset")
        .arg(orca("test"))
        .arg("--adapter")
        .arg(&out)
        .arg("--output")
        .arg(&per_pair)
        .arg("--json")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let accuracy = summary["rewards/accuracies"].as_f64().unwrap();
    assert!(accuracy >= 0.9, "held-out reward accuracy {accuracy}");
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&per_pair).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 32);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["index"].as_u64().unwrap() as usize, i);
        for key in
            ["policy_chosen_logp", "policy_rejected_logp", "reference_chosen_logp", "reference_rejected_logp", "loss"]
        {
            assert!(l[key].as_f64().unwrap().is_finite(), "{key}");
        }
    }
}

#[test]
fn eval_without_adapter_scores_policy_as_reference() {
    let out = scratch("eval_base");
    let per_pair = out.join("pairs.jsonl");
    let output = Command::new(bin())
        .args(["eval", "--model"])
        .arg(model_dir("tiny-mistral"))
        .arg("--dataset")
        .arg(orca("test"))
        .arg("--output")
        .arg(&per_pair)
        .arg("--json")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!((summary["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6);
    for l in std::fs::read_to_string(&per_pair).unwrap().lines() {
        let l: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(l["policy_chosen_logp"], l["reference_chosen_logp"]);
    }
}

#[test]
fn a_local_dataset_folder_resolves_splits_and_eval_split_scores_held_out_pairs() {
    let folder = fixtures().join("data/orca_dpo_pairs");
    let by_split = scratch("eval_split");
    let o = Command::new(bin())
        .args(["train", "--model"])
        .arg(model_dir("tiny-llama"))
        .arg("--dataset")
        .arg(&folder)
        .args(["--eval-split", "test", "--max-steps", "3", "--output-dir"])
        .arg(&by_split)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("split test: test.jsonl"));
    let by_file = scratch("eval_file");
    let o = Command::new(bin())
        .args(["train", "--model"])
        .arg(model_dir("tiny-llama"))
        .arg("--dataset")
        .arg(orca("train"))
        .arg("--eval-dataset")
        .arg(orca("test"))
        .args(["--max-steps", "3", "--output-dir"])
        .arg(&by_file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let eval = |d: &Path| read_json(&d.join("eval_metrics.json"));
    assert_eq!(eval(&by_split), eval(&by_file), "the folder's test split is test.jsonl");
    assert_eq!(
        std::fs::read(by_split.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(by_file.join("adapter_model.safetensors")).unwrap(),
        "the folder's train split is train.jsonl"
    );
}

#[test]
fn eval_steps_log_a_held_out_curve_without_changing_the_run() {
    let folder = fixtures().join("data/orca_dpo_pairs");
    let run = |out: &Path, extra: &[&str]| {
        let o = Command::new(bin())
            .args(["train", "--model"])
            .arg(model_dir("tiny-llama"))
            .arg("--dataset")
            .arg(&folder)
            .args([
                "--eval-split",
                "test",
                "--max-steps",
                "12",
                "--lr",
                "5e-3",
                "--lora-dropout",
                "0.1",
                "--output-dir",
            ])
            .arg(out)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let plain = scratch("eval_steps_plain");
    run(&plain, &[]);
    let curve = scratch("eval_steps_curve");
    run(&curve, &["--eval-steps", "5"]);
    assert_eq!(metrics_without_timing(&plain), metrics_without_timing(&curve), "evaluating never changes training");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(curve.join("eval_metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<u64> = lines.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![5, 10, 12]);
    let last = read_json(&curve.join("eval_metrics.json"));
    assert_eq!(lines[2]["loss"], last["loss"]);
    assert_eq!(read_json(&plain.join("eval_metrics.json"))["loss"], last["loss"]);
    assert!(lines[0]["loss"].as_f64().unwrap() > lines[2]["loss"].as_f64().unwrap(), "held-out loss falls");
    let o = Command::new(bin()).arg("plot").arg(&curve).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(curve.join("curves.png").is_file());
}

#[test]
fn bf16_compute_path_runs_and_stays_close_to_f32() {
    // The dtype CUDA defaults to, exercised on CPU: base weights and activations in bf16,
    // adapters, log-softmax and loss in f32 (the composite ops, not the fused f32 kernels).
    let eval = |dtype: &str| -> serde_json::Value {
        let o = Command::new(bin())
            .args(["eval", "--model"])
            .arg(model_dir("tiny-llama"))
            .arg("--dataset")
            .arg(orca("test"))
            .arg("--adapter")
            .arg(golden_dir("tiny-llama").join("adapter"))
            .args(["--dtype", dtype, "--json"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let (f32_metrics, bf16_metrics) = (eval("f32"), eval("bf16"));
    for key in ["loss", "logps/chosen", "logps/rejected"] {
        let (a, b) = (f32_metrics[key].as_f64().unwrap(), bf16_metrics[key].as_f64().unwrap());
        assert!((a - b).abs() <= 0.01 * a.abs(), "{key}: f32 {a} vs bf16 {b}");
        assert_ne!(a, b, "{key}: bf16 should not silently run in f32");
    }
}
