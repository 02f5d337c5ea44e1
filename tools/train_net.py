#!/usr/bin/env python
"""Train or evaluate GLIPv2 with Detectron2's launcher (one or many GPUs / machines, or the CPU).

  python tools/train_net.py --config-file configs/glipv2_T.yaml --num-gpus 8 --resume
  python tools/train_net.py --config-file configs/coco/glipv2_T_finetune.yaml --eval-only \
      MODEL.WEIGHTS weights/glip_tiny_d2.pth
  python tools/train_net.py --config-file configs/coco/glipv2_T_finetune.yaml \
      DATASETS.REGISTER '("mine:mine/train.json:mine/images",)' DATASETS.TRAIN '("mine",)' MODEL.WEIGHTS ...
DATASETS.REGISTER registers COCO-format sets ("name:json_file:image_root") without writing Python; `--help`
says more. The quick start's synthetic sets are not library datasets: train on them with
projects/GLIPv2/train_net.py.
"""

from glipv2_d2.engine.launcher import run_from_command_line

if __name__ == "__main__":
    run_from_command_line()
