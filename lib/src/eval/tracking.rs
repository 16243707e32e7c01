//! Logging an evaluation to MLflow the way MLflow's own evaluations are logged, so its UI
//! shows them: one run per model, a parent run with the differences, the per-row table
//! the experiment's Evaluation view compares side by side, and one trace per row.

use super::generate::Settings;
use super::result::EvalResult;
use super::score::Metric;
use crate::data::Dataset;
use crate::mlflow::{MetricRecord, MlflowClient, MlflowConfig, RunStatus, now_millis};
use anyhow::{Context, Result};
use serde_json::{Value, json};

/// The per-row table's artifact name (MLflow's `_EVAL_TABLE_FILE_NAME`).
pub const TABLE_FILE: &str = "eval_results_table.json";

pub(crate) fn log(result: &mut EvalResult, data: &Dataset, experiment: &str, uri: Option<&str>, traces: bool, s: &Settings) -> Result<()> {
    let client = MlflowClient::with_config(MlflowConfig::tracking(uri)?)?;
    let exp = client.get_or_create_experiment(experiment)?;
    let exp_id = exp.experiment_id.clone();
    let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string();
    let names: Vec<String> = result.models.iter().map(|m| m.spec.name.clone()).collect();
    let parent = client.create_run(
        &exp_id,
        &format!("eval-{}-{stamp}", names.join("-vs-")),
        now_millis(),
        &[("mlflow.source.name".into(), "tunebook eval".into()), ("tunebook.eval".into(), "comparison".into())],
    )?;
    let parent_id = parent.info.run_id.clone();
    let dataset = dataset_input(data, result)?;
    let metric_names: Vec<String> = result.metrics.iter().map(Metric::name).collect();
    for mi in 0..result.models.len() {
        let m = &result.models[mi];
        let run = client.create_run(
            &exp_id,
            &m.spec.name,
            now_millis(),
            &[
                ("mlflow.parentRunId".into(), parent_id.clone()),
                ("mlflow.runType".into(), "genai_evaluate".into()),
                ("mlflow.source.name".into(), "tunebook eval".into()),
                ("tunebook.eval.model".into(), m.spec.source.clone()),
            ],
        )?;
        let run_id = run.info.run_id.clone();
        let params = vec![
            ("model".to_string(), clip(&m.spec.source, 500)),
            ("data".into(), clip(&result.data_source, 500)),
            ("rows".into(), result.rows.len().to_string()),
            ("max_new_tokens".into(), s.max_new_tokens.to_string()),
            ("temperature".into(), s.temperature.to_string()),
            ("seed".into(), s.seed.to_string()),
            ("stop".into(), clip(&serde_json::to_string(&s.stop)?, 500)),
            ("metrics".into(), clip(&metric_names.join(","), 500)),
        ];
        let mut records = vec![];
        for (k, metric) in result.metrics.iter().enumerate() {
            let vals: Vec<f64> = m.row_values(k).into_iter().filter(|v| v.is_finite()).collect();
            if vals.is_empty() {
                continue;
            }
            let n = vals.len() as f64;
            let mean = vals.iter().sum::<f64>() / n;
            let name = metric.name();
            records.push(MetricRecord::now(format!("{name}/mean"), mean, 0));
            if vals.len() > 1 {
                let var = vals.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0);
                records.push(MetricRecord::now(format!("{name}/stderr"), (var / n).sqrt(), 0));
            }
            if metric.is_corpus() {
                records.push(MetricRecord::now(format!("{name}/corpus"), m.summaries[k].value, 0));
            }
        }
        records.push(MetricRecord::now("truncated/count", m.truncated() as f64, 0));
        records.push(MetricRecord::now("truncated/rate", m.truncated() as f64 / result.rows.len() as f64, 0));
        client.log_batch(&run_id, &records, &params, &[])?;
        let artifact_root = run.info.artifact_uri.clone().context("the MLflow run has no artifact_uri")?;
        client.upload_bytes(&artifact_root, TABLE_FILE, &serde_json::to_vec(&table(result, mi))?)?;
        client.set_tags(&run_id, &[("mlflow.loggedArtifacts".into(), json!([{"path": TABLE_FILE, "type": "table"}]).to_string())])?;
        client.post::<Value>("/runs/log-inputs", &json!({"run_id": run_id, "datasets": [dataset.clone()]}))?;
        if traces {
            log_traces(&client, &exp_id, &run_id, result, mi)?;
        }
        client.set_run_status(&run_id, RunStatus::Finished, Some(now_millis()))?;
        let url = run.url();
        let m = &mut result.models[mi];
        m.run_id = Some(run_id);
        m.run_url = Some(url);
    }
    let mut records = vec![];
    for d in &result.deltas {
        let name = result.metrics[d.metric].name();
        let key = if result.models.len() > 2 { format!("delta/{}/{name}", result.models[d.model].spec.name) } else { format!("delta/{name}") };
        records.push(MetricRecord::now(key.clone(), d.delta, 0));
        if let Some((lo, hi)) = d.interval {
            records.push(MetricRecord::now(format!("{key}/ci_low"), lo, 0));
            records.push(MetricRecord::now(format!("{key}/ci_high"), hi, 0));
        }
    }
    let mut tags = vec![];
    if let Some(g) = &result.gate {
        tags.push(("tunebook.eval.gate".to_string(), if g.passed { "passed" } else { "failed" }.to_string()));
    }
    let params = vec![("base".to_string(), result.models[0].spec.name.clone()), ("models".into(), clip(&names.join(","), 500))];
    client.log_batch(&parent_id, &records, &params, &tags)?;
    client.post::<Value>("/runs/log-inputs", &json!({"run_id": parent_id, "datasets": [dataset]}))?;
    client.set_run_status(&parent_id, RunStatus::Finished, Some(now_millis()))?;
    result.parent_run_id = Some(parent_id);
    result.experiment_url = Some(exp.url());
    result.tracking_server = Some(client.uri().to_string());
    Ok(())
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_string() } else { s.chars().take(n).collect() }
}

/// `eval_results_table.json` of model `mi`, in `pandas.DataFrame.to_json(orient="split")`
/// form: inputs, targets, outputs, `<metric>/score` per metric, token count, latency.
pub(crate) fn table(result: &EvalResult, mi: usize) -> Value {
    let m = &result.models[mi];
    let mut columns = vec!["row".to_string(), "inputs".into(), "targets".into(), "outputs".into()];
    columns.extend(result.metrics.iter().map(|x| format!("{}/score", x.name())));
    let judges: Vec<(usize, String)> = result.metrics.iter().filter_map(|x| match x {
        Metric::Judge { name, index } => Some((*index, name.clone())),
        _ => None,
    }).collect();
    columns.extend(judges.iter().map(|(_, n)| format!("{n}/justification")));
    columns.extend(["token_count".to_string(), "latency".into(), "truncated".into()]);
    let vals: Vec<Vec<f64>> = (0..result.metrics.len()).map(|k| m.row_values(k)).collect();
    let data: Vec<Value> = result
        .rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let a = &m.answers[i];
            let mut row = vec![json!(i), json!(r.question()), json!(r.references.join(" | ")), json!(a.text)];
            row.extend(vals.iter().map(|v| json!(v[i])));
            row.extend(judges.iter().map(|(j, _)| json!(a.judgments.get(*j).map(|x| x.1.rationale.as_str()).unwrap_or(""))));
            row.extend([json!(a.completion_tokens), json!(a.latency_s), json!(a.truncated)]);
            Value::Array(row)
        })
        .collect();
    json!({"columns": columns, "data": data})
}

/// The evaluation data as an MLflow dataset input (`delta_table` source for Delta).
fn dataset_input(data: &Dataset, result: &EvalResult) -> Result<Value> {
    let src = data.source();
    let (kind, location) = src.split_once(':').unwrap_or(("code", src));
    let (source_type, source) = match kind {
        "delta" => {
            let (path, version) = match location.rsplit_once("@v") {
                Some((p, v)) if v.parse::<u64>().is_ok() => (p.to_string(), v.parse::<u64>().ok()),
                _ => (location.to_string(), Dataset::delta_version(location).ok().flatten()),
            };
            let abs = std::path::Path::new(&path).canonicalize().map(|p| p.display().to_string()).unwrap_or(path);
            ("delta_table", json!({"path": abs, "delta_table_version": version}))
        }
        "jsonl" | "parquet" | "csv" | "text" => {
            let abs = std::path::Path::new(location).canonicalize().map(|p| p.display().to_string()).unwrap_or(location.to_string());
            ("local", json!({"uri": abs}))
        }
        _ => ("code", json!({"tags": {"source": src}})),
    };
    let schema = json!({"mlflow_colspec": data.df().get_column_names().iter().map(|c| json!({"name": c.as_str(), "type": "string"})).collect::<Vec<_>>()});
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for r in &result.rows {
        for b in serde_json::to_string(&(&r.prompt, &r.references))?.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let name = std::path::Path::new(location).file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_else(|| "eval".into());
    Ok(json!({
        "dataset": {
            "name": name,
            "digest": format!("{:08x}", h as u32),
            "source_type": source_type,
            "source": source.to_string(),
            "schema": schema.to_string(),
            "profile": json!({"num_rows": result.rows.len()}).to_string(),
        },
        "tags": [{"key": "mlflow.data.context", "value": "eval"}],
    }))
}

fn b64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for k in 0..4 {
            if k <= c.len() {
                out.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One trace per row: the request and answer, the reference as an expectation, each
/// metric as a feedback assessment; then its span as `traces.json` (MLflow's
/// StartTraceV3 + artifact path, which file and SQL stores both take).
fn log_traces(client: &MlflowClient, exp_id: &str, run_id: &str, result: &EvalResult, mi: usize) -> Result<()> {
    let m = &result.models[mi];
    let vals: Vec<Vec<f64>> = (0..result.metrics.len()).map(|k| m.row_values(k)).collect();
    let names: Vec<String> = result.metrics.iter().map(Metric::name).collect();
    super::generate::parallel_map(result.rows.len(), 4, |i| {
        let row_vals: Vec<f64> = vals.iter().map(|v| v[i]).collect();
        log_trace(client, exp_id, run_id, result, mi, i, &names, &row_vals).with_context(|| format!("logging the trace of row {i}"))
    })?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn log_trace(client: &MlflowClient, exp_id: &str, run_id: &str, result: &EvalResult, mi: usize, i: usize, names: &[String], vals: &[f64]) -> Result<()> {
    let row = &result.rows[i];
    let a = &result.models[mi].answers[i];
    let id = uuid::Uuid::new_v4();
    let hex = id.simple().to_string();
    let trace_id = format!("tr-{hex}");
    let span_id: [u8; 8] = id.as_bytes()[..8].try_into().expect("16 bytes");
    let end = chrono::Utc::now();
    let start = end - chrono::Duration::microseconds((a.latency_s * 1e6) as i64);
    let ts = |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let inputs = json!({"messages": row.prompt});
    let outputs = json!({"content": a.text, "truncated": a.truncated});
    let source_run = json!({"mlflow.assessment.sourceRunId": run_id});
    let mut assessments = vec![json!({
        "assessment_name": "expected_response",
        "trace_id": trace_id,
        "source": {"source_type": "HUMAN", "source_id": "evaluation data"},
        "create_time": ts(end),
        "last_update_time": ts(end),
        "expectation": {"value": if row.references.len() == 1 { json!(row.references[0]) } else { json!(row.references) }},
        "metadata": source_run,
    })];
    for ((n, v), metric) in names.iter().zip(vals).zip(&result.metrics) {
        let value = if v.is_finite() { json!(v) } else { Value::Null };
        let mut assessment = json!({
            "assessment_name": n,
            "trace_id": trace_id,
            "source": {"source_type": "CODE", "source_id": format!("tunebook/{n}")},
            "create_time": ts(end),
            "last_update_time": ts(end),
            "feedback": {"value": value},
            "metadata": source_run,
        });
        if let Metric::Judge { index, .. } = metric {
            if let Some((judge_model, j)) = a.judgments.get(*index) {
                assessment["source"] = json!({"source_type": "LLM_JUDGE", "source_id": judge_model});
                assessment["feedback"] = json!({"value": j.value.map_or(Value::Null, |b| json!(if b { "yes" } else { "no" }))});
                assessment["rationale"] = json!(j.rationale);
            }
        }
        assessments.push(assessment);
    }
    let usage = json!({"input_tokens": a.prompt_tokens, "output_tokens": a.completion_tokens, "total_tokens": a.prompt_tokens + a.completion_tokens});
    let body = json!({"trace": {"trace_info": {
        "trace_id": trace_id,
        "client_request_id": format!("{run_id}-{i}"),
        "trace_location": {"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": exp_id}},
        "request_time": ts(start),
        "execution_duration": format!("{:.3}s", a.latency_s),
        "state": "OK",
        "request_preview": clip(row.question(), 1000),
        "response_preview": clip(&a.text, 1000),
        "trace_metadata": {
            "mlflow.trace_schema.version": "3",
            "mlflow.sourceRun": run_id,
            "mlflow.traceInputs": clip(&inputs.to_string(), 1000),
            "mlflow.traceOutputs": clip(&outputs.to_string(), 1000),
            "mlflow.trace.tokenUsage": usage.to_string(),
        },
        "tags": {"mlflow.traceName": "generate", "tunebook.eval.row": i.to_string(), "tunebook.eval.model": result.models[mi].spec.name},
        "assessments": assessments,
    }}});
    let resp: Value = client.post_path("/api/3.0/mlflow/traces", &body)?;
    let Some(location) = resp["trace"]["trace_info"]["tags"]["mlflow.artifactLocation"].as_str() else {
        return Ok(()); // spans kept by the tracking store itself
    };
    let nanos = |t: chrono::DateTime<chrono::Utc>| t.timestamp_nanos_opt().unwrap_or(0);
    let attr = |v: &Value| v.to_string();
    let span = json!({
        "trace_id": b64(id.as_bytes()),
        "span_id": b64(&span_id),
        "parent_span_id": "",
        "name": "generate",
        "start_time_unix_nano": nanos(start),
        "end_time_unix_nano": nanos(end),
        "status": {"code": "STATUS_CODE_OK", "message": ""},
        "events": [],
        "links": [],
        "trace_state": "",
        "attributes": {
            "mlflow.traceRequestId": attr(&json!(trace_id)),
            "mlflow.spanType": attr(&json!("LLM")),
            "mlflow.spanInputs": attr(&inputs),
            "mlflow.spanOutputs": attr(&outputs),
            "mlflow.llm.model": attr(&json!(result.models[mi].spec.source)),
            "mlflow.chat.tokenUsage": attr(&usage),
        },
    });
    client.upload_bytes(location, "traces.json", &serde_json::to_vec(&json!({"spans": [span]}))?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(super::b64(b"Man"), "TWFu");
        assert_eq!(super::b64(b"Ma"), "TWE=");
        assert_eq!(super::b64(b"M"), "TQ==");
        assert_eq!(super::b64(&[0xff; 8]), "//////////8=");
    }
}
