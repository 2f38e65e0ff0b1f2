//! Supervised fine-tuning (`dpo sft`) against TRL 1.16's SFTTrainer (tests/fixtures/golden_stages):
//! token ids and loss masks, the batch-of-8 loss, metrics and LoRA gradients, the 5-step runs,
//! and a SIGKILLed run resumed bit-identically.
mod common;
use common::*;
use dpo::data::TokenizedPair;
use dpo::data::pipeline::{Pipeline, Settings};
use dpo::loss::Metrics;
use dpo::nn::LoraMode;
use dpo::task::Task;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn stages() -> serde_json::Value {
    read_json(&fixtures().join("golden_stages/golden_stages.json"))
}

/// The golden datasets: TRL's prompt/completion rows (orca strings; conversational chat), and the
/// same chat rows as `messages` lists.
const DATASETS: [(&str, &str, &str); 3] = [
    ("orca_prompt_completion", "orca_prompt_completion.jsonl", "sft_orca"),
    ("chat_prompt_completion", "chat_prompt_completion.jsonl", "sft_chat"),
    ("chat_prompt_completion", "chat_messages.jsonl", "sft_chat"),
];

fn sft_data(file: &str) -> PathBuf {
    fixtures().join("data/sft").join(file)
}

fn completions(file: &str) -> Vec<TokenizedPair> {
    let dir = model_dir("tiny-llama");
    let tok = dpo::data::PairTokenizer::from_model_dir(&dir).unwrap();
    let (p, audit) = Pipeline::build(
        &[sft_data(file)],
        Settings { rows: dpo::data::Rows::Completions, ..Settings::default() },
        tok,
        &dir,
    )
    .unwrap();
    assert_eq!(audit.rows_skipped, 0, "{file}: {:?}", audit.skipped);
    (0..p.len()).map(|i| p.pair(i).unwrap()).collect()
}

#[test]
fn token_ids_and_loss_masks_match_trl() {
    let g = stages();
    for (name, file, _) in DATASETS {
        let examples = g["sft"][name]["examples"].as_array().unwrap();
        let got = completions(file);
        for (i, e) in examples.iter().enumerate() {
            let ids: Vec<u32> = e["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            let start = e["completion_start"].as_u64().unwrap() as usize;
            assert_eq!(got[i].prompt, ids[..start], "{file} row {i}: prompt ids");
            assert_eq!(got[i].chosen, ids[start..], "{file} row {i}: completion ids (the trained tokens)");
            assert!(got[i].rejected.is_empty());
        }
    }
}

#[test]
fn batch_loss_metrics_and_gradients_match_trl() {
    let g = stages();
    let (model, params) = load_with_golden_adapter("tiny-llama", "tiny-llama");
    // The stages' initial LoRA is the golden adapter.
    let init = load_safetensors(&fixtures().join("golden_stages/lora_init.safetensors"));
    for p in &params {
        assert_eq!(to_vec(&p.var), to_vec(&init[&p.name]), "{}", p.name);
    }
    let task = Task::Sft;
    for (name, file, grads_prefix) in DATASETS {
        let want = &g["sft"][name]["batch8"];
        let pairs = &completions(file)[..8];
        let batch = batch(pairs);
        let before = dpo::scoring::reference_forwards();
        let scored = dpo::scoring::score_batch(&model, &batch, &task, &mut LoraMode::On).unwrap();
        assert_eq!(dpo::scoring::reference_forwards() - before, 0, "SFT runs no reference forward");
        let loss = scored.loss.to_scalar::<f32>().unwrap() as f64;
        assert_fixture_close(&format!("{file} loss"), loss, want["loss"].as_f64().unwrap(), 1e-5);
        let metrics = Metrics::mean(&[scored.collect(&task, &batch, false).unwrap()]);
        assert!(metrics.pairwise.is_none(), "no rewards for SFT");
        for key in ["entropy", "mean_token_accuracy"] {
            assert_fixture_close(
                &format!("{file} {key}"),
                metrics.extra[key],
                want["metrics"][key].as_f64().unwrap(),
                1e-5,
            );
        }
        assert_eq!(metrics.extra.len(), 2, "{file}: SFT logs entropy and mean_token_accuracy: {:?}", metrics.extra);
        let grads = scored.loss.backward().unwrap();
        let golden = load_safetensors(&fixtures().join(format!("golden_stages/{grads_prefix}_grads.safetensors")));
        for p in &params {
            let got = to_vec(grads.get(&p.var).unwrap());
            norm_close(&got, &to_vec(&golden[&p.name]), 1e-4).unwrap_or_else(|e| panic!("{file} {}: {e}", p.name));
        }
    }
}

fn sft_args(out: &Path, file: &str, extra: &[&str]) -> Vec<String> {
    let (adapter, model, data) = (golden_dir("tiny-llama").join("adapter"), model_dir("tiny-llama"), sft_data(file));
    let base = [
        "sft",
        "--model",
        p(&model),
        "--dataset",
        p(&data),
        "--output-dir",
        p(out),
        "--init-adapter",
        p(&adapter),
        "--lr",
        "0.005",
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
        "5",
    ];
    base.iter().chain(extra).map(|s| s.to_string()).collect()
}

#[test]
fn five_step_runs_match_trl_losses_grad_norms_and_weights() {
    let g = stages();
    for (name, file, prefix) in DATASETS {
        let out = scratch(&format!("sft_run_{file}"));
        let o = dpo(&sft_args(&out, file, &[]));
        assert!(o.status.success(), "{file}: {}", stderr(&o));
        let lines = metrics_without_timing(&out);
        let steps = g["sft"][name]["train"]["steps"].as_array().unwrap();
        assert_eq!(lines.len(), steps.len());
        for (got, want) in lines.iter().zip(steps) {
            let step = got["step"].as_u64().unwrap();
            assert_fixture_close(
                &format!("{file} step {step} loss"),
                got["loss"].as_f64().unwrap(),
                want["loss"].as_f64().unwrap(),
                1e-5,
            );
            assert_fixture_close(
                &format!("{file} step {step} grad_norm"),
                got["grad_norm"].as_f64().unwrap(),
                want["grad_norm"].as_f64().unwrap(),
                1e-4,
            );
            assert!(got.get("rewards/accuracies").is_none(), "{file}: no rewards in SFT metrics");
            assert!(got["entropy"].is_number() && got["mean_token_accuracy"].is_number(), "{file}: {got}");
        }
        let trained = load_safetensors(&out.join("adapter_model.safetensors"));
        let want = load_safetensors(&fixtures().join(format!("golden_stages/{prefix}_lora_after_step5.safetensors")));
        assert_eq!(trained.len(), want.len());
        for (k, w) in &want {
            assert_close(&format!("{file} {k}"), &to_vec(&trained[k]), &to_vec(w), 1e-4);
        }
    }
}

#[test]
fn sft_refuses_preference_flags_and_pair_data_and_train_refuses_completions() {
    let out = scratch("sft_refusals");
    let o = dpo(&sft_args(&out, "orca_prompt_completion.jsonl", &["--loss", "ipo"]));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--loss"), "{}", stderr(&o));
    let mut pairs = sft_args(&out, "orca_prompt_completion.jsonl", &[]);
    pairs[4] = p(&orca("train")).to_string();
    let o = dpo(&pairs);
    assert!(!o.status.success() && stderr(&o).contains("prompt-completion"), "{}", stderr(&o));
    let o = dpo(&[
        "train",
        "--model",
        p(&model_dir("tiny-llama")),
        "--dataset",
        p(&sft_data("orca_prompt_completion.jsonl")),
        "--format",
        "prompt-completion",
        "--output-dir",
        p(&out),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("dpo sft"), "{}", stderr(&o));
}

/// SIGKILL `dpo sft` at pseudo-random instants; each resumed run ends bit-identical to the
/// uninterrupted one.
#[test]
fn sigkilled_sft_resumes_bit_identically() {
    let extra =
        ["--max-steps", "10", "--batch-size", "2", "--save-steps", "1", "--lora-dropout", "0.05", "--seed", "3"];
    let reference = scratch("sft_kill_reference");
    let started = Instant::now();
    let (status, err) = dpo_bounded("the uninterrupted run", &sft_args(&reference, "chat_messages.jsonl", &extra));
    assert!(status.success(), "{err}");
    let full = started.elapsed().as_millis() as u64;
    let want_adapter = std::fs::read(reference.join("adapter_model.safetensors")).unwrap();
    let want_metrics = metrics_without_timing(&reference);
    let mut resumed = 0;
    for trial in 0..6u64 {
        let out = scratch(&format!("sft_kill_{trial}"));
        let mut child = Running::spawn(&mut dpo_command(&sft_args(&out, "chat_messages.jsonl", &extra)));
        match child.run_for(Duration::from_millis((trial * 2 + 1) * full / 13)) {
            // Finished before the kill: it must have succeeded.
            Some(status) => assert!(status.success(), "trial {trial}: dpo sft failed on its own: {}", child.stderr()),
            None => child.kill(),
        }
        if out.join("adapter_model.safetensors").exists() {
            continue;
        }
        let resume: Vec<String> = if dpo::checkpoint::list(&out).unwrap().is_empty() {
            [sft_args(&out, "chat_messages.jsonl", &extra), vec!["--overwrite-output-dir".into()]].concat()
        } else {
            resumed += 1;
            vec!["sft".into(), "--resume".into(), p(&out).into()]
        };
        let (status, err) = dpo_bounded(&format!("trial {trial}'s resumed run"), &resume);
        assert!(status.success(), "trial {trial}: {err}");
        assert_eq!(
            std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
            want_adapter,
            "trial {trial}: adapter bytes"
        );
        assert_eq!(metrics_without_timing(&out), want_metrics, "trial {trial}: metrics");
    }
    assert!(resumed >= 2, "only {resumed} trials resumed from a checkpoint");
}
