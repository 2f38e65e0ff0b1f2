//! The `dpo` command line: subcommands, config-file expansion, exit codes.
//!
//! Exit codes: 0 success, 1 a failed run (the message names the file, line or field),
//! 2 a usage error (bad flag or value), 130 / 143 stopped by SIGINT / SIGTERM after writing a
//! checkpoint.
//!
//! ```no_run
//! std::process::exit(dpo::cli::main_with_args(std::env::args().collect()));
//! ```
pub mod inspect;
mod refcache;

use crate::config::{RewardArgs, RunSettings, SftArgs, TrainArgs, UsageError, expand_config_file};
use crate::eval::{EvalArgs, ScoreArgs};
use crate::model::LayerPath;
use crate::train::{Outcome, TrainSummary};
use clap::{CommandFactory, Parser, Subcommand};

/// The environment variable that forces the generic layer path (`generic`): read here, once.
pub const LAYER_PATH_ENV: &str = "DPO_LAYER_PATH";

/// Testing hook: stop after this step as if killed (checkpoints already written stay).
pub const STOP_AFTER_STEPS_ENV: &str = "DPO_STOP_AFTER_STEPS";

#[derive(Parser)]
#[command(name = "dpo", version, about = "Direct Preference Optimization with LoRA for Hugging Face causal LMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // one value per process, parsed once
enum Command {
    /// Train with DPO or a relative (every TRL loss, SimPO, CPO, ORPO, KTO).
    Train(TrainArgs),
    /// Supervised fine-tuning on completions.
    ///
    /// The loss is on completion tokens, a token mean over the batch as TRL's SFTTrainer takes
    /// it; rows are prompt/completion or conversations. Checkpoints and resumes as `train` does.
    Sft(SftArgs),
    /// Score preference pairs (or completions) with a model and an optional adapter.
    Eval(EvalArgs),
    /// Train or apply a Bradley–Terry reward model.
    ///
    /// `train`: LoRA plus a fully trained score head, saved as peft saves a
    /// sequence-classification adapter; `score`: per-pair rewards as JSONL.
    #[command(subcommand)]
    Reward(RewardCommand),
    /// Fold an adapter into the base weights and write a plain model folder.
    Merge(crate::merge::MergeArgs),
    /// Dataset tools.
    #[command(subcommand)]
    Data(DataCommand),
    /// Train a grid over β, learning rate and loss in one process.
    ///
    /// The model is loaded once and the reference log-probs are computed once.
    Sweep(crate::sweep::SweepArgs),
    /// Draw a run's or a sweep's training curves (curves.svg, curves.png).
    Plot(crate::plot::PlotArgs),
    /// The reference log-prob cache: build, info, clear.
    #[command(subcommand, name = "ref-cache")]
    RefCache(refcache::RefCacheCommand),
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // one value per process, parsed once
enum RewardCommand {
    /// Train a reward model on preference pairs.
    ///
    /// The loss is `−logσ(r_c − r_r)`, the reward read by a `score` head (hidden → 1) at each
    /// sequence's last token.
    Train(RewardArgs),
    /// Score pairs with a reward model (`--adapter`).
    ///
    /// One JSON line per pair with `reward_chosen`, `reward_rejected`; prints loss, accuracy and
    /// margin.
    Score(ScoreArgs),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Pre-flight audit of a dataset with a model's tokenizer (--json for JSON).
    Inspect(inspect::InspectArgs),
}

pub fn main_with_args(args: Vec<String>) -> i32 {
    let args = match expand(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return if e.downcast_ref::<UsageError>().is_some() { 2 } else { 1 };
        }
    };
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let path =
        if std::env::var(LAYER_PATH_ENV).is_ok_and(|v| v == "generic") { LayerPath::Generic } else { LayerPath::CpuOp };
    exit_code(run(cli.command, path))
}

fn run(command: Command, path: LayerPath) -> anyhow::Result<()> {
    match command {
        Command::Train(mut a) => {
            a.common.model.layer_path = path;
            train(&a.settings()?, &a.run)
        }
        Command::Sft(mut a) => {
            a.common.model.layer_path = path;
            train(&a.settings()?, &a.run)
        }
        Command::Reward(RewardCommand::Train(mut a)) => {
            a.common.model.layer_path = path;
            train(&a.settings()?, &a.run)
        }
        Command::Reward(RewardCommand::Score(mut a)) => {
            a.common.model.layer_path = path;
            score(&a)
        }
        Command::Eval(mut a) => {
            a.common.model.layer_path = path;
            eval(&a)
        }
        Command::Merge(a) => crate::merge::run(&a),
        Command::Data(DataCommand::Inspect(a)) => inspect::inspect(&a),
        Command::Sweep(a) => sweep(&a, path),
        Command::Plot(a) => plot(&a),
        Command::RefCache(c) => refcache::run(c, path),
    }
}

fn exit_code(result: anyhow::Result<()>) -> i32 {
    let Err(e) = result else { return 0 };
    if let Some(stop) = e.downcast_ref::<crate::train::interrupt::Interrupted>() {
        eprintln!("{stop}");
        return 128 + stop.signal;
    }
    if e.downcast_ref::<SweepIncomplete>().is_none() {
        eprintln!("error: {e:#}");
    }
    if e.downcast_ref::<UsageError>().is_some() { 2 } else { 1 }
}

/// Config files, nested subcommands and `--resume` turned into plain flags.
fn expand(args: Vec<String>) -> anyhow::Result<Vec<String>> {
    let (first, second) = (args.get(1).map(String::as_str), args.get(2).map(String::as_str));
    match (first, second) {
        (Some("train"), _) => expand_run::<TrainArgs>(args, "dpo train"),
        (Some("sft"), _) => expand_run::<SftArgs>(args, "dpo sft"),
        (Some("reward"), Some("train")) => nested(args, |a| expand_run::<RewardArgs>(a, "dpo reward train")),
        (Some("reward"), Some("score")) => nested(args, expand_config_file::<ScoreArgs>),
        (Some("eval"), _) => expand_config_file::<EvalArgs>(args),
        (Some("data"), Some("inspect")) => nested(args, expand_config_file::<inspect::InspectArgs>),
        (Some("ref-cache"), Some("build")) => nested(args, expand_config_file::<TrainArgs>),
        _ => Ok(args),
    }
}

/// A training subcommand's flags: from its config file, or (`--resume`) from the checkpoint's,
/// which must have been written by the same subcommand.
fn expand_run<C: CommandFactory>(args: Vec<String>, command: &str) -> anyhow::Result<Vec<String>> {
    let Some(resume) = crate::config::find_flag(&args, "--resume") else { return expand_config_file::<C>(args) };
    let ckpt = crate::checkpoint::resolve(&resume, crate::config::find_flag(&args, "--output-dir").as_deref())?;
    if let Some(written_by) = ckpt.manifest.command.as_deref().filter(|c| *c != command) {
        anyhow::bail!(UsageError(format!(
            "{} was written by `{written_by}`: resume it with `{written_by} --resume {resume}`",
            ckpt.dir.display()
        )));
    }
    crate::config::expand_with_file::<C>(args, &ckpt.dir.join(crate::checkpoint::CONFIG_FILE))
}

/// `dpo GROUP SUB ...`: expands `SUB`'s flags as if it were the subcommand.
fn nested(
    args: Vec<String>,
    expand_sub: impl FnOnce(Vec<String>) -> anyhow::Result<Vec<String>>,
) -> anyhow::Result<Vec<String>> {
    let mut rest = args[1..].to_vec();
    rest[0] = args[0].clone();
    let expanded = expand_sub(rest)?;
    Ok([vec![args[0].clone(), args[1].clone()], expanded[1..].to_vec()].concat())
}

/// Runs a training subcommand (or prints its config or memory plan) and its summary.
fn train(settings: &RunSettings, run: &crate::config::RunArgs) -> anyhow::Result<()> {
    if run.print_config {
        print!("{}", settings.config_toml);
        return Ok(());
    }
    if run.dry_run {
        // The plan was printed; a run that would not fit already failed.
        return crate::train::dry_run(settings);
    }
    let stop_after_steps = std::env::var(STOP_AFTER_STEPS_ENV).ok().and_then(|v| v.parse().ok());
    let control = crate::train::RunControl { pause_after_steps: None, stop_after_steps };
    let summary = match crate::train::run_with(settings, control)? {
        Outcome::Finished(s) => s,
        Outcome::Interrupted(i) => return Err(i.into()),
        Outcome::Stopped { step } | Outcome::Paused { step } => {
            anyhow::bail!("stopped after step {step} ({STOP_AFTER_STEPS_ENV})")
        }
    };
    if run.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("{}", summary_line(&summary));
    }
    Ok(())
}

/// `trained 5 steps on 128 pairs in 3.1s (900 tokens/s): final loss 0.6931, reward accuracy
/// 0.500; adapter in out`: rows named as the task names them, an accuracy only where pairs
/// are ranked.
fn summary_line(s: &TrainSummary) -> String {
    let accuracy = s.final_reward_accuracy.map(|a| format!(", reward accuracy {a:.3}")).unwrap_or_default();
    format!(
        "trained {} steps on {} {} in {:.1}s ({:.0} tokens/s): final loss {:.4}{accuracy}; {} in {}",
        s.steps,
        s.rows,
        s.unit,
        s.seconds,
        s.tokens_per_sec,
        s.final_loss,
        s.saved,
        s.output_dir.display()
    )
}

fn eval(args: &EvalArgs) -> anyhow::Result<()> {
    let m = crate::eval::run(args)?;
    print_metrics(&m, args.scoring.json)
}

fn score(args: &ScoreArgs) -> anyhow::Result<()> {
    let m = crate::eval::score(args)?;
    print_metrics(&m, args.scoring.json)
}

fn print_metrics(m: &crate::loss::Metrics, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(m)?);
        return Ok(());
    }
    print!("loss {:.6}", m.loss);
    if let Some(p) = &m.pairwise {
        print!(
            "  rewards/accuracies {:.4}  rewards/margins {:.6}  rewards/chosen {:.6}  rewards/rejected {:.6}  logps/chosen {:.4}  logps/rejected {:.4}",
            p.rewards_accuracies,
            p.rewards_margins,
            p.rewards_chosen,
            p.rewards_rejected,
            p.logps_chosen,
            p.logps_rejected
        );
    }
    println!();
    let extra: Vec<String> = m.extra.iter().map(|(k, v)| format!("{k} {v:.6}")).collect();
    if !extra.is_empty() {
        println!("{}", extra.join("  "));
    }
    Ok(())
}

/// A sweep that ran but did not finish every run (already reported): exit code 1.
#[derive(Debug)]
struct SweepIncomplete;

impl std::fmt::Display for SweepIncomplete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not every sweep run finished")
    }
}

impl std::error::Error for SweepIncomplete {}

fn sweep(args: &crate::sweep::SweepArgs, path: LayerPath) -> anyhow::Result<()> {
    if args.dry_run {
        let plan = crate::sweep::plan(args)?;
        let runs: Vec<crate::sweep::PlannedRun> =
            crate::sweep::planned_runs(&plan)?.into_iter().map(|(r, _)| r).collect();
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "output_dir": plan.output_dir, "early_stop": plan.early_stop, "runs": runs })
            );
        } else {
            let early = if plan.early_stop.is_some() { " (successive halving on eval reward accuracy)" } else { "" };
            println!("sweep in {}: {} runs{early}", plan.output_dir.display(), runs.len());
            for r in &runs {
                println!("  {} ({}) -> {}", r.name, r.state, r.output_dir.display());
            }
        }
        return Ok(());
    }
    let summary = crate::sweep::run(args, path)?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", summary.markdown());
    }
    if summary.all_finished() {
        Ok(())
    } else {
        eprintln!(
            "error: {} of {} sweep runs did not finish (see sweep_summary.md)",
            summary.rows.len() - summary.finished - summary.stopped,
            summary.rows.len()
        );
        Err(SweepIncomplete.into())
    }
}

fn plot(args: &crate::plot::PlotArgs) -> anyhow::Result<()> {
    let written = crate::plot::run(&args.output)?;
    if args.json {
        println!("{}", serde_json::json!({ "files": written }));
    } else {
        for w in &written {
            println!("wrote {}", w.display());
        }
    }
    Ok(())
}
