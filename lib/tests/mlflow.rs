//! Tracking and registry against real `mlflow server`s (the project's pinned MLflow,
//! found like `tunebook mlflow up` finds it: `$TUNEBOOK_MLFLOW`, `$VENV/bin/mlflow`,
//! `PATH`, the checkout's `.venv`).
//!
//! One plain server is shared by most tests; the basic-auth test and the outage
//! test get their own. Every server runs in its own process group, tied to this
//! test process: a watcher ends the group when the process ends, even after a
//! panic or a kill, and the outage test ends it itself.

use anyhow::Result;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use tunebook::model::{GenerationConfig, LlamaConfig, LlamaModel, Lora, Model, write_tiny_model};
use tunebook::registry::Registry;
use tunebook::mlflow::params::{DROPPED_TAG, join_split_value};
use tunebook::mlflow::server::{LocalServer, ServerOptions};
use tunebook::mlflow::{Auth, MlflowClient, MlflowConfig, MlflowError, RetryPolicy, RunStatus, TlsOptions};
use tunebook::track::{MetricRecord, MetricWal, MlflowTracker, RunContext, RunOutcome, Tracker, TrackerOptions, WalCursor, sync_run};

/// Logs a model directory on the tracker's MLflow run and registers it, as the
/// training stage does at the end of a run.
fn log_model(t: &mut MlflowTracker, run_dir: &Path, model_dir: &Path, register_to: Option<&str>) -> Result<Option<String>> {
    tunebook::train::publish::log_model(run_dir, t, model_dir, register_to)
}

const ADMIN_PASSWORD: &str = "tunebook-Test-admin-pw1";

/// Scratch space for this test process, removed at the start of a later run.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        // Leftovers of earlier runs whose process is gone.
        for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("mlflow-").and_then(|p| p.parse::<i32>().ok()) {
                if unsafe { libc::kill(pid, 0) } != 0 {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let d = root.join(format!("mlflow-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fn fresh_dir(name: &str) -> PathBuf {
    let d = scratch().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Servers {
    main: Mutex<LocalServer>,
    auth: Mutex<LocalServer>,
}

/// Both shared servers, started together on first use (they start in parallel).
fn servers() -> &'static Servers {
    static S: OnceLock<Servers> = OnceLock::new();
    S.get_or_init(|| {
        let mut main = ServerOptions::new(scratch().join("server-main"));
        main.tied_to_this_process = true;
        let auth_dir = scratch().join("server-auth");
        std::fs::create_dir_all(&auth_dir).unwrap();
        let ini = auth_dir.join("basic_auth.ini");
        std::fs::write(
            &ini,
            format!(
                "[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{}\nadmin_username = admin\nadmin_password = {ADMIN_PASSWORD}\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
                auth_dir.join("auth.db").display()
            ),
        )
        .unwrap();
        let mut auth = ServerOptions::new(&auth_dir);
        auth.tied_to_this_process = true;
        auth.app_name = Some("basic-auth".into());
        auth.env = vec![
            ("MLFLOW_AUTH_CONFIG_PATH".into(), ini.display().to_string()),
            ("MLFLOW_FLASK_SERVER_SECRET_KEY".into(), "tunebook-tests".into()),
        ];
        Servers {
            main: Mutex::new(LocalServer::spawn(&main).expect("start the shared MLflow server")),
            auth: Mutex::new(LocalServer::spawn(&auth).expect("start the basic-auth MLflow server")),
        }
    })
}

fn ready(m: &Mutex<LocalServer>) -> String {
    let mut s = m.lock().unwrap_or_else(|e| e.into_inner());
    s.wait_ready(Duration::from_secs(240)).expect("MLflow server ready");
    s.url.clone()
}

fn main_url() -> String {
    ready(&servers().main)
}

fn config(url: &str, auth: Auth) -> MlflowConfig {
    MlflowConfig {
        uri: url.to_string(),
        auth,
        tls: TlsOptions::default(),
        retry: RetryPolicy { connect_wait: Duration::from_secs(2), ..RetryPolicy::default() },
    }
}

fn client(url: &str) -> MlflowClient {
    MlflowClient::with_config(config(url, Auth::None)).unwrap()
}

fn fast() -> TrackerOptions {
    TrackerOptions { poll_interval: Duration::from_millis(50), drain_timeout: Duration::from_secs(90) }
}

fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn start(t: &mut MlflowTracker, dir: &Path, name: &str, experiment: Option<&str>, params: &[(String, String)]) -> Result<()> {
    let tags = kv(&[("team", "support")]);
    t.start(&RunContext { run_dir: dir, run_name: name, experiment, params, tags: &tags })
}

/// Counts per step of one metric's history; panics on a duplicate.
fn steps_once(c: &MlflowClient, run_id: &str, key: &str) -> BTreeSet<i64> {
    let h = c.metric_history(run_id, key).unwrap();
    let steps: BTreeSet<i64> = h.iter().map(|m| m.step).collect();
    assert_eq!(steps.len(), h.len(), "{key}: some step arrived more than once");
    steps
}

#[test]
fn run_lifecycle_params_tags_metrics_artifacts_and_resume() -> Result<()> {
    let url = main_url();
    let c = client(&url);
    let dir = fresh_dir("lifecycle");
    let long: String = (0..13_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let params = kv(&[
        ("base_model", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("lora.r", "8"),
        ("max_new_tokens", "64"),
        ("hub.hf_token", "hf_abcdefghijklmnopqrstuvwxyzABCDEFGH"),
        ("data.template", &long),
        ("weird[key]", "v"),
    ]);
    let mut t = MlflowTracker::with_client(c.clone())?.options(fast());
    start(&mut t, &dir, "lifecycle-run", Some("tunebook-tests"), &params)?;
    let run_id = t.run_id().expect("the run opens at start when the server answers");
    assert!(t.run_url().unwrap().contains(&format!("/#/experiments/")), "{:?}", t.run_url());
    let mut wal = MetricWal::open(&dir)?;
    for step in 0..20 {
        wal.append(&[MetricRecord::now("loss/train/total", 2.0 - step as f64 * 0.05, step), MetricRecord::now("lr", 1e-4, step)])?;
    }
    wal.append(&[MetricRecord::now("metrics/eval/LanguagePerplexity", f64::NAN, 19)])?;
    // Artifacts: one file, one directory.
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, "{\"lr\": 0.0001}")?;
    let evals = dir.join("evals");
    std::fs::create_dir_all(evals.join("sub"))?;
    std::fs::write(evals.join("prompts.jsonl"), "{\"prompt\": \"hi\"}\n")?;
    std::fs::write(evals.join("sub/more.txt"), "more")?;
    t.log_artifact(&cfg, "")?;
    t.log_artifact(&evals, "evals")?;
    t.finish(RunOutcome::Finished)?;

    let run = c.run(&run_id)?;
    assert_eq!(run.info.status, RunStatus::Finished);
    assert!(run.info.end_time.is_some());
    assert_eq!(run.tag("mlflow.runName"), Some("lifecycle-run"));
    assert_eq!(run.tag("mlflow.source.name"), Some("tunebook"));
    assert!(run.tag("mlflow.user").is_some_and(|u| !u.is_empty()));
    assert_eq!(run.tag("tunebook.version"), Some(tunebook::VERSION));
    assert_eq!(run.tag("team"), Some("support"));
    assert_eq!(run.param("lora.r"), Some("8"));
    assert_eq!(run.param("max_new_tokens"), Some("64"));
    assert_eq!(run.param("weird_key_"), Some("v"));
    assert!(run.param("hub.hf_token").is_none(), "secrets are never logged");
    assert!(run.tag(DROPPED_TAG).unwrap().contains("hub.hf_token"));
    assert!(!format!("{:?}", run.data).contains("hf_abcdefghij"));
    let map: HashMap<String, String> = run.data.params.iter().map(|p| (p.key.clone(), p.value.clone())).collect();
    assert_eq!(join_split_value(&map, "data.template").as_deref(), Some(long.as_str()), "a long param comes back whole");
    assert_eq!(steps_once(&c, &run_id, "loss/train/total"), (0..20).collect());
    assert!(c.metric_history(&run_id, "metrics/eval/LanguagePerplexity")?[0].value.is_nan());
    let exp = c.experiment(&run.info.experiment_id)?;
    assert_eq!(exp.name, "tunebook-tests");
    // Artifacts list and come back.
    let root = run.info.artifact_uri.clone().unwrap();
    let listed: Vec<String> = c.list_artifacts_recursive(&root, "")?.into_iter().map(|f| f.path).collect();
    assert_eq!(listed, vec!["config.json", "evals/prompts.jsonl", "evals/sub/more.txt"]);
    let back = fresh_dir("lifecycle-download");
    c.download(&root, "evals", &back)?;
    assert_eq!(std::fs::read_to_string(back.join("sub/more.txt"))?, "more");
    c.download(&root, "config.json", &back)?;
    assert_eq!(std::fs::read_to_string(back.join("config.json"))?, "{\"lr\": 0.0001}");
    // Notebook display links to the run.
    use tunebook::display::Render;
    assert!(run.text_html().unwrap().contains(&format!("#/experiments/{}/runs/{run_id}", run.info.experiment_id)));

    // Resume: the same MLflow run, RUNNING again, then KILLED.
    let mut t = MlflowTracker::with_client(c.clone())?.options(fast());
    start(&mut t, &dir, "lifecycle-run", Some("tunebook-tests"), &params)?;
    assert_eq!(t.run_id().as_deref(), Some(run_id.as_str()));
    assert_eq!(c.run(&run_id)?.info.status, RunStatus::Running);
    let mut wal = MetricWal::open(&dir)?;
    for step in 15..30 {
        // Steps 15..19 were logged before the resume: the log keeps them once.
        wal.append(&[MetricRecord::now("loss/train/total", 1.0, step)])?;
    }
    t.finish(RunOutcome::Killed)?;
    assert_eq!(c.run(&run_id)?.info.status, RunStatus::Killed);
    assert_eq!(steps_once(&c, &run_id, "loss/train/total"), (0..30).collect());

    // A failed run.
    let dir = fresh_dir("lifecycle-failed");
    let mut t = MlflowTracker::with_client(c.clone())?.options(fast());
    start(&mut t, &dir, "failed-run", Some("tunebook-tests"), &[])?;
    t.finish(RunOutcome::Failed)?;
    assert_eq!(c.run(&t.run_id().unwrap())?.info.status, RunStatus::Failed);
    Ok(())
}

#[test]
fn five_thousand_metrics_arrive_exactly_once_and_a_resent_batch_adds_nothing() -> Result<()> {
    let url = main_url();
    let c = client(&url);
    let dir = fresh_dir("five-thousand");
    let mut t = MlflowTracker::with_client(c.clone())?.options(fast());
    start(&mut t, &dir, "five-thousand", Some("tunebook-tests"), &[])?;
    let keys = ["loss/train/total", "lr", "throughput/tokens_per_sec", "metrics/train/LanguagePerplexity", "grad_norm"];
    // The trainer writes while the shipper ships.
    let mut wal = MetricWal::open(&dir)?;
    for chunk in 0..20 {
        let mut recs = Vec::new();
        for step in chunk * 50..(chunk + 1) * 50 {
            for (i, k) in keys.iter().enumerate() {
                recs.push(MetricRecord::now(*k, step as f64 + i as f64 / 10.0, step));
            }
        }
        wal.append(&recs)?;
        std::thread::sleep(Duration::from_millis(20));
    }
    t.finish(RunOutcome::Finished)?;
    assert_eq!(t.progress().shipped, 5000);
    let run_id = t.run_id().unwrap();
    for (i, k) in keys.iter().enumerate() {
        let h = c.metric_history(&run_id, k)?;
        assert_eq!(h.len(), 1000, "{k}");
        assert_eq!(steps_once(&c, &run_id, k), (0..1000).collect(), "{k}");
        assert!(h.iter().all(|m| m.value == m.step as f64 + i as f64 / 10.0), "{k}: values arrive unchanged");
    }
    // A lost answer means the same batches are sent again: the server keeps one copy.
    WalCursor::new(&dir, "mlflow.cursor").store(0)?;
    let report = sync_run(&dir, Some(&url))?;
    assert_eq!(report.run_id, run_id, "sync continues the same run");
    assert_eq!(report.metrics_sent, 5000);
    for k in keys {
        assert_eq!(c.metric_history(&run_id, k)?.len(), 1000, "{k} after re-sending");
    }
    Ok(())
}

#[test]
fn server_down_for_30_seconds_mid_run_loses_and_duplicates_nothing() -> Result<()> {
    let data = scratch().join("server-outage");
    let mut opts = ServerOptions::new(&data);
    opts.tied_to_this_process = true;
    // The run starts while the server is still starting: the tracker says so and
    // opens the MLflow run in the background once it answers.
    let mut server = LocalServer::spawn(&opts)?;
    opts.port = Some(server.port);
    let url = server.url.clone();
    let c = client(&url);
    let dir = fresh_dir("outage");
    let mut t = MlflowTracker::with_client(c.clone())?.options(fast());
    if let Err(e) = start(&mut t, &dir, "outage", Some("tunebook-tests"), &[]) {
        let msg = format!("{e:#}");
        assert!(msg.contains("will be sent when the server answers") && msg.contains("tunebook runs sync outage"), "{msg}");
        assert!(t.run_id().is_none());
    }

    // The training loop: 2 metrics every 20 ms until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let wdir = dir.clone();
    let writer = std::thread::spawn(move || -> Result<(i64, Duration)> {
        let mut wal = MetricWal::open(&wdir)?;
        let (mut step, mut slowest) = (0i64, Duration::ZERO);
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            let t0 = Instant::now();
            wal.append(&[MetricRecord::now("loss/train/total", 1.0 / (step + 1) as f64, step), MetricRecord::now("lr", 1e-4, step)])?;
            slowest = slowest.max(t0.elapsed());
            step += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((step, slowest))
    });
    server.wait_ready(Duration::from_secs(240))?;
    let t0 = Instant::now();
    while t.run_id().is_none() && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let run_id = t.run_id().expect("the run opened once the server answered");
    std::thread::sleep(Duration::from_secs(2));
    server.stop();
    assert!(!server.is_healthy());
    std::thread::sleep(Duration::from_secs(30));
    let during = t.progress();
    assert!(during.last_error.is_some(), "the shipper noticed the outage: {during:?}");
    assert!(!during.caught_up || during.last_error.is_some());
    let mut server = LocalServer::start(&opts)?; // same database, same port
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (steps, slowest) = writer.join().unwrap()?;
    t.finish(RunOutcome::Finished)?;
    assert!(steps > 1000, "the loop kept going during the outage ({steps} steps)");
    // A request to a stopped server would take seconds; a file append takes microseconds.
    assert!(slowest < Duration::from_secs(1), "logging never waited for the server (slowest append {slowest:?})");
    for k in ["loss/train/total", "lr"] {
        assert_eq!(steps_once(&c, &run_id, k), (0..steps).collect(), "{k}: every step exactly once");
    }
    assert_eq!(c.run(&run_id)?.info.status, RunStatus::Finished);
    server.stop();
    Ok(())
}

#[test]
fn basic_auth_server_accepts_the_right_credentials_and_explains_wrong_ones() -> Result<()> {
    let url = ready(&servers().auth);
    let good = MlflowClient::with_config(config(&url, Auth::Basic { username: "admin".into(), password: ADMIN_PASSWORD.into() }))?;
    let dir = fresh_dir("auth");
    let mut t = MlflowTracker::with_client(good.clone())?.options(fast());
    start(&mut t, &dir, "auth-run", Some("auth-tests"), &kv(&[("lr", "1e-4")]))?;
    MetricWal::open(&dir)?.append(&[MetricRecord::now("loss/train/total", 1.5, 1)])?;
    t.finish(RunOutcome::Finished)?;
    let run = good.run(&t.run_id().unwrap())?;
    assert_eq!(run.info.status, RunStatus::Finished);
    assert_eq!(good.metric_history(&run.info.run_id, "loss/train/total")?.len(), 1);

    let wrong = MlflowClient::with_config(config(&url, Auth::Basic { username: "admin".into(), password: "wrong".into() }))?;
    let e = wrong.experiment_by_name("auth-tests").unwrap_err();
    let m = e.downcast_ref::<MlflowError>().expect("an MlflowError");
    assert_eq!(m.status(), Some(401));
    let msg = format!("{e:#}");
    assert!(msg.contains("refused the credentials") && msg.contains("MLFLOW_TRACKING_PASSWORD"), "{msg}");
    assert!(msg.contains("not authenticated"), "the server's own words are kept: {msg}");

    let anonymous = client(&url);
    let msg = format!("{:#}", anonymous.experiments(10).unwrap_err());
    assert!(msg.contains("asks for credentials") && msg.contains("MLFLOW_TRACKING_USERNAME"), "{msg}");

    // A tracker with wrong credentials says so at start, at once.
    let t0 = Instant::now();
    let mut t = MlflowTracker::with_client(wrong)?.options(fast());
    let e = start(&mut t, &fresh_dir("auth-wrong"), "auth-wrong", None, &[]).unwrap_err();
    assert!(format!("{e:#}").contains("refused the credentials"), "{e:#}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    Ok(())
}

#[test]
fn errors_name_what_went_wrong() -> Result<()> {
    let url = main_url();
    // Wrong path prefix: an HTML 404 page from the server.
    let c = client(&format!("{url}/not-mlflow"));
    let msg = format!("{:#}", c.experiments(1).unwrap_err());
    assert!(msg.contains("404") && msg.contains("an MLflow server"), "{msg}");
    // A JSON error keeps MLflow's code and message.
    let e = client(&url).run("0123456789abcdef0123456789abcdef").unwrap_err();
    assert!(e.downcast_ref::<MlflowError>().unwrap().is_not_found(), "{e:#}");
    // Nothing listening: a quick, clear error.
    let port = tunebook::mlflow::server::free_port()?;
    let t0 = Instant::now();
    let msg = format!("{:#}", client(&format!("http://127.0.0.1:{port}")).experiments(1).unwrap_err());
    assert!(msg.contains("tunebook mlflow up"), "{msg}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    Ok(())
}

/// A word-level tokenizer for the 64-token tiny model, with a chat template.
fn write_tiny_tokenizer(dir: &Path) -> Result<()> {
    let specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"];
    let words = "hello world where is my order the a to you it and of in for on with how can i help thanks please what when why who this that not yes no good bad time day ship box refund track package late soon now today open close help desk store price pay card cart item size color red blue green fast slow free".split(' ');
    let mut vocab = serde_json::Map::new();
    for w in specials.iter().map(|s| s.to_string()).chain(words.map(String::from)).chain((0..).map(|i| format!("w{i}"))) {
        if vocab.len() == 64 {
            break;
        }
        let id = vocab.len();
        vocab.entry(w).or_insert(serde_json::json!(id));
    }
    assert_eq!(vocab.len(), 64);
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tok)?)?;
    let cfg = serde_json::json!({
        "bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}",
    });
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string(&cfg)?)?;
    Ok(())
}

fn tiny_chat_model(dir: &Path, seed: u64) -> Result<()> {
    write_tiny_model(dir, LlamaConfig::tiny(), seed)?;
    write_tiny_tokenizer(dir)
}

/// What a model says: greedy ids of a chat reply and of a plain continuation,
/// 12 tokens each, EOS ignored so the comparison always has something to compare.
fn answers(m: &Model) -> Result<(Vec<u32>, Vec<u32>)> {
    let cfg = GenerationConfig { ignore_eos: true, ..GenerationConfig::greedy(12) };
    let chat = m.chat_with(&[tunebook::tokenize::Message::user("where is my order")], &cfg, |_| {})?;
    let plain = m.generate_with("hello world", &cfg, |_| {})?;
    assert_eq!(chat.ids.len(), 12);
    Ok((chat.ids, plain.ids))
}

#[test]
fn registered_models_with_dotted_names_versions_and_aliases_load_back_and_chat() -> Result<()> {
    let url = main_url();
    let c = client(&url);
    let cache = fresh_dir("registry-cache");
    let reg = Registry::with_client(c.clone()).cache_dir(&cache);
    // Two runs, two different models.
    let mut logged = Vec::new();
    for (i, seed) in [(1, 11u64), (2, 22)] {
        let dir = fresh_dir(&format!("registry-run{i}"));
        tiny_chat_model(&dir.join("model"), seed)?;
        let mut t = MlflowTracker::with_client(c.clone())?.options(fast());
        start(&mut t, &dir, "support-bot", Some("tunebook-tests"), &[])?;
        if i == 1 {
            // catalog.schema: the model is named after the run.
            assert_eq!(log_model(&mut t, &dir, &dir.join("model"), Some("main.support"))?.as_deref(), Some("main.support.support-bot/1"));
        }
        let target = if i == 1 { "main.support.bot@champion" } else { "main.support.bot@champion,challenger" };
        let v = log_model(&mut t, &dir, &dir.join("model"), Some(target))?;
        assert_eq!(v, Some(format!("main.support.bot/{i}")));
        let state = t.state().unwrap();
        t.finish(RunOutcome::Finished)?;
        logged.push((dir, state));
    }
    let versions = reg.versions("main.support.bot")?;
    assert_eq!(versions.iter().map(|v| v.version.as_str()).collect::<Vec<_>>(), vec!["1", "2"]);
    for (v, (_, state)) in versions.iter().zip(&logged) {
        assert_eq!(v.run_id.as_deref(), Some(state.run_id.as_str()), "each version links to its run");
        assert_eq!(v.source.as_deref(), Some(format!("models:/{}", state.logged_model_id.as_ref().unwrap()).as_str()));
    }
    let mut aliases = versions[1].aliases.clone();
    aliases.sort();
    assert_eq!(aliases, vec!["challenger", "champion"]);
    assert!(versions[0].aliases.is_empty(), "{versions:?}");
    reg.set_alias("main.support.bot", "stable", "1")?;
    assert_eq!(reg.resolve("main.support.bot@stable")?.version, "1");
    assert_eq!(reg.resolve("models:/main.support.bot@champion")?.version, "2");
    assert_eq!(reg.resolve("main.support.bot")?.version, "2", "no selector: the newest version");

    // Loaded back, each version answers exactly like the model that was trained.
    let local1 = answers(&Model::load(&logged[0].0.join("model").to_string_lossy())?)?;
    let local2 = answers(&Model::load(&logged[1].0.join("model").to_string_lossy())?)?;
    assert_ne!(local1, local2);
    assert_eq!(answers(&reg.load_model("main.support.bot@champion")?)?, local2);
    assert_eq!(answers(&reg.load_model("models:/main.support.bot/1")?)?, local1);
    assert_eq!(answers(&reg.load_model("main.support.bot@stable")?)?, local1);
    assert_eq!(answers(&reg.load_model("main.support.support-bot/1")?)?, local1);
    reg.load_model("main.support.bot/2")?.chat(&[tunebook::tokenize::Message::user("hello")])?;
    let dir = reg.download("main.support.bot/2")?;
    assert!(dir.starts_with(&cache) && dir.join(".complete").is_file() && dir.join("MLmodel").is_file());
    assert!(dir.join("components/tokenizer/tokenizer.json").is_file() && dir.join("model/model.safetensors").is_file());

    // A missing alias says which ones exist.
    let msg = format!("{:#}", reg.load_model("main.support.bot@nope").unwrap_err());
    assert!(msg.contains("@champion") && msg.contains("@stable"), "{msg}");

    // Notebook display links into the UI.
    use tunebook::display::Render;
    let v = reg.resolve("main.support.bot@champion")?;
    assert!(v.text_html().unwrap().contains(&format!("{url}/#/models/main.support.bot/versions/2")));

    // Python MLflow resolves the same name and reads the MLmodel.
    let python = tunebook::mlflow::server::find_mlflow()?.with_file_name("python");
    let out = std::process::Command::new(&python)
        .env("MLFLOW_TRACKING_URI", &url)
        .arg("-c")
        .arg(
            "import mlflow, sys\n\
             p = mlflow.artifacts.download_artifacts('models:/main.support.bot@champion', dst_path=sys.argv[1])\n\
             m = mlflow.models.Model.load(p)\n\
             t = m.flavors['transformers']\n\
             print(m.flavors['python_function']['loader_module'], t['task'], t['model_binary'], t['components'])",
        )
        .arg(scratch().join("python-download"))
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim(), "mlflow.transformers text-generation model ['tokenizer']");
    Ok(())
}

#[test]
fn a_registered_peft_adapter_loads_on_its_base() -> Result<()> {
    let url = main_url();
    let c = client(&url);
    let dir = fresh_dir("adapter");
    let base = dir.join("base");
    tiny_chat_model(&base, 5)?;
    let mut llama = LlamaModel::from_hf_dir(&base, &candle_core::Device::Cpu, candle_core::DType::F32)?;
    let lcfg = Lora { r: 4, alpha: 8.0, dropout: 0.0, ..Lora::default() }.all_linear();
    llama.add_lora(&lcfg)?;
    for layer in &llama.layers {
        for (_, lin) in layer.linears() {
            let l = lin.lora.as_ref().unwrap();
            let dims = l.b.dims().to_vec();
            let n: usize = dims.iter().product();
            let vals: Vec<f32> = (0..n).map(|i| ((i * 7919 % 13) as f32 - 6.0) * 0.05).collect();
            l.b.set(&candle_core::Tensor::from_vec(vals, dims, &candle_core::Device::Cpu)?)?;
        }
    }
    let adapter = dir.join("model");
    llama.save_lora(&adapter, &lcfg, &base.to_string_lossy())?;
    write_tiny_tokenizer(&adapter)?;
    let expected = answers(&Model::new(llama, Model::load(&base.to_string_lossy())?.tokenizer))?;
    assert_ne!(expected, answers(&Model::load(&base.to_string_lossy())?)?, "the adapter changes the answers");

    let mut t = MlflowTracker::with_client(c.clone())?.options(fast());
    start(&mut t, &dir, "adapter-run", Some("tunebook-tests"), &[])?;
    assert_eq!(log_model(&mut t, &dir, &adapter, Some("main.support.adapter@champion"))?.as_deref(), Some("main.support.adapter/1"));
    t.finish(RunOutcome::Finished)?;
    let reg = Registry::with_client(c).cache_dir(fresh_dir("adapter-cache"));
    let dl = reg.download("main.support.adapter@champion")?;
    let mlmodel = std::fs::read_to_string(dl.join("MLmodel"))?;
    assert!(mlmodel.contains("peft_adaptor: \"peft\""), "{mlmodel}");
    assert!(dl.join("peft/adapter_model.safetensors").is_file());
    // The local base travels with the adapter (Hugging Face layout under model/), so the
    // registered model loads where that folder does not exist.
    assert!(mlmodel.contains("model_binary: \"model\"") && !mlmodel.contains("local_base_model_path"), "{mlmodel}");
    assert!(dl.join("model/config.json").is_file() && dl.join("model/model.safetensors").is_file());
    assert_eq!(answers(&reg.load_model("main.support.adapter@champion")?)?, expected);
    std::fs::rename(&base, dir.join("base-moved"))?;
    let elsewhere = Registry::with_client(client(&url)).cache_dir(fresh_dir("adapter-cache-2"));
    let loaded = elsewhere.load_model("main.support.adapter/1")?;
    assert!(loaded.llama.has_lora(), "the adapter stays unmerged on the uploaded base");
    assert_eq!(answers(&loaded)?, expected);

    // An exported file attached to the version comes back by name; a full download skips it.
    let gguf = dir.join("adapter-q8_0.gguf");
    std::fs::write(&gguf, b"GGUF stand-in bytes")?;
    let v = elsewhere.attach_file("main.support.adapter@champion", &gguf, "gguf/adapter-q8_0.gguf")?;
    assert_eq!(v.reference(), "main.support.adapter/1");
    assert_eq!(elsewhere.gguf_files("main.support.adapter/1")?, vec!["adapter-q8_0.gguf".to_string()]);
    let back = Registry::with_client(client(&url)).cache_dir(fresh_dir("adapter-cache-3")).download_gguf("main.support.adapter/1", None)?;
    assert_eq!(std::fs::read(back)?, b"GGUF stand-in bytes");
    let err = elsewhere.download_gguf("main.support.adapter/1", Some("other.gguf")).unwrap_err().to_string();
    assert!(err.contains("no attached GGUF named \"other.gguf\"") && err.contains("adapter-q8_0.gguf"), "{err}");
    let fresh = Registry::with_client(client(&url)).cache_dir(fresh_dir("adapter-cache-4")).download("main.support.adapter/1")?;
    assert!(!fresh.join("gguf").exists(), "a model download does not fetch attached exports");
    Ok(())
}

#[test]
fn an_offline_run_syncs_later_with_its_model_and_status() -> Result<()> {
    let url = main_url();
    let c = client(&url);
    let dir = fresh_dir("offline");
    // What the trainer leaves in a run directory when no server was configured.
    std::fs::write(
        dir.join("tracking.json"),
        serde_json::json!({"run_name": "offline-run", "experiment": "tunebook-tests", "tracking_uri": null,
                           "register_to": "main.offline@champion", "params": [["lr", "0.0001"], ["api_key", "x"]], "tags": [["source", "test"]]})
        .to_string(),
    )?;
    std::fs::write(dir.join("status.json"), r#"{"status": "COMPLETED"}"#)?;
    let mut wal = MetricWal::open(&dir)?;
    for step in 0..1500 {
        wal.append(&[MetricRecord::now("loss/train/total", 1.0, step)])?;
    }
    tiny_chat_model(&dir.join("model"), 3)?;
    let report = tunebook::train::sync(dir.to_str().unwrap(), Some(&url))?;
    assert_eq!(report.metrics_sent, 1500);
    assert_eq!(report.status, Some(RunStatus::Finished));
    assert_eq!(report.registered.as_deref(), Some("main.offline.offline-run/1"));
    let run = c.run(&report.run_id)?;
    assert_eq!(run.info.status, RunStatus::Finished);
    assert_eq!(run.param("lr"), Some("0.0001"));
    assert!(run.param("api_key").is_none());
    assert_eq!(run.tag("source"), Some("test"));
    assert_eq!(steps_once(&c, &report.run_id, "loss/train/total").len(), 1500);
    assert_eq!(Registry::with_client(c.clone()).resolve("main.offline.offline-run@champion")?.version, "1");
    // Again: nothing new is sent, logged or registered.
    let again = tunebook::train::sync(dir.to_str().unwrap(), Some(&url))?;
    assert_eq!((again.metrics_sent, again.run_id.as_str()), (0, report.run_id.as_str()));
    assert_eq!(again.registered, report.registered);
    assert_eq!(Registry::with_client(c).versions("main.offline.offline-run")?.len(), 1);
    Ok(())
}

/// The whole product path: `tunebook train CONFIG.toml` (the real trainer, in its own
/// process) tracking to the shared server and registering the result, which then
/// loads back from the registry and answers like the run's own model.
#[test]
fn tunebook_train_tracks_to_mlflow_and_registers_the_model() -> Result<()> {
    let url = main_url();
    let c = client(&url);
    let dir = fresh_dir("train-e2e");
    let base = dir.join("base");
    write_tiny_model(&base, LlamaConfig { vocab_size: 705, bos_token_id: Some(0), eos_token_ids: vec![4], ..LlamaConfig::tiny() }, 7)?;
    let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny_tokenizer");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok.join(f), base.join(f))?;
    }
    let rows: String = (0..24)
        .map(|i| {
            let c = ["red", "green", "blue"][i % 3];
            serde_json::json!({"messages": [{"role": "user", "content": format!("say {c} {i}")}, {"role": "assistant", "content": format!("{c} {c}")}]})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.join("train.jsonl"), rows)?;
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            "model = {:?}\ntrain_data = {:?}\nname = \"e2e-bot\"\ntraining_duration = \"12ba\"\nlearning_rate = 1e-2\ncontext_length = 48\n\
             batch_size = 2\ncheckpoint_every = 6\nlog_checkpoints = true\nseed = 3\nexperiment = \"tunebook-train\"\ntracking_uri = {url:?}\n\
             register_to = \"main.e2e@champion\"\n[lora]\nr = 4\nalpha = 8.0\ndropout = 0.0\n",
            base.display().to_string(),
            dir.join("train.jsonl").display().to_string()
        ),
    )?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunebook"))
        .arg("train")
        .arg(&config)
        .env("TUNEBOOK_RUNS", dir.join("runs"))
        .env_remove("MLFLOW_TRACKING_URI")
        .env("TUNEBOOK_MLFLOW_POLL_MS", "50")
        .output()?;
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let run_dir = dir.join("runs/e2e-bot");
    let state: tunebook::track::MlflowState = serde_json::from_str(&std::fs::read_to_string(run_dir.join("mlflow.json"))?)?;
    let run = c.run(&state.run_id)?;
    assert_eq!(run.info.status, RunStatus::Finished);
    assert_eq!(run.tag("mlflow.runName"), Some("e2e-bot"));
    assert_eq!(run.param("training_duration"), Some("12ba"));
    assert_eq!(c.experiment(&run.info.experiment_id)?.name, "tunebook-train");
    // Every step's loss, once, as the local log has it.
    let (local, _) = tunebook::track::wal::read_from(&run_dir, 0, usize::MAX)?;
    let local_losses: Vec<(i64, f64)> = local.iter().filter(|r| r.key == "loss/train/total").map(|r| (r.step, r.value)).collect();
    assert_eq!(local_losses.len(), 12);
    let mut remote: Vec<(i64, f64)> = c.metric_history(&state.run_id, "loss/train/total")?.iter().map(|m| (m.step, m.value)).collect();
    remote.sort_by_key(|x| x.0);
    assert_eq!(remote, local_losses);
    let files: Vec<String> = c.list_artifacts_recursive(run.info.artifact_uri.as_deref().unwrap(), "")?.into_iter().map(|f| f.path).collect();
    for f in ["config.toml", "data_report.json", "plots/loss.svg", "checkpoints/step-00000006/optimizer.safetensors", "checkpoints/step-00000012/trainer_state.json"] {
        assert!(files.contains(&f.to_string()), "{f} missing from {files:?}");
    }
    // Registered and loadable: the adapter on its base answers like the run's model.
    let reg = Registry::with_client(c).cache_dir(fresh_dir("train-e2e-cache"));
    let v = reg.resolve("main.e2e.e2e-bot@champion")?;
    assert_eq!(v.run_id.as_deref(), Some(state.run_id.as_str()));
    let expected = answers(&Model::load(&run_dir.join("model").to_string_lossy())?)?;
    assert_eq!(answers(&reg.load_model("main.e2e.e2e-bot@champion")?)?, expected);
    Ok(())
}
