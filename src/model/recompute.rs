//! Ops whose forward value is computed by ordinary tensor code, without keeping a graph, and
//! whose backward recomputes what it needs: the tool behind activation recomputation and the
//! tiled attention. Works on every device (the forward value is handed to candle as is).
//!
//! - [`attach`]: gives an already computed value a backward closure over the op's inputs.
//! - [`layer`]: a generic decoder layer that keeps only its input; backward re-runs the layer
//!   with its graph and back-propagates the incoming gradient through it.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! // y = 2x, with a backward that says so.
//! struct Double;
//! impl dpo::model::recompute::Backward for Double {
//!     fn name(&self) -> &'static str { "double" }
//!     fn backward(&self, _inputs: &[Tensor], _y: &Tensor, dy: &Tensor) -> candle_core::Result<Vec<Option<Tensor>>> {
//!         Ok(vec![Some((dy * 2.0)?)])
//!     }
//! }
//! let x = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
//! let y = dpo::model::recompute::attach((x.as_tensor().detach() * 2.0).unwrap(), &[x.as_tensor()], Double).unwrap();
//! let g = y.sum_all().unwrap().backward().unwrap();
//! assert_eq!(g.get(&x).unwrap().to_vec1::<f32>().unwrap(), [2.0, 2.0]);
//! ```
use super::causal_lm::DecoderLayer;
use super::generic_layer::{self, PassShared};
use crate::nn::LoraMode;
use crate::nn::linear::LoraWeights;
use crate::rng::SeededRng;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, Var, bail};
use std::sync::{Arc, Mutex};

/// The backward of an [`attach`]ed value: input gradients from the inputs, the value and its
/// gradient.
pub trait Backward: Send + Sync {
    fn name(&self) -> &'static str;
    fn backward(&self, inputs: &[Tensor], value: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>>;
}

/// `value` (computed from `inputs` without a graph) as the output of an op over `inputs`
/// (1 to 3 of them) whose backward is `bwd`. Nothing but `value` is kept.
pub fn attach<B: Backward + 'static>(value: Tensor, inputs: &[&Tensor], bwd: B) -> Result<Tensor> {
    // The op hands over a copy of the storage: make it exactly this tensor's elements.
    let value = if value.is_contiguous() && value.layout().start_offset() == 0 { value } else { value.copy()? };
    let op = Attached { value: Mutex::new(Some(value)), bwd: Box::new(bwd) };
    match inputs {
        [x] => x.apply_op1_arc(Arc::new(Box::new(op))),
        [x, a] => x.apply_op2_arc(a, Arc::new(Box::new(op))),
        [x, a, b] => x.apply_op3_arc(a, b, Arc::new(Box::new(op))),
        _ => bail!("recompute::attach takes 1 to 3 inputs, got {}", inputs.len()),
    }
}

struct Attached {
    /// Handed over (as a storage copy) by the op's forward, then dropped.
    value: Mutex<Option<Tensor>>,
    bwd: Box<dyn Backward>,
}

impl Attached {
    fn take(&self) -> Result<(Storage, Shape)> {
        let value = self.value.lock().expect("attached value").take();
        let Some(v) = value else { bail!("{}: forward ran twice", self.bwd.name()) };
        let (storage, layout) = v.storage_and_layout();
        Ok((storage.try_clone(layout)?, layout.shape().clone()))
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        match self.take()? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => bail!("{}: value and inputs on different devices", self.bwd.name()),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        match self.take()? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => bail!("{}: value and inputs on different devices", self.bwd.name()),
        }
    }
}

impl CustomOp1 for Attached {
    fn name(&self) -> &'static str {
        self.bwd.name()
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.bwd.backward(std::slice::from_ref(x), y, dy)?.into_iter().next().flatten())
    }
}

impl CustomOp2 for Attached {
    fn name(&self) -> &'static str {
        self.bwd.name()
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(&self, x: &Tensor, a: &Tensor, y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut g = self.bwd.backward(&[x.clone(), a.clone()], y, dy)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten()))
    }
}

impl CustomOp3 for Attached {
    fn name(&self) -> &'static str {
        self.bwd.name()
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut g = self.bwd.backward(&[x.clone(), a.clone(), b.clone()], y, dy)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten(), g.next().flatten()))
    }
}

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
    let with_lora = !matches!(mode, LoraMode::Off) && layer.linears.iter().any(|(_, l)| l.lora().is_some());
    if !with_lora && !x.track_op() {
        return generic_layer::forward(layer, x, shared, mode);
    }
    let replay = match mode {
        LoraMode::Train(rng) => Some((**rng).clone()),
        _ => None,
    };
    // Run with the graph, keep the value only: the layer's intermediates are freed here.
    let value = generic_layer::forward(layer, &x.detach(), shared, mode)?.detach();
    let bwd = LayerRecompute { layer: layer.clone(), shared: shared.clone(), replay, need_dx: x.track_op() };
    if !with_lora {
        return Ok(attach(value, &[x], bwd)?);
    }
    let flat = |f: fn(&LoraWeights) -> &Var| -> Result<Tensor> {
        let parts = layer
            .linears
            .iter()
            .filter_map(|(_, l)| l.lora())
            .map(|l| f(l).as_tensor().flatten_all())
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    };
    Ok(attach(value, &[x, &flat(|l| &l.a)?, &flat(|l| &l.b)?], bwd)?)
}

struct LayerRecompute {
    layer: DecoderLayer,
    shared: Arc<PassShared>,
    /// The dropout stream where the forward started drawing this layer's masks.
    replay: Option<SeededRng>,
    need_dx: bool,
}

impl Backward for LayerRecompute {
    fn name(&self) -> &'static str {
        "recomputed-decoder-layer"
    }

    fn backward(&self, inputs: &[Tensor], _value: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let x = Var::from_tensor(&inputs[0].detach())?;
        // Fresh variables for the adapters, cut from the flattened inputs in the same order.
        let mut layer = self.layer.clone();
        let mut vars: Vec<(Var, Var)> = Vec::new();
        if inputs.len() == 3 {
            let (mut a_off, mut b_off) = (0, 0);
            for (_, linear) in layer.linears.iter_mut() {
                let Some(l) = linear.lora().cloned() else { continue };
                let (a_shape, b_shape) = (l.a.shape().clone(), l.b.shape().clone());
                let a = Var::from_tensor(&inputs[1].narrow(0, a_off, a_shape.elem_count())?.reshape(a_shape.clone())?)?;
                let b = Var::from_tensor(&inputs[2].narrow(0, b_off, b_shape.elem_count())?.reshape(b_shape.clone())?)?;
                a_off += a_shape.elem_count();
                b_off += b_shape.elem_count();
                linear.attach(LoraWeights { a: a.clone(), b: b.clone(), ..l });
                vars.push((a, b));
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
        let flat = |pick: fn(&(Var, Var)) -> &Var| -> Result<Tensor> {
            let parts = vars
                .iter()
                .map(|v| match grads.get(pick(v)) {
                    Some(g) => g.flatten_all(),
                    None => bail!("recomputed layer: an adapter received no gradient"),
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)
        };
        Ok(vec![dx, Some(flat(|v| &v.0)?), Some(flat(|v| &v.1)?)])
    }
}
