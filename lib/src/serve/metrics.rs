//! Prometheus metrics in the text exposition format, named like vLLM's (`vllm:*`, every
//! series labelled `model_name`) so dashboards and gateways built for vLLM read them,
//! plus `http_requests_total{handler,method,status}` and a few `tunebook:*` engine series.

use super::engine::{Finish, Job};
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

const TTFT_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0];
const ITL_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
];
const TOKEN_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0];

#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    fn observe(&mut self, v: f64) {
        for (c, b) in self.counts.iter_mut().zip(self.bounds) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

#[derive(Debug)]
struct Histograms {
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    queue: Histogram,
    prompt_tokens: Histogram,
    generation_tokens: Histogram,
    step: Histogram,
}

/// The server's counters, gauges and histograms.
#[derive(Debug)]
pub struct Metrics {
    model_name: String,
    pub(crate) running: AtomicU64,
    pub(crate) waiting: AtomicU64,
    pub(crate) aborted: AtomicU64,
    pub(crate) prompt_tokens: AtomicU64,
    pub(crate) generation_tokens: AtomicU64,
    finished_stop: AtomicU64,
    finished_length: AtomicU64,
    steps: AtomicU64,
    step_sequences: AtomicU64,
    hist: Mutex<Histograms>,
    /// `(handler, method, status) → count`.
    http: Mutex<std::collections::BTreeMap<(String, String, u16), u64>>,
}

impl Metrics {
    /// Empty metrics for the served model `model_name`.
    pub fn new(model_name: &str) -> Self {
        Self {
            model_name: model_name.replace('\\', "\\\\").replace('"', "\\\""),
            running: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            aborted: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            finished_stop: AtomicU64::new(0),
            finished_length: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            step_sequences: AtomicU64::new(0),
            hist: Mutex::new(Histograms {
                ttft: Histogram::new(TTFT_BUCKETS),
                itl: Histogram::new(ITL_BUCKETS),
                e2e: Histogram::new(E2E_BUCKETS),
                queue: Histogram::new(E2E_BUCKETS),
                prompt_tokens: Histogram::new(TOKEN_BUCKETS),
                generation_tokens: Histogram::new(TOKEN_BUCKETS),
                step: Histogram::new(ITL_BUCKETS),
            }),
            http: Mutex::new(Default::default()),
        }
    }

    fn hist(&self) -> std::sync::MutexGuard<'_, Histograms> {
        self.hist.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn observe_ttft(&self, s: f64) {
        self.hist().ttft.observe(s);
    }

    pub(crate) fn observe_itl(&self, s: f64) {
        self.hist().itl.observe(s);
    }

    pub(crate) fn observe_queue_time(&self, s: f64) {
        self.hist().queue.observe(s);
    }

    pub(crate) fn observe_step(&self, s: f64, sequences: usize) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.step_sequences.fetch_add(sequences as u64, Ordering::Relaxed);
        self.hist().step.observe(s);
    }

    pub(crate) fn observe_done(&self, job: &Job, finish: Finish, produced: usize) {
        match finish {
            Finish::Stop => self.finished_stop.fetch_add(1, Ordering::Relaxed),
            Finish::Length => self.finished_length.fetch_add(1, Ordering::Relaxed),
        };
        self.prompt_tokens.fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
        let mut h = self.hist();
        h.e2e.observe(job.arrived.elapsed().as_secs_f64());
        h.prompt_tokens.observe(job.prompt.len() as f64);
        h.generation_tokens.observe(produced as f64);
    }

    /// Counts one HTTP response.
    pub(crate) fn count_http(&self, handler: &str, method: &str, status: u16) {
        let mut m = self.http.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((handler.to_string(), method.to_string(), status)).or_insert(0) += 1;
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let l = format!("model_name=\"{}\"", self.model_name);
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{l}}} {v}");
        };
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        gauge(&mut out, "vllm:num_requests_running", "Sequences in the running batch.", "gauge", g(&self.running));
        gauge(&mut out, "vllm:num_requests_waiting", "Requests waiting to join the batch.", "gauge", g(&self.waiting));
        gauge(&mut out, "vllm:prompt_tokens_total", "Prompt tokens of finished requests.", "counter", g(&self.prompt_tokens));
        gauge(&mut out, "vllm:generation_tokens_total", "Generated tokens.", "counter", g(&self.generation_tokens));
        gauge(&mut out, "tunebook:requests_aborted_total", "Sequences freed because their client went away.", "counter", g(&self.aborted));
        gauge(&mut out, "tunebook:engine_steps_total", "Batched forward steps run.", "counter", g(&self.steps));
        gauge(&mut out, "tunebook:engine_step_sequences_total", "Sequences advanced, summed over steps.", "counter", g(&self.step_sequences));
        let _ = writeln!(out, "# HELP vllm:request_success_total Finished requests by finish reason.\n# TYPE vllm:request_success_total counter");
        let _ = writeln!(out, "vllm:request_success_total{{{l},finished_reason=\"stop\"}} {}", g(&self.finished_stop));
        let _ = writeln!(out, "vllm:request_success_total{{{l},finished_reason=\"length\"}} {}", g(&self.finished_length));
        {
            let h = self.hist();
            h.ttft.write(&mut out, "vllm:time_to_first_token_seconds", "Time from arrival to the first token.", &l);
            h.itl.write(&mut out, "vllm:inter_token_latency_seconds", "Time between consecutive tokens of a sequence.", &l);
            h.e2e.write(&mut out, "vllm:e2e_request_latency_seconds", "Time from arrival to the last token.", &l);
            h.queue.write(&mut out, "vllm:request_queue_time_seconds", "Time from arrival to joining the batch.", &l);
            h.prompt_tokens.write(&mut out, "vllm:request_prompt_tokens", "Prompt tokens per request.", &l);
            h.generation_tokens.write(&mut out, "vllm:request_generation_tokens", "Generated tokens per request.", &l);
            h.step.write(&mut out, "tunebook:engine_step_seconds", "Duration of one batched forward step.", &l);
        }
        let _ = writeln!(out, "# HELP http_requests_total HTTP responses by route, method and status.\n# TYPE http_requests_total counter");
        let m = self.http.lock().unwrap_or_else(|p| p.into_inner());
        for ((h, method, s), n) in m.iter() {
            let _ = writeln!(out, "http_requests_total{{handler=\"{h}\",method=\"{method}\",status=\"{s}\"}} {n}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_the_text_parses_as_prometheus_lines() {
        let m = Metrics::new("smol\"lm");
        m.observe_ttft(0.03);
        m.observe_ttft(0.3);
        m.count_http("/v1/chat/completions", "POST", 200);
        let text = m.render();
        assert!(text.contains("vllm:time_to_first_token_seconds_bucket{model_name=\"smol\\\"lm\",le=\"0.04\"} 1"), "{text}");
        assert!(text.contains("vllm:time_to_first_token_seconds_bucket{model_name=\"smol\\\"lm\",le=\"0.5\"} 2"));
        assert!(text.contains("vllm:time_to_first_token_seconds_count{model_name=\"smol\\\"lm\"} 2"));
        assert!(text.contains("http_requests_total{handler=\"/v1/chat/completions\",method=\"POST\",status=\"200\"} 1"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').expect("name and value");
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(series.ends_with('}'), "{line}");
        }
    }
}
