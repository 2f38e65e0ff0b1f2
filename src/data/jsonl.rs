//! Orca-style JSONL (`system`, `question`, `chosen`, `rejected`), with errors that name the line.
//!
//! ```no_run
//! let examples = dpo::data::jsonl::read_orca(std::path::Path::new("train.jsonl")).unwrap();
//! println!("{} pairs", examples.len());
//! ```
use super::Example;
use anyhow::{Context, Result, bail};
use std::io::BufRead;
use std::path::Path;

/// Reads every pair of an orca-style JSONL file. Blank lines are skipped.
pub fn read_orca(path: &Path) -> Result<Vec<Example>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening dataset {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line_no = i + 1;
        let line = line.with_context(|| format!("{}:{line_no}: cannot read line (not UTF-8?)", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let record: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{}:{line_no}: malformed JSON", path.display()))?;
        out.push(orca_example(&record).with_context(|| format!("{}:{line_no}", path.display()))?);
    }
    if out.is_empty() {
        bail!("dataset {} holds no pairs", path.display());
    }
    Ok(out)
}

fn orca_example(record: &serde_json::Value) -> Result<Example> {
    if !record.is_object() {
        bail!("expected a JSON object with system, question, chosen, rejected");
    }
    let text = |key: &str, required: bool| -> Result<String> {
        match record.get(key) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            None | Some(serde_json::Value::Null) if !required => Ok(String::new()),
            None => bail!("missing field {key:?}"),
            Some(other) => bail!("field {key:?} must be a string, found {}", kind(other)),
        }
    };
    Ok(Example {
        system: text("system", false)?,
        question: text("question", true)?,
        chosen: text("chosen", true)?,
        rejected: text("rejected", true)?,
    })
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
