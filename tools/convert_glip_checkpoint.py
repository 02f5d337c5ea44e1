#!/usr/bin/env python
"""Convert an official GLIP / GLIPv2 checkpoint into a file for cfg.MODEL.WEIGHTS.

Example:
  python tools/convert_glip_checkpoint.py --config-file configs/glipv2_T.yaml \
      --input glip_tiny_model_o365_goldg.pth --output weights/glip_tiny_d2.pth
The conversion is strict: it fails, listing the keys, unless checkpoint and model match one to one.
"""

import argparse
import sys

from detectron2.modeling import build_model

from glipv2_d2.checkpoint import (
    CheckpointFileError,
    CheckpointMismatchError,
    UntrustedCheckpointError,
    convert_official_checkpoint,
    save_detectron2_checkpoint,
)
from glipv2_d2.config import setup_cfg


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="config of the model the weights are for")
    parser.add_argument("--input", required=True, help="official checkpoint (.pth)")
    parser.add_argument("--output", required=True, help="where to write the converted checkpoint")
    parser.add_argument("--ema", action="store_true", help="convert the 'model_ema' weights instead of 'model'")
    parser.add_argument("--trusted-pickle", action="store_true",
                        help="allow arbitrary pickled objects (only for files from a source you trust); "
                        "same as MODEL.TRUST_PICKLED_WEIGHTS True")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    trust = ["MODEL.TRUST_PICKLED_WEIGHTS", "True"] if args.trusted_pickle else []
    cfg = setup_cfg(args.config_file, [*args.opts, *trust, "MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    try:
        state_dict = convert_official_checkpoint(args.input, model, args.ema, cfg.MODEL.TRUST_PICKLED_WEIGHTS)
    except (CheckpointMismatchError, CheckpointFileError, UntrustedCheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    save_detectron2_checkpoint(state_dict, args.output)
    print(f"converted {len(state_dict)} tensors from {args.input} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
