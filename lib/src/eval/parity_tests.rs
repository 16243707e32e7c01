//! Every metric against its reference implementation on 2,400 (prediction, references)
//! pairs: values written by `lib/tests/data/make_eval_fixture.py` with rouge-score 0.1.2,
//! sacrebleu 2.6.0 and the lm-evaluation-harness, llm-foundry, SQuAD and Hugging Face
//! `evaluate` formulas. ROUGE must be bit-identical; the rest within 1e-9.

use super::metrics::*;
use serde_json::Value;
use std::io::Read;

fn fixture() -> Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/eval_parity_fixture.json.gz");
    let mut s = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(p).expect("fixture")).read_to_string(&mut s).expect("gzip");
    serde_json::from_str(&s).expect("json")
}

fn rows(f: &Value) -> Vec<(String, Vec<String>, &Value)> {
    f["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let refs = r["references"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
            (r["prediction"].as_str().unwrap().to_string(), refs, r)
        })
        .collect()
}

/// A value written as Python's `repr` (parsed exactly; serde_json's float parser may be off by an ulp).
fn num(v: &Value) -> f64 {
    match v.as_i64() {
        Some(i) => i as f64, // rouge-score writes an integer 0 for empty text
        None => v.as_str().expect("floats are repr strings").parse().expect("a float"),
    }
}

fn close(got: f64, want: f64, what: &str, i: usize, p: &str, refs: &[&str]) {
    assert!((got - want).abs() <= 1e-9 * want.abs().max(1.0), "row {i} {what}: {got} vs {want}; prediction {p:?}, references {refs:?}");
}

#[test]
fn the_fixture_covers_two_thousand_pairs_of_every_kind() {
    let f = fixture();
    let rows = rows(&f);
    assert!(rows.len() >= 2000);
    let has = |pred: &dyn Fn(&str, &[String]) -> bool| rows.iter().filter(|(p, r, _)| pred(p, r)).count();
    assert!(has(&|p, _| p.is_empty()) > 20);
    assert!(has(&|p, _| !p.is_empty() && p.trim().is_empty()) > 20);
    assert!(has(&|p, _| p.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c))) > 20);
    assert!(has(&|_, r| r.len() > 1) > 200);
    assert!(has(&|p, _| p.contains('\n')) > 100);
    assert!(has(&|p, _| p.chars().filter(|c| c.is_ascii_punctuation()).count() > 10) > 50);
}

#[test]
fn rouge_with_and_without_the_stemmer_is_bit_identical_to_rouge_score() {
    let f = fixture();
    for (i, (p, refs, r)) in rows(&f).iter().enumerate() {
        let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
        for stem in [false, true] {
            for kind in [RougeType::N(1), RougeType::N(2), RougeType::L, RougeType::Lsum] {
                let key = format!("{}{}", kind.name(), if stem { "_stem" } else { "" });
                let want: Vec<f64> = r[&key].as_array().unwrap().iter().map(num).collect();
                let got = rouge_best(kind, &refs, p, stem);
                assert_eq!(
                    [got.precision, got.recall, got.fmeasure],
                    [want[0], want[1], want[2]],
                    "row {i} {key}: got {got:?}, want {want:?}; prediction {p:?}, references {refs:?}"
                );
            }
        }
    }
}

#[test]
fn bleu_and_chrf_equal_sacrebleu_per_row_and_over_the_corpus() {
    let f = fixture();
    let rows = rows(&f);
    let (chrf, chrfpp) = (Chrf::default(), Chrf::plus_plus());
    let mut bleu_total = BleuStats::default();
    let (mut c_sum, mut cpp_sum) = (vec![0usize; 18], vec![0usize; 24]);
    for (i, (p, refs, r)) in rows.iter().enumerate() {
        let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
        let bleu = Bleu::default();
        close(bleu.sentence(p, &refs).score, num(&r["bleu"]), "sentence bleu", i, p, &refs);
        bleu_total += bleu.stats(p, &refs);
        close(chrf.sentence(p, &refs), num(&r["chrf"]), "sentence chrF", i, p, &refs);
        close(chrfpp.sentence(p, &refs), num(&r["chrf_pp"]), "sentence chrF++", i, p, &refs);
        for (a, b) in c_sum.iter_mut().zip(chrf.stats(p, &refs)) {
            *a += b;
        }
        for (a, b) in cpp_sum.iter_mut().zip(chrfpp.stats(p, &refs)) {
            *a += b;
        }
    }
    let c = &f["corpus"];
    close(Bleu::score(bleu_total).score, num(&c["bleu"]), "corpus bleu", 0, "", &[]);
    close(chrf.f_score(&c_sum), num(&c["chrf"]), "corpus chrF", 0, "", &[]);
    close(chrfpp.f_score(&cpp_sum), num(&c["chrf_pp"]), "corpus chrF++", 0, "", &[]);
}

#[test]
fn exact_match_prefix_match_squad_f1_and_mlflows_bleu_equal_their_references() {
    let f = fixture();
    let mut all = ExactMatch::default().no_trim().ignore_case().ignore_punctuation().ignore_numbers();
    for re in f["exact_match_regexes"].as_array().unwrap() {
        all = all.ignore_regex(re.as_str().unwrap()).unwrap();
    }
    for (i, (p, refs, r)) in rows(&f).iter().enumerate() {
        let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
        let b = |x: bool| if x { 1.0 } else { 0.0 };
        close(b(ExactMatch::default().matches(p, &refs)), num(&r["exact_match"]), "exact_match", i, p, &refs);
        close(b(ExactMatch::default().no_trim().matches(p, &refs)), num(&r["exact_match_raw"]), "exact_match_raw", i, p, &refs);
        close(b(all.matches(p, &refs)), num(&r["exact_match_all_options"]), "exact_match options", i, p, &refs);
        close(b(prefix_match(p, &refs)), num(&r["prefix_match"]), "prefix_match", i, p, &refs);
        close(squad_f1(p, &refs), num(&r["f1"]), "SQuAD f1", i, p, &refs);
        close(hf_bleu(p, &refs), num(&r["bleu_hf"]), "MLflow bleu", i, p, &refs);
    }
}

#[test]
fn multiple_choice_acc_and_acc_norm_equal_lm_evaluation_harness() {
    let f = fixture();
    let items = f["multiple_choice"].as_array().unwrap();
    assert_eq!(items.len(), 400);
    for (i, it) in items.iter().enumerate() {
        let lls: Vec<f64> = it["loglikelihoods"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let choices: Vec<&str> = it["choices"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        let gold: Vec<usize> = it["gold"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(mc_acc(&lls, &gold), it["acc"].as_f64().unwrap(), "item {i} acc: {lls:?} gold {gold:?}");
        assert_eq!(mc_acc_norm(&lls, &choices, &gold), it["acc_norm"].as_f64().unwrap(), "item {i} acc_norm: {lls:?} {choices:?} gold {gold:?}");
    }
}
