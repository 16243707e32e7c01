//! Validation against the product's data rules, before any GPU time is spent.

use super::{DataError, Dataset, Task};
use crate::tokenize::Message;
use polars::prelude::*;
use serde_json::Value as J;

/// A data rule. Each [`Problem`] breaks exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// A column the task needs is absent.
    MissingColumn,
    /// A field has the wrong type (e.g. `messages` not a list, `content` not a string).
    WrongType,
    /// A conversation's `messages` is null.
    NullMessages,
    /// A conversation has fewer than 2 messages.
    TooFewMessages,
    /// A message has keys other than exactly `role` and `content`.
    MessageKeys,
    /// A role other than `system`, `user`, `assistant`.
    UnknownRole,
    /// A `system` message that is not the first message.
    SystemNotFirst,
    /// Two consecutive messages with the same role.
    ConsecutiveRoles,
    /// The last message is not from `assistant`.
    LastNotAssistant,
    /// Empty or null content (or prompt, response, text).
    EmptyContent,
    /// The model's chat template refused the conversation (`raise_exception`).
    TemplateRejected,
    /// An instruction row has both `response` and `completion`: which one is the
    /// target is ambiguous.
    AmbiguousTarget,
}

impl Rule {
    /// Every rule, in report order.
    pub const ALL: [Rule; 12] = [
        Rule::MissingColumn,
        Rule::WrongType,
        Rule::NullMessages,
        Rule::TooFewMessages,
        Rule::MessageKeys,
        Rule::UnknownRole,
        Rule::SystemNotFirst,
        Rule::ConsecutiveRoles,
        Rule::LastNotAssistant,
        Rule::EmptyContent,
        Rule::TemplateRejected,
        Rule::AmbiguousTarget,
    ];

    /// A short stable name, e.g. `too_few_messages`.
    pub fn code(self) -> &'static str {
        match self {
            Rule::MissingColumn => "missing_column",
            Rule::WrongType => "wrong_type",
            Rule::NullMessages => "null_messages",
            Rule::TooFewMessages => "too_few_messages",
            Rule::MessageKeys => "message_keys",
            Rule::UnknownRole => "unknown_role",
            Rule::SystemNotFirst => "system_not_first",
            Rule::ConsecutiveRoles => "consecutive_roles",
            Rule::LastNotAssistant => "last_not_assistant",
            Rule::EmptyContent => "empty_content",
            Rule::TemplateRejected => "template_rejected",
            Rule::AmbiguousTarget => "ambiguous_target",
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// One problem: where (row, field), which rule, what is wrong and how to fix it.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// 0-based row of the dataset; `None` for whole-dataset problems (a missing column).
    pub row: Option<usize>,
    /// The field, e.g. `messages[2].role`.
    pub field: String,
    /// The rule broken.
    pub rule: Rule,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub fix: String,
    /// Where an editor shows the row, for line-based files: `data.jsonl line 7`
    /// (1-based, counting blank lines and the CSV header).
    pub line: Option<String>,
}

impl Problem {
    pub(crate) fn new(row: Option<usize>, field: impl Into<String>, rule: Rule, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Problem { row, field: field.into(), rule, message: message.into(), fix: fix.into(), line: None }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.row, &self.line) {
            (Some(r), Some(l)) => write!(f, "row {r} ({l}), {}: {} [{}]. Fix: {}", self.field, self.message, self.rule, self.fix),
            (Some(r), None) => write!(f, "row {r}, {}: {} [{}]. Fix: {}", self.field, self.message, self.rule, self.fix),
            (None, _) => write!(f, "{}: {} [{}]. Fix: {}", self.field, self.message, self.rule, self.fix),
        }
    }
}

/// The outcome of validation: every problem found, with counts per rule.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationReport {
    /// Where the data came from.
    pub source: String,
    /// The task checked against (`None` when it could not be told).
    pub task: Option<Task>,
    /// Rows checked.
    pub rows: usize,
    /// Rows with no problem.
    pub valid_rows: usize,
    /// Every problem, in row order.
    pub problems: Vec<Problem>,
}

impl ValidationReport {
    /// True when there is no problem at all.
    pub fn is_valid(&self) -> bool {
        self.problems.is_empty()
    }

    /// Problems per rule, for the rules that have any, in [`Rule::ALL`] order.
    pub fn counts(&self) -> Vec<(Rule, usize)> {
        Rule::ALL
            .iter()
            .map(|r| (*r, self.problems.iter().filter(|p| p.rule == *r).count()))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Number of problems breaking `rule`.
    pub fn count(&self, rule: Rule) -> usize {
        self.problems.iter().filter(|p| p.rule == rule).count()
    }

    /// Rows with at least one problem.
    pub fn invalid_rows(&self) -> usize {
        self.rows - self.valid_rows
    }

    /// One paragraph: verdict, counts per rule and the first problems.
    pub fn summary(&self) -> String {
        let task = self.task.map(|t| t.name()).unwrap_or("unknown task");
        if self.is_valid() {
            return format!("{}: {} rows of {task} data, all valid", self.source, self.rows);
        }
        let counts: Vec<String> = self.counts().iter().map(|(r, n)| format!("{r}: {n}")).collect();
        let mut s = format!(
            "{}: {} of {} rows of {task} data are invalid ({} problems: {})",
            self.source,
            self.invalid_rows(),
            self.rows,
            self.problems.len(),
            counts.join(", ")
        );
        for p in self.problems.iter().take(5) {
            s.push_str("\n  ");
            s.push_str(&p.to_string());
        }
        if self.problems.len() > 5 {
            s.push_str(&format!("\n  ... and {} more (see ValidationReport::problems)", self.problems.len() - 5));
        }
        s
    }
}

/// One training example, as validated.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Example {
    Chat(Vec<Message>),
    Instruction { prompt: String, response: String },
    Text(String),
}

/// A polars value as JSON (lists and structs recursively).
pub(crate) fn any_to_json(v: AnyValue<'_>) -> J {
    match v {
        AnyValue::Null => J::Null,
        AnyValue::Boolean(b) => J::Bool(b),
        AnyValue::String(s) => J::String(s.to_string()),
        AnyValue::StringOwned(s) => J::String(s.to_string()),
        AnyValue::Int8(x) => J::from(x),
        AnyValue::Int16(x) => J::from(x),
        AnyValue::Int32(x) => J::from(x),
        AnyValue::Int64(x) => J::from(x),
        AnyValue::UInt8(x) => J::from(x),
        AnyValue::UInt16(x) => J::from(x),
        AnyValue::UInt32(x) => J::from(x),
        AnyValue::UInt64(x) => J::from(x),
        AnyValue::Float32(x) => serde_json::Number::from_f64(f64::from(x)).map(J::Number).unwrap_or(J::Null),
        AnyValue::Float64(x) => serde_json::Number::from_f64(x).map(J::Number).unwrap_or(J::Null),
        AnyValue::List(s) => J::Array(s.iter().map(any_to_json).collect()),
        ref sv @ (AnyValue::Struct(..) | AnyValue::StructOwned(..)) => {
            let names: Vec<String> = match sv {
                AnyValue::Struct(_, _, fields) => fields.iter().map(|f| f.name().to_string()).collect(),
                AnyValue::StructOwned(b) => b.1.iter().map(|f| f.name().to_string()).collect(),
                _ => vec![],
            };
            let mut map = serde_json::Map::new();
            for (name, value) in names.into_iter().zip(sv._iter_struct_av()) {
                map.insert(name, any_to_json(value));
            }
            J::Object(map)
        }
        other => J::String(other.to_string()),
    }
}

fn column_json(df: &DataFrame, name: &str) -> Option<Vec<J>> {
    let s = df.column(name).ok()?.as_materialized_series().rechunk();
    if let Some(rows) = list_of_structs_json(&s) {
        return Some(rows);
    }
    Some(s.iter().map(any_to_json).collect())
}

/// A `List(Struct)` column (chat messages as read from JSONL, Parquet or
/// Delta) as JSON, reading the flat struct fields once instead of building a
/// nested value per row. `None` for any other shape (the caller then takes the
/// general path).
fn list_of_structs_json(s: &Series) -> Option<Vec<J>> {
    let ca = s.list().ok()?;
    if !matches!(ca.inner_dtype(), DataType::Struct(_)) || ca.chunks().len() != 1 {
        return None;
    }
    let arr = ca.downcast_as_array();
    let inner = ca.get_inner();
    if inner.null_count() > 0 {
        return None;
    }
    let fields = inner.struct_().ok()?.fields_as_series();
    let mut columns: Vec<(String, Vec<J>)> =
        fields.iter().map(|f| (f.name().to_string(), f.rechunk().iter().map(any_to_json).collect())).collect();
    let offsets = arr.offsets().as_slice();
    let validity = arr.validity();
    let mut rows = Vec::with_capacity(arr.len());
    for r in 0..arr.len() {
        if validity.is_some_and(|v| !v.get_bit(r)) {
            rows.push(J::Null);
            continue;
        }
        let (a, b) = (usize::try_from(offsets[r]).ok()?, usize::try_from(offsets[r + 1]).ok()?);
        let mut items = Vec::with_capacity(b.saturating_sub(a));
        for k in a..b {
            let mut obj = serde_json::Map::with_capacity(columns.len());
            for (name, values) in columns.iter_mut() {
                obj.insert(name.clone(), std::mem::take(values.get_mut(k)?));
            }
            items.push(J::Object(obj));
        }
        rows.push(J::Array(items));
    }
    Some(rows)
}

fn kind(v: &J) -> &'static str {
    match v {
        J::Null => "null",
        J::Bool(_) => "a boolean",
        J::Number(_) => "a number",
        J::String(_) => "a string",
        J::Array(_) => "a list",
        J::Object(_) => "an object",
    }
}

fn missing_column(name: &str, task: Task, df: &DataFrame, mapping_hint: &str) -> Problem {
    let have: Vec<&str> = df.get_column_names().iter().map(|n| n.as_str()).collect();
    Problem::new(
        None,
        name,
        Rule::MissingColumn,
        format!("{task} data needs a `{name}` column; the columns are [{}]", have.join(", ")),
        format!("add `{name}`, or map your column with .columns(Columns::default().{mapping_hint}(\"your_column\"))"),
    )
}

/// A text field (prompt, response, text): problems, or the string.
fn text_field(row: usize, field: &str, v: &J, problems: &mut Vec<Problem>) -> Option<String> {
    match v {
        J::String(s) if !s.trim().is_empty() => Some(s.clone()),
        J::String(_) => {
            problems.push(Problem::new(Some(row), field, Rule::EmptyContent, format!("`{field}` is empty"), "write the text, or drop the row"));
            None
        }
        J::Null => {
            problems.push(Problem::new(Some(row), field, Rule::EmptyContent, format!("`{field}` is null"), "write the text, or drop the row"));
            None
        }
        other => {
            problems.push(Problem::new(
                Some(row),
                field,
                Rule::WrongType,
                format!("`{field}` must be a string, found {}", kind(other)),
                format!("store `{field}` as text"),
            ));
            None
        }
    }
}

const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// Checks one conversation; returns its messages when it is valid.
pub(crate) fn check_chat(row: usize, col: &str, value: J, problems: &mut Vec<Problem>) -> Option<Vec<Message>> {
    let before = problems.len();
    let value = match value {
        J::String(s) => match serde_json::from_str::<J>(&s) {
            Ok(v) => v,
            Err(e) => {
                problems.push(Problem::new(
                    Some(row),
                    col,
                    Rule::WrongType,
                    format!("`{col}` is a string that is not a JSON list of messages ({e})"),
                    "store a list of {\"role\", \"content\"} objects (or its JSON text)",
                ));
                return None;
            }
        },
        v => v,
    };
    let mut items = match value {
        J::Array(items) => items,
        J::Null => {
            problems.push(Problem::new(Some(row), col, Rule::NullMessages, format!("`{col}` is null"), "give the conversation, or drop the row"));
            return None;
        }
        other => {
            problems.push(Problem::new(
                Some(row),
                col,
                Rule::WrongType,
                format!("`{col}` must be a list of messages, found {}", kind(&other)),
                "store a list of {\"role\", \"content\"} objects",
            ));
            return None;
        }
    };
    if items.len() < 2 {
        problems.push(Problem::new(
            Some(row),
            col,
            Rule::TooFewMessages,
            format!("a conversation needs at least 2 messages, this one has {}", items.len()),
            "add the user's message and the assistant's answer",
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    let mut prev_role: Option<String> = None;
    for (i, m) in items.iter_mut().enumerate() {
        let field = format!("{col}[{i}]");
        let J::Object(obj) = m else {
            problems.push(Problem::new(
                Some(row),
                &field,
                Rule::WrongType,
                format!("a message must be an object, found {}", kind(m)),
                "write each message as {\"role\": .., \"content\": ..}",
            ));
            prev_role = None;
            continue;
        };
        // Columns read from JSONL/Parquet carry every key any row has, null elsewhere:
        // a key whose value is null is treated as absent.
        for (k, v) in obj.iter() {
            if k != "role" && k != "content" && !v.is_null() {
                problems.push(Problem::new(
                    Some(row),
                    format!("{field}.{k}"),
                    Rule::MessageKeys,
                    format!("unexpected key `{k}`: a message has exactly the keys `role` and `content`"),
                    format!("remove `{k}` (fold its information into `content` if it matters)"),
                ));
            }
        }
        let role = match obj.get("role") {
            None | Some(J::Null) => {
                problems.push(Problem::new(
                    Some(row),
                    format!("{field}.role"),
                    Rule::MessageKeys,
                    "the key `role` is missing or null",
                    "add \"role\": \"user\" | \"assistant\" | \"system\"",
                ));
                None
            }
            Some(J::String(r)) => {
                if !ROLES.contains(&r.as_str()) {
                    problems.push(Problem::new(
                        Some(row),
                        format!("{field}.role"),
                        Rule::UnknownRole,
                        format!("role `{r}` is not one of system, user, assistant"),
                        "rename the role (e.g. human → user, gpt/bot → assistant)",
                    ));
                } else if r == "system" && i > 0 {
                    problems.push(Problem::new(
                        Some(row),
                        format!("{field}.role"),
                        Rule::SystemNotFirst,
                        format!("a system message may only come first, this one is message {i}"),
                        "move it to the start, or fold it into the next user message",
                    ));
                }
                Some(r.clone())
            }
            Some(other) => {
                problems.push(Problem::new(
                    Some(row),
                    format!("{field}.role"),
                    Rule::WrongType,
                    format!("`role` must be a string, found {}", kind(other)),
                    "write the role as \"user\", \"assistant\" or \"system\"",
                ));
                None
            }
        };
        if let (Some(p), Some(r)) = (&prev_role, &role)
            && p == r
        {
            problems.push(Problem::new(
                Some(row),
                format!("{field}.role"),
                Rule::ConsecutiveRoles,
                format!("messages {} and {i} both have role `{r}`", i - 1),
                "merge the two messages, or add the missing turn between them",
            ));
        }
        let content = match obj.get_mut("content") {
            None | Some(J::Null) => {
                problems.push(Problem::new(
                    Some(row),
                    format!("{field}.content"),
                    Rule::EmptyContent,
                    "`content` is missing or null",
                    "write the message text, or drop the message",
                ));
                None
            }
            Some(J::String(c)) if c.trim().is_empty() => {
                problems.push(Problem::new(
                    Some(row),
                    format!("{field}.content"),
                    Rule::EmptyContent,
                    "`content` is empty",
                    "write the message text, or drop the message",
                ));
                None
            }
            Some(J::String(c)) => Some(std::mem::take(c)),
            Some(other) => {
                problems.push(Problem::new(
                    Some(row),
                    format!("{field}.content"),
                    Rule::WrongType,
                    format!("`content` must be a string, found {}", kind(other)),
                    "store the message text as a string",
                ));
                None
            }
        };
        if let (Some(r), Some(c)) = (&role, content) {
            out.push(Message::new(r.clone(), c));
        }
        prev_role = role;
    }
    if let Some(last) = items.last() {
        let last_role = last.get("role").and_then(|r| r.as_str());
        if last_role != Some("assistant") {
            problems.push(Problem::new(
                Some(row),
                format!("{col}[{}].role", items.len() - 1),
                Rule::LastNotAssistant,
                format!("the last message is from `{}`, not `assistant`", last_role.unwrap_or("?")),
                "end the conversation with the assistant's answer (drop trailing turns)",
            ));
        }
    }
    (problems.len() == before).then_some(out)
}

impl Dataset {
    /// Checks every row against the product's rules for its task and returns
    /// the report (rows × problems). Errors only when the data cannot be read.
    pub fn validate(&self) -> Result<ValidationReport, DataError> {
        Ok(self.examples()?.1)
    }

    /// Like [`Dataset::validate`], but any problem is an error
    /// ([`DataError::Invalid`], holding the full report).
    pub fn validate_strict(&self) -> Result<ValidationReport, DataError> {
        let report = self.validate()?;
        if report.is_valid() { Ok(report) } else { Err(DataError::Invalid(Box::new(report))) }
    }

    /// The examples (one per row, `None` where the row is invalid) and the report.
    pub(crate) fn examples(&self) -> Result<(Vec<Option<Example>>, ValidationReport), DataError> {
        let rows = self.df.height();
        let mut problems = vec![];
        let mut report = ValidationReport { source: self.source.clone(), task: None, rows, valid_rows: 0, problems: vec![] };
        let task = match self.detect_task() {
            Ok(t) => t,
            Err(e) => {
                report.problems.push(Problem::new(
                    None,
                    "columns",
                    Rule::MissingColumn,
                    e.to_string(),
                    "add the columns of one task, or set .task(..) with a column mapping",
                ));
                return Ok((vec![None; rows], report));
            }
        };
        report.task = Some(task);
        let c = &self.columns;
        let mut examples: Vec<Option<Example>> = Vec::with_capacity(rows);
        match task {
            Task::Chat => {
                let Some(values) = column_json(&self.df, &c.messages) else {
                    report.problems.push(missing_column(&c.messages, task, &self.df, "messages"));
                    return Ok((vec![None; rows], report));
                };
                for (row, v) in values.into_iter().enumerate() {
                    examples.push(check_chat(row, &c.messages, v, &mut problems).map(Example::Chat));
                }
            }
            Task::Instruction => {
                let response_col = c.response.clone().unwrap_or_else(|| {
                    if self.df.column("response").is_ok() || self.df.column("completion").is_err() {
                        "response".into()
                    } else {
                        "completion".into()
                    }
                });
                let prompts = column_json(&self.df, &c.prompt);
                let responses = column_json(&self.df, &response_col);
                if prompts.is_none() {
                    report.problems.push(missing_column(&c.prompt, task, &self.df, "prompt"));
                }
                if responses.is_none() {
                    report.problems.push(missing_column(&response_col, task, &self.df, "response"));
                }
                let (Some(prompts), Some(responses)) = (prompts, responses) else {
                    return Ok((vec![None; rows], report));
                };
                // Both `response` and `completion`, and no mapping saying which is the target.
                let other = (c.response.is_none() && response_col == "response")
                    .then(|| column_json(&self.df, "completion"))
                    .flatten();
                for (row, (p, r)) in prompts.iter().zip(&responses).enumerate() {
                    let both = other.as_ref().and_then(|o| o.get(row)).is_some_and(|o| !o.is_null()) && !r.is_null();
                    if both {
                        problems.push(Problem::new(
                            Some(row),
                            "response/completion",
                            Rule::AmbiguousTarget,
                            "the row has both `response` and `completion`, so the target is ambiguous",
                            "keep one of the two fields, or map the target with .columns(Columns::default().response(\"..\")) / --response",
                        ));
                    }
                    let p = text_field(row, &c.prompt, p, &mut problems);
                    let r = text_field(row, &response_col, r, &mut problems);
                    examples.push(match (p, r) {
                        (Some(prompt), Some(response)) if !both => Some(Example::Instruction { prompt, response }),
                        _ => None,
                    });
                }
            }
            Task::Text => {
                let Some(values) = column_json(&self.df, &c.text) else {
                    report.problems.push(missing_column(&c.text, task, &self.df, "text"));
                    return Ok((vec![None; rows], report));
                };
                for (row, v) in values.iter().enumerate() {
                    examples.push(text_field(row, &c.text, v, &mut problems).map(Example::Text));
                }
            }
        }
        if !self.load_problems.is_empty() {
            for p in &self.load_problems {
                if let Some(e) = p.row.and_then(|r| examples.get_mut(r)) {
                    *e = None;
                }
            }
            problems.extend(self.load_problems.iter().cloned());
            problems.sort_by_key(|p| p.row);
        }
        report.valid_rows = examples.iter().filter(|e| e.is_some()).count();
        for p in &mut problems {
            p.line = p.row.and_then(|r| self.line_of(r));
        }
        report.problems = problems;
        Ok((examples, report))
    }
}
