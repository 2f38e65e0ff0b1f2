//! Which columns hold the prompt and the two responses: the four common layouts, detected from
//! the first row's column names and value types, or forced with `--format`.
//!
//! - `orca`: `system`, `question`, `chosen`, `rejected` strings (Intel/orca_dpo_pairs).
//! - `messages`: `chosen`/`rejected` lists of `{role, content}` ending in the assistant turn;
//!   the prompt is every turn before it, or the `prompt` column (string or list)
//!   (HuggingFaceH4/ultrafeedback_binarized).
//! - `hh-rlhf`: `chosen`/`rejected` full dialogues; the prompt is their longest common prefix
//!   ending in `"\n\nAssistant:"` (Anthropic/hh-rlhf).
//! - `explicit`: `prompt`, `chosen`, `rejected` strings.
//! - `alpaca-ranking` (LLaMA-Factory): `instruction`, `input`, `output: [chosen, rejected]`,
//!   optional `system` and `history: [[user, assistant], …]`; the user turn is `instruction`,
//!   then `"\n"` and `input` when there is one (LLaMA-Factory's convention).
//! - `argilla`: `instruction`, `chosen_response`, `rejected_response`, optional `system`.
//!
//! Supervised fine-tuning (`dpo sft`) reads completions instead of pairs (the completion takes
//! the place of the chosen response, there is no rejected one):
//! - `prompt-completion`: `prompt` and `completion` strings (TRL's prompt/completion layout);
//! - `conversation`: `messages` (a list of `{role, content}` ending in the assistant turn
//!   trained on), or `prompt` and `completion` as message lists (TRL's conversational
//!   prompt/completion).
//!
//! KTO (`dpo train --loss kto`) also reads unpaired rows: `unpaired`: `prompt`, `completion`
//! (strings, or message lists) and `label` (true: desirable) (TRL's unpaired preference layout).
//!
//! ```
//! use dpo::data::schema::{Columns, FormatChoice, Schema};
//! let row = serde_json::json!({"prompt": "2+2?", "chosen": "4", "rejected": "5"});
//! let schema = Schema::detect(FormatChoice::Auto, Columns::default(), &row).unwrap();
//! assert_eq!(schema.example(&row).unwrap().raw_prompt, "2+2?");
//! ```
use super::{Example, Message, Rows};
use anyhow::{Result, bail};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Orca,
    Messages,
    HhRlhf,
    Explicit,
    AlpacaRanking,
    Argilla,
    PromptCompletion,
    Conversation,
    Unpaired,
}

/// `--format`: a format, or `auto` (detected from the first row's columns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FormatChoice {
    Auto,
    Orca,
    #[value(aliases = ["preference-with-messages", "ultrafeedback"])]
    Messages,
    #[value(alias = "hh")]
    HhRlhf,
    #[value(alias = "prompt-chosen-rejected")]
    Explicit,
    #[value(alias = "alpaca")]
    AlpacaRanking,
    Argilla,
    PromptCompletion,
    #[value(alias = "messages-sft")]
    Conversation,
    #[value(alias = "kto")]
    Unpaired,
}

impl FormatChoice {
    /// `None` for `auto`.
    pub fn format(self) -> Option<Format> {
        match self {
            Self::Auto => None,
            Self::Orca => Some(Format::Orca),
            Self::Messages => Some(Format::Messages),
            Self::HhRlhf => Some(Format::HhRlhf),
            Self::Explicit => Some(Format::Explicit),
            Self::AlpacaRanking => Some(Format::AlpacaRanking),
            Self::Argilla => Some(Format::Argilla),
            Self::PromptCompletion => Some(Format::PromptCompletion),
            Self::Conversation => Some(Format::Conversation),
            Self::Unpaired => Some(Format::Unpaired),
        }
    }
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Self::Orca => "orca",
            Self::Messages => "messages",
            Self::HhRlhf => "hh-rlhf",
            Self::Explicit => "explicit",
            Self::AlpacaRanking => "alpaca-ranking",
            Self::Argilla => "argilla",
            Self::PromptCompletion => "prompt-completion",
            Self::Conversation => "conversation",
            Self::Unpaired => "unpaired",
        }
    }

    /// Rows of completions for supervised fine-tuning, not preference pairs.
    pub fn is_completions(self) -> bool {
        matches!(self, Self::PromptCompletion | Self::Conversation)
    }
}

/// Column-name overrides (`--prompt-column` etc.); `None` keeps the format's own name.
#[derive(Debug, Clone, Default)]
pub struct Columns {
    pub prompt: Option<String>,
    pub chosen: Option<String>,
    pub rejected: Option<String>,
}

/// A format with its resolved column names.
#[derive(Debug, Clone)]
pub struct Schema {
    pub format: Format,
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

impl Schema {
    /// Picks the format (`--format`, or from `first`'s columns) and checks `first` has its columns.
    pub fn detect(format: FormatChoice, cols: Columns, first: &Value) -> Result<Self> {
        Self::detect_for(format, cols, first, Rows::Pairs)
    }

    /// As [`Schema::detect`], for rows holding what `rows` says: preference pairs, KTO's
    /// examples (unpaired rows or pairs), or supervised fine-tuning completions.
    pub fn detect_for(format: FormatChoice, cols: Columns, first: &Value, rows: Rows) -> Result<Self> {
        let Some(obj) = first.as_object() else { bail!("rows must be JSON objects, found {}", kind(first)) };
        if rows == Rows::Completions {
            return Self::detect_completions(format, cols, obj);
        }
        if let Some(f) = format.format().filter(|f| f.is_completions()) {
            bail!("format {} holds completions, not preference pairs: train on it with `dpo sft`", f.name());
        }
        let completion = cols.chosen.as_deref().unwrap_or("completion");
        let unpaired = obj.contains_key("label") && obj.contains_key(completion);
        if format == FormatChoice::Unpaired || (format == FormatChoice::Auto && unpaired) {
            return Self::detect_unpaired(cols, obj, rows);
        }
        Self::detect_pairs(format, cols, obj, rows)
    }

    /// KTO's unpaired layout: prompt, completion and a boolean label.
    fn detect_unpaired(cols: Columns, obj: &serde_json::Map<String, Value>, rows: Rows) -> Result<Self> {
        if rows == Rows::Pairs {
            bail!("the rows are unpaired (prompt, completion, label): train on them with `dpo train --loss kto`");
        }
        let prompt = cols.prompt.unwrap_or_else(|| "prompt".into());
        let completion = cols.chosen.unwrap_or_else(|| "completion".into());
        if let Some(missing) =
            [&prompt, &completion, &"label".to_string()].iter().find(|c| !obj.contains_key(c.as_str()))
        {
            bail!(
                "format unpaired needs column {missing:?}, but the columns are: {}",
                obj.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        if let Some(label) = obj.get("label").filter(|l| !l.is_boolean()) {
            bail!("format unpaired: column \"label\" must be true or false, found {} {label}", kind(label));
        }
        Ok(Self { format: Format::Unpaired, prompt, chosen: completion, rejected: String::new() })
    }

    /// One of the paired layouts, named by `--format` or told from the columns.
    fn detect_pairs(
        format: FormatChoice,
        cols: Columns,
        obj: &serde_json::Map<String, Value>,
        rows: Rows,
    ) -> Result<Self> {
        let found = || obj.keys().cloned().collect::<Vec<_>>().join(", ");
        let instruction = cols.prompt.clone().unwrap_or_else(|| "instruction".into());
        let format = match format.format() {
            Some(f) => f,
            None if obj.contains_key(&instruction) && obj.get("output").is_some_and(Value::is_array) => {
                Format::AlpacaRanking
            }
            None if obj.contains_key(&instruction) && obj.contains_key("chosen_response") => Format::Argilla,
            None => match obj.get(cols.chosen.as_deref().unwrap_or("chosen")) {
                Some(Value::Array(_)) => Format::Messages,
                Some(Value::String(_)) if cols.prompt.is_some() => Format::Explicit,
                Some(Value::String(_)) if obj.contains_key("question") => Format::Orca,
                Some(Value::String(_)) if obj.contains_key("prompt") => Format::Explicit,
                Some(Value::String(s)) if s.contains(HH_MARKER) => Format::HhRlhf,
                _ => bail!(
                    "cannot tell the dataset format from its columns ({}): expected orca (system, question, chosen, rejected), \
                     messages (prompt, chosen/rejected as [{{role, content}}]), hh-rlhf (chosen, rejected dialogues), explicit \
                     (prompt, chosen, rejected), alpaca-ranking (instruction, input, output: [chosen, rejected]) or argilla \
                     (instruction, chosen_response, rejected_response){}; pass --format and --prompt-column/--chosen-column/--rejected-column",
                    found(),
                    if rows == Rows::Examples { ", or unpaired (prompt, completion, label)" } else { "" }
                ),
            },
        };
        if format == Format::AlpacaRanking {
            if let Some(flag) = [("--chosen-column", &cols.chosen), ("--rejected-column", &cols.rejected)]
                .iter()
                .find(|(_, c)| c.is_some())
                .map(|(f, _)| f)
            {
                bail!("{flag} does not apply to format alpaca-ranking: its \"output\" column holds [chosen, rejected]");
            }
        }
        let (chosen, rejected) = match format {
            Format::AlpacaRanking => ("output".to_string(), "output".to_string()),
            Format::Argilla => (
                cols.chosen.unwrap_or_else(|| "chosen_response".into()),
                cols.rejected.unwrap_or_else(|| "rejected_response".into()),
            ),
            _ => (cols.chosen.unwrap_or_else(|| "chosen".into()), cols.rejected.unwrap_or_else(|| "rejected".into())),
        };
        let prompt = match format {
            Format::Orca => cols.prompt.unwrap_or_else(|| "question".into()),
            Format::AlpacaRanking | Format::Argilla => instruction,
            _ => cols.prompt.unwrap_or_else(|| "prompt".into()),
        };
        let schema = Self { format, prompt, chosen, rejected };
        let mut needed = vec![&schema.chosen, &schema.rejected];
        if matches!(format, Format::Orca | Format::Explicit | Format::AlpacaRanking | Format::Argilla) {
            needed.push(&schema.prompt);
        }
        if let Some(missing) = needed.iter().find(|c| !obj.contains_key(c.as_str())) {
            bail!("format {} needs column {missing:?}, but the columns are: {}", format.name(), found());
        }
        Ok(schema)
    }

    fn detect_completions(format: FormatChoice, cols: Columns, obj: &serde_json::Map<String, Value>) -> Result<Self> {
        let found = || obj.keys().cloned().collect::<Vec<_>>().join(", ");
        let prompt = cols.prompt.unwrap_or_else(|| "prompt".into());
        let completion = cols.chosen.unwrap_or_else(|| "completion".into());
        let format = match format.format() {
            Some(f) if f.is_completions() => f,
            Some(f) => bail!(
                "format {} holds preference pairs: `dpo sft` reads prompt-completion or conversation rows",
                f.name()
            ),
            None if obj.get("messages").is_some_and(Value::is_array) => Format::Conversation,
            None if obj.get(&prompt).is_some_and(Value::is_array) && obj.contains_key(&completion) => {
                Format::Conversation
            }
            None if obj.contains_key(&prompt) && obj.contains_key(&completion) => Format::PromptCompletion,
            None => bail!(
                "cannot tell the supervised fine-tuning format from the columns ({}): expected prompt-completion (prompt, completion) \
                 or conversation (messages as [{{role, content}}], or prompt and completion as message lists); pass --format",
                found()
            ),
        };
        let messages = format == Format::Conversation && obj.contains_key("messages");
        let schema = if messages {
            Self { format, prompt: "messages".into(), chosen: "messages".into(), rejected: String::new() }
        } else {
            Self { format, prompt, chosen: completion, rejected: String::new() }
        };
        if let Some(missing) = [&schema.prompt, &schema.chosen].iter().find(|c| !obj.contains_key(c.as_str())) {
            bail!("format {} needs column {missing:?}, but the columns are: {}", format.name(), found());
        }
        Ok(schema)
    }

    /// An unpaired (KTO) row: prompt, completion (in `chosen`) and its label.
    fn unpaired_example(&self, row: &Value) -> Result<Example> {
        let label = match row.get("label") {
            Some(Value::Bool(b)) => *b,
            Some(other) => bail!("field \"label\" must be true or false, found {}", kind(other)),
            None => bail!("missing field \"label\""),
        };
        let mut ex = match row.get(&self.prompt) {
            Some(Value::Array(_)) => {
                let prompt = messages(row, &self.prompt)?;
                let completion = match row.get(&self.chosen) {
                    Some(Value::Array(_)) => match messages(row, &self.chosen)?.as_slice() {
                        [m] if m.role == "assistant" => m.content.clone(),
                        _ => bail!("field {:?} must be one assistant turn", self.chosen),
                    },
                    _ => text(row, &self.chosen, true)?,
                };
                let raw_prompt = prompt.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n\n");
                Example { prompt, raw_prompt, chosen: completion, rejected: String::new(), label: None }
            }
            _ => {
                let p = text(row, &self.prompt, true)?;
                Example {
                    prompt: vec![Message::new("user", &p)],
                    raw_prompt: p,
                    chosen: text(row, &self.chosen, true)?,
                    rejected: String::new(),
                    label: None,
                }
            }
        };
        ex.label = Some(label);
        Ok(ex)
    }

    /// A supervised fine-tuning row: the prompt and the completion (in `chosen`).
    fn completion_example(&self, row: &Value) -> Result<Example> {
        let (prompt, completion) = if self.prompt == "messages" && self.chosen == "messages" {
            let turns = messages(row, "messages")?;
            let (before, last) = split_last_assistant(&turns, "messages")?;
            if before.iter().any(|m| m.role == "assistant") {
                bail!(
                    "field \"messages\" has several assistant turns: training on every assistant turn of a conversation is not supported yet; \
                     keep one conversation per assistant turn (the earlier turns as context)"
                );
            }
            (before.to_vec(), last.to_string())
        } else if self.format == Format::Conversation {
            let prompt = messages(row, &self.prompt)?;
            let completion = messages(row, &self.chosen)?;
            match completion.as_slice() {
                [m] if m.role == "assistant" => (prompt, m.content.clone()),
                _ => bail!("field {:?} must be one assistant turn", self.chosen),
            }
        } else {
            let p = text(row, &self.prompt, true)?;
            let mut ex = Example::orca("", &p, &text(row, &self.chosen, true)?, "");
            ex.prompt = vec![Message::new("user", &p)];
            return Ok(ex);
        };
        let raw_prompt = prompt.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n\n");
        Ok(Example { prompt, raw_prompt, chosen: completion, rejected: String::new(), label: None })
    }

    /// The row as an example; errors name the field.
    pub fn example(&self, row: &Value) -> Result<Example> {
        if !row.is_object() {
            bail!("expected a JSON object, found {}", kind(row));
        }
        let ex = match self.format {
            Format::Orca => Example::orca(
                &text(row, "system", false)?,
                &text(row, &self.prompt, true)?,
                &text(row, &self.chosen, true)?,
                &text(row, &self.rejected, true)?,
            ),
            Format::Explicit => {
                let p = text(row, &self.prompt, true)?;
                Example {
                    prompt: vec![Message::new("user", &p)],
                    raw_prompt: p,
                    chosen: text(row, &self.chosen, true)?,
                    rejected: text(row, &self.rejected, true)?,
                    label: None,
                }
            }
            Format::HhRlhf => hh_example(&text(row, &self.chosen, true)?, &text(row, &self.rejected, true)?)?,
            Format::Messages => self.messages_example(row)?,
            Format::AlpacaRanking => self.alpaca_example(row)?,
            Format::Argilla => {
                let mut ex = Example::orca(&text(row, "system", false)?, &text(row, &self.prompt, true)?, "", "");
                ex.chosen = text(row, &self.chosen, true)?;
                ex.rejected = text(row, &self.rejected, true)?;
                ex
            }
            Format::PromptCompletion | Format::Conversation => self.completion_example(row)?,
            Format::Unpaired => self.unpaired_example(row)?,
        };
        if ex.raw_prompt.trim().is_empty() && ex.prompt.iter().all(|m| m.content.trim().is_empty()) {
            bail!("empty prompt");
        }
        let responses = if self.format.is_completions() || self.format == Format::Unpaired {
            vec![(&self.chosen, &ex.chosen)]
        } else {
            vec![(&self.chosen, &ex.chosen), (&self.rejected, &ex.rejected)]
        };
        for (name, r) in responses {
            if r.trim().is_empty() {
                bail!("field {name:?} has an empty response");
            }
        }
        Ok(ex)
    }

    /// LLaMA-Factory's Alpaca ranking row: system, history turns, `instruction\ninput`, and
    /// `output: [chosen, rejected]`.
    fn alpaca_example(&self, row: &Value) -> Result<Example> {
        let instruction = text(row, &self.prompt, true)?;
        let input = text(row, "input", false)?;
        let question = if input.is_empty() { instruction } else { format!("{instruction}\n{input}") };
        let output = row.get("output").and_then(Value::as_array);
        let (chosen, rejected) = match output.map(|o| o.as_slice()) {
            Some([Value::String(c), Value::String(r)]) => (c.clone(), r.clone()),
            _ => bail!(
                "field \"output\" must be [chosen, rejected] (two strings), found {}",
                row.get("output").map_or("nothing", kind)
            ),
        };
        let mut ex = Example::orca(&text(row, "system", false)?, &question, &chosen, &rejected);
        let history = match row.get("history") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(turns)) => turns.clone(),
            Some(other) => bail!("field \"history\" must be a list of [user, assistant] pairs, found {}", kind(other)),
        };
        let mut earlier = Vec::new();
        for (i, turn) in history.iter().enumerate() {
            match turn.as_array().map(|t| t.as_slice()) {
                Some([Value::String(u), Value::String(a)]) => {
                    earlier.extend([Message::new("user", u), Message::new("assistant", a)])
                }
                _ => bail!("field \"history\"[{i}] must be [user, assistant] (two strings)"),
            }
        }
        let at = usize::from(ex.prompt.first().is_some_and(|m| m.role == "system"));
        ex.prompt.splice(at..at, earlier);
        Ok(ex)
    }

    fn messages_example(&self, row: &Value) -> Result<Example> {
        let chosen = messages(row, &self.chosen)?;
        let rejected = messages(row, &self.rejected)?;
        let (c_prompt, c_resp) = split_last_assistant(&chosen, &self.chosen)?;
        let (r_prompt, r_resp) = split_last_assistant(&rejected, &self.rejected)?;
        let prompt = match row.get(&self.prompt) {
            _ if !c_prompt.is_empty() => {
                if c_prompt != r_prompt {
                    bail!("fields {:?} and {:?} have different prompt turns", self.chosen, self.rejected);
                }
                c_prompt.to_vec()
            }
            Some(Value::String(p)) => vec![Message::new("user", p)],
            Some(Value::Array(_)) => messages(row, &self.prompt)?,
            _ => {
                bail!("field {:?} holds only the assistant turn and there is no {:?} column", self.chosen, self.prompt)
            }
        };
        let raw_prompt = match row.get(&self.prompt) {
            Some(Value::String(p)) => p.clone(),
            _ => prompt.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n\n"),
        };
        Ok(Example { prompt, raw_prompt, chosen: c_resp.to_string(), rejected: r_resp.to_string(), label: None })
    }
}

const HH_MARKER: &str = "\n\nAssistant:";

/// Splits hh-rlhf dialogues at the longest common prefix that ends in `"\n\nAssistant:"`.
pub fn hh_example(chosen: &str, rejected: &str) -> Result<Example> {
    let common = chosen
        .char_indices()
        .zip(rejected.chars())
        .take_while(|((_, a), b)| a == b)
        .last()
        .map_or(0, |((i, c), _)| i + c.len_utf8());
    let Some(at) = chosen[..common].rfind(HH_MARKER) else {
        bail!("chosen and rejected share no prefix ending in \"\\n\\nAssistant:\"");
    };
    let end = at + HH_MARKER.len();
    let raw_prompt = &chosen[..end];
    Ok(Example {
        prompt: hh_turns(raw_prompt),
        raw_prompt: raw_prompt.to_string(),
        // TRL keeps the space after "Assistant:" in the response; templates that use turns trim it.
        chosen: chosen[end..].to_string(),
        rejected: rejected[end..].to_string(),
        label: None,
    })
}

/// `"\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"` → user a, assistant b, user c.
fn hh_turns(prefix: &str) -> Vec<Message> {
    let mut out: Vec<Message> = Vec::new();
    let mut rest = prefix;
    while !rest.is_empty() {
        let (role, body) = if let Some(r) = rest.strip_prefix("\n\nHuman:") {
            ("user", r)
        } else if let Some(r) = rest.strip_prefix(HH_MARKER) {
            ("assistant", r)
        } else {
            ("user", rest)
        };
        let next = [body.find("\n\nHuman:"), body.find(HH_MARKER)].into_iter().flatten().min().unwrap_or(body.len());
        let content = body[..next].trim();
        if !content.is_empty() {
            out.push(Message::new(role, content));
        }
        rest = &body[next..];
    }
    out
}

fn split_last_assistant<'a>(msgs: &'a [Message], field: &str) -> Result<(&'a [Message], &'a str)> {
    match msgs.split_last() {
        Some((last, before)) if last.role == "assistant" => Ok((before, last.content.as_str())),
        Some((last, _)) => bail!("field {field:?} must end with an assistant turn, found role {:?}", last.role),
        None => bail!("field {field:?} is an empty list"),
    }
}

fn messages(row: &Value, key: &str) -> Result<Vec<Message>> {
    let Some(v) = row.get(key) else { bail!("missing field {key:?}") };
    let Some(items) = v.as_array() else {
        bail!("field {key:?} must be a list of {{role, content}}, found {}", kind(v))
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let s = |k: &str| match m.get(k) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => bail!("field {key:?}[{i}].{k} must be a string, found {}", kind(other)),
                None => bail!("field {key:?}[{i}] has no {k:?}"),
            };
            Ok(Message { role: s("role")?, content: s("content")? })
        })
        .collect()
}

fn text(row: &Value, key: &str, required: bool) -> Result<String> {
    match row.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) if !required => Ok(String::new()),
        None => bail!("missing field {key:?}"),
        Some(other) => bail!("field {key:?} must be a string, found {}", kind(other)),
    }
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hh_split_at_last_shared_assistant_marker() {
        let ex = hh_example(
            "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: 1+1?\n\nAssistant: 2",
            "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: 1+1?\n\nAssistant: 3",
        )
        .unwrap();
        assert_eq!(ex.raw_prompt, "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: 1+1?\n\nAssistant:");
        assert_eq!(ex.chosen, " 2");
        assert_eq!(
            ex.prompt,
            vec![Message::new("user", "hi"), Message::new("assistant", "yo"), Message::new("user", "1+1?")]
        );
        assert!(hh_example("a", "b").is_err());
    }

    #[test]
    fn alpaca_ranking_and_argilla_rows_become_orca_examples() {
        let alpaca = serde_json::json!({"instruction": "Add", "input": "2+2", "output": ["4", "5"], "system": "Be brief.",
            "history": [["hi", "hello"]]});
        let schema = Schema::detect(FormatChoice::Auto, Columns::default(), &alpaca).unwrap();
        assert_eq!(schema.format, Format::AlpacaRanking);
        let ex = schema.example(&alpaca).unwrap();
        let mut want = Example::orca("Be brief.", "Add\n2+2", "4", "5");
        want.prompt.splice(1..1, [Message::new("user", "hi"), Message::new("assistant", "hello")]);
        assert_eq!(ex, want);
        let bad = serde_json::json!({"instruction": "Add", "input": "", "output": ["4"]});
        assert!(schema.example(&bad).unwrap_err().to_string().contains("output"));

        let argilla = serde_json::json!({"instruction": "2+2?", "chosen_response": "4", "rejected_response": "5"});
        let schema = Schema::detect(FormatChoice::Auto, Columns::default(), &argilla).unwrap();
        assert_eq!(schema.format, Format::Argilla);
        assert_eq!(schema.example(&argilla).unwrap(), Example::orca("", "2+2?", "4", "5"));
    }
}
