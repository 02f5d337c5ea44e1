"""Prompts and the maps between their characters, tokens and labels.

Conventions, following the official GLIP code (maskrcnn_benchmark at 9dda955):

* Detection prompts are cleaned category names joined by ". " with no trailing separator
  (``engine/inference.py: create_queries_and_maps`` with the GLIP configs' SEPARATION_TOKENS).
  Cleaning is the official ``clean_name`` (drop "(...)", "_" -> " ", collapse double spaces) with
  all whitespace runs collapsed and the ends trimmed. That changes no token (BERT never emits
  whitespace tokens), so the token ids equal the official prompt's, while spans no longer end in a
  space (official "bait_(lure)" -> "bait " -> span with a trailing blank).
* Spans are character ranges ``[start, end)`` (MDETR ``tokens_positive`` convention).
* A span covers the tokens from the one holding its first character to the one holding its last,
  inclusive (official ``char_to_token(start)`` .. ``char_to_token(end - 1)``). Here this is computed
  from the tokenizer's offset mapping: the tokens overlapping the span, up to the FIRST token holding
  its last non-blank character, as ``char_to_token`` answers. (With WordPiece a character lies in one
  token; byte-level BPE (CLIP) can split one character, e.g. a CJK one, into several tokens, of which
  GLIP marks only the first.) Where the official code
  retries ``start + 1``, ``start + 2`` for spans that begin on whitespace and silently drops spans it
  still cannot place, this module places them from the overlap, and raises an error naming the
  label and phrase when a span has no token at all (empty name, truncated away).
* Positive maps: the official dataset builds rows normalised to sum 1 (``positive_map / (sum +
  1e-6)``), but its batch collator turns them into 0/1 (``bool().float()``) before the model sees
  them, so the ATSS token targets and the focal loss use BINARY rows; inference uses only the token
  index lists (scores are averaged over a category's tokens). ``token_map_to_positive_map``
  therefore returns binary rows by default; ``normalize=True`` gives the official normalised form.
* Training prompts for detection data (``sample_detection_prompt``) follow the official
  ``check_for_positive_overflow`` + ``convert_object_detection_to_grounding_optimized_for_od``:
  positives first, in random order, kept while their tokens fit (the boxes of the others are then
  dropped by the caller); negatives drawn from the whole vocabulary (positives removed, so an image
  gets slightly fewer than the drawn number), kept while they fit what is left; the kept labels in
  random order. The budget counts each name with its separator ("dog. "), as the official code
  does; the assembled caption is then measured exactly, so it never needs truncating.
* Free-form captions: the official demo finds noun phrases with NLTK, whose tagger data cannot be
  fetched offline. ``locate_phrases`` deliberately does no linguistic parsing: the caller names the
  phrases (located in the caption) or gives their spans; with neither, the whole caption is one
  phrase.
"""

from __future__ import annotations

import logging
import numbers
import random
import re
import zlib
from collections.abc import Hashable, Iterable, Mapping, Sequence

import torch
from transformers import BatchEncoding, PreTrainedTokenizerBase

from ..structures import NO_CATEGORY, Prompt

__all__ = [
    "DEFAULT_SEPARATOR",
    "build_detection_prompt",
    "build_labeled_prompt",
    "chunk_categories",
    "clean_category_name",
    "category_uid",
    "check_spans",
    "check_vocabulary",
    "vocabulary_items",
    "encode_prompt",
    "locate_phrases",
    "positive_map_to_token_map",
    "sample_detection_prompt",
    "spans_to_token_map",
    "token_map_to_positive_map",
    "token_map_to_token_labels",
    "tokenize_prompts",
]

logger = logging.getLogger(__name__)

DEFAULT_SEPARATOR = ". "

Span = tuple[int, int]
Label = Hashable


def clean_category_name(name: str) -> str:
    """Official GLIP name cleaning with whitespace normalised; e.g. "bait_(lure)" -> "bait"."""
    name = re.sub(r"\(.*\)", "", name)
    return " ".join(name.replace("_", " ").split())


def _label_items(names: Sequence[str] | Mapping[Label, str]) -> list[tuple[Label, str]]:
    if isinstance(names, Mapping):
        return list(names.items())
    if isinstance(names, str):
        raise TypeError(f"expected a list of category names, got the string {names!r}")
    return list(enumerate(names))


def build_detection_prompt(
    names: Sequence[str], separator: str = DEFAULT_SEPARATOR, clean: bool = True
) -> tuple[str, list[Span]]:
    """Join category names into one prompt; returns (caption, [start, end) span of each name)."""
    if isinstance(names, str):
        raise TypeError(f"build_detection_prompt expects a list of names, got the string {names!r}")
    if len(names) == 0:
        raise ValueError("build_detection_prompt: the list of category names is empty")
    parts: list[str] = []
    spans: list[Span] = []
    position = 0
    for i, raw in enumerate(names):
        if not isinstance(raw, str):
            raise TypeError(f"category name #{i} is not a string: {raw!r}")
        name = clean_category_name(raw) if clean else raw
        if not name.strip():
            raise ValueError(f"category name #{i} ({raw!r}) is empty after cleaning; it cannot be prompted")
        if i:
            parts.append(separator)
            position += len(separator)
        spans.append((position, position + len(name)))
        parts.append(name)
        position += len(name)
    return "".join(parts), spans


def build_labeled_prompt(
    items: Sequence[tuple[Label, str]] | Mapping[Label, str],
    separator: str = DEFAULT_SEPARATOR,
    clean: bool = True,
) -> tuple[str, dict[Label, list[Span]]]:
    """Prompt for (label, name) pairs, e.g. one chunk of ``chunk_categories``; spans keyed by label."""
    pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
    labels = [label for label, _ in pairs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"build_labeled_prompt: repeated labels in {labels}")
    caption, spans = build_detection_prompt([name for _, name in pairs], separator, clean)
    return caption, {label: [span] for label, span in zip(labels, spans)}


def _token_offsets(tokenized: BatchEncoding, batch_index: int) -> torch.Tensor:
    if "offset_mapping" not in tokenized:
        raise KeyError("tokenized prompt has no 'offset_mapping'; tokenize with return_offsets_mapping=True")
    offsets = torch.as_tensor(tokenized["offset_mapping"])
    if offsets.dim() == 3:
        offsets = offsets[batch_index]
    return offsets.reshape(-1, 2)


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase,
    captions: Sequence[str] | str,
    max_len: int = 256,
    pad_to_max: bool = False,
    warn_truncation: bool = True,
) -> BatchEncoding:
    """Tokenize a batch of prompts to at most ``max_len`` tokens, with offsets (for span maps).

    Pads to ``max_len`` (the official behaviour) or to the longest prompt. Empty prompts, and prompts
    with no token besides [CLS]/[SEP], are errors naming the prompt; truncation is logged unless
    ``warn_truncation`` is False.
    """
    batch = [captions] if isinstance(captions, str) else list(captions)
    if not batch:
        raise ValueError("tokenize_prompts: no captions given")
    for i, caption in enumerate(batch):
        if not isinstance(caption, str):
            raise TypeError(f"caption #{i} is not a string: {caption!r}")
        if not caption.strip():
            raise ValueError(f"caption #{i} is empty or whitespace: {caption!r}")
    tokenized = tokenizer(
        batch,
        max_length=max_len,
        truncation=True,
        padding="max_length" if pad_to_max else "longest",
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    offsets = torch.as_tensor(tokenized["offset_mapping"])
    real = offsets[..., 1] > offsets[..., 0]
    for i, caption in enumerate(batch):
        if not real[i].any():
            raise ValueError(f"caption #{i} {caption!r} tokenizes to no token besides [CLS]/[SEP]")
        kept_end = int(offsets[i, real[i], 1].max())
        filled = int(tokenized["attention_mask"][i].sum()) == max_len
        if warn_truncation and filled and kept_end < len(caption.rstrip()):
            logger.warning(
                "caption #%d truncated to %d tokens: characters %d.. dropped (%r...)",
                i,
                max_len,
                kept_end,
                caption[kept_end : kept_end + 40],
            )
    return tokenized


def check_spans(spans: Iterable[Sequence[int]], caption: str | None, where: str) -> list[Span]:
    """``spans`` as ``(start, end)`` int pairs, each checked to be a non-empty ``[start, end)`` inside
    ``caption``: a span outside it would silently select the wrong tokens later.

    ``where`` names the spans' source (file, image, label) at the start of every error. Without a
    caption only the lower bound is checked.
    """
    if not _is_list_like(spans):
        raise ValueError(f"{where}: expected a list of [start, end) spans, got {spans!r}")
    checked = []
    for span in spans:
        pair = list(span) if _is_list_like(span) else []
        if len(pair) != 2:
            raise ValueError(f"{where}: span {span!r} is not a [start, end) pair")
        start, end = int(pair[0]), int(pair[1])
        if caption is None and not 0 <= start < end:
            raise ValueError(f"{where}: span [{start}, {end}) is empty or starts before the caption")
        if caption is not None and not 0 <= start < end <= len(caption):
            raise ValueError(
                f"{where}: span [{start}, {end}) is empty or outside the caption of {len(caption)} characters "
                f"{caption!r}"
            )
        checked.append((start, end))
    return checked


def _is_list_like(value: object) -> bool:
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes))


def spans_to_token_map(
    tokenized: BatchEncoding,
    spans_per_label: Mapping[Label, Sequence[Sequence[int]]],
    max_len: int,
    *,
    batch_index: int = 0,
    caption: str | None = None,
) -> dict[Label, list[int]]:
    """Map each label's character spans to the sorted indices of the tokens they cover.

    ``tokenized`` must carry ``offset_mapping`` (``tokenize_prompts`` does); ``batch_index`` picks
    the prompt in a batch. Passing ``caption`` names the phrase in errors, checks span bounds and
    ignores trailing blanks of a span (without it, a span ending in blanks after the caption's last
    token reads as truncated). A span that reaches no token, or is cut by truncation, raises an error
    naming its label.
    """
    offsets = _token_offsets(tokenized, batch_index)
    starts, ends = offsets[:, 0], offsets[:, 1]
    real = ends > starts
    kept_end = int(ends[real].max()) if real.any() else 0
    # Only a prompt that fills the window can have lost characters to truncation.
    filled = int(torch.as_tensor(tokenized["attention_mask"])[batch_index].sum()) == max_len
    token_map: dict[Label, list[int]] = {}
    for label, spans in spans_per_label.items():
        checked = check_spans(spans, caption, f"label {label!r}")
        if not checked:
            raise ValueError(f"label {label!r}: expected a list of [start, end) spans, got {spans!r}")
        indices: set[int] = set()
        for start, end in checked:
            phrase = f" {caption[start:end]!r}" if caption is not None else ""
            last = start + len(caption[start:end].rstrip()) if caption is not None else end
            hit = torch.nonzero(real & (starts < end) & (ends > start)).flatten()
            if hit.numel() == 0 or (filled and last > kept_end):
                reason = "was truncated away" if filled and last > kept_end else "covers no token"
                raise ValueError(f"label {label!r}: phrase{phrase} at [{start}, {end}) {reason}")
            first_tok, last_tok = int(hit.min()), int(hit.max())
            holds_last = torch.nonzero(real & (starts < last) & (ends >= last)).flatten()
            if holds_last.numel():
                last_tok = int(holds_last.min())
            if last_tok >= max_len:
                raise ValueError(
                    f"label {label!r}: phrase{phrase} reaches token {last_tok}, beyond max_len={max_len}"
                )
            indices.update(range(first_tok, last_tok + 1))
        token_map[label] = sorted(indices)
    return token_map


def token_map_to_positive_map(
    label_to_tokens: Mapping[Label, Sequence[int]],
    labels_of_boxes: Sequence[Label],
    max_len: int,
    normalize: bool = False,
) -> torch.Tensor:
    """(N, max_len) float map: row i marks the tokens of box i's label.

    Binary by default (what the official loss sees); ``normalize=True`` divides each row by
    (its sum + 1e-6) like the official dataset field.
    """
    positive_map = torch.zeros((len(labels_of_boxes), max_len), dtype=torch.float32)
    for row, label in enumerate(labels_of_boxes):
        if label not in label_to_tokens:
            raise KeyError(f"box #{row} has label {label!r}, which is absent from the prompt's token map")
        tokens = list(label_to_tokens[label])
        if tokens and max(tokens) >= max_len:
            raise ValueError(f"label {label!r}: token {max(tokens)} beyond max_len={max_len}")
        positive_map[row, tokens] = 1.0
    if normalize:
        positive_map = positive_map / (positive_map.sum(-1, keepdim=True) + 1e-6)
    return positive_map


def positive_map_to_token_map(
    positive_map: torch.Tensor, labels: Sequence[Label] | None = None
) -> dict[Label, list[int]]:
    """Inverse of ``token_map_to_positive_map``: row i -> (labels[i] or i) -> its nonzero tokens."""
    keys = list(range(len(positive_map))) if labels is None else list(labels)
    if len(keys) != len(positive_map):
        raise ValueError(f"{len(keys)} labels for a positive map of {len(positive_map)} rows")
    return {key: torch.nonzero(row).flatten().tolist() for key, row in zip(keys, positive_map)}


def token_map_to_token_labels(label_to_tokens: Mapping[int, Sequence[int]], max_len: int) -> torch.Tensor:
    """(max_len,) int64 label of every token, -1 where none (official positive_map_for_od_labels)."""
    token_labels = torch.full((max_len,), -1, dtype=torch.int64)
    for label, tokens in label_to_tokens.items():
        token_labels[list(tokens)] = int(label)
    return token_labels


def _prompt_length(tokenizer: PreTrainedTokenizerBase, caption: str) -> int:
    return len(tokenizer(caption, add_special_tokens=True)["input_ids"])


def chunk_categories(
    names: Sequence[str] | Mapping[Label, str],
    tokenizer: PreTrainedTokenizerBase,
    max_len: int = 256,
    chunk_size: int | None = None,
    separator: str = DEFAULT_SEPARATOR,
    clean: bool = True,
) -> list[list[tuple[Label, str]]]:
    """Split a vocabulary into prompts that each fit ``max_len`` tokens ([CLS]/[SEP] included).

    ``names`` is a list (labels are the indices) or a {label: name} mapping; order is kept, every
    category lands in exactly one chunk. ``chunk_size=None`` packs greedily by exact token count;
    an int gives fixed-size chunks (the paper's LVIS protocol: 40), checked to fit.
    """
    items = vocabulary_items(names)
    for label, name in items:
        cleaned = clean_category_name(name) if clean else name
        if not cleaned.strip():
            raise ValueError(f"category {label!r} ({name!r}) is empty after cleaning; it cannot be prompted")

    def caption_of(chunk: list[tuple[Label, str]]) -> str:
        return build_detection_prompt([name for _, name in chunk], separator, clean)[0]

    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        chunks = [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]
    else:
        chunks = []
        current: list[tuple[Label, str]] = []
        for item in items:
            if current and _prompt_length(tokenizer, caption_of([*current, item])) > max_len:
                chunks.append(current)
                current = []
            current.append(item)
        chunks.append(current)
    for i, chunk in enumerate(chunks):
        length = _prompt_length(tokenizer, caption_of(chunk))
        if length > max_len:
            if len(chunk) == 1:
                label, name = chunk[0]
                raise ValueError(
                    f"category {label!r} ({name!r}) alone needs {length} tokens > max_len={max_len}"
                )
            raise ValueError(
                f"prompt chunk #{i} ({chunk[0][1]!r} .. {chunk[-1][1]!r}, {len(chunk)} names) needs "
                f"{length} tokens > max_len={max_len}; use a smaller chunk_size or chunk_size=None"
            )
    return chunks


def vocabulary_items(names: Sequence[str] | Mapping[Label, str]) -> list[tuple[Label, str]]:
    """(label, name) pairs of a category list (labels are its indices) or {label: name} mapping,
    refusing anything but a non-empty collection of strings with an error naming the bad item."""
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise TypeError(f"expected a list of category names, got {names!r}")
    items = _label_items(names)
    if not items:
        raise ValueError("the list of category names is empty")
    for label, name in items:
        if not isinstance(name, str):
            raise TypeError(f"category {label!r} is not a string: {name!r}")
    return items


def check_vocabulary(
    names: Sequence[str] | Mapping[Label, str],
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    clean: bool = True,
    keep_repeats: bool = False,
) -> list[tuple[Label, str]]:
    """The vocabulary's (label, name) pairs, each checked once, up front, so that no name fails only
    when its prompt is first built (at the final evaluation, for a training vocabulary).

    Errors name the category: not a string, empty after cleaning, or too long for ``max_len`` on its
    own. Warnings: a repeated name (the same text once cleaned, case aside; compared as text, not by
    ``category_uid``, whose hash two names could share) is dropped after its first label, since two
    labels with one text would give every box twice, unless ``keep_repeats`` (a dataset's
    categories, each of which its evaluation scores); a name whose tokens are all [UNK] (emoji)
    reads the same as every other such name.
    """
    items = vocabulary_items(names)
    cleaned = []
    for label, name in items:
        text = clean_category_name(name) if clean else name.strip()
        if not text:
            raise ValueError(f"category {label!r} ({name!r}) is empty after cleaning; it cannot be prompted")
        cleaned.append(text)
    token_ids = tokenizer(cleaned, add_special_tokens=False)["input_ids"]
    budget = max_len - tokenizer.num_special_tokens_to_add(pair=False)
    first_label: dict[str, Label] = {}
    kept = []
    for (label, name), text, ids in zip(items, cleaned, token_ids):
        if len(ids) > budget:
            raise ValueError(f"category {label!r} ({name!r}) alone needs {len(ids)} tokens > the {budget} "
                             f"that max_len={max_len} leaves for a name; shorten it")
        if tokenizer.unk_token_id is not None and all(i == tokenizer.unk_token_id for i in ids):
            logger.warning("category %r (%r) tokenizes to nothing but [UNK]: the model cannot tell it from "
                           "other such names; describe it in words", label, name)
        key = text.lower()
        if key in first_label and not keep_repeats:
            logger.warning("category %r (%r) repeats category %r; it is dropped from the prompt so its boxes "
                           "are not returned twice", label, name, first_label[key])
            continue
        first_label.setdefault(key, label)
        kept.append((label, name))
    return kept


def category_uid(name: str) -> int:
    """Non-negative id of a category name that every dataset shares ("person" of COCO and of
    Objects365 alike), unlike contiguous ids; the inter-image loss compares categories across images."""
    return zlib.crc32(clean_category_name(name).lower().encode("utf-8")) & 0x7FFFFFFF


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    caption: str,
    spans_per_label: Mapping[int, Sequence[Sequence[int]]],
    max_len: int,
    *,
    label_names: Mapping[int, str] | None = None,
    names_categories: bool = False,
    tokenized: BatchEncoding | None = None,
) -> Prompt:
    """The ``Prompt`` of a caption: its tokens, each label's tokens and each token's category.

    ``tokenized`` is the caption's ``tokenize_prompts`` output when the caller already has it (a
    caption is tokenized once). ``names_categories``: the labels are categories named by
    ``label_names`` (a detection prompt), so their tokens carry the names' ``category_uid``;
    otherwise (free-form captions) no token has a category.
    """
    if tokenized is None:
        tokenized = tokenize_prompts(tokenizer, caption, max_len)
    label_to_tokens = spans_to_token_map(tokenized, spans_per_label, max_len, caption=caption)
    input_ids = torch.as_tensor(tokenized["input_ids"][0], dtype=torch.long)
    token_categories = torch.full_like(input_ids, NO_CATEGORY)
    names = dict(label_names or {})
    if names_categories:
        missing = sorted(set(label_to_tokens) - set(names), key=str)
        if missing:
            raise KeyError(f"prompt {caption!r}: labels {missing} have no category name")
        for label, tokens in label_to_tokens.items():
            token_categories[tokens] = category_uid(names[label])
    return Prompt(
        caption=caption,
        input_ids=input_ids,
        attention_mask=torch.as_tensor(tokenized["attention_mask"][0], dtype=torch.long),
        label_to_tokens=label_to_tokens,
        token_categories=token_categories,
        label_names=names,
    )


def _name_costs(
    tokenizer: PreTrainedTokenizerBase, names: Mapping[Label, str], labels: Sequence[Label], separator: str
) -> list[int]:
    if not labels:
        return []
    texts = [clean_category_name(names[label]) + separator for label in labels]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _fit_prefix(labels: Sequence[Label], costs: Sequence[int], budget: int) -> tuple[list[Label], int]:
    """Longest prefix of ``labels`` whose costs fit ``budget`` (official: stop at the first overflow)."""
    kept: list[Label] = []
    used = 0
    for label, cost in zip(labels, costs):
        if used + cost > budget:
            break
        kept.append(label)
        used += cost
    return kept, used


def sample_detection_prompt(
    positive_labels: Iterable[Label],
    all_names: Mapping[Label, str],
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    max_negatives: int,
    rng: random.Random,
    shuffle: bool = True,
    separator: str = DEFAULT_SEPARATOR,
    *,
    full_negatives_prob: float = 1.0,
) -> tuple[Prompt, list[Label]]:
    """Training prompt of a detection image: its categories plus sampled negatives, within ``max_len``.

    Returns the encoded prompt (every prompted label's tokens, category tokens marked) and the positive
    labels that fit, in prompt order; boxes of positives missing from that list must be dropped, since
    the prompt cannot name them. Negatives: with probability ``full_negatives_prob`` ``max_negatives``
    labels are drawn, otherwise a uniform count in 1..``max_negatives`` (official CONTROL_PROB); labels
    that are positives are then removed. ``shuffle=False`` keeps the vocabulary's order (and keeps the
    first positives that fit). All randomness comes from ``rng``, so a seeded ``rng`` reproduces the
    prompt. A prompt cannot be empty: with no positive and no negative, one random negative is used.
    """
    if not all_names:
        raise ValueError("sample_detection_prompt: the category vocabulary is empty")
    if not 0.0 <= full_negatives_prob <= 1.0:
        raise ValueError(f"full_negatives_prob must be in [0, 1], got {full_negatives_prob}")
    budget = max_len - tokenizer.num_special_tokens_to_add(pair=False)
    if budget < 1:
        raise ValueError(f"max_len={max_len} leaves no room for a category name")
    order = {label: i for i, label in enumerate(all_names)}
    positives = list(dict.fromkeys(positive_labels))
    unknown = [label for label in positives if label not in order]
    if unknown:
        raise KeyError(f"positive labels {unknown} are not in the vocabulary of {len(all_names)} categories")
    positive_set = set(positives)

    if shuffle:
        rng.shuffle(positives)
    else:
        positives.sort(key=order.__getitem__)
    kept, used = _fit_prefix(positives, _name_costs(tokenizer, all_names, positives, separator), budget)

    full = min(max(max_negatives, 0), len(all_names))
    draw_full = rng.random() < full_negatives_prob
    count = full if draw_full or full == 0 else rng.randint(1, full)
    negatives = [label for label in rng.sample(list(all_names), count) if label not in positive_set]
    if not kept and not negatives:
        spare = [label for label in all_names if label not in positive_set]
        negatives = [rng.choice(spare)] if spare else []
    if not shuffle:
        negatives.sort(key=order.__getitem__)
    kept_negatives, _ = _fit_prefix(negatives, _name_costs(tokenizer, all_names, negatives, separator), budget - used)
    if not kept and not kept_negatives:
        label = (positives or negatives)[0]
        raise ValueError(f"category {label!r} ({all_names[label]!r}) alone does not fit max_len={max_len}")

    labels = kept + kept_negatives
    if shuffle:
        rng.shuffle(labels)
    else:
        labels.sort(key=order.__getitem__)
    while True:
        caption, spans = build_labeled_prompt([(label, all_names[label]) for label in labels], separator)
        # One token more than allowed reveals an overflow; a prompt that fits is tokenized exactly.
        tokenized = tokenize_prompts(tokenizer, caption, max_len + 1, warn_truncation=False)
        if len(tokenized["input_ids"][0]) <= max_len:
            break
        if len(labels) == 1:
            name = all_names[labels[0]]
            raise ValueError(f"category {labels[0]!r} ({name!r}) alone needs more than {max_len} tokens")
        # Only reached with tokenizers whose per-name counts are not additive: drop negatives first.
        labels.remove(next((label for label in reversed(labels) if label not in positive_set), labels[-1]))
    prompt = encode_prompt(
        tokenizer, caption, spans, max_len,
        label_names={label: all_names[label] for label in labels}, names_categories=True, tokenized=tokenized,
    )
    return prompt, [label for label in labels if label in positive_set]


def _find_phrase(caption: str, phrase: str) -> Span:
    needle = re.escape(phrase)
    for pattern in (rf"(?<!\w){needle}(?!\w)", needle):
        match = re.search(pattern, caption, flags=re.IGNORECASE)
        if match:
            return match.start(), match.end()
    raise ValueError(f"phrase {phrase!r} does not occur in the caption {caption!r}")


def locate_phrases(
    caption: str,
    phrases: Sequence[str] | None = None,
    spans: Sequence[Sequence[int] | Sequence[Sequence[int]]] | None = None,
) -> list[tuple[str, list[Span]]]:
    """Entities of a free-form caption as (phrase text, spans), without NLTK (see module doc).

    ``phrases``: each is located case-insensitively, a whole-word occurrence preferred, first
    occurrence taken (give ``spans`` to pick another). ``spans``: one [start, end) pair, or a list of
    pairs, per entity. Neither: the whole caption (trimmed) is the only phrase.
    """
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"caption is empty: {caption!r}")
    if phrases is not None and spans is not None:
        raise ValueError("locate_phrases: give phrases or spans, not both")
    if phrases is not None:
        if isinstance(phrases, str):
            raise TypeError(f"phrases must be a list of strings, got the string {phrases!r}")
        if len(phrases) == 0:
            raise ValueError(f"phrases is empty for caption {caption!r}; give one or more, or None")
        entities = []
        for phrase in phrases:
            if not isinstance(phrase, str) or not phrase.strip():
                raise ValueError(f"empty phrase {phrase!r} for caption {caption!r}")
            start, end = _find_phrase(caption, phrase.strip())
            entities.append((caption[start:end], [(start, end)]))
        return entities
    if spans is not None:
        if len(spans) == 0:
            raise ValueError(f"spans is empty for caption {caption!r}; give one or more, or None")
        entities = []
        for i, entity in enumerate(spans):
            # numbers.Integral also admits numpy integers (spans cut from an array).
            pairs = [entity] if len(entity) == 2 and all(isinstance(v, numbers.Integral) for v in entity) else entity
            checked = check_spans(pairs, caption, f"entity #{i}")
            if not any(caption[s:e].strip() for s, e in checked):
                raise ValueError(f"entity #{i}: spans {checked} cover only whitespace in {caption!r}")
            entities.append((" ".join(caption[s:e] for s, e in checked), checked))
        return entities
    start = len(caption) - len(caption.lstrip())
    return [(caption.strip(), [(start, start + len(caption.strip()))])]
