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
/// `cpu | cuda | cuda:N | auto` as text (for benches and scripts).
pub fn parse_device(spec: &str) -> Result<Device> {
    spec.parse::<DeviceSpec>().map_err(anyhow::Error::msg)?.open()
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| anyhow::anyhow!("cannot open CUDA device {ordinal}: {e}"))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<Device> {
    bail!(
        "this dpo was built without CUDA support; rebuild with `cargo build --release --features cuda` (see README, \"Building with CUDA\")"
    )
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

/// `--dtype`: the compute dtype of the base weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DTypeChoice {
    /// f32 on CPU (candle's CPU bf16 matmul widens to f32 anyway), bf16 on CUDA.
    Auto,
    #[value(alias = "float32")]
    F32,
    #[value(alias = "bfloat16")]
    Bf16,
    #[value(alias = "float16")]
    F16,
}

impl DTypeChoice {
    pub fn resolve(self, device: &Device) -> DType {
        match self {
            Self::Auto => {
                if device.is_cpu() {
                    DType::F32
                } else {
                    DType::BF16
                }
            }
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

/// A stored weight dtype (`dpo merge --dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoredDType {
    #[value(alias = "float32")]
    F32,
    #[value(alias = "bfloat16")]
    Bf16,
    #[value(alias = "float16")]
    F16,
}

impl StoredDType {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

/// `f32 | bf16 | f16 | auto` as text (for benches and scripts).
pub fn parse_dtype(spec: &str, device: &Device) -> Result<DType> {
    use clap::ValueEnum;
    match DTypeChoice::from_str(spec, true) {
        Ok(c) => Ok(c.resolve(device)),
        Err(_) => bail!("unknown dtype {spec:?}: choose f32, bf16, f16 or auto"),
    }
}

/// `--device`: `cpu`, `cuda`, `cuda:N` or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!("unknown device {s:?}: choose cpu, cuda, cuda:N or auto")),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl DeviceSpec {
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => Ok(auto_device()),
            Self::Cuda(n) => cuda_device(n),
        }
    }
}
