"""A GLIPv2 small enough to run forward in well under a second on a CPU."""

from pathlib import Path

from detectron2.config import CfgNode

from glipv2_d2.config import setup_cfg

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "Base-GLIPv2.yaml"


def base_cfg() -> CfgNode:
    """GLIP-T as every config file starts from (configs/Base-GLIPv2.yaml), still mutable for a test."""
    return setup_cfg(BASE_CONFIG, freeze=False)


def tiny_cfg() -> CfgNode:
    """Quick-start architecture with a randomly initialised 2-layer text encoder.

    PRIOR_PROB 0.5 starts region-word probabilities near 0.5, so an untrained model still returns
    detections above the 0.05 threshold and the tests compare non-empty outputs.
    """
    cfg = setup_cfg(REPO / "configs" / "quickstart" / "demo.yaml", freeze=False)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.LANGUAGE_BACKBONE.LOAD_PRETRAINED = False
    cfg.MODEL.LANGUAGE_BACKBONE.NUM_HIDDEN_LAYERS = 2
    cfg.MODEL.DYHEAD.PRIOR_PROB = 0.5
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.INPUT.MAX_SIZE_TEST = 192
    return cfg


# The CLIP-type text side of GLIPv2-B / -H at tiny size: 2 blocks of width 32.
CLIP_TEXT_OVERRIDES = [
    "MODEL.LANGUAGE_BACKBONE.NAME", "build_clip_language_backbone",
    "MODEL.LANGUAGE_BACKBONE.TOKENIZER", "clip",
    "MODEL.LANGUAGE_BACKBONE.LOAD_PRETRAINED", False,
    "MODEL.LANGUAGE_BACKBONE.NUM_HIDDEN_LAYERS", 0,
    "MODEL.CLIP.WIDTH", 32, "MODEL.CLIP.LAYERS", 2, "MODEL.CLIP.HEADS", 4, "MODEL.CLIP.CONTEXT_LENGTH", 128,
    "MODEL.GLIPV2.FUSION", "VLDyHeadTowerClipText",
]


def tiny_clip_cfg() -> CfgNode:
    """``tiny_cfg`` with a B-style text side: the CLIP tokenizer and a 2-block CLIP-type encoder."""
    cfg = tiny_cfg()
    cfg.merge_from_list(CLIP_TEXT_OVERRIDES)
    return cfg
