//! Chat templates (Jinja, from `tokenizer_config.json` or `chat_template.jinja`) rendered with
//! minijinja the way transformers' `apply_chat_template` does: `trim_blocks` and `lstrip_blocks`
//! on, `bos_token`/`eos_token`/… variables, `raise_exception(msg)`, `strftime_now(fmt)`, and
//! Python string methods (`.strip()`, `.startswith()`, …).
//!
//! ```
//! use dpo::data::{Message, chat::ChatTemplate};
//! let t = ChatTemplate::new("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}", "<s>", "</s>").unwrap();
//! let text = t.render(&[Message::new("user", "Hi")], true).unwrap();
//! assert_eq!(text, "<s><|user|>\nHi</s>\n<|assistant|>\n");
//! ```
use super::Message;
use anyhow::{Context, Result, anyhow};
use minijinja::{Environment, Error, ErrorKind, context};
use std::path::Path;

pub struct ChatTemplate {
    env: Environment<'static>,
    pub bos_token: String,
    pub eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build()?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| chrono::Local::now().format(&fmt).to_string());
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| anyhow!("the chat template does not parse: {e}"))?;
        Ok(Self { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// From a Jinja file (`--template-file`).
    pub fn from_file(path: &Path, bos_token: &str, eos_token: &str) -> Result<Self> {
        let source =
            std::fs::read_to_string(path).with_context(|| format!("reading template file {}", path.display()))?;
        Self::new(&source, bos_token, eos_token).with_context(|| format!("template file {}", path.display()))
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self.env.get_template("chat")?;
        t.render(context! {
            messages => to_value(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| anyhow!("the chat template failed to render: {e}"))
    }
}

/// Messages as Jinja values: a list of `{role, content}` maps.
fn to_value(messages: &[Message]) -> minijinja::Value {
    let list: Vec<minijinja::Value> = messages
        .iter()
        .map(|m| {
            let map: std::collections::BTreeMap<String, String> =
                [("role".to_string(), m.role.clone()), ("content".to_string(), m.content.clone())].into();
            minijinja::Value::from(map)
        })
        .collect();
    minijinja::Value::from(list)
}

/// The model folder's chat template: `chat_template.jinja`, else `chat_template` in
/// tokenizer_config.json (a string, or a list of `{name, template}` whose `default` is used).
pub fn find_template(model_dir: &Path) -> Option<String> {
    if let Ok(s) = std::fs::read_to_string(model_dir.join("chat_template.jinja")) {
        return Some(s);
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir.join("tokenizer_config.json")).ok()?).ok()?;
    match cfg.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(String::from)),
        _ => None,
    }
}
