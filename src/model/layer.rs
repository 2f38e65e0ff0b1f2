//! One decoder layer's weights, named by what the family's description says it has, and how
//! they are read from a checkpoint: what both layer paths ([`super::cpu_layer`],
//! [`super::generic_layer`]) and recomputation compute with.
use super::arch::{Architecture, LayerSpec, Proj};
use crate::nn::LoraLinear;
use anyhow::Result;
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

/// One decoder layer's frozen weights, named by what the description says it has.
#[derive(Clone)]
pub struct DecoderLayer {
    /// Attention pre, attention post, MLP pre, MLP post (see [`Architecture::norm_names`]);
    /// Gemma's already hold `1 + w`.
    pub norms: [Option<Tensor>; 4],
    /// q and k norm weights.
    pub qk_norm: Option<[Tensor; 2]>,
    /// The family's linears, in [`Architecture::projections`] order.
    pub linears: Vec<(Proj, LoraLinear)>,
    pub spec: LayerSpec,
}

impl DecoderLayer {
    pub fn linear(&self, p: Proj) -> &LoraLinear {
        &self.linears.iter().find(|(q, _)| *q == p).expect("the description lists every linear it loads").1
    }
}

/// A norm weight as the layers use it: `1 + w` for Gemma's norms; f32 where the family scales
/// in f32.
pub fn norm_weight(arch: &Architecture, vb: &VarBuilder, name: &str, dim: usize, dtype: DType) -> Result<Tensor> {
    let w = vb.get(dim, name)?;
    let w = if arch.norm.scale_in_f32 { w.to_dtype(DType::F32)? } else { w };
    Ok(if arch.norm.unit_offset {
        (w + 1.0)?.to_dtype(if arch.norm.scale_in_f32 { DType::F32 } else { dtype })?
    } else {
        w
    })
}

pub fn load_layer(arch: &Architecture, vb: &VarBuilder, index: usize, dtype: DType) -> Result<DecoderLayer> {
    let h = arch.hidden_size;
    let names = arch.norm_names();
    let mut norms: [Option<Tensor>; 4] = Default::default();
    for (slot, name) in norms.iter_mut().zip(names) {
        if let Some(name) = name {
            *slot = Some(norm_weight(arch, vb, &format!("{name}.weight"), h, dtype)?);
        }
    }
    let qk_norm = match arch.qk_norm_dims() {
        None => None,
        Some((q, k)) => {
            let att = vb.pp("self_attn");
            Some([
                norm_weight(arch, &att, "q_norm.weight", q, dtype)?,
                norm_weight(arch, &att, "k_norm.weight", k, dtype)?,
            ])
        }
    };
    let linears = arch
        .projections
        .iter()
        .map(|&p| {
            let ((out_dim, in_dim), _) = arch.proj_geometry(p);
            let lvb = vb.pp(p.path());
            let w = lvb.get((out_dim, in_dim), "weight")?;
            let b = if arch.has_bias(p) { Some(lvb.get(out_dim, "bias")?) } else { None };
            Ok((p, LoraLinear::frozen(w, b)))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(DecoderLayer { norms, qk_norm, linears, spec: arch.layers[index] })
}
