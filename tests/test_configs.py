"""The larger configs build, and official checkpoints of their size map key for key."""

import re
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from glipv2_d2 import add_glipv2_config
from glipv2_d2.checkpoint import convert_official_state_dict, official_to_model_key

from .test_checkpoint import released_checkpoint_rows

REPO = Path(__file__).resolve().parents[1]


def build(config: str):
    cfg = add_glipv2_config(get_cfg())
    cfg.merge_from_file(str(REPO / "configs" / config))
    cfg.MODEL.DEVICE = "cpu"
    return cfg, build_model(cfg)


def glip_l_official_keys() -> list[str]:
    """GLIP-L's official key names, derived from GLIP-T's: Swin stage 3 has 18 blocks, 8 fusion layers."""
    keys = []
    for key, _, _ in released_checkpoint_rows():
        if match := re.match(r"(backbone\.body\.layers\.2\.blocks\.)(\d+)(\..*)", key):
            if match.group(2) == "0":
                keys += [f"{match.group(1)}{b}{match.group(3)}" for b in range(18)]
        elif match := re.match(r"(rpn\.head\.dyhead_tower\.)(\d+)(\..*)", key):
            if int(match.group(2)) < 3:
                keys += [f"{match.group(1)}{int(match.group(2)) + 3 * i}{match.group(3)}" for i in range(8)]
        else:
            keys.append(key)
    return keys


@pytest.mark.parametrize("config, embed_dim, layers", [("glipv2_B.yaml", 128, 6), ("glipv2_L.yaml", 192, 8)])
def test_large_configs_build(config, embed_dim, layers):
    cfg, model = build(config)
    assert model.backbone.bottom_up.embed_dim == embed_dim
    assert len(model.fusion.layers) == layers
    assert model.backbone.bottom_up.layers[2].blocks[0].attn.window_size == (12, 12)
    if config == "glipv2_L.yaml":
        state = model.state_dict()
        official = {}
        for key in glip_l_official_keys():
            target = official_to_model_key(key)
            official[key] = state[target] if target in state else torch.zeros(1)
        assert set(convert_official_state_dict(official, state)) == set(state)
