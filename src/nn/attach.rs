//! Ops whose forward value is computed by ordinary tensor code, without keeping a graph, and
//! whose backward is written by hand or recomputes what it needs: [`attach`] gives an already
//! computed value a backward over the op's inputs. The tool behind activation recomputation,
//! the tiled attention and the chunked head; works on every device (the forward value is handed
//! to candle as is).
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! // y = 2x, with a backward that says so.
//! struct Double;
//! impl dpo::nn::attach::Backward for Double {
//!     fn name(&self) -> &'static str { "double" }
//!     fn backward(&self, _inputs: &[Tensor], _y: &Tensor, dy: &Tensor) -> candle_core::Result<Vec<Option<Tensor>>> {
//!         Ok(vec![Some((dy * 2.0)?)])
//!     }
//! }
//! let x = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
//! let y = dpo::nn::attach::attach((x.as_tensor().detach() * 2.0).unwrap(), &[x.as_tensor()], Double).unwrap();
//! let g = y.sum_all().unwrap().backward().unwrap();
//! assert_eq!(g.get(&x).unwrap().to_vec1::<f32>().unwrap(), [2.0, 2.0]);
//! ```
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, bail};
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
        _ => bail!("attach takes 1 to 3 inputs, got {}", inputs.len()),
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
