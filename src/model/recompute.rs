//! Activation recomputation for the generic layer: [`layer`] runs a decoder layer, keeps only
//! its input, and in backward re-runs it with its graph and back-propagates the incoming
//! gradient through it (the value is attached with [`crate::nn::attach`]).
use super::generic_layer::{self, PassShared};
use super::layer::DecoderLayer;
use crate::nn::LoraMode;
use crate::nn::attach::{Backward, attach};
use crate::nn::lora_pack::LoraPack;
use crate::rng::SeededRng;
use candle_core::{Result, Tensor, Var};
use std::sync::Arc;

/// A generic decoder layer that keeps only its input for backward (activation recomputation).
/// The forward runs the layer and drops its graph at once; backward re-runs it from the input
/// with the same LoRA dropout masks (the dropout stream is replayed from where the forward
/// started) and back-propagates the incoming gradient, one layer at a time.
pub fn layer(
    layer: &DecoderLayer,
    x: &Tensor,
    shared: &Arc<PassShared>,
    mode: &mut LoraMode,
) -> anyhow::Result<Tensor> {
    let pack = match mode {
        LoraMode::Off => None,
        _ => LoraPack::of(layer.linears.iter().map(|(_, l)| l.lora()))?,
    };
    if pack.is_none() && !x.track_op() {
        return generic_layer::forward(layer, x, shared, mode);
    }
    let replay = match mode {
        LoraMode::Train(rng) => Some((**rng).clone()),
        _ => None,
    };
    // Run with the graph, keep the value only: the layer's intermediates are freed here.
    let value = generic_layer::forward(layer, &x.detach(), shared, mode)?.detach();
    let inputs = match &pack {
        Some(p) => vec![x, &p.a, &p.b],
        None => vec![x],
    };
    let bwd = LayerRecompute {
        layer: layer.clone(),
        shared: shared.clone(),
        replay,
        need_dx: x.track_op(),
        pack: pack.clone(),
    };
    Ok(attach(value, &inputs, bwd)?)
}

struct LayerRecompute {
    layer: DecoderLayer,
    shared: Arc<PassShared>,
    /// The dropout stream where the forward started drawing this layer's masks.
    replay: Option<SeededRng>,
    need_dx: bool,
    /// How the adapters were packed into the op's inputs (none: the reference pass).
    pack: Option<LoraPack>,
}

impl Backward for LayerRecompute {
    fn name(&self) -> &'static str {
        "recomputed-decoder-layer"
    }

    fn backward(&self, inputs: &[Tensor], _value: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let x = Var::from_tensor(&inputs[0].detach())?;
        // Fresh variables for the adapters, cut from the packed inputs.
        let mut layer = self.layer.clone();
        let mut vars: Vec<(Var, Var)> = Vec::new();
        if let (Some(pack), [_, a, b]) = (&self.pack, inputs) {
            for ((_, linear), lora) in layer.linears.iter_mut().zip(pack.unpack(a, b)?) {
                if let Some(l) = lora {
                    vars.push((l.a.clone(), l.b.clone()));
                    linear.attach(l);
                }
            }
        }
        let mut rng = self.replay.clone();
        let mut mode = match rng.as_mut() {
            Some(r) => LoraMode::Train(r),
            None if vars.is_empty() => LoraMode::Off,
            None => LoraMode::On,
        };
        let y =
            generic_layer::forward(&layer, x.as_tensor(), &self.shared, &mut mode).map_err(candle_core::Error::wrap)?;
        // d/dθ Σ y∘dy is the vector-Jacobian product the caller wants.
        let grads = (y * grad.detach())?.sum_all()?.backward()?;
        let dx = if self.need_dx { grads.get(&x).cloned() } else { None };
        if vars.is_empty() {
            return Ok(vec![dx]);
        }
        let grad_of = |v: &Var| {
            grads
                .get(v)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg("recomputed layer: an adapter received no gradient".into()))
        };
        let per_slot = vars.iter().map(|(a, b)| Ok((grad_of(a)?, grad_of(b)?))).collect::<Result<Vec<_>>>()?;
        let (da, db) = LoraPack::pack_grads(&per_slot)?;
        Ok(vec![dx, Some(da), Some(db)])
    }
}
