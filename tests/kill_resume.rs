//! SIGKILL a real `dpo train` at pseudo-random instants, 20 times; every resumed run must end
//! bit-identical (adapter bytes, metrics lines) to the uninterrupted run.
mod common;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

const TRIALS: usize = 20;

fn args(out: &Path) -> Vec<String> {
    [
        "train",
        "--model",
        model_dir("tiny-llama").to_str().unwrap(),
        "--dataset",
        orca("train").to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--max-steps",
        "24",
        "--lr",
        "5e-3",
        "--lr-scheduler",
        "cosine",
        "--warmup-steps",
        "2",
        "--lora-dropout",
        "0.05",
        "--seed",
        "5",
        "--save-steps",
        "1",
        "--save-total-limit",
        "3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A small deterministic generator, so a failing trial can be replayed.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *state >> 33
}

#[test]
fn sigkill_at_random_times_then_resume_is_bit_identical() {
    let reference = scratch("kill_reference");
    let started = Instant::now();
    let (status, err) = dpo_bounded("the uninterrupted run", &args(&reference));
    assert!(status.success(), "{err}");
    let full = started.elapsed().as_millis() as u64;
    let want_adapter = std::fs::read(reference.join("adapter_model.safetensors")).unwrap();
    let want_metrics = metrics_without_timing(&reference);

    let mut seed = 2026u64;
    let (mut identical, mut resumed, mut restarted) = (0, 0, 0);
    for trial in 0..TRIALS {
        let out = scratch(&format!("kill_trial_{trial}"));
        let delay = next(&mut seed) % full.max(1);
        let mut child = Running::spawn(&mut dpo_command(&args(&out)));
        match child.run_for(Duration::from_millis(delay)) {
            // Finished before the kill: it must have succeeded.
            Some(status) => assert!(status.success(), "trial {trial}: dpo failed on its own: {}", child.stderr()),
            None => child.kill(), // SIGKILL
        }

        if !out.join("adapter_model.safetensors").exists() {
            let resume = if dpo::checkpoint::list(&out).unwrap().is_empty() {
                restarted += 1;
                let mut a = args(&out);
                a.push("--overwrite-output-dir".into());
                a
            } else {
                resumed += 1;
                vec!["train".into(), "--resume".into(), out.to_str().unwrap().into()]
            };
            let (status, err) = dpo_bounded(&format!("trial {trial}'s resumed run"), &resume);
            assert!(status.success(), "trial {trial} (killed at {delay} ms): {err}");
        }
        assert_eq!(
            std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
            want_adapter,
            "trial {trial}: adapter"
        );
        assert_eq!(metrics_without_timing(&out), want_metrics, "trial {trial}: metrics");
        identical += 1;
    }
    eprintln!(
        "kill/resume: {identical}/{TRIALS} bit-identical ({resumed} resumed from a checkpoint, {restarted} killed before the first one)"
    );
    assert!(resumed >= TRIALS / 2, "most kills should land mid-run");
    assert_eq!(identical, TRIALS);
}
