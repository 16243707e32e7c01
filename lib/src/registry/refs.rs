//! Model references (`name@alias`, `name/3`, `models:/...`, LoggedModel ids) and
//! `register_to` targets (`catalog.schema[.model][@alias,...]`).

use anyhow::{Context, Result, bail};

/// What a model reference names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// A version number.
    Version(u64),
    /// An alias (`@champion`).
    Alias(String),
    /// The newest version.
    Latest,
}

/// A parsed model reference: `name/3`, `name@alias`, `name` (latest), with or
/// without `models:/`; or a LoggedModel `models:/m-…`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelRef {
    Registered { name: String, selector: Selector },
    Logged { model_id: String },
}

/// Parses a model reference (see [`ModelRef`]).
pub fn parse_model_ref(spec: &str) -> Result<ModelRef> {
    let s = spec.trim();
    let s = s.strip_prefix("models:/").unwrap_or(s).trim_start_matches('/');
    if s.is_empty() {
        bail!("empty model reference: write it like main.support.bot@champion, main.support.bot/3 or models:/main.support.bot/3");
    }
    if s.starts_with("m-") && !s.contains(['/', '@']) && s.len() > 10 && s[2..].chars().all(|c| c.is_ascii_hexdigit()) {
        return Ok(ModelRef::Logged { model_id: s.to_string() });
    }
    if let Some((name, v)) = s.rsplit_once('/') {
        if name.is_empty() || name.contains('/') {
            bail!("{spec:?}: a registered model name cannot contain '/'");
        }
        let selector = if v == "latest" {
            Selector::Latest
        } else {
            Selector::Version(v.parse().with_context(|| format!("{spec:?}: {v:?} is not a version number (write name/3, name@alias or name/latest)"))?)
        };
        return Ok(ModelRef::Registered { name: name.to_string(), selector });
    }
    if let Some((name, alias)) = s.rsplit_once('@') {
        if name.is_empty() || alias.is_empty() {
            bail!("{spec:?}: write name@alias");
        }
        return Ok(ModelRef::Registered { name: name.to_string(), selector: Selector::Alias(alias.to_string()) });
    }
    Ok(ModelRef::Registered { name: s.to_string(), selector: Selector::Latest })
}

/// Where `register_to` puts a model: the registered model's full name and the
/// aliases to point at the new version. `catalog.schema` names the model after the
/// run (`catalog.schema.<run name>`); `catalog.schema.model` and a plain `model`
/// are used as they are; `@a,b` after the name sets aliases.
pub fn register_target(register_to: &str, run_name: &str) -> Result<(String, Vec<String>)> {
    let (name, aliases) = match register_to.split_once('@') {
        Some((n, a)) => (n.trim(), a.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect()),
        None => (register_to.trim(), Vec::new()),
    };
    if name.is_empty() {
        bail!("register_to is empty: write catalog.schema or catalog.schema.model");
    }
    let parts: Vec<&str> = name.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("register_to {register_to:?}: empty part in the dotted name");
    }
    let full = match parts.len() {
        1 | 3 => name.to_string(),
        2 => {
            let model: String = run_name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
            format!("{name}.{}", if model.is_empty() { "model".into() } else { model })
        }
        _ => bail!("register_to {register_to:?}: use catalog.schema (the model is named after the run) or catalog.schema.model"),
    };
    if full.contains(['/', ':']) {
        bail!("register_to {register_to:?}: a registered model name cannot contain '/' or ':'");
    }
    for a in &aliases {
        check_alias(a)?;
    }
    Ok((full, aliases))
}

pub(crate) fn check_alias(a: &str) -> Result<()> {
    let reserved = a.eq_ignore_ascii_case("latest") || (a.len() > 1 && (a.starts_with('v') || a.starts_with('V')) && a[1..].chars().all(|c| c.is_ascii_digit()));
    if reserved {
        bail!("alias {a:?} is reserved by MLflow (latest and v<number> name versions): choose another, e.g. champion");
    }
    if a.is_empty() || a.len() > 255 || !a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        bail!("alias {a:?}: use letters, digits, '_' and '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_references_parse() {
        let r = |n: &str, s: Selector| ModelRef::Registered { name: n.into(), selector: s };
        assert_eq!(parse_model_ref("main.support.bot@champion").unwrap(), r("main.support.bot", Selector::Alias("champion".into())));
        assert_eq!(parse_model_ref("models:/main.support.bot@champion").unwrap(), r("main.support.bot", Selector::Alias("champion".into())));
        assert_eq!(parse_model_ref("name/3").unwrap(), r("name", Selector::Version(3)));
        assert_eq!(parse_model_ref("models:/name/3").unwrap(), r("name", Selector::Version(3)));
        assert_eq!(parse_model_ref("models:/name/latest").unwrap(), r("name", Selector::Latest));
        assert_eq!(parse_model_ref("a.b.c").unwrap(), r("a.b.c", Selector::Latest));
        assert_eq!(
            parse_model_ref("models:/m-0123456789abcdef0123456789abcdef").unwrap(),
            ModelRef::Logged { model_id: "m-0123456789abcdef0123456789abcdef".into() }
        );
        assert!(parse_model_ref("name/three").unwrap_err().to_string().contains("not a version number"));
        assert!(parse_model_ref("").is_err());
    }

    #[test]
    fn register_targets() {
        assert_eq!(register_target("main.support", "bot run.1").unwrap(), ("main.support.bot_run_1".into(), vec![]));
        assert_eq!(
            register_target("main.support.bot@champion, staging", "x").unwrap(),
            ("main.support.bot".into(), vec!["champion".into(), "staging".into()])
        );
        assert_eq!(register_target("plain", "x").unwrap().0, "plain");
        assert!(register_target("a.b.c.d", "x").is_err());
        assert!(register_target("a..b", "x").is_err());
        assert!(register_target("a.b.c@latest", "x").unwrap_err().to_string().contains("reserved"));
        assert!(register_target("a.b.c@v3", "x").is_err());
        assert!(register_target("a.b:c", "x").is_err());
    }
}
