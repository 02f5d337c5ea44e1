"""Several prompts on one image (a long vocabulary's chunks): the backbone runs once per image, the
(image, prompt) pairs go through the fusion tower in batches within TEST.FUSION_BATCH_MEMORY_MB, and
the detections equal those of the prompts run one by one."""

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.structures import Instances
from torch import nn

from glipv2_d2.engine.predictor import GLIPv2Predictor
from glipv2_d2.evaluation.prompted_inference import PromptedDetector, merge_chunk_detections
from glipv2_d2.modeling.prompt_batching import FusionBatchBudget, PromptPair

from .detection_matching import assert_same_detections
from .test_mask_head import CATEGORIES, mask_cfg
from .tiny_model import tiny_cfg

# Two images of one size, so that each pads alike alone and in a batch.
IMAGES = [np.random.default_rng(seed).integers(0, 256, size=(150, 190, 3), dtype=np.uint8) for seed in (4, 5)]


@pytest.fixture(scope="module")
def predictor(single_thread) -> GLIPv2Predictor:
    """The tiny model with a mask head, without the per-level and per-chunk cuts, where scores tied
    to float rounding could fall on either side."""
    torch.manual_seed(0)
    cfg = mask_cfg()
    cfg.MODEL.ATSS.PRE_NMS_TOP_N = 10000
    cfg.MODEL.ATSS.DETECTIONS_PER_IMG = 1000
    cfg.TEST.DETECTIONS_PER_IMAGE = -1
    return GLIPv2Predictor(cfg, batch_size=2)


@pytest.fixture
def three_chunks(predictor, monkeypatch) -> list:
    """CATEGORIES as prompts of 3, 3 and 1 names, of three different token lengths."""
    monkeypatch.setattr(predictor.prompt_builder, "chunk_size", 3)
    chunks = predictor.build_prompts(CATEGORIES)
    assert len({len(chunk) for chunk in chunks}) == 3
    return chunks


def _inputs(predictor: GLIPv2Predictor) -> list[dict]:
    return [predictor._model_input(image, None) for image in IMAGES]


def _batch_size(args: tuple) -> int:
    first = args[0]
    return (first[0] if isinstance(first, list) else first).shape[0]


@contextmanager
def counted(module: nn.Module) -> Iterator[list[int]]:
    """The batch size of every call of ``module`` inside the block."""
    sizes: list[int] = []
    hook = module.register_forward_hook(lambda _module, args, _output: sizes.append(_batch_size(args)))
    try:
        yield sizes
    finally:
        hook.remove()


@contextmanager
def fusion_budget(model: nn.Module, memory_mb: float) -> Iterator[None]:
    kept = model.fusion_batch
    model.fusion_batch = dataclasses.replace(kept, memory_mb=memory_mb)
    try:
        yield
    finally:
        model.fusion_batch = kept


@pytest.mark.parametrize("pairs_per_group", [1, 2, 6])
def test_batched_chunks_equal_chunks_one_by_one(predictor, three_chunks, pairs_per_group):
    model, inputs = predictor.model, _inputs(predictor)
    with torch.no_grad():
        alone = [[model([{**x, "prompt": chunk}])[0]["instances"] for chunk in three_chunks] for x in inputs]
        positions = sum(f.shape[-2] * f.shape[-1] for f in model.extract_features(model.preprocess_image(inputs)))
        longest = max(len(chunk) for chunk in three_chunks)
        memory_mb = pairs_per_group * model.fusion_batch.pair_bytes(positions, longest) / 2**20
        with fusion_budget(model, memory_mb), counted(model.backbone) as backbone, counted(model.fusion) as fusion:
            batched = model.inference_over_prompts(inputs, three_chunks)
    assert backbone == [2]  # one pass, for both images
    assert fusion == [pairs_per_group] * (6 // pairs_per_group)  # 2 images x 3 chunks
    for image_parts, image_alone in zip(batched, alone, strict=True):
        for part, want in zip(image_parts, image_alone, strict=True):
            assert_same_detections(model.finish_instances(part), want)


def test_evaluation_merge_equals_the_merge_of_chunks_one_by_one(predictor, three_chunks):
    model, inputs = predictor.model, _inputs(predictor)
    with torch.no_grad():
        merged = PromptedDetector(model, three_chunks, max_detections_per_image=150)(inputs)
        for x, result in zip(inputs, merged, strict=True):
            parts = [model.inference([{**x, "prompt": chunk}], finish=False)[0]["instances"] for chunk in three_chunks]
            assert sum(len(part) for part in parts) > 150
            assert_same_detections(result["instances"], model.finish_instances(merge_chunk_detections(parts, 150)))


@pytest.mark.parametrize("chunk_size, num_chunks", [(None, 1), (3, 3), (1, 7)])
def test_one_backbone_pass_per_image_for_any_number_of_chunks(predictor, monkeypatch, chunk_size, num_chunks):
    monkeypatch.setattr(predictor.prompt_builder, "chunk_size", chunk_size)
    chunks = predictor.build_prompts(CATEGORIES)
    assert len(chunks) == num_chunks
    with torch.no_grad(), counted(predictor.model.backbone) as backbone:
        results = PromptedDetector(predictor.model, chunks)(_inputs(predictor))
    assert backbone == [2]  # one call, reading each of the two images once
    assert all(len(result["instances"]) > 0 for result in results)


def test_predictor_reads_two_prompts_of_one_image_with_one_backbone_pass(predictor, monkeypatch):
    monkeypatch.setattr(predictor.prompt_builder, "chunk_size", 1)
    names = ["red circle", "blue square"]
    assert len(predictor.build_prompts(names)) == 2
    with counted(predictor.model.backbone) as backbone:
        both = predictor(IMAGES[0], names)
    assert backbone == [1]
    first, second = predictor(IMAGES[0], names[:1]), predictor(IMAGES[0], names[1:])
    second.pred_classes = second.pred_classes + 1  # a label is the name's place in the list
    for alone in (first, second):
        alone.remove("pred_phrases")
    assert_same_detections(both, Instances.cat([first, second]))
    assert list(both.pred_phrases) == [names[label] for label in both.pred_classes.tolist()]


def test_predictor_reads_a_list_of_prompt_objects_with_one_backbone_pass(predictor):
    """``predictor(image, [prompt_a, prompt_b])``: one Instances per prompt, in its own labels."""
    prompts = [predictor.build_prompts(caption)[0] for caption in ("a red circle", "a blue square and a green one")]
    with counted(predictor.model.backbone) as backbone:
        both = predictor(IMAGES[0], prompts)
    assert backbone == [1]
    assert isinstance(both, list) and len(both) == 2
    for got, prompt in zip(both, prompts, strict=True):
        want = predictor(IMAGES[0], prompt)
        match = assert_same_detections(got, want)
        assert list(got.pred_phrases) == list(want.pred_phrases[match])
    with pytest.raises(ValueError, match="no phrases"):
        predictor(IMAGES[0], prompts, phrases=["red circle"])
    with pytest.raises(TypeError, match="list of Prompt objects"):
        predictor.predict_prompts(IMAGES[0], ["a red circle"])


def test_predict_batch_reads_every_prompt_of_its_images_with_one_backbone_pass(predictor, monkeypatch):
    monkeypatch.setattr(predictor.prompt_builder, "chunk_size", 3)
    caption = "a red circle left of a blue square"
    with counted(predictor.model.backbone) as backbone:
        together = predictor.predict_batch(IMAGES, [CATEGORIES, caption])
    assert backbone == [2]
    alone = [predictor(IMAGES[0], CATEGORIES), predictor(IMAGES[1], caption)]
    for got, want in zip(together, alone, strict=True):
        match = assert_same_detections(got, want)
        assert list(got.pred_phrases) == list(want.pred_phrases[match])


def test_padding_columns_reach_no_label_score_and_no_mask(predictor, three_chunks):
    """A group pads its prompts to its longest: extra text columns, whatever their values, change
    neither the post-processing's label scores nor the mask head's token means."""
    model, x = predictor.model, _inputs(predictor)[0]
    chunk = three_chunks[2]
    with torch.no_grad():
        images = model.preprocess_image([x])
        text = model.encode_text([chunk])
        outputs = model.run_network(images, text)
        anchors = model.anchor_generator(outputs.features)
        logits = [F.pad(level, (0, 5), value=40.0) for level in outputs.logits]
        detections = [
            model.post_processor(outputs.bbox_reg, outputs.centerness, level_logits, anchors, images.image_sizes,
                                 [chunk.label_to_tokens])[0]
            for level_logits in (outputs.logits, logits)
        ]
        assert_same_detections(detections[1], detections[0])  # not bit-exact: the label means sum in another order
        boxes, labels = [detections[0].pred_boxes.tensor], [detections[0].pred_classes]
        head = model.task_heads["MaskHead"]
        levels = outputs.features if head.use_fused_features else outputs.pre_fusion_features
        padded_text = torch.cat([outputs.text, torch.randn(1, 5, outputs.text.shape[2])], dim=1)
        masks = [
            head.predict_mask_probs(levels, boxes, labels, t, m, [chunk.label_to_tokens])[0]
            for t, m in ((outputs.text, text.mask), (padded_text, F.pad(text.mask, (0, 5))))
        ]
    assert torch.equal(masks[0], masks[1])


def test_groups_fill_the_budget_shortest_prompts_first():
    lengths = [10, 3, 6]  # tokens of the prompts of rows 0, 1, 2
    pairs = [PromptPair(image, row, row) for image in range(2) for row in range(3)]
    budget = FusionBatchBudget(memory_mb=0.0, channels=4, embed_dim=8, num_heads=2)
    assert budget.pair_bytes(100, 10) == 4 * 100 * (5 * 4 + 3 * 8 + 3 * 2 * 10 + 3 * 10)

    def grouped(memory_mb: float) -> list[list[tuple[int, int]]]:
        groups = dataclasses.replace(budget, memory_mb=memory_mb).groups(pairs, lengths, 100)
        return [[(pair.image, pair.row) for pair in group] for group in groups]

    assert grouped(0.0) == [[(0, 1)], [(1, 1)], [(0, 2)], [(1, 2)], [(0, 0)], [(1, 0)]]
    two_longest = 2 * budget.pair_bytes(100, 10) / 2**20
    assert grouped(two_longest) == [[(0, 1), (1, 1)], [(0, 2), (1, 2)], [(0, 0), (1, 0)]]
    assert grouped(1e-9) == grouped(0.0)  # a pair over the budget still runs, alone
    assert grouped(1.0) == [[(0, 1), (1, 1), (0, 2), (1, 2), (0, 0), (1, 0)]]


def test_negative_fusion_budget_is_refused_naming_the_key():
    cfg = tiny_cfg()
    cfg.merge_from_list(["TEST.FUSION_BATCH_MEMORY_MB", "-1"])
    with pytest.raises(ValueError, match=r"TEST\.FUSION_BATCH_MEMORY_MB must be >= 0.*got -1"):
        build_model(cfg)
