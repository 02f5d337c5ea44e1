"""The ODinW transfer protocol (GLIP Table 12-style; GLIPv2 section 4.3): every registered ODinW
dataset read zero-shot, then, for each k-shot subset and seed, by prompt tuning and by full
fine-tuning from the same weights, each scored by COCO bbox AP on the dataset's evaluation split.

The result is one row per (method, shots) with the per-dataset AP averaged over seeds and the mean
over datasets, printed as a table and written as CSV (also every single run).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from detectron2.config import CfgNode

from ..checkpoint import GLIPv2Checkpointer
from ..data.datasets.odinw import OdinwDataset, odinw_dataset_name
from ..data.few_shot import register_few_shot
from .prompt_tuning_trainer import PromptTuningTrainer
from .trainer import GLIPv2Trainer

__all__ = ["MODES", "PROMPT_TUNING_OPTS", "OdinwRun", "format_table", "run_odinw", "summarize", "write_csv"]

logger = logging.getLogger(__name__)

MODES = ("zero_shot", "prompt_tuning", "full")
# Official GLIP's prompt-tuning settings (its README: SOLVER.BASE_LR 0.05, SOLVER.WEIGHT_DECAY 0.25).
PROMPT_TUNING_OPTS = ("SOLVER.BASE_LR", 0.05, "SOLVER.WEIGHT_DECAY", 0.25)
_TITLES = {"zero_shot": "zero-shot", "prompt_tuning": "prompt tuning", "full": "full fine-tuning"}


@dataclass(frozen=True)
class OdinwRun:
    """One trained (or zero-shot) model scored on one dataset; shots 0 means all training data."""

    dataset: str
    mode: str
    shots: int
    seed: int
    ap: float


def _run_cfg(cfg: CfgNode, train: str, test: str, output_dir: str, extra: Sequence = ()) -> CfgNode:
    run = cfg.clone()
    run.defrost()
    run.DATASETS.TRAIN = (train,)
    run.DATASETS.TEST = (test,)
    run.OUTPUT_DIR = output_dir
    run.merge_from_list(list(extra))
    run.freeze()
    os.makedirs(output_dir, exist_ok=True)
    return run


def _bbox_ap(results: dict) -> float:
    return float(results.get("bbox", {}).get("AP", math.nan))


def evaluate_zero_shot(cfg: CfgNode) -> float:
    """bbox AP of MODEL.WEIGHTS on DATASETS.TEST with the vocabulary prompt."""
    model = GLIPv2Trainer.build_model(cfg)
    GLIPv2Checkpointer(model, trust_pickle=cfg.MODEL.TRUST_PICKLED_WEIGHTS).load(cfg.MODEL.WEIGHTS)
    return _bbox_ap(GLIPv2Trainer.test(cfg, model))


def train_and_evaluate(cfg: CfgNode, prompt_tuning: bool) -> float:
    """Train from MODEL.WEIGHTS (the prompt alone, or everything) and return the final bbox AP."""
    trainer = PromptTuningTrainer(cfg) if prompt_tuning else GLIPv2Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    # DefaultTrainer's final evaluation (its EvalHook) keeps the results here.
    return _bbox_ap(trainer._last_eval_results)


def run_odinw(
    cfg: CfgNode,
    datasets: Sequence[OdinwDataset],
    shots: Sequence[int],
    seeds: Sequence[int],
    output_dir: str,
    modes: Sequence[str] = MODES,
    prompt_tuning_opts: Sequence = PROMPT_TUNING_OPTS,
) -> list[OdinwRun]:
    """Every (dataset, mode, shots, seed) run of the protocol on registered datasets; shots 0 trains
    on the whole training split (once, with the first seed)."""
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"unknown ODinW modes {unknown}; choose from {list(MODES)}")
    runs = []
    for dataset in datasets:
        train, test = odinw_dataset_name(dataset, "train"), odinw_dataset_name(dataset, dataset.eval_split)
        base = os.path.join(output_dir, dataset.name)
        if "zero_shot" in modes:
            ap = evaluate_zero_shot(_run_cfg(cfg, train, test, os.path.join(base, "zero_shot")))
            runs.append(OdinwRun(dataset.name, "zero_shot", 0, 0, ap))
            logger.info("ODinW %s zero-shot: AP %.1f", dataset.name, ap)
        for k in shots:
            for seed in seeds if k else seeds[:1]:
                subset = register_few_shot(train, k, seed) if k else train
                for mode in (m for m in modes if m != "zero_shot"):
                    tuning = mode == "prompt_tuning"
                    extra = ("MODEL.PROMPT_TUNING.ENABLED", True, *prompt_tuning_opts) if tuning else ()
                    folder = os.path.join(base, f"{mode}_{k}shot_seed{seed}")
                    ap = train_and_evaluate(_run_cfg(cfg, subset, test, folder, extra), tuning)
                    runs.append(OdinwRun(dataset.name, mode, k, seed, ap))
                    logger.info("ODinW %s %s %d-shot seed %d: AP %.1f", dataset.name, mode, k, seed, ap)
    return runs


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def summarize(runs: Sequence[OdinwRun]) -> tuple[list[str], list[tuple[str, list[float], float]]]:
    """(datasets, rows): a row per (method, shots) with each dataset's AP averaged over seeds, and
    the average over datasets (Table 12's "Avg")."""
    datasets = list(dict.fromkeys(run.dataset for run in runs))
    grouped: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        grouped[(run.mode, run.shots)][run.dataset].append(run.ap)
    rows = []
    for (mode, shots), per_dataset in grouped.items():
        title = _TITLES[mode] if mode == "zero_shot" else f"{shots or 'full'}-shot {_TITLES[mode]}"
        values = [_mean(per_dataset.get(name, [])) for name in datasets]
        rows.append((title, values, _mean(values)))
    return datasets, rows


def format_table(runs: Sequence[OdinwRun]) -> str:
    """The summary as an aligned text table of bbox AP."""
    datasets, rows = summarize(runs)
    width = max([len("method")] + [len(title) for title, _, _ in rows])
    header = "method".ljust(width) + "".join(f"  {name:>11}" for name in [*datasets, "Avg"])
    lines = [header, "-" * len(header)]
    for title, values, average in rows:
        lines.append(title.ljust(width) + "".join(f"  {value:11.1f}" for value in [*values, average]))
    return "\n".join(lines)


def write_csv(runs: Sequence[OdinwRun], table_path: str, runs_path: str) -> None:
    """The summary table (one row per method and shots) and every run, as CSV."""
    datasets, rows = summarize(runs)
    with open(table_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", *datasets, "Avg"])
        writer.writerows([title, *(f"{v:.2f}" for v in values), f"{average:.2f}"] for title, values, average in rows)
    with open(runs_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dataset", "mode", "shots", "seed", "AP"])
        writer.writerows([r.dataset, r.mode, r.shots, r.seed, f"{r.ap:.2f}"] for r in runs)
