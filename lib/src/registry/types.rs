//! The registry's REST objects and how a notebook shows them.

use crate::mlflow::display::{Cell, LinkTable, format_millis, render_as_table};
use serde::Deserialize;

/// An alias and the version it points at.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct AliasEntry {
    pub alias: String,
    pub version: String,
}

/// A registered model.
#[derive(Clone, Debug, Deserialize)]
pub struct RegisteredModel {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub creation_timestamp: Option<i64>,
    #[serde(default)]
    pub last_updated_timestamp: Option<i64>,
    #[serde(default)]
    pub aliases: Vec<AliasEntry>,
    /// The server it came from (for UI links).
    #[serde(skip)]
    pub server: String,
}

impl RegisteredModel {
    /// Link to the model in the MLflow UI.
    pub fn url(&self) -> String {
        format!("{}/#/models/{}", self.server, urlencode(&self.name))
    }
}

/// A version of a registered model.
#[derive(Clone, Debug, Deserialize)]
pub struct ModelVersion {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub run_id: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub creation_timestamp: Option<i64>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// The server it came from (for UI links).
    #[serde(skip)]
    pub server: String,
}

impl ModelVersion {
    /// Link to the version in the MLflow UI.
    pub fn url(&self) -> String {
        format!("{}/#/models/{}/versions/{}", self.server, urlencode(&self.name), self.version)
    }

    /// `name/version`.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.name, self.version)
    }

    /// The card shown in a notebook.
    pub fn card(&self) -> LinkTable {
        let mut rows = vec![
            ("model", Cell::link(self.reference(), self.url())),
            ("aliases", Cell::text(if self.aliases.is_empty() { "-".into() } else { self.aliases.join(", ") })),
            ("status", Cell::text(self.status.clone().unwrap_or_default())),
            ("created", Cell::text(format_millis(self.creation_timestamp))),
            ("source", Cell::text(self.source.clone().unwrap_or_default())),
        ];
        if let Some(r) = &self.run_id {
            // The UI's /runs/<id> route finds the run's experiment itself.
            rows.push(("run", Cell::link(r, format!("{}/#/runs/{r}", self.server))));
        }
        LinkTable::card("Registered model version", rows)
    }
}

impl RegisteredModel {
    /// The card shown in a notebook.
    pub fn card(&self) -> LinkTable {
        let aliases: Vec<String> = self.aliases.iter().map(|a| format!("@{} → {}", a.alias, a.version)).collect();
        LinkTable::card(
            "Registered model",
            vec![
                ("model", Cell::link(&self.name, self.url())),
                ("aliases", Cell::text(if aliases.is_empty() { "-".into() } else { aliases.join(", ") })),
                ("updated", Cell::text(format_millis(self.last_updated_timestamp))),
                ("description", Cell::text(self.description.clone().unwrap_or_default())),
            ],
        )
    }
}

render_as_table!(ModelVersion, ModelVersion::card);
render_as_table!(Vec<ModelVersion>, |v| versions_table(v));
render_as_table!(RegisteredModel, RegisteredModel::card);
render_as_table!(Vec<RegisteredModel>, |v| models_table(v));

/// Registered models as one table, with links.
pub fn models_table(models: &[RegisteredModel]) -> LinkTable {
    let mut t = LinkTable::new(["model", "aliases", "updated"]).title("Registered models");
    for m in models {
        let aliases: Vec<String> = m.aliases.iter().map(|a| format!("@{} → {}", a.alias, a.version)).collect();
        t.push([Cell::link(&m.name, m.url()), Cell::text(aliases.join(", ")), Cell::text(format_millis(m.last_updated_timestamp))]);
    }
    t
}

/// Versions as one table, with links.
pub fn versions_table(versions: &[ModelVersion]) -> LinkTable {
    let mut t = LinkTable::new(["version", "aliases", "status", "created", "run"]).title("Model versions");
    for v in versions {
        t.push([
            Cell::link(v.reference(), v.url()),
            Cell::text(v.aliases.join(", ")),
            Cell::text(v.status.clone().unwrap_or_default()),
            Cell::text(format_millis(v.creation_timestamp)),
            match &v.run_id {
                Some(r) => Cell::link(r, format!("{}/#/runs/{r}", v.server)),
                None => Cell::text(""),
            },
        ]);
    }
    t
}

/// A LoggedModel (MLflow 3): a model's files, tied to the run that produced it.
#[derive(Clone, Debug, Deserialize)]
pub struct LoggedModel {
    pub model_id: String,
    pub experiment_id: String,
    #[serde(default)]
    pub name: String,
    pub artifact_uri: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub source_run_id: Option<String>,
}

pub(crate) fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>().replace('+', "%20")
}

/// The `{"model": {"info": ...}}` envelope MLflow answers LoggedModel calls with.
#[derive(Deserialize)]
pub(crate) struct LoggedModelEnvelope {
    model: LoggedModelInfo,
}

#[derive(Deserialize)]
struct LoggedModelInfo {
    info: LoggedModel,
}

impl LoggedModelEnvelope {
    /// The LoggedModel inside.
    pub(crate) fn info(self) -> LoggedModel {
        self.model.info
    }
}
