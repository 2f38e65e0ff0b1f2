//! `dpo merge`: the merged model scores exactly like base + adapter.
mod common;
use candle_core::{DType, Device};
use common::*;
use dpo::model::CausalLm;
use dpo::nn::LoraMode;
use dpo::scoring::response_logps;
use std::process::Command;

#[test]
fn merged_model_equals_base_plus_adapter() {
    let dir = scratch("merge");
    for (model, dtype, tol) in [("tiny-qwen2", "f32", 1e-4), ("tiny-llama-sharded", "bf16", f64::NAN)] {
        let golden_model = if model == "tiny-qwen2" { "tiny-qwen2" } else { "tiny-llama" };
        let out = dir.join(format!("{model}-{dtype}"));
        let o = Command::new(bin())
            .args(["merge", "--model"])
            .arg(model_dir(model))
            .arg("--adapter")
            .arg(golden_dir(golden_model).join("adapter"))
            .arg("--output")
            .arg(&out)
            .args(["--dtype", dtype, "--max-shard-size", "200000"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let index = read_json(&out.join("model.safetensors.index.json"));
        let shards: std::collections::BTreeSet<&str> =
            index["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
        assert!(shards.len() > 1, "small --max-shard-size gives several shards");
        assert!(out.join("tokenizer.json").is_file());

        let merged = CausalLm::load(&out, DType::F32, &Device::Cpu, dpo::model::LayerPath::CpuOp).unwrap();
        let (with_adapter, _) = load_with_golden_adapter(model, golden_model);
        let b = batch(&golden_pairs());
        let got = to_vec(&response_logps(&merged, &b, &mut LoraMode::Off).unwrap());
        let want = to_vec(&response_logps(&with_adapter, &b, &mut LoraMode::On).unwrap());
        if tol.is_nan() {
            // bf16 storage rounds each weight to 8 bits of mantissa: close, not exact.
            let worst =
                max_rel_diff(&format!("{model} bf16 merged logps"), &got, &want).unwrap_or_else(|e| panic!("{e}"));
            assert!(worst < 0.02, "bf16 merge drifted {worst}");
            assert_eq!(read_json(&out.join("config.json"))["dtype"], "bfloat16");
        } else {
            assert_close(&format!("{model} merged logps"), &got, &want, tol);
        }
    }
    let o = Command::new(bin())
        .args(["merge", "--model"])
        .arg(model_dir("tiny-llama"))
        .arg("--adapter")
        .arg(golden_dir("tiny-llama").join("adapter"))
        .arg("--output")
        .arg(dir.join("tiny-qwen2-f32"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "refuses to write over an existing folder");
}

#[test]
fn an_adapter_for_another_model_is_refused_before_anything_is_written() {
    let dir = scratch("merge_mismatch");
    let adapter = dir.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    let golden = golden_dir("tiny-llama").join("adapter");
    std::fs::copy(golden.join("adapter_config.json"), adapter.join("adapter_config.json")).unwrap();
    let tensors: std::collections::HashMap<String, candle_core::Tensor> =
        load_safetensors(&golden.join("adapter_model.safetensors"))
            .into_iter()
            .map(|(k, v)| (k.replace("layers.1.", "layers.9."), v))
            .collect();
    candle_core::safetensors::save(&tensors, adapter.join("adapter_model.safetensors")).unwrap();
    let out = dir.join("merged");
    let o = Command::new(bin())
        .args(["merge", "--model"])
        .arg(model_dir("tiny-llama"))
        .arg("--adapter")
        .arg(&adapter)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("layers.9") && e.contains("does not have"), "{e}");
    assert!(!out.exists());
}
