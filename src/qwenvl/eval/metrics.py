"""Benchmark metrics with the official definitions, computed in-process (no Java, no downloads).

- Grounding: Acc@0.5 of the official Qwen-VL refcoco eval (``eval_mm/evaluate_grounding.py``).
- VQA: the VQAv2 accuracy of the VQA API's ``vqaEval.py`` (GT-Vision-Lab/VQA), which Qwen-VL's
  ``eval_mm/vqa_eval.py`` copies: answer normalization, then min(1, matches/3) averaged over the
  leave-one-annotator-out subsets.
- Captioning: CIDEr as ``pycocoevalcap.cider.Cider`` computes it (that is CIDEr-D: clipping + Gaussian
  length penalty, sigma 6), on captions tokenized by a Python approximation of coco-caption's PTBTokenizer.
- Exact match (GQA, AI2D in Qwen-VL's eval) and relaxed accuracy (ChartQA).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

from qwenvl.grounding import BoxLike, iou

__all__ = [
    "cider",
    "exact_match",
    "grounding_accuracy",
    "grounding_iou",
    "normalize_vqa_answer",
    "ptb_tokenize",
    "relaxed_correctness",
    "vqa_accuracy",
    "vqa_score",
]

# ---------------------------------------------------------------------------------------------------------
# Grounding
# ---------------------------------------------------------------------------------------------------------


def grounding_iou(prediction: BoxLike, target: BoxLike) -> float:
    """IoU of a predicted box with its target as the official refcoco eval computes it (torchvision
    ``box_iou`` on the boxes as written): a prediction whose corners are reversed (x2 < x1 or y2 < y1) has no
    intersection with any box there, so it scores 0 here too rather than being sorted into a valid box as
    :func:`qwenvl.grounding.iou` does.
    """
    x1, y1, x2, y2 = (float(v) for v in prediction)
    if x2 < x1 or y2 < y1:
        return 0.0
    return iou(prediction, target)


def grounding_accuracy(
    predictions: Sequence[BoxLike | None], targets: Sequence[BoxLike], threshold: float = 0.5
) -> float:
    """Fraction (0..1) of predictions whose IoU with their target is >= ``threshold``; None counts as wrong.

    Boxes are pixels in both lists (map model output with ``denormalize_box(..., scale=999)`` as the
    official eval does). IoU as in :func:`grounding_iou`, i.e. torchvision's, no +1; a prediction with
    reversed corners is wrong, as there.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    if not targets:
        raise ValueError("grounding_accuracy of an empty set is undefined")
    correct = sum(1 for p, t in zip(predictions, targets) if p is not None and grounding_iou(p, t) >= threshold)
    return correct / len(targets)


# ---------------------------------------------------------------------------------------------------------
# VQA (vqaEval.py)
# ---------------------------------------------------------------------------------------------------------

# The official table, keys without apostrophes (as annotators typed them) -> the canonical spelling.
# Some entries are odd ("somebody'd" -> "somebodyd") but they are the official ones, kept for parity.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_VQA_PUNCT = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip
# The official pattern is "(?!<=\d)(\.)(?!\d)": its "(?!<=" is a typo for a lookbehind and never fires, so
# in effect every period not followed by a digit is removed ("2.5" keeps its point, "dog." loses it).
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official call passes re.UNICODE (= 32) where re.sub takes `count`: at most 32 periods are removed.
_PERIOD_STRIP_COUNT = 32


def _vqa_punctuation(text: str) -> str:
    """vqaEval's processPunctuation: a mark touching a space (or any mark when a digit,digit comma is in
    the text) is deleted, otherwise it becomes a space; then periods not before a digit go."""
    digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in _VQA_PUNCT:
        if digit_comma or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _vqa_digits_articles(text: str) -> str:
    """vqaEval's processDigitArticle: lowercase, number words -> digits, drop articles, fix contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """A predicted answer as vqaEval normalizes it: "Two." -> "2", "the dog's" -> "dog's", "dont" -> "don't"."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text))


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQAv2 accuracy (0..1) of one prediction against its annotators' answers (10 in VQAv2).

    Exactly vqaEval.py: the prediction is fully normalized (:func:`normalize_vqa_answer`); the ground-truth
    answers only get the punctuation step, and only when they are not all identical: the annotation files
    already hold normalized answers, so pass ``answers[i]["answer"]`` from them as is. Accuracy is the mean,
    over each annotator i left out, of ``min(1, #(other answers == prediction) / 3)``.
    """
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = normalize_vqa_answer(prediction)
    answers = list(gt_answers)
    if len(set(answers)) > 1:
        answers = [_vqa_punctuation(a) for a in answers]
    matches = sum(1 for a in answers if a == pred)
    total = 0.0
    for a in answers:  # leaving out annotator i removes one match exactly when answer i matches
        total += min(1.0, (matches - (a == pred)) / 3)
    return total / len(answers)


def vqa_score(predictions: Sequence[str], gt_answers: Sequence[Sequence[str]]) -> float:
    """Mean :func:`vqa_accuracy` **in percent** (0..100), the number VQAv2 papers report.

    Not rounded; vqaEval rounds its printed overall to 2 decimals.
    """
    if len(predictions) != len(gt_answers):
        raise ValueError(f"{len(predictions)} predictions for {len(gt_answers)} questions")
    if not predictions:
        raise ValueError("vqa_score of an empty set is undefined")
    return 100.0 * sum(vqa_accuracy(p, g) for p, g in zip(predictions, gt_answers)) / len(predictions)


def exact_match(prediction: str, targets: str | Sequence[str]) -> float:
    """1.0 if the prediction equals any target after ``strip().lower()``, else 0.0 (Qwen-VL's GQA/AI2D)."""
    options = [targets] if isinstance(targets, str) else list(targets)
    pred = prediction.strip().lower()
    return 1.0 if any(pred == t.strip().lower() for t in options) else 0.0


def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA's relaxed accuracy: numbers within 5% of a nonzero target count; else exact (case-insensitive).

    "12%" (or "12%%": every trailing percent sign goes, as there) reads as 0.12. The relative change is taken w.r.t. the target, as in the ChartQA/Pix2Struct
    definition (Qwen-VL's eval script passes the arguments the other way round).
    """
    pred, tgt = prediction.strip(), target.strip()
    pred_value, target_value = _to_float(pred), _to_float(tgt)
    if pred_value is not None and target_value:
        return abs(pred_value - target_value) / abs(target_value) <= max_relative_change
    return pred.lower() == tgt.lower()


# ---------------------------------------------------------------------------------------------------------
# CIDEr (pycocoevalcap cider_scorer.py)
# ---------------------------------------------------------------------------------------------------------

# Tokens coco-caption's PTBTokenizer output drops (its PUNCTUATIONS list), plus the raw brackets and double
# quote that the Java tokenizer first rewrites into such tokens (-LRB-, ``, ...).
_PTB_DROP = frozenset(
    {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"', "(", ")", "[", "]", "{", "}"}
)
_CLITIC_NT = re.compile(r"(?<=\w)n't\b")
_CLITIC = re.compile(r"(?<=\w)'(s|re|ve|m|ll|d)\b")
_PTB_TOKEN = re.compile(
    r"""n't|'(?:s|re|ve|m|ll|d)\b        # clitics split off below
    | \d+(?:[.,:/]\d+)+                  # 1,000  3.5  10:30  1/2
    | (?:[^\W\d_]\.){2,}                 # abbreviations: u.s.  a.m.
    | \w+(?:[-'&/]\w+)*                  # words, incl. t-shirt, o'clock, black-and-white
    | \.\.\.|--|\S                       # any other symbol on its own
    """,
    re.VERBOSE,
)


def ptb_tokenize(text: str) -> list[str]:
    """Lowercased tokens approximating Stanford PTBTokenizer (``-lowerCase``) minus coco-caption's punctuation.

    Splits clitics as PTB does ("don't" -> "do n't", "man's" -> "man 's"), keeps hyphenated words and
    numbers whole, drops punctuation tokens. An approximation: rare constructs may tokenize differently
    from the Java tool, which is why scores can differ from coco-caption's in the last digits.
    """
    text = text.replace("\n", " ").lower()
    text = _CLITIC_NT.sub(" n't", text)
    text = _CLITIC.sub(r" '\1", text)
    return [t for t in _PTB_TOKEN.findall(text) if t not in _PTB_DROP]


NGramCounts = Counter[tuple[str, ...]]


def _ngrams(words: Sequence[str], n: int) -> NGramCounts:
    counts: NGramCounts = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def _tfidf(
    counts: NGramCounts, doc_freq: Mapping[tuple[str, ...], int], log_n_docs: float, n: int
) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
    """Per-order tf-idf vectors, their norms and the caption "length" as cider_scorer's counts2vec.

    idf = log(#images) - log(max(1, df)): n-grams absent from all references weigh as if seen once.
    The length is the number of *bigrams* (cider_scorer counts ``n == 1`` with n = len(ngram) - 1); kept
    for parity, it only changes the length penalty of empty/one-word captions.
    """
    vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
    norm_sq = [0.0] * n
    length = 0
    for gram, tf in counts.items():
        order = len(gram) - 1
        weight = tf * (log_n_docs - math.log(max(1.0, doc_freq.get(gram, 0))))
        vec[order][gram] = weight
        norm_sq[order] += weight * weight
        if order == 1:
            length += tf
    return vec, [math.sqrt(v) for v in norm_sq], length


def cider(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
    tokenize: bool = True,
) -> tuple[float, dict[Hashable, float]]:
    """Corpus CIDEr-D and per-image scores, as ``pycocoevalcap.cider.Cider().compute_score`` returns them.

    Per image: for each reference and each n-gram order k = 1..n, cosine of tf-idf vectors where the
    candidate's weight is clipped to the reference's (``min(c, r) * r``), times the Gaussian length penalty
    ``exp(-delta^2 / (2 sigma^2))``; averaged over the orders, then over references, times 10. Document
    frequencies come from the references of *this* corpus (coco-caption's default, "corpus" df mode), so
    the score of an image depends on the whole set. Consequence: a 1-image corpus always scores 0, since
    every idf is log(1) - log(1) = 0. Scores are not capped at 10. Captions are tokenized with
    :func:`ptb_tokenize` unless ``tokenize=False`` (then split on whitespace, as cider_scorer does).
    """
    if set(candidates) != set(references):
        raise ValueError("candidates and references must have the same ids")
    if not references:
        raise ValueError("cider of an empty corpus is undefined")
    split = ptb_tokenize if tokenize else str.split
    ids = list(references)
    cand_counts = {i: _ngrams(split(candidates[i]), n) for i in ids}
    ref_counts: dict[Hashable, list[NGramCounts]] = {}
    for i in ids:
        if not references[i]:
            raise ValueError(f"image {i!r} has no reference captions")
        ref_counts[i] = [_ngrams(split(r), n) for r in references[i]]

    doc_freq: Counter[tuple[str, ...]] = Counter()
    for refs in ref_counts.values():
        doc_freq.update(set().union(*refs))
    log_n_docs = math.log(float(len(ids)))

    per_id: dict[Hashable, float] = {}
    for i in ids:
        vec, norm, length = _tfidf(cand_counts[i], doc_freq, log_n_docs, n)
        total = [0.0] * n
        for ref in ref_counts[i]:
            vec_ref, norm_ref, length_ref = _tfidf(ref, doc_freq, log_n_docs, n)
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = sum(min(w, vec_ref[k].get(g, 0.0)) * vec_ref[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and norm_ref[k] != 0:
                    val /= norm[k] * norm_ref[k]
                total[k] += val * penalty
        per_id[i] = sum(total) / n / len(ref_counts[i]) * 10.0
    return sum(per_id.values()) / len(per_id), per_id
