//! Preference data: reading pairs, rendering prompts, tokenizing, batching.
//!
//! A pair flows `records → Example → (template) prompt text → TokenizedPair → PairBatch`.
pub mod batch;
pub mod jsonl;
pub mod order;
pub mod template;
pub mod tokenize;

pub use batch::PairBatch;
pub use template::Template;
pub use tokenize::{PairTokenizer, TokenizedPair};

/// One preference example before templating: the prompt parts and the two responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub system: String,
    pub question: String,
    pub chosen: String,
    pub rejected: String,
}
