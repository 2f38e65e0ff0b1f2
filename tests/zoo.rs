//! The ten model families of tests/fixtures/zoo against their transformers + peft golden values,
//! on both layer paths (the CPU layer op and the generic candle layer).
mod common;
use common::*;
use dpo::loss::{LossKind, Objective};
use dpo::model::LayerPath;
use dpo::nn::LoraMode;
use dpo::scoring::score_batch as score;
use dpo::task::Task;

const PATHS: [LayerPath; 2] = [LayerPath::CpuOp, LayerPath::Generic];

/// Reference and policy log-probs of the 8 golden pairs, and the LoRA gradients of the mean
/// sigmoid loss, for one family on one path: the failures, if any.
fn check_family(family: &str, path: LayerPath, golden: &serde_json::Value) -> Vec<String> {
    let g = &golden[family];
    let (model, params) = load_zoo(family, path);
    let pairs = zoo_pairs(g);
    let batch = batch(&pairs);
    let loss = Task::Preference(Objective::single(LossKind::Sigmoid, 0.1));
    let dpo::scoring::Scored { logps, loss: losses, .. } = score(&model, &batch, &loss, &mut LoraMode::On).unwrap();
    let mut failures = Vec::new();
    let mut close = |what: &str, got: &candle_core::Tensor, want: &serde_json::Value, tol: f64| {
        let (got, want) = (to_vec(got), f64s(want));
        if let Err(e) = all_close(&format!("{family} {path:?} {what}"), &got, &want, Tol::abs(tol)) {
            failures.push(format!("{e}\n  got  {got:?}\n  want {want:?}"));
        }
    };
    close("ref chosen", &logps.ref_chosen, &g["ref_logps"]["chosen"], 1e-4);
    close("ref rejected", &logps.ref_rejected, &g["ref_logps"]["rejected"], 1e-4);
    close("policy chosen", &logps.policy_chosen, &g["policy_logps"]["chosen"], 1e-4);
    close("policy rejected", &logps.policy_rejected, &g["policy_logps"]["rejected"], 1e-4);
    let grads = losses.mean_all().unwrap().backward().unwrap();
    let want = load_safetensors(&zoo_dir(family).join("grads_sigmoid_mean.safetensors"));
    if want.len() != params.len() {
        failures.push(format!("{family}: {} golden gradients for {} LoRA tensors", want.len(), params.len()));
    }
    for p in &params {
        let got = grads.get(&p.var).map(to_vec).unwrap_or_default();
        if let Err(e) = norm_close(&got, &to_vec(&want[&p.name]), 1e-4) {
            failures.push(format!("{family} {path:?} grad {}: {e}", p.name));
        }
    }
    failures
}

#[test]
fn every_family_matches_golden_logps_and_gradients_on_both_paths() {
    let golden = zoo_golden();
    let failures: Vec<String> =
        ZOO.iter().flat_map(|f| PATHS.iter().flat_map(|p| check_family(f, *p, &golden)).collect::<Vec<_>>()).collect();
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// The zoo's 5-step run through the CLI (golden adapter, AdamW lr 0.01, constant, no clipping,
/// batch 4 in file order), on the default path and with `DPO_LAYER_PATH=generic`: per-step
/// losses and gradient norms, and the final LoRA weights.
#[test]
fn every_family_reproduces_the_five_step_run_on_both_paths() {
    let golden = zoo_golden();
    let mut failures = Vec::new();
    for family in ZOO {
        for generic in [false, true] {
            let out = scratch(&format!("zoo_train_{family}_{generic}"));
            let mut cmd = std::process::Command::new(bin());
            cmd.arg("train").arg("--model").arg(zoo_dir(family).join("model")).arg("--dataset").arg(orca("train"));
            cmd.arg("--init-adapter").arg(zoo_dir(family).join("adapter")).arg("--output-dir").arg(&out);
            cmd.args(["--template", "orca", "--lr", "0.01", "--lr-scheduler", "constant", "--max-grad-norm", "0"]);
            cmd.args(["--weight-decay", "0", "--batch-size", "4", "--no-shuffle", "--beta", "0.1", "--max-steps", "5"]);
            if generic {
                cmd.env(dpo::cli::LAYER_PATH_ENV, "generic");
            } else {
                cmd.env_remove(dpo::cli::LAYER_PATH_ENV);
            }
            let o = cmd.output().unwrap();
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{family}: {stderr}");
            let path = if generic { "generic path" } else { "CPU-op path" };
            assert!(stderr.contains(path), "{family}: expected the {path}:\n{stderr}");
            let steps = metrics_without_timing(&out);
            let want_steps = golden[family]["train"].as_array().unwrap();
            for key in ["loss", "grad_norm"] {
                let column = |rows: &[serde_json::Value]| -> Vec<f64> {
                    rows.iter().map(|r| r[key].as_f64().unwrap_or(f64::NAN)).collect()
                };
                let what = format!("{family} {path} per-step {key}");
                if let Err(e) = all_close(&what, &column(&steps), &column(want_steps), Tol::abs(1e-4)) {
                    failures.push(e);
                }
            }
            let trained = load_safetensors(&out.join("adapter_model.safetensors"));
            let want = load_safetensors(&zoo_dir(family).join("lora_after_step5.safetensors"));
            assert_eq!(trained.len(), want.len(), "{family}");
            for (k, w) in &want {
                let Some(t) = trained.get(k) else {
                    failures.push(format!("{family} {path}: {k} missing from the trained adapter"));
                    continue;
                };
                if let Err(e) = all_close(&format!("{family} {path} {k}"), &to_vec(t), &to_vec(w), Tol::abs(1e-4)) {
                    failures.push(e);
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// `dpo eval` with the golden adapter: the first 8 training pairs' four log-probs.
#[test]
fn dpo_eval_gives_golden_logps_for_every_family() {
    let golden = zoo_golden();
    let mut failures = Vec::new();
    for family in ZOO {
        let out = scratch(&format!("zoo_eval_{family}")).join("pairs.jsonl");
        let (model, adapter, data) = (zoo_dir(family).join("model"), zoo_dir(family).join("adapter"), orca("train"));
        let o = dpo(&[
            "eval".as_ref(),
            "--model".as_ref(),
            model.as_os_str(),
            "--dataset".as_ref(),
            data.as_os_str(),
            "--adapter".as_ref(),
            adapter.as_os_str(),
            "--template".as_ref(),
            "orca".as_ref(),
            "--output".as_ref(),
            out.as_os_str(),
        ]);
        assert!(o.status.success(), "{family}: {}", String::from_utf8_lossy(&o.stderr));
        let rows: Vec<serde_json::Value> =
            std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let g = &golden[family];
        for (key, want) in [
            ("reference_chosen_logp", &g["ref_logps"]["chosen"]),
            ("reference_rejected_logp", &g["ref_logps"]["rejected"]),
            ("policy_chosen_logp", &g["policy_logps"]["chosen"]),
            ("policy_rejected_logp", &g["policy_logps"]["rejected"]),
        ] {
            let want = f64s(want);
            // The golden pairs are the file's first rows; a short output fails on the lengths.
            let got: Vec<f64> = rows.iter().take(want.len()).map(|r| r[key].as_f64().unwrap_or(f64::NAN)).collect();
            if let Err(e) = all_close(&format!("{family} eval {key}"), &got, &want, Tol::abs(1e-4)) {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// `dpo merge` of the golden adapter: the merged model alone scores like the golden policy, for
/// every family (fused Phi-3 linears, tied heads and Gemma's offset norms included).
#[test]
fn merged_model_scores_like_base_plus_adapter_for_every_family() {
    let golden = zoo_golden();
    let mut failures = Vec::new();
    for family in ZOO {
        let out = scratch(&format!("zoo_merge_{family}")).join("merged");
        let (model, adapter) = (zoo_dir(family).join("model"), zoo_dir(family).join("adapter"));
        let o = dpo(&[
            "merge".as_ref(),
            "--model".as_ref(),
            model.as_os_str(),
            "--adapter".as_ref(),
            adapter.as_os_str(),
            "--output".as_ref(),
            out.as_os_str(),
        ]);
        assert!(o.status.success(), "{family}: {}", String::from_utf8_lossy(&o.stderr));
        let merged = dpo::model::CausalLm::load(
            &out,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
            dpo::model::LayerPath::CpuOp,
        )
        .unwrap();
        let g = &golden[family];
        let logps = to_vec(&dpo::scoring::response_logps(&merged, &batch(&zoo_pairs(g)), &mut LoraMode::Off).unwrap());
        let want = [f64s(&g["policy_logps"]["chosen"]), f64s(&g["policy_logps"]["rejected"])].concat();
        if let Err(e) = all_close(&format!("{family} merged log-probs"), &logps, &want, Tol::abs(1e-4)) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A transformers-5 config.json rewritten to the keys most Hub files still carry: `rope_theta` +
/// `rope_scaling` (`type` or `rope_type`), top-level `partial_rotary_factor`, Gemma 3's
/// `rope_local_base_freq` and `sliding_window_pattern`, Gemma's legacy `hidden_act: gelu`,
/// `torch_dtype`, and no `layer_types` / `no_rope_layers` (each family's default rule).
fn to_older_keys(family: &str, cfg: &serde_json::Value) -> serde_json::Value {
    let mut old = cfg.clone();
    let o = old.as_object_mut().unwrap();
    if let Some(d) = o.remove("dtype") {
        o.insert("torch_dtype".into(), d);
    }
    let types: Option<Vec<String>> = o.remove("layer_types").map(|t| serde_json::from_value(t).unwrap());
    o.remove("no_rope_layers");
    o.remove("_sliding_window_pattern");
    let rope = o.remove("rope_parameters").unwrap();
    // A flat rope dict → rope_theta (+ partial_rotary_factor) + rope_scaling with the old `type` key.
    let flatten = |o: &mut serde_json::Map<String, serde_json::Value>,
                   mut r: serde_json::Map<String, serde_json::Value>,
                   theta_key: &str| {
        o.insert(theta_key.into(), r.remove("rope_theta").unwrap());
        if let Some(p) = r.remove("partial_rotary_factor") {
            o.insert("partial_rotary_factor".into(), p);
        }
        let kind = r.remove("rope_type").unwrap();
        if kind != "default" {
            let type_key = if kind == "llama3" { "rope_type" } else { "type" };
            r.insert(type_key.into(), kind);
            r.remove(if family == "phi3" { "original_max_position_embeddings" } else { "" });
            o.insert("rope_scaling".into(), r.into());
        }
    };
    if family == "gemma3" {
        let mut nested = rope.as_object().unwrap().clone();
        let sliding = nested.remove("sliding_attention").unwrap();
        o.insert("rope_local_base_freq".into(), sliding["rope_theta"].clone());
        flatten(o, nested.remove("full_attention").unwrap().as_object().unwrap().clone(), "rope_theta");
        let types = types.unwrap();
        let pattern = types.iter().position(|t| t == "full_attention").unwrap() + 1;
        assert!(types.iter().enumerate().all(|(i, t)| (t == "full_attention") == ((i + 1) % pattern == 0)));
        o.insert("sliding_window_pattern".into(), pattern.into());
    } else {
        flatten(o, rope.as_object().unwrap().clone(), "rope_theta");
    }
    if family == "gemma" {
        o.remove("hidden_activation");
        o.insert("hidden_act".into(), "gelu".into());
    }
    old
}

#[test]
fn older_hub_keys_resolve_to_the_same_architecture_and_numbers() {
    let golden = zoo_golden();
    for family in ZOO {
        let src = zoo_dir(family).join("model");
        let new: serde_json::Value = read_json(&src.join("config.json"));
        let old = to_older_keys(family, &new);
        assert!(old.get("rope_parameters").is_none() && old.get("rope_theta").is_some(), "{family}: {old}");
        let (a, b) = (
            dpo::model::Architecture::from_json(&new.to_string()).unwrap(),
            dpo::model::Architecture::from_json(&old.to_string()).unwrap(),
        );
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "{family}: older keys resolve differently\n{old}");
        // And the numbers, through a model folder holding the rewritten config.
        let dir = scratch(&format!("zoo_old_keys_{family}"));
        for f in ["model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&old).unwrap()).unwrap();
        let mut m = dpo::model::CausalLm::load(
            &dir,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
            dpo::model::LayerPath::CpuOp,
        )
        .unwrap();
        dpo::lora::adapter::attach_from_dir(&mut m, &zoo_dir(family).join("adapter"), None).unwrap();
        let g = &golden[family];
        let got = to_vec(&dpo::scoring::response_logps(&m, &batch(&zoo_pairs(g)), &mut LoraMode::On).unwrap());
        let want = [f64s(&g["policy_logps"]["chosen"]), f64s(&g["policy_logps"]["rejected"])].concat();
        assert_close(&format!("{family} (older keys) policy logps"), &got, &want, 1e-4);
    }
}

/// `--lora-targets` per family: `all` is every linear the family has (peft's all-linear), and
/// on Phi-3 the parts of a fused linear name the fused one; the adapter is written under peft's
/// key names with the fused shapes.
#[test]
fn lora_targets_follow_each_familys_linears() {
    let phi3 = dpo::model::Architecture::from_file(&zoo_dir("phi3").join("model/config.json")).unwrap();
    let gemma = dpo::model::Architecture::from_file(&zoo_dir("gemma").join("model/config.json")).unwrap();
    let resolve = |targets: &str, arch: &dpo::model::Architecture| {
        dpo::lora::LoraConfig::new(4, 8.0, 0.0, targets).unwrap().resolve(arch).map(|c| c.targets)
    };
    assert_eq!(resolve("all", &phi3).unwrap(), ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]);
    assert_eq!(
        resolve("all", &gemma).unwrap(),
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    );
    assert_eq!(resolve("q,v", &phi3).unwrap(), ["qkv_proj"]);
    assert_eq!(resolve("up,down", &phi3).unwrap(), ["gate_up_proj", "down_proj"]);
    let e = format!("{:#}", resolve("qkv", &gemma).unwrap_err());
    assert!(
        e.contains("qkv_proj") && e.contains("q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
        "{e}"
    );
    assert!(dpo::lora::LoraConfig::new(4, 8.0, 0.0, "fc1").is_err());

    // Through the CLI: the default targets (q, v) train Phi-3's qkv_proj.
    let out = scratch("zoo_phi3_targets");
    let (model, data) = (zoo_dir("phi3").join("model"), orca("train"));
    let o = dpo(&[
        "train".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--dataset".as_ref(),
        data.as_os_str(),
        "--output-dir".as_ref(),
        out.as_os_str(),
        "--max-steps".as_ref(),
        "1".as_ref(),
        "--lora-r".as_ref(),
        "4".as_ref(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["target_modules"], serde_json::json!(["qkv_proj"]));
    let tensors = load_safetensors(&out.join("adapter_model.safetensors"));
    let b = &tensors["base_model.model.model.layers.1.self_attn.qkv_proj.lora_B.weight"];
    assert_eq!(b.dims(), &[phi3.q_width() + 2 * phi3.kv_width(), 4]);
    assert_eq!(tensors.len(), 2 * phi3.num_layers);
}
