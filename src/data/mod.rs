//! Preference data: reading rows, detecting the schema, rendering prompts, tokenizing, batching.
//!
//! A pair flows `file rows → (schema) Example → (template) Rendered → TokenizedPair → PairBatch`.
//! Rows are read as streams and indexed by byte offset ([`store`]), so a dataset costs 8 bytes a
//! row in memory; each pair is re-read and tokenized when the trainer asks for it.
pub mod audit;
pub mod batch;
pub mod chat;
pub mod dataset;
pub mod inspect;
pub mod order;
pub mod pipeline;
pub mod reader;
pub mod schema;
pub mod store;
pub mod template;
pub mod tokenize;

pub use batch::PairBatch;
pub use dataset::Dataset;
pub use template::{Rendered, Template};
pub use tokenize::{PairTokenizer, TokenizedPair};

/// What a task reads from each row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rows {
    /// Preference pairs: a prompt, a chosen and a rejected response (every paired layout).
    #[default]
    Pairs,
    /// KTO's labelled examples: unpaired rows (`prompt`, `completion`, `label`), or preference
    /// pairs, whose two responses become a desirable and an undesirable example.
    Examples,
    /// Supervised fine-tuning completions: a prompt and its completion, or a conversation.
    Completions,
}

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_string(), content: content.to_string() }
    }
}

/// One preference example before templating: the prompt (as turns and as one string) and the
/// two responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The conversation before the response: optional system turn, then user/assistant turns.
    pub prompt: Vec<Message>,
    /// The prompt as a single string (`--template raw`): the question, the prompt column, or an
    /// hh-rlhf dialogue prefix ending in `"\n\nAssistant:"`.
    pub raw_prompt: String,
    pub chosen: String,
    pub rejected: String,
    /// Unpaired (KTO) rows: whether the completion (in `chosen`) is desirable.
    pub label: Option<bool>,
}

impl Example {
    /// The orca-style example with an optional system prompt.
    pub fn orca(system: &str, question: &str, chosen: &str, rejected: &str) -> Self {
        let mut prompt = Vec::new();
        if !system.is_empty() {
            prompt.push(Message::new("system", system));
        }
        prompt.push(Message::new("user", question));
        Self {
            prompt,
            raw_prompt: question.to_string(),
            chosen: chosen.to_string(),
            rejected: rejected.to_string(),
            label: None,
        }
    }
}
