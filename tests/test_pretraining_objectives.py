"""GLIPv2's pre-training terms wired into the model: L_inter, L_mlm, weak-sample weights, and the
pre-fusion scoring option; plus loading checkpoints that have (or lack) the training-only heads."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from glipv2_d2.checkpoint import CheckpointMismatchError, convert_official_state_dict
from glipv2_d2.data.prompts import build_labeled_prompt, category_uid, encode_prompt, token_map_to_positive_map

from .test_training_step import _scene
from .tiny_model import tiny_cfg

NAMES = {0: "red square", 1: "blue circle", 2: "green triangle"}
SCENES = ([(0, 10, 20, 60, 70), (1, 70, 60, 120, 110)], [(2, 30, 30, 100, 90)], [(0, 20, 20, 90, 90)])


def _pretraining_cfg(inter_image: bool = True, mlm: bool = True):
    cfg = tiny_cfg()
    cfg.MODEL.INTER_IMAGE_LOSS.ENABLED = inter_image
    cfg.MODEL.INTER_IMAGE_LOSS.MAX_REGIONS = 20
    cfg.MODEL.MLM.ENABLED = mlm
    cfg.MODEL.MLM.PROBABILITY = 0.5
    return cfg


def _sample(model, caption: str, spans: dict, scene: list, detection: bool, loss_weight: float = 1.0) -> dict:
    """One image with its prompt: category names (``detection``: boxes carry their category uid) or a
    free-form sentence whose label 0 is a phrase."""
    prompt = encode_prompt(
        model.tokenizer, caption, spans, model.max_query_len,
        label_names=NAMES if detection else None, names_categories=detection,
    )
    instances = Instances((128, 128))
    instances.gt_boxes = Boxes(torch.tensor([b[1:] for b in scene], dtype=torch.float32))
    labels = [b[0] for b in scene]
    instances.gt_classes = torch.tensor(labels)
    instances.positive_map = token_map_to_positive_map(prompt.label_to_tokens, labels, len(prompt)).bool()
    if detection:
        instances.gt_category_uids = torch.tensor([category_uid(NAMES[label]) for label in labels])
    return {
        "image": torch.as_tensor(_scene(scene).transpose(2, 0, 1).copy()),
        "prompt": prompt,
        "instances": instances,
        "loss_weight": loss_weight,
    }


def _mixed_batch(model) -> list[dict]:
    """Two detection prompts sharing 'red square' and one grounding sentence mentioning it."""
    detection = [_sample(model, *build_labeled_prompt(NAMES), scene, detection=True) for scene in SCENES[:2]]
    sentence = "a red square on grey"
    grounding = _sample(model, sentence, {0: [(0, 12)]}, SCENES[2], detection=False)
    return [*detection, grounding]


def test_pretraining_losses_are_finite_and_reach_the_right_parameters():
    torch.manual_seed(0)
    model = build_model(_pretraining_cfg()).train()
    losses = model(_mixed_batch(model))
    assert set(losses) == {"loss_dot_product_token", "loss_reg", "loss_centerness", "loss_inter_image", "loss_mlm"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())

    model.zero_grad()
    losses["loss_inter_image"].backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    touched = {name for name, g in grads.items() if g is not None and g.abs().sum() > 0}
    # Pre-fusion features on both sides (the paper): both encoders learn from L_inter, fusion does not.
    assert any(name.startswith("backbone.bottom_up.") for name in touched)
    assert any(name.startswith("language_backbone.") for name in touched)
    assert {"inter_image_loss.image_projection.weight", "inter_image_loss.text_projection.weight"} <= touched
    assert not any(name.startswith(("fusion.", "head.", "mlm_head.")) for name in touched)

    model.zero_grad()
    losses = model(_mixed_batch(model))
    losses["loss_mlm"].backward()
    touched = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "mlm_head.decoder.weight" in touched
    assert any(name.startswith("fusion.") for name in touched)  # MLM reads the FUSED text


def test_official_text_side_of_inter_image_loss_reaches_fusion():
    torch.manual_seed(0)
    cfg = _pretraining_cfg(mlm=False)
    cfg.MODEL.INTER_IMAGE_LOSS.TEXT_FEATURES = "fused"
    model = build_model(cfg).train()
    model(_mixed_batch(model))["loss_inter_image"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.fusion.parameters())


def test_mlm_masks_in_training_only_and_reproducibly():
    model = build_model(_pretraining_cfg(inter_image=False)).train()
    batch = _mixed_batch(model)
    torch.manual_seed(3)
    prompts = [x["prompt"] for x in batch]
    first = model.encode_text(prompts, batch)
    torch.manual_seed(3)
    again = model.encode_text(prompts, batch)
    assert torch.equal(first.mlm_labels, again.mlm_labels) and torch.equal(first.hidden, again.hidden)
    labelled = first.mlm_labels != -100
    assert labelled.any()
    # Never special or padding tokens: [CLS] at 0, and nothing past each prompt's mask.
    assert not labelled[:, 0].any() and not (labelled & (first.mask == 0)).any()
    ids = torch.nn.utils.rnn.pad_sequence([p.input_ids for p in prompts], batch_first=True)
    assert torch.equal(first.mlm_labels[labelled], ids[labelled])

    model.eval()
    clean = model.encode_text(prompts)
    assert clean.mlm_labels is None
    with torch.no_grad():
        expected = model.language_backbone(ids, (ids != 0).long())["hidden"]
    torch.testing.assert_close(clean.hidden, expected)


def test_mlm_only_positive_phrases_masks_grounded_tokens_only():
    cfg = _pretraining_cfg(inter_image=False)
    cfg.MODEL.MLM.ONLY_POSITIVE_PHRASES = True
    cfg.MODEL.MLM.PROBABILITY = 1.0
    model = build_model(cfg).train()
    batch = _mixed_batch(model)
    torch.manual_seed(0)
    labels = model.encode_text([x["prompt"] for x in batch], batch).mlm_labels
    # Images sharing a prompt share its corruption: the candidates are the union of their phrases.
    for x, row in zip(batch, labels):
        grounded = torch.stack([
            y["instances"].positive_map.any(dim=0) for y in batch if y["prompt"].caption == x["prompt"].caption
        ]).any(dim=0)
        chosen = row[: grounded.shape[0]] != -100
        assert torch.equal(chosen, grounded)
    assert not torch.equal(labels[0] != -100, labels[2][: labels.shape[1]] != -100)


def test_loss_weight_scales_an_images_grounding_losses():
    torch.manual_seed(0)
    model = build_model(_pretraining_cfg(inter_image=False, mlm=False)).train()
    caption, spans = build_labeled_prompt(NAMES)
    strong = [_sample(model, caption, spans, SCENES[0], detection=False)]
    weak = [_sample(model, caption, spans, SCENES[0], detection=False, loss_weight=0.25)]
    torch.manual_seed(1)
    plain = model(strong)
    torch.manual_seed(1)
    scaled = model(weak)
    for name in ("loss_dot_product_token", "loss_centerness"):
        torch.testing.assert_close(scaled[name], plain[name] * 0.25)
    # GIoU is normalised by the (unweighted) centerness targets, as officially: scaled as well.
    torch.testing.assert_close(scaled["loss_reg"], plain["loss_reg"] * 0.25)


def test_scoring_with_pre_fusion_text_drops_the_last_text_layer():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.MODEL.DYHEAD.SCORE_WITH_FUSED_TEXT = False
    model = build_model(cfg).eval()
    assert model.fusion.layers[-1].text_layer is None and model.fusion.layers[0].text_layer is not None
    batch = _mixed_batch(model)[:1]
    with torch.no_grad():
        images = model.preprocess_image(batch)
        text = model.encode_text([x["prompt"] for x in batch])
        outputs = model.run_network(images, text)
        expected = model.head(outputs.features, text.hidden)
    torch.testing.assert_close(outputs.logits, expected["logits"])


def test_training_only_heads_are_optional_when_loading_official_weights():
    torch.manual_seed(0)
    plain = build_model(tiny_cfg())
    with_heads = build_model(_pretraining_cfg())
    plain_keys = set(plain.state_dict())

    def official(state: dict) -> dict:
        renamed = {}
        for key, value in state.items():
            if key.startswith("mlm_head."):
                renamed["rpn.head." + key] = value
            elif key.startswith("inter_image_loss."):
                suffix = key.removeprefix("inter_image_loss.")
                suffix = {"image_projection": "shallow_contrastive_projection_image",
                          "text_projection": "shallow_contrastive_projection_text",
                          "log_scale": "shallow_log_scale"}[suffix.split(".")[0]] + suffix[len(suffix.split(".")[0]):]
                renamed["rpn.loss_evaluator." + suffix] = value
        return renamed

    heads = official(with_heads.state_dict())
    assert set(heads) >= {"rpn.loss_evaluator.shallow_log_scale", "rpn.head.mlm_head.decoder.weight"}
    head_state = {k: v for k, v in with_heads.state_dict().items() if k not in plain_keys}
    assert head_state and all(k.startswith(("mlm_head.", "inter_image_loss.")) for k in head_state)
    converted = convert_official_state_dict(heads, head_state)
    assert set(converted) == set(head_state)
    torch.testing.assert_close(converted["inter_image_loss.log_scale"], with_heads.inter_image_loss.log_scale)
    # A model without the heads ignores them; one with them tolerates their absence.
    assert convert_official_state_dict(heads, {}) == {}
    assert convert_official_state_dict({}, head_state) == {}
    # Ordinary parameters stay strict.
    some_key = sorted(plain_keys)[0]
    with pytest.raises(CheckpointMismatchError, match="absent"):
        convert_official_state_dict(heads, {some_key: plain.state_dict()[some_key]})


def test_label_propagation_reads_the_prompts_and_box_uids():
    """L_inter's labels come from the prompts' token categories and the boxes' gt_category_uids."""
    torch.manual_seed(0)
    model = build_model(_pretraining_cfg(mlm=False)).train()
    batch = _mixed_batch(model)
    seen = []
    handle = model.inter_image_loss.register_forward_hook(lambda module, args, output: seen.append(args[3]))
    try:
        model(batch)
    finally:
        handle.remove()
    (labels,) = seen
    assert labels.is_detection.tolist() == [True, True, False]
    red = category_uid(NAMES[0])
    for row, x in enumerate(batch[:2]):
        tokens = x["prompt"].label_to_tokens[0]
        assert (labels.token_categories[row, tokens] == red).all()
        assert labels.gt_categories[row].tolist() == [category_uid(NAMES[b[0]]) for b in SCENES[row]]
    assert (labels.token_categories[2] == -1).all() and labels.gt_categories[2].tolist() == [-1]
