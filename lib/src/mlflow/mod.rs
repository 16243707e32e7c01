//! MLflow over its REST API: a typed, blocking client and the objects it speaks
//! about, with nothing of tunebook's own workflow in it.
//!
//! [`MlflowClient`] follows the Python client's conventions (`MLFLOW_TRACKING_URI`,
//! `MLFLOW_REGISTRY_URI`, credentials, TLS options, retries; [`config`],
//! [`client`]); [`api`] has experiments, runs, params, tags, metric history and
//! the artifact proxy with streamed uploads and downloads; [`params`] fits params
//! and tags to MLflow's limits and drops secrets; [`server`] starts a local MLflow
//! server (`tunebook mlflow up`); [`display`] shows runs and experiments with
//! links into the UI. Tracking a training run ([`crate::track`]) and the model
//! registry ([`crate::registry`]) are built on it.

pub mod api;
pub mod client;
pub mod config;
pub mod display;
pub mod params;
pub mod server;

pub use api::{Experiment, FileInfo, KeyValue, MetricRecord, Run, RunData, RunInfo, RunRef, RunStatus, now_millis};
pub use client::{MlflowClient, MlflowError};
pub use config::{Auth, MlflowConfig, RetryPolicy, TlsOptions};
