//! A faster encoder for GPT-2-style byte-level BPE, with the exact ids and
//! offsets of Hugging Face `tokenizers`.
//!
//! `tokenizers` spends most of its encode time in its general pre-tokenization
//! machinery (per-character alignment tables), not in BPE. For the common
//! configuration -- no normalizer, `ByteLevel(use_regex = true)` optionally
//! after `Digits(individual_digits = true)`, a plain BPE model -- this module
//! does the same steps directly on byte ranges:
//!
//! 1. added tokens are cut out first (Aho-Corasick, leftmost-longest, the
//!    non-normalized ones then the normalized ones, as `AddedVocabulary` does);
//! 2. `Digits` isolates every `char::is_numeric` character;
//! 3. the GPT-2 split `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
//!    is a hand-written scanner; its character classes are answered by the
//!    same Oniguruma engine `tokenizers` uses, cached per character;
//! 4. BPE merges lowest rank first, leftmost on ties (`Word::merge_all`), with
//!    a bounded cache per pre-token.
//!
//! Any other configuration is refused at build time and the `tokenizers` path
//! is used. Tests compare both paths on the reference texts and on random
//! strings.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{OnceLock, RwLock};

const KNOWN: u8 = 1;
const LETTER: u8 = 2;
const NUMBER: u8 = 4;
const SPACE: u8 = 8;

static BMP: [AtomicU8; 0x10000] = [const { AtomicU8::new(0) }; 0x10000];
static ASTRAL: OnceLock<RwLock<HashMap<char, u8>>> = OnceLock::new();

struct Classes {
    letter: tokenizers::utils::SysRegex,
    number: tokenizers::utils::SysRegex,
    space: tokenizers::utils::SysRegex,
}

fn classes() -> &'static Classes {
    static C: OnceLock<Classes> = OnceLock::new();
    C.get_or_init(|| Classes {
        letter: tokenizers::utils::SysRegex::new(r"\p{L}").expect("valid class"),
        number: tokenizers::utils::SysRegex::new(r"\p{N}").expect("valid class"),
        space: tokenizers::utils::SysRegex::new(r"\s").expect("valid class"),
    })
}

fn compute_class(c: char) -> u8 {
    let mut buf = [0u8; 4];
    let s: &str = c.encode_utf8(&mut buf);
    let cl = classes();
    let mut v = KNOWN;
    if cl.letter.find_iter(s).next().is_some() {
        v |= LETTER;
    }
    if cl.number.find_iter(s).next().is_some() {
        v |= NUMBER;
    }
    if cl.space.find_iter(s).next().is_some() {
        v |= SPACE;
    }
    v
}

/// `\p{L}`, `\p{N}`, `\s` membership as Oniguruma sees it.
fn class(c: char) -> u8 {
    let cp = c as u32;
    if cp < 0x80 {
        // ASCII fast path (same answers as Oniguruma)
        return KNOWN
            | if c.is_ascii_alphabetic() { LETTER } else { 0 }
            | if c.is_ascii_digit() { NUMBER } else { 0 }
            | if matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c') { SPACE } else { 0 };
    }
    if cp < 0x10000 {
        let slot = &BMP[cp as usize];
        let v = slot.load(Ordering::Relaxed);
        if v != 0 {
            return v;
        }
        let v = compute_class(c);
        slot.store(v, Ordering::Relaxed);
        return v;
    }
    let table = ASTRAL.get_or_init(|| RwLock::new(HashMap::new()));
    if let Some(v) = table.read().ok().and_then(|t| t.get(&c).copied()) {
        return v;
    }
    let v = compute_class(c);
    if let Ok(mut t) = table.write() {
        t.insert(c, v);
    }
    v
}

/// Calls `emit(start, end)` for each GPT-2 pre-token of `s` (byte ranges).
fn gpt2_split(s: &str, mut emit: impl FnMut(usize, usize)) {
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    let n = chars.len();
    let at = |i: usize| if i < n { chars[i].0 } else { s.len() };
    let cls = |i: usize| class(chars[i].1);
    let mut i = 0;
    while i < n {
        let c = chars[i].1;
        if c == '\'' && i + 1 < n {
            let next = chars[i + 1].1;
            let two = |a: char| i + 2 < n && chars[i + 2].1 == a;
            let len = match next {
                's' | 't' | 'm' | 'd' => 2,
                'r' | 'v' if two('e') => 3,
                'l' if two('l') => 3,
                _ => 0,
            };
            if len > 0 {
                emit(at(i), at(i + len));
                i += len;
                continue;
            }
        }
        let j = if c == ' ' && i + 1 < n { i + 1 } else { i };
        let cj = cls(j);
        if cj & LETTER != 0 || cj & NUMBER != 0 {
            let want = if cj & LETTER != 0 { LETTER } else { NUMBER };
            let mut k = j;
            while k < n && cls(k) & want != 0 {
                k += 1;
            }
            emit(at(i), at(k));
            i = k;
            continue;
        }
        if cj & SPACE == 0 {
            let mut k = j;
            while k < n && cls(k) & (SPACE | LETTER | NUMBER) == 0 {
                k += 1;
            }
            emit(at(i), at(k));
            i = k;
            continue;
        }
        // c is whitespace: `\s+(?!\S)`, else `\s+`
        let mut k = i;
        while k < n && cls(k) & SPACE != 0 {
            k += 1;
        }
        let end = if k == n || k - 1 == i { k } else { k - 1 };
        emit(at(i), at(end));
        i = end;
    }
}

/// GPT-2's mapping of bytes to printable characters (the byte-level alphabet).
fn byte_chars() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u32 {
        let printable = (b'!' as u32..=b'~' as u32).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            let c = char::from_u32(256 + n).unwrap_or('\0');
            n += 1;
            c
        };
    }
    map
}

/// GPT-2's byte alphabet, for tests that build vocabularies.
#[cfg(test)]
pub(crate) fn byte_chars_for_tests() -> [char; 256] {
    byte_chars()
}

/// The fast encoder; `None` from [`FastBpe::from_tokenizer_json`] when the
/// configuration is not one it reproduces exactly.
pub(crate) struct FastBpe {
    /// id of each byte's character; `None` when the vocabulary lacks it
    /// (`tokenizers` then drops that byte, and so does this encoder)
    byte_ids: [Option<u32>; 256],
    merges: HashMap<(u32, u32), (u32, u32)>,
    vocab: HashMap<String, u32>,
    ignore_merges: bool,
    digits: bool,
    /// non-normalized added tokens, then normalized ones: (matcher, ids)
    added: Vec<(AhoCorasick, Vec<u32>)>,
    cache: RwLock<HashMap<String, Vec<(u32, u32, u32)>>>,
}

const CACHE_CAPACITY: usize = 200_000;

fn is_byte_level(v: &Value, use_regex: bool) -> bool {
    v.get("type").and_then(Value::as_str) == Some("ByteLevel")
        && v.get("add_prefix_space").and_then(Value::as_bool) == Some(false)
        && v.get("use_regex").and_then(Value::as_bool).unwrap_or(true) == use_regex
}

impl FastBpe {
    /// Builds the encoder from a `tokenizer.json` document, or `None` when the
    /// configuration differs from the one reproduced here.
    pub(crate) fn from_tokenizer_json(doc: &Value) -> Option<FastBpe> {
        if !doc.get("normalizer").is_none_or(Value::is_null) {
            return None;
        }
        let pre = doc.get("pre_tokenizer")?;
        let digits = if is_byte_level(pre, true) {
            false
        } else if pre.get("type").and_then(Value::as_str) == Some("Sequence") {
            let steps = pre.get("pretokenizers")?.as_array()?;
            let is_digits = |v: &Value| {
                v.get("type").and_then(Value::as_str) == Some("Digits")
                    && v.get("individual_digits").and_then(Value::as_bool) == Some(true)
            };
            if steps.len() == 2 && is_digits(&steps[0]) && is_byte_level(&steps[1], true) {
                true
            } else {
                return None;
            }
        } else {
            return None;
        };
        let model = doc.get("model")?;
        let plain = |k: &str| model.get(k).is_none_or(|v| v.is_null() || v.as_str() == Some("") || v.as_bool() == Some(false));
        if model.get("type").and_then(Value::as_str) != Some("BPE")
            || !plain("dropout")
            || !plain("unk_token")
            || !plain("continuing_subword_prefix")
            || !plain("end_of_word_suffix")
            || !plain("fuse_unk")
            || !plain("byte_fallback")
        {
            return None;
        }
        let ignore_merges = model.get("ignore_merges").and_then(Value::as_bool).unwrap_or(false);
        let vocab: HashMap<String, u32> = model
            .get("vocab")?
            .as_object()?
            .iter()
            .map(|(k, v)| v.as_u64().map(|id| (k.clone(), id as u32)))
            .collect::<Option<_>>()?;
        let chars = byte_chars();
        let mut byte_ids = [None; 256];
        for (b, c) in chars.iter().enumerate() {
            byte_ids[b] = vocab.get(&c.to_string()).copied();
        }
        let mut merges = HashMap::new();
        for (rank, m) in model.get("merges")?.as_array()?.iter().enumerate() {
            let (a, b) = match m {
                Value::String(s) => s.split_once(' ')?,
                Value::Array(p) if p.len() == 2 => (p[0].as_str()?, p[1].as_str()?),
                _ => return None,
            };
            let new_id = *vocab.get(&format!("{a}{b}"))?;
            merges.insert((*vocab.get(a)?, *vocab.get(b)?), (rank as u32, new_id));
        }
        let mut plain_tokens = (vec![], vec![]);
        let mut normalized_tokens = (vec![], vec![]);
        for t in doc.get("added_tokens").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]) {
            let flag = |k: &str| t.get(k).and_then(Value::as_bool).unwrap_or(false);
            if flag("single_word") || flag("lstrip") || flag("rstrip") {
                return None;
            }
            let content = t.get("content")?.as_str()?.to_string();
            let id = t.get("id")?.as_u64()? as u32;
            let target = if flag("normalized") { &mut normalized_tokens } else { &mut plain_tokens };
            target.0.push(content);
            target.1.push(id);
        }
        let mut added = vec![];
        for (patterns, ids) in [plain_tokens, normalized_tokens] {
            if patterns.is_empty() {
                continue;
            }
            let ac = AhoCorasickBuilder::new().match_kind(MatchKind::LeftmostLongest).build(&patterns).ok()?;
            added.push((ac, ids));
        }
        Some(FastBpe { byte_ids, merges, vocab, ignore_merges, digits, added, cache: RwLock::new(HashMap::new()) })
    }

    /// BPE of one pre-token: `(id, start, end)` per token, bytes within the pre-token.
    fn word(&self, w: &str) -> Vec<(u32, u32, u32)> {
        if let Some(hit) = self.cache.read().ok().and_then(|c| c.get(w).cloned()) {
            return hit;
        }
        let out = self.merge_word(w);
        if let Ok(mut c) = self.cache.try_write() {
            if c.len() >= CACHE_CAPACITY {
                c.clear();
            }
            c.insert(w.to_string(), out.clone());
        }
        out
    }

    fn merge_word(&self, w: &str) -> Vec<(u32, u32, u32)> {
        if self.ignore_merges {
            let chars = byte_chars();
            let spelled: String = w.bytes().map(|b| chars[b as usize]).collect();
            if let Some(id) = self.vocab.get(&spelled) {
                return vec![(*id, 0, w.len() as u32)];
            }
        }
        // symbols as a linked list; merges lowest rank first, leftmost on ties
        // (the order of `tokenizers`' Word::merge_all), O(n log n) for long words
        struct Sym {
            id: u32,
            start: u32,
            end: u32,
            prev: usize,
            next: usize,
            alive: bool,
        }
        const NONE: usize = usize::MAX;
        let mut syms: Vec<Sym> = w
            .bytes()
            .enumerate()
            .filter_map(|(i, b)| self.byte_ids[b as usize].map(|id| (id, i as u32)))
            .map(|(id, i)| Sym { id, start: i, end: i + 1, prev: NONE, next: NONE, alive: true })
            .collect();
        let n = syms.len();
        for i in 0..n {
            syms[i].prev = if i == 0 { NONE } else { i - 1 };
            syms[i].next = if i + 1 == n { NONE } else { i + 1 };
        }
        let mut heap = std::collections::BinaryHeap::new();
        for i in 0..n.saturating_sub(1) {
            if let Some(&(rank, new_id)) = self.merges.get(&(syms[i].id, syms[i + 1].id)) {
                heap.push(std::cmp::Reverse((rank, i, new_id)));
            }
        }
        while let Some(std::cmp::Reverse((rank, pos, new_id))) = heap.pop() {
            let next = syms[pos].next;
            if !syms[pos].alive || next == NONE {
                continue;
            }
            // skip entries made stale by earlier merges
            if self.merges.get(&(syms[pos].id, syms[next].id)) != Some(&(rank, new_id)) {
                continue;
            }
            syms[pos].id = new_id;
            syms[pos].end = syms[next].end;
            syms[next].alive = false;
            let after = syms[next].next;
            syms[pos].next = after;
            if after != NONE {
                syms[after].prev = pos;
                if let Some(&(r, id)) = self.merges.get(&(new_id, syms[after].id)) {
                    heap.push(std::cmp::Reverse((r, pos, id)));
                }
            }
            let before = syms[pos].prev;
            if before != NONE
                && let Some(&(r, id)) = self.merges.get(&(syms[before].id, new_id))
            {
                heap.push(std::cmp::Reverse((r, before, id)));
            }
        }
        syms.into_iter().filter(|s| s.alive).map(|s| (s.id, s.start, s.end)).collect()
    }

    /// Encodes a piece free of added tokens starting at `base` in the text.
    fn encode_piece(&self, text: &str, base: usize, ids: &mut Vec<u32>, offsets: &mut Vec<(usize, usize)>) {
        let mut pretoken = |a: usize, b: usize| {
            for (id, s, e) in self.word(&text[a..b]) {
                ids.push(id);
                offsets.push((base + a + s as usize, base + a + e as usize));
            }
        };
        if !self.digits {
            gpt2_split(text, &mut pretoken);
            return;
        }
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if c.is_numeric() {
                if start < i {
                    gpt2_split(&text[start..i], |a, b| pretoken(start + a, start + b));
                }
                pretoken(i, i + c.len_utf8());
                start = i + c.len_utf8();
            }
        }
        if start < text.len() {
            gpt2_split(&text[start..], |a, b| pretoken(start + a, start + b));
        }
    }

    fn encode_level(&self, level: usize, text: &str, base: usize, ids: &mut Vec<u32>, offsets: &mut Vec<(usize, usize)>) {
        let Some((ac, added_ids)) = self.added.get(level) else {
            self.encode_piece(text, base, ids, offsets);
            return;
        };
        let mut last = 0;
        for m in ac.find_iter(text) {
            if last < m.start() {
                self.encode_level(level + 1, &text[last..m.start()], base + last, ids, offsets);
            }
            ids.push(added_ids[m.pattern().as_usize()]);
            offsets.push((base + m.start(), base + m.end()));
            last = m.end();
        }
        if last < text.len() {
            self.encode_level(level + 1, &text[last..], base + last, ids, offsets);
        }
    }

    /// Ids of `text` and each token's byte range, widened to whole characters
    /// (a token holding part of a multi-byte character spans all of it).
    pub(crate) fn encode(&self, text: &str) -> (Vec<u32>, Vec<(usize, usize)>) {
        let mut ids = Vec::with_capacity(text.len() / 3);
        let mut offsets = Vec::with_capacity(text.len() / 3);
        self.encode_level(0, text, 0, &mut ids, &mut offsets);
        for (s, e) in offsets.iter_mut() {
            while !text.is_char_boundary(*s) {
                *s -= 1;
            }
            while !text.is_char_boundary(*e) {
                *e += 1;
            }
        }
        (ids, offsets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn onig_split(s: &str) -> Vec<String> {
        let re = tokenizers::utils::SysRegex::new(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+").unwrap();
        re.find_iter(s).map(|(a, b)| s[a..b].to_string()).collect()
    }

    fn ours(s: &str) -> Vec<String> {
        let mut out = vec![];
        gpt2_split(s, |a, b| out.push(s[a..b].to_string()));
        out
    }

    /// Random strings over a pool of awkward characters, split by both.
    #[test]
    fn gpt2_split_equals_the_regex() {
        let pool: Vec<char> = " \t\n\r\u{a0}\u{2009}\u{3000}\u{200b}aZé你ßǅʰ\u{301}1٣²½Ⅻ'''srvetlmd.,!?-_😀🇺\u{fe0f}\u{10fffd}\"#"
            .chars()
            .collect();
        let mut state = 7u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20000 {
            let len = (next() % 24) as usize;
            let s: String = (0..len).map(|_| pool[(next() % pool.len() as u64) as usize]).collect();
            assert_eq!(ours(&s), onig_split(&s), "{s:?}");
        }
        for s in ["I'm", "they'll've", "'S", " 'sup", "a  b", "a \n b", "x   ", "  \n\n  y", "é\u{301}", "1 2"] {
            assert_eq!(ours(s), onig_split(s), "{s:?}");
        }
    }

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let m = byte_chars();
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
        assert_eq!(m[b'a' as usize], 'a');
        let unique: std::collections::HashSet<char> = m.iter().copied().collect();
        assert_eq!(unique.len(), 256);
    }
}
