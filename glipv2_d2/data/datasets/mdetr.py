"""MDETR-format phrase-grounding data (Flickr30K Entities, GoldG) and pseudo-labelled caption data.

MDETR (Kamath et al. 2021) ships grounding data as COCO-style json files in which every "image"
entry is one (image, sentence) pair: the image entry carries the sentence as "caption" and every
annotation the character spans it grounds ("tokens_positive", [start, end) pairs). Flickr30K
entries also carry "tokens_positive_eval" (one list of spans per phrase to evaluate, in sentence
order), "sentence_id" and "original_img_id"; GLIP and GLIPv2 train on these files as they are.

This module turns them into Detectron2 dataset dicts with a fixed contract:
besides the standard fields (bbox_mode XYWH_ABS, "image_id" unique per record), each record has
"task", "weak", "caption", per annotation "tokens_positive" and "phrase_ids" (indices into the
record's "phrases"), and "phrases": [{"phrase_id", "tokens_positive", "phrase_type",
"phrase_types"}], the phrases an evaluator scores.

Which box belongs to which phrase is decided by the spans, which every MDETR release shares:
a box belongs to a phrase of "tokens_positive_eval" when one of its spans overlaps one of the
phrase's spans (MDETR builds a box's spans from the phrases it grounds, so a box shared by two
phrases carries both). Raw "phrase_ids" of a json are numbered differently between releases
(per-sentence index, global counter), so they only group boxes into phrases when a file has no
"tokens_positive_eval"; without either, boxes with identical spans form one phrase.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

from ..prompts import check_spans
from .catalog import unregister_dataset

__all__ = [
    "FlickrPhrase",
    "load_mdetr_json",
    "parse_flickr_sentence",
    "register_mdetr_datasets",
    "register_mdetr_grounding",
]

logger = logging.getLogger(__name__)

TASKS = ("grounding", "caption")
DEFAULT_PHRASE_TYPE = "other"
# Image-level keys copied into the records; "tokens_positive_eval" becomes "phrases" instead.
_IMAGE_KEYS = ("dataset_name", "sentence_id", "original_img_id", "original_id")
_FLICKR_SPLITS = ("train", "val", "test")
_GOLDG_NAME = "glipv2_goldg_train"

Span = list[int]


# --- spans ---------------------------------------------------------------------------------------


def _checked_spans(raw: Any, caption: str, where: str) -> list[Span]:
    """Checked [start, end) pairs as int lists (the records' json form); none when ``raw`` is None."""
    return [] if raw is None else [[start, end] for start, end in check_spans(raw, caption, where)]


def _overlaps(spans_a: Sequence[Span], spans_b: Sequence[Span]) -> bool:
    return any(a0 < b1 and b0 < a1 for a0, a1 in spans_a for b0, b1 in spans_b)


# --- phrases -------------------------------------------------------------------------------------


def _phrase(phrase_id: int, spans: list[Span]) -> dict:
    return {"phrase_id": phrase_id, "tokens_positive": spans}


def _phrases_from_eval(eval_spans: list[list[Span]], annotations: list[dict]) -> list[dict]:
    """Flickr30K: the listed phrases, each box linked to every phrase its spans overlap."""
    for anno in annotations:
        anno["phrase_ids"] = [j for j, spans in enumerate(eval_spans) if _overlaps(anno["tokens_positive"], spans)]
    return [_phrase(j, spans) for j, spans in enumerate(eval_spans)]


def _raw_phrase_ids(anno: dict) -> list:
    raw = anno.get("phrase_ids")
    if raw is None:
        return []
    return list(raw) if isinstance(raw, (list, tuple)) else [raw]


def _common_spans(spans_of_boxes: list[list[Span]]) -> list[Span]:
    common = spans_of_boxes[0]
    for spans in spans_of_boxes[1:]:
        common = [span for span in common if span in spans]
    return common


def _phrases_from_ids(annotations: list[dict], where: str) -> list[dict]:
    """Boxes grouped by the json's phrase ids; a phrase's spans are those all its boxes share."""
    boxes_of: dict[Any, list[dict]] = {}
    for anno in annotations:
        for raw_id in _raw_phrase_ids(anno):
            boxes_of.setdefault(raw_id, []).append(anno)
    spans_of = {}
    for raw_id, boxes in boxes_of.items():
        spans_of[raw_id] = _common_spans([box["tokens_positive"] for box in boxes])
        if not spans_of[raw_id]:
            raise ValueError(f"{where}: the boxes of phrase id {raw_id!r} share no tokens_positive span")
    order = sorted(spans_of, key=lambda raw_id: min(spans_of[raw_id]))
    index = {raw_id: j for j, raw_id in enumerate(order)}
    for anno in annotations:
        anno["phrase_ids"] = sorted(index[raw_id] for raw_id in set(_raw_phrase_ids(anno)))
    return [_phrase(j, spans_of[raw_id]) for j, raw_id in enumerate(order)]


def _span_key(spans: list[Span]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(span) for span in sorted(spans))


def _phrases_from_spans(annotations: list[dict]) -> list[dict]:
    """No phrase list or ids: boxes with identical spans refer to one phrase (caption order)."""
    keys = sorted({_span_key(anno["tokens_positive"]) for anno in annotations if anno["tokens_positive"]})
    index = {key: j for j, key in enumerate(keys)}
    for anno in annotations:
        key = _span_key(anno["tokens_positive"])
        anno["phrase_ids"] = [index[key]] if key in index else []
    return [_phrase(j, [list(span) for span in key]) for j, key in enumerate(keys)]


def _link_phrases(image: dict, annotations: list[dict], caption: str, where: str) -> list[dict]:
    if "tokens_positive_eval" in image:
        eval_spans = [
            _checked_spans(spans, caption, f"{where}, tokens_positive_eval #{j}")
            for j, spans in enumerate(image["tokens_positive_eval"])
        ]
        return _phrases_from_eval(eval_spans, annotations)
    if any(_raw_phrase_ids(anno) for anno in annotations):
        return _phrases_from_ids(annotations, where)
    return _phrases_from_spans(annotations)


# --- phrase types (Flickr30K Entities "Sentences" files) ----------------------------------------


@dataclass(frozen=True)
class FlickrPhrase:
    """One bracketed phrase of a Flickr30K Entities sentence: its span in the plain sentence."""

    start: int
    end: int
    entity_id: str
    types: tuple[str, ...]


def parse_flickr_sentence(line: str) -> tuple[str, list[FlickrPhrase]]:
    """Plain sentence and bracketed phrases of one line of a Flickr30K Entities Sentences/ file.

    "[/EN#18/people A man] sits ." -> ("A man sits .", [FlickrPhrase(0, 5, "18", ("people",))]).

    The plain sentence joins the words with single spaces, which is how MDETR built its captions,
    so the spans index MDETR's captions directly.
    """
    words: list[str] = []
    phrases: list[FlickrPhrase] = []
    opened: tuple[int, str, tuple[str, ...]] | None = None
    for token in line.split():
        if opened is None and token.startswith("[/EN#"):
            entity, *types = token[len("[/EN#") :].split("/")
            opened = (len(words), entity, tuple(types))
            continue
        closes = opened is not None and token.endswith("]")
        words.append(token[:-1] if closes else token)
        if closes:
            first, entity, types = opened
            start = sum(len(word) + 1 for word in words[:first])
            end = start + len(" ".join(words[first:]))
            phrases.append(FlickrPhrase(start, end, entity, types))
            opened = None
    if opened is not None:
        raise ValueError(f"unclosed phrase bracket in Flickr30K sentence {line!r}")
    return " ".join(words), phrases


class _SentenceTypes:
    """Phrase types from a Flickr30K Entities Sentences/ folder, one file read per image."""

    def __init__(self, root: str):
        self.root = root
        self._cache: dict[str, list[tuple[str, list[FlickrPhrase]]]] = {}

    def sentence(self, original_img_id: Any, sentence_id: int) -> tuple[str, list[FlickrPhrase]]:
        key = str(original_img_id)
        if key not in self._cache:
            path = os.path.join(self.root, f"{key}.txt")
            with PathManager.open(path) as f:
                self._cache = {key: [parse_flickr_sentence(line) for line in f.read().splitlines() if line.strip()]}
        sentences = self._cache[key]
        if not 0 <= sentence_id < len(sentences):
            raise ValueError(f"{self.root}/{key}.txt has {len(sentences)} sentences, no sentence #{sentence_id}")
        return sentences[sentence_id]


def _types_from_sentences(
    source: _SentenceTypes, image: dict, caption: str, phrases: list[dict], where: str
) -> list[tuple[str, ...]]:
    sentence, flickr_phrases = source.sentence(image["original_img_id"], int(image["sentence_id"]))
    if sentence != caption:
        raise ValueError(f"{where}: caption {caption!r} differs from the Flickr30K Entities sentence {sentence!r}")
    types_of = {(p.start, p.end): p.types for p in flickr_phrases}
    return [next((types_of[tuple(s)] for s in p["tokens_positive"] if tuple(s) in types_of), ()) for p in phrases]


def _json_phrase_types(image: dict, phrases: list[dict], where: str) -> list[tuple[str, ...]]:
    raw = image["phrase_types"]
    if len(raw) != len(phrases):
        raise ValueError(f"{where}: {len(raw)} phrase_types for {len(phrases)} phrases")
    return [(types,) if isinstance(types, str) else tuple(types) for types in raw]


def _add_phrase_types(
    image: dict, caption: str, phrases: list[dict], sentences: _SentenceTypes | None, where: str
) -> None:
    """Types from the json ("phrase_types", aligned with the phrases), else Sentences/, else "other".

    Sentences/ describes Flickr30K images only: records without "original_img_id" and
    "sentence_id" (other sources of a mixed file) get "other".
    """
    if "phrase_types" in image:
        types = _json_phrase_types(image, phrases, where)
    elif sentences is not None and phrases and "original_img_id" in image and "sentence_id" in image:
        types = _types_from_sentences(sentences, image, caption, phrases, where)
    else:
        types = [()] * len(phrases)
    for phrase, phrase_types in zip(phrases, types):
        phrase["phrase_types"] = list(phrase_types) or [DEFAULT_PHRASE_TYPE]
        phrase["phrase_type"] = phrase["phrase_types"][0]


# --- records -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LoadOptions:
    json_file: str
    image_root: str
    task: str
    weak: bool
    min_score: float
    keep_empty: bool
    sentences: _SentenceTypes | None
    id_offset: int = 0


def _category_map(categories: list[dict]) -> dict[int, int]:
    """json category id -> contiguous id, in id order (as Detectron2's load_coco_json)."""
    return {c["id"]: i for i, c in enumerate(sorted(categories, key=lambda c: c["id"]))}


def _annotation(anno: dict, caption: str, category_map: dict[int, int], where: str) -> dict:
    where = f"{where}, annotation {anno.get('id', '?')}"
    if "category_id" in anno and anno["category_id"] not in category_map:
        raise ValueError(f"{where}: category_id {anno['category_id']} is not among the json's categories")
    record = {
        "bbox": [float(v) for v in anno["bbox"]],
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": category_map.get(anno.get("category_id"), 0),
        "iscrowd": int(anno.get("iscrowd", 0)),
        "tokens_positive": _checked_spans(anno.get("tokens_positive"), caption, where),
    }
    for key in ("score", "segmentation"):
        if key in anno:
            record[key] = anno[key]
    if "phrase_ids" in anno:  # the json's own ids; _link_phrases replaces them with phrase indices
        record["phrase_ids"] = anno["phrase_ids"]
    return record


def _record(image: dict, annotations: list[dict], category_map: dict[int, int], options: _LoadOptions) -> dict:
    where = f"{options.json_file}: image {image.get('id')}"
    caption = image.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{where}: 'caption' must be a non-empty string, got {caption!r}")
    annos = [_annotation(anno, caption, category_map, where) for anno in annotations]
    phrases = _link_phrases(image, annos, caption, where)
    _add_phrase_types(image, caption, phrases, options.sentences, where)
    record = {
        "file_name": os.path.join(options.image_root, image["file_name"]),
        "height": int(image["height"]),  # MDETR's Flickr30K files store sizes as strings
        "width": int(image["width"]),
        "image_id": image["id"] + options.id_offset if options.id_offset else image["id"],
        "task": options.task,
        "weak": options.weak,
        "caption": caption,
        "annotations": annos,
        "phrases": phrases,
    }
    record.update({key: image[key] for key in _IMAGE_KEYS if key in image})
    return record


def _above_threshold(annotations: list[dict], min_score: float) -> list[dict]:
    """Pseudo boxes scored below min_score are dropped; boxes without a score are kept."""
    return [anno for anno in annotations if anno.get("score", min_score) >= min_score]


def _records_from_json(data: dict, options: _LoadOptions) -> list[dict]:
    annotations_of: dict[Any, list[dict]] = {}
    for anno in data.get("annotations", []):
        annotations_of.setdefault(anno["image_id"], []).append(anno)
    category_map = _category_map(data.get("categories") or [])
    records, dropped_boxes, dropped_records = [], 0, 0
    for image in data["images"]:
        annotations = annotations_of.get(image["id"], [])
        kept = _above_threshold(annotations, options.min_score)
        dropped_boxes += len(annotations) - len(kept)
        if not kept and not options.keep_empty:
            dropped_records += 1
            continue
        records.append(_record(image, kept, category_map, options))
    if dropped_boxes or dropped_records:
        logger.info(
            "%s: dropped %d boxes scored below %s and %d records left without boxes",
            options.json_file,
            dropped_boxes,
            options.min_score,
            dropped_records,
        )
    return records


def _read_json(json_file: str) -> dict:
    with PathManager.open(json_file) as f:
        return json.load(f)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def load_mdetr_json(
    json_file: str,
    image_root: str,
    *,
    task: str = "grounding",
    weak: bool | None = None,
    min_score: float = 0.0,
    keep_empty: bool = False,
    sentences_root: str | None = None,
    id_offset: int = 0,
) -> list[dict]:
    """Dataset dicts of an MDETR-format json (see the module doc for the record contract).

    ``task="caption"`` marks pseudo-labelled caption data, "weak" by default. Boxes whose "score"
    is below ``min_score`` are dropped (pseudo boxes of a grounding model), and records left with
    no box are dropped unless ``keep_empty`` (a sentence without a box has nothing to ground or
    evaluate; GLIP drops them too). ``sentences_root`` is a Flickr30K Entities Sentences/ folder
    giving phrase types. ``id_offset`` is added to the image ids, to keep them unique when several
    files form one dataset.
    """
    _check_task(task)
    data = _read_json(json_file)
    options = _LoadOptions(
        json_file=json_file,
        image_root=image_root,
        task=task,
        weak=task == "caption" if weak is None else weak,
        min_score=min_score,
        keep_empty=keep_empty,
        sentences=_SentenceTypes(sentences_root) if sentences_root else None,
        id_offset=id_offset,
    )
    return _records_from_json(data, options)


def _load_parts(parts: Sequence[tuple[str, str]], **kwargs: Any) -> list[dict]:
    """Several files as one dataset: each file's image ids are offset past the previous file's."""
    records: list[dict] = []
    offset = 0
    for json_file, image_root in parts:
        part = load_mdetr_json(json_file, image_root, id_offset=offset, **kwargs)
        if part:
            offset = max(record["image_id"] for record in part) + 1
        records.extend(part)
    return records


# --- registration --------------------------------------------------------------------------------


def register_mdetr_grounding(
    name: str,
    json_file: str,
    image_root: str,
    task: str = "grounding",
    *,
    min_score: float = 0.0,
    keep_empty: bool = False,
    sentences_root: str | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> None:
    """Register an MDETR-format json (grounding sentences or pseudo-labelled captions) lazily.

    Nothing is read until the dataset is used, so very large files (GoldG) cost nothing to
    register; give thing_classes in ``extra_metadata`` if anything needs them before loading.
    """
    _check_task(task)
    unregister_dataset(name)
    DatasetCatalog.register(
        name,
        lambda: load_mdetr_json(
            json_file, image_root, task=task, min_score=min_score, keep_empty=keep_empty, sentences_root=sentences_root
        ),
    )
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, **(extra_metadata or {}))


def _flickr_image_root(root: str, split: str) -> str:
    """GLIP's layout splits the images per split; a single folder of all images works too."""
    images = os.path.join(root, "flickr30k", "flickr30k_images")
    per_split = os.path.join(images, split)
    return per_split if os.path.isdir(per_split) else images


def _register_flickr30k(root: str) -> None:
    sentences = os.path.join(root, "flickr30k", "Sentences")
    for gt_type, suffix in (("separate", ""), ("merged", "_merged")):
        for split in _FLICKR_SPLITS:
            name = f"glipv2_flickr30k{suffix}_{split}"
            unregister_dataset(name)
            json_file = os.path.join(root, "mdetr_annotations", f"final_flickr_{gt_type}GT_{split}.json")
            if not os.path.isfile(json_file):
                continue
            evaluated = split != "train"
            metadata = {"thing_classes": ["object"], "gt_type": gt_type}
            if evaluated:
                metadata["evaluator_type"] = "flickr30k"
            register_mdetr_grounding(
                name,
                json_file,
                _flickr_image_root(root, split),
                sentences_root=sentences if evaluated and os.path.isdir(sentences) else None,
                extra_metadata=metadata,
            )


_CAPTIONS_NAME = "glipv2_cap4m_train"


def _register_goldg(root: str) -> None:
    """GoldG = MDETR's GQA/VG grounding without COCO images + Flickr30K train (GLIP's pre-training mix)."""
    unregister_dataset(_GOLDG_NAME)
    parts = [
        (
            os.path.join(root, "mdetr_annotations", "final_mixed_train_no_coco.json"),
            os.path.join(root, "gqa", "images"),
        ),
        (
            os.path.join(root, "mdetr_annotations", "final_flickr_separateGT_train.json"),
            _flickr_image_root(root, "train"),
        ),
    ]
    if not all(os.path.isfile(json_file) for json_file, _ in parts):
        return
    DatasetCatalog.register(_GOLDG_NAME, lambda: _load_parts(parts, task="grounding"))
    MetadataCatalog.get(_GOLDG_NAME).set(json_files=[j for j, _ in parts], thing_classes=["object"])


def register_mdetr_datasets(root: str) -> None:
    """Register Flickr30K Entities (separate and merged boxes), GoldG and the pseudo-labelled
    caption set ``glipv2_cap4m_train`` under ``root``.

    Only names whose json files exist are registered (see datasets/README.md for the tree);
    calling again re-points or removes them.
    """
    _register_flickr30k(root)
    _register_goldg(root)
    _register_pseudo_captions(root)


def _register_pseudo_captions(root: str, min_score: float = 0.5) -> None:
    """GLIPv2's Cap4M stand-in: image-caption pairs boxed by a grounding model (not public; any
    MDETR-format file with scored boxes at this path takes its place)."""
    unregister_dataset(_CAPTIONS_NAME)
    json_file = os.path.join(root, "cap4m", "annotations", "train.json")
    if os.path.isfile(json_file):
        register_mdetr_grounding(
            _CAPTIONS_NAME, json_file, os.path.join(root, "cap4m", "images"), task="caption", min_score=min_score,
            extra_metadata={"thing_classes": ["object"]},
        )

