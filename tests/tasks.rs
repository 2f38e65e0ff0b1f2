//! Each subcommand builds its own task: its flags and no other task's, the rows it reads, the
//! summary it prints, the checkpoints only it resumes, and the settings it refuses (ignored
//! flags, LoRA targets and full fine-tuning limits found before any weight is read).
mod common;
use clap::Parser;
use common::*;
use dpo::config::{SftArgs, TrainArgs, UsageError};
use dpo::task::Task;
use std::path::{Path, PathBuf};

fn help(args: &[&str]) -> String {
    let o = dpo(args);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn each_subcommand_shows_only_its_own_flags_and_dpo_help_one_line_each() {
    let train = help(&["train", "--help"]);
    for flag in ["--loss", "--beta", "--ref-cache", "--desirable-weight", "--lora-r", "--full"] {
        assert!(train.contains(flag), "dpo train --help lacks {flag}");
    }
    for sub in [&["sft", "--help"][..], &["reward", "train", "--help"]] {
        let text = help(sub);
        assert!(text.contains("--lora-r") && text.contains("--save-steps"), "{sub:?}: the run's flags");
        for flag in ["--loss", "--beta", "--ref-cache", "--desirable-weight", "--stage"] {
            assert!(!text.contains(flag), "{sub:?} --help shows {flag}, a flag of another task");
        }
    }
    let top = help(&["--help"]);
    let commands: Vec<&str> =
        top.lines().skip_while(|l| !l.starts_with("Commands:")).skip(1).take_while(|l| !l.is_empty()).collect();
    assert!(commands.len() >= 10, "{top}");
    for line in &commands {
        let name = line.split_whitespace().next().unwrap_or("");
        assert!(!name.is_empty() && line.len() <= 100, "one short line per subcommand: {line:?}");
    }
    // A flag of another task is not a flag of this one.
    let o = dpo(&["sft", "--model", "m", "--dataset", "d", "--beta", "0.2"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--beta"), "{}", stderr(&o));
}

fn train(extra: &[&str]) -> anyhow::Result<Task> {
    let base = ["train", "--model", "m", "--dataset", "d.jsonl"];
    Ok(TrainArgs::try_parse_from([&base[..], extra].concat())?.settings()?.task)
}

#[test]
fn the_task_owns_rows_reference_and_units() {
    let dpo_task = train(&[]).unwrap();
    assert!(matches!(dpo_task, Task::Preference(_)) && dpo_task.needs_reference() && dpo_task.ranks_pairs());
    let simpo = train(&["--loss", "simpo"]).unwrap();
    assert!(!simpo.needs_reference(), "reference-free");
    let kto = train(&["--loss", "kto"]).unwrap();
    assert!(matches!(kto, Task::Kto(_)) && kto.needs_reference() && !kto.ranks_pairs() && kto.unit() == "examples");
    let sft = SftArgs::try_parse_from(["sft", "--model", "m", "--dataset", "d"]).unwrap().settings().unwrap().task;
    assert_eq!((sft.clone(), sft.needs_reference(), sft.rows()), (Task::Sft, false, dpo::data::Rows::Completions));
    assert_eq!(Task::Reward.adapter_task(), dpo::lora::AdapterTask::SequenceClassification);
    assert!(train(&["--loss", "kto,sigmoid"]).unwrap_err().downcast_ref::<UsageError>().is_some());
}

#[test]
fn flags_a_run_would_ignore_are_usage_errors() {
    let adapter = golden_dir("tiny-llama").join("adapter");
    let cases: [(&[&str], &[&str]); 7] = [
        (&["--full", "--lora-r", "16"], &["--full", "--lora-r"]),
        (&["--full", "--lora-targets", "all"], &["--full", "--lora-targets"]),
        (&["--init-adapter", p(&adapter), "--lora-alpha", "32"], &["--lora-alpha", "--init-adapter"]),
        (&["--eval-steps", "2"], &["--eval-steps", "--eval-dataset"]),
        (&["--save-total-limit", "2"], &["--save-total-limit", "--save-steps"]),
        (&["--verify-resume"], &["--verify-resume", "--resume"]),
        (&["--warmup-ratio", "0.1", "--warmup-steps", "3"], &["--warmup-ratio", "--warmup-steps"]),
    ];
    for (flags, named) in cases {
        let err = train(flags).unwrap_err();
        assert!(err.downcast_ref::<UsageError>().is_some(), "{flags:?}: {err:#}");
        for n in named {
            assert!(err.to_string().contains(n), "{flags:?}: the message names {n}: {err:#}");
        }
    }
    // Meaningful combinations still go through.
    train(&["--init-adapter", p(&adapter), "--lora-dropout", "0.1"]).unwrap();
    train(&["--eval-split", "test", "--eval-steps", "2", "--save-steps", "2", "--save-total-limit", "1"]).unwrap();
    let o = dpo(&["train", "--model", "m", "--dataset", "d", "--lora-targets", "fc1"]);
    assert_eq!(o.status.code(), Some(2), "a target no family has is a bad flag: {}", stderr(&o));
    assert!(stderr(&o).contains("--lora-targets") && stderr(&o).contains("fc1"), "{}", stderr(&o));
}

/// A copy of tiny-llama whose weights file is cut in half: anything that reads the weights fails.
fn model_without_readable_weights(dir: &Path) -> PathBuf {
    let model = dir.join("broken-weights");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model_dir("tiny-llama").join(f), model.join(f)).unwrap();
    }
    let bytes = std::fs::read(model_dir("tiny-llama").join("model.safetensors")).unwrap();
    std::fs::write(model.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    model
}

#[test]
fn lora_targets_and_full_limits_are_refused_before_any_weight_is_read() {
    let dir = scratch("tasks_before_weights");
    let model = model_without_readable_weights(&dir);
    let (test, out) = (orca("test"), dir.join("o"));
    let run = |extra: &[&str]| {
        let base = ["train", "--model", p(&model), "--dataset", p(&test), "--output-dir", p(&out)];
        dpo(&[&base[..], extra].concat())
    };
    let o = run(&["--lora-targets", "qkv"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("qkv") && stderr(&o).contains("q_proj"), "names the linears it has: {}", stderr(&o));
    assert!(!stderr(&o).contains("truncated"), "refused before the weights were read: {}", stderr(&o));
    let o = run(&["--full", "--dtype", "bf16"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--dtype f32") && !stderr(&o).contains("truncated"), "{}", stderr(&o));
    // The same flags on readable weights get as far as the weights: the refusal above came first.
    let o = run(&["--max-steps", "1"]);
    assert!(!o.status.success() && stderr(&o).contains("truncated"), "{}", stderr(&o));
    let gemma = zoo_dir("gemma").join("model");
    let o = dpo(&[
        "train",
        "--full",
        "--model",
        p(&gemma),
        "--dataset",
        p(&orca("test")),
        "--output-dir",
        p(&dir.join("g")),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("1 + w"), "{}", stderr(&o));
}

fn summary(args: &[&str]) -> String {
    let o = dpo(args);
    assert!(o.status.success(), "{}", stderr(&o));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn summaries_name_rows_as_the_task_does_and_accuracy_only_where_pairs_are_ranked() {
    let dir = scratch("tasks_summary");
    let (model, pairs) = (model_dir("tiny-llama"), orca("test"));
    let sft_data = fixtures().join("data/sft/orca_prompt_completion.jsonl");
    let common = |out: &str| {
        vec![
            "--model".to_string(),
            p(&model).to_string(),
            "--output-dir".into(),
            p(&dir.join(out)).into(),
            "--max-steps".into(),
            "1".into(),
        ]
    };
    let run = |sub: &[&str], data: &Path, out: &str, extra: &[&str]| {
        let args: Vec<String> = sub
            .iter()
            .map(|s| s.to_string())
            .chain(common(out))
            .chain(["--dataset".into(), p(data).into()])
            .chain(extra.iter().map(|s| s.to_string()))
            .collect();
        summary(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let dpo_line = run(&["train"], &pairs, "dpo", &[]);
    assert!(
        dpo_line.contains(" pairs ") && dpo_line.contains("reward accuracy") && dpo_line.contains("adapter in"),
        "{dpo_line}"
    );
    let kto_line = run(&["train"], &pairs, "kto", &["--loss", "kto"]);
    assert!(kto_line.contains(" examples ") && !kto_line.contains("accuracy"), "{kto_line}");
    let sft_line = run(&["sft"], &sft_data, "sft", &[]);
    assert!(sft_line.contains(" examples ") && !sft_line.contains("accuracy"), "{sft_line}");
    let rm_line = run(&["reward", "train"], &pairs, "rm", &[]);
    assert!(rm_line.contains(" pairs ") && rm_line.contains("reward accuracy"), "{rm_line}");
    let full_line = run(&["sft"], &sft_data, "full", &["--full"]);
    assert!(full_line.contains("model in"), "{full_line}");
    let json: serde_json::Value =
        serde_json::from_str(&run(&["train"], &pairs, "kto-json", &["--loss", "kto", "--json"])).unwrap();
    assert_eq!((json["unit"].as_str(), json.get("final_reward_accuracy")), (Some("examples"), None), "{json}");
}

#[test]
fn the_last_step_is_checkpointed_and_only_its_subcommand_resumes_it() {
    let dir = scratch("tasks_last_checkpoint");
    let (model, data) = (model_dir("tiny-llama"), orca("train"));
    let base = |out: &Path, steps: &str| -> Vec<String> {
        let args = ["train", "--model", p(&model), "--dataset", p(&data), "--output-dir", p(out)];
        let run = [
            "--save-steps",
            "2",
            "--max-steps",
            steps,
            "--lr",
            "1e-2",
            "--lr-scheduler",
            "constant",
            "--lora-dropout",
            "0.1",
        ];
        args.iter().chain(&run).map(|s| s.to_string()).collect()
    };
    let (four, six) = (dir.join("four"), dir.join("six"));
    let o = dpo(&base(&four, "4"));
    assert!(o.status.success(), "{}", stderr(&o));
    let names: Vec<String> = std::fs::read_dir(&four)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["checkpoint-2", "checkpoint-4"], "every --save-steps and the last step");
    // Continued to 6 steps, the run starts from step 4 and equals a straight 6-step run.
    let o = dpo(&["train", "--resume", p(&four), "--max-steps", "6"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("(step 4)"), "resumes from the last step's checkpoint: {}", stderr(&o));
    let o = dpo(&base(&six, "6"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(metrics_without_timing(&four), metrics_without_timing(&six));
    assert_eq!(
        std::fs::read(four.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(six.join("adapter_model.safetensors")).unwrap(),
        "bit-identical adapters"
    );
    // A `dpo train` checkpoint is resumed by `dpo train` only.
    let o = dpo(&["sft", "--resume", p(&four)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("dpo train --resume"), "{}", stderr(&o));
}

#[test]
fn data_errors_name_the_file_and_the_bad_field() {
    let dir = scratch("tasks_data_errors");
    let model = model_dir("tiny-llama");
    let bad_label = dir.join("labels.jsonl");
    std::fs::write(&bad_label, "{\"prompt\": \"p\", \"completion\": \"c\", \"label\": \"yes\"}\n").unwrap();
    let o = dpo(&[
        "train",
        "--loss",
        "kto",
        "--model",
        p(&model),
        "--dataset",
        p(&bad_label),
        "--output-dir",
        p(&dir.join("a")),
    ]);
    assert!(!o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains(&format!("{}:1", bad_label.display())) && e.contains("unpaired") && e.contains("\"label\""),
        "{e}"
    );
    assert!(!e.contains("cannot tell"), "the unpaired layout is named, not a list of paired ones: {e}");
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let o = dpo(&["train", "--model", p(&model), "--dataset", p(&empty), "--output-dir", p(&dir.join("b"))]);
    assert!(!o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains(p(&empty)) && stderr(&o).contains("no usable rows"), "{}", stderr(&o));
}

#[test]
fn eval_scores_completions_with_sft_and_refuses_loss_flags_there() {
    let dir = scratch("tasks_eval_sft");
    let model = model_dir("tiny-llama");
    let data = fixtures().join("data/sft/orca_prompt_completion.jsonl");
    let out = dir.join("lines.jsonl");
    let args = ["eval", "--sft", "--model", p(&model), "--dataset", p(&data), "--output", p(&out), "--json"];
    let metrics: serde_json::Value = serde_json::from_str(&summary(&args)).unwrap();
    assert!(metrics["loss"].as_f64().unwrap() > 0.0 && metrics["entropy"].is_number(), "{metrics}");
    assert!(metrics.get("rewards/accuracies").is_none(), "{metrics}");
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!lines.is_empty());
    for l in &lines {
        assert!(l["policy_chosen_logp"].as_f64().unwrap() < 0.0 && l.get("reward_chosen").is_none(), "{l}");
        assert!(l.get("reference_chosen_logp").is_none(), "SFT has no reference: {l}");
    }
    let o = dpo(&[&args[..], &["--beta", "0.2"]].concat());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--sft") && stderr(&o).contains("--beta"), "{}", stderr(&o));
}
