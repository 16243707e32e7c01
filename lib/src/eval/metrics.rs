//! Text metrics whose values equal the reference implementations', so a tunebook score
//! can be compared with a published one.
//!
//! * [`exact_match`]: the answer equals a reference after trimming (optionally ignoring
//!   case and punctuation, as lm-evaluation-harness's `ignore_case` / `ignore_punctuation`).
//! * [`Bleu`]: sacrebleu 2.x's BLEU (tokenizer `13a`, n-grams to 4, `exp` smoothing,
//!   closest reference length, several references per hypothesis): [`Bleu::corpus`] equals
//!   `sacrebleu.corpus_bleu`, [`Bleu::sentence`] `sacrebleu.sentence_bleu`.
//! * [`Chrf`]: sacrebleu's chrF (character 6-grams, β = 2) and chrF++ (plus word bigrams).
//! * [`rouge_n`], [`rouge_l`]: Google's `rouge-score` 0.1.2 without stemming (what MLflow
//!   and Hugging Face `evaluate` use by default): its tokenizer (lower case, runs of
//!   `a-z0-9`; other scripts give no tokens), n-gram overlap and LCS precision, recall, F1.
//!
//! Reference values made by `sacrebleu` 2.6.0 and `rouge-score` 0.1.2 live in `lib/tests/data/eval_metrics_reference.json`
//! with the script that wrote them (`make_eval_reference.py`).

use std::collections::HashMap;

/// Whether Python's `str.split()` splits at `c` (Unicode whitespace, and the ASCII
/// separators U+001C–U+001F, which Rust's `char::is_whitespace` leaves out).
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// sacrebleu's `13a` tokenizer (mteval-v13a as WMT uses it).
pub fn tokenize_13a(line: &str) -> String {
    let mut line = line.replace("<skipped>", "").replace("-\n", "").replace('\n', " ");
    if line.contains('&') {
        line = line.replace("&quot;", "\"").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">");
    }
    let line = format!(" {line} ");
    // Punctuation and symbols of the ASCII ranges { to ~, [ to `, space to &, ( to +, : to @, and /.
    let symbol = |c: char| matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/');
    let mut s = String::with_capacity(line.len() * 2);
    for c in line.chars() {
        if symbol(c) {
            s.push(' ');
            s.push(c);
            s.push(' ');
        } else {
            s.push(c);
        }
    }
    // Python's re.sub of a two-character pattern: leftmost, non-overlapping matches.
    let sub2 = |s: &str, first: &dyn Fn(char) -> bool, second: &dyn Fn(char) -> bool, out: &dyn Fn(char, char, &mut String)| {
        let cs: Vec<char> = s.chars().collect();
        let mut o = String::with_capacity(s.len() + 16);
        let mut i = 0;
        while i < cs.len() {
            if i + 1 < cs.len() && first(cs[i]) && second(cs[i + 1]) {
                out(cs[i], cs[i + 1], &mut o);
                i += 2;
            } else {
                o.push(cs[i]);
                i += 1;
            }
        }
        o
    };
    let digit = |c: char| c.is_ascii_digit();
    let period_comma = |c: char| c == '.' || c == ',';
    // Period and comma unless preceded by a digit: `\1 \2 `.
    let s = sub2(&s, &|c| !digit(c), &period_comma, &|a, b, o| {
        o.push(a);
        o.push(' ');
        o.push(b);
        o.push(' ');
    });
    // Period and comma unless followed by a digit: ` \1 \2`.
    let s = sub2(&s, &period_comma, &|c| !digit(c), &|a, b, o| {
        o.push(' ');
        o.push(a);
        o.push(' ');
        o.push(b);
    });
    // A dash after a digit: `\1 \2 `.
    let s = sub2(&s, &digit, &|c| c == '-', &|a, b, o| {
        o.push(a);
        o.push(' ');
        o.push(b);
        o.push(' ');
    });
    s.split(py_space).filter(|t| !t.is_empty()).collect::<Vec<_>>().join(" ")
}

const MAX_ORDER: usize = 4;

/// BLEU's sufficient statistics: hypothesis and closest reference lengths, matched and
/// total n-grams per order.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BleuStats {
    pub sys_len: usize,
    pub ref_len: usize,
    pub correct: [usize; MAX_ORDER],
    pub total: [usize; MAX_ORDER],
}

impl std::ops::AddAssign for BleuStats {
    fn add_assign(&mut self, o: Self) {
        self.sys_len += o.sys_len;
        self.ref_len += o.ref_len;
        for n in 0..MAX_ORDER {
            self.correct[n] += o.correct[n];
            self.total[n] += o.total[n];
        }
    }
}

fn ngrams(tokens: &[&str]) -> HashMap<Vec<String>, usize> {
    let mut m = HashMap::new();
    for n in 1..=MAX_ORDER {
        for w in tokens.windows(n) {
            *m.entry(w.iter().map(|s| s.to_string()).collect()).or_insert(0) += 1;
        }
    }
    m
}

/// sacrebleu's BLEU with its defaults (`13a`, case-sensitive, `exp` smoothing).
#[derive(Clone, Copy, Debug, Default)]
pub struct Bleu {
    /// Lower-case hypotheses and references first (sacrebleu's `lowercase=True`).
    pub lowercase: bool,
}

/// A BLEU score (0–100) with what it was computed from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BleuScore {
    pub score: f64,
    /// n-gram precisions in percent, orders 1–4.
    pub precisions: [f64; MAX_ORDER],
    pub brevity_penalty: f64,
    pub stats: BleuStats,
}

impl Bleu {
    fn prep(&self, s: &str) -> String {
        let s = s.trim_end_matches(py_space);
        if self.lowercase { tokenize_13a(&s.to_lowercase()) } else { tokenize_13a(s) }
    }

    /// The statistics of one hypothesis against its references.
    pub fn stats(&self, hypothesis: &str, references: &[&str]) -> BleuStats {
        let mut ref_counts: HashMap<Vec<String>, usize> = HashMap::new();
        let mut ref_lens = Vec::with_capacity(references.len());
        for r in references {
            let t = self.prep(r);
            let toks: Vec<&str> = t.split(' ').filter(|x| !x.is_empty()).collect();
            ref_lens.push(toks.len());
            for (g, c) in ngrams(&toks) {
                let e = ref_counts.entry(g).or_insert(0);
                *e = (*e).max(c);
            }
        }
        let h = self.prep(hypothesis);
        let toks: Vec<&str> = h.split(' ').filter(|x| !x.is_empty()).collect();
        let hyp_len = toks.len();
        // The closest reference length; on a tie the shorter one.
        let mut ref_len = None::<(usize, usize)>;
        for &l in &ref_lens {
            let diff = hyp_len.abs_diff(l);
            ref_len = match ref_len {
                None => Some((diff, l)),
                Some((d, bl)) if diff < d || (diff == d && l < bl) => Some((diff, l)),
                keep => keep,
            };
        }
        let mut st = BleuStats { sys_len: hyp_len, ref_len: ref_len.map_or(0, |x| x.1), ..Default::default() };
        for (g, c) in ngrams(&toks) {
            let n = g.len() - 1;
            st.total[n] += c;
            if let Some(&rc) = ref_counts.get(&g) {
                st.correct[n] += c.min(rc);
            }
        }
        st
    }

    /// The score of summed statistics (sacrebleu's `compute_bleu`, `exp` smoothing, all
    /// four orders).
    pub fn score(stats: BleuStats) -> BleuScore {
        Self::score_with(stats, false)
    }

    /// [`score`](Self::score); with `effective_order`, orders the hypothesis has no n-gram
    /// of are left out of the mean (sacrebleu's sentence-level default).
    pub fn score_with(stats: BleuStats, effective_order: bool) -> BleuScore {
        let BleuStats { sys_len, ref_len, correct, total } = stats;
        let bp = if sys_len < ref_len {
            if sys_len > 0 { (1.0 - ref_len as f64 / sys_len as f64).exp() } else { 0.0 }
        } else {
            1.0
        };
        let mut precisions = [0.0; MAX_ORDER];
        if correct.iter().all(|&c| c == 0) {
            return BleuScore { score: 0.0, precisions, brevity_penalty: bp, stats };
        }
        let mut smooth = 1.0f64;
        let mut eff = MAX_ORDER;
        for n in 0..MAX_ORDER {
            if total[n] == 0 {
                break;
            }
            if effective_order {
                eff = n + 1;
            }
            precisions[n] = if correct[n] == 0 {
                smooth *= 2.0;
                100.0 / (smooth * total[n] as f64)
            } else {
                100.0 * correct[n] as f64 / total[n] as f64
            };
        }
        // sacrebleu's floored log: log(0) counts as -9999999999.
        let log = |p: f64| if p == 0.0 { -9_999_999_999.0 } else { p.ln() };
        let score = bp * (precisions[..eff].iter().map(|&p| log(p)).sum::<f64>() / eff as f64).exp();
        BleuScore { score, precisions, brevity_penalty: bp, stats }
    }

    /// Corpus BLEU: `references[k][i]` is the k-th reference of hypothesis `i` (sacrebleu's
    /// reference streams); every stream has one entry per hypothesis.
    pub fn corpus(&self, hypotheses: &[&str], references: &[Vec<&str>]) -> BleuScore {
        let mut total = BleuStats::default();
        for (i, h) in hypotheses.iter().enumerate() {
            let refs: Vec<&str> = references.iter().filter_map(|stream| stream.get(i).copied()).collect();
            total += self.stats(h, &refs);
        }
        Self::score(total)
    }

    /// Sentence BLEU of one hypothesis (sacrebleu's `sentence_bleu` with its defaults,
    /// effective order included).
    pub fn sentence(&self, hypothesis: &str, references: &[&str]) -> BleuScore {
        Self::score_with(self.stats(hypothesis, references), true)
    }
}

/// sacrebleu's chrF: character n-grams up to 6 (whitespace removed) and, for chrF++,
/// word n-grams up to `word_order` (2), β = 2, the best reference per hypothesis.
#[derive(Clone, Copy, Debug, Default)]
pub struct Chrf {
    /// 0 for chrF, 2 for chrF++.
    pub word_order: usize,
}

const CHAR_ORDER: usize = 6;

impl Chrf {
    /// chrF++ (word bigrams too).
    pub fn plus_plus() -> Self {
        Self { word_order: 2 }
    }

    fn ngrams(&self, s: &str) -> Vec<HashMap<String, usize>> {
        let squeezed: Vec<char> = s.split(py_space).collect::<String>().chars().collect();
        let mut out = Vec::with_capacity(CHAR_ORDER + self.word_order);
        for n in 1..=CHAR_ORDER {
            let mut m = HashMap::new();
            for w in squeezed.windows(n) {
                *m.entry(w.iter().collect::<String>()).or_insert(0) += 1;
            }
            out.push(m);
        }
        if self.word_order > 0 {
            // sacrebleu's primitive tokenization: one leading or trailing punctuation mark split off.
            let punct = |c: char| "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~".contains(c);
            let mut words: Vec<String> = Vec::new();
            for w in s.split(py_space).filter(|w| !w.is_empty()) {
                let cs: Vec<char> = w.chars().collect();
                if cs.len() == 1 {
                    words.push(w.to_string());
                } else if punct(cs[cs.len() - 1]) {
                    words.push(cs[..cs.len() - 1].iter().collect());
                    words.push(cs[cs.len() - 1].to_string());
                } else if punct(cs[0]) {
                    words.push(cs[0].to_string());
                    words.push(cs[1..].iter().collect());
                } else {
                    words.push(w.to_string());
                }
            }
            for n in 1..=self.word_order {
                let mut m = HashMap::new();
                for g in words.windows(n) {
                    *m.entry(g.join(" ")).or_insert(0) += 1;
                }
                out.push(m);
            }
        }
        out
    }

    /// The chrF score (0–100) of summed `[hyp, ref, match]` counts per order.
    pub fn f_score(&self, stats: &[usize]) -> f64 {
        let eps = 1e-16;
        let factor = 4.0; // β²
        let (mut avg_p, mut avg_r, mut eff) = (0.0, 0.0, 0usize);
        for st in stats.chunks_exact(3) {
            let (h, r, m) = (st[0], st[1], st[2]);
            let p = if h > 0 { m as f64 / h as f64 } else { eps };
            let rc = if r > 0 { m as f64 / r as f64 } else { eps };
            if h > 0 && r > 0 {
                avg_p += p;
                avg_r += rc;
                eff += 1;
            }
        }
        if eff == 0 {
            return 0.0;
        }
        avg_p /= eff as f64;
        avg_r /= eff as f64;
        if avg_p + avg_r > 0.0 { 100.0 * (1.0 + factor) * avg_p * avg_r / (factor * avg_p + avg_r) } else { 0.0 }
    }

    /// `[hyp, ref, match]` counts per order against the best of `references`.
    pub fn stats(&self, hypothesis: &str, references: &[&str]) -> Vec<usize> {
        let hyp = self.ngrams(hypothesis);
        let mut best: (f64, Vec<usize>) = (-1.0, vec![]);
        for r in references {
            let refg = self.ngrams(r);
            let mut st = Vec::with_capacity(3 * hyp.len());
            for (h, rg) in hyp.iter().zip(&refg) {
                let hc: usize = h.values().sum();
                let m: usize = h.iter().map(|(g, c)| (*c).min(rg.get(g).copied().unwrap_or(0))).sum();
                st.extend([if rg.is_empty() { 0 } else { hc }, rg.values().sum(), m]);
            }
            let f = self.f_score(&st);
            if f > best.0 {
                best = (f, st);
            }
        }
        best.1
    }

    /// Corpus chrF: `references[k][i]` is the k-th reference of hypothesis `i`
    /// (sacrebleu's `corpus_chrf`).
    pub fn corpus(&self, hypotheses: &[&str], references: &[Vec<&str>]) -> f64 {
        let mut sum = vec![0usize; 3 * (CHAR_ORDER + self.word_order)];
        for (i, h) in hypotheses.iter().enumerate() {
            let refs: Vec<&str> = references.iter().filter_map(|s| s.get(i).copied()).collect();
            for (a, b) in sum.iter_mut().zip(self.stats(h, &refs)) {
                *a += b;
            }
        }
        self.f_score(&sum)
    }

    /// chrF of one hypothesis (sacrebleu's `sentence_chrf`).
    pub fn sentence(&self, hypothesis: &str, references: &[&str]) -> f64 {
        self.f_score(&self.stats(hypothesis, references))
    }
}

/// Precision, recall and F1 of one ROUGE score.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rouge {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

impl Rouge {
    fn new(precision: f64, recall: f64) -> Self {
        let fmeasure = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
        Self { precision, recall, fmeasure }
    }
}

/// `rouge-score`'s tokens: the text lower-cased, then its runs of `a-z0-9` (other scripts
/// give no tokens); with `stem`, tokens longer than 3 letters go through NLTK's Porter
/// stemmer (`use_stemmer=True`).
pub fn rouge_tokens(text: &str, stem: bool) -> Vec<String> {
    let lower = text.to_lowercase();
    lower
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(|t| if stem && t.len() > 3 { super::porter::stem(t) } else { t.to_string() })
        .filter(|t| !t.is_empty())
        .collect()
}

/// Which ROUGE score (rouge-score's `rouge1`…`rouge9`, `rougeL`, `rougeLsum`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RougeType {
    /// n-gram overlap (`rouge1`, `rouge2`, …).
    N(usize),
    /// Longest common subsequence of the whole texts.
    L,
    /// Summary-level LCS over the texts' lines (split at `\n`), rouge-score's `rougeLsum`.
    Lsum,
}

impl RougeType {
    /// rouge-score's name of the score.
    pub fn name(self) -> String {
        match self {
            RougeType::N(n) => format!("rouge{n}"),
            RougeType::L => "rougeL".into(),
            RougeType::Lsum => "rougeLsum".into(),
        }
    }
}

/// ROUGE of `prediction` against `target`, as rouge-score's `RougeScorer([kind], use_stemmer=stem).score(target, prediction)`.
pub fn rouge(kind: RougeType, target: &str, prediction: &str, stem: bool) -> Rouge {
    match kind {
        RougeType::N(n) => ngram_overlap(&rouge_tokens(target, stem), &rouge_tokens(prediction, stem), n),
        RougeType::L => lcs_score(&rouge_tokens(target, stem), &rouge_tokens(prediction, stem)),
        RougeType::Lsum => {
            let sents = |t: &str| t.split('\n').filter(|s| !s.is_empty()).map(|s| rouge_tokens(s, stem)).collect::<Vec<_>>();
            summary_lcs(&sents(target), &sents(prediction))
        }
    }
}

/// The best ROUGE over several targets (rouge-score's `score_multi`: the target with the
/// highest F1, the first on a tie).
pub fn rouge_best(kind: RougeType, targets: &[&str], prediction: &str, stem: bool) -> Rouge {
    let mut best: Option<Rouge> = None;
    for t in targets {
        let r = rouge(kind, t, prediction, stem);
        if best.is_none_or(|b| r.fmeasure > b.fmeasure) {
            best = Some(r);
        }
    }
    best.unwrap_or(Rouge { precision: 0.0, recall: 0.0, fmeasure: 0.0 })
}

/// ROUGE-N of `prediction` against `target` without stemming (`rouge1` for n = 1, `rouge2` for 2).
pub fn rouge_n(target: &str, prediction: &str, n: usize) -> Rouge {
    rouge(RougeType::N(n), target, prediction, false)
}

/// ROUGE-L (longest common subsequence of tokens) of `prediction` against `target`, without stemming.
pub fn rouge_l(target: &str, prediction: &str) -> Rouge {
    rouge(RougeType::L, target, prediction, false)
}

fn ngram_overlap(t: &[String], p: &[String], n: usize) -> Rouge {
    fn grams(toks: &[String], n: usize) -> HashMap<&[String], usize> {
        let mut m: HashMap<&[String], usize> = HashMap::new();
        if n > 0 {
            for w in toks.windows(n) {
                *m.entry(w).or_insert(0) += 1;
            }
        }
        m
    }
    let (tg, pg) = (grams(t, n), grams(p, n));
    let overlap: usize = tg.iter().map(|(g, c)| (*c).min(pg.get(g).copied().unwrap_or(0))).sum();
    let (tc, pc): (usize, usize) = (tg.values().sum(), pg.values().sum());
    Rouge::new(overlap as f64 / pc.max(1) as f64, overlap as f64 / tc.max(1) as f64)
}

/// The LCS length table of `a` and `b` (`(a.len()+1) × (b.len()+1)`, row-major).
fn lcs_table(a: &[String], b: &[String]) -> Vec<u32> {
    let w = b.len() + 1;
    let mut t = vec![0u32; (a.len() + 1) * w];
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            t[i * w + j] = if a[i - 1] == b[j - 1] { t[(i - 1) * w + j - 1] + 1 } else { t[(i - 1) * w + j].max(t[i * w + j - 1]) };
        }
    }
    t
}

fn lcs_score(t: &[String], p: &[String]) -> Rouge {
    if t.is_empty() || p.is_empty() {
        return Rouge { precision: 0.0, recall: 0.0, fmeasure: 0.0 };
    }
    let lcs = lcs_table(t, p)[(t.len() + 1) * (p.len() + 1) - 1] as f64;
    Rouge::new(lcs / p.len() as f64, lcs / t.len() as f64)
}

/// The indices into `a` of one LCS of `a` and `b`, read back the way rouge-score does.
fn lcs_indices(a: &[String], b: &[String]) -> Vec<usize> {
    let t = lcs_table(a, b);
    let w = b.len() + 1;
    let (mut i, mut j) = (a.len(), b.len());
    let mut out = Vec::new();
    while i > 0 && j > 0 {
        if a[i - 1] == b[j - 1] {
            out.push(i - 1);
            i -= 1;
            j -= 1;
        } else if t[i * w + j - 1] > t[(i - 1) * w + j] {
            j -= 1;
        } else {
            i -= 1;
        }
    }
    out.reverse();
    out
}

/// rouge-score's summary-level LCS (the ROUGE paper's section 3.2).
fn summary_lcs(refs: &[Vec<String>], cands: &[Vec<String>]) -> Rouge {
    let zero = Rouge { precision: 0.0, recall: 0.0, fmeasure: 0.0 };
    if refs.is_empty() || cands.is_empty() {
        return zero;
    }
    let m: usize = refs.iter().map(Vec::len).sum();
    let n: usize = cands.iter().map(Vec::len).sum();
    if m == 0 || n == 0 {
        return zero;
    }
    let mut count_r: HashMap<&str, usize> = HashMap::new();
    let mut count_c: HashMap<&str, usize> = HashMap::new();
    for t in refs.iter().flatten() {
        *count_r.entry(t).or_insert(0) += 1;
    }
    for t in cands.iter().flatten() {
        *count_c.entry(t).or_insert(0) += 1;
    }
    let mut hits = 0usize;
    for r in refs {
        let mut union: Vec<usize> = cands.iter().flat_map(|c| lcs_indices(r, c)).collect();
        union.sort_unstable();
        union.dedup();
        for i in union {
            let tok = r[i].as_str();
            let (cc, cr) = (count_c.get(tok).copied().unwrap_or(0), count_r.get(tok).copied().unwrap_or(0));
            if cc > 0 && cr > 0 {
                hits += 1;
                count_c.insert(tok, cc - 1);
                count_r.insert(tok, cr - 1);
            }
        }
    }
    Rouge::new(hits as f64 / n as f64, hits as f64 / m as f64)
}

/// Exact match with lm-evaluation-harness's options (`exact_match_hf_evaluate`): the
/// `regexes_to_ignore` are removed, then case, ASCII punctuation and digits as asked, then
/// the strings must be equal; with several references, any one. By default surrounding
/// whitespace is trimmed first (a generated answer's trailing newline is not a wrong
/// answer); [`ExactMatch::no_trim`] gives lm-evaluation-harness's and MLflow's raw equality.
#[derive(Clone, Debug)]
pub struct ExactMatch {
    pub trim: bool,
    pub ignore_case: bool,
    pub ignore_punctuation: bool,
    pub ignore_numbers: bool,
    pub regexes_to_ignore: Vec<regex::Regex>,
}

impl Default for ExactMatch {
    fn default() -> Self {
        Self { trim: true, ignore_case: false, ignore_punctuation: false, ignore_numbers: false, regexes_to_ignore: vec![] }
    }
}

impl ExactMatch {
    /// Compares the strings as they are (no trimming).
    pub fn no_trim(mut self) -> Self {
        self.trim = false;
        self
    }
    /// Compares lower-cased strings.
    pub fn ignore_case(mut self) -> Self {
        self.ignore_case = true;
        self
    }
    /// Removes ASCII punctuation (Python's `string.punctuation`) first.
    pub fn ignore_punctuation(mut self) -> Self {
        self.ignore_punctuation = true;
        self
    }
    /// Removes the digits 0–9 first.
    pub fn ignore_numbers(mut self) -> Self {
        self.ignore_numbers = true;
        self
    }
    /// Removes every match of `pattern` first (in the order added; Rust `regex` syntax,
    /// which has no look-around).
    pub fn ignore_regex(mut self, pattern: &str) -> anyhow::Result<Self> {
        let re = regex::Regex::new(pattern).map_err(|e| anyhow::anyhow!("exact_match regex {pattern:?}: {e}"))?;
        self.regexes_to_ignore.push(re);
        Ok(self)
    }

    /// The string as compared.
    pub fn normalize(&self, s: &str) -> String {
        let mut t = if self.trim { s.trim_matches(py_space).to_string() } else { s.to_string() };
        for re in &self.regexes_to_ignore {
            t = re.replace_all(&t, "").into_owned();
        }
        if self.ignore_case {
            t = t.to_lowercase();
        }
        if self.ignore_punctuation {
            t.retain(|c| !c.is_ascii_punctuation());
        }
        if self.ignore_numbers {
            t.retain(|c| !c.is_ascii_digit());
        }
        t
    }

    /// Whether `answer` matches one of `references`.
    pub fn matches(&self, answer: &str, references: &[&str]) -> bool {
        let a = self.normalize(answer);
        references.iter().any(|r| self.normalize(r) == a)
    }
}

/// Whether `answer` equals one of `references` after trimming both; `ignore_case` and
/// `ignore_punctuation` compare lower-cased text without ASCII punctuation.
pub fn exact_match(answer: &str, references: &[&str], ignore_case: bool, ignore_punctuation: bool) -> bool {
    let mut m = ExactMatch::default();
    m.ignore_case = ignore_case;
    m.ignore_punctuation = ignore_punctuation;
    m.matches(answer, references)
}

/// Replaces each maximal run of word characters (Python's `\w`) equal to `a`, `an` or
/// `the` by a space: `re.sub(r"\b(a|an|the)\b", " ", text)`.
fn remove_articles(text: &str) -> String {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if matches!(run.as_str(), "a" | "an" | "the") {
            out.push(' ');
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if word(c) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// SQuAD's answer normalisation (the official v1.1 script and Hugging Face's `squad`):
/// lower case, ASCII punctuation removed, articles removed, whitespace collapsed.
pub fn squad_normalize(s: &str) -> String {
    let mut t = s.to_lowercase();
    t.retain(|c| !c.is_ascii_punctuation());
    remove_articles(&t).split(py_space).filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ")
}

/// SQuAD token F1 (0–1) of `prediction`, the best over `references`.
pub fn squad_f1(prediction: &str, references: &[&str]) -> f64 {
    let p = squad_normalize(prediction);
    let pt: Vec<&str> = p.split(' ').filter(|w| !w.is_empty()).collect();
    let mut best = 0.0f64;
    for r in references {
        let g = squad_normalize(r);
        let gt: Vec<&str> = g.split(' ').filter(|w| !w.is_empty()).collect();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for w in &gt {
            *counts.entry(w).or_insert(0) += 1;
        }
        let mut same = 0usize;
        for w in &pt {
            if let Some(c) = counts.get_mut(w) {
                if *c > 0 {
                    *c -= 1;
                    same += 1;
                }
            }
        }
        let f1 = if same == 0 {
            0.0
        } else {
            let (pr, rc) = (same as f64 / pt.len() as f64, same as f64 / gt.len() as f64);
            2.0 * pr * rc / (pr + rc)
        };
        best = best.max(f1);
    }
    best
}

/// llm-foundry's answer normalisation for generation tasks: `_` and punctuation (ASCII plus
/// `‘ ’ ´ \``) become spaces, lower case, articles removed, whitespace collapsed.
pub fn foundry_normalize(s: &str) -> String {
    let t: String =
        s.replace('_', " ").to_lowercase().chars().map(|c| if c.is_ascii_punctuation() || "‘’´".contains(c) { ' ' } else { c }).collect();
    remove_articles(&t).split(py_space).filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ")
}

/// llm-foundry's generation exact match: the normalised answer starts with one of the
/// normalised references.
pub fn prefix_match(answer: &str, references: &[&str]) -> bool {
    let a = foundry_normalize(answer);
    references.iter().any(|r| a.starts_with(&foundry_normalize(r)))
}

/// BLEU (0–1) of one answer as MLflow's `bleu` metric computes it per row: Hugging Face
/// `evaluate`'s `bleu` (tensorflow-nmt's `compute_bleu`: `13a` tokens, n-grams to 4, no
/// smoothing, brevity against the shortest reference), 0 for an empty answer or
/// reference and where that code divides by zero.
pub fn hf_bleu(prediction: &str, references: &[&str]) -> f64 {
    if prediction.is_empty() || references.iter().any(|r| r.is_empty()) || references.is_empty() {
        return 0.0;
    }
    let split = |s: &str| tokenize_13a(s).split(' ').filter(|x| !x.is_empty()).map(str::to_string).collect::<Vec<_>>();
    let hyp = split(prediction);
    let mut merged: HashMap<Vec<String>, usize> = HashMap::new();
    let mut ref_len = usize::MAX;
    for r in references {
        let toks = split(r);
        ref_len = ref_len.min(toks.len());
        let refs: Vec<&str> = toks.iter().map(String::as_str).collect();
        for (g, c) in ngrams(&refs) {
            let e = merged.entry(g).or_insert(0);
            *e = (*e).max(c);
        }
    }
    let hyps: Vec<&str> = hyp.iter().map(String::as_str).collect();
    let mut matches = [0usize; MAX_ORDER];
    for (g, c) in ngrams(&hyps) {
        if let Some(&rc) = merged.get(&g) {
            matches[g.len() - 1] += c.min(rc);
        }
    }
    let mut precisions = [0.0f64; MAX_ORDER];
    for (n, p) in precisions.iter_mut().enumerate() {
        let possible = hyp.len() as i64 - n as i64;
        *p = if possible > 0 { matches[n] as f64 / possible as f64 } else { 0.0 };
    }
    let geo = if precisions.iter().cloned().fold(f64::INFINITY, f64::min) > 0.0 {
        precisions.iter().map(|p| p.ln() / MAX_ORDER as f64).sum::<f64>().exp()
    } else {
        0.0
    };
    if ref_len == 0 || hyp.is_empty() {
        return 0.0; // ZeroDivisionError in the reference, which MLflow scores 0
    }
    let ratio = hyp.len() as f64 / ref_len as f64;
    let bp = if ratio > 1.0 { 1.0 } else { (1.0 - 1.0 / ratio).exp() };
    geo * bp
}

/// The index of the first maximum (NumPy's `argmax`), or `None` when `values` is empty.
pub(crate) fn argmax(values: impl Iterator<Item = f64>) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, v) in values.enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|b| b.0)
}

/// lm-evaluation-harness's multiple-choice `acc`: 1 when the choice with the highest summed
/// log-likelihood is a gold one.
pub fn mc_acc(loglikelihoods: &[f64], gold: &[usize]) -> f64 {
    argmax(loglikelihoods.iter().copied()).is_some_and(|p| gold.contains(&p)) as u8 as f64
}

/// lm-evaluation-harness's `acc_norm`: the same with each log-likelihood divided by its
/// choice's length in characters.
pub fn mc_acc_norm(loglikelihoods: &[f64], choices: &[&str], gold: &[usize]) -> f64 {
    let norm = loglikelihoods.iter().zip(choices).map(|(ll, c)| ll / c.chars().count() as f64);
    argmax(norm).is_some_and(|p| gold.contains(&p)) as u8 as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn chrf_and_chrf_plus_plus_equal_sacrebleus() {
        let r = reference();
        for case in r["bleu"].as_array().unwrap() {
            if case["lowercase"].as_bool().unwrap() {
                continue;
            }
            let (hyps, refs) = hypotheses_and_references(case);
            for (key, m) in [("chrf", Chrf::default()), ("chrf++", Chrf::plus_plus())] {
                let want = case[key]["corpus"].as_f64().unwrap();
                let got = m.corpus(&hyps, &refs);
                assert!((got - want).abs() <= 1e-9, "{} {key}: {got} vs {want}", case["name"]);
                for (i, s) in case[key]["sentence"].as_array().unwrap().iter().enumerate() {
                    let refs_i: Vec<&str> = refs.iter().map(|st| st[i]).collect();
                    let (got, want) = (m.sentence(hyps[i], &refs_i), s.as_f64().unwrap());
                    assert!((got - want).abs() <= 1e-9, "{} {key} sentence {i}: {got} vs {want}", case["name"]);
                }
            }
        }
    }

    #[test]
    fn rouge_equals_rouge_scores_without_stemming() {
        let r = reference();
        for case in r["rouge"].as_array().unwrap() {
            let (t, p) = (case["target"].as_str().unwrap(), case["prediction"].as_str().unwrap());
            for (key, got) in [("rouge1", rouge_n(t, p, 1)), ("rouge2", rouge_n(t, p, 2)), ("rougeL", rouge_l(t, p))] {
                let want = &case[key];
                for (field, g) in [("precision", got.precision), ("recall", got.recall), ("fmeasure", got.fmeasure)] {
                    let w = want[field].as_f64().unwrap();
                    assert!((g - w).abs() <= 1e-12, "{key} {field} of {p:?} vs {t:?}: {g} vs {w}");
                }
            }
        }
    }

    /// A case's hypotheses and reference streams.
    fn hypotheses_and_references(case: &Value) -> (Vec<&str>, Vec<Vec<&str>>) {
        fn strs(v: &Value) -> Vec<&str> {
            v.as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect()
        }
        (strs(&case["hypotheses"]), case["references"].as_array().unwrap().iter().map(strs).collect())
    }

    fn reference() -> Value {
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/eval_metrics_reference.json");
        serde_json::from_str(&std::fs::read_to_string(p).expect("reference data")).expect("json")
    }

    #[test]
    fn tokenizer_13a_equals_sacrebleus() {
        let r = reference();
        for case in r["tokenize_13a"].as_array().unwrap() {
            let (input, want) = (case[0].as_str().unwrap(), case[1].as_str().unwrap());
            assert_eq!(tokenize_13a(input), want, "input {input:?}");
        }
    }

    #[test]
    fn corpus_and_sentence_bleu_equal_sacrebleus() {
        let r = reference();
        for case in r["bleu"].as_array().unwrap() {
            let (hyps, refs) = hypotheses_and_references(case);
            let bleu = Bleu { lowercase: case["lowercase"].as_bool().unwrap() };
            let got = bleu.corpus(&hyps, &refs);
            let want = case["corpus"].as_f64().unwrap();
            assert!((got.score - want).abs() <= 1e-9 * want.abs().max(1.0), "{}: {} vs {want}", case["name"], got.score);
            for (i, s) in case["sentence"].as_array().unwrap().iter().enumerate() {
                let refs_i: Vec<&str> = refs.iter().map(|st| st[i]).collect();
                let got = bleu.sentence(hyps[i], &refs_i).score;
                let want = s.as_f64().unwrap();
                assert!((got - want).abs() <= 1e-9 * want.abs().max(1.0), "{} sentence {i}: {got} vs {want}", case["name"]);
            }
        }
    }

    #[test]
    fn exact_match_trims_and_optionally_ignores_case_and_punctuation() {
        assert!(exact_match(" 2024-05-01\n", &["2024-05-01"], false, false));
        assert!(!exact_match("Paris.", &["paris"], false, false));
        assert!(exact_match("Paris.", &["paris"], true, true));
        assert!(exact_match("b", &["a", "b"], false, false));
    }
}
