//! Shared helpers for the integration tests: fixture paths, golden values, model loading.
#![allow(dead_code)]
use candle_core::{DType, Device, Tensor};
use dpo::data::{PairBatch, TokenizedPair};
use dpo::lora::adapter::{self, NamedParam};
use dpo::model::CausalLm;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// tests/fixtures (`DPO_FIXTURES` overrides it, for test binaries run away from the checkout
/// they were built in, e.g. on a GPU machine).
pub fn fixtures() -> PathBuf {
    match std::env::var("DPO_FIXTURES") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub fn golden_dir(name: &str) -> PathBuf {
    fixtures().join("golden").join(name)
}

pub fn orca(split: &str) -> PathBuf {
    fixtures().join(format!("data/orca_dpo_pairs/{split}.jsonl"))
}

pub fn golden() -> serde_json::Value {
    read_json(&fixtures().join("golden/golden.json"))
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The 8 golden pairs' token ids, as golden.json records them.
pub fn golden_pairs() -> Vec<TokenizedPair> {
    golden()["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| TokenizedPair {
            prompt: u32s(&p["prompt_ids"]),
            chosen: u32s(&p["chosen_ids"]),
            rejected: u32s(&p["rejected_ids"]),
        })
        .collect()
}

pub fn load(model: &str) -> CausalLm {
    CausalLm::load(&model_dir(model), DType::F32, &Device::Cpu).unwrap()
}

/// A model with the golden peft adapter of `golden_model` attached.
pub fn load_with_golden_adapter(model: &str, golden_model: &str) -> (CausalLm, Vec<NamedParam>) {
    let mut m = load(model);
    let (_, params) = adapter::attach_from_dir(&mut m, &golden_dir(golden_model).join("adapter"), None).unwrap();
    (m, params)
}

pub fn batch(pairs: &[TokenizedPair]) -> PairBatch {
    PairBatch::new(pairs, 3, &Device::Cpu).unwrap()
}

pub fn load_safetensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

pub fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

pub fn assert_close(what: &str, got: &[f64], want: &[f64], abs_tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= abs_tol, "{what}[{i}]: got {g}, want {w} (|Δ| {} > {abs_tol})", (g - w).abs());
    }
}

pub fn assert_rel(what: &str, got: f64, want: f64, rel_tol: f64) {
    let err = (got - want).abs() / want.abs().max(1e-12);
    assert!(err <= rel_tol, "{what}: got {got}, want {want} (rel {err:e} > {rel_tol:e})");
}

/// The fixtures' own comparison rule (tests/fixtures/README.md, "TRL cross-check"):
/// `|a − b| ≤ tol · max(1, |b|)`. Relative for large values; for metrics near zero that are
/// differences of two ~−60 log-probs (rewards/rejected ≈ 0.0014) a pure relative bound would ask
/// for bit-identical float32 sums — TRL itself differs from the golden value by 1e-4 relative there.
pub fn assert_fixture_close(what: &str, got: f64, want: f64, tol: f64) {
    let err = (got - want).abs();
    assert!(err <= tol * want.abs().max(1.0), "{what}: got {got}, want {want} (|Δ| {err:e} > {tol:e}·max(1,|want|))");
}

/// `OUTPUT/metrics.jsonl` without `tokens_per_sec`, the one field no two runs share.
pub fn metrics_without_timing(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("tokens_per_sec");
            v
        })
        .collect()
}

/// A fresh scratch folder under target/ (removed first if a previous run left it).
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dpo"))
}

/// The ten model families of tests/fixtures/zoo (tiny random models made with transformers 5.24).
pub const ZOO: [&str; 10] =
    ["llama3", "mistral-hd", "qwen3", "qwen2-yarn", "gemma", "gemma2", "gemma3", "phi3", "smollm3", "olmo2"];

pub fn zoo_dir(family: &str) -> PathBuf {
    fixtures().join("zoo").join(family)
}

pub fn zoo_golden() -> serde_json::Value {
    read_json(&fixtures().join("zoo/golden.json"))
}

/// The 8 pairs a zoo family's golden values were computed on.
pub fn zoo_pairs(golden: &serde_json::Value) -> Vec<TokenizedPair> {
    let ids = |key: &str| -> Vec<Vec<u32>> { golden[key].as_array().unwrap().iter().map(u32s).collect() };
    let (p, c, r) = (ids("prompt_ids"), ids("chosen_ids"), ids("rejected_ids"));
    (0..p.len()).map(|i| TokenizedPair { prompt: p[i].clone(), chosen: c[i].clone(), rejected: r[i].clone() }).collect()
}

/// A zoo model with its golden all-linear adapter, on the given layer path.
pub fn load_zoo(family: &str, path: dpo::model::LayerPath) -> (CausalLm, Vec<NamedParam>) {
    let mut m = CausalLm::load(&zoo_dir(family).join("model"), DType::F32, &Device::Cpu).unwrap();
    m.set_path(path);
    assert_eq!(m.path(), path, "{family}: the CPU op refused a family it should run");
    let (_, params) = adapter::attach_from_dir(&mut m, &zoo_dir(family).join("adapter"), None).unwrap();
    (m, params)
}

/// `|got − want| ≤ tol·|want|` over whole tensors (the gradient rule: within tol of the norm).
pub fn norm_close(got: &[f64], want: &[f64], tol: f64) -> Result<(), String> {
    let norm = want.iter().map(|x| x * x).sum::<f64>().sqrt();
    let diff = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
    if got.len() == want.len() && diff <= tol * norm.max(1e-12) {
        Ok(())
    } else {
        Err(format!("|Δ| {diff:e} vs {tol:e}·|g| {norm:e}"))
    }
}

/// The dpo binary as a script runs it, from the repository root. `--stop-after-steps N` among
/// the arguments becomes the testing hook `DPO_STOP_AFTER_STEPS=N` ("stop as if killed after
/// step N"); the layer-path switch is cleared so a test's environment never leaks in.
pub fn dpo_command<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin());
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove(dpo::model::causal_lm::PATH_ENV)
        .env_remove("DPO_STOP_AFTER_STEPS");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a.as_ref() == "--stop-after-steps" {
            cmd.env("DPO_STOP_AFTER_STEPS", it.next().expect("--stop-after-steps N"));
        } else {
            cmd.arg(a);
        }
    }
    cmd
}

/// Runs [`dpo_command`] and returns its output.
pub fn dpo<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    dpo_command(args).output().unwrap()
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `train` settings on tiny-llama and the orca train split, into `out`, plus `extra` flags.
pub fn train_args(out: &Path, extra: &[&str]) -> dpo::config::TrainArgs {
    use clap::Parser;
    let (model, data) = (model_dir("tiny-llama"), orca("train"));
    let base = ["train", "--model", p(&model), "--dataset", p(&data), "--output-dir", p(out)];
    dpo::config::TrainArgs::try_parse_from([&base[..], extra].concat()).unwrap()
}
