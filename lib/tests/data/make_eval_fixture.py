"""Writes eval_parity_fixture.json.gz: 2,400 (prediction, references) pairs and the values the
reference implementations give them, checked row by row by lib/src/eval/parity_tests.rs.

The pairs cover ASCII sentences, accented Latin, Greek, Cyrillic, CJK, Korean and emoji,
empty and whitespace-only strings, heavy punctuation, digits and dates, articles, words the
Porter stemmer changes, several references per row and multi-line text. Values:

* rouge-score 0.1.2 (`RougeScorer(..., use_stemmer=False/True).score_multi`): ROUGE-1/2/L/Lsum
  precision, recall, F-measure (NLTK's Porter stemmer with `use_stemmer=True`);
* sacrebleu 2.6.0: `sentence_bleu`, `sentence_chrf` (chrF and chrF++) per row and
  `corpus_bleu` / `corpus_chrf` over all rows (a row with fewer references pads with None,
  sacrebleu's way of varying the number of references);
* lm-evaluation-harness 0.4.x `exact_match_hf_evaluate` (its few lines, repeated below): raw, and with regexes_to_ignore + ignore_case +
  ignore_punctuation + ignore_numbers;
* lm-evaluation-harness's multiple-choice `acc` / `acc_norm` from 400 fixed log-likelihood
  arrays (ties included);
* llm-foundry's generation accuracy (normalised prefix match), SQuAD v1.1's token F1, and
  the per-row BLEU MLflow logs (Hugging Face `evaluate`'s `bleu`, i.e. tensorflow-nmt's
  `compute_bleu` without smoothing, 0 for empty text and where it divides by zero).

    ~/.cache/tunebook/refvenv/bin/python lib/tests/data/make_eval_fixture.py
"""
import collections
import gzip
import json
import math
import os
import random
import re
import string

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

ROWS = 2400
rng = random.Random(20261207)

ASCII = """the a an of to in is was for on that with as by at from it this be are or his her
cat dog mat sat running runs ran runner runners flies flying flew happily happiness happy
generalization general relational conditional caresses ponies agreed hopping filing sky
skies dying lying news controlled controlling rational operator hopefulness callousness
formalize electrical goodness adjustable dependent adoption communism activate effective
capital France Paris Berlin river model answer question date July May 1976 2024 05 01
42 3.14 100,000 e.g. U.S.A. co-op well-known it's don't isn't""".split()
UNICODE = """naïve café résumé Zürich Ærøskøbing straße İstanbul ﬁne Σίσυφος ΟΔΥΣΣΕΥΣ
Ключ Москва 東京 晴れ 北京市 日本語 한국어 안녕하세요 ١٢٣ ２０２４ 😀 🚀 Ångström façade
œuvre niño Ŝ ǅ ﬀ""".split()
PUNCT = list(".,;:!?-—–'\"()[]{}<>/\\|@#$%^&*_~`‘’´“”…")
SPACES = [" ", "  ", "\t", "\n", "\u00a0", "\u3000", "\x1c", " \n "]


def words(n, pool):
    return [rng.choice(pool) for _ in range(n)]


def sentence(pool=ASCII, lo=1, hi=14):
    ws = words(rng.randint(lo, hi), pool)
    if rng.random() < 0.3:
        ws[0] = ws[0].capitalize()
    s = " ".join(ws)
    if rng.random() < 0.5:
        s += rng.choice([".", "!", "?", "", " ."])
    return s


def perturb(s):
    ws = s.split(" ")
    for _ in range(rng.randint(0, 3)):
        op = rng.random()
        if op < 0.25 and len(ws) > 1:
            ws.pop(rng.randrange(len(ws)))
        elif op < 0.5:
            ws.insert(rng.randrange(len(ws) + 1), rng.choice(ASCII))
        elif op < 0.75 and len(ws) > 1:
            i, j = rng.randrange(len(ws)), rng.randrange(len(ws))
            ws[i], ws[j] = ws[j], ws[i]
        else:
            i = rng.randrange(len(ws))
            ws[i] = ws[i].upper() if rng.random() < 0.5 else ws[i] + rng.choice(PUNCT)
    return " ".join(ws)


def make_row(i):
    kind = i % 12
    if kind == 0:  # plain ASCII, one reference, close to it
        r = sentence()
        return perturb(r), [r]
    if kind == 1:  # several references
        refs = [sentence() for _ in range(rng.randint(2, 4))]
        return perturb(rng.choice(refs)), refs
    if kind == 2:  # Unicode and CJK, mixed with ASCII
        pool = UNICODE + ASCII[:40]
        r = sentence(pool)
        return (perturb(r) if rng.random() < 0.7 else sentence(pool)), [r, sentence(pool)][: rng.randint(1, 2)]
    if kind == 3:  # empty and whitespace-only
        choices = ["", rng.choice(SPACES), sentence(), "".join(rng.choice(SPACES) for _ in range(3))]
        return rng.choice(choices), [rng.choice(choices)]
    if kind == 4:  # heavy punctuation
        r = "".join(rng.choice(PUNCT + [" "] + list("abc12")) for _ in range(rng.randint(1, 40)))
        return "".join(rng.choice(PUNCT + [" ", "a", "b"]) for _ in range(rng.randint(0, 30))), [r]
    if kind == 5:  # multi-line text (rougeLsum)
        r = "\n".join(sentence() for _ in range(rng.randint(1, 5)))
        lines = r.split("\n")
        rng.shuffle(lines)
        p = "\n".join(perturb(x) for x in lines[: rng.randint(1, len(lines))])
        if rng.random() < 0.2:
            p += "\n\n" + sentence()
        return p, [r]
    if kind == 6:  # dates and numbers
        y, m, d = rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28)
        r = f"{y:04d}-{m:02d}-{d:02d}"
        forms = [r, f"{y}-{m}-{d}", f"{d}/{m}/{y}", f" {r}\n", f"The date is {r}.", f"{y:04d}-{d:02d}-{m:02d}", r + " (approx.)"]
        return rng.choice(forms), [r]
    if kind == 7:  # articles and case (SQuAD / llm-foundry normalisation)
        r = " ".join(words(rng.randint(1, 5), ["the", "a", "an", "The", "A", "Paris", "cat", "answer", "theory", "another"]))
        p = rng.choice([r.upper(), r.lower() + ".", "the " + r, r + ", the end", "_" + r + "_", "‘" + r + "’", r])
        return p, [r]
    if kind == 8:  # exact copies and near copies
        r = sentence(ASCII + UNICODE)
        return rng.choice([r, r + " ", " " + r, r.lower(), r.replace(" ", "  ")]), [r]
    if kind == 9:  # stemming: inflected forms of the same words
        base = words(rng.randint(2, 10), ["run", "running", "runs", "runner", "fly", "flies", "flying", "happy", "happiness",
                                          "general", "generalization", "relate", "relational", "control", "controlled", "hop", "hopping", "sky", "skies"])
        return " ".join(rng.choice([w, w + "s", w + "ing", w + "ed"]) for w in base), [" ".join(base)]
    if kind == 10:  # long texts
        r = " ".join(sentence() for _ in range(rng.randint(3, 8)))
        return perturb(perturb(r)), [r, perturb(r)]
    # unrelated
    return sentence(), [sentence(ASCII + UNICODE)]


# --- lm-evaluation-harness 0.4 `exact_match_hf_evaluate`
# numpy's fixed-width string arrays cut a string that lower-casing lengthens (İ -> i̇) to the
# array's width; lm-evaluation-harness passes a whole task's answers at once, so the width is
# ample there. A wide padding element gives the same room here.
PAD = " " * 4096


def lm_eval_exact_match(pred, refs, regexes_to_ignore=None, ignore_case=False, ignore_punctuation=False, ignore_numbers=False):
    best = 0.0
    for ref in refs:
        predictions, references = np.asarray([pred, PAD]), np.asarray([ref, PAD])
        if regexes_to_ignore is not None:
            for s in regexes_to_ignore:
                predictions = np.array([re.sub(s, "", x) for x in predictions])
                references = np.array([re.sub(s, "", x) for x in references])
        if ignore_case:
            predictions = np.char.lower(predictions)
            references = np.char.lower(references)
        if ignore_punctuation:
            repl_table = string.punctuation.maketrans("", "", string.punctuation)
            predictions = np.char.translate(predictions, table=repl_table)
            references = np.char.translate(references, table=repl_table)
        if ignore_numbers:
            repl_table = string.digits.maketrans("", "", string.digits)
            predictions = np.char.translate(predictions, table=repl_table)
            references = np.char.translate(references, table=repl_table)
        best = max(best, float((predictions == references)[0]))
    return best


# --- llm-foundry's normalize_answer and prefix match
def foundry_normalize(answer):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def handle_punc(text):
        exclude = set(string.punctuation + "".join(["‘", "’", "´", "`"]))
        return "".join(ch if ch not in exclude else " " for ch in text)

    def lower(text):
        return text.lower()

    def replace_underscore(text):
        return text.replace("_", " ")

    return white_space_fix(remove_articles(handle_punc(lower(replace_underscore(answer))))).strip()


def prefix_match(pred, refs):
    p = foundry_normalize(pred)
    return float(any(p.startswith(foundry_normalize(r)) for r in refs))


# --- SQuAD v1.1 official evaluation script
def squad_normalize(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def squad_f1(pred, refs):
    def f1(prediction, ground_truth):
        prediction_tokens = squad_normalize(prediction).split()
        ground_truth_tokens = squad_normalize(ground_truth).split()
        common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
        num_same = sum(common.values())
        if num_same == 0:
            return 0
        precision = 1.0 * num_same / len(prediction_tokens)
        recall = 1.0 * num_same / len(ground_truth_tokens)
        return (2 * precision * recall) / (precision + recall)

    return float(max(f1(pred, r) for r in refs))


# --- MLflow's per-row bleu: evaluate.load("bleu") = tensorflow-nmt compute_bleu + tokenizer_13a
def _ngrams(segment, max_order):
    c = collections.Counter()
    for order in range(1, max_order + 1):
        for i in range(0, len(segment) - order + 1):
            c[tuple(segment[i : i + order])] += 1
    return c


def compute_bleu(reference_corpus, translation_corpus, max_order=4, smooth=False):
    matches_by_order = [0] * max_order
    possible_matches_by_order = [0] * max_order
    reference_length = 0
    translation_length = 0
    for references, translation in zip(reference_corpus, translation_corpus):
        reference_length += min(len(r) for r in references)
        translation_length += len(translation)
        merged_ref_ngram_counts = collections.Counter()
        for reference in references:
            merged_ref_ngram_counts |= _ngrams(reference, max_order)
        translation_ngram_counts = _ngrams(translation, max_order)
        overlap = translation_ngram_counts & merged_ref_ngram_counts
        for ngram in overlap:
            matches_by_order[len(ngram) - 1] += overlap[ngram]
        for order in range(1, max_order + 1):
            possible_matches = len(translation) - order + 1
            if possible_matches > 0:
                possible_matches_by_order[order - 1] += possible_matches
    precisions = [0] * max_order
    for i in range(0, max_order):
        if possible_matches_by_order[i] > 0:
            precisions[i] = float(matches_by_order[i]) / possible_matches_by_order[i]
        else:
            precisions[i] = 0.0
    if min(precisions) > 0:
        p_log_sum = sum((1.0 / max_order) * math.log(p) for p in precisions)
        geo_mean = math.exp(p_log_sum)
    else:
        geo_mean = 0
    ratio = float(translation_length) / reference_length
    bp = 1.0 if ratio > 1.0 else math.exp(1 - 1.0 / ratio)
    return geo_mean * bp


TOK13A = Tokenizer13a()


def hf_bleu(pred, refs):
    if len(pred) == 0 or any(len(r) == 0 for r in refs):
        return 0.0
    try:
        return float(compute_bleu([[TOK13A(r).split() for r in refs]], [TOK13A(pred).split()]))
    except ZeroDivisionError:
        return 0.0


# --- lm-evaluation-harness 0.4 multiple-choice `process_results`: acc and acc_norm
def mc_item(i):
    n = rng.randint(2, 5)
    choices = [sentence(ASCII + UNICODE, 1, 6) for _ in range(n)]
    lls = [round(-rng.random() * 30, rng.choice([1, 2, 8])) for _ in range(n)]
    if rng.random() < 0.2:
        lls[rng.randrange(n)] = max(lls)  # a tie: the first maximum wins
    gold = sorted(rng.sample(range(n), rng.choice([1, 1, 1, 2])))
    lls_a = np.array(lls)
    completion_len = np.array([float(len(c)) for c in choices])
    pred, pred_norm = np.argmax(lls_a), np.argmax(lls_a / completion_len)
    return {"loglikelihoods": lls, "choices": choices, "gold": gold,
            "acc": 1.0 if pred in gold else 0.0, "acc_norm": 1.0 if pred_norm in gold else 0.0}


def main():
    rows = [make_row(i) for i in range(ROWS)]
    mc = [mc_item(i) for i in range(400)]
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorers = {stem: rouge_scorer.RougeScorer(types, use_stemmer=stem) for stem in (False, True)}
    chrf, chrfpp = sacrebleu.CHRF(), sacrebleu.CHRF(word_order=2)
    regexes = ["(?i)answer:", "[,;]"]
    out_rows = []
    for pred, refs in rows:
        r = {"prediction": pred, "references": refs}
        r["exact_match"] = float(any(pred.strip() == x.strip() for x in refs))
        r["exact_match_raw"] = lm_eval_exact_match(pred, refs)
        r["exact_match_all_options"] = lm_eval_exact_match(pred, refs, regexes, True, True, True)
        r["prefix_match"] = prefix_match(pred, refs)
        r["f1"] = squad_f1(pred, refs)
        for stem in (False, True):
            scores = scorers[stem].score_multi(refs, pred)
            for t in types:
                s = scores[t]
                r[t + ("_stem" if stem else "")] = [s.precision, s.recall, s.fmeasure]
        r["bleu"] = sacrebleu.sentence_bleu(pred, refs).score
        r["bleu_hf"] = hf_bleu(pred, refs)
        r["chrf"] = chrf.sentence_score(pred, refs).score
        r["chrf_pp"] = chrfpp.sentence_score(pred, refs).score
        out_rows.append(r)
    width = max(len(refs) for _, refs in rows)
    streams = [[refs[k] if k < len(refs) else None for _, refs in rows] for k in range(width)]
    hyps = [p for p, _ in rows]
    corpus = {
        "bleu": sacrebleu.corpus_bleu(hyps, streams).score,
        "chrf": sacrebleu.CHRF().corpus_score(hyps, streams).score,
        "chrf_pp": sacrebleu.CHRF(word_order=2).corpus_score(hyps, streams).score,
    }
    # Floats as Python's repr (shortest round-trip) strings: the reader parses them exactly.
    def exact(v):
        if isinstance(v, float):
            return repr(v)
        if isinstance(v, list):
            return [exact(x) for x in v]
        if isinstance(v, dict):
            return {k: (x if k in ("prediction", "references") else exact(x)) for k, x in v.items()}
        return v

    out_rows = [exact(r) for r in out_rows]
    corpus = exact(corpus)
    doc = {
        "made_by": f"make_eval_fixture.py with sacrebleu {sacrebleu.__version__}, rouge-score 0.1.2",
        "exact_match_regexes": regexes,
        "corpus": corpus,
        "rows": out_rows,
        "multiple_choice": mc,
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_parity_fixture.json.gz")
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode())
    print(f"wrote {path}: {len(out_rows)} rows, corpus {corpus}")


if __name__ == "__main__":
    main()
