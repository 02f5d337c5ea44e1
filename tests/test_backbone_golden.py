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


def test_checkpointed_swin_trains_its_first_stage_behind_a_frozen_patch_embedding():
    """MODEL.SWIN.USE_CHECKPOINT with FROZEN_STAGES 0: the first stage's input needs no grad, which
    gave its blocks no gradients under Detectron2's reentrant checkpointing; outputs and gradients
    now equal the unchecked ones everywhere, with the same parameter names."""

    def frozen_patch_backbone(checkpointed: bool):
        cfg = small_swin_cfg({
            "MODEL.SWINT.EMBED_DIM": 16, "MODEL.SWINT.DEPTHS": [2, 2, 1, 1],
            "MODEL.SWINT.NUM_HEADS": [1, 1, 2, 2], "MODEL.SWINT.WINDOW_SIZE": 7,
            "MODEL.BACKBONE.OUT_CHANNELS": 16,
        })
        cfg.MODEL.SWIN.FROZEN_STAGES = 0
        cfg.MODEL.SWIN.USE_CHECKPOINT = checkpointed
        return build_swin_fpn_p6p7_backbone(cfg, ShapeSpec(channels=3)).train()

    plain, checkpointed = frozen_patch_backbone(False), frozen_patch_backbone(True)
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(1, 3, 96, 128)
    outputs, grads = [], []
    for backbone in (plain, checkpointed):
        torch.manual_seed(1)  # the same drop-path draws
        features = backbone(images)
        sum(level.square().mean() for level in features.values()).backward()
        outputs.append(features)
        grads.append({name: p.grad for name, p in backbone.named_parameters() if p.requires_grad})
    assert any(name.startswith("bottom_up.layers.0.blocks.0.") for name in grads[0])
    assert grads[1].keys() == grads[0].keys()
    for name, grad in grads[0].items():
        assert grads[1][name] is not None, name
        assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for name in outputs[0]:
        assert_close(outputs[1][name], outputs[0][name], rtol=0, atol=0)
