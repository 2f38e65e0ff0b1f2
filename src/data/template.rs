//! Prompt templates: how an example's system and question become the prompt text.
//!
//! ```
//! use dpo::data::{Example, Template};
//! let ex = Example { system: String::new(), question: "2+2?".into(), chosen: "4".into(), rejected: "5".into() };
//! assert_eq!(Template::Orca.render(&ex), "### User:\n2+2?\n\n### Assistant:\n");
//! ```
use super::Example;
use anyhow::{Result, bail};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Template {
    /// `### System:\n{system}\n\n### User:\n{question}\n\n### Assistant:\n` (no system block when empty).
    Orca,
    /// The question text as it is (system ignored): for data whose prompts are already formatted.
    Raw,
}

impl Template {
    pub const NAMES: &'static [&'static str] = &["orca", "raw"];

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "orca" => Ok(Self::Orca),
            "raw" => Ok(Self::Raw),
            other => bail!("unknown template {other:?}: choose from {}", Self::NAMES.join(", ")),
        }
    }

    pub fn render(&self, ex: &Example) -> String {
        match self {
            Self::Orca if ex.system.is_empty() => format!("### User:\n{}\n\n### Assistant:\n", ex.question),
            Self::Orca => format!("### System:\n{}\n\n### User:\n{}\n\n### Assistant:\n", ex.system, ex.question),
            Self::Raw => ex.question.clone(),
        }
    }
}
