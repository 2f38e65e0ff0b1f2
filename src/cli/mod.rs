//! The `dpo` command line: subcommands, config-file expansion, exit codes.
//!
//! Exit codes: 0 success, 1 a failed run (the message names the file, line or field),
//! 2 a usage error (bad flag or value), 130 / 143 stopped by SIGINT / SIGTERM after writing a
//! checkpoint.
//!
//! ```no_run
//! std::process::exit(dpo::cli::main_with_args(std::env::args().collect()));
//! ```
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
    /// Score preference pairs with a base model and (optionally) an adapter.
    Eval(EvalArgs),
    /// Fold an adapter into the base weights and write a plain model folder.
    Merge(crate::merge::MergeArgs),
    /// Dataset tools.
    #[command(subcommand)]
    Data(DataCommand),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Pre-flight audit of a dataset with a model's tokenizer (--json for JSON).
    Inspect(crate::data::inspect::InspectArgs),
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
        Command::Train(a) => train(&a),
        Command::Eval(a) => eval(&a),
        Command::Merge(a) => crate::merge::run(&a),
        Command::Data(DataCommand::Inspect(a)) => crate::data::inspect::inspect(&a),
    };
    match result {
        Ok(()) => 0,
        Err(e) => match e.downcast_ref::<crate::train::interrupt::Interrupted>() {
            Some(stop) => {
                eprintln!("{stop}");
                128 + stop.signal
            }
            None => {
                eprintln!("error: {e:#}");
                1
            }
        },
    }
}

fn expand(args: Vec<String>) -> anyhow::Result<Vec<String>> {
    match args.get(1).map(String::as_str) {
        Some("train") => expand_config_file::<TrainArgs>(args),
        Some("eval") => expand_config_file::<EvalArgs>(args),
        Some("data") if args.get(2).map(String::as_str) == Some("inspect") => {
            // `dpo data inspect ...`: expand as if `inspect` were the subcommand.
            let mut rest = args[1..].to_vec();
            rest[0] = args[0].clone();
            let expanded = expand_config_file::<crate::data::inspect::InspectArgs>(rest)?;
            Ok([vec![args[0].clone(), "data".to_string()], expanded[1..].to_vec()].concat())
        }
        _ => {
            let _ = Cli::command();
            Ok(args)
        }
    }
}

fn train(args: &TrainArgs) -> anyhow::Result<()> {
    let s = crate::train::run(args)?;
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!(
            "trained {} steps on {} pairs in {:.1}s ({:.0} tokens/s): final loss {:.4}, reward accuracy {:.3}; adapter in {}",
            s.steps,
            s.pairs,
            s.seconds,
            s.tokens_per_sec,
            s.final_loss,
            s.final_reward_accuracy,
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
        println!(
            "loss {:.6}  rewards/accuracies {:.4}  rewards/margins {:.6}  rewards/chosen {:.6}  rewards/rejected {:.6}  logps/chosen {:.4}  logps/rejected {:.4}",
            m.loss, m.rewards_accuracies, m.rewards_margins, m.rewards_chosen, m.rewards_rejected, m.logps_chosen, m.logps_rejected
        );
    }
    Ok(())
}
