//! The optimised path (prefix-shared packed rows, response-only logits, fused CPU kernels)
//! gives the same log-probs and gradients as the plain path (one row per sequence,
//! composite candle ops), on every architecture, with padding and a sliding window.
mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use dpo::data::{PairBatch, TokenizedPair};
use dpo::loss::{LossKind, Objective};
use dpo::model::{Architecture, CausalLm, LayerPath};
use dpo::nn::LoraMode;
use dpo::scoring::score_batch as score;
use dpo::task::Task;

fn with_sliding_window(model: &str, window: usize) -> CausalLm {
    let dir = model_dir(model);
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["sliding_window"] = window.into();
    let cfg = Architecture::from_json(&cfg.to_string()).unwrap();
    let vb = dpo::model::weights::mmap_weights(&dir, DType::F32, &Device::Cpu).unwrap();
    CausalLm::from_weights(cfg, vb, DType::F32, &Device::Cpu, LayerPath::CpuOp).unwrap()
}

/// Log-probs and every LoRA gradient of the mean sigmoid loss.
fn logps_and_grads(
    model: &CausalLm,
    params: &[dpo::lora::adapter::NamedParam],
    batch: &PairBatch,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let loss = Task::Preference(Objective::single(LossKind::Sigmoid, 0.1));
    let dpo::scoring::Scored { logps, loss: losses, .. } = score(model, batch, &loss, &mut LoraMode::On).unwrap();
    let grads = losses.mean_all().unwrap().backward().unwrap();
    let all = Tensor::cat(&[&logps.policy_chosen, &logps.policy_rejected, &logps.ref_chosen, &logps.ref_rejected], 0)
        .unwrap();
    (to_vec(&all), params.iter().map(|p| to_vec(grads.get(&p.var).unwrap())).collect())
}

fn compare(what: &str, mut model: CausalLm, params: Vec<dpo::lora::adapter::NamedParam>, pairs: &[TokenizedPair]) {
    let fast = logps_and_grads(&model, &params, &PairBatch::new(pairs, 3, &Device::Cpu).unwrap());
    model = model.on_path(LayerPath::Generic);
    let plain = logps_and_grads(&model, &params, &PairBatch::unshared(pairs, 3, &Device::Cpu).unwrap());
    assert_close(&format!("{what} logps"), &fast.0, &plain.0, 1e-4);
    for ((g_fast, g_plain), p) in fast.1.iter().zip(&plain.1).zip(&params) {
        norm_close(g_fast, g_plain, 1e-4).unwrap_or_else(|e| panic!("{what} {}: {e}", p.name));
    }
}

#[test]
fn packed_fused_path_equals_plain_path() {
    // Pairs of different lengths, so rows carry padding in both layouts.
    let pairs = golden_pairs();
    for (model, golden_model) in
        [("tiny-llama", "tiny-llama"), ("tiny-qwen2", "tiny-qwen2"), ("tiny-mistral", "tiny-mistral")]
    {
        let (m, params) = load_with_golden_adapter(model, golden_model);
        compare(model, m, params, &pairs);
    }
}

#[test]
fn sliding_window_is_counted_in_positions_when_prompts_are_shared() {
    let mut model = with_sliding_window("tiny-mistral", 8);
    let (_, params) =
        dpo::lora::adapter::attach_from_dir(&mut model, &golden_dir("tiny-mistral").join("adapter"), None).unwrap();
    compare("mistral window 8", model, params, &golden_pairs()[..4]);
    // And the window really changes the numbers (it is not silently ignored).
    let full = load("tiny-mistral");
    let windowed = with_sliding_window("tiny-mistral", 8);
    let batch = batch(&golden_pairs()[..2]);
    let a = to_vec(&dpo::scoring::response_logps(&full, &batch, &mut LoraMode::Off).unwrap());
    let b = to_vec(&dpo::scoring::response_logps(&windowed, &batch, &mut LoraMode::Off).unwrap());
    assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-3));
}

/// The CPU layer op draws LoRA dropout masks in the same order as the composite layer, so with
/// the same seed both paths give the same log-probs and gradients (same packed batch), with
/// adapters on all seven linears (B randomised so every path carries signal).
#[test]
fn lora_dropout_on_all_targets_is_the_same_on_the_cpu_layer_op_and_the_composite_layer() {
    use dpo::rng::{SeededRng, Stream};
    let pairs = golden_pairs();
    let batch = batch(&pairs[..4]);
    let mut model = load("tiny-qwen2");
    let cfg = dpo::lora::LoraConfig::new(4, 8.0, 0.3, "all").unwrap();
    let (_, params) = dpo::lora::adapter::attach_fresh(&mut model, &cfg, 3).unwrap();
    assert_eq!(params.len(), 2 * 7 * 2, "A and B on 7 linears of 2 layers");
    for p in params.iter().filter(|p| p.name.contains("lora_B")) {
        let t = p.var.as_tensor();
        p.var.set(&Tensor::randn(0f32, 0.05, t.shape(), &Device::Cpu).unwrap()).unwrap();
    }
    let loss = Task::Preference(Objective::single(LossKind::Sigmoid, 0.1));
    let run = |model: &CausalLm| {
        let mut rng = SeededRng::new(11, Stream::Dropout);
        let dpo::scoring::Scored { logps, loss: losses, .. } =
            score(model, &batch, &loss, &mut LoraMode::Train(&mut rng)).unwrap();
        let grads = losses.mean_all().unwrap().backward().unwrap();
        let g: Vec<Vec<f64>> = params.iter().map(|p| to_vec(grads.get(&p.var).unwrap())).collect();
        (to_vec(&logps.policy_chosen), g)
    };
    let fast = run(&model);
    model = model.on_path(LayerPath::Generic);
    let plain = run(&model);
    assert_close("dropout logps", &fast.0, &plain.0, 1e-4);
    for ((a, b), p) in fast.1.iter().zip(&plain.1).zip(&params) {
        norm_close(a, b, 1e-4).unwrap_or_else(|e| panic!("{}: {e}", p.name));
    }
    // Dropout really acted: without it the log-probs differ.
    let no_dropout = to_vec(&score(&model, &batch, &loss, &mut LoraMode::On).unwrap().logps.policy_chosen);
    assert!(no_dropout.iter().zip(&plain.0).any(|(a, b)| (a - b).abs() > 1e-4));
}
