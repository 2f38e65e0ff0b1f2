//! The reference cache of a run: opened for the model and data settings it depends on,
//! filled ahead of training when asked (`dpo ref-cache build`, full fine-tuning), and closed with
//! a report.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let (settings, loaded): (dpo::config::RunSettings, dpo::setup::Loaded) = todo!();
//! if let Some(cache) = dpo::train::reference::open_cache(&settings, &loaded)? {
//!     println!("{} pairs cached", cache.len());
//! }
//! # Ok(()) }
//! ```
use super::plan::StepPlan;
use crate::config::{CommonArgs, RunSettings};
use crate::data::Dataset;
use crate::data::order::PairOrder;
use crate::provenance::Source;
use crate::refcache::{Fingerprint, RefCache};
use crate::scoring::Reference;
use crate::setup::Loaded;
use anyhow::{Context, Result};

/// The reference cache `--ref-cache` names, opened for this model and these data settings;
/// none when the task runs no reference.
pub fn open_cache(s: &RunSettings, loaded: &Loaded) -> Result<Option<RefCache>> {
    let Some(dir) = s.ref_cache_dir() else { return Ok(None) };
    if !s.task.needs_reference() {
        // Reference-free losses never run the reference: nothing to cache.
        return Ok(None);
    }
    let ld_alpha = s.task.objective().and_then(|o| o.ld_alpha);
    let cache = RefCache::open(&dir, fingerprint(&s.common, ld_alpha, loaded)?)?;
    eprintln!("reference cache {}: {} pairs cached", cache.dir().display(), cache.len());
    Ok(Some(cache))
}

/// Writes what the cache still holds in memory and reports how it served the run.
pub fn close_cache(cache: Option<RefCache>) -> Result<()> {
    if let Some(mut c) = cache {
        c.flush()?;
        eprintln!("reference cache: {} pairs reused, {} computed", c.hits, c.misses);
    }
    Ok(())
}

/// What a run's reference log-probs depend on besides the pairs: the model (every file read),
/// the template, truncation, dtype, device class, padding, LD-DPO's α and the dpo build.
pub fn fingerprint(common: &CommonArgs, ld_alpha: Option<f64>, loaded: &Loaded) -> Result<Fingerprint> {
    let model = Source::model(&loaded.model_dir.display().to_string(), &loaded.model_dir)?;
    let mut settings = vec![
        ("template", crate::config::name_of(&common.render.template)),
        ("format", crate::config::name_of(&common.format)),
        ("max_length", common.max_length.to_string()),
        ("max_prompt_length", common.max_prompt_length.to_string()),
        ("dtype", format!("{:?}", loaded.model.dtype())),
        ("device", if loaded.device.is_cpu() { "cpu" } else { "cuda" }.to_string()),
        ("pad_id", loaded.pad_id.to_string()),
    ];
    if let Some(alpha) = ld_alpha {
        // LD-DPO's weighted sums are what is cached.
        settings.push(("ld_alpha", alpha.to_string()));
    }
    if let Some(t) = &common.render.template_file {
        settings.push((
            "template_file",
            crate::fsutil::sha256_file(t).with_context(|| format!("hashing --template-file {}", t.display()))?,
        ));
    }
    Fingerprint::new(&model, &settings)
}

/// Fills `cache` with the reference log-probs of every micro-batch the run will score: the
/// training steps in order, then the held-out rows (`dpo ref-cache build`, and `--full` before
/// its first step).
pub fn precompute_reference(
    s: &RunSettings,
    loaded: &Loaded,
    data: &Dataset,
    eval: Option<&Dataset>,
    cache: &mut RefCache,
) -> Result<()> {
    let plan = StepPlan::new(&s.run, data.len());
    let order = PairOrder::new(data.len(), (!s.run.no_shuffle).then_some(s.run.seed));
    let mut reference = Reference::Compute(Some(cache));
    let mut fill = |data: &Dataset, indices: &[usize]| -> Result<()> {
        let device = &loaded.device;
        for item in crate::scoring::micro_batches(data, indices, plan.batch_size, loaded.pad_id, device, &s.task) {
            let (pairs, batch) = item?;
            reference.logps(&loaded.model, &pairs, &batch)?;
        }
        Ok(())
    };
    for step in 1..=plan.total_steps {
        fill(data, &plan.rows(step, &order))?;
    }
    if let Some(eval) = eval {
        fill(eval, &(0..eval.len()).collect::<Vec<_>>())?;
    }
    Ok(())
}
