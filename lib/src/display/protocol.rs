//! The display marker protocol shared by the library and `tunebook-kernel`.
//!
//! This file depends on nothing but `serde_json` so that the kernel can compile it
//! in directly (`#[path]`) without depending on the whole library.

use serde_json::Value;

/// Prefix of a marker-protocol line: the byte 0x1E, `TUNEBOOK_DISPLAY`, a space.
pub const MARKER_PREFIX: &str = "\u{1e}TUNEBOOK_DISPLAY ";

/// Environment variable that selects how the library prints live displays:
/// `jupyter` for marker lines, anything else for plain text.
pub const DISPLAY_ENV: &str = "TUNEBOOK_DISPLAY";

/// Formats one marker line (no trailing newline). `data` is a JSON object
/// mapping MIME types to their renderings.
pub fn marker_line(op: &str, id: Option<&str>, data: &Value) -> String {
    let mut msg = serde_json::Map::new();
    msg.insert("op".into(), Value::String(op.into()));
    if let Some(id) = id {
        msg.insert("id".into(), Value::String(id.into()));
    }
    msg.insert("data".into(), data.clone());
    format!("{MARKER_PREFIX}{}", Value::Object(msg))
}

/// A decoded marker line.
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    /// True for `update`, false for `display`.
    pub update: bool,
    /// The display id, if any.
    pub id: Option<String>,
    /// The MIME bundle, as a JSON object.
    pub data: Value,
}

/// Parses a marker line; `None` for ordinary output. A line that starts with the
/// prefix but does not parse is an `Err` with a message, so the kernel shows the
/// problem instead of swallowing output.
pub fn parse_marker(line: &str) -> Option<Result<Marker, String>> {
    let rest = line.strip_prefix(MARKER_PREFIX)?;
    let parsed: Result<Value, _> = serde_json::from_str(rest);
    Some(match parsed {
        Ok(Value::Object(map)) => {
            let update = match map.get("op").and_then(Value::as_str) {
                Some("display") => false,
                Some("update") => true,
                other => return Some(Err(format!("display marker: unknown op {other:?}"))),
            };
            let id = map.get("id").and_then(Value::as_str).map(str::to_string);
            if update && id.is_none() {
                return Some(Err("display marker: `update` needs an `id`".into()));
            }
            match map.get("data") {
                Some(data @ Value::Object(_)) => Ok(Marker { update, id, data: data.clone() }),
                _ => Err("display marker: `data` must be an object of MIME types".into()),
            }
        }
        Ok(_) => Err("display marker: payload must be a JSON object".into()),
        Err(e) => Err(format!("display marker: invalid JSON: {e}")),
    })
}
