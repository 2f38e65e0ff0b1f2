//! Numbers against the PyTorch / peft / TRL golden values (tests/fixtures/golden).
mod common;
use candle_core::Tensor;
use clap::Parser;
use common::*;
use dpo::loss::{LossKind, Metrics, Objective};
use dpo::nn::LoraMode;
use dpo::scoring::score_batch as score;
use dpo::scoring::{response_logps, split_pairs};
use dpo::task::Task;

const MODELS: &[(&str, &str)] = &[
    ("tiny-llama", "tiny-llama"),
    ("tiny-qwen2", "tiny-qwen2"),
    ("tiny-mistral", "tiny-mistral"),
    // The sharded copy holds the same weights: same golden values.
    ("tiny-llama-sharded", "tiny-llama"),
];

#[test]
fn tokenization_matches_golden_ids() {
    let args = dpo::config::TrainArgs::parse_from([
        "train",
        "--model",
        model_dir("tiny-llama").to_str().unwrap(),
        "--dataset",
        orca("train").to_str().unwrap(),
    ]);
    let loaded = dpo::setup::load_model(&args.common.model).unwrap();
    let data = dpo::setup::load_rows(&args.common, &loaded, &args.settings().unwrap().task).unwrap();
    assert_eq!(data.len(), 64);
    assert_eq!(data.truncated, 0);
    let first8: Vec<_> = (0..8).map(|i| data.get(i).unwrap()).collect();
    assert_eq!(first8, golden_pairs());
}

#[test]
fn response_logps_match_golden_for_every_architecture() {
    let g = golden();
    let batch = batch(&golden_pairs());
    for (model, golden_model) in MODELS {
        let m = &g["models"][golden_model];
        let (model_with_lora, _) = load_with_golden_adapter(model, golden_model);
        let reference = response_logps(&model_with_lora, &batch, &mut LoraMode::Off).unwrap();
        let policy = response_logps(&model_with_lora, &batch, &mut LoraMode::On).unwrap();
        let (rc, rr) = split_pairs(&reference, 8).unwrap();
        let (pc, pr) = split_pairs(&policy, 8).unwrap();
        assert_close(&format!("{model} ref chosen"), &to_vec(&rc), &f64s(&m["ref_logps"]["chosen"]), 1e-4);
        assert_close(&format!("{model} ref rejected"), &to_vec(&rr), &f64s(&m["ref_logps"]["rejected"]), 1e-4);
        assert_close(&format!("{model} policy chosen"), &to_vec(&pc), &f64s(&m["policy_logps"]["chosen"]), 1e-4);
        assert_close(&format!("{model} policy rejected"), &to_vec(&pr), &f64s(&m["policy_logps"]["rejected"]), 1e-4);
        let lens: Vec<f64> = batch.response_tokens.iter().map(|&n| n as f64).collect();
        let want_lens: Vec<f64> =
            [f64s(&m["response_lengths"]["chosen"]), f64s(&m["response_lengths"]["rejected"])].concat();
        assert_eq!(lens, want_lens, "{model} response lengths");
    }
}

#[test]
fn bf16_stored_weights_upcast_to_f32_match_golden() {
    let want = read_json(&fixtures().join("golden/tiny-llama-bf16.json"));
    let model = load("tiny-llama-bf16");
    let logps = response_logps(&model, &batch(&golden_pairs()), &mut LoraMode::Off).unwrap();
    let (c, r) = split_pairs(&logps, 8).unwrap();
    assert_close("bf16 ref chosen", &to_vec(&c), &f64s(&want["ref_logps"]["chosen"]), 1e-4);
    assert_close("bf16 ref rejected", &to_vec(&r), &f64s(&want["ref_logps"]["rejected"]), 1e-4);
}

#[test]
fn all_position_logits_match_golden_debug_values() {
    let g = golden();
    let m = &g["models"]["tiny-llama"]["debug_logits_base"];
    let pair = &golden_pairs()[0];
    let ids: Vec<u32> = pair.prompt.iter().chain(&pair.chosen).copied().collect();
    let ids = Tensor::new(ids.as_slice(), &candle_core::Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = load("tiny-llama").logits(&ids, &mut LoraMode::Off).unwrap().squeeze(0).unwrap();
    let t = logits.dim(0).unwrap();
    let first8 = |row: usize| to_vec(&logits.get(row).unwrap().narrow(0, 0, 8).unwrap());
    assert_close("logits pos 0", &first8(0), &f64s(&m["pos0_first8"]), 1e-4);
    assert_close("logits last pos", &first8(t - 1), &f64s(&m["last_pos_first8"]), 1e-4);
}

#[test]
fn losses_and_metrics_match_golden() {
    let g = golden();
    let batch = batch(&golden_pairs());
    let kinds = [
        ("sigmoid", LossKind::Sigmoid, 0.0),
        ("ipo", LossKind::Ipo, 0.0),
        ("hinge", LossKind::Hinge, 0.0),
        ("cdpo_sigmoid_ls0.1", LossKind::Sigmoid, 0.1),
    ];
    for (model, golden_model) in MODELS {
        let m = &g["models"][golden_model];
        let (model, _) = load_with_golden_adapter(model, golden_model);
        for (name, kind, ls) in kinds {
            let mut objective = Objective::single(kind, 0.1);
            objective.params.label_smoothing = ls;
            let task = Task::Preference(objective.clone());
            let scored = score(&model, &batch, &task, &mut LoraMode::On).unwrap();
            let want = &m["losses"][name];
            let per_pair = objective.per_pair(&scored.logps, None).unwrap().expect("a loss per pair");
            let want_pairs = f64s(&want["per_pair"]);
            assert_eq!(per_pair.len(), want_pairs.len(), "{golden_model} {name}: per-pair losses");
            for (i, (got, want)) in per_pair.iter().zip(want_pairs).enumerate() {
                assert_rel(&format!("{golden_model} {name} pair {i}"), *got, want, 1e-5);
            }
            let metrics = Metrics::mean(&[scored.collect(&task, &batch, false).unwrap()]);
            assert_rel(&format!("{golden_model} {name} mean"), metrics.loss, want["mean"].as_f64().unwrap(), 1e-5);
            if name == "sigmoid" {
                let gm = &m["metrics"];
                let check = |key: &str, got: f64| {
                    assert_fixture_close(&format!("{golden_model} {key}"), got, gm[key].as_f64().unwrap(), 1e-5);
                };
                let metrics = metrics.pairwise.as_ref().expect("pair metrics");
                check("rewards/chosen", metrics.rewards_chosen);
                check("rewards/rejected", metrics.rewards_rejected);
                check("rewards/accuracies", metrics.rewards_accuracies);
                check("rewards/margins", metrics.rewards_margins);
                check("logps/chosen", metrics.logps_chosen);
                check("logps/rejected", metrics.logps_rejected);
            }
        }
    }
}

#[test]
fn lora_gradients_of_mean_sigmoid_loss_match_golden() {
    let batch = batch(&golden_pairs());
    for (model, golden_model) in MODELS {
        let (model, params) = load_with_golden_adapter(model, golden_model);
        let loss = Task::Preference(Objective::single(LossKind::Sigmoid, 0.1));
        let dpo::scoring::Scored { loss: losses, .. } = score(&model, &batch, &loss, &mut LoraMode::On).unwrap();
        let grads = losses.mean_all().unwrap().backward().unwrap();
        let want = load_safetensors(&golden_dir(golden_model).join("grads_sigmoid_mean.safetensors"));
        assert_eq!(want.len(), params.len(), "{golden_model}: one golden gradient per LoRA tensor");
        for p in &params {
            let got = to_vec(grads.get(&p.var).unwrap_or_else(|| panic!("{}: no gradient", p.name)));
            norm_close(&got, &to_vec(&want[&p.name]), 1e-4)
                .unwrap_or_else(|e| panic!("{golden_model} {}: {e}", p.name));
        }
    }
}
