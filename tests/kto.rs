//! KTO (`dpo train --loss kto`) against TRL 1.16's KTOTrainer (tests/fixtures/golden_stages):
//! the unpaired examples and their mismatched (KL) completions, per-example log-probs, the
//! batch loss, metrics and LoRA gradients; preference pairs converted on the fly and native
//! unpaired rows agree; a one-step CLI run logs TRL's loss and gradient norm.
mod common;
use clap::Parser;
use common::*;
use dpo::loss::Metrics;
use dpo::nn::LoraMode;
use std::path::{Path, PathBuf};

fn kto() -> serde_json::Value {
    read_json(&fixtures().join("golden_stages/golden_stages.json"))["kto"].clone()
}

/// Orca rows 0–3 as preference pairs, and the same 8 examples as unpaired rows.
fn data_files(dir: &Path) -> (PathBuf, PathBuf) {
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(orca("train"))
        .unwrap()
        .lines()
        .take(4)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let paired = dir.join("pairs.jsonl");
    std::fs::write(&paired, rows.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
    let unpaired = dir.join("unpaired.jsonl");
    let mut text = String::new();
    for r in &rows {
        let system = r["system"].as_str().unwrap();
        let prompt = format!(
            "{}### User:\n{}\n\n### Assistant:\n",
            if system.is_empty() { String::new() } else { format!("### System:\n{system}\n\n") },
            r["question"].as_str().unwrap()
        );
        for (key, label) in [("chosen", true), ("rejected", false)] {
            text.push_str(&format!(
                "{}\n",
                serde_json::json!({"prompt": prompt, "completion": r[key], "label": label})
            ));
        }
    }
    std::fs::write(&unpaired, text).unwrap();
    (paired, unpaired)
}

fn args(data: &Path, out: &Path) -> dpo::config::TrainArgs {
    let model = model_dir("tiny-llama");
    dpo::config::TrainArgs::try_parse_from([
        "train",
        "--model",
        p(&model),
        "--dataset",
        p(data),
        "--output-dir",
        p(out),
        "--loss",
        "kto",
        "--beta",
        "0.1",
    ])
    .unwrap()
}

#[test]
fn kto_batch_matches_trl_examples_loss_metrics_and_gradients() {
    let g = kto();
    let dir = scratch("kto_lib");
    let (paired, unpaired) = data_files(&dir);
    let (model, params) = load_with_golden_adapter("tiny-llama", "tiny-llama");
    let mut losses = Vec::new();
    for data in [&paired, &unpaired] {
        let a = args(data, &dir);
        let task = a.settings().unwrap().task;
        let loaded = dpo::setup::load_model(&a.common.model).unwrap();
        let dataset = dpo::setup::load_rows(&a.common, &loaded, &task).unwrap();
        assert_eq!(dataset.len(), 8, "{}: 8 examples", data.display());
        let indices: Vec<usize> = (0..8).collect();
        let (pairs, batch) =
            dpo::scoring::micro_batches(&dataset, &indices, 8, 3, model.device(), &task).next().unwrap().unwrap();
        // The examples, labels and KL completions TRL builds.
        for (i, e) in g["examples"].as_array().unwrap().iter().enumerate() {
            let ids =
                |k: &str| -> Vec<u32> { e[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
            assert_eq!(pairs[i].prompt, ids("prompt_ids"), "example {i} prompt");
            assert_eq!(pairs[i].chosen, ids("completion_ids"), "example {i} completion");
            assert_eq!(pairs[i].rejected, ids("KL_completion_ids"), "example {i} KL completion");
            assert_eq!(batch.labels.as_ref().unwrap()[i], e["label"].as_bool().unwrap(), "example {i} label");
        }
        let scored = dpo::scoring::score_batch(&model, &batch, &task, &mut LoraMode::On).unwrap();
        let l = &scored.logps;
        for (i, e) in g["examples"].as_array().unwrap().iter().enumerate() {
            for (what, t, key) in [
                ("policy", &l.policy_chosen, "policy_logp"),
                ("reference", &l.ref_chosen, "ref_logp"),
                ("KL policy", &l.policy_rejected, "KL_policy_logp"),
                ("KL reference", &l.ref_rejected, "KL_ref_logp"),
            ] {
                assert_fixture_close(&format!("example {i} {what}"), to_vec(t)[i], e[key].as_f64().unwrap(), 1e-5);
            }
        }
        let loss = scored.loss.to_scalar::<f32>().unwrap() as f64;
        assert_fixture_close("kto batch loss", loss, g["batch8"]["loss"].as_f64().unwrap(), 1e-5);
        losses.push(loss);
        let metrics = Metrics::mean(&[scored.collect(&task, &batch, false).unwrap()]);
        assert!(metrics.pairwise.is_none());
        for (key, want) in g["batch8"]["metrics"].as_object().unwrap() {
            let got =
                metrics.extra.get(key).unwrap_or_else(|| panic!("metric {key} is not logged: {:?}", metrics.extra));
            assert_fixture_close(&format!("metric {key}"), *got, want.as_f64().unwrap(), 1e-5);
        }
        let grads = scored.loss.backward().unwrap();
        let golden = load_safetensors(&fixtures().join("golden_stages/kto_grads.safetensors"));
        for p in &params {
            norm_close(&to_vec(grads.get(&p.var).unwrap()), &to_vec(&golden[&p.name]), 1e-4)
                .unwrap_or_else(|e| panic!("{}: {e}", p.name));
        }
    }
    assert_eq!(losses[0], losses[1], "pairs converted on the fly = the same unpaired rows");
}

#[test]
fn one_step_kto_train_logs_trl_loss_and_grad_norm_and_unpaired_rows_need_kto() {
    let g = kto();
    let dir = scratch("kto_cli");
    let (paired, unpaired) = data_files(&dir);
    let out = dir.join("run");
    let adapter = golden_dir("tiny-llama").join("adapter");
    let o = dpo(&[
        "train",
        "--model",
        p(&model_dir("tiny-llama")),
        "--dataset",
        p(&paired),
        "--output-dir",
        p(&out),
        "--loss",
        "kto",
        "--init-adapter",
        p(&adapter),
        "--batch-size",
        "8",
        "--max-steps",
        "1",
        "--max-grad-norm",
        "0",
        "--no-shuffle",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let step = &metrics_without_timing(&out)[0];
    assert_fixture_close("loss", step["loss"].as_f64().unwrap(), g["batch8"]["loss"].as_f64().unwrap(), 1e-5);
    assert_fixture_close(
        "grad_norm",
        step["grad_norm"].as_f64().unwrap(),
        g["batch8"]["grad_total_norm"].as_f64().unwrap(),
        1e-4,
    );
    assert!(step["kl"].is_number() && step.get("rewards/accuracies").is_none(), "{step}");
    // Unpaired rows without --loss kto, and kto mixed with another loss, are refused.
    let o = dpo(&[
        "train",
        "--model",
        p(&model_dir("tiny-llama")),
        "--dataset",
        p(&unpaired),
        "--output-dir",
        p(&dir.join("x")),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("--loss kto"), "{}", stderr(&o));
    let o = dpo(&[
        "train",
        "--model",
        p(&model_dir("tiny-llama")),
        "--dataset",
        p(&paired),
        "--output-dir",
        p(&dir.join("y")),
        "--loss",
        "kto,sigmoid",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// A KTO run checkpoints and resumes bit-identically (shuffled, with LoRA dropout).
#[test]
fn kto_run_resumes_from_a_checkpoint_bit_identically() {
    let out = scratch("kto_resume");
    let (model, data) = (model_dir("tiny-llama"), orca("train"));
    let run = [
        "train",
        "--loss",
        "kto",
        "--model",
        p(&model),
        "--dataset",
        p(&data),
        "--output-dir",
        p(&out),
        "--max-steps",
        "4",
        "--save-steps",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "5e-3",
        "--lora-dropout",
        "0.1",
        "--seed",
        "9",
    ];
    let o = dpo(&run);
    assert!(o.status.success(), "{}", stderr(&o));
    let (adapter, metrics) =
        (std::fs::read(out.join("adapter_model.safetensors")).unwrap(), metrics_without_timing(&out));
    assert_eq!(metrics.len(), 4);
    let o = dpo(&["train", "--resume", p(&out.join("checkpoint-2"))]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("adapter_model.safetensors")).unwrap(), adapter, "adapter bytes after resuming");
    assert_eq!(metrics_without_timing(&out), metrics);
}
