"""The GLIPv2 training path: losses on a fixed tiny batch fall, NaN losses stop with a named term."""

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from glipv2_d2.data.prompts import build_labeled_prompt, encode_prompt, token_map_to_positive_map

from .tiny_model import tiny_cfg

NAMES = {0: "red square", 1: "blue circle", 2: "green triangle"}


def _scene(boxes: list[tuple[int, int, int, int, int]], size: int = 128) -> np.ndarray:
    image = np.full((size, size, 3), 200, dtype=np.uint8)
    colours = {0: (0, 0, 255), 1: (255, 0, 0), 2: (0, 255, 0)}  # BGR
    for label, x1, y1, x2, y2 in boxes:
        image[y1:y2, x1:x2] = colours[label]
    return image


def tiny_batch(model) -> list[dict]:
    """Two scenes sharing one detection prompt of NAMES, with boolean positive maps."""
    caption, spans = build_labeled_prompt(NAMES)
    prompt = encode_prompt(
        model.tokenizer, caption, spans, model.max_query_len, label_names=NAMES, names_categories=True
    )
    batch = []
    for scene in ([(0, 10, 20, 60, 70), (1, 70, 60, 120, 110)], [(2, 30, 30, 100, 90)]):
        instances = Instances((128, 128))
        instances.gt_boxes = Boxes(torch.tensor([b[1:] for b in scene], dtype=torch.float32))
        labels = [label for label, *_ in scene]
        instances.positive_map = token_map_to_positive_map(prompt.label_to_tokens, labels, len(prompt)).bool()
        batch.append({
            "image": torch.as_tensor(_scene(scene).transpose(2, 0, 1).copy()),
            "prompt": prompt,
            "instances": instances,
        })
    return batch


def test_total_loss_halves_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.MODEL.DYHEAD.PRIOR_PROB = 0.01
    model = build_model(cfg).train()
    batch = tiny_batch(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(45):
        losses = model(batch)
        assert set(losses) == {"loss_dot_product_token", "loss_reg", "loss_centerness"}
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(float(total))
    assert all(np.isfinite(totals))
    assert totals[-1] < 0.5 * totals[0], totals


def test_nan_loss_names_the_term():
    cfg = tiny_cfg()
    model = build_model(cfg).train()
    batch = tiny_batch(model)
    with torch.no_grad():
        model.head.bbox_pred.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="loss_reg"):
        model(batch)


def test_training_input_without_instances_is_named():
    model = build_model(tiny_cfg()).train()
    batch = tiny_batch(model)
    del batch[1]["instances"]
    batch[1]["file_name"] = "scene_1.png"
    with pytest.raises(ValueError, match="scene_1.png"):
        model(batch)


def _without_randomness(cfg):
    """Dropout and drop-path draw different masks for differently shaped text, so turn them off."""
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.0
    cfg.MODEL.DYHEAD.FUSION.DROPOUT = 0.0
    model = build_model(cfg).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_training_losses_equal_with_official_max_length_padding():
    """Pre-tokenized captions padded to the batch's longest prompt give the official 256-style losses
    (including the "no object" token quirk, which lands on a masked column)."""
    model = _without_randomness(tiny_cfg())
    cfg = tiny_cfg()
    cfg.MODEL.LANGUAGE_BACKBONE.PAD_MAX = True
    padded = _without_randomness(cfg)
    padded.load_state_dict(model.state_dict())
    batch = tiny_batch(model)
    dynamic, fixed = model(batch), padded(batch)
    for name in dynamic:
        torch.testing.assert_close(fixed[name], dynamic[name], rtol=1e-5, atol=1e-5)


def test_model_without_fusion_layers_trains():
    """NUM_LAYERS 0 (the head on the FPN, no VL-DyHead tower: the fusion ablation) builds and learns."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.MODEL.DYHEAD.NUM_LAYERS = 0
    model = build_model(cfg).train()
    assert len(model.fusion.layers) == 0
    batch = tiny_batch(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(10):
        total = sum(model(batch).values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(float(total))
    assert totals[-1] < 0.8 * totals[0], totals
