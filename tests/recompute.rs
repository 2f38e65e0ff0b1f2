//! Activation recomputation (`--gradient-checkpointing`) changes no number: log-probs and every
//! LoRA gradient are bit-identical to the run that keeps all activations, on both layer paths, for every
//! family, with LoRA dropout (the recomputed layer redraws the same masks).
mod common;
use common::*;
use dpo::loss::{LossKind, Objective};
use dpo::model::{CausalLm, LayerPath};
use dpo::nn::LoraMode;
use dpo::rng::{SeededRng, Stream};
use dpo::scoring::score_batch as score;
use dpo::task::Task;

fn logps_and_grads(
    model: &CausalLm,
    params: &[dpo::lora::adapter::NamedParam],
    pairs: &[dpo::data::TokenizedPair],
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let loss = Task::Preference(Objective::single(LossKind::Sigmoid, 0.1));
    let mut rng = SeededRng::new(3, Stream::Dropout);
    let dpo::scoring::Scored { logps, loss: losses, .. } =
        score(model, &batch(pairs), &loss, &mut LoraMode::Train(&mut rng)).unwrap();
    let grads = losses.mean_all().unwrap().backward().unwrap();
    (
        to_vec(&logps.policy_chosen),
        params.iter().map(|p| to_vec(grads.get(&p.var).expect("a gradient per LoRA tensor"))).collect(),
    )
}

#[test]
fn recomputation_changes_no_logprob_or_gradient() {
    let golden = zoo_golden();
    for family in ZOO {
        let pairs = zoo_pairs(&golden[family]);
        for path in [LayerPath::CpuOp, LayerPath::Generic] {
            let mut model = CausalLm::load(
                &zoo_dir(family).join("model"),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
                dpo::model::LayerPath::CpuOp,
            )
            .unwrap();
            model = model.on_path(path);
            let (_, params) =
                dpo::lora::adapter::attach_from_dir(&mut model, &zoo_dir(family).join("adapter"), Some(0.2)).unwrap();
            let kept = logps_and_grads(&model, &params, &pairs[..4]);
            model.set_recompute(true);
            let recomputed = logps_and_grads(&model, &params, &pairs[..4]);
            assert_close(&format!("{family} {path:?} logps"), &recomputed.0, &kept.0, 1e-6);
            for ((a, b), p) in recomputed.1.iter().zip(&kept.1).zip(&params) {
                norm_close(a, b, 1e-6).unwrap_or_else(|e| panic!("{family} {path:?} {}: {e}", p.name));
                assert!(a == b, "{family} {path:?} {}: not bit-identical", p.name);
            }
            assert_eq!(recomputed.0, kept.0, "{family} {path:?}: the forward is the same computation");
        }
    }
}
