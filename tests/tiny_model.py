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
