"""The tasks the page offers, read off the loaded model: a task appears when the predictor can run it
(segment with MODEL.MASK_ON, answer with a VQAHead and ``GLIPv2Predictor.answer``, caption with a
CaptionHead and ``GLIPv2Predictor.caption``), so new heads plug in without touching the page."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TASKS", "Task", "available_tasks"]


@dataclass(frozen=True)
class Task:
    """One choice of the page's task selector and what its prompt box asks for."""

    key: str
    title: str
    prompt_hint: str  # shown as the prompt box's placeholder; "" when the task reads no prompt
    head: str = ""  # the task head (MODEL.GLIPV2.TASK_HEADS) the task needs, if any
    method: str = ""  # the predictor method the task calls, if not the plain grounding call

    @property
    def needs_prompt(self) -> bool:
        return bool(self.prompt_hint)


TASKS = (
    Task("detect", "Detect categories", "comma-separated category names, e.g. person, dog, frisbee"),
    Task("ground", "Ground a caption", "a sentence; its noun phrases are grounded unless you list phrases"),
    Task("segment", "Segment categories", "comma-separated category names", head="MaskHead"),
    Task("answer", "Answer a question", "a question about the image", head="VQAHead", method="answer"),
    Task("caption", "Caption the image", "", head="CaptionHead", method="caption"),
)


def available_tasks(predictor) -> list[Task]:
    """The tasks this predictor's model supports, in the page's order."""
    heads = set(predictor.model.task_heads.keys())
    return [task for task in TASKS if (not task.head or task.head in heads)
            and (not task.method or callable(getattr(predictor, task.method, None)))]
