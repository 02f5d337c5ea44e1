#!/usr/bin/env python
"""Ground a prompt in images: draw the boxes with Detectron2's Visualizer and write a JSON.

Examples:
  python tools/demo.py --config-file configs/glipv2_T.yaml --input photo.jpg \
      --categories "person,dog,frisbee" --output out/ MODEL.WEIGHTS weights/glip_tiny_d2.pth
  python tools/demo.py --config-file configs/glipv2_T.yaml --input photos/ \
      --caption "a man throwing a frisbee to his dog" --phrases "man,frisbee,dog" --output out/
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from glipv2_d2.checkpoint import CheckpointMismatchError
from glipv2_d2.config import setup_cfg
from glipv2_d2.data.datasets import coco_category_metadata, register_all_glipv2_datasets
from glipv2_d2.engine.predictor import GLIPv2Predictor

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
BUILTIN_IMAGES = ("astronaut", "chelsea", "coffee", "rocket")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files and/or folders of images")
    source.add_argument("--builtin-image", choices=BUILTIN_IMAGES, help="a photo shipped with scikit-image")
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--categories", help="comma-separated category names (detection prompt)")
    text.add_argument("--caption", help="a free-form sentence to ground")
    text.add_argument("--dataset", help="use the category names of this registered dataset as the prompt")
    text.add_argument("--categories-json",
                      help="use the categories of this COCO-format json, in id order, as the prompt")
    parser.add_argument("--phrases", help="comma-separated phrases of --caption to ground (default: all of it)")
    parser.add_argument("--max-images", type=int, default=0, help="process at most this many inputs (0: all)")
    parser.add_argument("--output", required=True, help="folder for <image>.png and <image>.json")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="draw boxes scoring at least this")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return parser.parse_args(argv)


def demo_cfg(args: argparse.Namespace) -> CfgNode:
    """Training's config of the file and overrides, on CUDA when there is one and --cpu is not given."""
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    return setup_cfg(args.config_file, [*args.opts, "MODEL.DEVICE", device])


def list_images(inputs: list[str]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted); a missing path is an error."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.exists():
            paths.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    if not paths:
        raise FileNotFoundError(f"no images in {inputs}")
    return paths


def builtin_image(name: str) -> np.ndarray:
    """An RGB photo from scikit-image, returned BGR like a file read by the predictor."""
    import skimage.data

    rgb = getattr(skimage.data, name)()
    return np.ascontiguousarray(rgb[:, :, ::-1])


def split_list(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",")] if text else None


def detections_to_json(instances) -> list[dict]:
    return [
        {"box_xyxy": [round(v, 2) for v in box], "score": round(score, 4), "label": label, "phrase": str(phrase)}
        for box, score, label, phrase in zip(
            instances.pred_boxes.tensor.tolist(), instances.scores.tolist(),
            instances.pred_classes.tolist(), instances.pred_phrases,
        )
    ]


def draw(image_bgr: np.ndarray, instances, score_threshold: float) -> np.ndarray:
    keep = instances[instances.scores >= score_threshold]
    labels = [f"{phrase} {score:.2f}" for phrase, score in zip(keep.pred_phrases, keep.scores.tolist())]
    visualizer = Visualizer(image_bgr[:, :, ::-1])
    return visualizer.overlay_instances(boxes=keep.pred_boxes.tensor.numpy(), labels=labels).get_image()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dataset:
        register_all_glipv2_datasets()
        prompt = list(MetadataCatalog.get(args.dataset).thing_classes)
    elif args.categories_json:
        prompt = coco_category_metadata(args.categories_json)["thing_classes"]
    else:
        prompt = split_list(args.categories) if args.categories else args.caption
    phrases = split_list(args.phrases)
    if phrases and not args.caption:
        print("error: --phrases only applies to --caption", file=sys.stderr)
        return 2
    try:
        predictor = GLIPv2Predictor(demo_cfg(args))
        if args.builtin_image:
            named = [(args.builtin_image, builtin_image(args.builtin_image))]
        else:
            named = [(path.stem, path) for path in list_images(args.input)]
        if args.max_images > 0:
            named = named[: args.max_images]
        out_dir = Path(args.output)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, image in named:
            instances = predictor(image, prompt, phrases=phrases)
            bgr = image if isinstance(image, np.ndarray) else predictor.load_image(image)
            Image.fromarray(draw(bgr, instances, args.score_threshold)).save(out_dir / f"{name}.png")
            record = {"image": str(image) if isinstance(image, Path) else name, "prompt": prompt,
                      "detections": detections_to_json(instances)}
            (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1))
            print(f"{name}: {len(instances)} detections -> {out_dir / name}.png / .json")
    except (ValueError, FileNotFoundError, CheckpointMismatchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
