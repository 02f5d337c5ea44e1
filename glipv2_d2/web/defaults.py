"""Which model the web demo starts on: the quick-start model once ``make quickstart`` has trained it
(its segmentation stage when that has run too), else the untrained quick-start architecture with a
note, so that the page always comes up with one command."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ModelChoice", "default_model", "synthetic_examples"]

REPO = Path(__file__).resolve().parents[2]
QUICKSTART_WEIGHTS = REPO / "output" / "quickstart" / "model_final.pth"
QUICKSTART_MASK_WEIGHTS = REPO / "output" / "quickstart_mask" / "model_final.pth"
SYNTHETIC_VAL = REPO / "datasets" / "glipv2_synthetic" / "val"
UNTRAINED_NOTE = (
    "The weights are UNTRAINED (no `make quickstart` run yet, no MODEL.WEIGHTS given): scores stay near "
    "0.01, so lower the threshold to see boxes at all. `make quickstart` trains the small model in about "
    "13 minutes on a CPU; then `make web-demo` starts on it."
)


@dataclass(frozen=True)
class ModelChoice:
    """A config file, its overrides and a note for the page about what the weights are."""

    config_file: str
    opts: list[str] = field(default_factory=list)
    note: str = ""
    example_prompt: str = "person, rocket, flag"


def default_model(config_file: str | None, opts: list[str]) -> ModelChoice:
    """The user's --config-file and overrides when given, else the best quick-start model present."""
    if config_file:
        weights_given = "MODEL.WEIGHTS" in opts[::2]
        return ModelChoice(config_file, list(opts), "" if weights_given else
                           "No MODEL.WEIGHTS given: the config's own weights are used (untrained if it names none).")
    if QUICKSTART_MASK_WEIGHTS.is_file():
        return ModelChoice(str(REPO / "configs/quickstart/mask.yaml"),
                           ["MODEL.WEIGHTS", str(QUICKSTART_MASK_WEIGHTS), *opts],
                           "Quick-start model trained on the synthetic shapes (with its mask head).",
                           "red circle, blue square, yellow triangle")
    if QUICKSTART_WEIGHTS.is_file():
        return ModelChoice(str(REPO / "configs/quickstart/train.yaml"),
                           ["MODEL.WEIGHTS", str(QUICKSTART_WEIGHTS), *opts],
                           "Quick-start model trained on the synthetic shapes (`make quickstart`): "
                           "it knows coloured circles, squares and triangles, not photos.",
                           "red circle, blue square, yellow triangle")
    return ModelChoice(str(REPO / "configs/quickstart/demo.yaml"), list(opts), UNTRAINED_NOTE)


def synthetic_examples(limit: int = 3) -> list[Path]:
    """A few synthetic val images (written by ``make quickstart``) to pick on the page, if present."""
    return sorted(SYNTHETIC_VAL.glob("*.png"))[:limit] if SYNTHETIC_VAL.is_dir() else []
