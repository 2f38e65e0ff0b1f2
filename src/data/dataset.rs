//! A run's rows, addressed by index (the trainer asks for them in its seeded order), as the
//! task reads them ([`Rows`]): pairs, labelled examples, or completions. Only the byte offset of
//! each row is held; [`Dataset::get`] re-reads and tokenizes the row.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let (pipeline, audit): (dpo::data::pipeline::Pipeline, dpo::data::audit::Audit) = todo!();
//! let data = dpo::data::Dataset::new(pipeline, audit, dpo::data::Rows::Examples);
//! // KTO on preference pairs: pair 0's chosen response, then its rejected one.
//! assert_eq!(data.labeled(0)?.1, Some(true));
//! assert_eq!(data.labeled(1)?.1, Some(false));
//! # Ok(()) }
//! ```
use super::audit::Audit;
use super::pipeline::Pipeline;
use super::schema::Format;
use super::{Rows, TokenizedPair};
use anyhow::Result;

pub struct Dataset {
    pipeline: Pipeline,
    /// KTO on preference pairs: example `2i` is pair `i`'s chosen response (desirable),
    /// `2i + 1` its rejected one (undesirable).
    unpair: bool,
    /// Rows cut by --max-length / --max-prompt-length.
    pub truncated: usize,
    /// What the pre-flight pass found.
    pub audit: Audit,
}

impl Dataset {
    /// The rows `pipeline` read, as `rows` asks for them.
    pub fn new(pipeline: Pipeline, audit: Audit, rows: Rows) -> Self {
        let unpair = rows == Rows::Examples && pipeline.format() != Format::Unpaired;
        Self { pipeline, unpair, truncated: audit.truncated, audit }
    }

    pub fn len(&self) -> usize {
        self.pipeline.len() * if self.unpair { 2 } else { 1 }
    }

    pub fn is_empty(&self) -> bool {
        self.pipeline.is_empty()
    }

    /// Row `i` (0-based, file order among usable rows), tokenized and truncated.
    pub fn get(&self, i: usize) -> Result<TokenizedPair> {
        Ok(self.labeled(i)?.0)
    }

    /// Example `i` with its label: a pair's label is `None`; a labelled (KTO) example has its
    /// completion in `chosen`, nothing in `rejected`.
    pub fn labeled(&self, i: usize) -> Result<(TokenizedPair, Option<bool>)> {
        if !self.unpair {
            return self.pipeline.labeled(i);
        }
        let pair = self.pipeline.pair(i / 2)?;
        let desirable = i % 2 == 0;
        let completion = if desirable { pair.chosen } else { pair.rejected };
        Ok((TokenizedPair { prompt: pair.prompt, chosen: completion, rejected: Vec::new() }, Some(desirable)))
    }
}
