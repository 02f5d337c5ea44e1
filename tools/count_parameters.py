#!/usr/bin/env python
"""Print the parameter counts of GLIPv2 configs, per part, as a Markdown table.

The model is built on the CPU with random weights and never run. "Inference" leaves out the parts
only pre-training uses (the L_mlm head and the L_inter projections).

  python tools/count_parameters.py                       # GLIPv2-T, -B, -H
  python tools/count_parameters.py --config-file configs/glipv2_B.yaml MODEL.DYHEAD.NUM_LAYERS 8
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from detectron2.modeling import build_model
from torch import nn

from glipv2_d2.config import setup_cfg

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = tuple(str(REPO / "configs" / f"glipv2_{size}.yaml") for size in "TBH")
PARTS = ("backbone", "language_backbone", "fusion", "head", "task_heads", "mlm_head", "inter_image_loss")
TRAINING_ONLY = ("mlm_head", "inter_image_loss")


def count_parameters(model: nn.Module) -> Counter:
    """Parameter elements per top-level submodule of ``model``."""
    counts: Counter = Counter()
    for name, parameter in model.named_parameters():
        counts[name.split(".", 1)[0]] += parameter.numel()
    return counts


def config_counts(config_file: str, opts: Sequence[str] = ()) -> Counter:
    """Counts of the model ``config_file`` (plus ``opts``) builds on the CPU."""
    cfg = setup_cfg(config_file, ["MODEL.DEVICE", "cpu", *opts])
    return count_parameters(build_model(cfg))


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def table(rows: dict[str, Counter]) -> str:
    """Markdown table: one row per config, one column per part, totals with and without training-only parts."""
    lines = ["| config | " + " | ".join(PARTS) + " | inference | total |", "|---" * (len(PARTS) + 3) + "|"]
    for name, counts in rows.items():
        total = sum(counts.values())
        inference = total - sum(counts[p] for p in TRAINING_ONLY)
        cells = [_millions(counts[p]) if counts[p] else "-" for p in PARTS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_millions(inference)} | {_millions(total)} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", action="append", help="a config (repeatable); default: GLIPv2-T, -B, -H")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides applied to every config")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configs = args.config_file or list(DEFAULT_CONFIGS)
    rows = {Path(config).stem: config_counts(config, args.opts) for config in configs}
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
