//! Every preference loss against TRL 1.16 (tests/fixtures/golden_losses): per-pair and batch
//! losses, the metrics TRL logs, the LoRA gradients — in the library and through the CLI
//! (`dpo eval --loss …`, a one-step `dpo train --loss …`) — and the usage errors of bad
//! combinations.
mod common;
use common::*;
use dpo::data::TokenizedPair;
use dpo::loss::{Metrics, Objective};
use dpo::nn::LoraMode;
use dpo::scoring::score_batch;
use dpo::task::Task;
use std::path::PathBuf;

fn golden_losses() -> serde_json::Value {
    read_json(&fixtures().join("golden_losses/golden_losses.json"))
}

/// The flags that give each golden configuration's TRL settings (`trl_config` in the JSON).
fn flags_of(config: &str) -> Vec<&'static str> {
    let ls = ["--label-smoothing", "0.1"];
    match config {
        "sigmoid" | "hinge" | "ipo" | "nca_pair" | "bco_pair" | "sppo_hard" | "apo_zero" | "apo_down" | "sft"
        | "sigmoid_norm" => {
            vec![
                "--loss",
                [
                    "sigmoid",
                    "hinge",
                    "ipo",
                    "nca_pair",
                    "bco_pair",
                    "sppo_hard",
                    "apo_zero",
                    "apo_down",
                    "sft",
                    "sigmoid_norm",
                ]
                .into_iter()
                .find(|n| *n == config)
                .unwrap(),
            ]
        }
        "exo_pair" => [&["--loss", "exo_pair"][..], &ls].concat(),
        "robust" => [&["--loss", "robust"][..], &ls].concat(),
        "aot" => [&["--loss", "aot"][..], &ls].concat(),
        "aot_unpaired" => [&["--loss", "aot_unpaired"][..], &ls].concat(),
        "discopop" => vec!["--loss", "discopop", "--discopop-tau", "0.05"],
        "sigmoid_forward_kl" => vec!["--loss", "sigmoid", "--f-divergence", "forward_kl"],
        "sigmoid_js_divergence" => vec!["--loss", "sigmoid", "--f-divergence", "js_divergence"],
        "sigmoid_alpha_divergence_0.5" => {
            vec!["--loss", "sigmoid", "--f-divergence", "alpha_divergence", "--f-alpha", "0.5"]
        }
        "multi_sigmoid1.0_sft0.5" => vec!["--loss", "sigmoid,sft", "--loss-weights", "1.0,0.5"],
        "multi_sigmoid0.8_bco_pair0.2" => vec!["--loss", "sigmoid,bco_pair", "--loss-weights", "0.8,0.2"],
        "sigmoid_ld_alpha0.5" => vec!["--loss", "sigmoid", "--ld-alpha", "0.5"],
        "sigmoid_wpo" => vec!["--loss", "sigmoid", "--use-weighting"],
        "cpo_simpo" => vec!["--loss", "simpo", "--simpo-gamma", "0.5", "--cpo-alpha", "0"],
        "cpo_sigmoid" => vec!["--loss", "cpo", "--cpo-alpha", "1.0"],
        "orpo" => vec!["--loss", "orpo"],
        other => panic!("golden configuration {other} has no flags here: add it"),
    }
}

fn objective_of(config: &str) -> Objective {
    let out = scratch("losses_unused");
    let args = train_args(&out, &[&flags_of(config)[..], &["--beta", "0.1"]].concat());
    args.objective.objective().unwrap_or_else(|e| panic!("{config}: {e}"))
}

fn pairs(g: &serde_json::Value) -> Vec<TokenizedPair> {
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
    };
    g["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| TokenizedPair {
            prompt: ids(&p["prompt_ids"]),
            chosen: ids(&p["chosen_ids"]),
            rejected: ids(&p["rejected_ids"]),
        })
        .collect()
}

/// The README's rule: `|a − b| ≤ 1e-5·max(1, |b|) + 2^-21·sensitivity` (sensitivity: how much the
/// loss moves when the summed fp32 log-probs move by a relative 1).
/// NaN or inf on either side fails.
fn loss_close(what: &str, got: f64, want: f64, sensitivity: f64) -> Result<(), String> {
    comparable(what, &[got], &[want])?;
    let tol = 1e-5 * want.abs().max(1.0) + sensitivity / f64::from(1u32 << 21);
    if (got - want).abs() <= tol {
        Ok(())
    } else {
        Err(format!("{what}: got {got}, want {want} (|Δ| {:e} > {tol:e})", (got - want).abs()))
    }
}

fn configs(g: &serde_json::Value) -> Vec<(String, serde_json::Value)> {
    g["configs"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[test]
fn every_golden_loss_matches_trl_losses_metrics_and_gradients() {
    let g = golden_losses();
    let pairs = pairs(&g);
    let (model, params) = load_with_golden_adapter("tiny-llama", "tiny-llama");
    let mut failures = Vec::new();
    for (name, c) in configs(&g) {
        let objective = objective_of(&name);
        let task = Task::train(objective.clone());
        let batch = task_batch(&task, &pairs);
        let scored = score_batch(&model, &batch, &task, &mut LoraMode::On).unwrap();
        let mut check = |r: Result<(), String>| {
            if let Err(e) = r {
                failures.push(format!("{name}: {e}"));
            }
        };
        // The batch-of-8 loss.
        let batch_loss = scored.loss.to_scalar::<f32>().unwrap() as f64;
        check(loss_close(
            "batch loss",
            batch_loss,
            c["batch_loss"].as_f64().unwrap(),
            c["logp_sensitivity"]["batch"].as_f64().unwrap(),
        ));
        // Each pair alone (null where the loss sorts the batch).
        let per_pair = objective.per_pair(&scored.logps, scored.weights.as_ref()).unwrap();
        match (&per_pair, c["per_pair"].as_array()) {
            (None, None) => {}
            (Some(got), Some(want)) => {
                let sens = f64s(&c["logp_sensitivity"]["per_pair"]);
                if got.len() != want.len() || sens.len() != want.len() {
                    check(Err(format!(
                        "per-pair: {} computed, {} golden, {} sensitivities",
                        got.len(),
                        want.len(),
                        sens.len()
                    )));
                }
                for (i, (a, b)) in got.iter().zip(want).enumerate() {
                    check(loss_close(&format!("pair {i}"), *a, b.as_f64().unwrap(), sens[i]));
                }
            }
            (got, want) => check(Err(format!("per-pair values: got {got:?}, golden {want:?}"))),
        }
        // Metrics as TRL logs them (those that depend on TRL's padding are not hand-checked).
        let metrics = Metrics::mean(&[scored.collect(&task, &batch, false).unwrap()]);
        let logged = serde_json::to_value(&metrics).unwrap();
        let skip: Vec<&str> =
            c["metrics_not_hand_checked"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        for (key, want) in c["metrics"].as_object().unwrap() {
            if skip.contains(&key.as_str()) {
                continue;
            }
            match logged[key].as_f64() {
                Some(got) => check(loss_close(&format!("metric {key}"), got, want.as_f64().unwrap(), 0.0)),
                None => check(Err(format!("metric {key} is not logged"))),
            }
        }
        // d(batch loss)/d(LoRA A, B), within 1e-4 of the golden gradient's norm.
        let grads = scored.loss.backward().unwrap();
        let want = load_safetensors(&fixtures().join("golden_losses").join(c["grad_file"].as_str().unwrap()));
        let norm = c["grad_norm"].as_f64().unwrap();
        assert_eq!(want.len(), params.len(), "{name}: one golden gradient per LoRA tensor");
        for p in &params {
            let got = to_vec(grads.get(&p.var).unwrap_or_else(|| panic!("{name} {}: no gradient", p.name)));
            // Within 1e-4 of the whole gradient's norm, elementwise.
            check(all_close(&format!("gradient {}", p.name), &got, &to_vec(&want[&p.name]), Tol::abs(1e-4 * norm)));
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

/// The 8 golden pairs as an orca file (the first 8 rows of the fixture).
fn eight_pairs() -> PathBuf {
    let dir = scratch("losses_data");
    let text = std::fs::read_to_string(orca("train")).unwrap();
    let path = dir.join("first8.jsonl");
    std::fs::write(&path, text.lines().take(8).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    path
}

#[test]
fn cli_eval_and_one_step_train_give_trl_losses_and_gradient_norms() {
    let g = golden_losses();
    let data = eight_pairs();
    let (model, adapter) = (model_dir("tiny-llama"), golden_dir("tiny-llama").join("adapter"));
    let mut failures = Vec::new();
    for (name, c) in configs(&g) {
        let flags = flags_of(&name);
        let out = scratch(&format!("losses_cli_{name}"));
        let per_pair_file = out.join("pairs.jsonl");
        let common =
            ["--model", p(&model), "--dataset", p(&data), "--template", "orca", "--beta", "0.1", "--batch-size", "8"];
        let o = dpo(&[
            &["eval"][..],
            &common,
            &flags,
            &["--adapter", p(&adapter), "--output", p(&per_pair_file), "--json"],
        ]
        .concat());
        assert!(o.status.success(), "{name}: dpo eval failed: {}", stderr(&o));
        let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let sens = &c["logp_sensitivity"];
        let mut check = |r: Result<(), String>| {
            if let Err(e) = r {
                failures.push(format!("{name}: {e}"));
            }
        };
        check(loss_close(
            "eval loss",
            summary["loss"].as_f64().unwrap(),
            c["batch_loss"].as_f64().unwrap(),
            sens["batch"].as_f64().unwrap(),
        ));
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&per_pair_file)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 8, "{name}: one line per pair");
        for (i, line) in lines.iter().enumerate() {
            match (line["loss"].as_f64(), c["per_pair"][i].as_f64()) {
                (None, None) => {}
                (Some(got), Some(want)) => {
                    check(loss_close(&format!("eval pair {i}"), got, want, sens["per_pair"][i].as_f64().unwrap()))
                }
                (got, want) => check(Err(format!("eval pair {i}: got {got:?}, golden {want:?}"))),
            }
        }
        let train_out = out.join("run");
        let one_step = [
            "--init-adapter",
            p(&adapter),
            "--max-steps",
            "1",
            "--max-grad-norm",
            "0",
            "--no-shuffle",
            "--output-dir",
            p(&train_out),
        ];
        let o = dpo(&[&["train"][..], &common, &flags, &one_step].concat());
        assert!(o.status.success(), "{name}: dpo train failed: {}", stderr(&o));
        let step = &metrics_without_timing(&train_out)[0];
        check(loss_close(
            "train loss",
            step["loss"].as_f64().unwrap(),
            c["batch_loss"].as_f64().unwrap(),
            sens["batch"].as_f64().unwrap(),
        ));
        let (got, want) = (step["grad_norm"].as_f64().unwrap(), c["grad_norm"].as_f64().unwrap());
        check(all_close("train grad_norm", &[got], &[want], Tol::rel(1e-4)));
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

/// Bad combinations are usage errors (exit 2) naming the flags involved, before any model loads.
#[test]
fn invalid_loss_combinations_are_usage_errors_naming_the_flags() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["--loss", "simpo,sigmoid"], &["--loss", "simpo", "sigmoid"]),
        (&["--loss", "orpo", "--f-divergence", "js_divergence"], &["--f-divergence", "--loss orpo"]),
        (&["--loss", "hinge", "--label-smoothing", "0.1"], &["--label-smoothing", "--loss hinge"]),
        (&["--loss", "sigmoid,sft", "--loss-weights", "1"], &["--loss-weights", "--loss"]),
        (&["--loss", "robust", "--label-smoothing", "0.5"], &["--label-smoothing", "[0, 0.5)"]),
        (&["--beta", "0"], &["--beta"]),
        (&["--loss", "exo_pair"], &["--loss exo_pair", "--label-smoothing"]),
        (&["--loss", "aot", "--use-weighting"], &["--use-weighting", "--loss aot"]),
        (&["--loss", "simpo", "--ld-alpha", "0.5"], &["--ld-alpha", "--loss simpo"]),
        (&["--loss", "sigmoid", "--simpo-gamma", "1"], &["--simpo-gamma", "--loss sigmoid"]),
        (&["--loss", "sigmoid", "--f-alpha", "0.5"], &["--f-alpha", "--f-divergence"]),
        (&["--loss", "ipo", "--f-divergence", "forward_kl", "--loss-weights=-1"], &["--loss-weights"]),
    ];
    let model = model_dir("tiny-llama");
    for (flags, wanted) in cases {
        let out = scratch("losses_usage");
        for command in ["train", "eval"] {
            let mut args = vec![command, "--model", p(&model), "--dataset", "no/such-dataset-anywhere"];
            if command == "train" {
                args.extend(["--output-dir", p(&out)]);
            }
            args.extend(flags.iter());
            let o = dpo(&args);
            let err = stderr(&o);
            assert_eq!(
                o.status.code(),
                Some(2),
                "{command} {flags:?}: want a usage error, got {:?}: {err}",
                o.status.code()
            );
            for w in *wanted {
                assert!(err.contains(w), "{command} {flags:?}: the message should name {w:?}: {err}");
            }
        }
    }
}

/// Reference-free losses never run the reference model (and need no reference cache).
#[test]
fn reference_free_losses_skip_the_reference_forward() {
    let g = golden_losses();
    let pairs = pairs(&g);
    let (model, _) = load_with_golden_adapter("tiny-llama", "tiny-llama");
    for (config, needs) in
        [("cpo_simpo", false), ("cpo_sigmoid", false), ("orpo", false), ("sigmoid", true), ("sft", true)]
    {
        let objective = objective_of(config);
        assert_eq!(objective.needs_reference(), needs, "{config}");
        let before = dpo::scoring::reference_forwards();
        let task = Task::train(objective.clone());
        let batch = task_batch(&task, &pairs);
        score_batch(&model, &batch, &task, &mut LoraMode::On).unwrap();
        assert_eq!(dpo::scoring::reference_forwards() - before, usize::from(needs), "{config}: reference forwards");
    }
}

/// `dpo sweep --loss` takes every loss name (and `a+b` mixes); a typo fails before any run.
#[test]
fn sweep_grid_accepts_every_loss_name_and_refuses_unknown_ones() {
    use clap::ValueEnum;
    use dpo::loss::LossKind;
    let all: Vec<&str> = LossKind::value_variants().iter().map(|k| k.name()).collect();
    assert_eq!(all.len(), 19);
    let list = format!("{},sigmoid+sft", all.join(","));
    let grid = dpo::sweep::plan::Grid::parse(None, None, Some(&list)).unwrap();
    assert_eq!(grid.points().len(), 20);
    let err = dpo::sweep::plan::Grid::parse(None, None, Some("sigmoid,dpo")).unwrap_err().to_string();
    assert!(err.contains("\"dpo\" is not a loss") && err.contains("apo_zero"), "{err}");
    assert!(err.contains("--loss"), "{err}");
}

/// `dpo refcache build` refuses a reference-free loss: there is nothing to cache.
#[test]
fn refcache_build_refuses_reference_free_losses() {
    let out = scratch("losses_refcache");
    let (model, data) = (model_dir("tiny-llama"), orca("train"));
    let o = dpo(&[
        "ref-cache",
        "build",
        "--model",
        p(&model),
        "--dataset",
        p(&data),
        "--output-dir",
        p(&out),
        "--loss",
        "orpo",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("reference-free"), "{}", stderr(&o));
}
