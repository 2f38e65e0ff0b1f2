//! Generation against transformers 5.25's `generate` (tests/fixtures/golden_generate): greedy
//! token ids and per-step log-probs of every model family, base and with its adapter, alone and
//! in a left-padded batch, with a natural and an early end id; and the sampling processors'
//! kept tokens and probabilities.
mod common;
use candle_core::{DType, Device};
use common::*;
use dpo::generate::engine::{Finish, Generated, Limits, generate};
use dpo::generate::processors::{Decoding, process, softmax};
use dpo::model::{CausalLm, LayerPath};
use dpo::nn::LoraMode;
use dpo::rng::{SeededRng, Stream};

fn golden() -> serde_json::Value {
    read_json(&fixtures().join("golden_generate/golden_generate.json"))
}

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The model (and, for `lora`, its adapter attached) of a golden entry.
fn load(entry: &serde_json::Value, path: LayerPath) -> CausalLm {
    let dir = |key: &str| fixtures().join(entry[key].as_str().unwrap().trim_start_matches("fixtures/"));
    let mut model = CausalLm::load(&dir("model_dir"), DType::F32, &Device::Cpu, path).unwrap();
    if entry["variant"] == "lora" {
        dpo::lora::adapter::attach_from_dir(&mut model, &dir("adapter_dir"), None).unwrap();
    }
    model
}

fn run(model: &CausalLm, prompts: &[Vec<u32>], eos: u32) -> Vec<Generated> {
    let limits = Limits { max_new_tokens: 24, eos: vec![eos], pad_id: 3 };
    let mut rng = SeededRng::new(0, Stream::Sampling);
    generate(model, &mut LoraMode::On, prompts, &limits, &Decoding::greedy(), &mut rng, &mut |_, _| false).unwrap()
}

/// The first step at which a near-tie (top-2 margin < 1e-4) of this run makes an argmax flip
/// plausible: ids are compared before it only (the fixture README's rule).
fn first_near_tie(entry: &serde_json::Value, run: &str, prompt: usize) -> usize {
    entry["near_ties"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["run"] == run && t["prompt"] == prompt && t["top2_logit_margin"].as_f64().unwrap() < 1e-4)
        .map(|t| t["step"].as_u64().unwrap() as usize)
        .min()
        .unwrap_or(usize::MAX)
}

/// Differences of one run from its golden record.
fn compare(what: &str, got: &Generated, want: &serde_json::Value, tie_step: usize) -> Vec<String> {
    let want_ids = u32s(&want["new_ids"]);
    let checked = want_ids.len().min(tie_step.saturating_sub(1));
    let mut failures = Vec::new();
    if tie_step == usize::MAX && got.ids != want_ids {
        failures.push(format!("{what}: ids {:?}, want {want_ids:?}", got.ids));
    } else if got.ids.len() < checked || got.ids[..checked] != want_ids[..checked] {
        failures.push(format!("{what}: ids {:?}, want {want_ids:?} (before the near-tie at step {tie_step})", got.ids));
    }
    let stopped = want["stopped_at_eos"].as_bool().unwrap();
    if tie_step == usize::MAX && (got.finish == Finish::Eos) != stopped {
        failures.push(format!("{what}: finish {:?}, stopped_at_eos {stopped}", got.finish));
    }
    let want_logps = f64s(&want["step_logps"]);
    let n = checked.min(got.step_logps.len());
    if let Err(e) = all_close(&format!("{what} step log-probs"), &got.step_logps[..n], &want_logps[..n], Tol::abs(1e-4))
    {
        failures.push(e);
    }
    failures
}

#[test]
fn greedy_decoding_matches_transformers_for_every_family_alone_and_in_a_batch() {
    let g = golden();
    let prompts: Vec<Vec<u32>> = g["prompts"].as_array().unwrap().iter().map(|p| u32s(&p["prompt_ids"])).collect();
    let mut failures = Vec::new();
    let models = g["models"].as_object().unwrap();
    assert_eq!(models.len(), 24, "12 models × base, lora");
    for (name, entry) in models {
        let model = load(entry, LayerPath::CpuOp);
        let singles = entry["single"].as_array().unwrap();
        assert_eq!(singles.len(), prompts.len());
        for (i, want) in singles.iter().enumerate() {
            let got = &run(&model, &prompts[i..i + 1], 2)[0];
            failures.extend(compare(&format!("{name} single {i}"), got, want, first_near_tie(entry, "single", i)));
        }
        let batch = run(&model, &prompts, 2);
        let rows = entry["batch"]["rows"].as_array().unwrap();
        assert_eq!(rows.len(), batch.len());
        for (i, want) in rows.iter().enumerate() {
            failures.extend(compare(&format!("{name} batch {i}"), &batch[i], want, first_near_tie(entry, "batch", i)));
        }
        // An end id the model produces within the run: each prompt stops at its first occurrence.
        let early = &entry["early_eos"];
        let eos = early["eos_token_id"].as_u64().unwrap() as u32;
        let batch = run(&model, &prompts, eos);
        for (i, want) in early["single"].as_array().unwrap().iter().enumerate() {
            failures.extend(compare(
                &format!("{name} early-eos {i}"),
                &batch[i],
                want,
                first_near_tie(entry, "single", i),
            ));
        }
        let stop_at = early["prompt_index"].as_u64().unwrap() as usize;
        assert_eq!(batch[stop_at].ids.len(), early["expected_stop_step"].as_u64().unwrap() as usize, "{name}");
        assert_eq!(batch[stop_at].finish, Finish::Eos, "{name}");
    }
    assert!(failures.is_empty(), "{} differences:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn sampling_processors_keep_transformers_tokens_and_probabilities() {
    let g = golden();
    let lp = &g["logits_processors"];
    let tensors = load_safetensors(&fixtures().join("golden_generate/logits_processors.safetensors"));
    let logits = tensors["logits"].to_vec2::<f32>().unwrap();
    let (ids, mask) = (lp["input_ids"].as_array().unwrap(), lp["attention_mask"].as_array().unwrap());
    let configs = lp["configs"].as_array().unwrap();
    assert!(configs.len() >= 7);
    for c in configs {
        let name = c["name"].as_str().unwrap();
        for kind in ["generate", "isolated"] {
            let e = &c[kind]["effective"];
            let d = Decoding {
                do_sample: true,
                temperature: e["temperature"].as_f64().unwrap(),
                top_k: e["top_k"].as_u64().unwrap() as usize,
                top_p: e["top_p"].as_f64().unwrap(),
                min_p: e["min_p"].as_f64(),
                repetition_penalty: e["repetition_penalty"].as_f64().unwrap(),
            };
            let want_scores = tensors[&format!("{kind}/{name}/scores")].to_vec2::<f32>().unwrap();
            let want_probs = tensors[&format!("{kind}/{name}/probs")].to_vec2::<f32>().unwrap();
            for row in 0..logits.len() {
                // The real tokens so far: left pads (mask 0) are not previous tokens.
                let previous: Vec<u32> = u32s(&ids[row])
                    .into_iter()
                    .zip(mask[row].as_array().unwrap())
                    .filter(|(_, m)| m.as_u64() == Some(1))
                    .map(|(id, _)| id)
                    .collect();
                let mut scores = logits[row].clone();
                process(&mut scores, &previous, &d);
                let kept: Vec<usize> = (0..scores.len()).filter(|&i| scores[i].is_finite()).collect();
                let want_kept: Vec<usize> = (0..scores.len()).filter(|&i| want_scores[row][i].is_finite()).collect();
                assert_eq!(kept, want_kept, "{kind}/{name} row {row}: kept tokens");
                let got: Vec<f64> = softmax(&scores).iter().map(|&p| p as f64).collect();
                let want: Vec<f64> = want_probs[row].iter().map(|&p| p as f64).collect();
                assert_all_close(&format!("{kind}/{name} row {row} probs"), &got, &want, Tol::abs(1e-6));
            }
        }
    }
}
