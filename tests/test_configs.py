"""Config resolution (only added keys, every file on Base-GLIPv2.yaml, one setup_cfg for every tool),
and the larger configs build, with official checkpoints of their size mapping key for key."""

import re
from pathlib import Path

import pytest
import torch
import yaml
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model

from glipv2_d2 import add_glipv2_config
from glipv2_d2.checkpoint import convert_official_state_dict, official_to_model_key
from glipv2_d2.config import setup_cfg
from glipv2_d2.engine import launcher
from tools import demo

from .test_checkpoint import released_checkpoint_rows

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
QUICKSTART = str(REPO / "configs" / "quickstart" / "train.yaml")


def build(config: str):
    cfg = setup_cfg(REPO / "configs" / config, ["MODEL.DEVICE", "cpu"])
    return cfg, build_model(cfg)


def flattened(node: dict, prefix: str = "") -> dict:
    items = {}
    for key, value in node.items():
        items.update(flattened(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return items


def test_add_glipv2_config_only_adds_keys():
    detectron2 = flattened(get_cfg())
    glipv2 = flattened(add_glipv2_config(get_cfg()))
    assert {key: glipv2[key] for key in detectron2} == detectron2
    assert {"INPUT.LEGACY_RESIZE", "SOLVER.AMP.PRECISION", "SOLVER.STEP_FRACTIONS"} <= set(glipv2) - set(detectron2)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: str(path.relative_to(REPO / "configs")))
def test_every_config_derives_from_base(config):
    chain = [config]
    while base := yaml.safe_load(chain[-1].read_text()).get("_BASE_"):
        chain.append((chain[-1].parent / base).resolve())
    assert chain[-1] == REPO / "configs" / "Base-GLIPv2.yaml"
    cfg = setup_cfg(config)
    assert (cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.BACKBONE.NAME) == ("GLIPv2", "build_swin_fpn_p6p7_backbone")
    assert cfg.MODEL.PIXEL_STD == [57.375, 57.120, 58.395] and cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"


def test_setup_cfg_resolves_step_fractions_after_overrides():
    cfg = setup_cfg(QUICKSTART, ["SOLVER.MAX_ITER", "200", "SOLVER.STEP_FRACTIONS", "(0.5, 0.75)"])
    assert cfg.is_frozen() and cfg.SOLVER.STEPS == (100, 150)
    assert setup_cfg(QUICKSTART, ["SOLVER.STEP_FRACTIONS", "()", "SOLVER.STEPS", "(7,)"]).SOLVER.STEPS == (7,)
    with pytest.raises(ValueError, match="STEP_FRACTIONS"):
        setup_cfg(QUICKSTART, ["SOLVER.STEP_FRACTIONS", "(0.5, 1.5)"])


def test_demo_and_benchmark_run_with_trainings_config(monkeypatch):
    from tools import benchmark  # here, so that the other config tests do not depend on the benchmark tool

    opts = ["SOLVER.MAX_ITER", "200", "MODEL.DYHEAD.NUM_LAYERS", "1"]
    monkeypatch.setattr(launcher, "default_setup", lambda cfg, args: None)
    training = launcher.setup(default_argument_parser().parse_args(["--config-file", QUICKSTART, *opts]))
    demo_args = demo.parse_args(
        ["--config-file", QUICKSTART, "--input", "x.png", "--categories", "a", "--output", "out", "--cpu", *opts]
    )
    benchmark_args = benchmark.parse_args(["--config-file", QUICKSTART, "--device", "cpu", *opts])
    assert training.SOLVER.STEPS == (190,) and training.MODEL.DYHEAD.NUM_LAYERS == 1
    assert demo.demo_cfg(demo_args) == training
    assert benchmark.setup(benchmark_args)[0] == training


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
