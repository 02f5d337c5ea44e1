"""The command line of training and evaluation, shared by tools/train_net.py and project entry points
that register datasets of their own (e.g. the quick start's synthetic sets)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results

from ..checkpoint import GLIPv2Checkpointer
from ..config import setup_cfg
from ..data.datasets import register_all_glipv2_datasets
from .trainer import GLIPv2Trainer

__all__ = ["main", "run_from_command_line", "setup"]

DatasetRegistration = Callable[[], None]


def setup(args: argparse.Namespace, register_datasets: DatasetRegistration | None = None) -> CfgNode:
    """The resolved config, Detectron2's run setup (output folder, logs, seed) and the datasets."""
    cfg = setup_cfg(args.config_file, args.opts)
    default_setup(cfg, args)
    register_all_glipv2_datasets()
    if register_datasets is not None:
        register_datasets()
    return cfg


def main(args: argparse.Namespace, register_datasets: DatasetRegistration | None = None):
    """Train (``--resume`` continues the last checkpoint) or, with ``--eval-only``, evaluate MODEL.WEIGHTS."""
    cfg = setup(args, register_datasets)
    if args.eval_only:
        model = GLIPv2Trainer.build_model(cfg)
        GLIPv2Checkpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = GLIPv2Trainer.test(cfg, model)
        verify_results(cfg, results)
        return results
    trainer = GLIPv2Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def run_from_command_line(register_datasets: DatasetRegistration | None = None) -> None:
    """Parse Detectron2's standard arguments and run ``main`` in every process of the launch
    (``register_datasets`` must be a module-level function: worker processes import it)."""
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args, register_datasets))
