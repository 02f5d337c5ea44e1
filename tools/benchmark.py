#!/usr/bin/env python
"""Measure inference speed and peak memory of a GLIPv2 config, per precision (fp32 / bf16 / fp16).

Every image gets the 80 COCO category names as its prompt (one chunk, as in COCO evaluation), so
the numbers match what detection on COCO costs. Images are random and already at the network input
size, so no resize is timed; the model still normalises, pads and copies them to the device, as it
does for real inputs.

Example (GPU, GLIP-T, random weights):
  python tools/benchmark.py --config-file configs/glipv2_T.yaml --batch-size 1 --json out/bench_T_b1.json
CPU smoke run of the small quick-start model (its 128-token limit splits the COCO names in two, so
the override raises it):
  python tools/benchmark.py --config-file configs/quickstart/demo.yaml --device cpu --iters 2 --warmup 1 \
      --height 256 --width 320 --precision fp32,bf16 MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN 256
Caption decoding speed (--caption-decoding): fp32 greedy captions of exactly --caption-tokens tokens
per image, decoded with the cache (image side once, cached text keys/values) and by recomputing the
whole model at every step; a config without a CaptionHead gets one (random LM weights: speed only):
  python tools/benchmark.py --config-file configs/quickstart/demo.yaml --device cpu --precision fp32 \
      --iters 2 --warmup 1 --height 256 --width 320 --caption-decoding --json out/bench_caption.json
A peer detector timed in the same process on the same inputs (--peer grounding-dino: Hugging Face's
Grounding DINO-T built from its config, random weights, forward + top-100 selection; see
glipv2_d2/benchmarking/peers.py), with the ratio peer / GLIPv2 per precision, every row also as one
JSON object per line. Compare GLIP-T with it (the quick-start model is far smaller); the peer always
keeps 100 detections per image, and MODEL.DYHEAD.PRIOR_PROB 0.5 makes random-weight GLIPv2 do so too:
  python tools/benchmark.py --config-file configs/glipv2_T.yaml --device cuda --peer grounding-dino \
      --json-lines out/bench_T_peer.jsonl MODEL.DYHEAD.PRIOR_PROB 0.5
Where the time goes inside fusion layer 0, the prediction head and the post-processing
(--profile-ops: torch.profiler, top ops by self time, fp32):
  python tools/benchmark.py --config-file configs/quickstart/demo.yaml --device cpu --precision fp32 \
      --iters 2 --warmup 1 --height 256 --width 320 --profile-ops MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN 256
Training throughput (--train: forward with the real loss, backward and optimizer step per precision and
--checkpointing setting, peak memory, the activations the forward keeps for backward (exact, any device),
first/last loss, and the training data loader's time per batch
next to the step's; see glipv2_d2/benchmarking/training.py), e.g. the quick-start training recipe on CPU:
  python tools/benchmark.py --train --config-file configs/quickstart/train.yaml --device cpu --batch-size 4 \
      --height 192 --width 256 --iters 3 --warmup 0 --precision fp32,bf16 --checkpointing none,fusion \
      MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN 256
A long vocabulary as LVIS evaluation reads it (--vocabulary lvis: the 1,203 LVIS v1 names in id order,
repeated names kept as the official evaluation keeps them, in prompts of --chunk-size names; the backbone
runs once per image and the chunks go through the fusion tower in groups within
TEST.FUSION_BATCH_MEMORY_MB):
  python tools/benchmark.py --config-file configs/glipv2_T.yaml --device cuda --vocabulary lvis --chunk-size 40 \
      --precision fp32,bf16 --json-lines out/bench_T_lvis.jsonl MODEL.DYHEAD.PRIOR_PROB 0.5
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from detectron2.config import CfgNode
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.data.datasets.lvis import get_lvis_instances_meta
from detectron2.modeling import build_model
from torch import nn

from glipv2_d2.benchmarking import op_profile, training
from glipv2_d2.benchmarking.peers import PEER_CONFIGS, build_peer, compare_with_glipv2, comparison_table
from glipv2_d2.benchmarking.timing import synchronize
from glipv2_d2.checkpoint import GLIPv2Checkpointer
from glipv2_d2.config import setup_cfg
from glipv2_d2.data.prompt_builder import PromptBuilder
from glipv2_d2.evaluation.prompted_inference import PromptedDetector
from glipv2_d2.modeling.caption import CaptionDecodingOptions

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COCO_NAMES = [c["name"] for c in COCO_CATEGORIES if c["isthing"] == 1]
LVIS_NAMES = get_lvis_instances_meta("lvis_v1")["thing_classes"]
SEED = 0
MIB = 2**20
STAGES = ("preprocess", "backbone", "text encoder", "fusion + head", "post-processing")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/glipv2_T.yaml", help="model config to benchmark")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32,bf16,fp16",
                        help="comma-separated subset of fp32,bf16,fp16 (bf16/fp16 run under torch.autocast)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.add_argument("--iters", type=int, default=20, help="timed forward passes per precision")
    parser.add_argument("--warmup", type=int, default=5, help="untimed forward passes before timing")
    parser.add_argument("--height", type=int, default=800, help="image height as the network receives it")
    parser.add_argument("--width", type=int, default=1333, help="image width as the network receives it")
    parser.add_argument("--weights", default="", help="official GLIP or converted checkpoint (default: "
                                                      "cfg.MODEL.WEIGHTS, else random init)")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--profile-stages", action="store_true",
                        help="also time each stage (fp32) to see where the time goes")
    parser.add_argument("--caption-decoding", action="store_true",
                        help="also time caption decoding, cached and recomputed (fp32)")
    parser.add_argument("--caption-tokens", type=int, default=20, help="tokens per timed caption")
    parser.add_argument("--peer", choices=sorted(PEER_CONFIGS),
                        help="also time this detector (random weights) on the same inputs, per precision")
    parser.add_argument("--profile-ops", action="store_true",
                        help="also profile the ops of fusion layer 0, the head and post-processing (fp32)")
    parser.add_argument("--json-lines", type=Path, help="write every result row as one JSON object per line")
    parser.add_argument("--train", action="store_true",
                        help="time training steps (real loss, backward, optimizer) instead of inference")
    parser.add_argument("--checkpointing", default="none,fusion",
                        help=f"--train: comma-separated gradient-checkpointing settings among "
                             f"{','.join(training.CHECKPOINTING)}")
    parser.add_argument("--data-batches", type=int, default=3,
                        help="--train: timed batches of the training data loader")
    parser.add_argument("--vocabulary", choices=["coco", "lvis"], default="coco",
                        help="coco: the 80 COCO names in one prompt; lvis: the 1,203 LVIS names in --chunk-size chunks")
    parser.add_argument("--chunk-size", type=int, default=40,
                        help="names per prompt with --vocabulary lvis (GLIP's LVIS evaluation uses 40)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    args.precision = [p.strip() for p in args.precision.split(",") if p.strip()]
    unknown = [p for p in args.precision if p not in PRECISIONS]
    if unknown or not args.precision:
        parser.error(f"--precision: unknown {unknown}; choose among {', '.join(PRECISIONS)}")
    if min(args.batch_size, args.iters, args.height, args.width, args.caption_tokens, args.data_batches) < 1 \
            or args.warmup < 0:
        parser.error("--batch-size, --iters, --height, --width, --caption-tokens and --data-batches must be >= 1 "
                     "and --warmup >= 0")
    args.checkpointing = [c.strip() for c in args.checkpointing.split(",") if c.strip()]
    unknown = [c for c in args.checkpointing if c not in training.CHECKPOINTING]
    if unknown or not args.checkpointing:
        parser.error(f"--checkpointing: unknown {unknown}; choose among {', '.join(training.CHECKPOINTING)}")
    if args.train and (args.profile_stages or args.caption_decoding or args.peer or args.profile_ops):
        parser.error("--train times training alone: drop --profile-stages, --caption-decoding, --peer, --profile-ops")
    if args.vocabulary == "lvis" and (args.train or args.profile_stages or args.caption_decoding or args.peer
                                      or args.profile_ops):
        parser.error("--vocabulary lvis times chunked detection alone: drop --train, --profile-stages, "
                     "--caption-decoding, --peer, --profile-ops")
    if args.chunk_size < 1:
        parser.error("--chunk-size must be >= 1")
    return args


def setup(args: argparse.Namespace) -> tuple[CfgNode, nn.Module]:
    """Build the model the way the other tools do, so the benchmark times what they run."""
    cfg = setup_cfg(args.config_file, [*args.opts, "MODEL.DEVICE", args.device], freeze=False)
    if args.caption_decoding and "CaptionHead" not in cfg.MODEL.GLIPV2.TASK_HEADS:
        cfg.MODEL.GLIPV2.TASK_HEADS = [*cfg.MODEL.GLIPV2.TASK_HEADS, "CaptionHead"]
    cfg.freeze()
    torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
    torch.manual_seed(SEED)
    model = build_model(cfg).eval()
    weights = args.weights or cfg.MODEL.WEIGHTS
    if weights:
        GLIPv2Checkpointer(model, strict=True, trust_pickle=cfg.MODEL.TRUST_PICKLED_WEIGHTS).load(weights)
    return cfg, model


def make_images(batch_size: int, height: int, width: int) -> list[dict]:
    """One batch of random uint8 images at the network input size, without prompts."""
    generator = torch.Generator().manual_seed(SEED)
    return [
        {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator),
         "height": height, "width": width}
        for _ in range(batch_size)
    ]


def make_inputs(model: nn.Module, cfg: CfgNode, batch_size: int, height: int, width: int) -> list[dict]:
    """One batch of random uint8 images, each with the COCO vocabulary as a single prompt."""
    prompts = PromptBuilder(cfg, model.tokenizer).categories(COCO_NAMES)
    if len(prompts) != 1:
        raise ValueError(
            f"the {len(COCO_NAMES)} COCO names need {len(prompts)} prompts of at most "
            f"{cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN} tokens, but the benchmark times one prompt per image: "
            "add MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN 256 (and TEST.PROMPT_CHUNK_SIZE 0)"
        )
    return [{**x, "prompt": prompts[0]} for x in make_images(batch_size, height, width)]


def lvis_detector(model: nn.Module, cfg: CfgNode, chunk_size: int) -> PromptedDetector:
    """The model as LVIS evaluation runs it: the 1,203 LVIS v1 names in prompts of ``chunk_size``
    names, every image read with all of them (backbone once, the chunks batched through the fusion
    tower within TEST.FUSION_BATCH_MEMORY_MB), merged and cut to TEST.DETECTIONS_PER_IMAGE."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.TEST.PROMPT_CHUNK_SIZE = chunk_size
    prompts = PromptBuilder(cfg, model.tokenizer).categories(LVIS_NAMES, keep_repeats=True)
    return PromptedDetector(model, prompts, max_detections_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)



def max_rss_mib() -> float:
    """High-water mark of the process's resident memory (ru_maxrss is KiB on Linux, bytes on macOS)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB


def autocast(device: str, precision: str) -> AbstractContextManager:
    """fp32 runs without autocast; bf16 / fp16 under torch.autocast, as mixed-precision inference does."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device, dtype=dtype) if dtype else nullcontext()


def time_precision(model: nn.Module, inputs: list[dict], device: str, precision: str, iters: int, warmup: int,
                   rss_at_start: float) -> dict:
    """Per-batch wall times of `iters` forward passes after `warmup` untimed ones, and the memory peak."""
    times = []
    with torch.inference_mode(), autocast(device, precision):
        for _ in range(warmup):
            model(inputs)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(iters):
            synchronize(device)
            start = time.perf_counter()
            outputs = model(inputs)
            synchronize(device)
            times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / MIB
    else:
        peak = max_rss_mib() - rss_at_start
    return {
        "precision": precision,
        "images_per_s": len(inputs) * iters / sum(times),
        "ms_per_batch_mean": 1000 * statistics.fmean(times),
        "ms_per_batch_median": 1000 * statistics.median(times),
        "peak_mem_mib": peak,
        "detections": sum(len(o["instances"]) for o in outputs),
    }


def profile_stages(model: nn.Module, inputs: list[dict], device: str, iters: int, warmup: int) -> dict[str, float]:
    """Mean fp32 ms per batch of each step of GLIPv2.inference, synchronising at every boundary.

    The backbone runs inside run_network, so hooks on it split the backbone from fusion + head.
    """
    marks: list[float] = []

    def mark(*_) -> None:
        synchronize(device)
        marks.append(time.perf_counter())

    def timed(fn: Callable, *fn_args):
        mark()
        result = fn(*fn_args)
        mark()
        return result, marks[-1] - marks[-2]

    prompts = [x["prompt"] for x in inputs]
    totals = dict.fromkeys(STAGES, 0.0)
    hooks = [model.backbone.register_forward_pre_hook(mark), model.backbone.register_forward_hook(mark)]
    try:
        with torch.inference_mode():
            for step in range(warmup + iters):
                images, t_pre = timed(model.preprocess_image, inputs)
                text, t_text = timed(model.encode_text, prompts)
                outputs, t_net = timed(model.run_network, images, text)
                t_backbone = marks[-2] - marks[-3]  # the hooks' marks, between run_network's own
                _, t_post = timed(model.postprocess, images, inputs, prompts, text, outputs)
                if step >= warmup:
                    for stage, seconds in zip(STAGES, (t_pre, t_backbone, t_text, t_net - t_backbone, t_post)):
                        totals[stage] += seconds
    finally:
        for hook in hooks:
            hook.remove()
    return {stage: 1000 * seconds / iters for stage, seconds in totals.items()}


def time_caption_decoding(model: nn.Module, inputs: list[dict], device: str, tokens: int, iters: int,
                          warmup: int) -> list[dict]:
    """fp32 greedy decoding of ``tokens``-token captions, cached and recomputed: tokens/s and ms per
    caption (the batch's captions are decoded together; grounding included)."""
    options = CaptionDecodingOptions(max_length=tokens, min_length=tokens)
    images = [{k: v for k, v in x.items() if k != "prompt"} for x in inputs]
    rows = []
    with torch.inference_mode():
        for mode, use_cache in (("cached", True), ("recompute", False)):
            times = []
            for step in range(warmup + iters):
                synchronize(device)
                start = time.perf_counter()
                model.generate_captions(images, options, use_cache=use_cache)
                synchronize(device)
                if step >= warmup:
                    times.append(time.perf_counter() - start)
            seconds = statistics.fmean(times)
            rows.append({"decoding": mode, "tokens_per_caption": tokens, "batch_size": len(images),
                         "tokens_per_s": tokens * len(images) / seconds,
                         "ms_per_caption": 1000 * seconds / len(images)})
    return rows


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def markdown_table(rows: list[dict], memory_label: str) -> str:
    header = ["device", "torch", "precision", "batch", "input (HxW)", "images/s", "ms/batch mean",
              "ms/batch median", memory_label, "detections"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["device_name"], r["torch"], r["precision"], str(r["batch_size"]), f"{r['height']}x{r['width']}",
                 f"{r['images_per_s']:.2f}", f"{r['ms_per_batch_mean']:.1f}", f"{r['ms_per_batch_median']:.1f}",
                 f"{r['peak_mem_mib']:.0f}", str(r["detections"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def json_lines(report: dict) -> list[dict]:
    """Every row of the report's tables as one flat object naming its table, so that runs can be
    appended to one file and compared."""
    common = {"config": report["config"], "device": report["device"]}
    lines = [common | {"table": "speed", "model": "glipv2"} | row for row in report["rows"]]
    lines += [common | {"table": "speed"} | row for row in report["peer_rows"]]
    lines += [common | {"table": "stages", "stage": stage, "ms_per_batch": ms}
              for stage, ms in (report["stages_ms"] or {}).items()]
    lines += [common | {"table": "caption_decoding"} | row for row in report["caption_decoding"] or []]
    lines += [common | {"table": "ops", "piece": piece} | row
              for piece, rows in (report["op_profile"] or {}).items() for row in rows]
    return lines


def skip_reason(precision: str, device: str) -> str | None:
    """Why a precision is not timed on this device, or None."""
    if precision == "fp16" and device == "cpu":
        return "fp16 autocast is not benchmarked on CPU"
    if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU does not support bf16"
    return None


def write_outputs(args: argparse.Namespace, report: dict, lines: list[dict]) -> None:
    """--json (the whole report) and --json-lines (one object per row)."""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")
    if args.json_lines:
        args.json_lines.parent.mkdir(parents=True, exist_ok=True)
        args.json_lines.write_text("".join(json.dumps(line) + "\n" for line in lines))
        print(f"wrote {args.json_lines}")


def train_main(args: argparse.Namespace) -> int:
    """--train: training steps per checkpointing setting and precision, and the data loader's time."""
    cfg = setup_cfg(args.config_file, [*args.opts, "MODEL.DEVICE", args.device])
    torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
    skipped = {p: reason for p in args.precision if (reason := skip_reason(p, args.device))}
    precisions = {p: PRECISIONS[p] for p in args.precision if p not in skipped}
    weights = args.weights or cfg.MODEL.WEIGHTS
    try:
        rows, data = training.run(cfg, precisions, args.checkpointing, args.batch_size, args.height, args.width,
                                  args.iters, args.warmup, args.data_batches, weights)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    base = {"device_name": device_name(args.device), "torch": torch.__version__, "batch_size": args.batch_size,
            "height": args.height, "width": args.width, "warmup": args.warmup, "iters": args.iters}
    rows = [base | row for row in rows]
    memory_label = ("peak CUDA allocated (MiB)" if args.device == "cuda"
                    else "peak RSS growth over the steps (MiB)")
    notes = [f"data time: the training loader with {data['num_workers']} worker(s), {data['data_batches']} batches "
             f"after a first of {data['data_first_batch_ms']:.0f} ms; data-bound when it exceeds the step's median"]
    if args.device == "cpu":
        notes.append("on the CPU the loader's workers and the training step share the same cores")
        notes.append("CPU memory: resident-memory peak sampled every 5 ms minus that before the row's first step; "
                     "the first row also holds the process's one-off allocations")
    print(f"\nconfig {args.config_file}, training with the {len(training.COCO_NAMES)} COCO names in each prompt, "
          f"{args.warmup} warm-up + {args.iters} timed steps\n")
    print(training.markdown_table(rows, memory_label))
    for precision, reason in skipped.items():
        print(f"- skipped {precision}: {reason}")
    for note in notes:
        print(f"- note: {note}")
    report = {"config": args.config_file, "opts": args.opts, "weights": weights, "device": args.device,
              "mode": "train", "iters": args.iters, "warmup": args.warmup, "memory_metric": memory_label,
              "rows": rows, "skipped": skipped, "notes": notes, "data_loader": data}
    common = {"config": args.config_file, "device": args.device}
    write_outputs(args, report, [common | {"table": "training"} | row for row in rows]
                  + [common | {"table": "data_loader"} | data])
    return 0


def lvis_main(args: argparse.Namespace, cfg: CfgNode, model: nn.Module, rss_at_start: float) -> int:
    """Time LVIS-style chunked detection per precision (what LVIS evaluation costs per image)."""
    detector = lvis_detector(model, cfg, args.chunk_size)
    inputs = make_images(args.batch_size, args.height, args.width)
    memory_label = ("peak CUDA allocated (MiB)" if args.device == "cuda"
                    else "process max-RSS growth since start (MiB)")
    base = {"device_name": device_name(args.device), "torch": torch.__version__, "batch_size": args.batch_size,
            "height": args.height, "width": args.width, "vocabulary": "lvis", "names": len(LVIS_NAMES),
            "chunks": len(detector.prompts), "chunk_size": args.chunk_size,
            "fusion_batch_memory_mb": cfg.TEST.FUSION_BATCH_MEMORY_MB}
    rows, skipped = [], {}
    for precision in args.precision:
        if reason := skip_reason(precision, args.device):
            skipped[precision] = reason
            continue
        print(f"timing {precision} ...", flush=True)
        rows.append(base | time_precision(detector, inputs, args.device, precision, args.iters, args.warmup,
                                          rss_at_start))
    print(f"\nconfig {args.config_file}, {len(LVIS_NAMES)} LVIS names in {len(detector.prompts)} prompts of "
          f"<= {args.chunk_size}, TEST.FUSION_BATCH_MEMORY_MB {cfg.TEST.FUSION_BATCH_MEMORY_MB}, "
          f"{args.warmup} warm-up + {args.iters} timed iterations\n")
    print(markdown_table(rows, memory_label))
    for precision, reason in skipped.items():
        print(f"- skipped {precision}: {reason}")
    report = {"config": args.config_file, "opts": args.opts, "weights": args.weights or cfg.MODEL.WEIGHTS,
              "device": args.device, "iters": args.iters, "warmup": args.warmup, "memory_metric": memory_label,
              "rows": rows, "skipped": skipped}
    common = {"config": args.config_file, "device": args.device, "table": "speed", "model": "glipv2"}
    write_outputs(args, report, [common | row for row in rows])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 1
    if args.train:
        return train_main(args)
    rss_at_start = max_rss_mib()
    cfg, model = setup(args)
    if args.vocabulary == "lvis":
        return lvis_main(args, cfg, model, rss_at_start)
    try:
        inputs = make_inputs(model, cfg, args.batch_size, args.height, args.width)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    memory_label = ("peak CUDA allocated (MiB)" if args.device == "cuda"
                    else "process max-RSS growth since start (MiB)")
    notes = []
    if not (args.weights or cfg.MODEL.WEIGHTS):
        notes.append("random weights: detection counts and post-processing cost are not representative")
    if args.device == "cpu":
        notes.append("CPU memory is the process's resident high-water mark, which never goes down: a row only "
                     "shows more than the rows before it when it needs more memory")
    base = {"device_name": device_name(args.device), "torch": torch.__version__, "batch_size": args.batch_size,
            "height": args.height, "width": args.width}
    peer = build_peer(args.peer, args.device, SEED) if args.peer else None
    rows, peer_rows, skipped = [], [], {}
    for precision in args.precision:
        if reason := skip_reason(precision, args.device):
            skipped[precision] = reason
        else:
            print(f"timing {precision} ...", flush=True)
            rows.append(base | time_precision(model, inputs, args.device, precision, args.iters, args.warmup,
                                              rss_at_start))
            if peer is not None:
                print(f"timing {args.peer} {precision} ...", flush=True)
                timing = time_precision(peer, inputs, args.device, precision, args.iters, args.warmup, rss_at_start)
                peer_rows.append(base | compare_with_glipv2(args.peer, timing, rows[-1], inputs))
    stages = profile_stages(model, inputs, args.device, args.iters, args.warmup) if args.profile_stages else None
    decoding = (time_caption_decoding(model, inputs, args.device, args.caption_tokens, args.iters, args.warmup)
                if args.caption_decoding else None)
    ops = op_profile.profile_pieces(model, inputs, args.device) if args.profile_ops else None

    print(f"\nconfig {args.config_file}, {len(COCO_NAMES)} COCO names in one prompt, "
          f"{args.warmup} warm-up + {args.iters} timed iterations\n")
    print(markdown_table(rows, memory_label))
    if peer_rows:
        print("\n" + comparison_table(peer_rows))
    for precision, reason in skipped.items():
        print(f"- skipped {precision}: {reason}")
    for note in notes:
        print(f"- note: {note}")
    if stages:
        total = sum(stages.values())
        print("\n| stage (fp32) | ms/batch | share |\n|---|---|---|")
        for stage, ms in stages.items():
            print(f"| {stage} | {ms:.1f} | {100 * ms / total:.0f}% |")
    if decoding:
        print(f"\n| caption decoding (fp32, {args.caption_tokens} tokens) | tokens/s | ms/caption |\n|---|---|---|")
        for row in decoding:
            print(f"| {row['decoding']} | {row['tokens_per_s']:.1f} | {row['ms_per_caption']:.1f} |")
    for piece, piece_rows in (ops or {}).items():
        print("\n" + op_profile.markdown(piece, piece_rows, args.device))
    report = {"config": args.config_file, "opts": args.opts, "weights": args.weights or cfg.MODEL.WEIGHTS,
              "device": args.device, "iters": args.iters, "warmup": args.warmup, "memory_metric": memory_label,
              "rows": rows, "skipped": skipped, "notes": notes, "stages_ms": stages,
              "caption_decoding": decoding, "peer_rows": peer_rows, "op_profile": ops}
    write_outputs(args, report, json_lines(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
