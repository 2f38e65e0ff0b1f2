//! Crash-safe file writes: write a temporary sibling, fsync, rename over the target.
//!
//! A reader (or a crash) sees either the old file or the new one, never half of one.
//!
//! ```
//! let dir = std::env::temp_dir().join(format!("dpo-atomic-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! dpo::fsutil::atomic::write_bytes(&dir.join("a.txt"), b"hello").unwrap();
//! assert_eq!(std::fs::read(dir.join("a.txt")).unwrap(), b"hello");
//! std::fs::remove_dir_all(&dir).unwrap();
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

/// Builds a directory atomically: `fill` writes into a hidden temporary sibling, whose files are
/// then fsynced before it is renamed to `dir`. A crash leaves either no `dir` or a whole one;
/// the temporary sibling is removed by [`remove_stale_temps`] on the next run.
pub fn write_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = fill(&tmp).and_then(|()| {
        for entry in std::fs::read_dir(&tmp)? {
            File::open(entry?.path())?.sync_all()?;
        }
        File::open(&tmp)?.sync_all()?;
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::rename(&tmp, dir)?;
        sync_parent(dir);
        Ok(())
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.with_context(|| format!("writing {}", dir.display()))
}

/// Removes temporary siblings (`.NAME.tmp-PID`) that a crashed run left in `dir`.
/// Returns the names removed.
pub fn remove_stale_temps(dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(removed) };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(".tmp-") {
            let path = entry.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?
            } else {
                std::fs::remove_file(&path)?
            }
            removed.push(name);
        }
    }
    Ok(removed)
}
