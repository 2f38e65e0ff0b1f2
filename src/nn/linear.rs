//! A frozen linear layer that may carry a trainable LoRA adapter.
//!
//! ```no_run
//! # use candle_core::{Device, DType, Tensor};
//! # use dpo::nn::{LoraLinear, LoraMode};
//! # fn main() -> anyhow::Result<()> {
//! let w = Tensor::zeros((16, 8), DType::F32, &Device::Cpu)?;
//! let layer = LoraLinear::frozen(w, None);
//! let x = Tensor::ones((2, 3, 8), DType::F32, &Device::Cpu)?;
//! let y = layer.forward(&x, &mut LoraMode::Off)?; // [2, 3, 16]
//! # Ok(()) }
//! ```
use crate::nn::ops::frozen_matmul;
use crate::rng::SeededRng;
use candle_core::{DType, Result, Tensor, Var};

/// Whether a forward pass uses the adapters: the policy does, the reference does not.
pub enum LoraMode<'a> {
    /// Reference model: base weights only; no graph is recorded.
    Off,
    /// Policy model, no dropout (evaluation, or training with dropout 0).
    On,
    /// Policy model in training: LoRA dropout masks drawn from this stream.
    Train(&'a mut SeededRng),
}

/// The trainable pair of one layer. `a`: `[r, in]`, `b`: `[out, r]`, both f32.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: f32,
}

#[derive(Debug, Clone)]
pub struct LoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraWeights>,
}

impl LoraLinear {
    pub fn frozen(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, lora: None }
    }

    /// The weight and bias, to make them trainable (full fine-tuning).
    pub fn weights_mut(&mut self) -> (&mut Tensor, Option<&mut Tensor>) {
        (&mut self.weight, self.bias.as_mut())
    }

    pub fn attach(&mut self, lora: LoraWeights) {
        self.lora = Some(lora);
    }

    /// The frozen weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn lora(&self) -> Option<&LoraWeights> {
        self.lora.as_ref()
    }

    /// `(out_features, in_features)` of the frozen weight.
    pub fn dims(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    pub fn forward(&self, x: &Tensor, mode: &mut LoraMode) -> Result<Tensor> {
        let mut y = frozen_matmul(x, &self.weight)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let Some(lora) = &self.lora else { return Ok(y) };
        let x = match mode {
            LoraMode::Off => return Ok(y),
            LoraMode::On => x.clone(),
            LoraMode::Train(rng) => dropout(x, lora.dropout, rng)?,
        };
        // Adapters live in f32 whatever the base dtype; cast in and out.
        let x = x.to_dtype(DType::F32)?;
        let delta = x.broadcast_matmul(&lora.a.t()?)?.broadcast_matmul(&lora.b.t()?)?;
        let delta = (delta * lora.scale)?.to_dtype(y.dtype())?;
        y + delta
    }
}

/// Inverted dropout with a mask from the project's seeded stream.
fn dropout(x: &Tensor, p: f32, rng: &mut SeededRng) -> Result<Tensor> {
    if p == 0.0 {
        return Ok(x.clone());
    }
    let mask = Tensor::from_vec(dropout_mask(x.elem_count(), p, rng), x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}

/// `n` inverted-dropout factors (`1/(1−p)` kept, 0 dropped), one uniform draw each in order:
/// the CPU layer op draws the same masks as the composite layer from the same stream.
pub fn dropout_mask(n: usize, p: f32, rng: &mut SeededRng) -> Vec<f32> {
    let keep = 1.0 - p;
    (0..n).map(|_| if rng.uniform() < keep { 1.0 / keep } else { 0.0 }).collect()
}
