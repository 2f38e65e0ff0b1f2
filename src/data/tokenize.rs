//! Tokenizing pairs the way TRL does: the prompt with the tokenizer's special tokens (BOS),
//! each response without them and followed by EOS; then length truncation.
//!
//! ```no_run
//! # use dpo::data::{Example, PairTokenizer, Template};
//! let tok = PairTokenizer::from_model_dir(std::path::Path::new("tiny-llama")).unwrap();
//! let ex = Example { system: "".into(), question: "1+1?".into(), chosen: "2".into(), rejected: "3".into() };
//! let pair = tok.tokenize(&Template::Orca.render(&ex), &ex).unwrap();
//! assert_eq!(*pair.chosen.last().unwrap(), tok.eos_id());
//! ```
use super::Example;
use anyhow::{Context, Result, anyhow, bail};
use std::path::Path;
use tokenizers::Tokenizer;

/// Token ids of one pair: the shared prompt and the two responses (each ending in EOS unless truncated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

impl TokenizedPair {
    /// Applies `max_length` / `max_prompt_length`: if the longer sequence does not fit, keep the
    /// end of the prompt (and its leading BOS), then, if still too long, the start of the responses.
    /// Returns whether anything was cut.
    pub fn truncate(&mut self, max_length: usize, max_prompt_length: usize, bos: Option<u32>) -> bool {
        let longest = |p: &Self| p.prompt.len() + p.chosen.len().max(p.rejected.len());
        if longest(self) <= max_length {
            return false;
        }
        if self.prompt.len() > max_prompt_length {
            let keep_bos = bos.is_some() && self.prompt.first().copied() == bos && max_prompt_length > 1;
            let tail = max_prompt_length - usize::from(keep_bos);
            let mut cut: Vec<u32> = if keep_bos { vec![self.prompt[0]] } else { Vec::new() };
            cut.extend_from_slice(&self.prompt[self.prompt.len() - tail..]);
            self.prompt = cut;
        }
        if longest(self) > max_length {
            let room = max_length.saturating_sub(self.prompt.len());
            self.chosen.truncate(room);
            self.rejected.truncate(room);
        }
        true
    }
}

pub struct PairTokenizer {
    tokenizer: Tokenizer,
    eos_id: u32,
    bos_id: Option<u32>,
}

impl PairTokenizer {
    /// Loads `tokenizer.json`; EOS/BOS come from `tokenizer_config.json`, else `config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| anyhow!("loading {}: {e}", path.display()))?;
        let special = |key: &str| -> Option<u32> {
            let cfg = read_json(&dir.join("tokenizer_config.json"))?;
            let tok = match cfg.get(key)? {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Object(o) => o.get("content")?.as_str()?.to_string(),
                _ => return None,
            };
            tokenizer.token_to_id(&tok)
        };
        let from_model_config = |key: &str| -> Option<u32> {
            let cfg = read_json(&dir.join("config.json"))?;
            match cfg.get(key)? {
                serde_json::Value::Number(n) => n.as_u64().map(|n| n as u32),
                serde_json::Value::Array(a) => a.first()?.as_u64().map(|n| n as u32),
                _ => None,
            }
        };
        let eos_id = special("eos_token")
            .or_else(|| from_model_config("eos_token_id"))
            .with_context(|| format!("no EOS token in {}/tokenizer_config.json or config.json", dir.display()))?;
        let bos_id = special("bos_token").or_else(|| from_model_config("bos_token_id"));
        Ok(Self { tokenizer, eos_id, bos_id })
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn tokenize(&self, prompt_text: &str, ex: &Example) -> Result<TokenizedPair> {
        let prompt = self.encode(prompt_text, true)?;
        let response = |text: &str| -> Result<Vec<u32>> {
            let mut ids = self.encode(text, false)?;
            ids.push(self.eos_id);
            Ok(ids)
        };
        Ok(TokenizedPair { prompt, chosen: response(&ex.chosen)?, rejected: response(&ex.rejected)? })
    }

    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, special).map_err(|e| anyhow!("tokenizing {text:?}: {e}"))?;
        let ids = enc.get_ids().to_vec();
        if ids.is_empty() && special {
            bail!("the prompt {text:?} tokenizes to nothing");
        }
        Ok(ids)
    }
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::TokenizedPair;

    #[test]
    fn truncation_keeps_prompt_end_with_bos_then_response_start() {
        let mut p = TokenizedPair { prompt: vec![1, 10, 11, 12, 13], chosen: vec![20, 21, 2], rejected: vec![30, 2] };
        assert!(!p.clone().truncate(8, 4, Some(1)));
        assert!(p.truncate(6, 3, Some(1)));
        assert_eq!(p.prompt, vec![1, 12, 13]);
        assert_eq!(p.chosen, vec![20, 21, 2]);
        let mut p = TokenizedPair { prompt: vec![1, 10, 11], chosen: vec![20, 21, 22, 23, 2], rejected: vec![30, 2] };
        assert!(p.truncate(5, 2, Some(1)));
        assert_eq!(p.prompt, vec![1, 11]);
        assert_eq!(p.chosen, vec![20, 21, 22]);
        assert_eq!(p.rejected, vec![30, 2]);
    }
}
