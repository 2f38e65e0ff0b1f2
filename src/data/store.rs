//! Rows addressed by index without holding them: a JSONL file plus the byte offset of each
//! usable row (8 bytes a row). A plain `.jsonl` dataset is indexed in place; other files
//! (`.jsonl.gz`, `.json`, `.parquet`, several files) are first streamed into a temporary JSONL
//! spill file, removed when the store is dropped.
//!
//! ```no_run
//! use dpo::data::store::{RowStore, Spill};
//! let mut spill = Spill::create().unwrap();
//! let at = spill.push(&serde_json::json!({"prompt": "p"})).unwrap();
//! let store = RowStore::new(spill.finish().unwrap(), vec![at]).unwrap();
//! assert_eq!(store.row(0).unwrap()["prompt"], "p");
//! ```
use anyhow::{Context, Result, anyhow};
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Where rows live: the dataset file itself, or a spill file to delete afterwards.
pub enum Backing {
    InPlace(PathBuf),
    Spill(PathBuf),
}

pub struct RowStore {
    backing: Backing,
    reader: Mutex<BufReader<std::fs::File>>,
    offsets: Vec<u64>,
}

impl RowStore {
    pub fn new(backing: Backing, offsets: Vec<u64>) -> Result<Self> {
        let path = match &backing {
            Backing::InPlace(p) | Backing::Spill(p) => p,
        };
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { reader: Mutex::new(BufReader::new(file)), backing, offsets })
    }

    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// Row `i` (0-based among the usable rows).
    pub fn row(&self, i: usize) -> Result<serde_json::Value> {
        let offset =
            *self.offsets.get(i).with_context(|| format!("row {i} is out of range ({} rows)", self.offsets.len()))?;
        let mut reader = self.reader.lock().map_err(|_| anyhow!("row reader poisoned"))?;
        reader.seek(SeekFrom::Start(offset))?;
        let mut line = Vec::new();
        reader.read_until(b'\n', &mut line)?;
        serde_json::from_slice(&line).with_context(|| format!("row {i} changed on disk since it was indexed"))
    }
}

impl Drop for RowStore {
    fn drop(&mut self) {
        if let Backing::Spill(p) = &self.backing {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A temporary JSONL file rows are appended to.
pub struct Spill {
    path: PathBuf,
    out: BufWriter<std::fs::File>,
    offset: u64,
}

static SPILLS: AtomicUsize = AtomicUsize::new(0);

impl Spill {
    pub fn create() -> Result<Self> {
        let n = SPILLS.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("dpo-rows-{}-{n}.jsonl", std::process::id()));
        let file = std::fs::File::create(&path).with_context(|| format!("creating spill file {}", path.display()))?;
        Ok(Self { path, out: BufWriter::new(file), offset: 0 })
    }

    /// Appends a row; returns its offset.
    pub fn push(&mut self, row: &serde_json::Value) -> Result<u64> {
        let at = self.offset;
        let mut bytes = serde_json::to_vec(row)?;
        bytes.push(b'\n');
        self.out.write_all(&bytes).with_context(|| format!("writing {}", self.path.display()))?;
        self.offset += bytes.len() as u64;
        Ok(at)
    }

    pub fn finish(mut self) -> Result<Backing> {
        self.out.flush()?;
        Ok(Backing::Spill(self.path.clone()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
