//! The figure: one panel per metric (loss, reward accuracy, reward margin, chosen and rejected
//! log-probs) with one line per run over optimizer steps and the held-out value as a cross at
//! the last step, plus, for a sweep over β and lr, a β × lr heat map of eval reward accuracy.
//! Drawn on any plotters backend (SVG and PNG share this code).
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let runs: Vec<dpo::plot::series::RunSeries> = todo!();
//! use plotters::prelude::*;
//! let mut svg = String::new();
//! {
//!     let root = SVGBackend::with_string(&mut svg, (1500, 1000)).into_drawing_area();
//!     dpo::plot::draw::figure(&root, &runs)?;
//! }
//! # Ok(()) }
//! ```
use super::series::{RunSeries, metrics_of};
use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

const LEGEND_WIDTH: u32 = 230;

const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

fn title(metric: &str) -> &'static str {
    match metric {
        "loss" => "loss",
        "rewards/accuracies" => "reward accuracy",
        "rewards/margins" => "reward margin",
        "logps/chosen" => "log p(chosen)",
        "logps/rejected" => "log p(rejected)",
        "nll_loss" => "NLL (chosen)",
        "log_odds_ratio" => "log σ(log odds ratio)",
        "entropy" => "policy entropy",
        "mean_token_accuracy" => "token accuracy (chosen)",
        _ => "metric",
    }
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e:?}")
}

/// Draws the whole figure on `root`: three panels a row, one per metric, then the heat map.
pub fn figure<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, runs: &[RunSeries]) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let heading =
        if runs.len() == 1 { format!("dpo run {}", runs[0].name) } else { format!("dpo sweep: {} runs", runs.len()) };
    let body = root
        .titled(&format!("{heading}   (thick lines: train, per step; ×: held-out eval)"), ("sans-serif", 26))
        .map_err(err)?;
    let (plots, legend) = body.split_horizontally(body.dim_in_pixel().0.saturating_sub(LEGEND_WIDTH));
    legend_panel(&legend, runs)?;
    let metrics = metrics_of(runs);
    let panels = plots.split_evenly(((metrics.len() + 1).div_ceil(3), 3));
    for (i, metric) in metrics.iter().enumerate() {
        line_panel(&panels[i], runs, metric)?;
    }
    let last = &panels[metrics.len()];
    match heat_axes(runs) {
        Some((betas, lrs)) => heat_map(last, runs, &betas, &lrs)?,
        None => final_values(last, runs)?,
    }
    root.present().map_err(err)?;
    Ok(())
}

fn line_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, runs: &[RunSeries], metric: &str) -> Result<()> {
    let mut values: Vec<f64> = runs.iter().flat_map(|r| r.train.get(metric).into_iter().flatten().copied()).collect();
    values.extend(runs.iter().filter_map(|r| r.eval.as_ref().and_then(|e| e.get(metric).copied())));
    values.extend(runs.iter().flat_map(|r| r.eval_curve.get(metric).into_iter().flatten().copied()));
    values.retain(|v| v.is_finite());
    let (mut lo, mut hi) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { 1.0 };
    let max_step = runs.iter().flat_map(|r| r.steps.iter().copied()).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(title(metric), ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..max_step * 1.02, (lo - pad)..(hi + pad))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    for (i, r) in runs.iter().enumerate() {
        let c = color(i);
        let points = r.steps.iter().copied().zip(r.train.get(metric).into_iter().flatten().copied());
        chart.draw_series(LineSeries::new(points, c.stroke_width(2))).map_err(err)?;
        if let Some(curve) = r.eval_curve.get(metric).filter(|c| !c.is_empty()) {
            // Held-out curve: thin line with a cross at each evaluation.
            let points: Vec<(f64, f64)> = r.eval_steps.iter().copied().zip(curve.iter().copied()).collect();
            chart.draw_series(LineSeries::new(points.clone(), c.mix(0.6).stroke_width(1))).map_err(err)?;
            chart.draw_series(points.into_iter().map(|p| Cross::new(p, 6, c.stroke_width(2)))).map_err(err)?;
        } else if let (Some(v), Some(&last)) = (r.eval.as_ref().and_then(|e| e.get(metric)), r.steps.last()) {
            chart.draw_series(std::iter::once(Cross::new((last, *v), 9, c.stroke_width(3)))).map_err(err)?;
        }
    }
    Ok(())
}

/// Run names with their colours.
fn legend_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, runs: &[RunSeries]) -> Result<()> {
    let area = area.margin(40, 10, 10, 10);
    area.draw(&Text::new("runs", (0, 0), ("sans-serif", 20))).map_err(err)?;
    for (i, r) in runs.iter().enumerate() {
        let y = 34 + 26 * i as i32;
        area.draw(&Rectangle::new([(0, y + 5), (26, y + 10)], color(i).filled())).map_err(err)?;
        area.draw(&Text::new(r.name.clone(), (34, y - 1), ("sans-serif", 15))).map_err(err)?;
    }
    Ok(())
}

/// Final train and eval numbers per run, when there is no β × lr grid to map.
fn final_values<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, runs: &[RunSeries]) -> Result<()> {
    let area = area.margin(40, 10, 20, 10);
    area.draw(&Text::new("final values (train / eval)", (0, 0), ("sans-serif", 20))).map_err(err)?;
    let mut y = 36;
    for (i, r) in runs.iter().enumerate().take(12) {
        let last = |m: &str| r.train.get(m).and_then(|v| v.last()).map_or("–".to_string(), |v| format!("{v:.3}"));
        let eval = |m: &str| r.eval.as_ref().and_then(|e| e.get(m)).map_or("–".to_string(), |v| format!("{v:.3}"));
        let text = format!(
            "loss {} / {}   acc {} / {}",
            last("loss"),
            eval("loss"),
            last("rewards/accuracies"),
            eval("rewards/accuracies")
        );
        area.draw(&Text::new(text, (0, y), ("sans-serif", 16).into_font().color(&color(i)))).map_err(err)?;
        y += 24;
    }
    Ok(())
}

/// β and lr values (numeric order) when the runs form a grid over both.
fn heat_axes(runs: &[RunSeries]) -> Option<(Vec<String>, Vec<String>)> {
    let axis = |key: &str| -> Option<Vec<String>> {
        let mut v: Vec<String> = runs.iter().map(|r| r.params.get(key).cloned()).collect::<Option<Vec<_>>>()?;
        v.sort_by(|a, b| a.parse::<f64>().unwrap_or(0.0).total_cmp(&b.parse::<f64>().unwrap_or(0.0)));
        v.dedup();
        Some(v)
    };
    let (betas, lrs) = (axis("beta")?, axis("lr")?);
    (betas.len() * lrs.len() > 1).then_some((betas, lrs))
}

fn heat_map<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    runs: &[RunSeries],
    betas: &[String],
    lrs: &[String],
) -> Result<()> {
    let has_eval = runs.iter().any(|r| r.eval.is_some());
    let value = |r: &RunSeries| -> Option<f64> {
        match &r.eval {
            Some(e) => e.get("rewards/accuracies").copied(),
            None if !has_eval => r.train.get("rewards/accuracies").and_then(|v| v.last()).copied(),
            None => None,
        }
    };
    let caption = if has_eval {
        "eval reward accuracy (β × lr)"
    } else {
        "final train reward accuracy (β × lr; no eval set)"
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0..lrs.len() - 1).into_segmented(), (0..betas.len() - 1).into_segmented())
        .map_err(err)?;
    let name_of = |v: &SegmentValue<usize>, names: &[String]| match v {
        SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("learning rate")
        .y_desc("β")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .x_label_formatter(&|v| name_of(v, lrs))
        .y_label_formatter(&|v| name_of(v, betas))
        .draw()
        .map_err(err)?;
    for r in runs {
        let (Some(b), Some(l)) = (r.params.get("beta"), r.params.get("lr")) else { continue };
        let (Some(y), Some(x)) = (betas.iter().position(|v| v == b), lrs.iter().position(|v| v == l)) else { continue };
        let Some(acc) = value(r) else { continue };
        let fill = shade(acc);
        let cell = [
            (SegmentValue::Exact(x), SegmentValue::Exact(y)),
            (SegmentValue::Exact(x + 1), SegmentValue::Exact(y + 1)),
        ];
        chart.draw_series(std::iter::once(Rectangle::new(cell, fill.filled()))).map_err(err)?;
        let ink = if acc > 0.6 { WHITE } else { BLACK };
        let label = Text::new(
            format!("{acc:.2}"),
            (SegmentValue::CenterOf(x), SegmentValue::CenterOf(y)),
            ("sans-serif", 20).into_font().color(&ink),
        );
        chart.draw_series(std::iter::once(label)).map_err(err)?;
    }
    Ok(())
}

/// White (0) to dark blue (1).
fn shade(v: f64) -> RGBColor {
    let t = v.clamp(0.0, 1.0);
    let mix = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    RGBColor(mix(247.0, 8.0), mix(251.0, 48.0), mix(255.0, 107.0))
}
