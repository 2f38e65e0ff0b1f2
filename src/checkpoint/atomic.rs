//! Crash-safe file writes: write a temporary sibling, fsync, rename over the target.
//!
//! A reader (or a crash) sees either the old file or the new one, never half of one.
//!
//! ```
//! let dir = std::env::temp_dir().join(format!("dpo-atomic-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! dpo::checkpoint::atomic::write_bytes(&dir.join("a.txt"), b"hello").unwrap();
//! assert_eq!(std::fs::read(dir.join("a.txt")).unwrap(), b"hello");
//! ```
use anyhow::{Context, Result};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Temporary name beside `path`: same folder (so rename is atomic), hidden, tagged by pid.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes through `write` into a temporary sibling, then fsyncs and renames it to `path`.
pub fn write_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(path);
    let result = write(&tmp).and_then(|()| {
        File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_parent(path);
        Ok(())
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |tmp| Ok(std::fs::write(tmp, bytes)?))
}

/// Makes the rename itself durable (best effort: not every filesystem allows it).
fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent()
        && let Ok(dir) = File::open(if parent.as_os_str().is_empty() { Path::new(".") } else { parent })
    {
        let _ = dir.sync_all();
    }
}
