"""The command line of training and evaluation, shared by tools/train_net.py and project entry points
that register datasets of their own (e.g. the quick start's synthetic sets)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import GLIPv2Checkpointer
from ..config import check_device_available, setup_cfg
from ..data.datasets import register_all_glipv2_datasets, register_grounding_coco, unregister_dataset
from .prompt_tuning_trainer import PromptTuningTrainer
from .trainer import GLIPv2Trainer

__all__ = ["main", "parse_dataset_entry", "register_config_datasets", "run_from_command_line", "setup"]

DatasetRegistration = Callable[[], None]

DESCRIPTION = """\
Train or evaluate GLIPv2 (grounded detection: Swin image encoder, BERT text encoder, VL-DyHead
fusion) with Detectron2's launcher, on one or many GPUs or the CPU. Arguments after the flags are
config KEY VALUE pairs (glipv2_d2/config.py lists the keys this project adds to Detectron2's).

Quick start, synthetic shapes on the CPU:
  projects/GLIPv2/train_net.py --config-file configs/quickstart/train.yaml

Your own COCO-format data without writing Python: DATASETS.REGISTER names each set as
"name:json_file:image_root"; the names can then be used in DATASETS.TRAIN / DATASETS.TEST:
  tools/train_net.py --config-file configs/coco/glipv2_T_finetune.yaml \\
      DATASETS.REGISTER '("mine_train:mine/train.json:mine/images", "mine_val:mine/val.json:mine/images")' \\
      DATASETS.TRAIN '("mine_train",)' DATASETS.TEST '("mine_val",)' MODEL.WEIGHTS glip_tiny_model_o365_goldg.pth

Prompt tuning (the network frozen, one prompt learned; writes OUTPUT_DIR/prompt_final.pth), then
evaluation with the tuned prompt:
  tools/train_net.py --config-file ... MODEL.PROMPT_TUNING.ENABLED True MODEL.WEIGHTS ...
  tools/train_net.py --config-file ... --eval-only --prompt-file OUTPUT_DIR/prompt_final.pth MODEL.WEIGHTS ...
"""


def parse_dataset_entry(entry: object) -> tuple[str, str, str]:
    """One DATASETS.REGISTER entry -> (name, json_file, image_root), both paths checked now so that
    a typo fails at start-up naming the entry, not when the data loader first reads the set."""
    parts = entry.split(":") if isinstance(entry, str) else []
    if len(parts) != 3 or not all(part.strip() for part in parts):
        raise ValueError(
            f"DATASETS.REGISTER entry {entry!r} must be \"name:json_file:image_root\" (three non-empty parts)"
        )
    name, json_file, image_root = (part.strip() for part in parts)
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"DATASETS.REGISTER entry {entry!r}: annotation json {json_file!r} is not a file")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"DATASETS.REGISTER entry {entry!r}: image folder {image_root!r} is not a directory")
    return name, json_file, image_root


def register_config_datasets(cfg: CfgNode) -> None:
    """Register every DATASETS.REGISTER entry as a COCO-format detection set (COCOEvaluator, the
    json's categories as the vocabulary); an entry re-points a name that is already registered."""
    entries = [parse_dataset_entry(entry) for entry in cfg.DATASETS.REGISTER]
    for name, json_file, image_root in entries:
        unregister_dataset(name)
        register_grounding_coco(name, json_file, image_root)


def setup(args: argparse.Namespace, register_datasets: DatasetRegistration | None = None) -> CfgNode:
    """The resolved config, Detectron2's run setup (output folder, logs, seed) and the datasets."""
    prompt_file = getattr(args, "prompt_file", None)
    cfg = setup_cfg(args.config_file, [*args.opts, *(("TEST.PROMPT_FILE", prompt_file) if prompt_file else ())])
    check_device_available(cfg)
    default_setup(cfg, args)
    # default_setup logs only Detectron2's and fvcore's messages; the project's go to the same log.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="glipv2_d2", abbrev_name="glipv2")
    register_all_glipv2_datasets()
    if register_datasets is not None:
        register_datasets()
    register_config_datasets(cfg)
    return cfg


def main(args: argparse.Namespace, register_datasets: DatasetRegistration | None = None):
    """Train (``--resume`` continues the last checkpoint; MODEL.PROMPT_TUNING.ENABLED tunes a prompt of
    the frozen MODEL.WEIGHTS) or, with ``--eval-only``, evaluate MODEL.WEIGHTS (with ``--prompt-file``,
    read detection sets with that tuned prompt)."""
    cfg = setup(args, register_datasets)
    if args.eval_only:
        model = GLIPv2Trainer.build_model(cfg)
        checkpointer = GLIPv2Checkpointer(model, save_dir=cfg.OUTPUT_DIR, trust_pickle=cfg.MODEL.TRUST_PICKLED_WEIGHTS)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = GLIPv2Trainer.test(cfg, model)
        verify_results(cfg, results)
        return results
    trainer = PromptTuningTrainer(cfg) if cfg.MODEL.PROMPT_TUNING.ENABLED else GLIPv2Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def run_from_command_line(register_datasets: DatasetRegistration | None = None, description: str = DESCRIPTION) -> None:
    """Parse Detectron2's standard arguments and run ``main`` in every process of the launch
    (``register_datasets`` must be a module-level function: worker processes import it)."""
    parser = default_argument_parser()
    parser.description = description
    parser.add_argument(
        "--prompt-file",
        help="a tuned prompt (prompt tuning's prompt_final.pth) read instead of the detection sets' vocabulary "
        "prompt (sets TEST.PROMPT_FILE)",
    )
    args = parser.parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args, register_datasets))
