#!/usr/bin/env python
"""Quick-start entry point: tools/train_net.py with the synthetic quick-start sets registered.

  python projects/GLIPv2/train_net.py --config-file configs/quickstart/train.yaml
  python projects/GLIPv2/train_net.py --config-file configs/quickstart/pretrain.yaml SEED 1
The glipv2_synthetic_* sets are generated under $DETECTRON2_DATASETS/glipv2_synthetic on first use.
"""

from glipv2_d2.engine.launcher import run_from_command_line
from glipv2_quickstart import register_quickstart_datasets

if __name__ == "__main__":
    run_from_command_line(register_quickstart_datasets)
