//! From data files to tokenized pairs, streamed: one pass reads every row, detects the schema,
//! renders, tokenizes and audits it, and keeps only the byte offset of each usable row; later,
//! [`Pipeline::pair`] re-reads row `i` and tokenizes it again (deterministically).
//!
//! ```no_run
//! use dpo::data::pipeline::{Pipeline, Settings};
//! use dpo::data::PairTokenizer;
//! let dir = std::path::Path::new("tiny-llama");
//! let tok = PairTokenizer::from_model_dir(dir).unwrap();
//! let (p, audit) = Pipeline::build(&[std::path::PathBuf::from("train.jsonl")], Settings::default(), tok, dir).unwrap();
//! println!("{} pairs, {} skipped", p.len(), audit.rows_skipped);
//! ```
use super::audit::{Audit, FirstExample};
use super::chat::{ChatTemplate, find_template};
use super::reader::{self, BadRow, FileType, Row};
use super::schema::FormatChoice;
use super::schema::{Columns, Schema};
use super::store::{Backing, RowStore, Spill};
use super::template::TemplateChoice;
use super::{PairTokenizer, Template, TokenizedPair};
use anyhow::{Context, Result, bail};
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// How rows become pairs (the data flags of `CommonArgs`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub format: FormatChoice,
    pub columns: Columns,
    pub template: TemplateChoice,
    pub template_file: Option<PathBuf>,
    pub max_length: usize,
    pub max_prompt_length: usize,
    /// The model's vocabulary: ids at or beyond it mean tokenizer and model disagree.
    pub vocab_size: Option<usize>,
    /// What each row holds.
    pub rows: super::Rows,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            format: FormatChoice::Auto,
            columns: Columns::default(),
            template: TemplateChoice::Auto,
            template_file: None,
            max_length: 1024,
            max_prompt_length: 512,
            vocab_size: None,
            rows: super::Rows::Pairs,
        }
    }
}

pub struct Pipeline {
    store: RowStore,
    schema: Schema,
    template: Template,
    tokenizer: PairTokenizer,
    settings: Settings,
}

/// A pair with everything the audit wants to know about it.
pub struct Processed {
    pub full: TokenizedPair,
    pub cut: TokenizedPair,
    pub checks: super::tokenize::PairChecks,
    pub rendered: super::Rendered,
    pub same_text: bool,
    /// Unpaired (KTO) rows: whether the completion is desirable.
    pub label: Option<bool>,
}

impl Pipeline {
    /// Reads and audits every row of `files` (in order); `model_dir` supplies the chat template.
    pub fn build(
        files: &[PathBuf],
        settings: Settings,
        tokenizer: PairTokenizer,
        model_dir: &Path,
    ) -> Result<(Self, Audit)> {
        if settings.max_prompt_length >= settings.max_length {
            bail!(
                "--max-prompt-length ({}) must be smaller than --max-length ({})",
                settings.max_prompt_length,
                settings.max_length
            );
        }
        if files.is_empty() {
            bail!("no dataset files");
        }
        check_parquet_schemas(files)?;
        let in_place = files.len() == 1 && FileType::of(&files[0])? == FileType::Jsonl;
        let mut spill = if in_place { None } else { Some(Spill::create()?) };
        let mut audit = Audit::default();
        audit.files = files.iter().map(|f| f.display().to_string()).collect();
        let mut ready: Option<(Schema, Template)> = None;
        let mut offsets = Vec::new();
        for file in files {
            for (offset, row) in rows_with_offsets(file)? {
                audit.rows_read += 1;
                let row = match row {
                    Ok(r) => r,
                    Err(bad) => {
                        audit.skip(bad);
                        continue;
                    }
                };
                if ready.is_none() {
                    let schema =
                        Schema::detect_for(settings.format, settings.columns.clone(), &row.value, settings.rows)
                            .with_context(|| row.at.to_string())?;
                    let template = resolve_template(&settings, &schema, &tokenizer, model_dir)?;
                    audit.format = schema.format.name().into();
                    audit.template = template.name().into();
                    ready = Some((schema, template));
                }
                let (schema, template) = ready.as_ref().unwrap();
                let p = Processor { schema, template, tokenizer: &tokenizer, settings: &settings };
                match p.process(&row.value) {
                    Ok(done) => {
                        audit.record(&done.full, &done.cut, done.checks, done.same_text);
                        if audit.first_example.is_none() {
                            audit.first_example = Some(first_example(&row, &done));
                        }
                        offsets.push(match &mut spill {
                            Some(s) => s.push(&row.value)?,
                            None => offset,
                        });
                    }
                    Err(e) => audit.skip(BadRow { at: row.at, reason: format!("{e:#}") }),
                }
            }
        }
        audit.finish();
        let Some((schema, template)) = ready else {
            audit.check_skip_ratio(0.0)?;
            bail!("{}: the dataset has no rows", audit.files.join(", "));
        };
        let backing = match spill {
            Some(s) => s.finish()?,
            None => Backing::InPlace(files[0].clone()),
        };
        let store = RowStore::new(backing, offsets)?;
        Ok((Self { store, schema, template, tokenizer, settings }, audit))
    }

    pub fn len(&self) -> usize {
        self.store.len()
    }

    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    pub fn template(&self) -> &Template {
        &self.template
    }

    /// Usable pair `i` (file order), tokenized and truncated.
    pub fn pair(&self, i: usize) -> Result<TokenizedPair> {
        Ok(self.labeled(i)?.0)
    }

    /// As [`Pipeline::pair`], with the row's label (unpaired rows).
    pub fn labeled(&self, i: usize) -> Result<(TokenizedPair, Option<bool>)> {
        let row = self.store.row(i)?;
        let p = Processor {
            schema: &self.schema,
            template: &self.template,
            tokenizer: &self.tokenizer,
            settings: &self.settings,
        };
        let processed = p.process(&row).with_context(|| format!("pair {i}"))?;
        Ok((processed.cut, processed.label))
    }

    /// The detected (or forced) row format.
    pub fn format(&self) -> super::schema::Format {
        self.schema.format
    }
}

struct Processor<'a> {
    schema: &'a Schema,
    template: &'a Template,
    tokenizer: &'a PairTokenizer,
    settings: &'a Settings,
}

impl Processor<'_> {
    fn process(&self, row: &serde_json::Value) -> Result<Processed> {
        let ex = self.schema.example(row)?;
        let rendered = self.template.render(&ex)?;
        let (full, checks) = self.tokenizer.tokenize(&rendered)?;
        if let Some(vocab) = self.settings.vocab_size {
            if let Some(bad) =
                full.prompt.iter().chain(&full.chosen).chain(&full.rejected).find(|&&t| t as usize >= vocab)
            {
                bail!("token id {bad} is beyond the model's vocabulary of {vocab}: tokenizer and model do not match");
            }
        }
        let mut cut = full.clone();
        cut.truncate(self.settings.max_length, self.settings.max_prompt_length, self.tokenizer.bos_id());
        Ok(Processed { full, cut, checks, same_text: ex.chosen == ex.rejected, rendered, label: ex.label })
    }
}

fn resolve_template(settings: &Settings, schema: &Schema, tok: &PairTokenizer, model_dir: &Path) -> Result<Template> {
    let (bos, eos) = (tok.token_text(tok.bos_id()), tok.token_text(Some(tok.eos_id())));
    let chat = match &settings.template_file {
        Some(f) => Some(ChatTemplate::from_file(f, &bos, &eos)?),
        None => match find_template(model_dir) {
            Some(src) => Some(
                ChatTemplate::new(&src, &bos, &eos)
                    .with_context(|| format!("chat template of {}", model_dir.display()))?,
            ),
            None => None,
        },
    };
    let choice = match (settings.template_file.is_some(), settings.template) {
        (true, TemplateChoice::Auto) => TemplateChoice::Chat,
        (_, c) => c,
    };
    Template::resolve(choice, schema.format, chat)
}

fn first_example(row: &Row, p: &Processed) -> FirstExample {
    FirstExample {
        at: row.at.clone(),
        prompt: p.rendered.prompt.clone(),
        chosen: p.rendered.chosen.clone(),
        rejected: p.rendered.rejected.clone(),
        prompt_tokens: p.full.prompt.len(),
        chosen_tokens: p.full.chosen.len(),
        rejected_tokens: p.full.rejected.len(),
    }
}

/// Rows with the byte offset of their line (offsets matter only for a plain `.jsonl` file).
fn rows_with_offsets(file: &Path) -> Result<Box<dyn Iterator<Item = (u64, reader::RowResult)>>> {
    if FileType::of(file)? == FileType::Jsonl {
        let f = std::fs::File::open(file).with_context(|| format!("opening dataset file {}", file.display()))?;
        return Ok(Box::new(reader::lines_with_offsets(BufReader::new(f), file.display().to_string())));
    }
    Ok(Box::new(reader::rows(file)?.map(|r| (0, r))))
}

/// Every parquet file of a split must have the columns of the first.
fn check_parquet_schemas(files: &[PathBuf]) -> Result<()> {
    let mut first: Option<(&PathBuf, Vec<String>)> = None;
    for f in files.iter().filter(|f| FileType::of(f).ok() == Some(FileType::Parquet)) {
        let cols = reader::parquet_columns(f)?;
        match &first {
            None => first = Some((f, cols)),
            Some((f0, c0)) if *c0 != cols => bail!(
                "{} has columns ({}) that differ from {} ({}): all files of a split must share one schema",
                f.display(),
                cols.join(", "),
                f0.display(),
                c0.join(", ")
            ),
            _ => {}
        }
    }
    Ok(())
}
