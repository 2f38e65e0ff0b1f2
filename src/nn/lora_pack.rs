//! A decoder layer's adapters as the two flat tensors a whole-layer op takes as inputs: every
//! `A` flattened and concatenated in the layer's projection order, then every `B` likewise,
//! and where each adapter sits in them. The CPU layer op and activation recomputation both
//! hand their adapters to candle this way (candle routes an op input's gradient back through
//! the concatenation to each adapter's `Var`s); recomputation cuts them apart again with
//! [`LoraPack::unpack`]. Dropout masks come from [`LoraPack::dropout_masks`]: in projection
//! order, each over the adapter's whole input — the order the generic layer draws them in its
//! forward, so every path consumes the same seeded stream the same way.
//!
//! ```
//! # use candle_core::{Device, Tensor, Var};
//! # use dpo::nn::linear::LoraWeights;
//! let w = |r: usize, c: usize| Var::from_tensor(&Tensor::ones((r, c), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
//! let q = LoraWeights { a: w(2, 8), b: w(8, 2), scale: 2.0, dropout: 0.0 };
//! let v = LoraWeights { a: w(2, 8), b: w(4, 2), scale: 2.0, dropout: 0.0 };
//! let pack = dpo::nn::lora_pack::LoraPack::of([Some(&q), None, Some(&v)]).unwrap().unwrap();
//! assert_eq!(pack.a.dims(), &[32]); // 2·8 + 2·8
//! assert_eq!(pack.slots[2].as_ref().unwrap().b_off, 16); // after q's B [8, 2]
//! ```
use super::LoraMode;
use super::linear::{LoraWeights, dropout_mask};
use candle_core::{Result, Tensor, Var, bail};

/// Where one linear's adapter sits in the flat inputs.
#[derive(Debug, Clone)]
pub struct PackSlot {
    pub rank: usize,
    pub in_dim: usize,
    pub out_dim: usize,
    pub scale: f64,
    pub dropout: f32,
    /// Offset of its `A` `[rank, in]` in [`LoraPack::a`], of its `B` `[out, rank]` in [`LoraPack::b`].
    pub a_off: usize,
    pub b_off: usize,
}

/// The adapters of one layer's linears, packed.
#[derive(Debug, Clone)]
pub struct LoraPack {
    /// Every `A`, flattened, in projection order.
    pub a: Tensor,
    /// Every `B`, flattened, in projection order.
    pub b: Tensor,
    /// One per linear of the layer (projection order); `None` where it has no adapter.
    pub slots: Vec<Option<PackSlot>>,
}

impl LoraPack {
    /// Packs the adapters of a layer's linears (in projection order); `None` if none has one.
    pub fn of<'a>(adapters: impl IntoIterator<Item = Option<&'a LoraWeights>>) -> Result<Option<Self>> {
        let (mut a_parts, mut b_parts, mut slots) = (Vec::new(), Vec::new(), Vec::new());
        let (mut a_off, mut b_off) = (0, 0);
        for lora in adapters {
            let Some(l) = lora else {
                slots.push(None);
                continue;
            };
            let (rank, in_dim) = l.a.dims2()?;
            let out_dim = l.b.dim(0)?;
            slots.push(Some(PackSlot { rank, in_dim, out_dim, scale: l.scale, dropout: l.dropout, a_off, b_off }));
            a_off += rank * in_dim;
            b_off += out_dim * rank;
            a_parts.push(l.a.as_tensor().flatten_all()?);
            b_parts.push(l.b.as_tensor().flatten_all()?);
        }
        if a_parts.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self { a: Tensor::cat(&a_parts, 0)?, b: Tensor::cat(&b_parts, 0)?, slots }))
    }

    /// The dropout masks of a forward over `tokens` tokens, one per adapter with dropout in
    /// training (`None` otherwise), drawn from `mode`'s stream in projection order.
    pub fn dropout_masks(&self, tokens: usize, mode: &mut LoraMode) -> Vec<Option<Vec<f32>>> {
        self.slots
            .iter()
            .map(|slot| match (slot, &mut *mode) {
                (Some(s), LoraMode::Train(rng)) if s.dropout > 0.0 => {
                    Some(dropout_mask(tokens * s.in_dim, s.dropout, rng))
                }
                _ => None,
            })
            .collect()
    }

    /// Fresh variables cut from flat inputs laid out as this pack (an op's `a` and `b`
    /// inputs), one per slot, with the slot's scale and dropout.
    pub fn unpack(&self, a: &Tensor, b: &Tensor) -> Result<Vec<Option<LoraWeights>>> {
        self.slots
            .iter()
            .map(|slot| {
                let Some(s) = slot else { return Ok(None) };
                let (na, nb) = (s.rank * s.in_dim, s.out_dim * s.rank);
                if s.a_off + na > a.elem_count() || s.b_off + nb > b.elem_count() {
                    bail!("lora pack: flat inputs shorter than the pack's layout");
                }
                let a = Var::from_tensor(&a.narrow(0, s.a_off, na)?.reshape((s.rank, s.in_dim))?)?;
                let b = Var::from_tensor(&b.narrow(0, s.b_off, nb)?.reshape((s.out_dim, s.rank))?)?;
                Ok(Some(LoraWeights { a, b, scale: s.scale, dropout: s.dropout }))
            })
            .collect()
    }

    /// Flat gradients laid out as this pack, from each slot's `(dA, dB)` in slot order.
    pub fn pack_grads(grads: &[(Tensor, Tensor)]) -> Result<(Tensor, Tensor)> {
        let a = grads.iter().map(|(a, _)| a.flatten_all()).collect::<Result<Vec<_>>>()?;
        let b = grads.iter().map(|(_, b)| b.flatten_all()).collect::<Result<Vec<_>>>()?;
        Ok((Tensor::cat(&a, 0)?, Tensor::cat(&b, 0)?))
    }
}
