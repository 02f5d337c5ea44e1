#!/usr/bin/env python
"""ODinW few-shot transfer (GLIPv2 Table 12): zero-shot, prompt tuning and full fine-tuning of one
model on the 13 ODinW datasets found under $DETECTRON2_DATASETS/odinw (datasets/README.md), k shots
and seeds each, printed as a table of bbox AP with the average and written as CSV.

  python tools/odinw.py --config-file configs/glipv2_T.yaml --output output/odinw \
      --shots 1,3,5,10 --seeds 3,30,300 MODEL.WEIGHTS weights/glip_tiny_d2.pth MODEL.DEVICE cuda

Every run starts from MODEL.WEIGHTS with the config's solver (full fine-tuning) or with official
GLIP's prompt-tuning settings (--prompt-tuning-opts); --shots 0 trains on the whole training split.
Writes <output>/odinw_table.csv, <output>/odinw_runs.csv and each run's folder <output>/<dataset>/...
"""

import argparse
import logging
import os
import sys

from detectron2.utils.logger import setup_logger

from glipv2_d2.config import check_device_available, setup_cfg
from glipv2_d2.data.datasets import datasets_root
from glipv2_d2.data.datasets.odinw import ODINW_13, register_odinw, register_odinw_datasets
from glipv2_d2.data.few_shot import FEW_SHOT_SEEDS, FEW_SHOTS
from glipv2_d2.engine.odinw import MODES, PROMPT_TUNING_OPTS, format_table, run_odinw, write_csv


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _integers(text: str) -> list[int]:
    return [int(value) for value in _names(text)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--output", required=True, help="folder for the runs and the CSV files")
    parser.add_argument("--root", help="datasets root holding odinw/ (default: $DETECTRON2_DATASETS or datasets)")
    parser.add_argument("--datasets", type=_names, help="comma-separated Table 12 names, each must be present "
                        f"(default: every one found): {','.join(d.name for d in ODINW_13)}")
    parser.add_argument("--shots", type=_integers, default=list(FEW_SHOTS), help="comma-separated k (default 1,3,5,10)")
    parser.add_argument("--seeds", type=_integers, default=list(FEW_SHOT_SEEDS), help="comma-separated sampling seeds")
    parser.add_argument("--modes", type=_names, default=list(MODES), help=f"comma-separated, of {','.join(MODES)}")
    parser.add_argument("--prompt-tuning-opts", type=str.split, default=[str(v) for v in PROMPT_TUNING_OPTS],
                        help="config KEY VALUE pairs of the prompt-tuning runs, in one quoted string")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides of every run, KEY VALUE pairs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = setup_cfg(args.config_file, args.opts)
    check_device_available(cfg)
    setup_logger(name="glipv2_d2", abbrev_name="glipv2")
    root = args.root or datasets_root()
    try:
        if args.datasets:
            unknown = sorted(set(args.datasets) - {d.name for d in ODINW_13})
            if unknown:
                known = [d.name for d in ODINW_13]
                raise FileNotFoundError(f"unknown ODinW datasets {unknown}; Table 12's are {known}")
            chosen = [d for d in ODINW_13 if d.name in args.datasets]
            for dataset in chosen:
                register_odinw(dataset, root)
        else:
            chosen = register_odinw_datasets(root)
            if not chosen:
                raise FileNotFoundError(f"no ODinW dataset under {os.path.join(root, 'odinw')} (datasets/README.md)")
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    runs = run_odinw(cfg, chosen, args.shots, args.seeds, args.output, args.modes, args.prompt_tuning_opts)
    table = format_table(runs)
    write_csv(runs, os.path.join(args.output, "odinw_table.csv"), os.path.join(args.output, "odinw_runs.csv"))
    logging.getLogger("glipv2_d2").info("ODinW bbox AP\n%s", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
