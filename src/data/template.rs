//! Prompt templates: how an example becomes prompt text and response texts.
//!
//! - `orca`: `### System:\n…\n\n### User:\n…\n\n### Assistant:\n` (no system block when empty);
//!   responses as they are, EOS appended when tokenizing.
//! - `raw`: the prompt string as it is; responses as they are, EOS appended.
//! - `chat`: the tokenizer's chat template (or `--template-file`). As TRL does, the response is
//!   what the template renders for the assistant turn: render prompt + assistant message without
//!   the generation prompt, check the rendered prompt is its prefix, take the rest (it carries the
//!   template's own end-of-turn text, so no EOS is appended).
//! - `auto` (default): `chat` for conversational (`messages`) data when the tokenizer has a chat
//!   template, as TRL applies it; `orca` for orca, Alpaca-ranking and Argilla data (instruction
//!   layouts; pass `--template chat` for the model's own template); `raw` for string prompts.
//!
//! ```
//! use dpo::data::{Example, Template};
//! let ex = Example::orca("", "2+2?", "4", "5");
//! assert_eq!(Template::Orca.render(&ex).unwrap().prompt, "### User:\n2+2?\n\n### Assistant:\n");
//! ```
use super::chat::ChatTemplate;
use super::schema::Format;
use super::{Example, Message};
use anyhow::{Result, bail};
use std::sync::Arc;

#[derive(Clone)]
pub enum Template {
    Orca,
    Raw,
    Chat(Arc<ChatTemplate>),
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An example's texts, ready to tokenize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    /// The prompt text already starts with the BOS text: encode it without special tokens.
    pub bos_in_text: bool,
    /// Append EOS to each response (orca/raw; a chat template renders its own end of turn).
    pub append_eos: bool,
}

/// `--template`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TemplateChoice {
    /// chat for conversational data when the tokenizer has a chat template, orca for orca
    /// rows, raw for string prompts.
    Auto,
    Chat,
    Orca,
    Raw,
}

impl Template {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Orca => "orca",
            Self::Raw => "raw",
            Self::Chat(_) => "chat",
        }
    }

    /// Resolves `--template` for data of `format`; `chat` is the model's template or `--template-file`.
    pub fn resolve(choice: TemplateChoice, format: Format, chat: Option<ChatTemplate>) -> Result<Self> {
        match choice {
            TemplateChoice::Orca => Ok(Self::Orca),
            TemplateChoice::Raw => Ok(Self::Raw),
            TemplateChoice::Chat => match chat {
                Some(c) => Ok(Self::Chat(Arc::new(c))),
                None => bail!(
                    "--template chat: the tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja); pass --template-file or --template orca"
                ),
            },
            TemplateChoice::Auto => Ok(match (format, chat) {
                (Format::Messages | Format::Conversation, Some(c)) => Self::Chat(Arc::new(c)),
                (
                    Format::Messages | Format::Conversation | Format::Orca | Format::AlpacaRanking | Format::Argilla,
                    _,
                ) => Self::Orca,
                (Format::HhRlhf | Format::Explicit | Format::PromptCompletion | Format::Unpaired, _) => Self::Raw,
            }),
        }
    }

    /// Parses a fixed template name (`orca` or `raw`).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "orca" => Ok(Self::Orca),
            "raw" => Ok(Self::Raw),
            other => bail!("unknown template {other:?}: choose from orca, raw (chat needs a tokenizer)"),
        }
    }

    pub fn render(&self, ex: &Example) -> Result<Rendered> {
        let plain = |prompt: String| Rendered {
            prompt,
            chosen: ex.chosen.clone(),
            rejected: ex.rejected.clone(),
            bos_in_text: false,
            append_eos: true,
        };
        match self {
            Self::Raw => Ok(plain(ex.raw_prompt.clone())),
            Self::Orca => {
                let mut r = plain(orca_prompt(&ex.prompt));
                r.chosen = turn_text(&ex.chosen);
                r.rejected = turn_text(&ex.rejected);
                Ok(r)
            }
            Self::Chat(t) => {
                let prompt = t.render(&ex.prompt, true)?;
                let response = |text: &str| -> Result<String> {
                    let mut msgs = ex.prompt.clone();
                    msgs.push(Message::new("assistant", &turn_text(text)));
                    let full = t.render(&msgs, false)?;
                    match full.strip_prefix(&prompt) {
                        Some(rest) => Ok(rest.to_string()),
                        None => bail!(
                            "the chat template's rendering of the prompt is not a prefix of the rendered conversation, so the response cannot be separated"
                        ),
                    }
                };
                Ok(Rendered {
                    bos_in_text: !t.bos_token.is_empty() && prompt.starts_with(&t.bos_token),
                    chosen: response(&ex.chosen)?,
                    // A supervised fine-tuning example has no rejected response.
                    rejected: if ex.rejected.is_empty() { String::new() } else { response(&ex.rejected)? },
                    prompt,
                    append_eos: false,
                })
            }
        }
    }
}

/// A response as an assistant turn: hh-rlhf responses keep the space after "Assistant:".
fn turn_text(s: &str) -> String {
    s.strip_prefix(' ').unwrap_or(s).to_string()
}

fn orca_prompt(turns: &[Message]) -> String {
    let mut out = String::new();
    for m in turns {
        let head = match m.role.as_str() {
            "system" => "### System:",
            "assistant" => "### Assistant:",
            _ => "### User:",
        };
        out.push_str(&format!("{head}\n{}\n\n", m.content));
    }
    out.push_str("### Assistant:\n");
    out
}
