//! One full LoRA-DPO optimizer step on a random model, timed: the CPU benchmark.
//!
//! Default shape = ../shared/bench/bench_torch.py's: hidden 512, 8 layers, 8 heads (8 KV),
//! intermediate 1408, vocab 32000, LoRA r16/α32 on every linear, 2 pairs of 256 prompt and
//! 256 response tokens (4 sequences × 512 = 2048 tokens a step), f32. A step is the reference
//! forward, the policy forward and backward, and AdamW. Median of `DPO_BENCH_STEPS` (5) after
//! `DPO_BENCH_WARMUP` (2).
//!
//! Knobs: `DPO_BENCH_{HIDDEN,LAYERS,HEADS,KV_HEADS,INTERMEDIATE,VOCAB,PROMPT_LEN,RESPONSE_LEN,
//! PAIRS,STEPS,WARMUP,OUT,LR,TARGETS}` (`TARGETS`: LoRA targets, default `all`); the family
//! `DPO_BENCH_ARCH`: `llama` (default) or a zoo fixture's name (llama3, mistral-hd, qwen3,
//! qwen2-yarn, gemma, gemma2, gemma3, phi3, smollm3, olmo2), whose config is used at the bench
//! shape; lever switches `DPO_BENCH_UNSHARED=1` (no prompt sharing) and `DPO_BENCH_COMPOSITE=1`
//! (the generic candle layer instead of the CPU layer op and fused head) and
//! `DPO_BENCH_CHECKPOINTING=1` (activation recomputation on either path); the loss
//! `DPO_BENCH_LOSS` (a `--loss` name, default `sigmoid`; reference-free ones — `simpo`, `cpo`,
//! `orpo` — skip the reference forward, as `train` does). Threads: `RAYON_NUM_THREADS` (default
//! 2 here).
//!
//! `cargo bench --bench dpo_step` — the last line printed is one JSON object.
mod common;
use candle_core::{Device, Tensor, Var};
use dpo::data::{PairBatch, TokenizedPair};
use dpo::lora::{LoraConfig, adapter};
use dpo::loss::{LossKind, Objective};
use dpo::model::{Architecture, CausalLm, LayerPath};
use dpo::nn::LoraMode;
use dpo::optim::AdamW;
use dpo::rng::{SeededRng, Stream};
use dpo::scoring::Reference;
use dpo::task::Task;
use dpo::train::step::global_norm;
use std::time::Instant;

fn knob(name: &str, default: usize) -> usize {
    std::env::var(format!("DPO_BENCH_{name}")).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The bench shape in the config.json of `family` (`DPO_BENCH_ARCH`): the zoo fixture's config
/// of that family with the sizes replaced and its per-layer lists dropped, so each family's own
/// features (norm placement, q/k norms, soft-capping, fused projections, GELU...) are timed.
fn bench_config(family: &str, shape: &serde_json::Value) -> Architecture {
    let mut cfg: serde_json::Value = if family == "llama" {
        serde_json::json!({"model_type": "llama", "rope_theta": 10000.0, "tie_word_embeddings": false})
    } else {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/fixtures/zoo/{family}/model/config.json"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("DPO_BENCH_ARCH={family}: no {}", path.display()));
        serde_json::from_str(&text).unwrap()
    };
    let obj = cfg.as_object_mut().unwrap();
    for key in ["layer_types", "no_rope_layers", "_sliding_window_pattern"] {
        obj.remove(key);
    }
    if obj.contains_key("sliding_window") && !obj["sliding_window"].is_null() {
        obj.insert("sliding_window".into(), 4096.into());
    }
    if let Some(p) = obj.get_mut("rope_parameters").and_then(|p| p.as_object_mut())
        && p.get("rope_type").and_then(|t| t.as_str()) == Some("longrope")
    {
        // The factor lists fit the fixture's head size: time plain partial RoPE instead.
        p.retain(|k, _| k == "rope_theta" || k == "partial_rotary_factor");
        p.insert("rope_type".into(), "default".into());
    }
    for (k, v) in shape.as_object().unwrap() {
        obj.insert(k.clone(), v.clone());
    }
    Architecture::from_json(&cfg.to_string()).unwrap()
}

/// One optimizer step, timed by phase (the device synchronised at each boundary): reference
/// forward, policy forward, backward, gradient norm + AdamW. Tracks the least free device memory.
#[allow(clippy::too_many_arguments)]
fn timed_step(
    model: &CausalLm,
    batch: &PairBatch,
    loss: &Task,
    vars: &[Var],
    opt: &mut AdamW,
    lr: f64,
    device: &Device,
    min_free: &mut Option<u64>,
) -> [f64; 4] {
    let mut marks = [0.0; 4];
    let mut t = Instant::now();
    let mut lap = |i: usize, marks: &mut [f64; 4]| {
        device.synchronize().unwrap();
        marks[i] = t.elapsed().as_secs_f64();
        if let (Some(m), Some(free)) = (min_free.as_mut(), dpo::train::memory::available(device)) {
            *m = (*m).min(free);
        }
        t = Instant::now();
    };
    let reference = Reference::computed(loss, None).logps(model, &[], batch).unwrap();
    lap(0, &mut marks);
    let dpo::scoring::Scored { loss: losses, .. } =
        dpo::scoring::score(model, batch, loss, &mut LoraMode::On, reference.as_ref()).unwrap();
    lap(1, &mut marks);
    let store = losses.mean_all().unwrap().backward().unwrap();
    let grads: Vec<Tensor> = vars.iter().map(|v| store.get(v).unwrap().clone()).collect();
    drop(store);
    lap(2, &mut marks);
    let _ = global_norm(&grads).unwrap();
    opt.step(vars, &grads, lr).unwrap();
    lap(3, &mut marks);
    marks
}

/// Total device memory (CUDA), for the used-memory figure.
fn device_total(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return candle_core::cuda_backend::cudarc::driver::result::mem_get_info().ok().map(|(_, total)| total as u64);
    }
    let _ = device;
    None
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() {
    if std::env::var("RAYON_NUM_THREADS").is_err() {
        // SAFETY: set before any thread pool starts.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "2") };
    }
    let (hidden, layers, heads) = (knob("HIDDEN", 512), knob("LAYERS", 8), knob("HEADS", 8));
    let (kv_heads, inter, vocab) = (knob("KV_HEADS", 8), knob("INTERMEDIATE", 1408), knob("VOCAB", 32000));
    let (prompt_len, response_len, pairs) = (knob("PROMPT_LEN", 256), knob("RESPONSE_LEN", 256), knob("PAIRS", 2));
    let (steps, warmup) = (knob("STEPS", 5), knob("WARMUP", 2));
    let family = std::env::var("DPO_BENCH_ARCH").unwrap_or_else(|_| "llama".into());
    let shape = serde_json::json!({
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": hidden / heads, "vocab_size": vocab, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096, "query_pre_attn_scalar": hidden / heads,
    });
    let arch = bench_config(&family, &shape);
    eprintln!("{}", arch.summary());
    let device =
        dpo::device::parse_device(&std::env::var("DPO_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into())).unwrap();
    let dtype =
        dpo::device::parse_dtype(&std::env::var("DPO_BENCH_DTYPE").unwrap_or_else(|_| "f32".into()), &device).unwrap();
    let mut model = common::random_model(&arch, &device, dtype);
    let base_params: usize = arch.weight_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    let targets = std::env::var("DPO_BENCH_TARGETS").unwrap_or_else(|_| "all".into());
    let lora = LoraConfig::new(16, 32.0, 0.0, &targets).unwrap();
    let (_, params) = adapter::attach_fresh(&mut model, &lora, 1).unwrap();
    let vars: Vec<Var> = params.iter().map(|p| p.var.clone()).collect();
    let mut rng = SeededRng::new(7, Stream::DataOrder);
    let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| 3 + rng.below(vocab as u64 - 3) as u32).collect() };
    let batch_pairs: Vec<TokenizedPair> = (0..pairs)
        .map(|_| TokenizedPair { prompt: ids(prompt_len), chosen: ids(response_len), rejected: ids(response_len) })
        .collect();
    // Lever switches, for measuring what each gives: DPO_BENCH_UNSHARED=1 (one row per
    // sequence, no prompt sharing), DPO_BENCH_COMPOSITE=1 (candle compositions, dense mask).
    let unshared = std::env::var("DPO_BENCH_UNSHARED").is_ok_and(|v| v == "1");
    let loss_name = std::env::var("DPO_BENCH_LOSS").unwrap_or_else(|_| "sigmoid".into());
    let kind =
        <LossKind as clap::ValueEnum>::from_str(&loss_name, false).unwrap_or_else(|e| panic!("DPO_BENCH_LOSS: {e}"));
    let mut loss = Objective::single(kind, 0.1);
    if kind == LossKind::ExoPair {
        loss.params.label_smoothing = 1e-3;
    }
    let loss = Task::train(loss);
    let batch = if let Task::Kto(_) = loss {
        // KTO: each pair's responses become a desirable and an undesirable example, each scored
        // with its KL completion (the previous example's), as `train` builds them.
        let examples = batch_pairs
            .iter()
            .flat_map(|p| [(p.prompt.clone(), p.chosen.clone(), true), (p.prompt.clone(), p.rejected.clone(), false)])
            .map(|(prompt, chosen, label)| (TokenizedPair { prompt, chosen, rejected: Vec::new() }, Some(label)))
            .collect();
        loss.micro_batch(examples, 0, &device).unwrap().1
    } else if unshared {
        PairBatch::unshared(&batch_pairs, 0, &device).unwrap()
    } else {
        loss.micro_batch(batch_pairs.iter().map(|p| (p.clone(), None)).collect(), 0, &device).unwrap().1
    };
    if std::env::var("DPO_BENCH_COMPOSITE").is_ok_and(|v| v == "1") {
        model = model.on_path(LayerPath::Generic);
    }
    // Recomputation: DPO_BENCH_CHECKPOINTING=1/0; by default as `train` decides (on for CUDA).
    let recompute = match std::env::var("DPO_BENCH_CHECKPOINTING") {
        Ok(v) => v == "1",
        Err(_) => device.is_cuda(),
    };
    model.set_recompute(recompute);
    let geo = dpo::train::memory::Geometry {
        rows: if unshared { 2 * pairs } else { pairs },
        row_len: if unshared { prompt_len + response_len } else { prompt_len + 2 * response_len },
        scored: 2 * pairs * response_len,
        lora_params: vars.iter().map(|v| v.elem_count()).sum(),
        lora_ranks: 16 * params.len() / 2 / layers,
    };
    let setup = dpo::train::memory::Setup {
        path: model.path(),
        dtype,
        stored_bytes: dtype.size_in_bytes(),
        recompute,
        cuda: device.is_cuda(),
    };
    let plan = dpo::train::memory::MemoryPlan::estimate(model.arch(), &setup, &geo);
    eprintln!("memory plan: {}", plan.describe());
    let mut opt = AdamW::new(&vars, 0.9, 0.999, 1e-8, 0.0).unwrap();
    let tokens = 2 * pairs * (prompt_len + response_len);

    let lr = std::env::var("DPO_BENCH_LR").ok().and_then(|v| v.parse().ok()).unwrap_or(5e-3);
    let mut times = Vec::new();
    let mut phases: Vec<[f64; 4]> = Vec::new();
    let mut min_free = dpo::train::memory::available(&device);
    for step in 0..warmup + steps {
        let p = timed_step(&model, &batch, &loss, &vars, &mut opt, lr, &device, &mut min_free);
        let s: f64 = p.iter().sum();
        eprintln!(
            "step {} {}: {s:.3} s (reference forward {:.3}, policy forward {:.3}, backward {:.3}, optimizer {:.3})",
            step + 1,
            if step < warmup { "(warm-up)" } else { "" },
            p[0],
            p[1],
            p[2],
            p[3]
        );
        if step >= warmup {
            times.push(s);
            phases.push(p);
        }
    }
    let phase_median = |i: usize| {
        let mut v: Vec<f64> = phases.iter().map(|p| p[i]).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (reference_seconds, forward_seconds, backward_seconds, optimizer_seconds) =
        (phase_median(0), phase_median(1), phase_median(2), phase_median(3));
    let policy_seconds = forward_seconds + backward_seconds;
    eprintln!(
        "reference forward {reference_seconds:.3} s, policy forward {forward_seconds:.3} s, backward {backward_seconds:.3} s, grad norm + AdamW {optimizer_seconds:.3} s"
    );
    let reference = Reference::computed(&loss, None).logps(&model, &[], &batch).unwrap();
    if std::env::var("DPO_BENCH_PROFILE").is_ok() {
        for _ in 0..2 {
            let t = Instant::now();
            let dpo::scoring::Scored { loss: losses, .. } =
                dpo::scoring::score(&model, &batch, &loss, &mut LoraMode::On, reference.as_ref()).unwrap();
            let fwd = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let g = losses.mean_all().unwrap().backward().unwrap();
            let bwd = t.elapsed().as_secs_f64();
            let t = Instant::now();
            drop(g);
            drop(losses);
            eprintln!("policy forward {fwd:.3} s, backward {bwd:.3} s, drop {:.3} s", t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = times[times.len() / 2];
    // 2·N FLOPs per token for each forward (reference, policy) and for the input-gradient backward.
    let passes = if loss.needs_reference() { 3.0 } else { 2.0 };
    let flops = 2.0 * passes * base_params as f64 * tokens as f64;
    let result = serde_json::json!({
        "impl": "dpo (candle)",
        "median_step_seconds": median,
        "step_seconds": times,
        "tokens_per_step": tokens,
        "tokens_per_second": tokens as f64 / median,
        "peak_rss_mib": peak_rss_mib(),
        "planned_peak_mib": plan.total_mib(),
        "reference_forward_seconds": reference_seconds,
        "policy_forward_seconds": forward_seconds,
        "backward_seconds": backward_seconds,
        "policy_forward_backward_seconds": policy_seconds,
        "optimizer_seconds": optimizer_seconds,
        "device": format!("{device:?}"),
        "dtype": format!("{dtype:?}"),
        "base_params": base_params,
        "loss": loss_name,
        "reference_forward": loss.needs_reference(),
        "model_tflops_per_step": flops / 1e12,
        "mfu_at_790_tflops": flops / median / 790e12,
        "device_memory_used_mib_at_phase_ends": min_free.zip(device_total(&device)).map(|(free, total)| (total - free) as f64 / 1048576.0),
        "threads": std::env::var("RAYON_NUM_THREADS").unwrap_or_default(),
        "prompt_sharing": !unshared,
        "arch": family,
        "recompute": recompute,
        "layer_path": format!("{:?}", model.path()),
        "shape": {"hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads, "intermediate": inter,
                  "vocab": vocab, "prompt_len": prompt_len, "response_len": response_len, "pairs": pairs, "lora_r": 16},
    });
    println!(
        "median {median:.3} s/step, {:.1} tokens/s, peak RSS {:.0} MiB (plan {:.0} MiB, {:+.0}%)",
        tokens as f64 / median,
        peak_rss_mib(),
        plan.total_mib(),
        100.0 * (plan.total_mib() / peak_rss_mib() - 1.0)
    );
    if let Ok(path) = std::env::var("DPO_BENCH_OUT") {
        std::fs::write(path, serde_json::to_string_pretty(&result).unwrap()).unwrap();
    }
    println!("{result}");
}
