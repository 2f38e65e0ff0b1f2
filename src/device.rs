//! Choosing the device and the base-weight dtype from `--device` / `--dtype`.
//!
//! ```
//! let dev = dpo::device::parse_device("cpu").unwrap();
//! assert!(dev.is_cpu());
//! assert_eq!(dpo::device::parse_dtype("auto", &dev).unwrap(), candle_core::DType::F32);
//! ```
use anyhow::{Result, bail};
use candle_core::{DType, Device};

/// `cpu`, `cuda`, `cuda:N`, or `auto` (CUDA when built with it and a GPU answers, else CPU).
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(auto_device()),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map_err(|_| anyhow::anyhow!("bad device {s:?}: expected cuda:N"))?,
                None => 0,
            };
            cuda_device(ordinal)
        }
        other => bail!("unknown device {other:?}: choose cpu, cuda, cuda:N or auto"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| anyhow::anyhow!("cannot open CUDA device {ordinal}: {e}"))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<Device> {
    bail!("this dpo was built without CUDA support; rebuild with `cargo build --release --features cuda` (see README, \"Building with CUDA\")")
}

fn auto_device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        eprintln!("device: cuda:0");
        return d;
    }
    if cfg!(feature = "cuda") {
        eprintln!("device: no CUDA GPU answered; using the CPU");
    }
    Device::Cpu
}

/// `f32 | bf16 | f16 | auto`; auto is f32 on CPU (candle's CPU bf16 matmul widens to f32
/// anyway) and bf16 on CUDA.
pub fn parse_dtype(spec: &str, device: &Device) -> Result<DType> {
    match spec {
        "auto" => Ok(if device.is_cpu() { DType::F32 } else { DType::BF16 }),
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => bail!("unknown dtype {other:?}: choose f32, bf16, f16 or auto"),
    }
}
