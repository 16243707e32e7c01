//! Logging overhead and shipping throughput of the MLflow tracker against a real
//! server. Run by `bench/mlflow_logging.py`, which compares it with the Python
//! client on the same server; on its own:
//!
//!     cargo run -p tunebook --example mlflow_bench -- http://127.0.0.1:5000 [steps] [metrics]
//!
//! Prints one JSON object per measurement.
//!
//! 1. A training loop at 10 steps/s (each step sleeps to its 100 ms slot, so the
//!    process's CPU time is all logging and shipping) logs 8 metrics per step
//!    while the tracker ships them. Reported: time the training thread spends in
//!    logging calls per step (median, p99, max) as a share of the 100 ms step, the
//!    process CPU time per step (the shipper thread included), and the delivery
//!    lag at the end.
//! 2. Throughput: `metrics` records already in the log, shipped from scratch.

use std::time::{Duration, Instant};
use tunebook::mlflow::MlflowClient;
use tunebook::track::{MetricRecord, MetricWal, MlflowTracker, RunContext, RunOutcome, Tracker, TrackerOptions};

fn cpu_time() -> Duration {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |tv: libc::timeval| Duration::new(tv.tv_sec as u64, tv.tv_usec as u32 * 1000);
    t(u.ru_utime) + t(u.ru_stime)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

const KEYS: [&str; 8] = [
    "loss/train/total",
    "lr",
    "throughput/tokens_per_sec",
    "throughput/samples_per_sec",
    "metrics/train/LanguagePerplexity",
    "memory/peak_reserved_mem",
    "time/remaining_estimate",
    "grad_norm",
];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let uri = args.get(1).cloned().or_else(|| std::env::var("MLFLOW_TRACKING_URI").ok()).expect("pass the server URL");
    let steps: i64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(100);
    let total: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(50_000);
    let client = MlflowClient::new(&uri)?;
    let scratch = tempfile::tempdir()?;
    let opts = TrackerOptions { poll_interval: Duration::from_millis(200), drain_timeout: Duration::from_secs(300) };

    // 1. A training loop at 10 steps/s.
    let dir = scratch.path().join("loop");
    std::fs::create_dir_all(&dir)?;
    let mut t = MlflowTracker::with_client(client.clone())?.options(opts.clone());
    t.start(&RunContext { run_dir: &dir, run_name: "bench-loop", experiment: Some("tunebook-bench"), params: &[], tags: &[] })?;
    let mut wal = MetricWal::open(&dir)?;
    let step_time = Duration::from_millis(100);
    let mut costs = Vec::with_capacity(steps as usize);
    let cpu0 = cpu_time();
    let start = Instant::now();
    for step in 0..steps {
        let slot = start + step_time * (step as u32 + 1);
        let t0 = Instant::now();
        let recs: Vec<MetricRecord> = KEYS.iter().enumerate().map(|(i, k)| MetricRecord::now(*k, step as f64 * 0.01 + i as f64, step)).collect();
        wal.append(&recs)?;
        costs.push(t0.elapsed());
        if let Some(d) = slot.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    let loop_wall = start.elapsed();
    let cpu = cpu_time() - cpu0;
    let lag_start = Instant::now();
    t.finish(RunOutcome::Finished)?;
    let lag = lag_start.elapsed();
    let shipped = t.progress().shipped;
    assert_eq!(shipped, steps as u64 * KEYS.len() as u64, "every metric arrived");
    costs.sort();
    let mean = costs.iter().sum::<Duration>() / costs.len() as u32;
    println!(
        "{}",
        serde_json::json!({
            "what": "loop", "steps": steps, "metrics_per_step": KEYS.len(), "step_ms": 100,
            "log_call_us_median": percentile(&costs, 0.5).as_secs_f64() * 1e6,
            "log_call_us_p99": percentile(&costs, 0.99).as_secs_f64() * 1e6,
            "log_call_us_max": costs.last().unwrap().as_secs_f64() * 1e6,
            "log_call_share_of_step_pct": mean.as_secs_f64() / step_time.as_secs_f64() * 100.0,
            "process_cpu_ms_per_step": cpu.as_secs_f64() * 1e3 / steps as f64,
            "loop_wall_s": loop_wall.as_secs_f64(),
            "finish_drain_s": lag.as_secs_f64(),
        })
    );

    // 2. Shipping throughput from a full log.
    let dir = scratch.path().join("throughput");
    std::fs::create_dir_all(&dir)?;
    let mut wal = MetricWal::open(&dir)?;
    let per_key = total / KEYS.len();
    let recs: Vec<MetricRecord> = (0..per_key as i64)
        .flat_map(|s| KEYS.iter().map(move |k| MetricRecord { key: k.to_string(), value: s as f64, step: s, timestamp: 1_700_000_000_000 + s }))
        .collect();
    wal.append(&recs)?;
    let mut t = MlflowTracker::with_client(client.clone())?.options(opts);
    t.start(&RunContext { run_dir: &dir, run_name: "bench-throughput", experiment: Some("tunebook-bench"), params: &[], tags: &[] })?;
    let t0 = Instant::now();
    t.finish(RunOutcome::Finished)?;
    let secs = t0.elapsed().as_secs_f64();
    let run_id = t.run_id().unwrap();
    let arrived = client.metric_history(&run_id, KEYS[0])?.len();
    assert_eq!(arrived, per_key, "every metric arrived once");
    println!(
        "{}",
        serde_json::json!({"what": "throughput", "metrics": recs.len(), "seconds": secs, "metrics_per_s": recs.len() as f64 / secs})
    );
    Ok(())
}
