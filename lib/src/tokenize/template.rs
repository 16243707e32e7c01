//! Chat templates rendered the way Hugging Face `transformers` renders them.
//!
//! `transformers` compiles a model's `chat_template` with Jinja2 in a sandbox
//! with `trim_blocks` and `lstrip_blocks` on, the `loopcontrols` extension, its
//! own `tojson` filter (Python's `json.dumps`: no HTML escaping, `", "` and
//! `": "` separators, optional `indent`), and the globals `raise_exception` and
//! `strftime_now`. The context holds `messages`, `add_generation_prompt`,
//! `tools`, `documents` and the special tokens (`bos_token`, `eos_token`, ...).
//! This module reproduces that environment with minijinja and its Python
//! compatibility layer, so a template renders to the same string here as there.

use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind, State};
use serde::{Deserialize, Serialize};

/// One message of a conversation: who speaks (`system`, `user` or `assistant`)
/// and what they say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the message.
    pub content: String,
}

impl Message {
    /// A message from `role` saying `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into() }
    }
    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Why a chat template could not be compiled or rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template source is not valid Jinja.
    #[error("the chat template does not compile: {0}. Check the `chat_template` of the model's tokenizer_config.json (or GGUF `tokenizer.chat_template`)")]
    Syntax(String),
    /// The template called `raise_exception(..)`: the conversation breaks a rule of the model.
    #[error("the chat template rejected the conversation: {0}")]
    Raised(String),
    /// Rendering failed for another reason.
    #[error("rendering the chat template failed: {0}")]
    Render(String),
}

/// A compiled chat template plus the special-token strings its context carries.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    special: Vec<(String, String)>,
}

const NAME: &str = "chat_template";

impl Clone for ChatTemplate {
    fn clone(&self) -> Self {
        let mut t = ChatTemplate::new(&self.source).expect("a template that compiled once compiles again");
        t.special = self.special.clone();
        t
    }
}

impl ChatTemplate {
    /// Compiles `source` (a Jinja chat template as found in tokenizer_config.json).
    pub fn new(source: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| TemplateError::Syntax(e.to_string()))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, strip_generation_tags(source)).map_err(|e| TemplateError::Syntax(describe(&e)))?;
        Ok(ChatTemplate { env, source: source.to_string(), special: vec![] })
    }

    /// Sets a special-token variable the template can read (`bos_token`, `eos_token`, ...).
    pub fn with_special(mut self, name: &str, token: &str) -> Self {
        self.special.retain(|(n, _)| n != name);
        self.special.push((name.to_string(), token.to_string()));
        self
    }

    /// The template source as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends with the
    /// header that starts an assistant turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, TemplateError> {
        self.render_values(&Self::values(messages), add_generation_prompt)
    }

    /// Messages as template values, converted once so that several prefixes
    /// of one conversation render without copying the texts again.
    pub(crate) fn values(messages: &[Message]) -> Vec<Value> {
        messages.iter().map(|m| Value::from(Serde(m))).collect()
    }

    /// Renders messages already converted with [`ChatTemplate::values`].
    pub(crate) fn render_values(&self, messages: &[Value], add_generation_prompt: bool) -> Result<String, TemplateError> {
        self.render_value(Value::from(messages.to_vec()), add_generation_prompt, None)
    }

    /// Renders any JSON conversation (messages may carry more keys than `role`
    /// and `content`), optionally with `tools` (a list of JSON schemas).
    /// Keys whose value is `null` are dropped from messages, as transformers does.
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
    ) -> Result<String, TemplateError> {
        let messages = match messages {
            serde_json::Value::Array(items) => serde_json::Value::Array(
                items
                    .iter()
                    .map(|m| match m {
                        serde_json::Value::Object(o) => serde_json::Value::Object(
                            o.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect(),
                        ),
                        other => other.clone(),
                    })
                    .collect(),
            ),
            other => other.clone(),
        };
        self.render_value(Value::from(Serde(&messages)), add_generation_prompt, tools.map(|t| Value::from(Serde(t))))
    }

    fn render_value(&self, messages: Value, add_generation_prompt: bool, tools: Option<Value>) -> Result<String, TemplateError> {
        let tmpl = self.env.get_template(NAME).map_err(|e| TemplateError::Syntax(describe(&e)))?;
        let mut ctx: Vec<(String, Value)> = vec![
            ("messages".into(), messages),
            ("add_generation_prompt".into(), Value::from(add_generation_prompt)),
            ("tools".into(), tools.unwrap_or(Value::from(()))),
            ("documents".into(), Value::from(())),
        ];
        for (k, v) in &self.special {
            ctx.push((k.clone(), Value::from(v.as_str())));
        }
        let ctx: Value = ctx.into_iter().collect::<std::collections::BTreeMap<String, Value>>().into();
        tmpl.render(ctx).map_err(|e| {
            if e.kind() == ErrorKind::InvalidOperation && e.detail().is_some_and(|d| d.starts_with(RAISED)) {
                TemplateError::Raised(e.detail().unwrap_or_default().trim_start_matches(RAISED).to_string())
            } else {
                TemplateError::Render(describe(&e))
            }
        })
    }
}

const RAISED: &str = "raise_exception: ";

fn describe(e: &JinjaError) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// `{% generation %}` / `{% endgeneration %}` (transformers' assistant-mask
/// markers) render their body unchanged; minijinja has no such tag, so they are
/// rewritten to `{% if true %}` / `{% endif %}`, keeping whitespace control.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find("%}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let tag = &rest[start..start + end + 2];
        let inner = tag[2..tag.len() - 2].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        let replaced = match inner {
            "generation" => Some(tag.replacen("generation", "if true", 1)),
            "endgeneration" => Some(tag.replacen("endgeneration", "endif", 1)),
            _ => None,
        };
        out.push_str(replaced.as_deref().unwrap_or(tag));
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    out
}

fn raise_exception(message: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, format!("{RAISED}{message}")))
}

fn strftime_now(format: String) -> String {
    chrono::Local::now().format(&format).to_string()
}

/// Python renders `True`, `False` and `None`; minijinja would print `true`,
/// `false` and `none`.
fn python_formatter(out: &mut minijinja::Output, state: &mut State, value: &Value) -> Result<(), JinjaError> {
    match value.kind() {
        ValueKind::Bool => out.write_str(if value.is_true() { "True" } else { "False" }).map_err(JinjaError::from),
        ValueKind::None => out.write_str("None").map_err(JinjaError::from),
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, JinjaError> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => Some(" ".repeat(i64::try_from(v.clone()).unwrap_or(0).max(0) as usize)),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => return Err(JinjaError::new(ErrorKind::InvalidOperation, "tojson separators must be a pair")),
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let json = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let opts = PyJson {
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    opts.write(&json, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        let quoted = serde_json::to_string(s).unwrap_or_default();
        if !self.ensure_ascii {
            out.push_str(&quoted);
            return;
        }
        for c in quoted.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }

    fn write(&self, v: &serde_json::Value, level: usize, out: &mut String) {
        use serde_json::Value as J;
        match v {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Number(n) => {
                if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                    out.push_str(&py_float(f));
                } else {
                    out.push_str(&n.to_string());
                }
            }
            J::String(s) => self.string(s, out),
            J::Array(items) => {
                if items.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(item, level + 1, out);
                }
                self.newline(level, out);
                out.push(']');
            }
            J::Object(map) => {
                if map.is_empty() {
                    out.push_str("{}");
                    return;
                }
                let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, item)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.string(k, out);
                    out.push_str(&self.key_sep);
                    self.write(item, level + 1, out);
                }
                self.newline(level, out);
                out.push('}');
            }
        }
    }
}

/// Python's `repr(float)`: shortest round-trip digits, `1.0` not `1`, `1e+20` style exponents.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        let s = format!("{f:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    let s = format!("{f}");
    if s.contains('.') { s } else { format!("{s}.0") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_become_plain_blocks() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'assistant' %}{%- generation -%} {{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}",
        )
        .unwrap();
        let out = t.render(&[Message::user("q "), Message::assistant("a")], false).unwrap();
        assert_eq!(out, "q a");
    }

    #[test]
    fn python_literals_and_json() {
        let t = ChatTemplate::new("{{ add_generation_prompt }} {{ none }} {{ {'a': [1, 2.5, 'é<'], 'b': none} | tojson }} {{ [1] | tojson(indent=2) }}").unwrap();
        assert_eq!(t.render(&[], true).unwrap(), "True None {\"a\": [1, 2.5, \"é<\"], \"b\": null} [\n  1\n]");
    }

    #[test]
    fn raise_exception_is_a_typed_error() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}").unwrap();
        match t.render(&[], false) {
            Err(TemplateError::Raised(m)) => assert_eq!(m, "roles must alternate"),
            other => panic!("expected Raised, got {other:?}"),
        }
    }

    #[test]
    fn syntax_errors_do_not_panic() {
        assert!(matches!(ChatTemplate::new("{% for %}"), Err(TemplateError::Syntax(_))));
        assert!(matches!(ChatTemplate::new("{{ x"), Err(TemplateError::Syntax(_))));
    }

    #[test]
    fn python_float_repr() {
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(0.1), "0.1");
        assert_eq!(py_float(1e20), "1e+20");
        assert_eq!(py_float(1.5e-7), "1.5e-07");
    }
}
