"""Swin + FPN + P6/P7 reproduce the official GLIP backbone (golden case `swin_fpn`)."""

from pathlib import Path

import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from torch.testing import assert_close

from glipv2_d2.checkpoint import official_to_model_key
from glipv2_d2.config import add_glipv2_config
from glipv2_d2.modeling.backbone import build_swin_fpn_p6p7_backbone

REPO = Path(__file__).resolve().parents[1]


def small_swin_cfg(case_config: dict):
    cfg = add_glipv2_config(get_cfg())
    cfg.merge_from_file(str(REPO / "configs" / "Base-GLIPv2.yaml"))
    cfg.MODEL.SWIN.EMBED_DIM = case_config["MODEL.SWINT.EMBED_DIM"]
    cfg.MODEL.SWIN.DEPTHS = case_config["MODEL.SWINT.DEPTHS"]
    cfg.MODEL.SWIN.NUM_HEADS = case_config["MODEL.SWINT.NUM_HEADS"]
    cfg.MODEL.SWIN.WINDOW_SIZE = case_config["MODEL.SWINT.WINDOW_SIZE"]
    cfg.MODEL.FPN.OUT_CHANNELS = case_config["MODEL.BACKBONE.OUT_CHANNELS"]
    return cfg


def test_swin_fpn_matches_official(golden):
    case = golden["swin_fpn"]
    backbone = build_swin_fpn_p6p7_backbone(small_swin_cfg(case["config"]), ShapeSpec(channels=3)).eval()
    state = {
        official_to_model_key("backbone." + k).removeprefix("backbone."): v for k, v in case["params"].items()
    }
    backbone.load_state_dict(state, strict=True)

    images = case["inputs"]["images"]
    with torch.no_grad():
        stages = backbone.bottom_up(images)
        pyramid = backbone(images)
    # Official stage2 (stride 4) is unnormalised and unused by the FPN; p1..p3 are stages 3..5.
    for name, expected in zip(["p1", "p2", "p3"], case["outputs"]["swin_stages"][1:]):
        assert_close(stages[name], expected, rtol=1e-4, atol=1e-4)
    assert list(pyramid) == ["p3", "p4", "p5", "p6", "p7"]
    for actual, expected in zip(pyramid.values(), case["outputs"]["fpn"]):
        assert actual.shape == expected.shape
        assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_fpn_equals_detectron2_upsampling_on_padded_input():
    """On inputs padded to 32 the exact-size top-down path is Detectron2's factor-2 path."""
    from detectron2.modeling.backbone.fpn import FPN

    cfg = small_swin_cfg({
        "MODEL.SWINT.EMBED_DIM": 16, "MODEL.SWINT.DEPTHS": [1, 1, 1, 1],
        "MODEL.SWINT.NUM_HEADS": [1, 1, 2, 2], "MODEL.SWINT.WINDOW_SIZE": 7,
        "MODEL.BACKBONE.OUT_CHANNELS": 16,
    })
    backbone = build_swin_fpn_p6p7_backbone(cfg, ShapeSpec(channels=3)).eval()
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ours = backbone(images)
        theirs = FPN.forward(backbone, images)
    for name in ours:
        assert_close(ours[name], theirs[name], rtol=0, atol=0)
