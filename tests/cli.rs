//! The command line as scripts use it: exit codes, error messages, config precedence.
mod common;
use common::*;

#[test]
fn bad_flags_exit_with_usage_code() {
    let o = dpo(&["train", "--model", "m", "--dataset", "d", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--no-such-flag"));
    let o = dpo(&["train", "--model", "m", "--dataset", "d", "--beta", "abc"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--beta"));
}

#[test]
fn malformed_dataset_line_is_named() {
    let dir = scratch("cli_malformed");
    let data = dir.join("bad.jsonl");
    let good = std::fs::read_to_string(orca("train")).unwrap();
    let first_two: String = good.lines().take(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(&data, format!("{first_two}{{\"question\": \"x\", \"chosen\": \"y\"\n")).unwrap();
    let model = model_dir("tiny-llama");
    let out = dir.join("out");
    let o = dpo(&["train", "--model", p(&model), "--dataset", p(&data), "--output-dir", p(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("bad.jsonl:3") && stderr(&o).contains("malformed JSON"), "{}", stderr(&o));
    assert!(!out.join("adapter_model.safetensors").exists());

    std::fs::write(&data, format!("{first_two}{{\"question\": \"x\", \"chosen\": \"y\"}}\n")).unwrap();
    let o =
        dpo(&["train", "--model", p(&model), "--dataset", p(&data), "--output-dir", p(&out), "--overwrite-output-dir"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("bad.jsonl:3") && stderr(&o).contains("\"rejected\""), "{}", stderr(&o));
}

#[test]
fn unknown_architecture_lists_the_supported_ones() {
    let dir = scratch("cli_arch");
    let model = dir.join("gpt2ish");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model_dir("tiny-llama").join(f), model.join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(model_dir("tiny-llama").join("config.json")).unwrap();
    std::fs::write(model.join("config.json"), cfg.replace("\"llama\"", "\"gpt2\"")).unwrap();
    let o = dpo(&["eval", "--model", p(&model), "--dataset", p(&orca("test"))]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("gpt2") && e.contains("llama, mistral, qwen2") && e.contains("config.json"), "{e}");
}

#[test]
fn truncated_weights_file_is_named() {
    let dir = scratch("cli_corrupt");
    let model = dir.join("m");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model_dir("tiny-llama").join(f), model.join(f)).unwrap();
    }
    let bytes = std::fs::read(model_dir("tiny-llama").join("model.safetensors")).unwrap();
    std::fs::write(model.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let o = dpo(&["eval", "--model", p(&model), "--dataset", p(&orca("test"))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("model.safetensors") && stderr(&o).contains("truncated"), "{}", stderr(&o));
}

#[test]
fn pickle_only_checkpoint_is_refused() {
    let dir = scratch("cli_pickle");
    std::fs::copy(model_dir("tiny-llama").join("config.json"), dir.join("config.json")).unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"not really a pickle").unwrap();
    let o = dpo(&["eval", "--model", p(&dir), "--dataset", p(&orca("test"))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("pickle"), "{}", stderr(&o));
}

#[test]
fn existing_run_is_not_overwritten_without_consent() {
    let out = scratch("cli_no_clobber");
    std::fs::write(out.join("adapter_model.safetensors"), b"precious").unwrap();
    let o =
        dpo(&["train", "--model", p(&model_dir("tiny-llama")), "--dataset", p(&orca("test")), "--output-dir", p(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--overwrite-output-dir"));
    assert_eq!(std::fs::read(out.join("adapter_model.safetensors")).unwrap(), b"precious");
}

/// Ignored (reported as such, with the reason) in a `--features cuda` build, which has no refusal.
#[test]
#[cfg_attr(feature = "cuda", ignore = "built with --features cuda: `--device cuda` is supported, nothing to refuse")]
fn cuda_without_the_feature_says_how_to_build_it() {
    if cfg!(feature = "cuda") {
        // Only reached with --include-ignored.
        eprintln!("skipped: built with --features cuda, so `--device cuda` is not refused");
        return;
    }
    let o = dpo(&["eval", "--model", p(&model_dir("tiny-llama")), "--dataset", p(&orca("test")), "--device", "cuda"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--features cuda"), "{}", stderr(&o));
}

#[test]
fn config_file_sits_between_defaults_and_flags() {
    let dir = scratch("cli_config");
    let cfg = dir.join("run.toml");
    let out = dir.join("out");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndataset = {:?}\noutput_dir = {:?}\nbeta = 0.25\nlr = 0.001\nmax_steps = 2\nlora_targets = [\"q\", \"o\"]\n",
            p(&model_dir("tiny-llama")),
            p(&orca("test")),
            p(&out)
        ),
    )
    .unwrap();
    let o = dpo(&["train", "--config", p(&cfg), "--lr", "0.002", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let resolved: toml::Table = std::fs::read_to_string(out.join("train_config.toml")).unwrap().parse().unwrap();
    assert_eq!(resolved["beta"].as_float(), Some(0.25), "config file beats default");
    assert_eq!(resolved["lr"].as_float(), Some(0.002), "flag beats config file");
    assert_eq!(resolved["batch_size"].as_integer(), Some(4), "default when neither sets it");
    assert_eq!(resolved["lora_targets"].as_str(), Some("q_proj,o_proj"), "peft's module names, in forward order");
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["steps"], 2);
    let adapter = read_json(&out.join("adapter_config.json"));
    assert_eq!(adapter["target_modules"], serde_json::json!(["q_proj", "o_proj"]));

    // The resolved config is itself a valid config file.
    let again = dir.join("again");
    let o = dpo(&["train", "--config", p(&out.join("train_config.toml")), "--output-dir", p(&again)]);
    assert!(o.status.success(), "{}", stderr(&o));

    std::fs::write(&cfg, "model = \"m\"\nbta = 0.1\n").unwrap();
    let o = dpo(&["train", "--config", p(&cfg), "--dataset", "d"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("unknown key \"bta\""), "{}", stderr(&o));
}

/// The memory plan is checked before any weight is loaded: a model whose weights file is
/// truncated is refused for its plan (not its file), naming the flags that would help, and no
/// output folder is written. `--dry-run` prints the plan and exits 0.
#[test]
fn a_run_over_its_memory_plan_is_refused_before_loading_weights() {
    let dir = scratch("cli_memory_plan");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model_dir("tiny-llama").join(f), model.join(f)).unwrap();
    }
    let weights = std::fs::read(model_dir("tiny-llama").join("model.safetensors")).unwrap();
    std::fs::write(model.join("model.safetensors"), &weights[..weights.len() / 2]).unwrap();
    let out = dir.join("run");
    let o = dpo(&[
        "train",
        "--model",
        p(&model),
        "--dataset",
        p(&orca("train")),
        "--output-dir",
        p(&out),
        "--max-memory",
        "0.001",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("memory plan needs") && e.contains("--max-memory allows"), "{e}");
    assert!(
        e.contains("--gradient-checkpointing on") && e.contains("--batch-size 2") && e.contains("--max-length"),
        "{e}"
    );
    assert!(!e.contains("truncated"), "the weights were read: {e}");
    assert!(!out.exists(), "nothing is written for a refused run");
    let o = dpo(&[
        "train",
        "--model",
        p(&model_dir("tiny-llama")),
        "--dataset",
        p(&orca("train")),
        "--dry-run",
        "--output-dir",
        p(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let plan = String::from_utf8_lossy(&o.stdout);
    assert!(plan.contains("memory plan:") && plan.contains("weights") && plan.contains("activations"), "{plan}");
    assert!(!out.exists(), "--dry-run writes nothing");
}
