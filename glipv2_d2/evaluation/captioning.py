"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr (and optionally SPICE) through pycocoevalcap,
the COCO caption evaluation code, as a Detectron2 ``DatasetEvaluator``. Results use the COCO caption
names (Bleu_1 .. Bleu_4, METEOR, ROUGE_L, CIDEr, SPICE): Detectron2's summary leaves out names with "-".

Java: pycocoevalcap's PTB tokenizer, METEOR and SPICE run Java programs (their jars ship in the
pycocoevalcap 1.2 wheel). Without a Java runtime the evaluator says so in its results
(``java_runtime`` 0), skips METEOR and SPICE, and tokenizes with ``python_ptb_tokenize``: lower
case, words split from punctuation and clitics ("dog's" -> "dog 's", "don't" -> "do n't"), the
punctuation tokens the COCO code removes dropped. On plain captions this equals the Java tokenizer;
it differs on rare forms (abbreviations with periods, some quotes), so scores with and without Java
may differ slightly.

SPICE is off by default: its first use downloads Stanford CoreNLP 3.6.0 (about 400 MB) from
nlp.stanford.edu into the pycocoevalcap package, which fails offline; turn it on with
``use_spice=True`` (TEST.CAPTION_SPICE) where that download is possible or already done.

Scores are reported x100 (CIDEr 1.2 -> 120), as caption papers print them. With a
``baseline_caption`` the same metrics are also computed for that one caption given to every image
(the most frequent training caption), under "caption_baseline".
"""

from __future__ import annotations

import itertools
import logging
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

__all__ = ["CaptionEvaluator", "java_runtime_available", "most_frequent_caption", "python_ptb_tokenize"]

logger = logging.getLogger(__name__)

# Tokens pycocoevalcap's PTBTokenizer removes after tokenizing.
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                             ".", "?", "!", ",", ":", "-", "--", "...", ";"])
_PTB_TOKEN = re.compile(r"[a-z0-9]+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|[a-z0-9]+(?:[.\-/][a-z0-9]+)*|\.\.\.|--|\S")


def python_ptb_tokenize(caption: str) -> str:
    """The Java-free stand-in for pycocoevalcap's PTB tokenization (module docstring)."""
    tokens = _PTB_TOKEN.findall(caption.lower().replace("\n", " "))
    return " ".join(token for token in tokens if token not in PTB_PUNCTUATION)


def java_runtime_available() -> bool:
    """Whether a ``java`` that runs is on the PATH."""
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def most_frequent_caption(captions: Iterable[str]) -> str:
    """The most frequent caption after tokenization (the first seen among equals): the trivial
    baseline given to every image."""
    counts = Counter(python_ptb_tokenize(c) for c in captions)
    if not counts:
        raise ValueError("no caption to take the most frequent of")
    return counts.most_common(1)[0][0]


class CaptionEvaluator(DatasetEvaluator):
    """Scores the model's "caption" output against each input's reference "captions"."""

    def __init__(self, baseline_caption: str | None = None, use_spice: bool = False, use_java: bool | None = None):
        """``use_java`` None: use Java when a runtime is found."""
        self.baseline_caption = baseline_caption
        self.use_spice = use_spice
        self.use_java = java_runtime_available() if use_java is None else use_java
        self.reset()

    def reset(self) -> None:
        self._references: dict[int, list[str]] = {}
        self._predictions: dict[int, str] = {}

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        for x, output in zip(inputs, outputs, strict=True):
            references = x.get("captions")
            if not references:
                raise ValueError(f"input {x.get('image_id')} has no reference 'captions' to score against")
            self._references[x["image_id"]] = list(references)
            self._predictions[x["image_id"]] = output["caption"]

    def evaluate(self) -> dict[str, dict[str, float]]:
        references = _merged(comm.gather(self._references, dst=0))
        predictions = _merged(comm.gather(self._predictions, dst=0))
        if not comm.is_main_process():
            return {}
        if not predictions:
            logger.warning("CaptionEvaluator received no prediction")
            return {}
        results = {"caption": self.score(references, predictions)}
        if self.baseline_caption is not None:
            results["caption_baseline"] = self.score(references, dict.fromkeys(references, self.baseline_caption))
        return results

    def score(self, references: Mapping[int, list[str]], predictions: Mapping[int, str]) -> dict[str, float]:
        """Every metric (x100) of ``predictions`` (image id -> caption) against ``references``."""
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        image_ids = sorted(predictions)
        gts = self._tokenize({i: references[i] for i in image_ids})
        res = self._tokenize({i: [predictions[i]] for i in image_ids})
        scores: dict[str, float] = {}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores.update({f"Bleu_{n}": 100.0 * value for n, value in enumerate(bleu, start=1)})
        scorers = [("ROUGE_L", Rouge()), ("CIDEr", Cider())]
        if self.use_java:
            from pycocoevalcap.meteor.meteor import Meteor

            scorers.insert(0, ("METEOR", Meteor()))
            if self.use_spice:
                from pycocoevalcap.spice.spice import Spice

                scorers.append(("SPICE", Spice()))
        else:
            skipped = "METEOR and SPICE" if self.use_spice else "METEOR"
            logger.warning("no Java runtime: %s skipped, captions tokenized in Python", skipped)
        for name, scorer in scorers:
            value, _ = scorer.compute_score(gts, res)
            scores[name] = 100.0 * float(value)
        scores["java_runtime"] = float(self.use_java)
        return scores

    def _tokenize(self, captions: Mapping[int, list[str]]) -> dict[int, list[str]]:
        if not self.use_java:
            return {i: [python_ptb_tokenize(c) for c in cs] for i, cs in captions.items()}
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({i: [{"caption": c} for c in cs] for i, cs in captions.items()})


def _merged(parts: list[dict]) -> dict:
    return dict(itertools.chain.from_iterable(part.items() for part in parts))
