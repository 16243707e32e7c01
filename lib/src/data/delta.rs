//! Delta Lake tables: read (latest, at a version, at a timestamp) through the
//! Delta kernel, write (create, append, overwrite) with deltalake's writer.
//!
//! Reading goes through the kernel's scan, which applies partition values,
//! deletion vectors and column mapping; record batches cross into polars over
//! the Arrow C Data Interface. Overwrite is one transaction that removes every
//! live file and adds the new ones, so it needs no query engine (deltalake's
//! `datafusion` feature) and readers see either the old or the new table.

use super::{DataError, arrow_bridge};
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::engine::arrow_data::ArrowEngineData;
use deltalake::kernel::transaction::CommitBuilder;
use deltalake::kernel::{Action, StructType};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError};
use polars::prelude::*;
use std::path::Path;

/// Which version of a Delta table to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeltaVersion {
    /// The newest version.
    Latest,
    /// A version number (time travel).
    Version(u64),
    /// The version current at an RFC 3339 timestamp, e.g. `2025-01-31T12:00:00Z`.
    Timestamp(String),
}

/// How [`super::Dataset::to_delta`] treats an existing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Create a new table; fail if one exists.
    Create,
    /// Append rows (create the table if there is none).
    Append,
    /// Replace every row in one transaction (create the table if there is none).
    Overwrite,
}

fn runtime() -> Result<tokio::runtime::Runtime, DataError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| DataError::Delta { path: String::new(), message: format!("cannot start an async runtime: {e}") })
}

/// Runs `fut` to completion, also from inside an existing tokio runtime.
fn block_on<T: Send>(fut: impl std::future::Future<Output = Result<T, DataError>> + Send) -> Result<T, DataError> {
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| s.spawn(|| runtime()?.block_on(fut)).join().unwrap_or_else(|_| {
            Err(DataError::Delta { path: String::new(), message: "the Delta worker thread panicked".into() })
        }))
    } else {
        runtime()?.block_on(fut)
    }
}

fn delta_err(path: &str) -> impl Fn(DeltaTableError) -> DataError + '_ {
    move |e| {
        let message = match &e {
            DeltaTableError::NotATable(_) | DeltaTableError::InvalidTableLocation(_) => {
                format!("{e}: expected a folder holding `_delta_log/`")
            }
            _ => e.to_string(),
        };
        DataError::Delta { path: path.to_string(), message }
    }
}

/// URL schemes of the object stores a Delta table may live on: S3 (and S3-compatible
/// stores through `AWS_ENDPOINT_URL`), Azure (ADLS Gen2 and Blob) and Google Cloud Storage.
pub const OBJECT_STORE_SCHEMES: &[&str] = &["s3", "s3a", "az", "abfs", "abfss", "adl", "azure", "gs"];

/// Whether `path` is an object-store URL (`s3://bucket/table`, `abfss://…`, `gs://…`)
/// rather than a local folder.
pub fn is_object_store_url(path: &str) -> bool {
    path.split_once("://").is_some_and(|(scheme, _)| OBJECT_STORE_SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()))
}

fn table_url(path: &str) -> Result<url::Url, DataError> {
    // The object-store handlers register themselves at start-up; registering again
    // costs nothing and does not rely on the linker keeping that code.
    static REGISTER: std::sync::Once = std::sync::Once::new();
    REGISTER.call_once(|| {
        deltalake::aws::register_handlers(None);
        deltalake::azure::register_handlers(None);
        deltalake::gcp::register_handlers(None);
    });
    if path.contains("://") && !is_object_store_url(path) && !path.starts_with("file://") {
        return Err(DataError::Delta {
            path: path.to_string(),
            message: format!(
                "this URL scheme is not a supported store: use a local folder or one of {}",
                OBJECT_STORE_SCHEMES.iter().map(|s| format!("{s}://")).collect::<Vec<_>>().join(", ")
            ),
        });
    }
    deltalake::ensure_table_uri(path).map_err(delta_err(path))
}

/// The Delta table at `url`, or `None` when the folder or store answers that there is
/// none; an error when the store cannot be reached or refuses the credentials.
async fn open_if_exists(url: url::Url, path: &str) -> Result<Option<DeltaTable>, DataError> {
    match deltalake::open_table(url).await {
        Ok(t) => Ok(Some(t)),
        Err(DeltaTableError::NotATable(_)) | Err(DeltaTableError::InvalidTableLocation(_)) => Ok(None),
        Err(e) => Err(delta_err(path)(e)),
    }
}

/// Reads a Delta table into one DataFrame.
pub(crate) fn read(path: &str, at: &DeltaVersion) -> Result<DataFrame, DataError> {
    if !path.contains("://") && !Path::new(path).join("_delta_log").is_dir() {
        return Err(DataError::Delta {
            path: path.to_string(),
            message: "not a Delta table: no `_delta_log/` folder there".into(),
        });
    }
    let url = table_url(path)?;
    let at = at.clone();
    block_on(async move {
        let table = match &at {
            DeltaVersion::Latest => deltalake::open_table(url).await,
            DeltaVersion::Version(v) => deltalake::open_table_with_version(url, *v as _).await,
            DeltaVersion::Timestamp(ts) => deltalake::open_table_with_ds(url, ts).await,
        }
        .map_err(delta_err(path))?;
        let version = table.version().ok_or_else(|| DataError::Delta {
            path: path.to_string(),
            message: "the table has no committed version".into(),
        })?;
        if let DeltaVersion::Timestamp(ts) = &at {
            check_not_before_first_commit(&table, ts, path).await?;
        }
        let engine = table.log_store().engine(None);
        let mut root = table.table_url().clone();
        if !root.path().ends_with('/') {
            root.set_path(&format!("{}/", root.path()));
        }
        let empty_schema = table.snapshot().map_err(delta_err(path))?.snapshot().arrow_schema();
        let owned_path = path.to_string();
        tokio::task::spawn_blocking(move || -> Result<DataFrame, DataError> {
            let kerr = |e: delta_kernel::Error| DataError::Delta { path: owned_path.clone(), message: e.to_string() };
            let snapshot = delta_kernel::Snapshot::builder_for(root.as_str())
                .at_version(version as _)
                .build(engine.as_ref())
                .map_err(kerr)?;
            let scan = snapshot.scan_builder().build().map_err(kerr)?;
            let mut frames = vec![];
            for data in scan.execute(engine.clone()).map_err(kerr)? {
                let data = ArrowEngineData::try_from_engine_data(data.map_err(kerr)?).map_err(kerr)?;
                let batch = data.record_batch();
                if batch.num_rows() > 0 {
                    frames.push(arrow_bridge::batch_to_df(batch)?);
                }
            }
            if frames.is_empty() {
                let empty = deltalake::arrow::array::RecordBatch::new_empty(empty_schema);
                return arrow_bridge::batch_to_df(&empty);
            }
            let mut df = frames.remove(0);
            for f in frames {
                df.vstack_mut_owned(f).map_err(|e| DataError::Polars(e.to_string()))?;
            }
            df.rechunk_mut();
            Ok(df)
        })
        .await
        .map_err(|e| DataError::Delta { path: path.to_string(), message: format!("the reader task failed: {e}") })?
    })
}

/// deltalake resolves a timestamp older than the table to its first version;
/// reading data that did not exist yet is an error instead.
async fn check_not_before_first_commit(table: &DeltaTable, ts: &str, path: &str) -> Result<(), DataError> {
    use futures::StreamExt;
    let wanted = chrono::DateTime::parse_from_rfc3339(ts).map_err(|e| DataError::Delta {
        path: path.to_string(),
        message: format!("`{ts}` is not an RFC 3339 timestamp ({e}); write it like 2025-01-31T12:00:00Z"),
    })?;
    let commits: Vec<_> = table.history(None).collect().await;
    let first = commits.iter().filter_map(|c| c.as_ref().ok()).filter_map(|c| c.timestamp).min();
    if let Some(first) = first
        && wanted.timestamp_millis() < first
    {
        let when = chrono::DateTime::from_timestamp_millis(first).map(|d| d.to_rfc3339()).unwrap_or_default();
        return Err(DataError::Delta {
            path: path.to_string(),
            message: format!("the table did not exist yet at {ts}: its first available version was written at {when}"),
        });
    }
    Ok(())
}

/// The table's current version number, or `None` when there is no table at `path`.
pub(crate) fn current_version(path: &str) -> Result<Option<u64>, DataError> {
    if !path.contains("://") && !Path::new(path).join("_delta_log").is_dir() {
        return Ok(None);
    }
    let url = table_url(path)?;
    block_on(async move {
        // A local `_delta_log/` that does not open is an error; a store says "none".
        let table = match path.contains("://") {
            true => open_if_exists(url, path).await?,
            false => Some(deltalake::open_table(url).await.map_err(delta_err(path))?),
        };
        Ok(table.and_then(|t| t.version()).map(|v| v as u64))
    })
}

/// Writes `df` to the Delta table at `path`; returns the new table version.
pub(crate) fn write(path: &str, df: &DataFrame, mode: WriteMode) -> Result<u64, DataError> {
    if !path.contains("://") {
        std::fs::create_dir_all(path)
            .map_err(|e| DataError::Io { path: path.to_string(), message: format!("cannot create the table folder: {e}") })?;
    }
    let url = table_url(path)?;
    // On a store the existence check opens the table; it is kept for the write below.
    let existing = match path.contains("://") {
        true => block_on(open_if_exists(url.clone(), path))?,
        false => None,
    };
    let exists = existing.is_some() || (!path.contains("://") && Path::new(path).join("_delta_log").is_dir());
    if exists && mode == WriteMode::Create {
        return Err(DataError::Delta {
            path: path.to_string(),
            message: "a Delta table already exists here: use WriteMode::Append or WriteMode::Overwrite".into(),
        });
    }
    let batch = arrow_bridge::df_to_batch(df)?;
    block_on(async move {
        let derr = delta_err(path);
        // Data files written for a table another writer created first: committed below
        // as an append (or overwrite) of that table instead.
        let mut orphan_adds = None;
        let mut existing = existing;
        if !exists {
            // Data files first, then one commit that creates the table with them:
            // version 0 holds the rows, and a failed write leaves no table behind.
            let schema: StructType = batch.schema().as_ref().try_into_kernel().map_err(|e| DataError::Delta {
                path: path.to_string(),
                message: format!("the columns cannot be stored in Delta: {e}"),
            })?;
            let mut writer = RecordBatchWriter::try_new(url.as_str(), batch.schema(), None, None).map_err(&derr)?;
            if batch.num_rows() > 0 {
                // (A clone shares the columns: the batch is kept for the path below.)
                writer.write(batch.clone()).await.map_err(&derr)?;
            }
            let adds = writer.flush().await.map_err(&derr)?;
            let created = DeltaTable::try_from_url(url.clone())
                .await
                .map_err(&derr)?
                .create()
                .with_columns(schema.fields().cloned())
                .with_actions(adds.iter().cloned().map(Action::Add))
                .await;
            match created {
                Ok(table) => return Ok(table.version().unwrap_or(0) as u64),
                // Another writer created the table between our check and our commit.
                Err(e) if mode != WriteMode::Create => match open_if_exists(url.clone(), path).await {
                    Ok(Some(t)) => {
                        existing = Some(t);
                        orphan_adds = Some(adds);
                    }
                    _ => return Err(derr(e)),
                },
                Err(e) => return Err(derr(e)),
            }
        }
        let mut table = match existing {
            Some(t) => t,
            None => deltalake::open_table(url).await.map_err(&derr)?,
        };
        if let Some(adds) = orphan_adds {
            let snapshot = table.snapshot().map_err(&derr)?;
            let mut actions: Vec<Action> = match mode {
                WriteMode::Overwrite => snapshot.log_data().iter().map(|f| Action::Remove(f.remove_action(true))).collect(),
                _ => vec![],
            };
            actions.extend(adds.into_iter().map(Action::Add));
            let save = if mode == WriteMode::Overwrite { SaveMode::Overwrite } else { SaveMode::Append };
            let op = DeltaOperation::Write { mode: save, partition_by: None, predicate: None };
            let done = CommitBuilder::default()
                .with_actions(actions)
                .build(Some(snapshot), table.log_store(), op)
                .await
                .map_err(&derr)?;
            return Ok(done.version() as u64);
        }
        let mut writer = RecordBatchWriter::for_table(&table).map_err(&derr)?;
        if batch.num_rows() > 0 {
            writer.write(batch).await.map_err(|e| DataError::Delta {
                path: path.to_string(),
                message: format!("{e} (the table's columns and types must match the data's; write to a new path to change them)"),
            })?;
        }
        let version = if mode == WriteMode::Overwrite {
            let adds = writer.flush().await.map_err(&derr)?;
            let snapshot = table.snapshot().map_err(&derr)?;
            let mut actions: Vec<Action> =
                snapshot.log_data().iter().map(|f| Action::Remove(f.remove_action(true))).collect();
            actions.extend(adds.into_iter().map(Action::Add));
            let op = DeltaOperation::Write { mode: SaveMode::Overwrite, partition_by: None, predicate: None };
            let done = CommitBuilder::default()
                .with_actions(actions)
                .build(Some(snapshot), table.log_store(), op)
                .await
                .map_err(&derr)?;
            done.version()
        } else {
            writer.flush_and_commit(&mut table).await.map_err(&derr)?
        };
        Ok(version as u64)
    })
}
