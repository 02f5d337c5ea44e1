"""Text for the synthetic shapes scenes: a grounding caption with spans, VQA pairs, reference captions.

Everything is derived from the objects actually drawn, so every statement is true of the image.
"""

from dataclasses import dataclass

import numpy as np

_NUMBERS = ("zero", "one", "two", "three", "four", "five")


@dataclass(frozen=True)
class SceneObject:
    """What the text may say about one drawn object; center is (x, y) in pixels."""

    colour: str
    shape: str
    size: str
    center: tuple[float, float]


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x")) else "s")


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _groups(objects: list[SceneObject]) -> list[list[int]]:
    """Object indices grouped by (colour, shape), in order of first appearance."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, obj in enumerate(objects):
        groups.setdefault((obj.colour, obj.shape), []).append(i)
    return list(groups.values())


def _phrase(objects: list[SceneObject], group: list[int], rng: np.random.Generator) -> str:
    """One phrase ("a small red circle", "two blue squares") refers to the whole group."""
    obj = objects[group[0]]
    if len(group) > 1:
        return f"{_NUMBERS[len(group)]} {obj.colour} {plural(obj.shape)}"
    words = f"{obj.size} {obj.colour} {obj.shape}" if rng.random() < 0.5 else f"{obj.colour} {obj.shape}"
    return f"{_article(words)} {words}"


def _relation(objects: list[SceneObject], a: list[int], b: list[int]) -> str:
    """Spatial relation of group a to group b along the axis where their centres differ most."""
    ax, ay = np.mean([objects[i].center for i in a], axis=0)
    bx, by = np.mean([objects[i].center for i in b], axis=0)
    if abs(ax - bx) >= abs(ay - by):
        return "left of" if ax < bx else "right of"
    return "above" if ay < by else "below"


class _SpanText:
    """Builds a sentence while recording the [start, end) span of each phrase's objects."""

    def __init__(self, num_objects: int):
        self.text = ""
        self.spans: list[list[list[int]]] = [[] for _ in range(num_objects)]

    def add(self, piece: str, group: list[int] | None = None) -> None:
        if group is not None:
            for i in group:
                self.spans[i].append([len(self.text), len(self.text) + len(piece)])
        self.text += piece


def grounding_caption(objects: list[SceneObject], rng: np.random.Generator) -> tuple[str, list[list[list[int]]]]:
    """A sentence mentioning 1-3 object groups with a spatial relation, and per object its spans.

    Objects left unmentioned get an empty span list (MDETR convention).
    """
    groups = _groups(objects)
    order = rng.permutation(len(groups))[: int(rng.integers(1, min(3, len(groups)) + 1))]
    chosen = [groups[i] for i in order]
    out = _SpanText(len(objects))
    if len(chosen) == 1:
        out.add("an image with " if rng.random() < 0.5 else "")
        out.add(_phrase(objects, chosen[0], rng), chosen[0])
    else:
        out.add(_phrase(objects, chosen[0], rng), chosen[0])
        out.add(f" {_relation(objects, chosen[0], chosen[1])} ")
        out.add(_phrase(objects, chosen[1], rng), chosen[1])
        if len(chosen) == 3:
            out.add(" and ")
            out.add(_phrase(objects, chosen[2], rng), chosen[2])
    out.add(".")
    return out.text, out.spans


def _qa(question: str, answer: str) -> dict:
    return {"question": question, "answers": [{"answer": answer, "score": 1.0}]}


def question_answers(
    objects: list[SceneObject], allowed_pairs: list[tuple[str, str]], shapes: list[str], rng: np.random.Generator
) -> list[dict]:
    """Counting, colour, shape and yes/no questions, each answerable from the image alone.

    Absent pairs asked about come from `allowed_pairs`, so a split's text never names a pair that
    the split holds out.
    """
    qas = []
    # mostly about a shape in the image, so that "0" is not the usual answer
    shape = _pick(rng, objects).shape if rng.random() < 0.7 else _pick(rng, shapes)
    qas.append(_qa(f"how many {plural(shape)} are there?", str(sum(o.shape == shape for o in objects))))
    single_shapes = [s for s in dict.fromkeys(o.shape for o in objects) if sum(o.shape == s for o in objects) == 1]
    if single_shapes:
        s = _pick(rng, single_shapes)
        qas.append(_qa(f"what colour is the {s}?", next(o.colour for o in objects if o.shape == s)))
    single_colours = [c for c in dict.fromkeys(o.colour for o in objects) if sum(o.colour == c for o in objects) == 1]
    if single_colours:
        c = _pick(rng, single_colours)
        qas.append(_qa(f"what shape is the {c} object?", next(o.shape for o in objects if o.colour == c)))
    present = {(o.colour, o.shape) for o in objects}
    absent = [p for p in allowed_pairs if p not in present]
    if rng.random() < 0.5 or not absent:
        obj = _pick(rng, objects)
        (colour, shape), answer = (obj.colour, obj.shape), "yes"
    else:
        (colour, shape), answer = _pick(rng, absent), "no"
    qas.append(_qa(f"is there {_article(colour)} {colour} {shape}?", answer))
    return qas


def reference_captions(objects: list[SceneObject], background: str, rng: np.random.Generator) -> list[str]:
    """Three differently worded, true descriptions of the scene, for captioning."""
    groups = _groups(objects)
    phrases = [_phrase(objects, groups[i], rng) for i in rng.permutation(len(groups))]
    listing = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    noun = "object" if len(objects) == 1 else "objects"
    return [
        f"{listing} on a {background} background.",
        f"{_NUMBERS[len(objects)]} {noun}: {listing}.",
        grounding_caption(objects, rng)[0],
    ]
