//! Checkpoints that never lose a run: exact resume, crash safety, corruption, refusals.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Output;

/// A run that exercises every piece of state: shuffled order, LoRA dropout (RNG), warmup +
/// linear decay (scheduler), clipping, weight decay, gradient accumulation, an epoch boundary
/// (64 pairs / 4 per step = 16 steps per epoch).
fn run_args(out: &Path) -> Vec<String> {
    [
        "train",
        "--model",
        p(&model_dir("tiny-llama")),
        "--dataset",
        p(&orca("train")),
        "--output-dir",
        p(out),
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--max-steps",
        "20",
        "--lr",
        "5e-3",
        "--lr-scheduler",
        "linear",
        "--warmup-steps",
        "3",
        "--lora-dropout",
        "0.1",
        "--weight-decay",
        "0.01",
        "--max-grad-norm",
        "0.5",
        "--lora-targets",
        "q,v,o",
        "--seed",
        "11",
        "--save-steps",
        "3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "dpo failed: {}", String::from_utf8_lossy(&o.stderr));
}

fn assert_same_run(a: &Path, b: &Path) {
    assert_eq!(
        std::fs::read(a.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(b.join("adapter_model.safetensors")).unwrap(),
        "adapters differ"
    );
    assert_eq!(metrics_without_timing(a), metrics_without_timing(b));
}

fn reference_run(name: &str) -> PathBuf {
    let out = scratch(&format!("ckpt_reference_{name}"));
    ok(&dpo(&run_args(&out)));
    assert_eq!(metrics_without_timing(&out).len(), 20);
    out
}

fn checkpoints(out: &Path) -> Vec<usize> {
    dpo::checkpoint::list(out).unwrap().into_iter().map(|(s, _)| s).collect()
}

#[test]
fn resume_after_a_stop_is_bit_identical_at_several_points() {
    let reference = reference_run("stops");
    // 5 → resumes from step 3; 11 → from 9; 17 → from 15, across the epoch boundary at 16.
    for stop in [5, 11, 17] {
        let out = scratch(&format!("ckpt_stop_{stop}"));
        let mut args = run_args(&out);
        args.extend(["--stop-after-steps".to_string(), stop.to_string()]);
        let o = dpo(&args);
        assert_eq!(o.status.code(), Some(1));
        assert!(!out.join("adapter_model.safetensors").exists());
        assert_eq!(metrics_without_timing(&out).len(), stop, "lines past the last checkpoint are on disk");
        ok(&dpo(&["train", "--resume", p(&out)]));
        assert_same_run(&reference, &out);
    }
}

#[test]
fn checkpoints_hold_a_peft_adapter_a_manifest_and_respect_the_limit() {
    let out = scratch("ckpt_layout");
    let mut args = run_args(&out);
    args.extend(["--save-total-limit".to_string(), "2".to_string()]);
    ok(&dpo(&args));
    // Every 3 steps and the last (20), as HF's Trainer; the newest 2 kept.
    assert_eq!(checkpoints(&out), vec![18, 20]);
    let ckpt = out.join("checkpoint-18");
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "optimizer.safetensors",
        "trainer_state.json",
        "train_config.toml",
        "manifest.json",
        "pre_step_adapter.safetensors",
    ] {
        assert!(ckpt.join(f).is_file(), "{f}");
    }
    let manifest = read_json(&ckpt.join("manifest.json"));
    assert_eq!(manifest["step"], 18);
    assert_eq!(manifest["files"].as_object().unwrap().len(), 6);
    assert_eq!(manifest["provenance"]["model"]["files"]["model.safetensors"].as_str().unwrap().len(), 64);
    assert_eq!(manifest["provenance"]["dataset"]["files"]["train.jsonl"].as_str().unwrap().len(), 64);
    assert_eq!(manifest["metrics"]["step"], 18);
    let state = read_json(&ckpt.join("trainer_state.json"));
    assert_eq!(state["stream_position"], 72);
    assert_eq!(state["epoch"], 1);
    assert_eq!(state["index_in_epoch"], 8);
    // The checkpoint's adapter loads on its own.
    let mut model = load("tiny-llama");
    dpo::lora::adapter::attach_from_dir(&mut model, &ckpt, None).unwrap();
}

#[test]
fn a_half_written_checkpoint_is_ignored_and_cleaned_up() {
    let reference = reference_run("torn");
    let out = scratch("ckpt_torn");
    let mut args = run_args(&out);
    args.extend(["--stop-after-steps".to_string(), "10".to_string()]);
    dpo(&args);
    // What a crash between two files of checkpoint-12 leaves: a hidden temporary folder.
    let torn = out.join(".checkpoint-12.tmp-99999");
    std::fs::create_dir_all(&torn).unwrap();
    std::fs::write(torn.join("adapter_model.safetensors"), b"half").unwrap();
    assert_eq!(checkpoints(&out), vec![3, 6, 9]);
    let o = dpo(&["train", "--resume", p(&out)]);
    ok(&o);
    assert!(!torn.exists(), "temporary folder removed");
    assert!(String::from_utf8_lossy(&o.stderr).contains("resuming from"));
    assert_same_run(&reference, &out);
}

#[test]
fn a_corrupt_checkpoint_is_named_and_fallback_needs_consent() {
    let reference = reference_run("corrupt");
    let out = scratch("ckpt_corrupt");
    let mut args = run_args(&out);
    args.extend(["--stop-after-steps".to_string(), "7".to_string()]);
    dpo(&args);
    let victim = out.join("checkpoint-6/adapter_model.safetensors");
    let mut bytes = std::fs::read(&victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&victim, bytes).unwrap();

    let o = dpo(&["train", "--resume", p(&out)]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("checkpoint-6/adapter_model.safetensors") && err.contains("corrupt"), "{err}");
    assert!(err.contains("latest-valid"), "{err}");

    ok(&dpo(&["train", "--resume", "latest-valid", "--output-dir", p(&out)]));
    assert_same_run(&reference, &out);
}

#[test]
fn resume_refuses_flags_that_change_the_math_and_allows_the_rest() {
    let out = scratch("ckpt_flags");
    let mut args = run_args(&out);
    args.extend(["--stop-after-steps".to_string(), "4".to_string()]);
    dpo(&args);
    let resume = |extra: &[&str]| {
        let mut a = vec!["train".to_string(), "--resume".into(), p(&out).into()];
        a.extend(extra.iter().map(|s| s.to_string()));
        dpo(&a)
    };
    let o = resume(&["--beta", "0.5", "--seed", "3"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--beta") && err.contains("--seed") && !err.contains("--lr "), "{err}");
    assert_eq!(checkpoints(&out), vec![3], "a refused resume writes nothing");

    ok(&resume(&["--logging-steps", "1", "--save-steps", "5", "--max-steps", "22"]));
    assert_eq!(metrics_without_timing(&out).len(), 22);
}

#[test]
fn a_fresh_run_never_reuses_an_old_runs_folder_silently() {
    let out = scratch("ckpt_fresh");
    let mut args = run_args(&out);
    args.extend(["--stop-after-steps".to_string(), "4".to_string()]);
    dpo(&args);
    let o = dpo(&run_args(&out));
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    let mut args = run_args(&out);
    args.push("--overwrite-output-dir".into());
    ok(&dpo(&args));
    assert_eq!(checkpoints(&out), vec![3, 6, 9, 12, 15, 18, 20]);
}

#[cfg(unix)]
#[test]
fn sigterm_finishes_the_step_writes_a_checkpoint_and_exits_143() {
    let out = scratch("ckpt_sigterm");
    let mut args = run_args(&out);
    let steps = args.iter().position(|a| a == "--max-steps").unwrap() + 1;
    args[steps] = "100000".into();
    let mut child = Running::spawn(&mut dpo_command(&args));
    // Wait until training is under way (two metrics lines), then ask it to stop.
    let metrics = out.join("metrics.jsonl");
    child.wait_until("two lines in metrics.jsonl", || {
        std::fs::read_to_string(&metrics).map(|s| s.lines().count()).unwrap_or(0) >= 2
    });
    unsafe { libc_kill(child.id() as i32, 15) };
    let (status, err) = child.wait("dpo to exit after SIGTERM");
    assert_eq!(status.code(), Some(143), "{err}");
    assert!(err.contains("dpo train --resume"), "{err}");
    let newest = *checkpoints(&out).last().unwrap();
    assert_eq!(newest, metrics_without_timing(&out).len(), "checkpoint of the last finished step");
}

#[cfg(unix)]
unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn verify_resume_recomputes_the_logged_step_and_catches_changed_data() {
    let dir = scratch("ckpt_verify");
    let data = dir.join("train.jsonl");
    std::fs::copy(orca("train"), &data).unwrap();
    let out = dir.join("out");
    let with_data = |out: &Path| {
        let mut a = run_args(out);
        let i = a.iter().position(|x| x == "--dataset").unwrap() + 1;
        a[i] = p(&data).to_string();
        a
    };
    let mut args = with_data(&out);
    args.extend(["--stop-after-steps".to_string(), "8".to_string()]);
    dpo(&args);
    let o = dpo(&["train", "--resume", p(&out), "--verify-resume", "--stop-after-steps", "10"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("verified: step 6"), "{}", String::from_utf8_lossy(&o.stderr));

    // The same path, other contents (rows reordered): the recorded sha256 no longer matches,
    // and the dataset file is named.
    let text = std::fs::read_to_string(&data).unwrap();
    let reversed: String = text.lines().rev().map(|l| format!("{l}\n")).collect();
    std::fs::write(&data, reversed).unwrap();
    let o = dpo(&["train", "--resume", p(&out), "--verify-resume"]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("--verify-resume") && e.contains("the dataset") && e.contains("train.jsonl has sha256"), "{e}");
}
