"""End-to-end official parity: a reduced GLIP-T, photo in, detections out.

tests/data/glip_golden_tiny_model.pt holds the weights, inputs, intermediate tensors and the 100
detections of a reduced GLIP-T run by the official code (projects/GLIPv2/NUMERICS.md). Its weights
are converted with the project's converter and run through ``GLIPv2Predictor``; forward hooks on
the model's submodules capture the tensors compared along the way.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, pairwise_iou
from torch import Tensor

from glipv2_d2 import add_glipv2_config
from glipv2_d2.checkpoint import convert_official_checkpoint, save_detectron2_checkpoint
from glipv2_d2.engine.predictor import GLIPv2Predictor
from glipv2_d2.modeling.language import minilm_model_dir

from .conftest import DATA_DIR, ModuleCall, recorded_calls

REPO = Path(__file__).resolve().parents[1]
RELATIVE_TOL = 1e-4  # of the official tensor's largest magnitude; measured errors are ~1e-6

pytestmark = pytest.mark.usefixtures("single_thread")


@dataclass
class ProjectRun:
    """What the project computed on the golden photo: hooked module calls and the detections."""

    calls: dict[str, ModuleCall]
    instances: Instances
    level_names: list[str]


@pytest.fixture(scope="module")
def tiny_golden() -> dict:
    return torch.load(DATA_DIR / "glip_golden_tiny_model.pt", weights_only=True)


def tiny_glip_t_cfg(golden: dict, folder: Path) -> CfgNode:
    """configs/glipv2_T.yaml with the golden model's reduced sizes and its BERT config + vocabulary."""
    text_model = folder / "text_model"
    text_model.mkdir()
    (text_model / "config.json").write_text(json.dumps(golden["config"]["bert_config"]))
    shutil.copy(minilm_model_dir() / "vocab.txt", text_model / "vocab.txt")

    cfg = add_glipv2_config(get_cfg())
    cfg.merge_from_file(str(REPO / "configs" / "glipv2_T.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.SWIN.EMBED_DIM = 8
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 2, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [1, 2, 4, 8]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.DYHEAD.NUM_LAYERS = 2
    cfg.MODEL.DYHEAD.CHANNELS = 32
    cfg.MODEL.DYHEAD.USE_CHECKPOINT = False
    cfg.MODEL.LANGUAGE_BACKBONE.MODEL_PATH = str(text_model)
    cfg.INPUT.MIN_SIZE_TEST = 224
    cfg.INPUT.MAX_SIZE_TEST = 336
    return cfg


def converted_weights(golden: dict, cfg: CfgNode, folder: Path) -> Path:
    """Save the official state dict as GLIP releases it, then convert it as the converter tool does."""
    official = folder / "official.pth"
    torch.save({"model": {"module." + k: v for k, v in golden["state_dict"].items()}}, official)
    converted = folder / "converted.pth"
    save_detectron2_checkpoint(convert_official_checkpoint(official, build_model(cfg)), converted)
    return converted


@pytest.fixture(scope="module")
def project(tiny_golden: dict, tmp_path_factory: pytest.TempPathFactory) -> ProjectRun:
    folder = tmp_path_factory.mktemp("tiny_glip_t")
    cfg = tiny_glip_t_cfg(tiny_golden, folder)
    cfg.MODEL.WEIGHTS = str(converted_weights(tiny_golden, cfg, folder))
    predictor = GLIPv2Predictor(cfg)
    model = predictor.model
    assert len(model.fusion.layers) == 2
    probes = {
        "backbone": model.backbone,
        "language_backbone": model.language_backbone,
        "head": model.head,
        "anchor_generator": model.anchor_generator,
    }
    for i, layer in enumerate(model.fusion.layers):
        probes |= {f"b_attn{i}": layer.b_attn, f"text_layer{i}": layer.text_layer, f"dyconv{i}": layer.dyconv}
    image_bgr = tiny_golden["inputs"]["image_rgb_uint8"].numpy()[:, :, ::-1]
    with recorded_calls(probes) as calls:
        instances = predictor(image_bgr, tiny_golden["inputs"]["category_names"])
    assert all(len(c) == 1 for c in calls.values()), {name: len(c) for name, c in calls.items()}
    shapes = model.backbone.output_shape()
    return ProjectRun(
        calls={name: c[0] for name, c in calls.items()},
        instances=instances,
        level_names=sorted(shapes, key=lambda name: shapes[name].stride),
    )


def assert_matches_official(actual: Tensor, official: Tensor, what: str) -> None:
    assert actual.shape == official.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(official.shape)}"
    error = (actual - official).abs().max().item()
    bound = RELATIVE_TOL * official.abs().max().item()
    assert error <= bound, f"{what}: max |difference| {error:.3g} > {bound:.3g}"


def assert_levels_match(actual: list[Tensor], official: list[Tensor], what: str) -> None:
    assert len(actual) == len(official), what
    for level, (a, o) in enumerate(zip(actual, official, strict=True)):
        assert_matches_official(a, o, f"{what} level {level}")


def num_tokens(golden: dict) -> int:
    return golden["inputs"]["num_tokens"]


def test_prompt_tokenizes_like_official(tiny_golden: dict, project: ProjectRun) -> None:
    input_ids, attention_mask = project.calls["language_backbone"].args[:2]
    t = num_tokens(tiny_golden)
    assert torch.equal(input_ids[:, :t], tiny_golden["inputs"]["input_ids"])
    assert torch.equal(attention_mask[:, :t], tiny_golden["inputs"]["attention_mask"])
    assert not attention_mask[:, t:].any()


def test_image_is_resized_normalised_and_padded_like_official(tiny_golden: dict, project: ProjectRun) -> None:
    image = project.calls["backbone"].args[0]
    official = tiny_golden["inputs"]["image_tensor"]
    assert_matches_official(image, official, "image tensor")
    # Normalised uint8 pixels are never exactly 0, so the non-zero extent is the size before padding.
    rows = image[0].ne(0).any(dim=0).any(dim=1).nonzero()
    cols = image[0].ne(0).any(dim=0).any(dim=0).nonzero()
    assert [rows.max().item() + 1, cols.max().item() + 1] == tiny_golden["inputs"]["image_size_hw"]


def test_fpn_and_text_encoder_match_official(tiny_golden: dict, project: ProjectRun) -> None:
    official = tiny_golden["intermediates"]
    pyramid = project.calls["backbone"].output
    assert_levels_match([pyramid[name] for name in project.level_names], official["fpn"], "FPN")
    hidden = project.calls["language_backbone"].output["hidden"]
    assert_matches_official(hidden[:, : num_tokens(tiny_golden)], official["text_hidden"], "text_hidden")


@pytest.mark.parametrize("layer", [0, 1])
def test_fusion_layer_matches_official(tiny_golden: dict, project: ProjectRun, layer: int) -> None:
    official = tiny_golden["intermediates"]["fusion_layers"][layer]
    assert official["levels"] == ["P3", "P7"]
    t = num_tokens(tiny_golden)
    visual, text = project.calls[f"b_attn{layer}"].output
    assert_levels_match([visual[0], visual[-1]], official["bi_attention_visual_out"], "bi-attention visual")
    assert_matches_official(text[:, :t], official["bi_attention_text_out"], "bi-attention text")
    text_out = project.calls[f"text_layer{layer}"].output
    text_out = text_out[0] if isinstance(text_out, tuple) else text_out
    assert_matches_official(text_out[:, :t], official["bert_layer_text_out"], "BERT layer text")
    dyconv = project.calls[f"dyconv{layer}"].output
    assert_levels_match([dyconv[0], dyconv[-1]], official["dyconv_visual_out"], "DyConv visual")


def test_head_and_anchors_match_official(tiny_golden: dict, project: ProjectRun) -> None:
    head = project.calls["head"].output
    official = tiny_golden["intermediates"]
    t = num_tokens(tiny_golden)
    assert_levels_match([logits[..., :t] for logits in head["logits"]], official["head_logits"], "logits")
    assert_levels_match(head["bbox_reg"], official["head_bbox_reg"], "bbox_reg")
    assert_levels_match(head["centerness"], official["head_centerness"], "centerness")
    assert_levels_match(project.calls["anchor_generator"].output, official["anchors"], "anchors")


def test_detections_match_official(tiny_golden: dict, project: ProjectRun) -> None:
    """Official order is unspecified: pair each official box with an unused one of the same label."""
    official = tiny_golden["outputs"]
    ours = project.instances
    assert len(official["scores"]) == 100
    assert len(ours) == len(official["scores"])
    ious = pairwise_iou(Boxes(official["boxes"]), ours.pred_boxes)
    same_label = official["labels"][:, None] == (ours.pred_classes + 1)[None, :]
    unused = torch.ones(len(ours), dtype=torch.bool)
    for i in range(len(official["scores"])):
        candidates = (same_label[i] & unused & (ious[i] > 0.999)).nonzero().flatten()
        assert len(candidates) > 0, f"official detection {i} has no match"
        best = candidates[ious[i, candidates].argmax()]
        unused[best] = False
        torch.testing.assert_close(ours.scores[best], official["scores"][i], rtol=0, atol=1e-4)
    assert not unused.any()
