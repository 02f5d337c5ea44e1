"""VQA answer normalisation and accuracy, with the rules of the official VQA evaluation script
(GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py), written anew.

The official script's quirks are kept on purpose, since published numbers include them:

- punctuation: each mark of ``PUNCTUATION`` is deleted when it touches a space in the original
  text or when the text has a comma between two digits ("1,000" -> "1000"), and replaced by a
  space otherwise ("don't" -> "don t"); then every period not followed by a digit is deleted
  ("3." -> "3", "1.5" stays), at most 32 of them (the script passes ``re.UNICODE``, 32, as
  ``re.sub``'s count);
- words: lower-cased; number words zero to ten and "none" become digits, articles (a, an, the)
  are dropped, and the contractions table turns e.g. "dont" into "don’t" (with the typographic
  apostrophe U+2019, as the table writes most of its values);
- ground truth: annotators' answers only get the punctuation step, and only when they are not
  all identical; predictions get both steps.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "normalize_answer",
    "normalize_ground_truth",
    "normalize_punctuation",
    "normalize_words",
    "vqa_accuracy",
]

PUNCTUATION = (";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",", "?")
ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_Q = "\u2019"  # the typographic apostrophe most of the official table's entries use
# The official table, entry for entry (including its mixed apostrophes and odd entries).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": f"couldn{_Q}t{_Q}ve", f"couldnt{_Q}ve": f"couldn{_Q}t{_Q}ve", "didnt": f"didn{_Q}t",
    "doesnt": f"doesn{_Q}t", "dont": f"don{_Q}t", "hadnt": f"hadn{_Q}t", f"hadnt{_Q}ve": f"hadn{_Q}t{_Q}ve",
    "hadn'tve": f"hadn{_Q}t{_Q}ve", "hasnt": f"hasn{_Q}t", "havent": f"haven{_Q}t", "hed": f"he{_Q}d",
    f"hed{_Q}ve": f"he{_Q}d{_Q}ve", f"he{_Q}dve": f"he{_Q}d{_Q}ve", "hes": f"he{_Q}s", "howd": f"how{_Q}d",
    "howll": f"how{_Q}ll", "hows": f"how{_Q}s", f"Id{_Q}ve": f"I{_Q}d{_Q}ve", f"I{_Q}dve": f"I{_Q}d{_Q}ve",
    "Im": f"I{_Q}m", "Ive": f"I{_Q}ve", "isnt": f"isn{_Q}t", "itd": f"it{_Q}d", f"itd{_Q}ve": f"it{_Q}d{_Q}ve",
    f"it{_Q}dve": f"it{_Q}d{_Q}ve", "itll": f"it{_Q}ll", f"let{_Q}s": f"let{_Q}s", "maam": f"ma{_Q}am",
    "mightnt": f"mightn{_Q}t", f"mightnt{_Q}ve": f"mightn{_Q}t{_Q}ve", f"mightn{_Q}tve": f"mightn{_Q}t{_Q}ve",
    "mightve": f"might{_Q}ve", "mustnt": f"mustn{_Q}t", "mustve": f"must{_Q}ve", "neednt": f"needn{_Q}t",
    "notve": f"not{_Q}ve", "oclock": f"o{_Q}clock", "oughtnt": f"oughtn{_Q}t",
    f"ow{_Q}s{_Q}at": f"{_Q}ow{_Q}s{_Q}at", f"{_Q}ows{_Q}at": f"{_Q}ow{_Q}s{_Q}at",
    f"{_Q}ow{_Q}sat": f"{_Q}ow{_Q}s{_Q}at", "shant": f"shan{_Q}t", f"shed{_Q}ve": f"she{_Q}d{_Q}ve",
    f"she{_Q}dve": f"she{_Q}d{_Q}ve", f"she{_Q}s": f"she{_Q}s", "shouldve": f"should{_Q}ve",
    "shouldnt": f"shouldn{_Q}t", f"shouldnt{_Q}ve": f"shouldn{_Q}t{_Q}ve",
    f"shouldn{_Q}tve": f"shouldn{_Q}t{_Q}ve", f"somebody{_Q}d": "somebodyd",
    f"somebodyd{_Q}ve": f"somebody{_Q}d{_Q}ve", f"somebody{_Q}dve": f"somebody{_Q}d{_Q}ve",
    "somebodyll": f"somebody{_Q}ll", "somebodys": f"somebody{_Q}s", "someoned": f"someone{_Q}d",
    f"someoned{_Q}ve": f"someone{_Q}d{_Q}ve", f"someone{_Q}dve": f"someone{_Q}d{_Q}ve",
    "someonell": f"someone{_Q}ll", "someones": f"someone{_Q}s", "somethingd": f"something{_Q}d",
    f"somethingd{_Q}ve": f"something{_Q}d{_Q}ve", f"something{_Q}dve": f"something{_Q}d{_Q}ve",
    "somethingll": f"something{_Q}ll", "thats": f"that{_Q}s", "thered": f"there{_Q}d",
    f"thered{_Q}ve": f"there{_Q}d{_Q}ve", f"there{_Q}dve": f"there{_Q}d{_Q}ve", "therere": f"there{_Q}re",
    "theres": f"there{_Q}s", "theyd": f"they{_Q}d", f"theyd{_Q}ve": f"they{_Q}d{_Q}ve",
    f"they{_Q}dve": f"they{_Q}d{_Q}ve", "theyll": f"they{_Q}ll", "theyre": f"they{_Q}re",
    "theyve": f"they{_Q}ve", "twas": f"{_Q}twas", "wasnt": f"wasn{_Q}t", f"wed{_Q}ve": f"we{_Q}d{_Q}ve",
    f"we{_Q}dve": f"we{_Q}d{_Q}ve", "weve": "we've", "werent": f"weren{_Q}t", "whatll": f"what{_Q}ll",
    "whatre": f"what{_Q}re", "whats": f"what{_Q}s", "whatve": f"what{_Q}ve", "whens": f"when{_Q}s",
    "whered": f"where{_Q}d", "wheres": "where's", "whereve": f"where{_Q}ve", "whod": f"who{_Q}d",
    f"whod{_Q}ve": f"who{_Q}d{_Q}ve", f"who{_Q}dve": f"who{_Q}d{_Q}ve", "wholl": f"who{_Q}ll",
    "whos": f"who{_Q}s", "whove": "who've", "whyll": f"why{_Q}ll", "whyre": f"why{_Q}re",
    "whys": f"why{_Q}s", "wont": f"won{_Q}t", "wouldve": f"would{_Q}ve", "wouldnt": f"wouldn{_Q}t",
    f"wouldnt{_Q}ve": f"wouldn{_Q}t{_Q}ve", f"wouldn{_Q}tve": f"wouldn{_Q}t{_Q}ve", "yall": f"y{_Q}all",
    f"yall{_Q}ll": f"y{_Q}all{_Q}ll", f"y{_Q}allll": f"y{_Q}all{_Q}ll", f"yall{_Q}d{_Q}ve": f"y{_Q}all{_Q}d{_Q}ve",
    f"y{_Q}alld{_Q}ve": f"y{_Q}all{_Q}d{_Q}ve", f"y{_Q}all{_Q}dve": f"y{_Q}all{_Q}d{_Q}ve",
    "youd": f"you{_Q}d", f"youd{_Q}ve": f"you{_Q}d{_Q}ve", f"you{_Q}dve": f"you{_Q}d{_Q}ve",
    "youll": f"you{_Q}ll", "youre": f"you{_Q}re", "youve": f"you{_Q}ve",
}
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_OFFICIAL_PERIOD_COUNT = 32  # re.UNICODE, which the official script passes as re.sub's count
_MATCHES_FOR_FULL_CREDIT = 3


def normalize_punctuation(text: str) -> str:
    """The official ``processPunctuation`` (see the module docstring)."""
    drop_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if touches_space or drop_all else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def normalize_words(text: str) -> str:
    """The official ``processDigitArticle``: lower case, number words -> digits, no articles, contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """A predicted answer as the official script compares it."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return normalize_words(normalize_punctuation(text))


def normalize_ground_truth(answers: Sequence[str]) -> list[str]:
    """Annotators' answers as the official script compares them: punctuation only, and only when
    they disagree."""
    if len(set(answers)) > 1:
        return [normalize_punctuation(answer) for answer in answers]
    return list(answers)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """min(#matches / 3, 1) averaged over the leave-one-annotator-out subsets (10 choose 9 for
    VQAv2's ten answers); the prediction is normalised here, the answers as ground truth."""
    if not answers:
        raise ValueError("a VQA question needs at least one ground-truth answer to be scored")
    predicted = normalize_answer(prediction)
    truth = normalize_ground_truth(answers)
    matches = sum(answer == predicted for answer in truth)
    # Leaving out annotator i removes one match exactly when annotator i matched.
    total = sum(
        min(1.0, (matches - (answer == predicted)) / _MATCHES_FOR_FULL_CREDIT) for answer in truth
    )
    return total / len(truth)
