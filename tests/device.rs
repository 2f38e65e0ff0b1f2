//! The golden checks on a chosen device: `DPO_TEST_DEVICE=cuda` (a `--features cuda` build on a
//! GPU, run by scripts/gpu-check.sh) or `cpu` (the default). f32 must meet the CPU tolerances
//! (log-probs 1e-4, gradients 1e-4 of their norm) on every zoo family and tiny-llama; bf16 the
//! tolerances stated in tests/bf16.rs. With `DPO_TEST_REPORT=FILE` every check's error is also
//! written there as JSON.
mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use dpo::data::PairBatch;
use dpo::loss::{LossKind, Objective};
use dpo::model::CausalLm;
use dpo::nn::LoraMode;
use dpo::scoring::score_batch as score;
use dpo::task::Task;
use serde_json::json;

fn device() -> Device {
    let spec = std::env::var("DPO_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    dpo::device::parse_device(&spec).unwrap()
}

struct Check {
    name: String,
    /// The error, or why none could be measured (lengths, NaN/inf): a failure.
    error: Result<f64, String>,
    tolerance: f64,
}

impl Check {
    fn ok(&self) -> bool {
        self.error.as_ref().is_ok_and(|e| *e <= self.tolerance)
    }
}

/// Log-probs (max |Δ|) and LoRA gradients (max |Δ|/|g| over tensors) of the mean sigmoid loss
/// of `model` on `pairs`, against golden values.
fn logps_and_grads(
    model: &CausalLm,
    params: &[dpo::lora::adapter::NamedParam],
    pairs: &[dpo::data::TokenizedPair],
    want_logps: &[f64],
    grads_file: &std::path::Path,
) -> (Result<f64, String>, Result<f64, String>) {
    let batch = PairBatch::new(pairs, 3, model.device()).unwrap();
    let loss = Task::Preference(Objective::single(LossKind::Sigmoid, 0.1));
    let dpo::scoring::Scored { logps, loss: losses, .. } = score(model, &batch, &loss, &mut LoraMode::On).unwrap();
    let got = to_vec(
        &Tensor::cat(&[&logps.ref_chosen, &logps.ref_rejected, &logps.policy_chosen, &logps.policy_rejected], 0)
            .unwrap(),
    );
    let logp_err = max_abs_diff("logps", &got, want_logps);
    let grads = losses.mean_all().unwrap().backward().unwrap();
    let want = load_safetensors(grads_file);
    if want.len() != params.len() {
        return (logp_err, Err(format!("{} golden gradients for {} LoRA tensors", want.len(), params.len())));
    }
    let mut grad_err = Ok(0.0f64);
    for p in params {
        let (g, w) = (to_vec(grads.get(&p.var).unwrap()), to_vec(&want[&p.name]));
        let rel = comparable(&format!("grad {}", p.name), &g, &w).map(|()| {
            let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt();
            g.iter().zip(&w).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt() / norm.max(1e-12)
        });
        grad_err = grad_err.and_then(|worst| rel.map(|r| worst.max(r)));
    }
    (logp_err, grad_err)
}

#[test]
fn golden_values_on_the_test_device() {
    let dev = device();
    let mut checks = Vec::new();
    // Every zoo family, f32.
    let zoo = zoo_golden();
    for family in ZOO {
        let g = &zoo[family];
        let mut m =
            CausalLm::load(&zoo_dir(family).join("model"), DType::F32, &dev, dpo::model::LayerPath::CpuOp).unwrap();
        m.set_recompute(dev.is_cuda());
        let (_, params) = dpo::lora::adapter::attach_from_dir(&mut m, &zoo_dir(family).join("adapter"), None).unwrap();
        let want = [
            &g["ref_logps"]["chosen"],
            &g["ref_logps"]["rejected"],
            &g["policy_logps"]["chosen"],
            &g["policy_logps"]["rejected"],
        ]
        .map(f64s)
        .concat();
        let (lp, gr) =
            logps_and_grads(&m, &params, &zoo_pairs(g), &want, &zoo_dir(family).join("grads_sigmoid_mean.safetensors"));
        checks.push(Check { name: format!("{family} f32 logps"), error: lp, tolerance: 1e-4 });
        checks.push(Check { name: format!("{family} f32 grads (of norm)"), error: gr, tolerance: 1e-4 });
    }
    // tiny-llama f32, and bf16 against the bf16 golden values.
    let g = &golden()["models"]["tiny-llama"];
    let mut m = CausalLm::load(&model_dir("tiny-llama"), DType::F32, &dev, dpo::model::LayerPath::CpuOp).unwrap();
    let (_, params) =
        dpo::lora::adapter::attach_from_dir(&mut m, &golden_dir("tiny-llama").join("adapter"), None).unwrap();
    let want = [
        &g["ref_logps"]["chosen"],
        &g["ref_logps"]["rejected"],
        &g["policy_logps"]["chosen"],
        &g["policy_logps"]["rejected"],
    ]
    .map(f64s)
    .concat();
    let (lp, gr) = logps_and_grads(
        &m,
        &params,
        &golden_pairs(),
        &want,
        &golden_dir("tiny-llama").join("grads_sigmoid_mean.safetensors"),
    );
    checks.push(Check { name: "tiny-llama f32 logps".into(), error: lp, tolerance: 1e-4 });
    checks.push(Check { name: "tiny-llama f32 grads (of norm)".into(), error: gr, tolerance: 1e-4 });
    let bf16 = read_json(&fixtures().join("golden/tiny-llama-bf16.json"));
    let want16 = [f64s(&bf16["ref_logps"]["chosen"]), f64s(&bf16["ref_logps"]["rejected"])].concat();
    let m16 = CausalLm::load(&model_dir("tiny-llama-bf16"), DType::BF16, &dev, dpo::model::LayerPath::CpuOp).unwrap();
    let b = PairBatch::new(&golden_pairs(), 3, &dev).unwrap();
    let got16 = to_vec(&dpo::scoring::response_logps(&m16, &b, &mut LoraMode::Off).unwrap());
    let rel = max_rel_diff("bf16 reference logps", &got16, &want16);
    checks.push(Check {
        name: "tiny-llama-bf16 bf16 reference logps (relative)".into(),
        error: rel,
        tolerance: 2.5e-3,
    });

    let report: Vec<_> = checks
        .iter()
        .map(|c| {
            let error = match &c.error {
                Ok(e) => json!(e),
                Err(why) => json!(why),
            };
            json!({"check": c.name, "error": error, "tolerance": c.tolerance, "ok": c.ok()})
        })
        .collect();
    let report = json!({"device": format!("{dev:?}"), "checks": report});
    if let Ok(path) = std::env::var("DPO_TEST_REPORT") {
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    }
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.ok())
        .map(|c| match &c.error {
            Ok(e) => format!("{}: {e:e} > {:e}", c.name, c.tolerance),
            Err(why) => format!("{}: {why}", c.name),
        })
        .collect();
    assert!(failed.is_empty(), "on {dev:?}:\n{}", failed.join("\n"));
}
