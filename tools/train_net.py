#!/usr/bin/env python
"""Train or evaluate GLIPv2 with Detectron2's launcher (one or many GPUs / machines, or the CPU).

  python tools/train_net.py --config-file configs/quickstart/train.yaml
  python tools/train_net.py --config-file configs/glipv2_T.yaml --num-gpus 8 --resume
  python tools/train_net.py --config-file configs/coco/glipv2_T_finetune.yaml --eval-only \
      MODEL.WEIGHTS weights/glip_tiny_d2.pth
"""

from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results

from glipv2_d2 import add_glipv2_config
from glipv2_d2.checkpoint import GLIPv2Checkpointer
from glipv2_d2.data.datasets import register_all_glipv2_datasets
from glipv2_d2.engine.trainer import GLIPv2Trainer


def setup(args) -> CfgNode:
    cfg = add_glipv2_config(get_cfg())
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.SOLVER.STEP_FRACTIONS:
        cfg.SOLVER.STEPS = tuple(int(f * cfg.SOLVER.MAX_ITER) for f in cfg.SOLVER.STEP_FRACTIONS)
    cfg.freeze()
    default_setup(cfg, args)
    register_all_glipv2_datasets()
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = GLIPv2Trainer.build_model(cfg)
        GLIPv2Checkpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = GLIPv2Trainer.test(cfg, model)
        verify_results(cfg, results)
        return results
    trainer = GLIPv2Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
