//! The reference log-prob cache: the frozen reference's summed response log-probs per pair,
//! computed once and reused by every run (and every β / learning rate of a sweep).
//!
//! `DIR/<fingerprint>/` holds `meta.json` (what the fingerprint is made of) and sealed segment
//! files ([`segment`]). An entry's key is the sha256 of the fingerprint, the pair's token ids,
//! its position in its micro-batch and the token ids of the whole micro-batch: candle's kernels
//! round a row's sums differently with other batch-mates and padding, so a value is reused only
//! where it is bit-for-bit what the reference forward would return. Runs that share the data
//! order and batch size (a sweep over β, lr and loss) hit on every batch. A segment that fails
//! its checks makes the whole namespace be cleared and rebuilt, never silently used.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let (pairs, batch, fp, values): (Vec<dpo::data::TokenizedPair>, dpo::data::PairBatch, dpo::refcache::Fingerprint, Vec<f32>) = todo!();
//! let mut cache = dpo::refcache::RefCache::open(std::path::Path::new("ref-cache"), fp)?;
//! if cache.lookup(&pairs, &batch).is_none() {
//!     cache.store(&pairs, &batch, &values)?; // [2·pairs] f32 from a reference forward
//! }
//! cache.flush()?;
//! # Ok(()) }
//! ```
pub mod fingerprint;
pub mod segment;

pub use fingerprint::Fingerprint;

use crate::data::{PairBatch, TokenizedPair};
use crate::fsutil::atomic;
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub type Key = [u8; 32];
pub const META_FILE: &str = "meta.json";
const SEGMENT_PREFIX: &str = "seg-";
/// New entries are written out as a segment once this many are pending.
const FLUSH_EVERY: usize = 4096;

/// One pair's reference values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Entry {
    pub chosen: f32,
    pub rejected: f32,
    pub chosen_tokens: u32,
    pub rejected_tokens: u32,
}

/// An open namespace of the cache, loaded into memory.
pub struct RefCache {
    dir: PathBuf,
    digest: Key,
    entries: HashMap<Key, Entry>,
    pending: Vec<(Key, Entry)>,
    /// Pairs served from the cache / computed, since opening.
    pub hits: usize,
    pub misses: usize,
    /// Why the namespace was cleared when opened (a corrupt or foreign segment), if it was.
    pub rebuilt: Option<String>,
}

impl RefCache {
    /// Opens (creating it if needed) the namespace of `fingerprint` under `root`, verifying
    /// every segment; a bad one clears the namespace, reported in [`RefCache::rebuilt`].
    pub fn open(root: &Path, fingerprint: Fingerprint) -> Result<Self> {
        let dir = root.join(fingerprint.short());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating reference cache {}", dir.display()))?;
        atomic::remove_stale_temps(&dir)?;
        let meta = serde_json::to_string_pretty(&fingerprint)?;
        if std::fs::read_to_string(dir.join(META_FILE)).ok().as_deref() != Some(meta.as_str()) {
            atomic::write_bytes(&dir.join(META_FILE), meta.as_bytes())?;
        }
        let digest = fingerprint.digest();
        let mut cache =
            Self { dir, digest, entries: HashMap::new(), pending: Vec::new(), hits: 0, misses: 0, rebuilt: None };
        if let Err(e) = cache.load() {
            let reason = format!("{e:#}");
            eprintln!("reference cache {}: {reason}; clearing it and recomputing", cache.dir.display());
            for seg in segments(&cache.dir)? {
                std::fs::remove_file(&seg).with_context(|| format!("removing {}", seg.display()))?;
            }
            cache.entries.clear();
            cache.rebuilt = Some(reason);
        }
        Ok(cache)
    }

    fn load(&mut self) -> Result<()> {
        for seg in segments(&self.dir)? {
            let bytes = std::fs::read(&seg).with_context(|| format!("reading {}", seg.display()))?;
            let entries =
                segment::decode(&bytes, &self.digest).with_context(|| format!("segment {}", seg.display()))?;
            self.entries.extend(entries);
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The batch's reference log-probs `[2·pairs]` (chosen rows, then rejected rows) when every
    /// pair of it is cached (a hit), else `None`.
    pub fn lookup(&mut self, pairs: &[TokenizedPair], batch: &PairBatch) -> Option<Vec<f32>> {
        let keys = batch_keys(&self.digest, pairs);
        let entries: Vec<Entry> = keys.iter().map(|k| self.entries.get(k).copied()).collect::<Option<_>>()?;
        if !tokens_match(&entries, batch) {
            return None;
        }
        self.hits += pairs.len();
        Some(entries.iter().map(|e| e.chosen).chain(entries.iter().map(|e| e.rejected)).collect())
    }

    /// Keeps a batch's computed reference values `[2·pairs]` (written out with the next flush).
    pub fn store(&mut self, pairs: &[TokenizedPair], batch: &PairBatch, values: &[f32]) -> Result<()> {
        let n = pairs.len();
        for (i, key) in batch_keys(&self.digest, pairs).into_iter().enumerate() {
            let e = Entry {
                chosen: values[i],
                rejected: values[n + i],
                chosen_tokens: batch.response_tokens[i] as u32,
                rejected_tokens: batch.response_tokens[n + i] as u32,
            };
            self.entries.insert(key, e);
            self.pending.push((key, e));
        }
        self.misses += n;
        if self.pending.len() >= FLUSH_EVERY {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the entries computed since the last flush as one new segment (atomically).
    pub fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let bytes = segment::encode(&self.digest, &self.pending);
        let name = format!("{SEGMENT_PREFIX}{}.bin", hex(&Sha256::digest(&bytes)[..12]));
        atomic::write_bytes(&self.dir.join(name), &bytes)?;
        self.pending.clear();
        Ok(())
    }
}

fn tokens_match(entries: &[Entry], batch: &PairBatch) -> bool {
    let n = entries.len();
    entries.iter().enumerate().all(|(i, e)| {
        e.chosen_tokens as usize == batch.response_tokens[i]
            && e.rejected_tokens as usize == batch.response_tokens[n + i]
    })
}

/// Keys of a micro-batch's pairs: fingerprint, the whole batch's ids, the pair's position and ids.
pub fn batch_keys(digest: &Key, pairs: &[TokenizedPair]) -> Vec<Key> {
    let mut batch = Sha256::new();
    for p in pairs {
        hash_pair(&mut batch, p);
    }
    let batch = batch.finalize();
    pairs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut h = Sha256::new();
            h.update(digest);
            h.update(batch);
            h.update((i as u64).to_le_bytes());
            hash_pair(&mut h, p);
            h.finalize().into()
        })
        .collect()
}

fn hash_pair(h: &mut Sha256, p: &TokenizedPair) {
    for ids in [&p.prompt, &p.chosen, &p.rejected] {
        h.update((ids.len() as u64).to_le_bytes());
        for id in ids.iter() {
            h.update(id.to_le_bytes());
        }
    }
}

/// Segment files of a namespace folder, in name order.
pub fn segments(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(out) };
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if name.starts_with(SEGMENT_PREFIX) && name.ends_with(".bin") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
