//! Data module tests: real files and real Delta tables in temporary folders.

use super::*;
use crate::display::{Render, VEGA_LITE_MIME};
use crate::tokenize::{Message, Tokenizer};
use serde_json::json;
use std::path::{Path, PathBuf};

fn tiny_tokenizer() -> Tokenizer {
    Tokenizer::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny_tokenizer")).unwrap()
}

fn write_jsonl(dir: &Path, name: &str, rows: &[serde_json::Value]) -> PathBuf {
    let p = dir.join(name);
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&p, text).unwrap();
    p
}

fn chat(turns: &[(&str, &str)]) -> serde_json::Value {
    json!({"messages": turns.iter().map(|(r, c)| json!({"role": r, "content": c})).collect::<Vec<_>>()})
}

fn good_chat(i: usize) -> serde_json::Value {
    chat(&[("user", &format!("question {i}?")), ("assistant", &format!("answer {i}."))])
}

fn contents(ds: &Dataset) -> Vec<String> {
    let (examples, _) = ds.examples().unwrap();
    examples
        .into_iter()
        .map(|e| match e {
            Some(validate::Example::Chat(m)) => m.iter().map(|m| m.content.clone()).collect::<Vec<_>>().join("|"),
            other => format!("{other:?}"),
        })
        .collect()
}

// ---------------------------------------------------------------- sources

#[test]
fn delta_create_append_overwrite_and_time_travel() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("chats");
    let src = write_jsonl(dir.path(), "a.jsonl", &(0..3).map(good_chat).collect::<Vec<_>>());
    let first = Dataset::from_jsonl(&src).unwrap();
    assert_eq!(Dataset::delta_version(&table).unwrap(), None);
    assert_eq!(first.to_delta(&table, WriteMode::Create).unwrap(), 0);
    let err = first.to_delta(&table, WriteMode::Create).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(first.to_delta(&table, WriteMode::Append).unwrap(), 1);
    let second = Dataset::from_jsonl(write_jsonl(dir.path(), "b.jsonl", &[good_chat(7), good_chat(8)])).unwrap();
    assert_eq!(second.to_delta(&table, WriteMode::Overwrite).unwrap(), 2);
    assert_eq!(Dataset::delta_version(&table).unwrap(), Some(2));

    let latest = Dataset::from_delta(&table).unwrap();
    assert_eq!(latest.detect_task().unwrap(), Task::Chat);
    let mut got = contents(&latest);
    got.sort();
    assert_eq!(got, vec!["question 7?|answer 7.", "question 8?|answer 8."]);
    assert!(latest.validate().unwrap().is_valid());

    let v0 = Dataset::from_delta_version(&table, 0).unwrap();
    let mut got = contents(&v0);
    got.sort();
    assert_eq!(got, vec!["question 0?|answer 0.", "question 1?|answer 1.", "question 2?|answer 2."]);
    assert_eq!(Dataset::from_delta_version(&table, 1).unwrap().len(), 6);
    assert_eq!(Dataset::open(&format!("{}@v1", table.display())).unwrap().len(), 6);

    // the overwrite is one commit that removes the earlier files
    let log = std::fs::read_to_string(table.join("_delta_log/00000000000000000002.json")).unwrap();
    assert_eq!(log.matches("\"remove\"").count(), 2, "{log}");
    assert!(log.contains("Overwrite"));

    let now = chrono::Utc::now().to_rfc3339();
    assert_eq!(Dataset::from_delta_timestamp(&table, &now).unwrap().len(), 2);
    assert!(Dataset::from_delta_timestamp(&table, "2001-01-01T00:00:00Z").is_err());
    assert!(Dataset::from_delta_version(&table, 9).is_err());
}

#[test]
fn delta_round_trips_instruction_and_empty_tables() {
    let dir = tempfile::tempdir().unwrap();
    let df = polars::df!("prompt" => ["a", "b"], "response" => ["x", "y"], "score" => [1i64, 2]).unwrap();
    let table = dir.path().join("ins");
    Dataset::from_polars(df.clone()).to_delta(&table, WriteMode::Append).unwrap();
    let back = Dataset::from_delta(&table).unwrap();
    assert_eq!(back.detect_task().unwrap(), Task::Instruction);
    let back = back.df().sort(["prompt"], Default::default()).unwrap();
    assert!(back.equals(&df), "{back}");
    // overwrite with no rows leaves an empty table with the same columns
    Dataset::from_polars(df.clear()).to_delta(&table, WriteMode::Overwrite).unwrap();
    let empty = Dataset::from_delta(&table).unwrap();
    assert_eq!(empty.len(), 0);
    assert_eq!(empty.df().width(), 3);
}

#[test]
fn delta_partition_columns_come_back() {
    use deltalake::writer::{DeltaWriter, RecordBatchWriter};
    // a table partitioned by `split`: the partition value lives in the folder
    // names and the log, not in the parquet files, so only a real Delta read keeps it
    let dir = tempfile::tempdir().unwrap();
    let table_path = dir.path().join("parts");
    std::fs::create_dir_all(&table_path).unwrap();
    let df = polars::df!("text" => ["a", "b", "c"], "split" => ["train", "eval", "train"]).unwrap();
    let batch = arrow_bridge::df_to_batch(&df).unwrap();
    let url = deltalake::ensure_table_uri(table_path.to_str().unwrap()).unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
        let schema: deltalake::kernel::StructType = batch.schema().as_ref().try_into_kernel().unwrap();
        let mut table = deltalake::DeltaTable::try_from_url(url)
            .await
            .unwrap()
            .create()
            .with_columns(schema.fields().cloned())
            .with_partition_columns(["split"])
            .await
            .unwrap();
        let mut w = RecordBatchWriter::for_table(&table).unwrap();
        w.write(batch).await.unwrap();
        w.flush_and_commit(&mut table).await.unwrap();
    });
    assert!(table_path.join("split=train").is_dir());
    let ds = Dataset::from_delta(&table_path).unwrap();
    let mut rows: Vec<(String, String)> = {
        let text = ds.df().column("text").unwrap().as_materialized_series().clone();
        let split = ds.df().column("split").unwrap().as_materialized_series().clone();
        text.iter()
            .zip(split.iter())
            .map(|(t, s)| (validate::any_to_json(t).to_string(), validate::any_to_json(s).to_string()))
            .collect()
    };
    rows.sort();
    assert_eq!(rows, vec![
        ("\"a\"".to_string(), "\"train\"".to_string()),
        ("\"b\"".to_string(), "\"eval\"".to_string()),
        ("\"c\"".to_string(), "\"train\"".to_string()),
    ]);
    // appending through Dataset keeps the partitioning
    Dataset::from_polars(polars::df!("text" => ["d"], "split" => ["eval"]).unwrap()).to_delta(&table_path, WriteMode::Append).unwrap();
    assert_eq!(Dataset::from_delta(&table_path).unwrap().len(), 4);
    assert!(std::fs::read_dir(table_path.join("split=eval")).unwrap().count() >= 2);
}

#[test]
fn not_a_delta_table_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Dataset::from_delta(dir.path()).unwrap_err();
    assert!(err.to_string().contains("_delta_log"), "{err}");
}

#[test]
fn jsonl_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.jsonl");
    std::fs::write(&p, format!("{}\n\n{}\n{{\"messages\": [\n", good_chat(0), good_chat(1))).unwrap();
    match Dataset::from_jsonl(&p) {
        Err(DataError::Parse { line, message, .. }) => {
            assert_eq!(line, 4);
            assert!(message.contains("one complete JSON object"), "{message}");
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
    std::fs::write(&p, format!("\u{feff}{}\r\n{}\r\n", good_chat(0), good_chat(1))).unwrap();
    assert_eq!(Dataset::from_jsonl(&p).unwrap().len(), 2, "a byte order mark and CRLF line ends are fine");
    std::fs::write(&p, "[1, 2]\n").unwrap();
    let err = Dataset::from_jsonl(&p).unwrap_err().to_string();
    assert!(err.contains("line 1") && err.contains("found an array"), "{err}");
    assert!(Dataset::from_jsonl(dir.path().join("missing.jsonl")).is_err());
}

#[test]
fn parquet_csv_and_folders() {
    let dir = tempfile::tempdir().unwrap();
    let mut df = polars::df!("prompt" => ["p1", "p2"], "completion" => ["c1", "c2"]).unwrap();
    let pq = dir.path().join("d.parquet");
    ParquetWriter::new(std::fs::File::create(&pq).unwrap()).finish(&mut df).unwrap();
    let ds = Dataset::from_parquet(&pq).unwrap();
    assert!(ds.df().equals(&df));
    assert_eq!(ds.detect_task().unwrap(), Task::Instruction);
    assert!(ds.validate().unwrap().is_valid());
    assert_eq!(Dataset::open(pq.to_str().unwrap()).unwrap().len(), 2);

    // chat in CSV: messages as JSON text
    let csv = dir.path().join("chat.csv");
    let m = serde_json::to_string(&good_chat(1)["messages"]).unwrap().replace('"', "\"\"");
    std::fs::write(&csv, format!("id,messages\n1,\"{m}\"\n2,\"[{{\"\"role\"\": \"\"user\"\"}}]\"\n")).unwrap();
    let ds = Dataset::from_csv(&csv).unwrap();
    assert_eq!(ds.detect_task().unwrap(), Task::Chat);
    let report = ds.validate().unwrap();
    assert_eq!(report.valid_rows, 1);
    assert!(report.problems.iter().all(|p| p.row == Some(1)));

    // folder of jsonl files
    let sub = dir.path().join("many");
    std::fs::create_dir(&sub).unwrap();
    write_jsonl(&sub, "1.jsonl", &[good_chat(1)]);
    write_jsonl(&sub, "2.jsonl", &[good_chat(2), good_chat(3)]);
    assert_eq!(Dataset::open(sub.to_str().unwrap()).unwrap().len(), 3);
}

#[test]
fn text_folders_read_every_txt_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("b/c")).unwrap();
    std::fs::write(dir.path().join("a.txt"), "first").unwrap();
    std::fs::write(dir.path().join("b/c/d.txt"), "second\nline").unwrap();
    std::fs::write(dir.path().join("b/skip.md"), "not text data").unwrap();
    let ds = Dataset::from_text_dir(dir.path()).unwrap();
    assert_eq!(ds.detect_task().unwrap(), Task::Text);
    assert_eq!(ds.len(), 2);
    assert_eq!(contents(&ds), vec!["Some(Text(\"first\"))", "Some(Text(\"second\\nline\"))"]);
    assert_eq!(Dataset::open(dir.path().to_str().unwrap()).unwrap().len(), 2);
    std::fs::write(dir.path().join("bad.txt"), [0xffu8, 0xfe, 0x00]).unwrap();
    let err = Dataset::from_text_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("bad.txt") && err.contains("UTF-8"), "{err}");
    let empty = tempfile::tempdir().unwrap();
    assert!(Dataset::from_text_dir(empty.path()).is_err());
}

#[test]
fn task_detection_and_column_mapping() {
    let df = polars::df!("conversation" => ["[]"], "q" => ["x"], "a" => ["y"]).unwrap();
    let ds = Dataset::from_polars(df);
    let err = ds.detect_task().unwrap_err().to_string();
    assert!(err.contains("conversation") && err.contains(".columns("), "{err}");
    let report = ds.validate().unwrap();
    assert_eq!(report.count(Rule::MissingColumn), 1);
    let ins = ds.clone().columns(Columns::default().prompt("q").response("a"));
    assert_eq!(ins.detect_task().unwrap(), Task::Instruction);
    assert!(ins.validate().unwrap().is_valid());
    let chat = ds.clone().columns(Columns::default().messages("conversation"));
    assert_eq!(chat.detect_task().unwrap(), Task::Chat);
    let forced = ds.task(Task::Text);
    let r = forced.validate().unwrap();
    assert_eq!(r.problems[0].rule, Rule::MissingColumn);
    assert_eq!(r.problems[0].field, "text");
    assert!("CONTINUED_PRETRAIN".parse::<Task>().unwrap() == Task::Text);
    assert!("nope".parse::<Task>().is_err());
}

// ------------------------------------------------------------- validation

/// One malformed conversation per rule, each next to a valid one, read from JSONL.
#[test]
fn one_malformed_input_per_rule() {
    let cases: Vec<(Rule, serde_json::Value, &str)> = vec![
        (Rule::NullMessages, json!({"messages": null}), "messages"),
        (Rule::WrongType, json!({"messages": "hello"}), "messages"),
        (Rule::WrongType, json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}), "messages[1].content"),
        (Rule::TooFewMessages, chat(&[("assistant", "alone")]), "messages"),
        (Rule::MessageKeys, json!({"messages": [{"role": "user", "content": "hi", "name": "bob"}, {"role": "assistant", "content": "yo"}]}), "messages[0].name"),
        (Rule::MessageKeys, json!({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}), "messages[0].role"),
        (Rule::UnknownRole, chat(&[("human", "hi"), ("assistant", "yo")]), "messages[0].role"),
        (Rule::SystemNotFirst, chat(&[("user", "hi"), ("system", "be nice"), ("assistant", "yo")]), "messages[1].role"),
        (Rule::ConsecutiveRoles, chat(&[("user", "hi"), ("user", "again"), ("assistant", "yo")]), "messages[1].role"),
        (Rule::LastNotAssistant, chat(&[("user", "hi"), ("assistant", "yo"), ("user", "bye")]), "messages[2].role"),
        (Rule::EmptyContent, chat(&[("user", "   "), ("assistant", "yo")]), "messages[0].content"),
        (Rule::EmptyContent, json!({"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "yo"}]}), "messages[0].content"),
    ];
    for (rule, bad, field) in cases {
        let dir = tempfile::tempdir().unwrap();
        let p = write_jsonl(dir.path(), "d.jsonl", &[good_chat(0), bad.clone()]);
        let ds = match Dataset::from_jsonl(&p) {
            Ok(ds) => ds,
            // polars cannot hold every mix of types in one column: the rows then go through JSON text
            Err(_) => {
                let lines: Vec<String> = [good_chat(0), bad.clone()].iter().map(|r| r["messages"].to_string()).collect();
                Dataset::from_polars(polars::df!("messages" => lines).unwrap())
            }
        };
        let report = ds.validate().unwrap();
        assert!(!report.is_valid(), "{rule}: {bad} passed");
        let p = report.problems.iter().find(|p| p.rule == rule).unwrap_or_else(|| panic!("{rule} not reported for {bad}: {report:?}"));
        assert_eq!(p.row, Some(1), "{rule}");
        assert_eq!(p.field, field, "{rule}: {p}");
        assert!(!p.fix.is_empty() && !p.message.is_empty());
        assert_eq!(report.valid_rows, 1, "{rule}: the good row stays valid");
        assert!(report.problems.iter().all(|p| p.row == Some(1)), "{rule}: no false positive on the good row: {report:?}");
        match ds.validate_strict() {
            Err(DataError::Invalid(r)) => {
                let msg = DataError::Invalid(r).to_string();
                assert!(msg.contains("row 1") && msg.contains("Fix:"), "{msg}");
            }
            other => panic!("strict mode let {rule} through: {other:?}"),
        }
    }
}

#[test]
fn sliced_and_shuffled_frames_validate_the_right_rows() {
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<serde_json::Value> =
        (0..6).map(|i| if i % 3 == 2 { chat(&[("user", "no answer")]) } else { good_chat(i) }).collect();
    let ds = Dataset::from_jsonl(write_jsonl(dir.path(), "d.jsonl", &rows)).unwrap();
    let sliced = Dataset::from_polars(ds.df().slice(1, 5)); // rows 1..6: the bad rows 2 and 5 become 1 and 4
    let r = sliced.validate().unwrap();
    let bad: Vec<usize> = r.problems.iter().filter_map(|p| p.row).collect();
    assert_eq!(bad.iter().copied().collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>(), vec![1, 4]);
    assert_eq!(contents(&sliced)[0], "question 1?|answer 1.");
    let shuffled = ds.shuffle(5);
    assert_eq!(shuffled.validate().unwrap().invalid_rows(), 2);
    // type problems only visible while reading JSONL follow their rows through a shuffle
    let mixed = Dataset::from_jsonl(write_jsonl(dir.path(), "m.jsonl", &[good_chat(0), json!({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": 7}]}), good_chat(2)])).unwrap();
    let r = mixed.validate().unwrap();
    assert_eq!((r.count(Rule::WrongType), r.problems[0].row), (1, Some(1)));
    for seed in 0..5 {
        let s = mixed.shuffle(seed);
        let r = s.validate().unwrap();
        let row = r.problems[0].row.unwrap();
        let messages = s.df().column("messages").unwrap().as_materialized_series().get(row).unwrap();
        let messages = validate::any_to_json(messages);
        assert_eq!(messages[1]["content"], "7", "seed {seed}: the problem stays on the row holding the number");
    }
}

#[test]
fn instruction_and_text_rules() {
    let df = polars::df!("prompt" => [Some("p"), Some(""), None], "response" => [Some("r"), Some("r"), Some("r")]).unwrap();
    let r = Dataset::from_polars(df).validate().unwrap();
    assert_eq!(r.valid_rows, 1);
    assert_eq!(r.count(Rule::EmptyContent), 2);
    assert_eq!(r.problems[0].row, Some(1));
    assert_eq!(r.problems[0].field, "prompt");
    let df = polars::df!("text" => [1i64, 2]).unwrap();
    let r = Dataset::from_polars(df).validate().unwrap();
    assert_eq!(r.count(Rule::WrongType), 2);
    let df = polars::df!("prompt" => ["p"]).unwrap();
    let r = Dataset::from_polars(df).task(Task::Instruction).validate().unwrap();
    assert_eq!(r.count(Rule::MissingColumn), 1);
    assert_eq!(r.problems[0].field, "response");
    let counts = r.counts_table();
    assert_eq!(counts.rows[0][0], "missing_column");
}

#[test]
fn template_rejection_is_reported_not_raised() {
    let tok = tiny_tokenizer()
        .with_chat_template("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}{{ m.content }}{% endfor %}")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = write_jsonl(dir.path(), "d.jsonl", &[good_chat(0), chat(&[("system", "s"), ("user", "u"), ("assistant", "a")])]);
    let t = Dataset::from_jsonl(p).unwrap().tokenize(&tok, &PrepareOptions::default()).unwrap();
    assert_eq!(t.examples.len(), 1);
    assert_eq!(t.problems.len(), 1);
    assert_eq!(t.problems[0].rule, Rule::TemplateRejected);
    assert!(t.problems[0].message.contains("no system role"));
}

#[test]
fn malformed_rows_never_panic() {
    let weird = vec![
        json!({"messages": [[1, 2], {"role": {"x": 1}, "content": [1]}]}),
        json!({"messages": [{"role": "assistant", "content": "ok"}, null, true]}),
        json!({"messages": {"role": "user"}}),
        json!({"messages": 3.5}),
        json!({"messages": []}),
        json!({"messages": "[{\"role\": \"user\", \"content\": \"💥\"}"}),
        json!({"messages": "[{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"é\"}]"}),
        json!({"other": "x"}),
    ];
    let tok = tiny_tokenizer();
    for w in &weird {
        let dir = tempfile::tempdir().unwrap();
        let p = write_jsonl(dir.path(), "w.jsonl", &[w.clone(), good_chat(1)]);
        if let Ok(ds) = Dataset::from_jsonl(&p) {
            let _ = ds.validate();
            let _ = ds.tokenize(&tok, &PrepareOptions::default());
            let _ = ds.preview(5).text_html();
        }
        let as_text = polars::df!("messages" => [w["messages"].to_string(), w.to_string()]).unwrap();
        let ds = Dataset::from_polars(as_text).task(Task::Chat);
        let _ = ds.validate().unwrap();
        let _ = ds.tokenize(&tok, &PrepareOptions::default());
    }
    // JSON text that is a valid conversation is accepted
    let ds = Dataset::from_polars(polars::df!("messages" => [weird[6]["messages"].as_str().unwrap()]).unwrap());
    assert!(ds.validate().unwrap().is_valid());
    let _ = Dataset::from_polars(DataFrame::empty()).validate().unwrap();
}

// ----------------------------------------------------- tokens and loss masks

fn masked_text(tok: &Tokenizer, e: &TokenizedExample) -> String {
    let ids: Vec<u32> = e.input_ids.iter().zip(&e.loss_mask).filter(|(_, m)| **m == 1).map(|(i, _)| *i).collect();
    tok.decode(&ids, false).unwrap()
}

fn multi_turn() -> Dataset {
    let df = polars::df!("messages" => [serde_json::to_string(&json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "Seven."}
    ])).unwrap()]).unwrap();
    Dataset::from_polars(df)
}

#[test]
fn chat_loss_masks_cover_assistant_turns_only() {
    let tok = tiny_tokenizer();
    let ds = multi_turn();
    let all = ds.tokenize(&tok, &PrepareOptions::default()).unwrap();
    let e = &all.examples[0];
    assert_eq!(masked_text(&tok, e), "Hello there.<|eot_id|>Seven.<|eot_id|>");
    let msgs = vec![
        Message::system("Be brief."),
        Message::user("Hi!"),
        Message::assistant("Hello there."),
        Message::user("Name a prime."),
        Message::assistant("Seven."),
    ];
    assert_eq!(e.input_ids, tok.encode_chat(&msgs, false).unwrap(), "training ids are the template's ids");
    assert_eq!(e.input_ids.iter().filter(|&&i| Some(i) == tok.bos_id()).count(), 1, "one BOS");
    let last = ds.tokenize(&tok, &PrepareOptions::default().chat_loss(ChatLoss::LastAssistant)).unwrap();
    assert_eq!(masked_text(&tok, &last.examples[0]), "Seven.<|eot_id|>");
    let every = ds.tokenize(&tok, &PrepareOptions::default().chat_loss(ChatLoss::AllTokens)).unwrap();
    assert!(every.examples[0].loss_mask.iter().all(|&m| m == 1));
}

#[test]
fn chat_masks_with_a_template_that_rewrites_earlier_turns() {
    // the last turn renders differently from the same turn in a prefix, so the
    // prefix method cannot apply: the answer is found by its text, with its EOS
    let tok = tiny_tokenizer()
        .with_chat_template("{% for m in messages %}{% if loop.last %}[final] {% endif %}{{ m.role }}: {{ m.content }}<|eot_id|>{% endfor %}")
        .unwrap();
    let t = multi_turn().tokenize(&tok, &PrepareOptions::default()).unwrap();
    assert_eq!(masked_text(&tok, &t.examples[0]), "Hello there.<|eot_id|>Seven.<|eot_id|>");
}

#[test]
fn smollm2_chat_mask_trains_on_answers_and_im_end() {
    let Some(gguf) = crate::tokenize::tests::smollm2_gguf() else { return };
    let tok = Tokenizer::load(gguf).unwrap();
    let t = multi_turn().tokenize(&tok, &PrepareOptions::default()).unwrap();
    assert_eq!(masked_text(&tok, &t.examples[0]), "Hello there.<|im_end|>Seven.<|im_end|>");
    assert_eq!(t.examples[0].input_ids[0], 1, "starts with <|im_start|>, once");
    // without a system message the template adds SmolLM's default one; still only answers are trained
    let ds = Dataset::from_polars(polars::df!("messages" => [json!([
        {"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}
    ]).to_string()]).unwrap());
    let t = ds.tokenize(&tok, &PrepareOptions::default()).unwrap();
    assert_eq!(masked_text(&tok, &t.examples[0]), "42<|im_end|>");
    assert!(tok.decode(&t.examples[0].input_ids, false).unwrap().contains("named SmolLM"));
}

#[test]
fn instruction_and_text_masks() {
    let tok = tiny_tokenizer();
    let df = polars::df!("prompt" => ["What is 2+2?"], "completion" => [" 4"]).unwrap();
    let t = Dataset::from_polars(df).tokenize(&tok, &PrepareOptions::default()).unwrap();
    let e = &t.examples[0];
    let mut want = tok.encode("What is 2+2?", true).unwrap();
    let prompt_len = want.len();
    want.extend(tok.encode(" 4", false).unwrap());
    want.push(tok.eos_id().unwrap());
    assert_eq!(e.input_ids, want);
    assert!(e.loss_mask[..prompt_len].iter().all(|&m| m == 0));
    assert!(e.loss_mask[prompt_len..].iter().all(|&m| m == 1));
    assert_eq!(masked_text(&tok, e), " 4<|eot_id|>");

    let df = polars::df!("text" => ["plain text here"]).unwrap();
    let t = Dataset::from_polars(df).tokenize(&tok, &PrepareOptions::default()).unwrap();
    let e = &t.examples[0];
    assert_eq!(e.input_ids[0], tok.bos_id().unwrap());
    assert_eq!(*e.input_ids.last().unwrap(), tok.eos_id().unwrap());
    assert_eq!(e.loss_mask[0], 0);
    assert!(e.loss_mask[1..].iter().all(|&m| m == 1));
    let t = Dataset::from_polars(polars::df!("text" => ["x"]).unwrap()).tokenize(&tok, &PrepareOptions::default().add_eos(false)).unwrap();
    assert_ne!(*t.examples[0].input_ids.last().unwrap(), tok.eos_id().unwrap());
}

// ---------------------------------------------------------------- packing

fn ex(row: usize, n: usize, first_trainable: usize) -> TokenizedExample {
    TokenizedExample {
        row,
        input_ids: (0..n as u32).map(|i| 100 * (row as u32 + 1) + i).collect(),
        loss_mask: (0..n).map(|i| u8::from(i >= first_trainable)).collect(),
    }
}

#[test]
fn packing_keeps_examples_apart() {
    let examples = vec![ex(0, 3, 1), ex(1, 4, 2), ex(2, 5, 0), ex(3, 8, 4), ex(4, 11, 9)];
    let packed = pack::pack(&examples, &PackOptions::new(8), 0);
    assert_eq!(packed.truncated, 1);
    assert_eq!(packed.examples, 5);
    for w in &packed.windows {
        assert_eq!(w.len(), 8);
        assert_eq!(w.positions.len(), 8);
        for i in 0..8 {
            for j in 0..8 {
                if w.can_attend(i, j) {
                    assert!(j <= i && w.segment_ids[i] == w.segment_ids[j] && w.segment_ids[i] != 0);
                }
            }
            if w.segment_ids[i] != 0 {
                let start = w.segment_ids.iter().position(|&s| s == w.segment_ids[i]).unwrap();
                assert_eq!(w.positions[i] as usize, i - start, "positions restart per example");
            } else {
                assert_eq!((w.positions[i], w.loss_mask[i], w.input_ids[i]), (0, 0, 0), "padding");
            }
        }
        let labels = w.labels();
        for t in 0..8 {
            if labels[t] != pack::IGNORE_INDEX {
                assert_eq!(w.segment_ids[t], w.segment_ids[t + 1], "a label never crosses examples");
                assert_eq!(labels[t], i64::from(w.input_ids[t + 1]));
            }
        }
    }
    // rows 0 (3 tokens) and 1 (4 tokens) share the first window
    let w0 = &packed.windows[0];
    assert_eq!(w0.rows, vec![0, 1]);
    assert_eq!(w0.segment_ids, vec![1, 1, 1, 2, 2, 2, 2, 0]);
    assert_eq!(w0.positions, vec![0, 1, 2, 0, 1, 2, 3, 0]);
    assert_eq!(w0.labels(), vec![101, 102, -100, -100, 202, 203, -100, -100]);
    assert!(!w0.can_attend(3, 2), "the second example cannot see the first");
    // every example placed exactly once, truncated to the window
    let mut rows: Vec<usize> = packed.windows.iter().flat_map(|w| w.rows.clone()).collect();
    rows.sort();
    assert_eq!(rows, vec![0, 1, 2, 3, 4]);
    assert_eq!(packed.real_tokens, 3 + 4 + 5 + 8 + 8);
    assert!(packed.efficiency() > 0.0 && packed.efficiency() <= 1.0);
    let shown = packed.text_plain();
    assert!(shown.contains("windows of 8 tokens") && shown.contains("truncated to the window"), "{shown}");
    let dropped = pack::pack(&examples, &PackOptions::new(8).drop_overlong(true), 0);
    assert_eq!((dropped.dropped, dropped.examples), (1, 4));
}

#[test]
fn no_packing_pads_one_example_per_window() {
    let examples = vec![ex(0, 3, 0), ex(1, 5, 0)];
    let packed = pack::pack(&examples, &PackOptions::new(6).packing(false), 9);
    assert_eq!(packed.windows.len(), 2);
    assert_eq!(packed.windows[0].input_ids, vec![100, 101, 102, 9, 9, 9]);
    assert_eq!(packed.windows[0].segment_ids, vec![1, 1, 1, 0, 0, 0]);
    assert_eq!(packed.windows[1].rows, vec![1]);
}

#[test]
fn shuffle_and_split_are_deterministic() {
    let examples: Vec<TokenizedExample> = (0..50).map(|i| ex(i, 1 + i % 7, 0)).collect();
    let a = pack::pack(&examples, &PackOptions::new(16).shuffle(7), 0);
    let b = pack::pack(&examples, &PackOptions::new(16).shuffle(7), 0);
    let c = pack::pack(&examples, &PackOptions::new(16).shuffle(8), 0);
    assert_eq!(a, b);
    assert_ne!(a.windows[0].rows, c.windows[0].rows);

    let df = polars::df!("text" => (0..100).map(|i| format!("t{i}")).collect::<Vec<_>>()).unwrap();
    let ds = Dataset::from_polars(df);
    let (train, eval) = ds.split(0.1, 42);
    let (train2, eval2) = ds.split(0.1, 42);
    assert_eq!((train.len(), eval.len()), (90, 10));
    assert!(train.df().equals(train2.df()) && eval.df().equals(eval2.df()));
    let texts = |d: &Dataset| -> Vec<String> {
        let s = d.df().column("text").unwrap().as_materialized_series().clone();
        s.iter().map(|v| validate::any_to_json(v).as_str().unwrap().to_string()).collect()
    };
    let mut all = texts(&train);
    all.extend(texts(&eval));
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 100, "train and eval are disjoint and cover every row");
    assert_ne!(ds.split(0.1, 43).1.df().column("text").unwrap(), eval.df().column("text").unwrap());
    assert_eq!(ds.split(0.001, 1).1.len(), 1, "a positive fraction keeps at least one eval row");
    let s1 = ds.shuffle(3);
    assert!(s1.df().equals(ds.shuffle(3).df()));
    assert!(!s1.df().equals(ds.df()));
    assert_eq!(permutation(5, 1), permutation(5, 1));
}

// ------------------------------------------------------------ statistics

#[test]
fn stats_percentiles_overlength_and_warnings() {
    let tok = tiny_tokenizer();
    let t = Tokenized {
        source: "test".into(),
        task: Task::Chat,
        examples: vec![ex(0, 10, 2), ex(1, 20, 18), ex(2, 30, 0), ex(3, 40, 35)],
        invalid_rows: 1,
        problems: vec![],
        pad_id: 0,
    };
    let s = Stats::from_tokenized(&t, 25);
    assert_eq!((s.p50, s.p95, s.max, s.total_tokens), (20, 40, 40, 100));
    assert_eq!(s.trainable_tokens, 8 + 2 + 30 + 5);
    assert_eq!(s.over_length, vec![
        OverLength { row: 2, tokens: 30, dropped_tokens: 5, dropped_trainable: 5 },
        OverLength { row: 3, tokens: 40, dropped_tokens: 15, dropped_trainable: 5 },
    ]);
    let w = s.warnings.join("\n");
    assert!(w.contains("1 invalid rows"), "{w}");
    assert!(w.contains("2 examples exceed"), "{w}");
    assert!(w.contains("1 examples lose every trained token"), "{w}");
    assert!(!w.contains("full context length"), "100 tokens ≥ 25: {w}");
    let s = Stats::from_tokenized(&t, 1000);
    assert!(s.warnings.join(" ").contains("at least one full context length"));
    let text = Tokenized { task: Task::Text, ..t };
    assert!(Stats::from_tokenized(&text, 1000).warnings.join(" ").contains("1500000 tokens"));

    let ds = multi_turn();
    let s = ds.stats(&tok, None).unwrap();
    assert_eq!(s.context_length, 2048);
    assert_eq!(s.examples, 1);
    assert_eq!(s.total_tokens, tok.encode_chat(&[
        Message::system("Be brief."), Message::user("Hi!"), Message::assistant("Hello there."),
        Message::user("Name a prime."), Message::assistant("Seven."),
    ], false).unwrap().len());
    assert!(ds.stats(&tok, Some(0)).is_err());
}

// ---------------------------------------------------------------- display

#[test]
fn previews_reports_and_histograms_render() {
    let df = polars::df!("messages" => [serde_json::to_string(&json!([
        {"role": "user", "content": "<script>alert(1)</script>"},
        {"role": "assistant", "content": "safe & sound"}
    ])).unwrap()]).unwrap();
    let ds = Dataset::from_polars(df);
    let html = ds.preview(5).text_html().unwrap();
    assert!(html.contains("&lt;script&gt;") && !html.contains("<script>"));
    assert!(html.contains(">user</span>") && html.contains(">assistant</span>"));
    assert!(ds.text_plain().contains("user: <script>"));

    let bad = Dataset::from_polars(polars::df!("messages" => ["[]"]).unwrap());
    let report = bad.validate().unwrap();
    let b = report.mime_bundle();
    assert!(b.plain().contains("too_few_messages"));
    assert!(b.get("text/html").unwrap().as_str().unwrap().contains("last_not_assistant") || report.count(Rule::TooFewMessages) == 1);

    let s = ds.stats(&tiny_tokenizer(), Some(64)).unwrap();
    let h = s.histogram().mime_bundle();
    assert!(h.get(VEGA_LITE_MIME).is_some() && h.get("image/svg+xml").is_some());
    assert!(h.get("text/html").is_none());
    assert!(s.text_plain().contains("p50 / p95 / max"));
    let hist = TokenHistogram::new(&[1, 2, 3, 100], 50);
    assert_eq!(hist.bins.iter().map(|b| b.2).sum::<usize>(), 4);
}

#[test]
fn problems_in_jsonl_and_csv_name_the_line_an_editor_shows() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("chats.jsonl");
    let good = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;
    let bad = r#"{"messages": [{"role": "user", "content": "hi"}]}"#;
    // Row 1 is on line 4: a blank line comes before it.
    std::fs::write(&jsonl, format!("{good}\n\n\n{bad}\n{good}\n")).unwrap();
    let report = Dataset::from_jsonl(&jsonl).unwrap().validate().unwrap();
    assert!(!report.problems.is_empty());
    for p in &report.problems {
        assert_eq!((p.row, p.line.clone()), (Some(1), Some(format!("{} line 4", jsonl.display()))));
    }
    let p = &report.problems[0];
    assert!(p.to_string().starts_with(&format!("row 1 ({} line 4)", jsonl.display())), "{p}");

    // CSV: the header is line 1; a quoted field spans two lines.
    let csv = dir.path().join("pairs.csv");
    std::fs::write(&csv, "prompt,response\n\"two\nlines\",ok\nfine,\n").unwrap();
    let report = Dataset::from_csv(&csv).unwrap().validate().unwrap();
    let p = report.problems.iter().find(|p| p.row == Some(1)).expect("the empty response is a problem");
    assert_eq!(p.line, Some(format!("{} line 4", csv.display())));
    // A split keeps each row's line.
    let (train, _) = Dataset::from_jsonl(&jsonl).unwrap().split(0.0, 1);
    assert_eq!(train.line_of(2), Some(format!("{} line 5", jsonl.display())));
}

#[test]
fn an_instruction_row_with_both_response_and_completion_is_ambiguous() {
    let df = polars::df!(
        "prompt" => ["a", "b"],
        "response" => [Some("r"), None],
        "completion" => [Some("c"), Some("c2")]
    )
    .unwrap();
    let report = Dataset::from_polars(df.clone()).task(Task::Instruction).validate().unwrap();
    let ambiguous: Vec<_> = report.problems.iter().filter(|p| p.rule == Rule::AmbiguousTarget).collect();
    assert_eq!(ambiguous.len(), 1, "{:?}", report.problems);
    assert_eq!(ambiguous[0].row, Some(0));
    assert!(ambiguous[0].fix.contains("response"), "{}", ambiguous[0].fix);
    // Mapping the target explicitly settles it.
    let mapped = Dataset::from_polars(df).task(Task::Instruction).columns(Columns::default().response("completion")).validate().unwrap();
    assert!(mapped.problems.iter().all(|p| p.rule != Rule::AmbiguousTarget), "{:?}", mapped.problems);
}
