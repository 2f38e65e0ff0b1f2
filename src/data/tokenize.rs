//! Tokenizing pairs the way TRL does: the prompt with the tokenizer's special tokens (BOS),
//! each response without them and followed by EOS; then length truncation.
//!
//! ```no_run
//! # use dpo::data::{Example, PairTokenizer, Template};
//! let tok = PairTokenizer::from_model_dir(std::path::Path::new("tiny-llama")).unwrap();
//! let ex = Example::orca("", "1+1?", "2", "3");
//! let (pair, checks) = tok.tokenize(&Template::Orca.render(&ex).unwrap()).unwrap();
//! assert_eq!(*pair.chosen.last().unwrap(), tok.eos_id());
//! assert!(!checks.boundary_mismatch);
//! ```
use super::Rendered;
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

/// What tokenizing one pair revealed (counted by the audit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PairChecks {
    /// Tokenizing prompt and response apart differs from tokenizing their concatenation.
    pub boundary_mismatch: bool,
    /// The prompt starts with two BOS tokens.
    pub double_bos: bool,
    /// A response ends with two EOS tokens (the text already had one).
    pub double_eos: bool,
}

#[derive(Clone)]
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

    /// The BOS / EOS token texts (for chat templates), empty when unknown.
    pub fn token_text(&self, id: Option<u32>) -> String {
        id.and_then(|i| self.tokenizer.id_to_token(i)).unwrap_or_default()
    }

    /// Prompt with special tokens (unless its text carries BOS already), responses without them,
    /// EOS appended when the template asks; plus the boundary / BOS / EOS checks.
    pub fn tokenize(&self, r: &Rendered) -> Result<(TokenizedPair, PairChecks)> {
        let prompt = self.prompt_ids(r)?;
        let mut checks = PairChecks {
            double_bos: self.bos_id.is_some()
                && prompt.len() > 1
                && prompt[0] == prompt[1]
                && Some(prompt[0]) == self.bos_id,
            ..Default::default()
        };
        let mut response = |text: &str| -> Result<Vec<u32>> {
            let mut ids = self.encode(text, false)?;
            let joint = self.encode(&format!("{}{text}", r.prompt), !r.bos_in_text)?;
            checks.boundary_mismatch |= joint.len() != prompt.len() + ids.len()
                || joint[..prompt.len()] != prompt[..]
                || joint[prompt.len()..] != ids[..];
            if r.append_eos {
                ids.push(self.eos_id);
            }
            checks.double_eos |=
                ids.len() > 1 && ids[ids.len() - 1] == self.eos_id && ids[ids.len() - 2] == self.eos_id;
            Ok(ids)
        };
        let chosen = response(&r.chosen)?;
        // Empty only for supervised fine-tuning (pair formats refuse empty responses).
        let rejected = if r.rejected.is_empty() { Vec::new() } else { response(&r.rejected)? };
        Ok((TokenizedPair { prompt, chosen, rejected }, checks))
    }

    /// A rendered prompt's ids: with the special tokens (BOS) unless its text carries them.
    pub fn prompt_ids(&self, r: &Rendered) -> Result<Vec<u32>> {
        let prompt = self.encode(&r.prompt, !r.bos_in_text)?;
        if prompt.is_empty() {
            bail!("the prompt {:?} tokenizes to nothing", r.prompt);
        }
        Ok(prompt)
    }

    /// The text of generated ids, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| anyhow!("decoding {ids:?}: {e}"))
    }

    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, special).map_err(|e| anyhow!("tokenizing {text:?}: {e}"))?;
        Ok(enc.get_ids().to_vec())
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
