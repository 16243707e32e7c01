//! LLM-as-judge against any OpenAI-compatible endpoint (a `tunebook serve` endpoint, vLLM,
//! a hosted API), following MLflow's judge conventions: the fields go in XML-like tags, the
//! judge answers with JSON `{"rationale": "...", "result": "yes" | "no"}`, temperature 0.

use super::EvalRow;
use super::generate::post_with_retries;
use super::result::Answer;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::time::Duration;

/// What a judge checks.
#[derive(Clone, Debug, PartialEq)]
pub enum JudgeKind {
    /// Whether the answer states what the reference states (MLflow's `correctness`).
    Correctness,
    /// Whether the answer follows every guideline (MLflow's `guidelines`).
    Guidelines(Vec<String>),
}

/// An LLM judge: an OpenAI-compatible endpoint asked one question per row.
#[derive(Clone, Debug)]
pub struct Judge {
    /// The assessment's name (`correctness`, `guidelines`, or yours).
    pub name: String,
    pub kind: JudgeKind,
    /// The endpoint's base URL (`http://host:port/v1`).
    pub url: String,
    /// The served model to ask (default: the endpoint's only model).
    pub model: Option<String>,
    /// Default: the evaluation's API key.
    pub api_key: Option<String>,
    /// Requests in flight at once (default 4).
    pub concurrency: usize,
    /// Tokens the judge may write (default 512).
    pub max_tokens: usize,
    /// Tries per request on 429, 5xx and connection errors, with backoff (default 6).
    pub tries: u32,
}

impl Judge {
    fn new(name: &str, kind: JudgeKind, url: impl Into<String>) -> Self {
        Self { name: name.into(), kind, url: url.into(), model: None, api_key: None, concurrency: 4, max_tokens: 512, tries: super::generate::TRIES }
    }

    /// MLflow's `correctness` judge: is the reference's claim supported by the answer?
    pub fn correctness(url: impl Into<String>) -> Self {
        Self::new("correctness", JudgeKind::Correctness, url)
    }

    /// MLflow's `guidelines` judge: does the answer follow every guideline?
    pub fn guidelines<S: Into<String>>(url: impl Into<String>, guidelines: impl IntoIterator<Item = S>) -> Self {
        Self::new("guidelines", JudgeKind::Guidelines(guidelines.into_iter().map(Into::into).collect()), url)
    }

    /// Renames the assessment (to run several guideline judges side by side).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The served model to ask.
    pub fn model(mut self, id: impl Into<String>) -> Self {
        self.model = Some(id.into());
        self
    }

    /// The endpoint's API key.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Requests in flight at once.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The prompt for one row, in MLflow's layout.
    pub fn prompt(&self, row: &EvalRow, answer: &str) -> String {
        let question = row.question();
        match &self.kind {
            JudgeKind::Correctness => format!(
                "Consider the question, the claim and the document below. Decide whether the document, read in the context \
                 of the question, supports the claim. Judge only that support: not the claim's own correctness or completeness. \
                 Make no assumptions or approximations and use no outside knowledge.\n\n\
                 <question>{question}</question>\n<claim>{claim}</claim>\n<document>{question} - {answer}</document>\n\n\
                 The result is \"yes\" when the document supports every statement of the claim, else \"no\".\n\n\
                 Answer with this JSON only, without markdown or other lines:\n\
                 {{\n  \"rationale\": \"Why, naming any part of the claim the document does not support. Start with `Let's think step by step`\",\n  \"result\": \"yes|no\"\n}}",
                claim = row.references.join("\n- ")
            ),
            JudgeKind::Guidelines(g) => format!(
                "Assess whether the inputs below comply with every guideline. Judge compliance with the guidelines only, \
                 not the inputs' correctness, relevance or usefulness.\n\n<guidelines>\n{}\n</guidelines>\n\
                 <request>{question}</request>\n<response>{answer}</response>\n\n\
                 The result is \"no\" when any guideline is not met, and \"yes\" when all are met or none applies.\n\n\
                 Answer with this JSON only, without markdown or other lines:\n\
                 {{\n  \"rationale\": \"Why, naming any guideline that is not met. Start with `Let's think step by step. `\",\n  \"result\": \"yes|no\"\n}}",
                g.iter().map(|x| format!("<guideline>{x}</guideline>")).collect::<Vec<_>>().join("\n")
            ),
        }
    }
}

/// A judge's verdict on one answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Judgment {
    /// `Some(true)` for "yes", `None` when the judge gave no usable answer.
    pub value: Option<bool>,
    /// The judge's rationale (or why its answer could not be read).
    pub rationale: String,
}

/// Reads the judge's JSON answer: a `result` of yes/no (case and surrounding text
/// tolerated, as a ```json fence) and a `rationale`.
pub fn parse_verdict(text: &str) -> Judgment {
    let bad = |why: &str| Judgment { value: None, rationale: format!("{why}: {}", text.chars().take(500).collect::<String>()) };
    let (Some(start), Some(end)) = (text.find('{'), text.rfind('}')) else { return bad("the judge's answer holds no JSON object") };
    if end < start {
        return bad("the judge's answer holds no JSON object");
    }
    let Ok(v) = serde_json::from_str::<Value>(&text[start..=end]) else { return bad("the judge's answer is not valid JSON") };
    let value = match &v["result"] {
        Value::String(s) => match s.trim().to_lowercase().as_str() {
            "yes" | "true" | "pass" => Some(true),
            "no" | "false" | "fail" => Some(false),
            _ => None,
        },
        Value::Bool(b) => Some(*b),
        _ => None,
    };
    match value {
        Some(_) => Judgment { value, rationale: v["rationale"].as_str().unwrap_or_default().to_string() },
        None => bad("the judge's `result` is not \"yes\" or \"no\""),
    }
}

/// Every row's verdict from `judge` on `answers`.
pub(crate) fn judge_all(judge: &Judge, rows: &[EvalRow], answers: &[Answer], default_key: Option<&str>) -> Result<(String, Vec<Judgment>)> {
    let base = super::generate::api_base(&judge.url);
    let key = judge.api_key.as_deref().or(default_key);
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(600)).build()?;
    let model = match &judge.model {
        Some(m) => m.clone(),
        None => match super::generate::served_models(&client, &base, key).with_context(|| format!("judge `{}`", judge.name))?.as_slice() {
            [one] => one.clone(),
            ids => bail!("judge `{}`: {base} serves {ids:?}: choose one with Judge::model(..)", judge.name),
        },
    };
    let verdicts = super::generate::parallel_map(rows.len(), judge.concurrency, |i| {
        let body = json!({
            "model": model,
            "messages": [{"role": "user", "content": judge.prompt(&rows[i], &answers[i].text)}],
            "temperature": 0.0,
            "max_tokens": judge.max_tokens,
        });
        post_with_retries(&client, &format!("{base}/chat/completions"), key, &body, judge.tries)
            .and_then(|(v, _)| v["choices"][0]["message"]["content"].as_str().map(parse_verdict).with_context(|| format!("the judge's reply has no message: {v}")))
            .with_context(|| format!("judge `{}`, row {i}", judge.name))
    })?;
    Ok((model, verdicts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_are_read_from_json_in_fences_or_text_and_anything_else_is_no_verdict() {
        let v = parse_verdict("{\"rationale\": \"Let's think step by step. It matches.\", \"result\": \"yes\"}");
        assert_eq!(v, Judgment { value: Some(true), rationale: "Let's think step by step. It matches.".into() });
        let v = parse_verdict("```json\n{\n  \"rationale\": \"wrong year\",\n  \"result\": \"No\"\n}\n```");
        assert_eq!(v.value, Some(false));
        assert_eq!(v.rationale, "wrong year");
        for bad in ["yes", "{\"result\": \"maybe\"}", "{not json}", ""] {
            let v = parse_verdict(bad);
            assert_eq!(v.value, None, "{bad}");
            assert!(v.rationale.starts_with("the judge's"), "{}", v.rationale);
        }
    }

    #[test]
    fn prompts_put_the_fields_in_mlflows_tags_and_ask_for_its_json() {
        let row = EvalRow { prompt: vec![crate::tokenize::Message::user("Capital of France?")], references: vec!["Paris".into()], choices: vec![], gold: vec![] };
        let p = Judge::correctness("http://x/v1").prompt(&row, "It is Paris.");
        assert!(p.contains("<question>Capital of France?</question>") && p.contains("<claim>Paris</claim>"), "{p}");
        assert!(p.contains("<document>Capital of France? - It is Paris.</document>") && p.contains("\"result\": \"yes|no\""), "{p}");
        let p = Judge::guidelines("http://x/v1", ["Answer in English", "Be brief"]).prompt(&row, "Paris");
        assert!(p.contains("<guideline>Answer in English</guideline>\n<guideline>Be brief</guideline>") && p.contains("<response>Paris</response>"), "{p}");
    }
}
