//! `dpo data inspect`: the pre-flight audit of a dataset with a model's tokenizer, printed as
//! text or (`--json`) as one JSON object, without loading the model weights.
//!
//! ```no_run
//! use clap::Parser;
//! let args = dpo::data::inspect::InspectArgs::parse_from(["inspect", "--model", "m", "--dataset", "d.jsonl", "--json"]);
//! dpo::data::inspect::inspect(&args).unwrap();
//! ```
use crate::config::CommonArgs;
use crate::data::PairTokenizer;
use crate::data::audit::Audit;
use crate::data::pipeline::Pipeline;
use anyhow::Result;
use clap::Parser;
use std::time::Instant;

#[derive(Debug, Clone, Parser)]
#[command(name = "inspect", args_override_self = true)]
pub struct InspectArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Print the audit as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs the audit and prints it; fails (exit 1) when the data would be refused by `dpo train`.
pub fn inspect(args: &InspectArgs) -> Result<()> {
    let audit = run(&args.common)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&audit.0)?);
    } else {
        print!("{}", report(&audit.0, audit.1));
    }
    audit.0.check_skip_ratio(args.common.max_skip_ratio)
}

/// The audit and the rows/s of the pass.
pub fn run(common: &CommonArgs) -> Result<(Audit, f64)> {
    let dir = crate::setup::model_dir(common)?;
    let tokenizer = PairTokenizer::from_model_dir(&dir)?;
    let vocab = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|c| c.get("vocab_size")?.as_u64())
        .map(|v| v as usize);
    let files = crate::setup::dataset_files(common)?;
    let start = Instant::now();
    let (_, audit) = Pipeline::build(&files, common.data_settings(vocab), tokenizer, &dir)?;
    let rate = audit.rows_read as f64 / start.elapsed().as_secs_f64().max(1e-9);
    Ok((audit, rate))
}

/// The human-readable report.
pub fn report(a: &Audit, rows_per_sec: f64) -> String {
    let mut s = String::new();
    let mut line = |t: String| {
        s.push_str(&t);
        s.push('\n');
    };
    line(format!("files: {}", a.files.join(", ")));
    line(format!("format {}, template {}", a.format, a.template));
    line(format!("rows read {}, used {}, skipped {} ({rows_per_sec:.0} rows/s)", a.rows_read, a.rows_used, a.rows_skipped));
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
    line(format!("truncated {} (prompt cut {}, response cut {})", a.truncated, a.truncated_prompt, a.truncated_response));
    line(format!(
        "chosen == rejected {}, double BOS {}, double EOS {}, tokenization boundary mismatches {}",
        a.chosen_equals_rejected, a.double_bos, a.double_eos, a.boundary_mismatches
    ));
    if let Some(e) = &a.first_example {
        line(format!("first example ({}), boundaries marked with ⟦ ⟧:", e.at));
        line(format!("⟦prompt {} tokens⟧{}⟦chosen {} tokens⟧{}⟦end⟧", e.prompt_tokens, e.prompt, e.chosen_tokens, e.chosen));
        line(format!("⟦rejected {} tokens⟧{}⟦end⟧", e.rejected_tokens, e.rejected));
    }
    s
}
