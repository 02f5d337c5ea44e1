"""The GLIP-T model has the official checkpoint's exact structure, and official files convert strictly."""

import csv
from pathlib import Path

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from glipv2_d2 import add_glipv2_config
from glipv2_d2.checkpoint import (
    CheckpointMismatchError,
    GLIPv2Checkpointer,
    convert_official_state_dict,
    is_ignored_official_key,
    model_to_official_key,
    official_to_model_key,
    to_official_state_dict,
)
from tools.convert_glip_checkpoint import main as convert_main

from .conftest import DATA_DIR
from .tiny_model import tiny_cfg

REPO = Path(__file__).resolve().parents[1]


# Rows of the official model built with GLIPv2's pre-training losses, as configs/glipv2_T.yaml is.
PRETRAINING_OPTIONS = ("MODEL.DYHEAD.FUSE_CONFIG.MLM_LOSS", "MODEL.DYHEAD.FUSE_CONFIG.USE_SHALLOW_CONTRASTIVE_LOSS")


def released_checkpoint_rows(options: tuple[str, ...] = ("base",)) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype) of every tensor in the released GLIP-T checkpoint (with ``options``: also
    of the official model built with those flags on)."""
    with open(DATA_DIR / "glip_tiny_state_dict.tsv") as f:
        lines = [line for line in f if not line.startswith("#")]
    rows = []
    for row in csv.DictReader(lines, delimiter="\t"):
        if row["option"] in options:
            rows.append((row["key"], tuple(int(d) for d in row["shape"].split("x")), row["dtype"]))
    return rows


def synthetic_official_state_dict(rows) -> dict[str, torch.Tensor]:
    """Each tensor filled with its own row number, so a value tells which official key it came from."""
    state = {}
    for index, (key, shape, dtype) in enumerate(rows):
        if dtype == "int64":
            state[key] = torch.arange(torch.Size(shape).numel()).reshape(shape) % 169
        else:
            state[key] = torch.full(shape, float(index + 1))
    return state


@pytest.fixture(scope="module")
def glip_t_model():
    cfg = add_glipv2_config(get_cfg())
    cfg.merge_from_file(str(REPO / "configs" / "glipv2_T.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    return cfg, build_model(cfg)


def test_glip_t_shapes_and_parameter_count_match_official(glip_t_model):
    """configs/glipv2_T.yaml trains with L_inter and L_mlm: GLIP-T plus the official heads of both."""
    _, model = glip_t_model
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    rows = [r for r in released_checkpoint_rows(("base", *PRETRAINING_OPTIONS)) if not is_ignored_official_key(r[0])]
    official = {official_to_model_key(key): shape for key, shape, _ in rows}
    assert None not in official
    assert official == ours
    # mlm_head.bias and mlm_head.decoder.bias are one tied tensor, listed twice.
    official_params = sum(
        torch.Size(shape).numel() for key, shape, dtype in rows
        if dtype == "float32" and key != "rpn.head.mlm_head.decoder.bias"
    )
    our_params = sum(p.numel() for p in model.parameters())
    assert our_params == official_params


def test_ignored_keys_are_only_the_documented_ones():
    ignored = {key for key, _, _ in released_checkpoint_rows() if is_ignored_official_key(key)}
    assert ignored == {
        "rpn.head.cls_logits.weight", "rpn.head.cls_logits.bias",
        "language_backbone.body.model.embeddings.position_ids",
        *(f"rpn.anchor_generator.cell_anchors.{i}" for i in range(5)),
    }


def test_model_keys_get_their_released_official_names():
    """The inverse naming gives back every released GLIP-T key (pre-training heads included)."""
    rows = released_checkpoint_rows(("base", *PRETRAINING_OPTIONS))
    for key, _, _ in rows:
        if not is_ignored_official_key(key):
            assert model_to_official_key(official_to_model_key(key)) == key


def test_weights_written_under_official_names_load_back_strictly(tmp_path):
    """What tools/check_cuda.py does with random weights: official names, release layout, strict load."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    source = build_model(cfg)
    official = to_official_state_dict(source)
    assert {"rpn.anchor_generator.cell_anchors.0", "rpn.head.dyhead_tower.1.attention.self.key.bias"} <= set(official)
    path = tmp_path / "official_random.pth"
    torch.save({"model": {"module." + k: v for k, v in official.items()}}, path)
    torch.manual_seed(1)
    target = build_model(cfg)
    GLIPv2Checkpointer(target, strict=True).load(str(path))
    expected = source.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in target.state_dict().items())


def test_parameters_without_an_official_name_are_listed():
    model = torch.nn.Module()
    model.vqa_classifier = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointMismatchError, match="vqa_classifier.weight"):
        to_official_state_dict(model)


def test_official_file_converts_and_loads_through_detectron2(glip_t_model, tmp_path):
    cfg, model = glip_t_model
    rows = released_checkpoint_rows()
    official = synthetic_official_state_dict(rows)
    for i, stride in enumerate(model.anchor_generator.strides):
        half = 4 * stride
        official[f"rpn.anchor_generator.cell_anchors.{i}"] = torch.tensor(
            [[-half + (stride - 1) / 2 + 0.5, -half + (stride - 1) / 2 + 0.5,
              half + (stride - 1) / 2 - 0.5, half + (stride - 1) / 2 - 0.5]])
    source = tmp_path / "glip_tiny_official.pth"
    torch.save({"model": {"module." + k: v for k, v in official.items()}}, source)
    target = tmp_path / "converted.pth"
    assert convert_main(["--config-file", str(REPO / "configs/glipv2_T.yaml"),
                         "--input", str(source), "--output", str(target)]) == 0

    row_of = {key: index + 1 for index, (key, _, _) in enumerate(rows)}
    params = dict(model.named_parameters())
    samples = {
        "backbone.body.layers.2.blocks.5.attn.qkv.weight": "backbone.bottom_up.layers.2.blocks.5.attn.qkv.weight",
        "backbone.fpn.fpn_inner2.weight": "backbone.fpn_lateral3.weight",
        "backbone.fpn.top_blocks.p7.bias": "backbone.top_block.p7.bias",
        "language_backbone.body.model.encoder.layer.11.output.dense.weight":
            "language_backbone.model.encoder.layer.11.output.dense.weight",
        "rpn.head.dyhead_tower.15.b_attn.gamma_l": "fusion.layers.5.b_attn.gamma_l",
        "rpn.head.dyhead_tower.16.attention.self.key.bias": "fusion.layers.5.text_layer.attention.self.key.bias",
        "rpn.head.dyhead_tower.2.DyConv.1.conv.weight": "fusion.layers.0.dyconv.DyConv.1.conv.weight",
        "rpn.head.dyhead_tower.8.offset.weight": "fusion.layers.2.dyconv.offset.weight",
        "rpn.head.bias0": "head.bias0",
        "rpn.head.scales.4.scale": "head.scales.4.scale",
    }
    for load in (lambda: DetectionCheckpointer(model).load(str(target)),
                 lambda: GLIPv2Checkpointer(model, strict=True).load(str(source))):
        for p in params.values():
            p.data.zero_()
        load()
        for official_key, our_key in samples.items():
            assert torch.all(params[our_key] == row_of[official_key]), our_key


def test_strict_loading_names_missing_keys(glip_t_model, tmp_path):
    _, model = glip_t_model
    state = model.state_dict()
    del state["head.bias_lang"]
    path = tmp_path / "partial.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointMismatchError, match="head.bias_lang"):
        GLIPv2Checkpointer(model, strict=True).load(str(path))


def test_wrong_anchors_are_refused(glip_t_model, tmp_path):
    cfg, _ = glip_t_model
    bad = tmp_path / "bad_anchors.pth"
    rows = released_checkpoint_rows()
    official = synthetic_official_state_dict(rows)
    for i in range(5):
        official[f"rpn.anchor_generator.cell_anchors.{i}"] = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    torch.save({"model": official}, bad)
    assert convert_main(["--config-file", str(REPO / "configs/glipv2_T.yaml"),
                         "--input", str(bad), "--output", str(tmp_path / "out.pth")]) == 1


def test_mismatches_are_listed_by_name(glip_t_model):
    _, model = glip_t_model
    official = {key: torch.zeros(shape) for key, shape, _ in released_checkpoint_rows()}
    del official["rpn.head.bias_lang"]
    official["rpn.head.some_new_thing"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError) as error:
        convert_official_state_dict(official, model.state_dict())
    assert "head.bias_lang" in str(error.value) and "head.some_new_thing" in str(error.value)
    official = {key: torch.zeros(shape) for key, shape, _ in released_checkpoint_rows()}
    official["totally.unknown"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match="totally.unknown"):
        convert_official_state_dict(official, model.state_dict())


def test_truncated_file_gives_a_clear_error(glip_t_model, tmp_path):
    path = tmp_path / "truncated.pth"
    torch.save({"model": {"a": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    assert convert_main(["--config-file", str(REPO / "configs/glipv2_T.yaml"),
                         "--input", str(path), "--output", str(tmp_path / "out.pth")]) == 1


def test_ema_weights_are_selected_and_missing_ema_is_named(tmp_path):
    from glipv2_d2.checkpoint import load_official_state_dict

    path = tmp_path / "with_ema.pth"
    torch.save({"model": {"module.rpn.head.bias0": torch.zeros(1)},
                "model_ema": {"module.rpn.head.bias0": torch.ones(1)}}, path)
    assert load_official_state_dict(path)["rpn.head.bias0"].item() == 0
    assert load_official_state_dict(path, use_ema=True)["rpn.head.bias0"].item() == 1
    plain = tmp_path / "plain.pth"
    torch.save({"model": {"rpn.head.bias0": torch.zeros(1)}}, plain)
    with pytest.raises(CheckpointMismatchError, match="model_ema"):
        load_official_state_dict(plain, use_ema=True)
