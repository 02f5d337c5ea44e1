"""Reduced-precision detections against fp32 ones: the agreement figure, and what bf16 reaches."""

import math

import pytest
import torch
from detectron2.structures import Boxes, Instances

from glipv2_d2.evaluation.precision_agreement import detection_agreement
from tools.check_cuda import fixed_inputs, main, random_model_via_official_checkpoint, run_model

from .tiny_model import REPO, tiny_cfg


def detections(boxes: list[list[float]], labels: list[int]) -> Instances:
    instances = Instances((100, 100))
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.scores = torch.full((len(labels),), 0.5)
    instances.pred_classes = torch.tensor(labels, dtype=torch.int64)
    return instances


def test_counts_reference_detections_found_with_the_same_label():
    """3 of 4: two equal boxes (listed in another order) and one at IoU 0.95 match; an equal box under
    another label does not."""
    reference = detections([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 70, 70], [0, 50, 20, 70]], [1, 2, 3, 4])
    candidate = detections([[0, 50, 20, 70], [0, 0, 10, 10], [20, 20, 40, 39], [50, 50, 70, 70]], [5, 1, 2, 3])
    agreement = detection_agreement([reference], [candidate])
    assert (agreement.matched, agreement.total, agreement.fraction) == (3, 4, 0.75)


def test_iou_at_the_threshold_counts_and_just_below_does_not():
    reference = detections([[0, 0, 10, 10]], [0])
    assert detection_agreement([reference], [detections([[0, 0, 10, 9]], [0])]).fraction == 1.0  # IoU 0.9
    assert detection_agreement([reference], [detections([[0, 0, 10, 8.99]], [0])]).fraction == 0.0  # IoU 0.899
    assert detection_agreement([reference], [detections([[0, 0, 10, 8.99]], [0])], iou_threshold=0.85).fraction == 1.0


def test_pools_detections_over_images_and_needs_one_candidate_list_per_image():
    """1 of 1 on the first image and 0 of 3 on the second is 1 of 4 detections, not the mean 0.5 of images."""
    box = [[0, 0, 10, 10]]
    three = detections([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0, 0, 0])
    agreement = detection_agreement([detections(box, [0]), three], [detections(box, [0]), detections([], [])])
    assert agreement.fraction == 0.25
    assert math.isnan(detection_agreement([detections([], [])], [detections(box, [0])]).fraction)
    with pytest.raises(ValueError, match="1 reference images but 2 candidate"):
        detection_agreement([three], [three, three])


def test_cpu_bf16_detections_agree_with_fp32(single_thread):
    """bf16 autocast finds >= 95% of fp32's detections (same label, IoU >= 0.9) on a fixed set: the
    tiny model with random weights loaded through the official-format path, 8 noise images of
    128x192, prompts alternating the 80 COCO names and a caption, PRIOR_PROB 0.5, 10 kept per image.

    Measured (torch 2.14 CPU, one thread): 79/80 = 0.988. Random weights give near-tied scores (all
    within ~0.005 of each other, about bf16's step), so bf16 reorders them and NMS keeps a neighbouring
    anchor instead: keeping 100 per image gives 677/708 = 0.956, 50 gives 0.950, 20 gives 0.969.
    Trained weights do better: the quick-start model on 8 val images keeps 634/637 = 0.995 at 100 kept
    per image and 80/80 at 10 (projects/GLIPv2/README.md, "CUDA path vs CPU").
    """
    cfg = tiny_cfg()
    cfg.MODEL.ATSS.DETECTIONS_PER_IMG = 10
    model = random_model_via_official_checkpoint(cfg)
    inputs = fixed_inputs(cfg, model, 8, 128, 192)
    fp32 = run_model(model, inputs)
    bf16 = run_model(model, inputs, torch.bfloat16)
    agreement = detection_agreement(fp32.detections, bf16.detections)
    assert agreement.total == 80
    assert agreement.fraction >= 0.95, agreement


def test_cpu_bf16_with_dyconv_following_autocast_agrees_with_fp32(single_thread):
    """MODEL.DYHEAD.DYCONV_PRECISION autocast (deformable convs in bf16 too) on the same fixed set.

    Measured (torch 2.14 CPU): 76/80 = 0.95 with random weights, whose near-tied scores are the hard
    case (see above); the trained quick-start model keeps 633/645 = 0.981 of 100 per image and 80/80 of
    10 (projects/GLIPv2/README.md). Asserted at 0.9 here, as one more reordered tie moves it 0.0125.
    """
    cfg = tiny_cfg()
    cfg.MODEL.ATSS.DETECTIONS_PER_IMG = 10
    cfg.MODEL.DYHEAD.DYCONV_PRECISION = "autocast"
    model = random_model_via_official_checkpoint(cfg)
    inputs = fixed_inputs(cfg, model, 8, 128, 192)
    agreement = detection_agreement(run_model(model, inputs).detections,
                                    run_model(model, inputs, torch.bfloat16).detections)
    assert agreement.total == 80
    assert agreement.fraction >= 0.9, agreement


def test_check_tool_prints_the_figures_and_fails_below_the_minimum(single_thread, capsys):
    """A minimum above 1 cannot be met: the tool says FAIL and exits 1, while fp32 still passes."""
    tiny = ["MODEL.LANGUAGE_BACKBONE.LOAD_PRETRAINED", "False", "MODEL.LANGUAGE_BACKBONE.NUM_HIDDEN_LAYERS", "2",
            "MODEL.ATSS.DETECTIONS_PER_IMG", "10"]
    code = main(["--config-file", str(REPO / "configs/quickstart/demo.yaml"), "--device", "cpu", "--size", "128", "192",
                 "--images", "2", "--min-agreement", "1.01", *tiny])
    out = capsys.readouterr().out
    assert code == 1
    assert "cpu fp32 vs cpu: pass" in out
    assert "bf16 vs fp32:" in out and "of 20 fp32 detections found (same label, IoU >= 0.9): FAIL (>= 1.01)" in out
