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

use crate::config::{TrainArgs, expand_config_file};
use crate::eval::EvalArgs;
use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "dpo", version, about = "Direct Preference Optimization with LoRA for Hugging Face causal LMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a LoRA adapter with DPO.
    Train(TrainArgs),
    /// Supervised fine-tuning of a LoRA adapter on prompt/completion or messages rows (the
    /// loss on completion tokens, a token mean over the batch as TRL's SFTTrainer); takes
    /// `train`'s flags, checkpoints and resumes the same way.
    Sft(TrainArgs),
    /// Score preference pairs with a base model and (optionally) an adapter.
    Eval(EvalArgs),
    /// A Bradley–Terry reward model: `train` (LoRA plus a fully trained score head, saved as
    /// peft saves a sequence-classification adapter) and `score` (per-pair rewards as JSONL).
    #[command(subcommand)]
    Reward(RewardCommand),
    /// Fold an adapter into the base weights and write a plain model folder.
    Merge(crate::merge::MergeArgs),
    /// Dataset tools.
    #[command(subcommand)]
    Data(DataCommand),
    /// Train a grid over β, learning rate and loss in one process (model loaded once,
    /// reference log-probs computed once).
    Sweep(crate::sweep::SweepArgs),
    /// Draw a run's or a sweep's training curves into OUTPUT/curves.svg and curves.png.
    Plot(crate::plot::PlotArgs),
    /// The reference log-prob cache: build, info, clear.
    #[command(subcommand, name = "ref-cache")]
    RefCache(refcache::RefCacheCommand),
}

#[derive(Subcommand)]
enum RewardCommand {
    /// Train a reward model on preference pairs: `−logσ(r_c − r_r)`, the reward read by a
    /// `score` head (hidden → 1) at each sequence's last token; `train`'s flags.
    Train(TrainArgs),
    /// Score pairs with a reward model (`--adapter`): one JSON line per pair with
    /// `reward_chosen`, `reward_rejected`; prints loss, accuracy and margin; `eval`'s flags.
    Score(EvalArgs),
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
            return if e.downcast_ref::<crate::config::UsageError>().is_some() { 2 } else { 1 };
        }
    };
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let result = match cli.command {
        Command::Train(a) | Command::Sft(a) | Command::Reward(RewardCommand::Train(a)) => train(&a),
        Command::Reward(RewardCommand::Score(a)) => eval(&a),
        Command::Eval(a) => eval(&a),
        Command::Merge(a) => crate::merge::run(&a),
        Command::Data(DataCommand::Inspect(a)) => inspect::inspect(&a),
        Command::Sweep(a) => sweep(&a),
        Command::Plot(a) => plot(&a),
        Command::RefCache(c) => refcache::run(c),
    };
    match result {
        Ok(()) => 0,
        Err(e) => match e.downcast_ref::<crate::train::interrupt::Interrupted>() {
            Some(stop) => {
                eprintln!("{stop}");
                128 + stop.signal
            }
            None if e.downcast_ref::<SweepIncomplete>().is_some() => 1,
            None => {
                eprintln!("error: {e:#}");
                if e.downcast_ref::<crate::config::UsageError>().is_some() { 2 } else { 1 }
            }
        },
    }
}

fn expand(args: Vec<String>) -> anyhow::Result<Vec<String>> {
    match args.get(1).map(String::as_str) {
        // `dpo sft` is `train` on completions; the stage comes last, so no config file changes it.
        Some("sft") => {
            let mut train = args.clone();
            train[1] = "train".into();
            let mut expanded = expand(train)?;
            expanded[1] = "sft".into();
            expanded.push("--stage=sft".into());
            Ok(expanded)
        }
        // `dpo reward train|score` is `train|eval --stage reward`.
        Some("reward") if matches!(args.get(2).map(String::as_str), Some("train" | "score")) => {
            let sub = if args[2] == "train" { "train" } else { "eval" };
            let inner: Vec<String> = [vec![args[0].clone(), sub.to_string()], args[3..].to_vec()].concat();
            let expanded = expand(inner)?;
            let mut out = vec![args[0].clone(), "reward".into(), args[2].clone()];
            out.extend(expanded[2..].iter().cloned());
            out.push("--stage=reward".into());
            Ok(out)
        }
        Some("train") => match crate::config::find_flag(&args, "--resume") {
            // A resumed run's settings come from its checkpoint, in place of a config file.
            Some(resume) => {
                let ckpt =
                    crate::checkpoint::resolve(&resume, crate::config::find_flag(&args, "--output-dir").as_deref())?;
                crate::config::expand_with_file::<TrainArgs>(args, &ckpt.dir.join(crate::checkpoint::CONFIG_FILE))
            }
            None => expand_config_file::<TrainArgs>(args),
        },
        Some("eval") => expand_config_file::<EvalArgs>(args),
        Some("data") if args.get(2).map(String::as_str) == Some("inspect") => {
            expand_nested::<inspect::InspectArgs>(args)
        }
        Some("ref-cache") if args.get(2).map(String::as_str) == Some("build") => expand_nested::<TrainArgs>(args),
        _ => Ok(args),
    }
}

/// `dpo GROUP SUB ...`: expands `--config` as if `SUB` were the subcommand.
fn expand_nested<C: CommandFactory>(args: Vec<String>) -> anyhow::Result<Vec<String>> {
    let mut rest = args[1..].to_vec();
    rest[0] = args[0].clone();
    let expanded = expand_config_file::<C>(rest)?;
    Ok([vec![args[0].clone(), args[1].clone()], expanded[1..].to_vec()].concat())
}

fn train(args: &TrainArgs) -> anyhow::Result<()> {
    if args.print_config {
        crate::config::validate(args)?;
        print!("{}", args.to_toml()?);
        return Ok(());
    }
    crate::config::validate(args)?;
    if args.dry_run {
        // The plan was printed; a run that would not fit already failed.
        return crate::train::dry_run(args);
    }
    // Testing hook: stop after this step as if killed (checkpoints already written stay).
    let stop_after_steps = std::env::var("DPO_STOP_AFTER_STEPS").ok().and_then(|v| v.parse().ok());
    let control = crate::train::RunControl { pause_after_steps: None, stop_after_steps };
    let s = match crate::train::run_with(args, control)? {
        crate::train::Outcome::Finished(s) => s,
        crate::train::Outcome::Interrupted(i) => return Err(i.into()),
        crate::train::Outcome::Stopped { step } | crate::train::Outcome::Paused { step } => {
            anyhow::bail!("stopped after step {step} (DPO_STOP_AFTER_STEPS)")
        }
    };
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        let (unit, accuracy) = match args.common.stage {
            crate::config::Stage::Sft => ("examples", String::new()),
            crate::config::Stage::Dpo | crate::config::Stage::Reward => {
                ("pairs", format!(", reward accuracy {:.3}", s.final_reward_accuracy))
            }
        };
        println!(
            "trained {} steps on {} {unit} in {:.1}s ({:.0} tokens/s): final loss {:.4}{accuracy}; adapter in {}",
            s.steps,
            s.pairs,
            s.seconds,
            s.tokens_per_sec,
            s.final_loss,
            s.output_dir.display()
        );
    }
    Ok(())
}

fn eval(args: &EvalArgs) -> anyhow::Result<()> {
    let m = crate::eval::run(args)?;
    if args.json {
        println!("{}", serde_json::to_string(&m)?);
    } else {
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

fn sweep(args: &crate::sweep::SweepArgs) -> anyhow::Result<()> {
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
    let summary = crate::sweep::run(args)?;
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
