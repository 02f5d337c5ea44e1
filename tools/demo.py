#!/usr/bin/env python
"""Ground a prompt in images: draw the boxes (and masks) with Detectron2's Visualizer and write a JSON.

Examples:
  python tools/demo.py --config-file configs/glipv2_T.yaml --input photo.jpg \
      --categories "person,dog,frisbee" --output out/ MODEL.WEIGHTS weights/glip_tiny_d2.pth
  python tools/demo.py --config-file configs/glipv2_T.yaml --input photos/ \
      --caption "a man throwing a frisbee to his dog" --phrases "man,frisbee,dog" --output out/

  python tools/demo.py --task caption --config-file configs/caption/glipv2_T_caption.yaml \
      --input photo.jpg --output out/ MODEL.WEIGHTS weights/glipv2_T_caption.pth

Input a.jpg is drawn to <output>/a.jpg.png with its detections in <output>/a.jpg.json (a.png gives
a.png.png, so inputs sharing a stem never share outputs; equal file names from different folders get
-2, -3, ...). --output may not be a folder that holds an input, so originals are never overwritten.
An input that cannot be read is reported and skipped; the exit code is then 1 once the rest is done.

Each JSON follows the schema of glipv2_d2/detections.schema.json (fields described in
glipv2_d2/detection_records.py): the image, the prompt and the texts the model read, and one detection
per box with "box_xyxy" (input image pixels), "score", "label" (index of its category or phrase),
"phrase", where the label sits in the prompt ("prompt_index", "token_spans", "char_spans") and, for
models that segment (MODEL.MASK_ON), "mask_rle" (COCO RLE at the input image's size). Every
detection of the model is written (--top-k per phrase applies); --score-threshold selects what is drawn.

A --caption without --phrases is grounded phrase by phrase: its noun phrases are found with spaCy
(glipv2_d2/data/noun_phrases.py; pip install -r requirements-web.txt), and a caption without any is
grounded as a whole.

With --task caption (a captioning model; --beam-size, --max-length, --min-length, --length-penalty
override its MODEL.CAPTION decoding) the picture shows the generated caption over its grounded
phrases' boxes, and the JSON is {"image", "caption", "score", "phrases": [...], "words": [...]}, each
phrase and word {"text", "span": [start, end) in the caption, "box_xyxy", "score"}.

With --task vqa --question "..." (a VQA model, a VQAHead) the picture shows the question and the
answer over the boxes of the question's --phrases and, for grounded VQA (MODEL.VQA.GROUNDED), of
the answer ("answer: <answer>"), and the JSON is {"image", "question", "answer", "score", "topk":
[{"answer", "score"}, ...], "detections": [{"box_xyxy", "score", "label", "phrase"}, ...]}:
  python tools/demo.py --task vqa --config-file configs/quickstart/vqa.yaml \
      --input datasets/glipv2_synthetic/val/000001.png --question "how many squares are there?" \
      --phrases squares --output out/ MODEL.WEIGHTS output/quickstart_vqa/model_final.pth
"""

# ruff: noqa: E402  (the warning filters below must precede the imports that warn)
import warnings

# Import-time notices of dependencies (fvcore's and Detectron2's torch.jit.script, Detectron2 Swin's
# meshgrid call) that a demo user cannot act on; every other warning still shows.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from PIL import Image

from glipv2_d2.checkpoint import CheckpointMismatchError
from glipv2_d2.config import setup_cfg
from glipv2_d2.data.builtin_images import BUILTIN_IMAGES, builtin_image
from glipv2_d2.data.datasets import coco_category_metadata, register_all_glipv2_datasets
from glipv2_d2.data.noun_phrases import NounPhraseModelMissing, noun_phrase_spans
from glipv2_d2.detection_records import detection_record
from glipv2_d2.detection_selection import select_detections
from glipv2_d2.engine.predictor import GLIPv2Predictor
from glipv2_d2.visualizer import draw_answer, draw_caption, draw_grounded_detections

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
TASKS = ("detect", "caption", "vqa")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--task", choices=TASKS, default="detect",
                        help="detect: ground a prompt; caption: generate a grounded caption (no prompt); "
                        "vqa: answer --question (grounded with MODEL.VQA.GROUNDED)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files and/or folders of images")
    source.add_argument("--builtin-image", choices=BUILTIN_IMAGES, help="a photo shipped with scikit-image")
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--categories", help="comma-separated category names (detection prompt)")
    text.add_argument("--caption", help="a free-form sentence to ground")
    text.add_argument("--dataset", help="use the category names of this registered dataset as the prompt")
    text.add_argument("--categories-json",
                      help="use the categories of this COCO-format json, in id order, as the prompt")
    parser.add_argument("--question", help="the question to answer (--task vqa)")
    parser.add_argument("--phrases", help="comma-separated phrases of --caption to ground "
                        "(default: its noun phrases, found with spaCy), or of --question")
    parser.add_argument("--max-images", type=int, default=0, help="process at most this many inputs (0: all)")
    parser.add_argument("--output", required=True,
                        help="folder for <image file name>.png and .json; not a folder holding an input")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="draw boxes scoring at least this")
    parser.add_argument("--top-k", type=int, default=0, help="keep the best k boxes of each phrase (0: all)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    parser.add_argument("--prompt-file", help="read the categories (--categories / --dataset / --categories-json, "
                        "the ones it was tuned on) with this tuned prompt, prompt tuning's prompt_final.pth")
    decoding = parser.add_argument_group("caption decoding (--task caption)")
    decoding.add_argument("--beam-size", type=int)
    decoding.add_argument("--max-length", type=int, help="most generated tokens, end token included")
    decoding.add_argument("--min-length", type=int)
    decoding.add_argument("--length-penalty", type=float)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return parser.parse_args(argv)


def demo_cfg(args: argparse.Namespace) -> CfgNode:
    """Training's config of the file and overrides, on CUDA when there is one and --cpu is not given."""
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    tuned = ("TEST.PROMPT_FILE", args.prompt_file) if args.prompt_file else ()
    return setup_cfg(args.config_file, [*args.opts, "MODEL.DEVICE", device, *tuned])


def list_images(inputs: list[str]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted, not recursive). A path that does not
    exist stays in the list, so that it is reported and skipped like any other unreadable input."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        else:
            paths.append(path)
    if not paths:
        raise FileNotFoundError(f"no images in {inputs}")
    return paths


def input_folders(inputs: list[str]) -> set[Path]:
    """Every folder an input lives in: a folder given, or the folder of a file given."""
    return {(Path(item) if Path(item).is_dir() else Path(item).parent).resolve() for item in inputs}


def check_output_folder(output: Path, inputs: list[str]) -> None:
    """Refuse an --output that holds inputs: its drawings would sit among (or replace) the originals."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file, not a folder")
    if output.resolve() in input_folders(inputs):
        raise ValueError(f"--output {output} is a folder of input images; choose another folder so that "
                         "no original can be overwritten")


def output_names(paths: list[Path]) -> list[str]:
    """One distinct output name per input: its file name with suffix (a.jpg and a.png differ), and
    -2, -3, ... for equal file names from different folders."""
    names: list[str] = []
    taken = {path.name for path in paths}
    seen: set[str] = set()
    for path in paths:
        name, copy = path.name, 1
        while name in seen or (copy > 1 and name in taken):
            copy += 1
            name = f"{path.name}-{copy}"
        seen.add(name)
        names.append(name)
    return names


def split_list(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",")] if text else None


def caption_spans(caption: str, phrases: list[str] | None) -> list[list[tuple[int, int]]] | None:
    """The caption's noun phrases when no phrases are listed (None: ground the whole caption)."""
    if phrases:
        return None
    spans = noun_phrase_spans(caption)
    if not spans:
        print(f"note: no noun phrase in {caption!r}; grounding the whole caption", file=sys.stderr)
    return spans or None


def spans_to_json(spans) -> list[dict]:
    """Grounded words or phrases of a caption as the JSON of --task caption (module doc)."""
    return [{"text": s.text, "span": list(s.span), "box_xyxy": [round(v, 2) for v in s.box], "score": round(s.score, 4)}
            for s in spans]


def caption_outputs(predictor: GLIPv2Predictor, bgr: np.ndarray, args: argparse.Namespace) -> tuple[np.ndarray, dict]:
    """--task caption: the drawn picture and the JSON record of one image."""
    result = predictor.caption(bgr, beam_size=args.beam_size, max_length=args.max_length,
                               min_length=args.min_length, length_penalty=args.length_penalty)
    record = {"caption": result["caption"], "score": round(result["caption_score"], 4),
              "phrases": spans_to_json(result["caption_phrases"]), "words": spans_to_json(result["caption_words"])}
    return draw_caption(bgr, result["caption"], result["instances"]), record


def vqa_outputs(predictor: GLIPv2Predictor, bgr: np.ndarray, args: argparse.Namespace,
                phrases: list[str] | None) -> tuple[np.ndarray, dict]:
    """--task vqa: the drawn picture and the JSON record (module doc) of one image."""
    result = predictor.answer(bgr, args.question, phrases)
    instances = select_detections(result["instances"], 0.0, args.top_k)
    detections = [
        {"box_xyxy": [round(v, 2) for v in box], "score": round(score, 4), "label": label, "phrase": str(phrase)}
        for box, score, label, phrase in zip(instances.pred_boxes.tensor.tolist(), instances.scores.tolist(),
                                             instances.pred_classes.tolist(), instances.pred_phrases)
    ]
    record = {"question": args.question, "answer": result["answer"], "score": round(result["score"], 4),
              "topk": [{"answer": t["answer"], "score": round(t["score"], 4)} for t in result["topk"]],
              "detections": detections}
    picture = draw_answer(bgr, args.question, result["answer"], result["score"], instances, args.score_threshold)
    return picture, record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompt_given = any((args.categories, args.caption, args.dataset, args.categories_json))
    if prompt_given != (args.task == "detect"):
        print("error: --task caption and --task vqa take no prompt; --task detect needs one of --categories, "
              "--caption, --dataset, --categories-json", file=sys.stderr)
        return 2
    if (args.question is not None) != (args.task == "vqa"):
        print("error: --task vqa needs --question, and only --task vqa takes one", file=sys.stderr)
        return 2
    if args.dataset:
        register_all_glipv2_datasets()
        prompt = list(MetadataCatalog.get(args.dataset).thing_classes)
    elif args.categories_json:
        prompt = coco_category_metadata(args.categories_json)["thing_classes"]
    else:
        prompt = split_list(args.categories) if args.categories else args.caption
    phrases = split_list(args.phrases)
    if phrases and not (args.caption or args.question):
        print("error: --phrases only applies to --caption or --question", file=sys.stderr)
        return 2
    failed: list[str] = []
    try:
        out_dir = Path(args.output)
        check_output_folder(out_dir, args.input or [])
        if args.builtin_image:
            named = [(args.builtin_image, builtin_image(args.builtin_image))]
        else:
            paths = list_images(args.input)
            named = list(zip(output_names(paths), paths))
        if args.max_images > 0:
            named = named[: args.max_images]
        spans = caption_spans(args.caption, phrases) if args.caption else None
        predictor = GLIPv2Predictor(demo_cfg(args))
        prompts = predictor.build_prompts(prompt, phrases, spans) if prompt_given else []
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, image in named:
            try:
                bgr = image if isinstance(image, np.ndarray) else predictor.load_image(image)
            except (OSError, ValueError) as error:
                print(f"error: skipped {image}: {error}", file=sys.stderr)
                failed.append(str(image))
                continue
            if args.task == "caption":
                picture, record = caption_outputs(predictor, bgr, args)
                Image.fromarray(picture).save(out_dir / f"{name}.png")
                record = {"image": str(image) if isinstance(image, Path) else name, **record}
                (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1))
                print(f"{image}: {record['caption']!r} -> {out_dir / name}.png / .json")
                continue
            if args.task == "vqa":
                picture, record = vqa_outputs(predictor, bgr, args, phrases)
                Image.fromarray(picture).save(out_dir / f"{name}.png")
                record = {"image": str(image) if isinstance(image, Path) else name, **record}
                (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1))
                print(f"{image}: {args.question!r} -> {record['answer']!r} ({record['score']:.2f}) "
                      f"-> {out_dir / name}.png / .json")
                continue
            instances = select_detections(predictor(bgr, prompt, phrases=phrases, spans=spans), 0.0, args.top_k)
            drawn = int((instances.scores >= args.score_threshold).sum())
            picture = draw_grounded_detections(bgr, instances, args.score_threshold)
            Image.fromarray(picture).save(out_dir / f"{name}.png")
            record = detection_record(str(image) if isinstance(image, Path) else name, prompt, instances,
                                      prompts, predictor.model.tokenizer)
            (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1))
            print(f"{image}: {len(instances)} detections, {drawn} drawn at score >= {args.score_threshold:g} "
                  f"-> {out_dir / name}.png / .json")
    except (ValueError, FileNotFoundError, CheckpointMismatchError, NounPhraseModelMissing) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if failed:
        print(f"error: {len(failed)} of {len(named)} inputs could not be read: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
