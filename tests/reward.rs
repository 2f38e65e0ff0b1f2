//! The reward model (`dpo reward train|score`) against TRL 1.16's RewardTrainer
//! (tests/fixtures/golden_stages): per-pair rewards read at the last token, the batch loss,
//! metrics and gradients (LoRA and the score head), the 5-step run, and the saved adapter in
//! peft's sequence-classification layout.
mod common;
use common::*;
use dpo::lora::AdapterTask;
use dpo::lora::adapter;
use dpo::loss::Metrics;
use dpo::nn::LoraMode;
use dpo::task::Task;
use std::path::PathBuf;

fn reward() -> serde_json::Value {
    read_json(&fixtures().join("golden_stages/golden_stages.json"))["reward"].clone()
}

fn rm_init() -> PathBuf {
    fixtures().join("golden_stages/rm_init_adapter")
}

#[test]
fn rewards_loss_metrics_and_gradients_match_trl() {
    let g = reward();
    let mut model = load("tiny-llama");
    let (cfg, mut params) = adapter::attach_from_dir(&mut model, &rm_init(), None).unwrap();
    assert_eq!(cfg.task_type, AdapterTask::SequenceClassification, "SEQ_CLS adapter");
    params.push(adapter::attach_score_head(&mut model, Some(&rm_init()), 0).unwrap());
    let pairs = golden_pairs();
    for (i, p) in g["pairs"].as_array().unwrap().iter().enumerate() {
        let ids =
            |k: &str| -> Vec<u32> { p[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
        assert_eq!(
            [pairs[i].prompt.clone(), pairs[i].chosen.clone()].concat(),
            ids("chosen_ids"),
            "pair {i}: TRL's chosen sequence"
        );
        assert_eq!(
            [pairs[i].prompt.clone(), pairs[i].rejected.clone()].concat(),
            ids("rejected_ids"),
            "pair {i}: TRL's rejected sequence"
        );
    }
    let task = Task::Reward;
    let batch = batch(&pairs);
    // A delta: the counter is per thread and other code on this thread may have run before.
    let before = dpo::scoring::reference_forwards();
    let scored = dpo::scoring::score_batch(&model, &batch, &task, &mut LoraMode::On).unwrap();
    assert_eq!(dpo::scoring::reference_forwards() - before, 0, "a reward model has no reference");
    let (rc, rr) = (to_vec(&scored.logps.policy_chosen), to_vec(&scored.logps.policy_rejected));
    let per_pair = task.per_pair_losses(&scored.logps, None).unwrap().unwrap();
    let n = g["pairs"].as_array().unwrap().len();
    assert_eq!((rc.len(), rr.len(), per_pair.len()), (n, n, n), "rewards and losses per golden pair");
    for (i, p) in g["pairs"].as_array().unwrap().iter().enumerate() {
        assert_fixture_close(&format!("pair {i} r_chosen"), rc[i], p["reward_chosen"].as_f64().unwrap(), 1e-5);
        assert_fixture_close(&format!("pair {i} r_rejected"), rr[i], p["reward_rejected"].as_f64().unwrap(), 1e-5);
        assert_fixture_close(&format!("pair {i} loss"), per_pair[i], p["loss"].as_f64().unwrap(), 1e-5);
    }
    let loss = scored.loss.to_scalar::<f32>().unwrap() as f64;
    assert_fixture_close("batch loss", loss, g["batch8"]["loss"].as_f64().unwrap(), 1e-5);
    let metrics = Metrics::mean(&[scored.collect(&task, &batch, false).unwrap()]);
    for (key, want) in g["batch8"]["metrics"].as_object().unwrap() {
        assert_fixture_close(&format!("metric {key}"), metrics.extra[key], want.as_f64().unwrap(), 1e-5);
    }
    let grads = scored.loss.backward().unwrap();
    let golden = load_safetensors(&fixtures().join("golden_stages/rm_grads.safetensors"));
    assert_eq!(golden.len(), params.len(), "LoRA tensors and the score head");
    for p in &params {
        norm_close(&to_vec(grads.get(&p.var).unwrap()), &to_vec(&golden[&p.name]), 1e-4)
            .unwrap_or_else(|e| panic!("{}: {e}", p.name));
    }
}

#[test]
fn five_step_reward_training_matches_trl_and_saves_a_peft_seq_cls_adapter_that_scores() {
    let g = reward();
    let out = scratch("reward_run");
    let (model, data) = (model_dir("tiny-llama"), orca("train"));
    let o = dpo(&[
        "reward",
        "train",
        "--model",
        p(&model),
        "--dataset",
        p(&data),
        "--template",
        "orca",
        "--output-dir",
        p(&out),
        "--init-adapter",
        p(&rm_init()),
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
        "--save-steps",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = metrics_without_timing(&out);
    let steps = g["train"]["steps"].as_array().unwrap();
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
            1e-4,
        );
        assert_eq!(got["accuracy"].as_f64(), want["accuracy"].as_f64(), "step {step} accuracy");
    }
    // Weights after 5 steps, and the file peft's save_pretrained wrote: same keys and values.
    let trained = load_safetensors(&out.join("adapter_model.safetensors"));
    let peft_saved =
        load_safetensors(&fixtures().join("golden_stages/rm_adapter_after_step5/adapter_model.safetensors"));
    let want = load_safetensors(&fixtures().join("golden_stages/rm_after_step5.safetensors"));
    let mut keys: Vec<&String> = trained.keys().collect();
    let mut peft_keys: Vec<&String> = peft_saved.keys().collect();
    keys.sort();
    peft_keys.sort();
    assert_eq!(keys, peft_keys, "the tensors peft saves for a SEQ_CLS adapter");
    for (k, w) in &want {
        assert_close(k, &to_vec(&trained[k]), &to_vec(w), 1e-4);
    }
    let config = read_json(&out.join("adapter_config.json"));
    assert_eq!(config["task_type"], "SEQ_CLS");
    assert!(config["modules_to_save"].as_array().unwrap().iter().any(|m| m == "score"), "{config}");
    // `dpo reward score` with the initial adapter gives TRL's per-pair rewards.
    let first8 = out.join("first8.jsonl");
    std::fs::write(
        &first8,
        std::fs::read_to_string(&data).unwrap().lines().take(8).map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    let scores = out.join("scores.jsonl");
    let o = dpo(&[
        "reward",
        "score",
        "--model",
        p(&model),
        "--dataset",
        p(&first8),
        "--template",
        "orca",
        "--adapter",
        p(&rm_init()),
        "--output",
        p(&scores),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_fixture_close("score loss", summary["loss"].as_f64().unwrap(), g["batch8"]["loss"].as_f64().unwrap(), 1e-5);
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&scores).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let pairs = g["pairs"].as_array().unwrap();
    assert_eq!(lines.len(), pairs.len(), "one score line per golden pair");
    for (line, p) in lines.iter().zip(pairs) {
        assert_fixture_close(
            "reward_chosen",
            line["reward_chosen"].as_f64().unwrap(),
            p["reward_chosen"].as_f64().unwrap(),
            1e-5,
        );
        assert_fixture_close(
            "reward_rejected",
            line["reward_rejected"].as_f64().unwrap(),
            p["reward_rejected"].as_f64().unwrap(),
            1e-5,
        );
    }
    // Resuming from the step-4 checkpoint reproduces the run (score head included).
    let o = dpo(&["reward", "train", "--resume", p(&out.join("checkpoint-4"))]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(load_safetensors(&out.join("adapter_model.safetensors")).keys().len(), trained.len());
    assert_eq!(
        to_vec(&load_safetensors(&out.join("adapter_model.safetensors"))[adapter::SCORE_KEY]),
        to_vec(&trained[adapter::SCORE_KEY])
    );
    // A reward model's adapter is refused by DPO training; scoring needs an adapter with a head.
    let o = dpo(&[
        "train",
        "--model",
        p(&model),
        "--dataset",
        p(&data),
        "--output-dir",
        p(&out.join("dpo")),
        "--init-adapter",
        p(&rm_init()),
        "--max-steps",
        "1",
    ]);
    assert!(!o.status.success() && stderr(&o).contains("SEQ_CLS"), "{}", stderr(&o));
    let o = dpo(&[
        "reward",
        "score",
        "--model",
        p(&model),
        "--dataset",
        p(&first8),
        "--adapter",
        p(&golden_dir("tiny-llama").join("adapter")),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("score"), "{}", stderr(&o));
}
