#!/usr/bin/env python
"""Time the official GLIP-T code and this project side by side, in one process, on the same input.

Both models are GLIP-T with the SAME random weights: the official model is built from the official
config (``configs/pretrain/glip_Swin_T_O365_GoldG.yaml`` of a microsoft/GLIP checkout that you
supply with ``--official-root``; nothing of it is copied here) under a fixed seed, its state dict is
saved in the official checkpoint format ({"model": {"module." + key: tensor}}), and this project's
``configs/glipv2_T.yaml`` model loads that file through ``GLIPv2Checkpointer`` (strict), as a user
loading ``glip_tiny_model_o365_goldg.pth`` would. One random uint8 BGR image (already at network
size, so no resize is timed) and the 80 COCO category names as one prompt go to both; the official
side runs its own prompt code (``create_queries_and_maps``) and ``GeneralizedVLRCNN.forward``, with
its preprocessing (float BGR255 normalisation, ``to_image_list`` padding to 32) inside the timing,
as this project's model normalises and pads inside its forward. Runs alternate (official, project)
per iteration so that both see the same machine load.

The official code is run without compiling ``maskrcnn_benchmark._C``: ``tools/official_glip_shim.py``
installs a torchvision stand-in and patches the official code at run time for today's torch and
transformers (its docstring lists every patch: torch._six, moved or removed transformers helpers,
unused imports, the CPU refusal of the deformable-conv Functions, numpy's removed aliases, the buggy
CPU branch of boxlist_ml_nms, offline bert-base-uncased). Random weights: the text encoder is
BertConfig()-sized BERT-base. Both models run under torch.no_grad (the official inference's mode).

With random weights the region-word logits sit near the prior, so ``--prior-prob`` (default 0.5,
both configs) keeps every image at the full 100 detections and post-processing does its full work.

Full run (CPU, 2 threads; expect roughly 40-50 s per (official, project) pair of forwards at 800x1200
on 2 cores, going by an earlier hand measurement, plus a minute or two to build both models):
  .venv/bin/python tools/benchmark_official.py --official-root /path/to/GLIP --threads 2 \\
      --height 800 --width 1200 --iters 3 --warmup 1 --json output/bench_official.json
Small smoke run:
  OMP_NUM_THREADS=1 .venv/bin/python tools/benchmark_official.py --official-root /path/to/GLIP \\
      --threads 1 --height 320 --width 480 --iters 1 --warmup 0
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.modeling import build_model
from torch import Tensor, nn
from torchvision.ops import box_iou

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `tools` and `glipv2_d2` importable
    sys.path.insert(0, str(REPO))

from glipv2_d2.checkpoint import GLIPv2Checkpointer  # noqa: E402
from glipv2_d2.config import setup_cfg  # noqa: E402
from glipv2_d2.data.prompt_builder import PromptBuilder  # noqa: E402
from glipv2_d2.modeling.language.tokenizer import build_tokenizer  # noqa: E402
from glipv2_d2.structures import Prompt  # noqa: E402
from tools import official_glip_shim  # noqa: E402

COCO_NAMES = [c["name"] for c in COCO_CATEGORIES if c["isthing"] == 1]
OFFICIAL_CONFIG = "configs/pretrain/glip_Swin_T_O365_GoldG.yaml"
SEED = 0
MATCH_IOU = 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-root", type=Path, required=True, help="a microsoft/GLIP checkout")
    parser.add_argument("--official-config", default=OFFICIAL_CONFIG,
                        help="official GLIP-T config, relative to --official-root")
    parser.add_argument("--config-file", default=str(REPO / "configs" / "glipv2_T.yaml"),
                        help="this project's GLIP-T config")
    parser.add_argument("--height", type=int, default=800, help="image height (network input size)")
    parser.add_argument("--width", type=int, default=1200, help="image width (network input size)")
    parser.add_argument("--iters", type=int, default=3, help="timed forward passes per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forward passes per model first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--prior-prob", type=float, default=0.5,
                        help="MODEL.DYHEAD.PRIOR_PROB of both models (initial region-word bias)")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the random weights and image")
    parser.add_argument("--save-checkpoint", type=Path,
                        help="keep the official-format checkpoint here (default: a temporary file)")
    parser.add_argument("--official-opts", default="",
                        help='overrides of the official config in one string, e.g. "MODEL.ATSS.NMS_TH 0.5"')
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="overrides of this project's config, KEY VALUE")
    args = parser.parse_args(argv)
    args.official_opts = shlex.split(args.official_opts)
    if min(args.iters, args.height, args.width, args.threads) < 1 or args.warmup < 0:
        parser.error("--iters, --height, --width and --threads must be >= 1 and --warmup >= 0")
    if not 0 < args.prior_prob < 1:
        parser.error("--prior-prob must be in (0, 1)")
    return args


# ---------------------------------------------------------------------------------------------
# The official side
# ---------------------------------------------------------------------------------------------

def build_official(args: argparse.Namespace) -> tuple[Any, nn.Module, str, dict[int, list[int]]]:
    """Official cfg, model (random weights, seeded) and the official COCO prompt with its label->tokens map.

    The official constructors print a lot; their stdout is kept out of the report.
    """
    official_glip_shim.install(args.official_root)
    from maskrcnn_benchmark.config import cfg as official_defaults
    from maskrcnn_benchmark.engine.inference import create_queries_and_maps
    from maskrcnn_benchmark.modeling.detector import build_detection_model

    cfg = official_defaults.clone()
    cfg.merge_from_file(str(Path(args.official_root) / args.official_config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.DYHEAD.PRIOR_PROB", args.prior_prob, *args.official_opts])
    cfg.freeze()
    with contextlib.redirect_stdout(io.StringIO()), official_glip_shim.offline_bert(build_tokenizer):
        torch.manual_seed(args.seed)
        model = build_detection_model(cfg)
        model.eval()  # the official train() override returns None, so no chaining
        labels = list(range(1, len(COCO_NAMES) + 1))  # the official COCO evaluation's contiguous ids
        caption, label_to_tokens = create_queries_and_maps(labels, list(COCO_NAMES), cfg=cfg)
    return cfg, model, caption, label_to_tokens


def save_official_checkpoint(model: nn.Module, path: Path) -> None:
    """The official release's layout: {"model": state dict with DistributedDataParallel's "module." prefix}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}}, path)


def official_runner(cfg: Any, model: nn.Module, image_bgr: Tensor, caption: str,
                    label_to_tokens: dict[int, list[int]]) -> Callable[[], dict[str, Tensor]]:
    """One official inference: GLIPDemo's normalisation (BGR 0..255, PIXEL_MEAN/STD), to_image_list, forward."""
    from maskrcnn_benchmark.structures.image_list import to_image_list

    mean = torch.tensor(cfg.INPUT.PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(cfg.INPUT.PIXEL_STD).view(3, 1, 1)

    def run() -> dict[str, Tensor]:
        image = (image_bgr.float() - mean) / std
        images = to_image_list(image, cfg.DATALOADER.SIZE_DIVISIBILITY)
        (result,) = model(images, captions=[caption], positive_map=label_to_tokens)
        result = result.convert("xyxy")
        return {"boxes": result.bbox, "scores": result.get_field("scores"),
                "classes": result.get_field("labels") - 1}  # official labels are 1-based

    return run


# ---------------------------------------------------------------------------------------------
# This project's side
# ---------------------------------------------------------------------------------------------

def build_project(args: argparse.Namespace, checkpoint: Path) -> tuple[nn.Module, Prompt]:
    """This project's GLIP-T, loaded from the official-format file the way MODEL.WEIGHTS is loaded."""
    cfg = setup_cfg(args.config_file, ["MODEL.DYHEAD.PRIOR_PROB", str(args.prior_prob), *args.opts,
                                       "MODEL.DEVICE", "cpu"])
    model = build_model(cfg).eval()
    GLIPv2Checkpointer(model, strict=True, trust_pickle=False).load(str(checkpoint))
    prompts = PromptBuilder(cfg, model.tokenizer).categories(COCO_NAMES)
    if len(prompts) != 1:
        raise ValueError(f"the COCO names need {len(prompts)} prompts with this config; the comparison needs one")
    return model, prompts[0]


def project_runner(model: nn.Module, image_bgr: Tensor, prompt: Prompt) -> Callable[[], dict[str, Tensor]]:
    """One forward of this project's model on the same image (its preprocessing is inside the forward)."""
    height, width = image_bgr.shape[-2:]
    inputs = [{"image": image_bgr, "height": height, "width": width, "prompt": prompt}]

    def run() -> dict[str, Tensor]:
        instances = model(inputs)[0]["instances"]
        return {"boxes": instances.pred_boxes.tensor, "scores": instances.scores, "classes": instances.pred_classes}

    return run


# ---------------------------------------------------------------------------------------------
# Timing and comparison
# ---------------------------------------------------------------------------------------------

def time_alternating(runners: dict[str, Callable[[], dict[str, Tensor]]], iters: int,
                     warmup: int) -> tuple[dict[str, list[float]], dict[str, dict[str, Tensor]]]:
    """Seconds per forward for each runner, alternating runners within every iteration so that load
    changes on a shared machine hit both alike; returns the last outputs too."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    outputs: dict[str, dict[str, Tensor]] = {}
    with torch.no_grad():
        for step in range(warmup + iters):
            for name, run in runners.items():
                start = time.perf_counter()
                outputs[name] = run()
                elapsed = time.perf_counter() - start
                if step >= warmup:
                    times[name].append(elapsed)
                print(f"  {'warm-up' if step < warmup else 'timed'} {step + 1}/{warmup + iters} {name}: "
                      f"{elapsed:.2f} s", flush=True)
    return times, outputs


def compare_detections(official: dict[str, Tensor], project: dict[str, Tensor],
                       iou_threshold: float = MATCH_IOU) -> dict[str, Any]:
    """Greedy one-to-one matching by decreasing official score: same class, IoU >= threshold.

    Returns counts, matched pairs, and the largest score / box-coordinate differences over the pairs.
    """
    ious = box_iou(official["boxes"].float(), project["boxes"].float())
    same_class = official["classes"].view(-1, 1) == project["classes"].view(1, -1)
    ious = torch.where(same_class, ious, torch.zeros_like(ious))
    taken = torch.zeros(len(project["scores"]), dtype=torch.bool)
    pairs = []
    for i in torch.argsort(official["scores"], descending=True).tolist():
        if ious.shape[1] == 0:
            break
        candidates = ious[i].masked_fill(taken, -1.0)
        j = int(candidates.argmax())
        if candidates[j] >= iou_threshold:
            taken[j] = True
            pairs.append((i, j))
    report: dict[str, Any] = {"official_detections": len(official["scores"]),
                              "project_detections": len(project["scores"]),
                              "matched": len(pairs), "match_iou": iou_threshold,
                              "all_matched": len(pairs) == len(official["scores"]) == len(project["scores"]),
                              "max_score_diff": None, "max_box_diff_px": None, "min_matched_iou": None}
    if pairs:
        oi, pj = (torch.tensor(x) for x in zip(*pairs))
        report["max_score_diff"] = float((official["scores"][oi] - project["scores"][pj]).abs().max())
        report["max_box_diff_px"] = float((official["boxes"][oi] - project["boxes"][pj]).abs().max())
        report["min_matched_iou"] = float(ious[oi, pj].min())
    return report


def summarize(seconds: list[float]) -> dict[str, float]:
    return {"s_median": statistics.median(seconds), "s_mean": statistics.fmean(seconds),
            "s_min": min(seconds), "s_max": max(seconds)}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = ["code", "input (HxW)", "threads", "median s", "mean s", "min s", "max s", "detections"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["code"], f"{r['height']}x{r['width']}", str(r["threads"]), f"{r['s_median']:.2f}",
                 f"{r['s_mean']:.2f}", f"{r['s_min']:.2f}", f"{r['s_max']:.2f}", str(r["detections"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for category in (FutureWarning, DeprecationWarning, SyntaxWarning):  # 2022 code on 2026 libraries
        warnings.filterwarnings("ignore", category=category)
    torch.set_num_threads(args.threads)
    print(f"building the official GLIP-T from {args.official_root / args.official_config} ...", flush=True)
    official_cfg, official_model, caption, label_to_tokens = build_official(args)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.save_checkpoint or Path(tmp) / "official_glip_t_random.pth"
        save_official_checkpoint(official_model, checkpoint)
        print(f"loading its state dict into {args.config_file} through GLIPv2Checkpointer ...", flush=True)
        project_model, prompt = build_project(args, checkpoint)

    prompt_check = {
        "same_caption": prompt.caption == caption,
        "same_label_tokens": all(prompt.label_to_tokens.get(label - 1) == list(tokens)
                                 for label, tokens in label_to_tokens.items())
        and len(prompt.label_to_tokens) == len(label_to_tokens),
    }
    generator = torch.Generator().manual_seed(args.seed)
    image_bgr = torch.randint(0, 256, (3, args.height, args.width), dtype=torch.uint8, generator=generator)
    runners = {
        "official GLIP": official_runner(official_cfg, official_model, image_bgr, caption, label_to_tokens),
        "glipv2-d2": project_runner(project_model, image_bgr, prompt),
    }
    print(f"timing {args.warmup} warm-up + {args.iters} timed forwards each, alternating ...", flush=True)
    times, outputs = time_alternating(runners, args.iters, args.warmup)
    agreement = compare_detections(outputs["official GLIP"], outputs["glipv2-d2"])

    base = {"height": args.height, "width": args.width, "threads": torch.get_num_threads()}
    rows = [{"code": name, **base, **summarize(times[name]), "detections": len(outputs[name]["scores"]),
             "seconds": times[name]} for name in runners]
    ratio = rows[0]["s_median"] / rows[1]["s_median"]
    print(f"\nGLIP-T, random weights (seed {args.seed}), one {args.height}x{args.width} image, "
          f"{len(COCO_NAMES)} COCO names in one prompt, PRIOR_PROB {args.prior_prob}, "
          f"{args.warmup} warm-up + {args.iters} timed forwards, CPU {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}\n")
    print(markdown_table(rows))
    print(f"\nofficial / glipv2-d2 (median): {ratio:.2f}x")
    print(f"prompt: same caption {prompt_check['same_caption']}, same label->token map "
          f"{prompt_check['same_label_tokens']}")
    language = official_cfg.MODEL.LANGUAGE_BACKBONE
    print(f"prompt tokens: {len(prompt.input_ids)}; the official model pads them to {language.MAX_QUERY_LEN} "
          f"(PAD_MAX {language.PAD_MAX}), glipv2-d2 to the longest prompt of the batch")
    print(f"detections: official {agreement['official_detections']}, glipv2-d2 {agreement['project_detections']}, "
          f"matched {agreement['matched']} (same class, IoU >= {MATCH_IOU}), all matched {agreement['all_matched']}")
    if agreement["matched"]:
        print(f"over the matched pairs: max |score diff| {agreement['max_score_diff']:.3g}, max |box diff| "
              f"{agreement['max_box_diff_px']:.3g} px, min IoU {agreement['min_matched_iou']:.6f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"official_root": str(args.official_root), "official_config": args.official_config,
                  "config": args.config_file, "opts": args.opts, "official_opts": args.official_opts,
                  "prior_prob": args.prior_prob, "seed": args.seed, "iters": args.iters, "warmup": args.warmup,
                  "torch": torch.__version__, "rows": rows, "ratio_official_over_project": ratio,
                  "prompt": {**prompt_check, "tokens": len(prompt.input_ids),
                             "official_pad_max": language.PAD_MAX},
                  "agreement": agreement}
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
