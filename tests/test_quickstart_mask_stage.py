"""The quick start's segmentation stage (configs/quickstart/mask.yaml) on a tiny model and a few
synthetic scenes: it starts from the detector's weights, trains the mask head alone, evaluates
mask AP and the PhraseCut metrics, and its weights give the predictor masks."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from glipv2_d2.config import setup_cfg
from glipv2_d2.data.datasets import unregister_dataset
from glipv2_d2.engine.predictor import GLIPv2Predictor
from glipv2_d2.engine.trainer import GLIPv2Trainer
from glipv2_quickstart import register_synthetic_referring, register_synthetic_shapes

from .tiny_model import REPO

COUNTS = {"num_train": 4, "num_val": 2, "num_heldout": 1}
STAGE_SETS = [f"glipv2_synthetic_{s}" for s in ("train", "val", "heldout")] + [
    f"glipv2_synthetic_referring_{s}" for s in ("train", "val")
]
MASK_HEAD = "task_heads.MaskHead."
PHRASECUT_METRICS = {"mIoU", "cIoU", "Pr@0.5", "Pr@0.7", "Pr@0.9"}


def _tiny_stage_cfg(output_dir: Path, weights: Path):
    """configs/quickstart/mask.yaml with a 2-layer random text encoder, small images, 2 steps."""
    cfg = setup_cfg(REPO / "configs" / "quickstart" / "mask.yaml", freeze=False)
    cfg.merge_from_list([
        "MODEL.LANGUAGE_BACKBONE.LOAD_PRETRAINED", False,
        "MODEL.LANGUAGE_BACKBONE.NUM_HIDDEN_LAYERS", 2,
        "MODEL.DYHEAD.PRIOR_PROB", 0.5,  # untrained boxes still score above the 0.05 threshold
        "INPUT.MIN_SIZE_TRAIN", (128,), "INPUT.MAX_SIZE_TRAIN", 160,
        "INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 160,
        "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 2, "SOLVER.STEP_FRACTIONS", (),
        "SOLVER.WARMUP_ITERS", 0, "SOLVER.BASE_LR", 0.01,
        "TEST.DETECTIONS_PER_IMAGE", 20, "DATALOADER.NUM_WORKERS", 0,
        "OUTPUT_DIR", str(output_dir), "MODEL.WEIGHTS", str(weights),
    ])
    return cfg


def _detector_weights(stage_cfg, path: Path) -> dict[str, torch.Tensor]:
    """A quick-start detector's checkpoint (no mask head, L_inter on as train.yaml has it)."""
    cfg = stage_cfg.clone()
    cfg.merge_from_list(["MODEL.MASK_ON", False, "MODEL.GLIPV2.TASK_HEADS", (),
                         "MODEL.INTER_IMAGE_LOSS.ENABLED", True, "SOLVER.TRAIN_ONLY_PREFIXES", ()])
    torch.manual_seed(1)
    state = {k: v.detach().clone() for k, v in build_model(cfg).state_dict().items()}
    torch.save({"model": state}, path)
    return state


@dataclass
class StageRun:
    cfg: object
    detector: dict
    head_before: dict
    after: dict
    results: dict


@pytest.fixture(scope="module")
def stage(tmp_path_factory, single_thread) -> StageRun:
    tmp = tmp_path_factory.mktemp("mask_stage")
    register_synthetic_shapes(tmp / "synthetic", seed=0, **COUNTS)
    register_synthetic_referring(tmp / "synthetic", seed=0, **COUNTS)
    try:
        cfg = _tiny_stage_cfg(tmp / "output", tmp / "detector.pth")
        detector = _detector_weights(cfg, tmp / "detector.pth")
        torch.manual_seed(0)
        trainer = GLIPv2Trainer(cfg)
        trainer.resume_or_load(resume=False)
        model = trainer.unwrapped_model
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in detector.items() if k in loaded)
        head_before = {k: v.detach().clone() for k, v in loaded.items() if k.startswith(MASK_HEAD)}
        trainer.train()  # evaluates DATASETS.TEST after the last step, as the stage does
        yield StageRun(cfg, detector, head_before, model.state_dict(), trainer._last_eval_results)
    finally:
        for name in STAGE_SETS:
            unregister_dataset(name)


def test_the_stage_keeps_the_detectors_weights_and_trains_only_the_mask_head(stage):
    outside = [k for k in stage.after if not k.startswith(MASK_HEAD)]
    assert outside and all(k in stage.detector for k in outside)
    assert all(torch.equal(stage.after[k], stage.detector[k]) for k in outside)
    assert stage.head_before and all(not torch.equal(stage.after[k], v) for k, v in stage.head_before.items()
                                     if k.endswith("weight"))


def test_the_stage_reports_mask_ap_and_the_phrasecut_metrics_next_to_the_box_baseline(stage):
    detection = stage.results["glipv2_synthetic_val"]
    assert {"bbox", "segm"} <= set(detection) and "AP" in detection["segm"]
    referring = stage.results["glipv2_synthetic_referring_val"]
    assert set(referring["phrasecut"]) == PHRASECUT_METRICS == set(referring["phrasecut_box"])
    assert all(0.0 <= v <= 100.0 for v in referring["phrasecut"].values())


def test_the_predictor_returns_masks_from_the_stages_weights(stage):
    cfg = stage.cfg.clone()
    cfg.MODEL.WEIGHTS = str(Path(cfg.OUTPUT_DIR) / "model_final.pth")
    predictor = GLIPv2Predictor(cfg)
    image = np.full((90, 120, 3), 128, np.uint8)
    image[20:60, 30:80] = (40, 40, 220)
    instances = predictor(image, ["red square", "blue circle"])
    assert len(instances) > 0
    assert instances.pred_masks.dtype == torch.bool and instances.pred_masks.shape == (len(instances), 90, 120)
    assert instances.pred_masks.any()
