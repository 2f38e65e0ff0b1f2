//! bf16 as CUDA runs it, checked on CPU: frozen weights and activations bf16; LoRA weights,
//! their gradients and AdamW state f32; logits, log-softmax, loss and reductions f32.
//!
//! Stated tolerances (bf16 keeps 8 bits of mantissa in every activation; measured: reference
//! log-probs 0.06 nats / 0.1 % from golden, policy log-probs 0.03 nats and LoRA gradients at
//! most 2 % of their norm from f32 compute on the same weights):
//! - reference log-probs within 0.25 % relative of tiny-llama-bf16's golden values;
//! - policy log-probs within 0.1 nats, the loss within 0.2 % and every LoRA gradient within
//!   5 % of its norm of the f32 computation on the same bf16 weights.
mod common;
use candle_core::{DType, Device};
use common::*;
use dpo::loss::{LossKind, Objective};
use dpo::model::CausalLm;
use dpo::nn::LoraMode;
use dpo::optim::AdamW;
use dpo::scoring::response_logps;
use dpo::scoring::score_batch as score;
use dpo::task::Task;

fn load(dtype: DType) -> (CausalLm, Vec<dpo::lora::adapter::NamedParam>) {
    let mut m =
        CausalLm::load(&model_dir("tiny-llama-bf16"), dtype, &Device::Cpu, dpo::model::LayerPath::CpuOp).unwrap();
    let (_, params) =
        dpo::lora::adapter::attach_from_dir(&mut m, &golden_dir("tiny-llama").join("adapter"), None).unwrap();
    (m, params)
}

#[test]
fn bf16_reference_logps_match_golden_within_stated_tolerance() {
    let want = read_json(&fixtures().join("golden/tiny-llama-bf16.json"));
    let want = [f64s(&want["ref_logps"]["chosen"]), f64s(&want["ref_logps"]["rejected"])].concat();
    let (model, _) = load(DType::BF16);
    assert_eq!(model.dtype(), DType::BF16);
    let logps = response_logps(&model, &batch(&golden_pairs()), &mut LoraMode::Off).unwrap();
    assert_eq!(logps.dtype(), DType::F32, "log-probs are summed in f32");
    let got = to_vec(&logps);
    assert_eq!(got.len(), want.len(), "bf16 reference logps");
    for (i, (got, want)) in got.iter().zip(&want).enumerate() {
        assert_rel(&format!("bf16 reference logp {i}"), *got, *want, 2.5e-3);
    }
}

#[test]
fn bf16_policy_step_keeps_adapters_gradients_and_optimizer_in_f32() {
    let b = batch(&golden_pairs());
    let loss = Task::Preference(Objective::single(LossKind::Sigmoid, 0.1));
    let run = |dtype: DType, recompute: bool| {
        let (mut model, params) = load(dtype);
        model.set_recompute(recompute);
        let dpo::scoring::Scored { logps, loss: losses, .. } = score(&model, &b, &loss, &mut LoraMode::On).unwrap();
        let grads = losses.mean_all().unwrap().backward().unwrap();
        let grads: Vec<candle_core::Tensor> = params.iter().map(|p| grads.get(&p.var).unwrap().clone()).collect();
        let mean_loss = losses.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        (params, to_vec(&logps.policy_chosen), grads, mean_loss)
    };
    let (p16, lp16, g16, loss16) = run(DType::BF16, false);
    let (_, lp32, g32, loss32) = run(DType::F32, false);
    assert_close("bf16 vs f32 policy logps", &lp16, &lp32, 0.1);
    assert_ne!(lp16, lp32, "bf16 really ran in bf16");
    assert_rel("bf16 vs f32 loss", loss16, loss32, 2e-3);
    assert_eq!((g16.len(), g32.len()), (p16.len(), p16.len()), "one gradient per LoRA tensor");
    for ((p, a), b) in p16.iter().zip(&g16).zip(&g32) {
        assert_eq!((p.var.dtype(), a.dtype()), (DType::F32, DType::F32), "{}: adapter and gradient in f32", p.name);
        norm_close(&to_vec(a), &to_vec(b), 5e-2).unwrap_or_else(|e| panic!("{}: {e}", p.name));
    }
    let vars: Vec<candle_core::Var> = p16.iter().map(|p| p.var.clone()).collect();
    let mut opt = AdamW::new(&vars, 0.9, 0.999, 1e-8, 0.0).unwrap();
    opt.step(&vars, &g16, 1e-3).unwrap();
    assert!(opt.state().0.iter().chain(opt.state().1).all(|t| t.dtype() == DType::F32), "AdamW moments in f32");
    // Recomputation is the same computation in bf16 too.
    let (_, lp16r, g16r, _) = run(DType::BF16, true);
    assert_eq!(lp16r, lp16);
    assert_eq!(g16r.len(), g16.len());
    for (a, b) in g16r.iter().zip(&g16) {
        assert_eq!(to_vec(a), to_vec(b));
    }
}
