//! The reference log-prob cache: a hit skips the reference forward, values are bit-identical,
//! corruption is detected and rebuilt, and training with the cache matches training without.
mod common;
use common::*;
use dpo::config::TrainArgs;
use dpo::data::PairBatch;
use dpo::refcache::RefCache;
use dpo::scoring::{Reference, reference_forwards};

/// 4 steps of 4 pairs: the 16 pairs whose reference log-probs a run needs.
const FIXED: [&str; 12] = [
    "--device",
    "cpu",
    "--batch-size",
    "4",
    "--lr",
    "5e-3",
    "--max-steps",
    "4",
    "--max-grad-norm",
    "0",
    "--lr-scheduler",
    "constant",
];
const PAIRS: usize = 16;

fn args(out: &std::path::Path, extra: &[&str]) -> TrainArgs {
    train_args(out, &[&FIXED[..], extra].concat())
}

/// The same run through the binary, for its stderr.
fn cli(out: &std::path::Path, extra: &[&str]) -> String {
    let (model, data) = (model_dir("tiny-llama"), orca("train"));
    let base = ["train", "--model", p(&model), "--dataset", p(&data), "--output-dir", p(out)];
    let o = dpo(&[&base[..], &FIXED, extra].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    stderr(&o)
}

#[test]
fn cache_hit_skips_the_reference_forward_and_is_bit_identical() {
    let dir = scratch("refcache-hit");
    let a = args(&dir.join("run"), &[]);
    let loaded = dpo::setup::load_model(&a.common.model).unwrap();
    let data = dpo::setup::load_rows(&a.common, &loaded, &a.settings().unwrap().task).unwrap();
    let pairs: Vec<_> = (0..4).map(|i| data.get(i).unwrap()).collect();
    let batch = PairBatch::new(&pairs, loaded.pad_id, &loaded.device).unwrap();
    let fp = dpo::train::reference::fingerprint(&a.common, None, &loaded).unwrap();
    let mut cache = RefCache::open(&dir.join("cache"), fp.clone()).unwrap();
    let before = reference_forwards();
    let computed = Reference::Compute(Some(&mut cache)).logps(&loaded.model, &pairs, &batch).unwrap().unwrap();
    assert_eq!(reference_forwards(), before + 1, "a miss runs the reference forward");
    cache.flush().unwrap();

    let mut reopened = RefCache::open(&dir.join("cache"), fp).unwrap();
    assert_eq!(reopened.len(), 4);
    let cached = Reference::Compute(Some(&mut reopened)).logps(&loaded.model, &pairs, &batch).unwrap().unwrap();
    assert_eq!(reference_forwards(), before + 1, "a hit skips the reference forward");
    let bits = |t: &candle_core::Tensor| t.to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&cached), bits(&computed));
    assert_eq!(reopened.hits, 4);
}

#[test]
fn corrupt_or_foreign_cache_is_detected_and_rebuilt() {
    let dir = scratch("refcache-corrupt");
    let a = args(&dir.join("run"), &[]);
    let loaded = dpo::setup::load_model(&a.common.model).unwrap();
    let data = dpo::setup::load_rows(&a.common, &loaded, &a.settings().unwrap().task).unwrap();
    let pairs: Vec<_> = (0..2).map(|i| data.get(i).unwrap()).collect();
    let batch = PairBatch::new(&pairs, loaded.pad_id, &loaded.device).unwrap();
    let fp = dpo::train::reference::fingerprint(&a.common, None, &loaded).unwrap();
    let mut cache = RefCache::open(&dir.join("cache"), fp.clone()).unwrap();
    Reference::Compute(Some(&mut cache)).logps(&loaded.model, &pairs, &batch).unwrap().unwrap();
    cache.flush().unwrap();
    let seg = dpo::refcache::segments(cache.dir()).unwrap().remove(0);
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[60] ^= 0x01; // one bit of a stored log-prob
    std::fs::write(&seg, &bytes).unwrap();

    let reopened = RefCache::open(&dir.join("cache"), fp.clone()).unwrap();
    assert!(reopened.rebuilt.as_deref().is_some_and(|r| r.contains("checksum")), "{:?}", reopened.rebuilt);
    assert!(reopened.is_empty(), "a corrupt cache is never used");
    assert!(dpo::refcache::segments(reopened.dir()).unwrap().is_empty());

    // Other settings (another truncation) never see these entries.
    let mut other = fp;
    other.insert("max_length", "7");
    assert_ne!(RefCache::open(&dir.join("cache"), other).unwrap().dir(), reopened.dir());
}

#[test]
fn training_with_the_cache_is_bit_identical_to_training_without() {
    let dir = scratch("refcache-train");
    let cache = dir.join("cache");
    dpo::train::run(&args(&dir.join("plain"), &[]).settings().unwrap()).unwrap();
    let fill = cli(&dir.join("fill"), &["--ref-cache", p(&cache)]);
    assert_eq!(ref_cache_counts(&fill), (0, PAIRS), "the first run fills the cache (reused, computed)");
    // The hit: every pair's reference read from the cache, no reference forward.
    let hit = cli(&dir.join("hit"), &["--ref-cache", p(&cache), "--beta", "0.1"]);
    assert_eq!(ref_cache_counts(&hit), (PAIRS, 0), "the second run is all hits (reused, computed)");
    let plain = metrics_without_timing(&dir.join("plain"));
    assert_eq!(plain.len(), 4);
    assert_eq!(metrics_without_timing(&dir.join("fill")), plain);
    assert_eq!(metrics_without_timing(&dir.join("hit")), plain);
    let w = |d: &str| std::fs::read(dir.join(d).join("adapter_model.safetensors")).unwrap();
    assert_eq!(w("hit"), w("plain"), "same adapter bytes");
}
