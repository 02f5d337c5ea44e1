#!/usr/bin/env python
"""Check a GLIPv2 config on CUDA against the CPU, and bf16 / fp16 autocast against fp32.

Random weights are written under official GLIP names and read back through GLIPv2Checkpointer, as
a user loads an official checkpoint. On a fixed image set (noise from a fixed seed; the prompts
alternate between the 80 COCO names and a caption) it compares the device's fp32 run with the CPU's
(region-word logits, box deltas, detections) and each reduced precision with the device's fp32 run:
the agreement is the fraction of fp32 detections that the reduced precision also returns, same label
at IoU >= --iou (glipv2_d2/evaluation/precision_agreement.py). Exits non-zero when fp32 differs from
the CPU or an agreement is below --min-agreement. Needs no dataset and no pretrained weights.
  python tools/check_cuda.py --config-file configs/glipv2_T.yaml --size 480 640
  python tools/check_cuda.py --config-file configs/quickstart/demo.yaml --device cpu --size 128 192
(--device cpu: a self-check of the fp32 path and bf16 autocast against fp32 on the CPU.)
"""

import argparse
import copy
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from detectron2.config import CfgNode
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.modeling import build_model
from detectron2.structures import Instances
from torch import nn

from glipv2_d2.checkpoint import GLIPv2Checkpointer, to_official_state_dict
from glipv2_d2.config import setup_cfg
from glipv2_d2.data.prompt_builder import PromptBuilder
from glipv2_d2.evaluation.precision_agreement import DetectionAgreement, detection_agreement

# Autocast dtypes checked per device type; CPU autocast is meant for bf16.
REDUCED_PRECISIONS = {"cuda": {"bf16": torch.bfloat16, "fp16": torch.float16}, "cpu": {"bf16": torch.bfloat16}}
CAPTION = "a person riding a horse next to a dog"
FP32_LOGITS_TOLERANCE = 1e-3  # relative max error of the device's fp32 logits against the CPU's


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640), help="image height width")
    parser.add_argument("--device", default="cuda", help="device compared with the CPU (cpu: self-check)")
    parser.add_argument("--images", type=int, default=8, help="images in the fixed set (prompts alternate)")
    parser.add_argument("--iou", type=float, default=0.9, help="IoU at which a reduced-precision box matches")
    parser.add_argument("--min-agreement", type=float, default=0.95,
                        help="least fraction of fp32 detections each reduced precision must also return")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    return parser.parse_args(argv)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def random_model_via_official_checkpoint(cfg: CfgNode, seed: int = 0) -> nn.Module:
    """A model whose random weights (drawn with ``seed``) went through the official-format path: saved
    under official GLIP names as a release file, then loaded strictly by GLIPv2Checkpointer into a
    model initialised differently, so every value it runs with came from the file."""
    torch.manual_seed(seed)
    official = to_official_state_dict(build_model(cfg))
    torch.manual_seed(seed + 1)
    model = build_model(cfg).eval()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "official_random.pth"
        torch.save({"model": {"module." + key: value for key, value in official.items()}}, path)
        GLIPv2Checkpointer(model, strict=True).load(str(path))
    return model


def fixed_inputs(cfg: CfgNode, model: nn.Module, count: int, height: int, width: int) -> list[dict]:
    """``count`` noise images from a fixed seed, prompted in turn with the 80 COCO names and a caption."""
    builder = PromptBuilder(cfg, model.tokenizer)
    prompts = [builder.categories([c["name"] for c in COCO_CATEGORIES if c["isthing"]])[0], builder.caption(CAPTION)]
    generator = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8),
             "prompt": prompts[i % len(prompts)]} for i in range(count)]


@dataclass
class Run:
    """One forward pass over the image set: raw outputs for relative errors, detections on the CPU."""

    logits: torch.Tensor
    deltas: torch.Tensor
    detections: list[Instances]


def run_model(model: nn.Module, inputs: list[dict], autocast_dtype: torch.dtype | None = None) -> Run:
    """The model's inference split at the network outputs (one pass for both raw outputs and detections)."""
    device_type = model.device.type
    with torch.inference_mode(), torch.autocast(device_type, dtype=autocast_dtype or torch.float32,
                                                enabled=autocast_dtype is not None):
        prompts = [x["prompt"] for x in inputs]
        images = model.preprocess_image(inputs)
        text = model.encode_text(prompts)
        out = model.run_network(images, text)
        detections = model.postprocess(images, inputs, prompts, text, out)
    logits = torch.cat([x.flatten(1, -2) for x in out.logits], dim=1)
    deltas = torch.cat([x.flatten(2) for x in out.bbox_reg], dim=2)
    return Run(logits, deltas, [d["instances"].to("cpu") for d in detections])


def sorted_by_score(detections: list[Instances]) -> list[Instances]:
    return [d[torch.argsort(d.scores, descending=True)] for d in detections]


def same_detections(a: list[Instances], b: list[Instances]) -> bool:
    """Equal counts and boxes within 1e-2 pixels, image by image, in score order."""
    return all(len(x) == len(y) and torch.allclose(x.pred_boxes.tensor, y.pred_boxes.tensor, atol=1e-2)
               for x, y in zip(sorted_by_score(a), sorted_by_score(b)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # TF32 convolutions (cuDNN's default) alone differ from the CPU by ~1e-3; compare true fp32.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    # Built on the CPU and copied to the device; a higher prior gives an untrained model detections to compare.
    cfg = setup_cfg(args.config_file, [*args.opts, "MODEL.DEVICE", "cpu", "MODEL.DYHEAD.PRIOR_PROB", "0.3"])
    cpu_model = random_model_via_official_checkpoint(cfg)
    device_model = copy.deepcopy(cpu_model).to(args.device)
    height, width = args.size
    inputs = fixed_inputs(cfg, cpu_model, args.images, height, width)

    reference = run_model(cpu_model, inputs)
    fp32 = run_model(device_model, inputs)
    runs = {"fp32": fp32}
    agreements: dict[str, DetectionAgreement] = {}
    for name, dtype in REDUCED_PRECISIONS[torch.device(args.device).type].items():
        runs[name] = run_model(device_model, inputs, dtype)
        agreements[name] = detection_agreement(fp32.detections, runs[name].detections, args.iou)

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"\n{device_name} | torch {torch.__version__} | {args.config_file} | {args.images} images {height}x{width}")
    print(f"| run | logits rel err | deltas rel err | detections | cpu detections | same boxes as cpu | finite "
          f"| agreement with {args.device} fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        agreement = agreements.get(name)
        shown = f"{agreement.matched}/{agreement.total} = {agreement.fraction:.3f}" if agreement else "-"
        print(f"| {args.device} {name} | {relative_error(run.logits, reference.logits):.2e} "
              f"| {relative_error(run.deltas, reference.deltas):.2e} | {[len(d) for d in run.detections]} "
              f"| {[len(d) for d in reference.detections]} | {same_detections(run.detections, reference.detections)} "
              f"| {bool(torch.isfinite(run.logits).all())} | {shown} |")

    fp32_ok = (relative_error(fp32.logits, reference.logits) < FP32_LOGITS_TOLERANCE
               and same_detections(fp32.detections, reference.detections))
    print(f"\n{args.device} fp32 vs cpu: {'pass' if fp32_ok else 'FAIL'} "
          f"(logits within {FP32_LOGITS_TOLERANCE:g} relative, same detections)")
    passed = fp32_ok
    for name, agreement in agreements.items():
        ok = agreement.fraction >= args.min_agreement
        passed &= ok
        print(f"{name} vs fp32: {agreement.fraction:.3f} of {agreement.total} fp32 detections found "
              f"(same label, IoU >= {args.iou:g}): {'pass' if ok else 'FAIL'} (>= {args.min_agreement:g})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
