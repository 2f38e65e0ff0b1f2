//! `dpo plot OUTPUT`: training curves of a run, or of every run of a sweep, as
//! `OUTPUT/curves.svg` and `OUTPUT/curves.png` (see [`draw`] for what is drawn).
//!
//! ```no_run
//! let written = dpo::plot::run(std::path::Path::new("runs/quickstart")).unwrap();
//! println!("{}", written[0].display()); // runs/quickstart/curves.svg
//! ```
pub mod draw;
pub mod font;
pub mod series;

use crate::fsutil::atomic;
use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

pub const SIZE: (u32, u32) = (1500, 1000);

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "plot")]
pub struct PlotArgs {
    /// A run folder (with metrics.jsonl) or a sweep folder (run folders inside).
    pub output: PathBuf,
    /// Print the written paths as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Writes `dir/curves.svg` and `dir/curves.png`; returns their paths.
pub fn run(dir: &Path) -> Result<Vec<PathBuf>> {
    let runs = series::read_runs(dir)?;
    font::register()?;
    let svg_path = dir.join("curves.svg");
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        draw::figure(&root, &runs)?;
    }
    atomic::write_bytes(&svg_path, svg.as_bytes())?;
    let png_path = dir.join("curves.png");
    let mut rgb = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
        draw::figure(&root, &runs)?;
    }
    atomic::write_bytes(&png_path, &encode_png(&rgb, SIZE)?)?;
    Ok(vec![svg_path, png_path])
}

fn encode_png(rgb: &[u8], (w, h): (u32, u32)) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| anyhow!("encoding PNG: {e}"))?;
        writer.write_image_data(rgb).context("encoding PNG")?;
    }
    Ok(out)
}
