#!/usr/bin/env python
"""Export a GLIPv2 detector for one fixed prompt as TorchScript, runnable with plain torch and
torchvision (no glipv2_d2, no Detectron2); see glipv2_d2/export.py for what is inside and why not ONNX.

  python tools/export.py --config-file configs/quickstart/train.yaml --categories "red circle,blue square" \
      --height 320 --width 320 --output exported/shapes.pt MODEL.WEIGHTS output/quickstart/model_final.pth

Writes <output> and <output>.json (input size and format, label names). Run it as:

  import torch, torchvision  # torchvision registers the deform_conv2d and nms ops the file calls
  detector = torch.jit.load("exported/shapes.pt")
  boxes, scores, labels = detector(image)  # image: (3, H, W) float, INPUT.FORMAT (BGR), 0..255, exported H x W

Boxes are in the pixels of that H x W input: resize your image to it and scale the boxes back.
"""

# ruff: noqa: E402  (the warning filter must precede the imports that warn)
import warnings

warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

import argparse
import sys

import torch

from glipv2_d2.config import setup_cfg
from glipv2_d2.engine.predictor import GLIPv2Predictor
from glipv2_d2.export import export_torchscript


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--categories", help="comma-separated category names (one prompt; no chunking)")
    text.add_argument("--caption", help="a caption to ground (with --phrases, else as a whole)")
    parser.add_argument("--phrases", help="comma-separated phrases of --caption")
    parser.add_argument("--height", type=int, default=320, help="input height of the exported file")
    parser.add_argument("--width", type=int, default=320, help="input width of the exported file")
    parser.add_argument("--output", required=True, help="the .pt file to write (and <output>.json)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = setup_cfg(args.config_file, [*args.opts, "MODEL.DEVICE", "cpu"])
    predictor = GLIPv2Predictor(cfg)
    phrases = [p.strip() for p in args.phrases.split(",")] if args.phrases else None
    prompt = [c.strip() for c in args.categories.split(",")] if args.categories else args.caption
    prompts = predictor.build_prompts(prompt, phrases)
    if len(prompts) != 1:
        print(f"error: the vocabulary needs {len(prompts)} prompts; export one that fits the token limit",
              file=sys.stderr)
        return 1
    example = torch.zeros(3, args.height, args.width)
    info = export_torchscript(predictor.model, prompts[0], example, args.output)
    print(f"wrote {args.output} (input {info['input_size']} {info['input_format']}, "
          f"labels {info['label_names']}) and {args.output}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
