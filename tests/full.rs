//! Full fine-tuning (`dpo train --full`, `dpo sft --full`) against the golden 3-step full DPO
//! run (tests/fixtures/golden_stages, `dpo_full`): per-step loss and gradient norm, the
//! weights after 3 steps (the golden README's criteria), a full model folder that loads, the
//! reference computed before step 1, and a bit-identical resume.
mod common;
use common::*;
use std::path::Path;

fn full_golden() -> serde_json::Value {
    read_json(&fixtures().join("golden_stages/golden_stages.json"))["dpo_full"].clone()
}

fn full_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let (model, data, cache) = (model_dir("tiny-llama"), orca("train"), out.join("ref-cache"));
    let base = [
        "train",
        "--full",
        "--model",
        p(&model),
        "--dataset",
        p(&data),
        "--template",
        "orca",
        "--output-dir",
        p(out),
        "--lr",
        "1e-4",
        "--lr-scheduler",
        "constant",
        "--max-grad-norm",
        "0",
        "--weight-decay",
        "0",
        "--batch-size",
        "4",
        "--no-shuffle",
        "--max-steps",
        "3",
        "--beta",
        "0.1",
        "--ref-cache",
        p(&cache),
    ];
    base.iter().chain(extra).map(|s| s.to_string()).collect()
}

#[test]
fn three_full_dpo_steps_match_the_golden_run() {
    let g = full_golden();
    let out = scratch("full_dpo");
    let o = dpo(&full_args(&out, &["--save-steps", "1"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let lines = metrics_without_timing(&out);
    let steps = g["steps"].as_array().unwrap();
    assert_eq!(lines.len(), steps.len(), "metrics lines vs golden steps");
    for (got, want) in lines.iter().zip(steps) {
        let step = got["step"].as_u64().unwrap();
        assert_fixture_close(
            &format!("step {step} loss"),
            got["loss"].as_f64().unwrap(),
            want["loss"].as_f64().unwrap(),
            1e-5,
        );
        assert_fixture_close(
            &format!("step {step} grad_norm"),
            got["grad_norm"].as_f64().unwrap(),
            want["grad_norm"].as_f64().unwrap(),
            1e-5,
        );
        assert_eq!(got["rewards/accuracies"].as_f64(), want["reward_accuracy"].as_f64(), "step {step}");
    }
    // The reference was computed before step 1 for all 12 pairs (12 computed), then only read
    // by the steps (12 reused).
    assert_eq!(ref_cache_counts(&err), (12, 12), "reference cache (reused, computed)");
    // Weights: max |w − w*| ≤ 2e-5 (0.2·lr); per tensor ‖Δw − Δw*‖ ≤ 2e-3·‖Δw*‖; zero updates stay zero.
    let init = load_safetensors(&model_dir("tiny-llama").join("model.safetensors"));
    let want = load_safetensors(&fixtures().join("golden_stages/dpo_full_after_step3.safetensors"));
    let got = load_safetensors(&out.join("model.safetensors"));
    let tied = read_json(&model_dir("tiny-llama").join("config.json"))["tie_word_embeddings"].as_bool() == Some(true);
    assert!(tied || want.contains_key("lm_head.weight"), "the golden weights of an untied model hold lm_head.weight");
    for (name, w) in &want {
        let Some(t) = got.get(name) else {
            // Only a tied lm_head may be absent: it is the embedding.
            assert!(tied && name == "lm_head.weight", "missing {name} (tie_word_embeddings: {tied})");
            continue;
        };
        let (w, t, w0) = (to_vec(w), to_vec(t), to_vec(&init[name]));
        assert_all_close(&format!("{name} after step 3"), &t, &w, Tol::abs(2e-5));
        assert_eq!(w0.len(), w.len(), "{name}: initial and golden sizes");
        let dw_star: Vec<f64> = w.iter().zip(&w0).map(|(a, b)| a - b).collect();
        let dw: Vec<f64> = t.iter().zip(&w0).map(|(a, b)| a - b).collect();
        let norm = dw_star.iter().map(|x| x * x).sum::<f64>().sqrt();
        let diff = dw.iter().zip(&dw_star).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
        assert!(diff <= 2e-3 * norm.max(1e-30), "{name}: update differs by {diff:e} of {norm:e}");
        for (i, (a, b)) in dw.iter().zip(&dw_star).enumerate() {
            if *b == 0.0 {
                assert_eq!(*a, 0.0, "{name}[{i}]: an exactly-zero update moved");
            }
        }
    }
    // The output folder is a model: it loads and scores.
    for f in ["config.json", "tokenizer.json"] {
        assert!(out.join(f).is_file(), "{f} in the output folder");
    }
    let trained = dpo::model::CausalLm::load(
        &out,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        dpo::model::LayerPath::CpuOp,
    )
    .unwrap();
    assert_eq!(trained.arch().num_layers, 2);
    // Resuming from checkpoint-1 reproduces the run bit for bit (the reference from the cache).
    let final_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let final_metrics = metrics_without_timing(&out);
    assert!(
        out.join("checkpoint-1/model.safetensors").is_file()
            && !out.join("checkpoint-1/adapter_model.safetensors").exists()
    );
    let o = dpo(&["train", "--resume", p(&out.join("checkpoint-1"))]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), final_bytes, "resumed model bytes");
    assert_eq!(metrics_without_timing(&out), final_metrics);
}

#[test]
fn full_sft_runs_and_full_refuses_what_it_cannot_do() {
    let out = scratch("full_sft");
    let (model, data) = (model_dir("tiny-llama"), fixtures().join("data/sft/orca_prompt_completion.jsonl"));
    let o = dpo(&[
        "sft",
        "--full",
        "--model",
        p(&model),
        "--dataset",
        p(&data),
        "--output-dir",
        p(&out),
        "--max-steps",
        "2",
        "--lr",
        "1e-4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("model.safetensors").is_file() && !out.join("adapter_model.safetensors").exists());
    assert_eq!(metrics_without_timing(&out).len(), 2);
    // Refusals: with an adapter, with --verify-resume, and a plan larger than the memory budget.
    let o = dpo(&full_args(&scratch("full_refuse"), &["--init-adapter", p(&golden_dir("tiny-llama").join("adapter"))]));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--full") && stderr(&o).contains("--init-adapter"), "{}", stderr(&o));
    let o = dpo(&full_args(&scratch("full_refuse2"), &["--max-memory", "0.001"]));
    assert!(!o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("LoRA instead of --full"), "{}", stderr(&o));
}
