#!/usr/bin/env python
"""Check a GLIPv2 config on CUDA against the CPU, and under bf16 / fp16 autocast.

Runs the same random-weight model on both devices with two images and two different prompts,
compares the raw region-word logits, box deltas and final detections, and prints a table. Meant for
a machine with a GPU; it needs no dataset and no pretrained weights.
  python tools/check_cuda.py --config-file configs/glipv2_T.yaml --size 480 640
"""

import argparse
import copy
import sys

import torch
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.modeling import build_model

from glipv2_d2.config import setup_cfg
from glipv2_d2.data.prompt_builder import PromptBuilder


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640), help="image height width")
    parser.add_argument("--device", default="cuda", help="device compared with the CPU (cpu: self-check)")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    return parser.parse_args(argv)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # TF32 convolutions (cuDNN's default) alone differ from the CPU by ~1e-3; compare true fp32.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    # Built on the CPU and copied to the device; a higher prior gives an untrained model detections to compare.
    cfg = setup_cfg(args.config_file, [*args.opts, "MODEL.DEVICE", "cpu", "MODEL.DYHEAD.PRIOR_PROB", "0.3"])
    torch.manual_seed(0)
    cpu_model = build_model(cfg).eval()
    gpu_model = copy.deepcopy(cpu_model).to(args.device)
    names = [c["name"] for c in COCO_CATEGORIES if c["isthing"]]
    builder = PromptBuilder(cfg, cpu_model.tokenizer)
    prompts = [builder.categories(names)[0], builder.caption("a person riding a horse next to a dog")]
    height, width = args.size
    generator = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8),
               "prompt": p} for p in prompts]

    def raw(model, autocast_dtype=None):
        with torch.inference_mode(), torch.autocast(args.device, dtype=autocast_dtype or torch.float32,
                                                    enabled=autocast_dtype is not None):
            images = model.preprocess_image(inputs)
            out = model.run_network(images, model.encode_text(prompts))
            detections = model(inputs)
        logits = torch.cat([x.flatten(1, -2) for x in out.logits], dim=1)
        deltas = torch.cat([x.flatten(2) for x in out.bbox_reg], dim=2)
        return logits, deltas, [d["instances"].to("cpu") for d in detections]

    reference = raw(cpu_model)
    rows = []
    for label, model, dtype in [(f"{args.device} fp32", gpu_model, None),
                                (f"{args.device} bf16", gpu_model, torch.bfloat16),
                                (f"{args.device} fp16", gpu_model, torch.float16)]:
        logits, deltas, detections = raw(model, dtype)
        counts = [len(d) for d in detections]
        same = all(
            len(a) == len(b) and torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-2)
            for a, b in zip(sorted_by_score(detections), sorted_by_score(reference[2]))
        )
        rows.append((label, relative_error(logits, reference[0]), relative_error(deltas, reference[1]),
                     counts, [len(d) for d in reference[2]], same, bool(torch.isfinite(logits).all())))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"\n{device_name} | torch {torch.__version__} | {args.config_file} | {height}x{width}")
    print("| run | logits rel err | deltas rel err | detections | cpu detections | same boxes | finite |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row[0]} | {row[1]:.2e} | {row[2]:.2e} | {row[3]} | {row[4]} | {row[5]} | {row[6]} |")
    return 0 if rows[0][1] < 1e-3 and rows[0][5] else 1


def sorted_by_score(detections):
    return [d[torch.argsort(d.scores, descending=True)] for d in detections]


if __name__ == "__main__":
    sys.exit(main())
