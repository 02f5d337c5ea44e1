#!/usr/bin/env python
"""A local web page to try GLIPv2: upload or pick an image, choose the task, type a prompt, move
the score threshold, and see the boxes drawn with their phrases, a table of detections and the JSON
record (glipv2_d2/detections.schema.json) to download.

  make web-demo                                    # the quick-start model once `make quickstart` ran
  python tools/web_demo.py --config-file configs/glipv2_T.yaml MODEL.WEIGHTS weights/glip_tiny_d2.pth

It serves on 127.0.0.1 (this machine only) unless --host says otherwise, needs no internet (Gradio's
analytics are off and the page loads nothing from a CDN) and needs `pip install -r
requirements-web.txt` (Gradio, and spaCy for captions without listed phrases).
"""

# ruff: noqa: E402  (the environment must be set before Gradio is imported)
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import argparse
import sys

import torch

from glipv2_d2.config import setup_cfg
from glipv2_d2.data.builtin_images import BUILTIN_IMAGES
from glipv2_d2.web.app import build_app, import_gradio, launch_app
from glipv2_d2.web.defaults import default_model
from glipv2_d2.web.session import session_for_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", help="model config (default: the quick-start model, trained if present)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import_gradio()
    except ImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    choice = default_model(args.config_file, args.opts)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    cfg = setup_cfg(choice.config_file, [*choice.opts, "MODEL.DEVICE", device])
    session = session_for_config(cfg)
    session.start()
    print(f"web demo: {choice.config_file} {' '.join(choice.opts)}; the model loads in the background")
    launch_app(build_app(session, choice, list(BUILTIN_IMAGES)), args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
