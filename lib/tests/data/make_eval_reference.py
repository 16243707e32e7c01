"""Writes eval_metrics_reference.json: sacrebleu's 13a tokenization, BLEU and chrF/chrF++
scores (corpus and sentence) for cases that exercise punctuation, digits, entities, Unicode,
several references, lower-casing and hypotheses without matches, and rouge-score's
ROUGE-1/2/L without stemming. Checked by lib/src/eval/metrics.rs. Run with a Python that
has them (sacrebleu 2.6.0 and rouge-score 0.1.2 made the file):

    pip install sacrebleu==2.6.0 rouge-score==0.1.2 && python lib/tests/data/make_eval_reference.py
"""
import json
import os

import sacrebleu
from rouge_score import rouge_scorer
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

TOKENIZE = [
    "Hello, world!",
    "The price is $3.50, not 3,000.",
    "e.g. U.S.A. vs. U.K.",
    "1990-2000 and well-known co-op",
    "She said &quot;yes&quot; &amp; left &lt;now&gt;.",
    "tabs\tand\nnewlines-\nhere <skipped> too",
    "naïve café — résumé… 東京は晴れ。",
    "a{b}c[d]e|f~g^h`i@j#k%l*m+n=o/p\\q",
    "ends with comma,",
    ".leading period",
    "3.14159 and 2,5 and 1.-2",
    "x\x1cy\x1fz\u00a0w",
    "",
]

CASES = [
    {"name": "two references", "lowercase": False,
     "hypotheses": ["The cat sat on the mat.", "It is raining today, isn't it?", "2024-05-01"],
     "references": [["The cat is sitting on the mat.", "It rains today, doesn't it?", "2024-05-01"],
                    ["A cat sat on the mat.", "Today it is raining.", "May 1, 2024"]]},
    {"name": "lowercase", "lowercase": True,
     "hypotheses": ["THE QUICK brown fox", "Jumps Over the lazy dog."],
     "references": [["the quick brown fox jumps", "jumps over the lazy dog"]]},
    {"name": "no matches and an empty hypothesis", "lowercase": False,
     "hypotheses": ["completely different words", "", "short"],
     "references": [["nothing in common here", "something", "a much longer reference sentence than the hypothesis"]]},
    {"name": "dates", "lowercase": False,
     "hypotheses": ["1977-07-07", "1976-04-04", "The 4th of July, 1976", "2001-09-11"],
     "references": [["1977-07-07", "1976-07-04", "1976-07-04", "2001-09-11"]]},
]


ROUGE = [
    ("The cat sat on the mat.", "The cat is on the mat."),
    ("the the the the", "the cat the"),
    ("Paris is the capital of France.", "The capital of France is Paris."),
    ("1976-07-04", "1976-04-04"),
    ("Running runners run quickly!", "A runner runs quick."),
    ("Émile visited Zürich in 2019; it rained.", "emile visited zurich in 2019 it rained"),
    ("東京は晴れ", "東京は雨"),
    ("", "something"),
    ("one two three four five", ""),
    ("a b c d e f g h", "h g f e d c b a"),
]


def main():
    tok = Tokenizer13a()
    out = {"sacrebleu": sacrebleu.__version__, "tokenize_13a": [[s, tok(s)] for s in TOKENIZE], "bleu": []}
    for case in CASES:
        bleu = sacrebleu.BLEU(lowercase=case["lowercase"])
        corpus = bleu.corpus_score(case["hypotheses"], case["references"]).score
        sbleu = sacrebleu.BLEU(lowercase=case["lowercase"], effective_order=True)
        sentence = [sbleu.sentence_score(h, [r[i] for r in case["references"]]).score for i, h in enumerate(case["hypotheses"])]
        row = {**case, "corpus": corpus, "sentence": sentence}
        if not case["lowercase"]:
            for key, word_order in (("chrf", 0), ("chrf++", 2)):
                chrf = sacrebleu.CHRF(word_order=word_order)
                row[key] = {"corpus": chrf.corpus_score(case["hypotheses"], case["references"]).score,
                            "sentence": [chrf.sentence_score(h, [r[i] for r in case["references"]]).score
                                         for i, h in enumerate(case["hypotheses"])]}
        out["bleu"].append(row)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    out["rouge_score"] = "0.1.2"
    out["rouge"] = []
    for target, prediction in ROUGE:
        scores = scorer.score(target, prediction)
        out["rouge"].append({"target": target, "prediction": prediction,
                             **{k: {"precision": v.precision, "recall": v.recall, "fmeasure": v.fmeasure} for k, v in scores.items()}})
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_metrics_reference.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
