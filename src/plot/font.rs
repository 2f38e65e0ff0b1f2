//! A TrueType font for plot text, found on the system (plotters draws text with it; nothing
//! is bundled). `DPO_PLOT_FONT=/path/font.ttf` picks one explicitly.
//!
//! ```no_run
//! dpo::plot::font::register().unwrap();
//! ```
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers the font as plotters' "sans-serif" (once per process).
pub fn register() -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| load().map_err(|e| format!("{e:#}"))).clone().map_err(anyhow::Error::msg)
}

fn load() -> Result<()> {
    let path = find()?;
    let bytes = std::fs::read(&path).with_context(|| format!("reading font {}", path.display()))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{} is not a usable TrueType font", path.display()))
}

fn find() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("DPO_PLOT_FONT") {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = CANDIDATES.iter().map(Path::new).find(|p| p.is_file()) {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = first_ttf(Path::new("/usr/share/fonts"), 4) {
        return Ok(p);
    }
    bail!("no TrueType font found for plot labels; set DPO_PLOT_FONT=/path/to/font.ttf")
}

fn first_ttf(dir: &Path, depth: usize) -> Option<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in &entries {
        if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("ttf")) {
            return Some(p.clone());
        }
    }
    entries.iter().filter(|p| p.is_dir() && depth > 0).find_map(|p| first_ttf(p, depth - 1))
}
