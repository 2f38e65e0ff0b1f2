//! Shared helpers for the integration tests: fixture paths, golden values, model loading.
#![allow(dead_code)]
use candle_core::{DType, Device, Tensor};
use dpo::data::{PairBatch, TokenizedPair};
use dpo::lora::adapter::{self, NamedParam};
use dpo::model::{CausalLm, LayerPath};
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
    load_on(model, LayerPath::CpuOp)
}

/// A fixture model on the layer path `path` asks for.
pub fn load_on(model: &str, path: LayerPath) -> CausalLm {
    CausalLm::load(&model_dir(model), DType::F32, &Device::Cpu, path).unwrap()
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

/// The pairs laid out as `task` lays out a micro-batch (LD-DPO's weights, ORPO's prompt tokens).
pub fn task_batch(task: &dpo::task::Task, pairs: &[TokenizedPair]) -> PairBatch {
    task.micro_batch(pairs.iter().map(|p| (p.clone(), None)).collect(), 3, &Device::Cpu).unwrap().1
}

pub fn load_safetensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

pub fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// Tolerance of [`all_close`]: element i passes when `|got[i] − want[i]| ≤ abs + rel·|want[i]|`.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub abs: f64,
    pub rel: f64,
}

impl Tol {
    pub const fn abs(abs: f64) -> Tol {
        Tol { abs, rel: 0.0 }
    }
    pub const fn rel(rel: f64) -> Tol {
        Tol { abs: 0.0, rel }
    }
}

/// Equal lengths and every value finite on both sides, else why not. A NaN fails every `<=` but
/// vanishes in `fold(0.0, f64::max)`: any comparison must reject it first, and say so.
pub fn comparable(what: &str, got: &[f64], want: &[f64]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values computed, {} golden", got.len(), want.len()));
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if !g.is_finite() || !w.is_finite() {
            let at = if got.len() == 1 { String::new() } else { format!("[{i}]") };
            return Err(format!("{what}{at}: got {g}, want {w}: a non-finite value (NaN/inf) on either side fails"));
        }
    }
    Ok(())
}

/// `max |got − want|`, after [`comparable`].
pub fn max_abs_diff(what: &str, got: &[f64], want: &[f64]) -> Result<f64, String> {
    comparable(what, got, want)?;
    Ok(got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0, f64::max))
}

/// `max |got − want| / |want|`, after [`comparable`] (an exact 0 wanted: 0 if equal, else ∞).
pub fn max_rel_diff(what: &str, got: &[f64], want: &[f64]) -> Result<f64, String> {
    comparable(what, got, want)?;
    let rel = |g: f64, w: f64| if g == w { 0.0 } else { (g - w).abs() / w.abs() };
    Ok(got.iter().zip(want).map(|(g, w)| rel(*g, *w)).fold(0.0, f64::max))
}

/// The one elementwise comparison: lengths, then finiteness (both sides), then
/// `|got − want| ≤ tol.abs + tol.rel·|want|` everywhere; the error names `what`, how many elements
/// failed and the worst one (largest excess over its bound) with its index.
pub fn all_close(what: &str, got: &[f64], want: &[f64], tol: Tol) -> Result<(), String> {
    comparable(what, got, want)?;
    // A NaN bound would pass everything.
    if !(tol.abs >= 0.0 && tol.rel >= 0.0 && tol.abs.is_finite() && tol.rel.is_finite()) {
        return Err(format!("{what}: tolerance {tol:?} is not a finite non-negative bound"));
    }
    let mut bad = 0;
    let mut worst: Option<(usize, f64)> = None;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let excess = (g - w).abs() - (tol.abs + tol.rel * w.abs());
        if excess > 0.0 {
            bad += 1;
            if worst.is_none_or(|(_, e)| excess > e) {
                worst = Some((i, excess));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some((i, _)) => {
            let (g, w) = (got[i], want[i]);
            Err(format!(
                "{what}: {bad} of {} elements outside |Δ| ≤ {:e} + {:e}·|want|; worst [{i}]: got {g}, want {w} (|Δ| {:e})",
                got.len(),
                tol.abs,
                tol.rel,
                (g - w).abs()
            ))
        }
    }
}

pub fn assert_all_close(what: &str, got: &[f64], want: &[f64], tol: Tol) {
    if let Err(e) = all_close(what, got, want, tol) {
        panic!("{e}");
    }
}

pub fn assert_close(what: &str, got: &[f64], want: &[f64], abs_tol: f64) {
    assert_all_close(what, got, want, Tol::abs(abs_tol));
}

/// `|got − want| ≤ rel_tol·max(|want|, 1e-12)`; NaN or inf on either side fails.
pub fn assert_rel(what: &str, got: f64, want: f64, rel_tol: f64) {
    comparable(what, &[got], &[want]).unwrap_or_else(|e| panic!("{e}"));
    let err = (got - want).abs() / want.abs().max(1e-12);
    assert!(err <= rel_tol, "{what}: got {got}, want {want} (rel {err:e} > {rel_tol:e})");
}

/// The fixtures' own comparison rule (tests/fixtures/README.md, "TRL cross-check"):
/// `|a − b| ≤ tol · max(1, |b|)`. Relative for large values; for metrics near zero that are
/// differences of two ~−60 log-probs (rewards/rejected ≈ 0.0014) a pure relative bound would ask
/// for bit-identical float32 sums — TRL itself differs from the golden value by 1e-4 relative there.
/// NaN or inf on either side fails.
pub fn assert_fixture_close(what: &str, got: f64, want: f64, tol: f64) {
    comparable(what, &[got], &[want]).unwrap_or_else(|e| panic!("{e}"));
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
    let mut m = CausalLm::load(&zoo_dir(family).join("model"), DType::F32, &Device::Cpu, path).unwrap();
    assert_eq!(m.path(), path, "{family}: the CPU op refused a family it should run");
    let (_, params) = adapter::attach_from_dir(&mut m, &zoo_dir(family).join("adapter"), None).unwrap();
    (m, params)
}

/// `|got − want| ≤ tol·|want|` over whole tensors (the gradient rule: within tol of the norm),
/// after [`comparable`] (lengths, and NaN or inf on either side fails).
pub fn norm_close(got: &[f64], want: &[f64], tol: f64) -> Result<(), String> {
    comparable("tensor", got, want)?;
    let norm = want.iter().map(|x| x * x).sum::<f64>().sqrt();
    let diff = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
    if diff <= tol * norm.max(1e-12) { Ok(()) } else { Err(format!("|Δ| {diff:e} vs {tol:e}·|g| {norm:e}")) }
}

/// The dpo binary as a script runs it, from the repository root. `--stop-after-steps N` among
/// the arguments becomes the testing hook `DPO_STOP_AFTER_STEPS=N` ("stop as if killed after
/// step N"); the layer-path switch is cleared so a test's environment never leaks in.
pub fn dpo_command<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin());
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove(dpo::cli::LAYER_PATH_ENV)
        .env_remove(dpo::cli::STOP_AFTER_STEPS_ENV);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a.as_ref() == "--stop-after-steps" {
            cmd.env(dpo::cli::STOP_AFTER_STEPS_ENV, it.next().expect("--stop-after-steps N"));
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

/// `(reused, computed)` from the one `reference cache: N pairs reused, M computed` line a run
/// prints on stderr (parsed, not substring-matched: "12 computed" is also in "112 computed").
pub fn ref_cache_counts(stderr: &str) -> (usize, usize) {
    let lines: Vec<&str> = stderr.lines().filter_map(|l| l.trim().strip_prefix("reference cache: ")).collect();
    assert_eq!(lines.len(), 1, "want one reference cache line on stderr:\n{stderr}");
    let parsed = lines[0]
        .strip_suffix(" computed")
        .and_then(|l| l.split_once(" pairs reused, "))
        .and_then(|(n, m)| Some((n.parse().ok()?, m.parse().ok()?)));
    parsed.unwrap_or_else(|| panic!("unparsable reference cache line {:?}", lines[0]))
}

/// How long a test waits on a child `dpo` before it kills it and fails.
pub const CHILD_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

/// A running `dpo` whose stderr is drained on a thread (a full pipe cannot stall it, and the
/// text is there to show when it dies early), waited on with deadlines only.
pub struct Running {
    child: std::process::Child,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    started: std::time::Instant,
}

impl Running {
    pub fn spawn(cmd: &mut std::process::Command) -> Running {
        use std::io::Read;
        let mut child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        let mut pipe = child.stderr.take().unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Running { child, stderr, reader: Some(reader), started: std::time::Instant::now() }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Its stderr so far (all of it once it has exited).
    pub fn stderr(&mut self) -> String {
        if self.child.try_wait().unwrap().is_some() {
            if let Some(r) = self.reader.take() {
                r.join().unwrap();
            }
        }
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Polls `ready` while the child runs; fails at once if the child exits first, and after
    /// [`CHILD_DEADLINE`] (killing it), naming `what` it waited for.
    pub fn wait_until(&mut self, what: &str, mut ready: impl FnMut() -> bool) {
        loop {
            if ready() {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("dpo exited ({status}) before {what}; stderr:\n{}", self.stderr());
            }
            self.fail_after_deadline(what);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Lets the child run for `d` (or until it exits: its status then).
    pub fn run_for(&mut self, d: std::time::Duration) -> Option<std::process::ExitStatus> {
        let until = std::time::Instant::now() + d;
        while std::time::Instant::now() < until {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(5).min(until - std::time::Instant::now()));
        }
        self.child.try_wait().unwrap()
    }

    /// SIGKILL (if still running), then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        self.wait("the killed dpo to be reaped");
    }

    /// Waits for the exit within [`CHILD_DEADLINE`] of the start; kills it and fails after.
    pub fn wait(&mut self, what: &str) -> (std::process::ExitStatus, String) {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.stderr());
            }
            self.fail_after_deadline(what);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn fail_after_deadline(&mut self, what: &str) {
        if self.started.elapsed() > CHILD_DEADLINE {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!("waited {:?} for {what}; killed dpo; stderr:\n{}", CHILD_DEADLINE, self.stderr());
        }
    }
}

impl Drop for Running {
    // A test that fails mid-wait leaves no dpo behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// [`dpo_command`] run to completion within [`CHILD_DEADLINE`]: (status, stderr).
pub fn dpo_bounded<S: AsRef<std::ffi::OsStr>>(what: &str, args: &[S]) -> (std::process::ExitStatus, String) {
    Running::spawn(&mut dpo_command(args)).wait(what)
}
