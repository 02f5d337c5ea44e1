"""GLIPv2-B / -H with the CLIP-type text encoder: official checkpoint conversion, the fusion's CLIP
text layers, dynamic padding, prompt limits, the configs, and a tiny B-style model that trains on the
quick-start data and evaluates."""

import re

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from glipv2_d2.checkpoint import convert_official_state_dict
from glipv2_d2.config import setup_cfg
from glipv2_d2.data.datasets import unregister_dataset
from glipv2_d2.data.prompt_builder import PromptBuilder
from glipv2_d2.engine.predictor import GLIPv2Predictor
from glipv2_d2.engine.trainer import GLIPv2Trainer
from glipv2_d2.modeling.fusion import ClipFusionTextLayer, text_attention_mask
from glipv2_d2.modeling.language import ClipTextConfig, ClipTextEncoder
from glipv2_d2.modeling.language.clip_text import padding_attention_mask
from glipv2_quickstart import register_synthetic_shapes

from .conftest import DATA_DIR
from .test_checkpoint import released_checkpoint_rows, synthetic_official_state_dict
from .tiny_model import CLIP_TEXT_OVERRIDES, REPO, tiny_cfg, tiny_clip_cfg

CATEGORIES = ["person", "bicycle", "traffic light", "dog", "red circle", "blue square"]
TEXT_WIDTH_DIM = 768  # BERT-base width in the GLIP-T key table; the CLIP type has 512 there


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(120, 160, 3), dtype=np.uint8)


# --- official checkpoint conversion -------------------------------------------------------------


def _clip_block_rows(prefix: str, width: int) -> list[tuple[str, tuple[int, ...], str]]:
    shapes = {
        "attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
        "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
        "ln_1.weight": (width,), "ln_1.bias": (width,), "mlp.c_fc.weight": (4 * width, width),
        "mlp.c_fc.bias": (4 * width,), "mlp.c_proj.weight": (width, 4 * width), "mlp.c_proj.bias": (width,),
        "ln_2.weight": (width,), "ln_2.bias": (width,),
    }
    return [(prefix + name, shape, "float32") for name, shape in shapes.items()]


def official_clip_model_rows() -> list[tuple[str, tuple[int, ...], str]]:
    """Keys and shapes of an official GLIP-T-sized model whose language backbone is the CLIP type:
    the language backbone from the golden file's official list, the tower's text layers
    (``dyhead_tower.{3i+1}``) as official CLIPTransformerLayers, the text width 512 in the fusion and head."""
    golden = torch.load(DATA_DIR / "glip_golden_clip_text.pt", weights_only=True)["clip_param_names"]
    width = golden["config"]["WIDTH"]
    rows = [(p["name"], tuple(p["shape"]), p["dtype"]) for p in golden["params"]]
    tower_layers = set()
    for key, shape, dtype in released_checkpoint_rows():
        if key.startswith("language_backbone."):
            continue
        if match := re.match(r"rpn\.head\.dyhead_tower\.(\d+)\.", key):
            if int(match.group(1)) % 3 == 1:
                tower_layers.add(int(match.group(1)))
                continue
        if key.startswith("rpn.head."):
            shape = tuple(width if d == TEXT_WIDTH_DIM else d for d in shape)
        rows.append((key, shape, dtype))
    for index in sorted(tower_layers):
        rows += _clip_block_rows(f"rpn.head.dyhead_tower.{index}.", width)
    return rows


def test_official_clip_type_checkpoint_converts_strictly_names_and_shapes():
    golden = torch.load(DATA_DIR / "glip_golden_clip_text.pt", weights_only=True)["clip_param_names"]
    full_size_clip = [*CLIP_TEXT_OVERRIDES[:6], "MODEL.GLIPV2.FUSION", "VLDyHeadTowerClipText"]  # MODEL.CLIP defaults
    cfg = setup_cfg(REPO / "configs" / "Base-GLIPv2.yaml", ["MODEL.DEVICE", "cpu", *full_size_clip])
    model = build_model(cfg)
    rows = official_clip_model_rows()
    text_rows = [shape for key, shape, _ in rows if key.startswith("language_backbone.")]
    assert sum(torch.Size(shape).numel() for shape in text_rows) == golden["num_elements"]
    official = synthetic_official_state_dict(rows)
    converted = convert_official_state_dict(official, model.state_dict())  # raises on any name or shape mismatch
    model.load_state_dict(converted, strict=True)
    index = {key: i + 1 for i, (key, _, _) in enumerate(rows)}
    state = model.state_dict()
    for official_key, ours in [
        ("language_backbone.body.resblocks.11.mlp.c_proj.weight",
         "language_backbone.model.resblocks.11.mlp.c_proj.weight"),
        ("language_backbone.body.positional_embedding", "language_backbone.model.positional_embedding"),
        ("rpn.head.dyhead_tower.4.attn.in_proj_weight", "fusion.layers.1.text_layer.attn.in_proj_weight"),
    ]:
        assert torch.all(state[ours] == index[official_key])


def test_a_bert_language_backbone_does_not_load_into_the_clip_encoder():
    encoder = ClipTextEncoder(ClipTextConfig(width=8, layers=1, heads=2, vocab_size=16))
    ours = {f"language_backbone.{k}": v for k, v in encoder.state_dict().items()}
    bert_rows = [row for row in released_checkpoint_rows() if row[0].startswith("language_backbone.")]
    bert = synthetic_official_state_dict(bert_rows)
    unmatched = r"without a parameter in this model \(\d+\): \['language_backbone\.model\.embeddings"
    with pytest.raises(ValueError, match=unmatched):
        convert_official_state_dict(bert, ours)


# --- fusion text layer, padding, prompt limits --------------------------------------------------


def test_fusion_text_layer_is_the_encoders_block_under_either_bert_mask_form():
    torch.manual_seed(0)
    layer = ClipFusionTextLayer(16, 4).eval()
    hidden = torch.randn(2, 7, 16)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    additive = padding_attention_mask(mask, 4, hidden.dtype)
    expected = super(ClipFusionTextLayer, layer).forward(hidden, attn_mask=additive)
    for implementation in ("sdpa", "eager"):
        out = layer(hidden, text_attention_mask(mask, hidden.dtype, implementation))
        torch.testing.assert_close(out, expected)
    shorter = layer(hidden[1:, :4], text_attention_mask(mask[1:, :4], hidden.dtype, "sdpa"))
    torch.testing.assert_close(shorter, expected[1:, :4], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def clip_predictor(single_thread) -> GLIPv2Predictor:
    torch.manual_seed(0)
    return GLIPv2Predictor(tiny_clip_cfg())


def _rows(instances) -> torch.Tensor:
    order = torch.argsort(instances.scores, descending=True)
    return torch.cat([instances.pred_boxes.tensor, instances.scores[:, None]], dim=1)[order]


def test_dynamic_padding_equals_official_context_padding(clip_predictor):
    cfg = tiny_clip_cfg()
    cfg.MODEL.LANGUAGE_BACKBONE.PAD_MAX = True
    padded = GLIPv2Predictor(cfg)
    padded.model.load_state_dict(clip_predictor.model.state_dict())
    image = _image(5)
    a, b = padded(image, CATEGORIES[:4]), clip_predictor(image, CATEGORIES[:4])
    assert len(a) == len(b) > 0
    torch.testing.assert_close(_rows(a), _rows(b), rtol=1e-4, atol=1e-4)
    assert isinstance(clip_predictor.model.language_backbone, ClipTextEncoder)


def test_long_prompts_are_chunked_or_rejected_with_the_bert_messages(clip_predictor):
    builder = PromptBuilder(clip_predictor.model.tokenizer, max_query_len=16)
    chunks = builder.categories([f"{c} number {i}" for i, c in enumerate(CATEGORIES * 2)])
    assert len(chunks) > 1 and all(len(p.input_ids) <= 16 for p in chunks)
    assert sorted(label for p in chunks for label in p.label_names) == list(range(12))
    with pytest.raises(ValueError, match="caption exceeds the 16-token limit"):
        builder.caption("a red circle left of a blue square and a green triangle under a yellow star")
    with pytest.raises(ValueError, match=r"alone needs \d+ tokens > the 14"):
        builder.check_vocabulary(["a very long category name " * 3])
    with pytest.raises(ValueError, match="exceeds the CLIP text context of 128"):
        clip_predictor.model.language_backbone(torch.zeros(1, 129, dtype=torch.long), torch.ones(1, 129))


# --- configs ------------------------------------------------------------------------------------


def test_b_and_h_configs_follow_the_appendix_recipe():
    b = setup_cfg(REPO / "configs" / "glipv2_B.yaml")
    h = setup_cfg(REPO / "configs" / "glipv2_H.yaml")
    stage2 = setup_cfg(REPO / "configs" / "pretrain" / "glipv2_B_stage2.yaml")
    for cfg in (b, h, stage2):
        assert cfg.MODEL.LANGUAGE_BACKBONE.NAME == "build_clip_language_backbone"
        assert cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER == "clip" and cfg.MODEL.GLIPV2.FUSION == "VLDyHeadTowerClipText"
        assert cfg.SOLVER.LANG_LR == cfg.SOLVER.BASE_LR == 1e-4
        assert cfg.SOLVER.STEPS == (int(0.67 * cfg.SOLVER.MAX_ITER), int(0.89 * cfg.SOLVER.MAX_ITER))
    assert b.MODEL.MLM.ENABLED and h.MODEL.MLM.ENABLED and not stage2.MODEL.MLM.ENABLED
    assert (h.MODEL.SWIN.EMBED_DIM, h.MODEL.DYHEAD.NUM_LAYERS) == (192, 8)
    mask = h.MODEL.ROI_MASK_HEAD
    assert (list(mask.CONV_LAYERS), mask.HG_SCALE) == ([384] * 4, 2)
    assert mask.POOLER_RESOLUTION % 2**mask.HG_SCALE == 0


def test_mismatched_text_encoder_and_fusion_or_context_are_named():
    cfg = tiny_clip_cfg()
    cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN = 129
    with pytest.raises(ValueError, match="MAX_QUERY_LEN=129 exceeds the CLIP text context"):
        build_model(cfg)
    cfg = tiny_cfg()
    cfg.MODEL.GLIPV2.FUSION = "VLDyHeadTowerClipText"
    with pytest.raises(TypeError, match="needs the CLIP-type text encoder"):
        build_model(cfg)
    assert ClipTextConfig().hidden_size == 512


# --- a tiny B-style model trains and evaluates ----------------------------------------------------


def test_tiny_b_style_model_trains_on_the_quickstart_data_and_evaluates(tmp_path, single_thread):
    register_synthetic_shapes(tmp_path / "synthetic", seed=0, num_train=4, num_val=2, num_heldout=1)
    try:
        cfg = setup_cfg(REPO / "configs" / "quickstart" / "train.yaml", freeze=False)
        cfg.merge_from_list([
            *CLIP_TEXT_OVERRIDES,
            "MODEL.LANGUAGE_BACKBONE.FREEZE", False, "MODEL.MLM.ENABLED", True,
            "MODEL.MLM.INIT_FROM_TEXT_MODEL", False, "MODEL.DYHEAD.PRIOR_PROB", 0.5,
            "INPUT.MIN_SIZE_TRAIN", (128,), "INPUT.MAX_SIZE_TRAIN", 160,
            "INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 160,
            "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 3, "SOLVER.STEP_FRACTIONS", (),
            "SOLVER.WARMUP_ITERS", 0, "SOLVER.BASE_LR", 1e-3, "SOLVER.LANG_LR", 1e-3,
            "DATASETS.TEST", ("glipv2_synthetic_val",), "TEST.DETECTIONS_PER_IMAGE", 20,
            "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", str(tmp_path / "output"),
        ])
        torch.manual_seed(0)
        trainer = GLIPv2Trainer(cfg)
        trainer.resume_or_load(resume=False)
        model = trainer.unwrapped_model
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        trainer.train()
        after = model.state_dict()
    finally:
        for split in ("train", "val", "heldout"):
            unregister_dataset(f"glipv2_synthetic_{split}")
    for prefix in ("language_backbone.model.resblocks.1.", "fusion.layers.0.text_layer.", "mlm_head."):
        changed = [k for k in after if k.startswith(prefix) and not torch.equal(after[k], before[k])]
        assert changed, prefix
    bbox = trainer._last_eval_results["bbox"]  # Detectron2 unwraps the results of a single test set
    assert "AP" in bbox and 0.0 <= bbox["AP"] <= 100.0


def test_checkpointed_clip_text_encoder_gives_the_same_output_and_gradients():
    """MODEL.LANGUAGE_BACKBONE.USE_CHECKPOINT recomputes each block in backward: same numbers, and
    the blocks' inputs are not kept (the recomputation shows as a second forward of every block)."""
    torch.manual_seed(0)
    config = ClipTextConfig(width=32, layers=2, heads=4, context_length=16, vocab_size=100)
    plain, checkpointed = ClipTextEncoder(config), ClipTextEncoder(config, use_checkpoint=True)
    checkpointed.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    calls = []
    checkpointed.model.resblocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    results = []
    for encoder in (plain, checkpointed):
        encoder.train()
        hidden = encoder(ids, mask)["hidden"]
        hidden.square().sum().backward()
        results.append((hidden.detach(), {n: p.grad for n, p in encoder.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert len(calls) == 2
