//! TOML config files whose keys are the flag names, expanded into flags placed *before* the
//! user's own (clap lets a later flag override an earlier one, so there is exactly one parser
//! and one set of defaults: built-in defaults < config file < command-line flags).
//!
//! ```
//! let t = dpo::config::file::parse_setting("beta=0.2").unwrap();
//! assert_eq!(t["beta"].as_float(), Some(0.2));
//! ```
use super::UsageError;
use anyhow::{Context, Result, bail};
use clap::CommandFactory;
use std::path::Path;

/// Expands `--config FILE` (anywhere in `args`, after the subcommand at `args[1]`) into flags
/// placed before the user's own, for a subcommand whose flags are described by `C`.
pub fn expand_config_file<C: CommandFactory>(args: Vec<String>) -> Result<Vec<String>> {
    match find_flag(&args, "--config") {
        Some(p) => expand_with_file::<C>(args, Path::new(&p)),
        None => Ok(args),
    }
}

/// Places the flags of the TOML file `path` before the user's own in `args` (the user's win).
pub fn expand_with_file<C: CommandFactory>(args: Vec<String>, path: &Path) -> Result<Vec<String>> {
    let flags = config_file_flags::<C>(path).map_err(|e| anyhow::Error::new(UsageError(format!("{e:#}"))))?;
    let mut out = args[..2.min(args.len())].to_vec();
    out.extend(flags);
    out.extend(args.into_iter().skip(2));
    Ok(out)
}

/// The value of `--flag VALUE` or `--flag=VALUE` after the subcommand.
pub fn find_flag(args: &[String], flag: &str) -> Option<String> {
    let mut it = args.iter().skip(2);
    let with_eq = format!("{flag}=");
    while let Some(a) = it.next() {
        if a == flag {
            return it.next().cloned();
        }
        if let Some(v) = a.strip_prefix(&with_eq) {
            return Some(v.to_string());
        }
    }
    None
}

/// Turns a TOML table into `--key value` flags, checking every key against the flags of `C`.
pub fn config_file_flags<C: CommandFactory>(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    let table: toml::Table =
        text.parse().with_context(|| format!("config file {} is not valid TOML", path.display()))?;
    table_flags::<C>(table, &|key| format!("config file {}{}", path.display(), key_line(&text, key)))
}

/// Turns `key = value` settings into flags of `C`; `origin(key)` says where a bad key came from.
pub fn table_flags<C: CommandFactory>(table: toml::Table, origin: &dyn Fn(&str) -> String) -> Result<Vec<String>> {
    let command = C::command();
    let mut flags = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(flag.as_str()) && !matches!(flag.as_str(), "config" | "resume"))
            .with_context(|| format!("{}: unknown key {key:?}", origin(&key)))?;
        let takes_value = arg.get_action().takes_values();
        let text = match (&value, takes_value) {
            (toml::Value::Boolean(true), false) => {
                flags.push(format!("--{flag}"));
                continue;
            }
            (toml::Value::Boolean(false), false) => continue,
            (_, false) => bail!("{}: key {key:?} must be true or false", origin(&key)),
            (toml::Value::String(s), true) => s.clone(),
            (toml::Value::Integer(i), true) => i.to_string(),
            (toml::Value::Float(f), true) => f.to_string(),
            // An empty list is the flag's default (nothing given).
            (toml::Value::Array(items), true) if items.is_empty() => continue,
            (toml::Value::Array(items), true) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))
                .collect::<Vec<_>>()
                .join(","),
            (other, true) => bail!("{}: key {key:?} has unsupported value {other}", origin(&key)),
        };
        flags.push(format!("--{flag}={text}"));
    }
    Ok(flags)
}

/// `key=value` (a `--set` argument) as a one-entry TOML table; the value is read as TOML
/// (`0.1`, `true`, `["q", "v"]`) and as a plain string when it is not valid TOML.
pub fn parse_setting(setting: &str) -> Result<toml::Table> {
    let (key, value) = setting.split_once('=').with_context(|| format!("--set {setting:?}: expected key=value"))?;
    let key = key.trim();
    let value = value.trim();
    let parsed = format!("v = {value}").parse::<toml::Table>().ok().and_then(|mut t| t.remove("v"));
    let value = parsed.unwrap_or_else(|| toml::Value::String(value.to_string()));
    Ok(toml::Table::from_iter([(key.to_string(), value)]))
}

/// `:LINE` of the line that sets `key` in a TOML text, for error messages ("" when not found).
fn key_line(text: &str, key: &str) -> String {
    text.lines()
        .position(|l| l.trim_start().strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('=')))
        .map(|i| format!(":{}", i + 1))
        .unwrap_or_default()
}
