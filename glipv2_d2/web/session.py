"""One model behind the page: loaded in the background (the page shows its progress meanwhile), and
used by one request at a time, so that two requests at once wait their turn instead of sharing the
model's buffers. Every failure a request can cause comes back as a message, never as an exception
that would end the server."""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.structures import Boxes, Instances

from ..data.builtin_images import builtin_image
from ..data.noun_phrases import NounPhraseModelMissing, noun_phrase_spans
from ..detection_records import detection_record
from ..detection_selection import select_detections
from ..visualizer import draw_grounded_detections
from .inputs import DemoInputError, check_prompt, read_upload, split_names
from .tasks import Task, available_tasks

__all__ = ["TABLE_COLUMNS", "DemoRequest", "DemoResult", "DemoSession", "session_for_config"]

logger = logging.getLogger(__name__)
TABLE_COLUMNS = ["#", "phrase", "score", "x0", "y0", "x1", "y1"]
Progress = Callable[[float, str], None]


@dataclass
class DemoRequest:
    """What the page sends: an uploaded file or a built-in image name, the task and its prompt."""

    task: str
    prompt: str = ""
    phrases: str = ""
    upload: str | None = None
    builtin: str | None = None
    score_threshold: float = 0.3
    top_k: int = 0


@dataclass
class DemoResult:
    """What the page shows: the drawn picture, the table, the JSON file to download and a message."""

    picture: np.ndarray | None = None
    table: list[list] = field(default_factory=list)
    json_path: str | None = None
    message: str = ""
    answer: str = ""

    @property
    def ok(self) -> bool:
        return self.picture is not None


def _no_progress(fraction: float, text: str) -> None:
    logger.debug("%.0f%% %s", 100 * fraction, text)


class DemoSession:
    """Builds the predictor with ``build_predictor`` (in a thread when ``start`` is called) and runs
    requests on it one at a time."""

    def __init__(self, build_predictor: Callable[[], object], output_dir: str | Path | None = None):
        self._build_predictor = build_predictor
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self.predictor = None
        self.load_error = ""
        self.load_started = time.monotonic()
        self.load_seconds = 0.0
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="glipv2_web_"))

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.load, name="glipv2-model-load", daemon=True)
        thread.start()
        return thread

    def load(self) -> None:
        self.load_started = time.monotonic()
        try:
            self.predictor = self._build_predictor()
        except Exception as error:  # any failure is shown on the page instead of killing the server
            logger.exception("model load failed")
            self.load_error = f"{type(error).__name__}: {error}"
        self.load_seconds = time.monotonic() - self.load_started
        self._loaded.set()

    @property
    def ready(self) -> bool:
        return self._loaded.is_set() and self.predictor is not None

    def status(self) -> str:
        """One line for the page about the model load."""
        if not self._loaded.is_set():
            return f"Loading the model... {time.monotonic() - self.load_started:.0f} s"
        if self.load_error:
            return f"The model could not be loaded: {self.load_error}"
        return f"Model loaded in {self.load_seconds:.1f} s on {self.predictor.cfg.MODEL.DEVICE}."

    def tasks(self) -> list[Task]:
        return available_tasks(self.predictor) if self.ready else []

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    def run(self, request: DemoRequest, progress: Progress = _no_progress) -> DemoResult:
        """The request's result, or a result whose message says what was wrong with it."""
        try:
            if not self._loaded.is_set():
                progress(0.0, "waiting for the model to load")
                self._loaded.wait()
            if self.predictor is None:
                raise DemoInputError(f"The model could not be loaded: {self.load_error}")
            progress(0.05, "waiting for the previous request" if self._lock.locked() else "reading the image")
            with self._lock:
                return self._run(request, progress)
        except DemoInputError as error:
            return DemoResult(message=str(error))
        except NounPhraseModelMissing as error:
            return DemoResult(message=str(error))
        except Exception as error:  # the server must outlive any request; the log keeps the trace
            logger.exception("request failed")
            return DemoResult(message=f"The request failed: {type(error).__name__}: {error}")

    def _image(self, request: DemoRequest) -> tuple[np.ndarray, str, str]:
        if request.upload:
            image, note = read_upload(request.upload)
            return image, Path(request.upload).name, note
        if request.builtin:
            if Path(request.builtin).is_file():
                image, note = read_upload(request.builtin)
                return image, Path(request.builtin).name, note
            return builtin_image(request.builtin), request.builtin, ""
        raise DemoInputError("No image: upload one or pick a built-in image.")

    def _task(self, key: str) -> Task:
        for task in self.tasks():
            if task.key == key:
                return task
        raise DemoInputError(f"This model cannot {key!r}; it offers {[t.key for t in self.tasks()]}.")

    def _run(self, request: DemoRequest, progress: Progress) -> DemoResult:
        task = self._task(request.task)
        prompt = check_prompt(request.prompt, task.prompt_hint) if task.needs_prompt else ""
        image, name, note = self._image(request)
        if task.method:
            progress(0.3, f"running the model ({task.title.lower()})")
            output = getattr(self.predictor, task.method)(image, prompt) if prompt else getattr(
                self.predictor, task.method)(image)
            return self._finish(task, request, image, name, prompt or task.key, output.get("instances"),
                                [], note, answer=_answer_text(output))
        phrases = split_names(request.phrases) if request.phrases.strip() else None
        spans = None
        if task.key == "ground" and phrases is None:
            progress(0.15, "finding the caption's noun phrases")
            spans = noun_phrase_spans(prompt) or None
            if spans is None:
                note = " ".join(filter(None, [note, "No noun phrase found: the whole caption is grounded."]))
        model_prompt = prompt if task.key == "ground" else split_names(prompt)
        prompts = self.predictor.build_prompts(model_prompt, phrases if task.key == "ground" else None, spans)
        progress(0.3, "running the model")
        with torch.no_grad():
            instances = self.predictor(image, model_prompt, phrases=phrases if task.key == "ground" else None,
                                       spans=spans)
        if task.key != "segment" and instances.has("pred_masks"):
            instances.remove("pred_masks")
        return self._finish(task, request, image, name, model_prompt, instances, prompts, note)

    def _finish(self, task: Task, request: DemoRequest, image: np.ndarray, name: str, prompt,
                instances: Instances | None, prompts: list, note: str, answer: str = "") -> DemoResult:
        if instances is None:
            instances = Instances(image.shape[:2], pred_boxes=Boxes(torch.zeros(0, 4)), scores=torch.zeros(0),
                                  pred_classes=torch.zeros(0, dtype=torch.long),
                                  pred_phrases=np.array([], dtype=object))
        shown = select_detections(instances, request.score_threshold, request.top_k)
        picture = draw_grounded_detections(image, shown, request.score_threshold)
        record = detection_record(name, prompt, shown, prompts or None, self.predictor.model.tokenizer)
        if answer:
            record["answer"] = answer
        json_path = self.output_dir / f"{Path(name).stem}_{task.key}_{time.time_ns()}.json"
        json_path.write_text(json.dumps(record, indent=1))
        table = [[i + 1, d["phrase"], d["score"], *d["box_xyxy"]] for i, d in enumerate(record["detections"])]
        hidden = len(instances) - len(shown)
        message = " ".join(filter(None, [
            f"{len(shown)} detections at score >= {request.score_threshold:g}"
            + (f" ({hidden} more below the threshold or past top-k)." if hidden else "."),
            note,
        ]))
        return DemoResult(picture, table, str(json_path), message, answer)


def _answer_text(output: dict) -> str:
    """The text a caption or answer method returns, whatever its key."""
    for key in ("caption", "answer"):
        if isinstance(output.get(key), str):
            return output[key]
    answers = output.get("answers")
    if answers:
        first = answers[0]
        return first if isinstance(first, str) else json.dumps(first)
    return ""


def session_for_config(cfg: CfgNode) -> DemoSession:
    """A session on a GLIPv2Predictor of ``cfg`` (built when the session starts)."""
    from ..engine.predictor import GLIPv2Predictor

    return DemoSession(lambda: GLIPv2Predictor(cfg))
