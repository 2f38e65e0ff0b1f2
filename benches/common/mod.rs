//! The random-model writer both benches use: every tensor the architecture description lists
//! (`Architecture::weight_shapes`), norms at 1, matrices random; in memory or as a model folder.
#![allow(dead_code)]
use candle_core::{DType, Device, Tensor};
use dpo::model::{Architecture, CausalLm};
use dpo::rng::{SeededRng, Stream};
use std::collections::HashMap;
use std::path::Path;

/// Random weights for `arch` with standard deviation `std`, in `dtype` on `device`: seeded
/// uniform on CPU; cuRAND normals made on a GPU (never carried there).
pub fn random_weights(arch: &Architecture, device: &Device, dtype: DType, std: f32) -> HashMap<String, Tensor> {
    let mut rng = SeededRng::new(0, Stream::LoraInit);
    if device.is_cuda() {
        device.set_seed(0).unwrap();
    }
    let half_width = std * 3f32.sqrt();
    arch.weight_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let t = if name.ends_with("norm.weight") {
                Tensor::ones(shape.as_slice(), DType::F32, device).unwrap()
            } else if device.is_cuda() {
                Tensor::randn(0f32, std, shape.as_slice(), device).unwrap()
            } else {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) * half_width).collect();
                Tensor::from_vec(v, shape.as_slice(), device).unwrap()
            };
            (name, t.to_dtype(dtype).unwrap())
        })
        .collect()
}

/// A model of `arch` with random weights.
pub fn random_model(arch: &Architecture, device: &Device, dtype: DType) -> CausalLm {
    let vb = candle_nn::VarBuilder::from_tensors(random_weights(arch, device, dtype, 0.02), dtype, device);
    CausalLm::from_weights(arch.clone(), vb, dtype, device, dpo::model::LayerPath::CpuOp).unwrap()
}

/// A model folder: `config` as config.json, random f32 weights, tiny-llama's tokenizer files.
pub fn write_model_dir(dir: &Path, config: &serde_json::Value, std: f32) {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-llama");
    std::fs::create_dir_all(dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(tiny.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let arch = Architecture::from_json(&config.to_string()).unwrap();
    let weights = random_weights(&arch, &Device::Cpu, DType::F32, std);
    candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
}
