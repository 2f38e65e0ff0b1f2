//! `dpo data inspect`: the pre-flight audit of a dataset with a model's tokenizer, printed as
//! text or (`--json`) as one JSON object, without loading the model weights.
//!
//! ```no_run
//! use clap::Parser;
//! let args = dpo::cli::inspect::InspectArgs::parse_from(["inspect", "--model", "m", "--dataset", "d.jsonl", "--json"]);
//! dpo::cli::inspect::inspect(&args).unwrap();
//! ```
use crate::config::CommonArgs;
use crate::data::audit::Audit;
use crate::data::pipeline::Pipeline;
use crate::data::{PairTokenizer, Rows};
use anyhow::Result;
use clap::Parser;
use std::time::Instant;

#[derive(Debug, Clone, Parser)]
#[command(name = "inspect", args_override_self = true)]
pub struct InspectArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Audit the rows as `dpo sft` reads them (completions), not as preference data.
    #[arg(long)]
    pub sft: bool,
    /// Print the audit as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs the audit and prints it; fails (exit 1) when the data would be refused by `dpo train`.
pub fn inspect(args: &InspectArgs) -> Result<()> {
    let rows = if args.sft { Rows::Completions } else { Rows::Examples };
    let audit = audit(&args.common, rows)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&audit.0)?);
    } else {
        print!("{}", crate::data::inspect::report(&audit.0, audit.1));
    }
    audit.0.check_skip_ratio(args.common.max_skip_ratio)
}

/// The audit and the rows/s of the pass.
/// The audit of `common`'s dataset read as `rows`, and the rows read per second.
pub fn audit(common: &CommonArgs, rows: Rows) -> Result<(Audit, f64)> {
    let dir = crate::setup::model_dir(&common.model)?;
    let tokenizer = PairTokenizer::from_model_dir(&dir)?;
    let vocab = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|c| c.get("vocab_size")?.as_u64())
        .map(|v| v as usize);
    let files = crate::setup::dataset_files(common)?;
    let start = Instant::now();
    let (_, audit) = Pipeline::build(&files, common.data_settings(vocab, rows), tokenizer, &dir)?;
    let rate = audit.rows_read as f64 / start.elapsed().as_secs_f64().max(1e-9);
    Ok((audit, rate))
}
