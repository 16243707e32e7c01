//! The Porter stemmer as NLTK's `PorterStemmer()` runs it (its default `NLTK_EXTENSIONS`
//! mode), which `rouge-score` applies with `use_stemmer=True`.
//!
//! Words are ASCII lower-case here (rouge-score's tokens are runs of `a-z0-9`), so the
//! rules work on bytes. Checked against NLTK 3.10 through rouge-score's stemmed scores
//! (`lib/tests/data/eval_metrics_reference.json`).

/// Irregular forms NLTK maps directly.
const POOL: &[(&str, &str)] = &[
    ("sky", "sky"),
    ("skies", "sky"),
    ("dying", "die"),
    ("lying", "lie"),
    ("tying", "tie"),
    ("news", "news"),
    ("innings", "inning"),
    ("inning", "inning"),
    ("outings", "outing"),
    ("outing", "outing"),
    ("cannings", "canning"),
    ("canning", "canning"),
    ("howe", "howe"),
    ("proceed", "proceed"),
    ("exceed", "exceed"),
    ("succeed", "succeed"),
];

fn is_vowel(c: u8) -> bool {
    matches!(c, b'a' | b'e' | b'i' | b'o' | b'u')
}

/// Per letter: whether it is a consonant (a `y` is one when it starts the word or follows a vowel).
fn consonants(w: &[u8]) -> Vec<bool> {
    let mut f: Vec<bool> = Vec::with_capacity(w.len());
    for (i, &c) in w.iter().enumerate() {
        let cons = if is_vowel(c) {
            false
        } else if c == b'y' {
            i == 0 || !f[i - 1]
        } else {
            true
        };
        f.push(cons);
    }
    f
}

fn is_consonant(w: &[u8], i: usize) -> bool {
    consonants(&w[..=i])[i]
}

/// The number of vowel-consonant sequences (Porter's m).
fn measure(stem: &[u8]) -> usize {
    let f = consonants(stem);
    f.windows(2).filter(|p| !p[0] && p[1]).count()
}

fn contains_vowel(stem: &[u8]) -> bool {
    consonants(stem).iter().any(|c| !c)
}

fn ends_double_consonant(w: &[u8]) -> bool {
    w.len() >= 2 && w[w.len() - 1] == w[w.len() - 2] && is_consonant(w, w.len() - 1)
}

/// Consonant-vowel-consonant at the end, the last not w, x or y (plus NLTK's two-letter case).
fn ends_cvc(w: &[u8]) -> bool {
    let n = w.len();
    (n >= 3 && is_consonant(w, n - 3) && !is_consonant(w, n - 2) && is_consonant(w, n - 1) && !matches!(w[n - 1], b'w' | b'x' | b'y'))
        || (n == 2 && !is_consonant(w, 0) && is_consonant(w, 1))
}

type Cond<'a> = &'a dyn Fn(&[u8]) -> bool;

/// The first rule whose suffix `word` ends with decides: replaced if its condition holds
/// for the stem, else the word is kept.
fn apply(word: &[u8], rules: &[(&str, &str, Option<Cond>)]) -> Vec<u8> {
    for (suffix, repl, cond) in rules {
        if word.ends_with(suffix.as_bytes()) {
            let stem = &word[..word.len() - suffix.len()];
            return if cond.is_none_or(|c| c(stem)) { [stem, repl.as_bytes()].concat() } else { word.to_vec() };
        }
    }
    word.to_vec()
}

fn positive(stem: &[u8]) -> bool {
    measure(stem) > 0
}

fn step1a(w: &[u8]) -> Vec<u8> {
    if w.ends_with(b"ies") && w.len() == 4 {
        return [&w[..w.len() - 3], b"ie"].concat();
    }
    apply(w, &[("sses", "ss", None), ("ies", "i", None), ("ss", "ss", None), ("s", "", None)])
}

fn step1b(w: &[u8]) -> Vec<u8> {
    if w.ends_with(b"ied") {
        let stem = &w[..w.len() - 3];
        return [stem, if w.len() == 4 { b"ie" as &[u8] } else { b"i" }].concat();
    }
    if let Some(stem) = w.strip_suffix(b"eed") {
        return if measure(stem) > 0 { [stem, b"ee"].concat() } else { w.to_vec() };
    }
    let mut inter = None;
    for suffix in [b"ed" as &[u8], b"ing"] {
        if let Some(stem) = w.strip_suffix(suffix) {
            if contains_vowel(stem) {
                inter = Some(stem);
                break;
            }
        }
    }
    let Some(s) = inter else { return w.to_vec() };
    for (suffix, repl) in [(b"at" as &[u8], b"ate" as &[u8]), (b"bl", b"ble"), (b"iz", b"ize")] {
        if let Some(stem) = s.strip_suffix(suffix) {
            return [stem, repl].concat();
        }
    }
    if ends_double_consonant(s) {
        let last = s[s.len() - 1];
        return if !matches!(last, b'l' | b's' | b'z') { [&s[..s.len() - 2], &[last][..]].concat() } else { s.to_vec() };
    }
    if measure(s) == 1 && ends_cvc(s) { [s, b"e"].concat() } else { s.to_vec() }
}

fn step1c(w: &[u8]) -> Vec<u8> {
    let cond = |stem: &[u8]| stem.len() > 1 && is_consonant(stem, stem.len() - 1);
    apply(w, &[("y", "i", Some(&cond))])
}

fn step2(w: &[u8]) -> Vec<u8> {
    if let Some(stem) = w.strip_suffix(b"alli") {
        if positive(stem) {
            return step2(&[stem, b"al"].concat());
        }
    }
    let p: Cond = &positive;
    let logi = |_: &[u8]| positive(&w[..w.len() - 3]);
    apply(
        w,
        &[
            ("ational", "ate", Some(p)),
            ("tional", "tion", Some(p)),
            ("enci", "ence", Some(p)),
            ("anci", "ance", Some(p)),
            ("izer", "ize", Some(p)),
            ("bli", "ble", Some(p)),
            ("alli", "al", Some(p)),
            ("entli", "ent", Some(p)),
            ("eli", "e", Some(p)),
            ("ousli", "ous", Some(p)),
            ("ization", "ize", Some(p)),
            ("ation", "ate", Some(p)),
            ("ator", "ate", Some(p)),
            ("alism", "al", Some(p)),
            ("iveness", "ive", Some(p)),
            ("fulness", "ful", Some(p)),
            ("ousness", "ous", Some(p)),
            ("aliti", "al", Some(p)),
            ("iviti", "ive", Some(p)),
            ("biliti", "ble", Some(p)),
            ("fulli", "ful", Some(p)),
            ("logi", "log", Some(&logi)),
        ],
    )
}

fn step3(w: &[u8]) -> Vec<u8> {
    let p: Cond = &positive;
    apply(
        w,
        &[
            ("icate", "ic", Some(p)),
            ("ative", "", Some(p)),
            ("alize", "al", Some(p)),
            ("iciti", "ic", Some(p)),
            ("ical", "ic", Some(p)),
            ("ful", "", Some(p)),
            ("ness", "", Some(p)),
        ],
    )
}

fn step4(w: &[u8]) -> Vec<u8> {
    let m1 = |s: &[u8]| measure(s) > 1;
    let g: Cond = &m1;
    let ion = |s: &[u8]| measure(s) > 1 && matches!(s.last(), Some(b's' | b't'));
    apply(
        w,
        &[
            ("al", "", Some(g)),
            ("ance", "", Some(g)),
            ("ence", "", Some(g)),
            ("er", "", Some(g)),
            ("ic", "", Some(g)),
            ("able", "", Some(g)),
            ("ible", "", Some(g)),
            ("ant", "", Some(g)),
            ("ement", "", Some(g)),
            ("ment", "", Some(g)),
            ("ent", "", Some(g)),
            ("ion", "", Some(&ion)),
            ("ou", "", Some(g)),
            ("ism", "", Some(g)),
            ("ate", "", Some(g)),
            ("iti", "", Some(g)),
            ("ous", "", Some(g)),
            ("ive", "", Some(g)),
            ("ize", "", Some(g)),
        ],
    )
}

fn step5a(w: &[u8]) -> Vec<u8> {
    if let Some(stem) = w.strip_suffix(b"e") {
        let m = measure(stem);
        if m > 1 || (m == 1 && !ends_cvc(stem)) {
            return stem.to_vec();
        }
    }
    w.to_vec()
}

fn step5b(w: &[u8]) -> Vec<u8> {
    if w.ends_with(b"ll") && measure(&w[..w.len() - 1]) > 1 {
        return w[..w.len() - 1].to_vec();
    }
    w.to_vec()
}

/// NLTK's `PorterStemmer().stem(word)` for an ASCII word (other text is returned lower-cased
/// and otherwise untouched by rules that never match it).
pub fn stem(word: &str) -> String {
    let lower = word.to_lowercase();
    if let Some((_, s)) = POOL.iter().find(|(w, _)| *w == lower) {
        return s.to_string();
    }
    if word.chars().count() <= 2 || !lower.is_ascii() {
        return lower;
    }
    let mut w = lower.into_bytes();
    for step in [step1a, step1b, step1c, step2, step3, step4, step5a, step5b] {
        w = step(&w);
    }
    String::from_utf8(w).expect("ASCII in, ASCII out")
}

#[cfg(test)]
mod tests {
    use super::stem;

    #[test]
    fn stems_the_papers_examples_and_nltks_extensions() {
        for (w, s) in [
            ("caresses", "caress"),
            ("ponies", "poni"),
            ("ties", "tie"),
            ("cats", "cat"),
            ("agreed", "agre"),
            ("plastered", "plaster"),
            ("motoring", "motor"),
            ("sing", "sing"),
            ("conflated", "conflat"),
            ("hopping", "hop"),
            ("falling", "fall"),
            ("filing", "file"),
            ("happy", "happi"),
            ("enjoy", "enjoy"),
            ("relational", "relat"),
            ("generalization", "gener"),
            ("running", "run"),
            ("runners", "runner"),
            ("dying", "die"),
            ("controll", "control"),
            ("skies", "sky"),
            ("cried", "cri"),
        ] {
            assert_eq!(stem(w), s, "{w}");
        }
    }
}
