//! The pre-flight audit as text, for `dpo data inspect` (which prints it, or `--json`).
//!
//! ```
//! let audit = dpo::data::audit::Audit::default();
//! assert!(dpo::data::inspect::report(&audit, 0.0).contains("rows read 0"));
//! ```
use crate::data::audit::Audit;

/// The human-readable report.
pub fn report(a: &Audit, rows_per_sec: f64) -> String {
    let mut s = String::new();
    let mut line = |t: String| {
        s.push_str(&t);
        s.push('\n');
    };
    line(format!("files: {}", a.files.join(", ")));
    line(format!("format {}, template {}", a.format, a.template));
    line(format!(
        "rows read {}, used {}, skipped {} ({rows_per_sec:.0} rows/s)",
        a.rows_read, a.rows_used, a.rows_skipped
    ));
    for (reason, n) in &a.skip_reasons {
        line(format!("  skipped {n}: {reason}"));
    }
    for b in a.skipped.iter().take(10) {
        line(format!("  {b}"));
    }
    line("tokens      min   p50   p90   p99   max".into());
    for (name, p) in [("prompt", &a.tokens.prompt), ("chosen", &a.tokens.chosen), ("rejected", &a.tokens.rejected)] {
        line(format!("  {name:<9}{:>5} {:>5} {:>5} {:>5} {:>5}", p.min, p.p50, p.p90, p.p99, p.max));
    }
    line(format!(
        "truncated {} (prompt cut {}, response cut {})",
        a.truncated, a.truncated_prompt, a.truncated_response
    ));
    line(format!(
        "chosen == rejected {}, double BOS {}, double EOS {}, tokenization boundary mismatches {}",
        a.chosen_equals_rejected, a.double_bos, a.double_eos, a.boundary_mismatches
    ));
    if let Some(e) = &a.first_example {
        line(format!("first example ({}), boundaries marked with ⟦ ⟧:", e.at));
        line(format!(
            "⟦prompt {} tokens⟧{}⟦chosen {} tokens⟧{}⟦end⟧",
            e.prompt_tokens, e.prompt, e.chosen_tokens, e.chosen
        ));
        line(format!("⟦rejected {} tokens⟧{}⟦end⟧", e.rejected_tokens, e.rejected));
    }
    s
}
