"""Detection -> grounding mapper and the training prompt sampler."""

import random

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.structures import BoxMode

from glipv2_d2.config import add_glipv2_config
from glipv2_d2.data.mappers import DetectionGroundingMapper
from glipv2_d2.data.prompts import category_uid, clean_category_name, sample_detection_prompt
from glipv2_d2.modeling.language import build_tokenizer

from .conftest import half_red_half_blue_png

NAMES = [
    "person",
    "bicycle",
    "traffic light",
    "fire_hydrant",
    "hot dog",
    "teddy bear",
    "hair drier",
    "bait_(lure)",
    "dog",
    "cat",
    "refrigerator",
    "toothbrush",
]
VOCAB = dict(enumerate(NAMES))
LABEL_OF = {clean_category_name(name): label for label, name in VOCAB.items()}
DATASET = "glipv2_test_mapper_synthetic"
WIDTH, HEIGHT = 64, 48


@pytest.fixture(scope="module", params=["bert-base-uncased", "clip"])
def tokenizer(request):
    """Every prompt test runs with GLIPv2-T's WordPiece and GLIPv2-B / -H's CLIP BPE tokenizer."""
    return build_tokenizer(request.param)


@pytest.fixture(scope="module", autouse=True)
def _metadata():
    MetadataCatalog.get(DATASET).set(thing_classes=NAMES)


def _cfg(**overrides):
    cfg = add_glipv2_config(get_cfg())
    cfg.DATASETS.TRAIN = (DATASET,)
    cfg.DATASETS.TEST = (DATASET,)
    cfg.INPUT.MIN_SIZE_TRAIN = (HEIGHT,)  # keeps the synthetic image at its size unless a test says
    cfg.INPUT.MIN_SIZE_TEST = HEIGHT
    cfg.merge_from_list([item for pair in overrides.items() for item in pair])
    return cfg


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    return half_red_half_blue_png(tmp_path_factory.mktemp("images") / "synthetic.png", HEIGHT, WIDTH)


def _record(image_file, boxes_and_labels, **extra):
    annotations = [
        {"bbox": list(box), "bbox_mode": BoxMode.XYXY_ABS, "category_id": label, "iscrowd": 0}
        for box, label in boxes_and_labels
    ]
    return {
        "file_name": image_file,
        "height": HEIGHT,
        "width": WIDTH,
        "image_id": 7,
        "annotations": annotations,
        **extra,
    }


def _decode(tokenizer, ids, indices):
    return tokenizer.decode([int(ids[i]) for i in indices])


def _names_in(caption):
    return caption.split(". ")


# --- sample_detection_prompt -------------------------------------------------------------------


def test_sampled_prompt_has_every_positive_once_and_negatives_up_to_limit(tokenizer):
    positives = [3, 7, 7, 9]
    prompt, kept = sample_detection_prompt(positives, VOCAB, tokenizer, 256, 5, random.Random(0))
    assert sorted(kept) == [3, 7, 9]
    names = _names_in(prompt.caption)
    assert len(names) == len(set(names)) == len(prompt.label_to_tokens)
    for label, tokens in prompt.label_to_tokens.items():
        assert _decode(tokenizer, prompt.input_ids, tokens) == clean_category_name(NAMES[label])
        assert (prompt.token_categories[tokens] == category_uid(NAMES[label])).all()
    assert prompt.input_ids.tolist() == tokenizer(prompt.caption)["input_ids"]
    negatives = set(prompt.label_to_tokens) - {3, 7, 9}
    assert 1 <= len(negatives) <= 5  # 5 drawn from the whole vocabulary, positives among them removed
    # full_negatives_prob=0 draws a uniform count in 1..max_negatives
    counts = {
        len(sample_detection_prompt([], VOCAB, tokenizer, 256, 6, random.Random(s), full_negatives_prob=0.0)[0]
            .label_to_tokens)
        for s in range(40)
    }
    assert counts <= set(range(1, 7)) and len(counts) > 2


def test_sampled_prompt_is_reproducible_from_the_rng(tokenizer):
    def sample(seed):
        prompt, kept = sample_detection_prompt(
            [0, 5], VOCAB, tokenizer, 256, 6, random.Random(seed), full_negatives_prob=0.5
        )
        return prompt.caption, prompt.input_ids.tolist(), kept

    assert sample(3) == sample(3)
    assert len({sample(seed)[0] for seed in range(10)}) > 1  # order and negatives change with the seed
    prompt, _ = sample_detection_prompt([5, 0], VOCAB, tokenizer, 256, 0, random.Random(1), shuffle=False)
    assert prompt.caption == "person. teddy bear"  # no shuffle: vocabulary order


def test_truncation_keeps_names_whole_and_positives_first(tokenizer):
    positives = list(range(len(NAMES)))
    max_len = 12
    for seed in range(5):
        prompt, kept = sample_detection_prompt(positives, VOCAB, tokenizer, max_len, 85, random.Random(seed))
        assert len(prompt) == len(tokenizer(prompt.caption)["input_ids"]) <= max_len
        assert 0 < len(kept) < len(NAMES)
        assert set(prompt.label_to_tokens) == set(kept)  # every label is a positive, so no negative is added
        assert sorted(_names_in(prompt.caption)) == sorted(clean_category_name(NAMES[k]) for k in kept)
    # positives fill the budget before negatives are considered
    prompt, kept = sample_detection_prompt([2, 6], VOCAB, tokenizer, 8, 85, random.Random(0))
    assert kept and set(kept) <= {2, 6} and len(tokenizer(prompt.caption)["input_ids"]) <= 8


def test_empty_positives_still_give_a_prompt(tokenizer):
    prompt, kept = sample_detection_prompt([], VOCAB, tokenizer, 256, 0, random.Random(0))
    assert kept == [] and len(prompt.label_to_tokens) == 1
    assert prompt.caption in [clean_category_name(n) for n in NAMES]
    with pytest.raises(KeyError, match="not in the vocabulary"):
        sample_detection_prompt([99], VOCAB, tokenizer, 256, 3, random.Random(0))


# --- DetectionGroundingMapper ------------------------------------------------------------------


def test_train_output_contract(tokenizer, image_file):
    mapper = DetectionGroundingMapper(_cfg(), True, tokenizer)
    record = _record(image_file, [((4, 4, 20, 30), 2), ((30, 10, 60, 40), 3), ((10, 5, 25, 20), 2)])
    out = mapper(record, seed=0)
    assert (out["height"], out["width"]) == (HEIGHT, WIDTH)
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, HEIGHT, WIDTH)
    ids, mask = out["prompt"].input_ids, out["prompt"].attention_mask
    assert ids.dtype == mask.dtype == torch.int64 and ids.dim() == 1 and mask.all()  # no padding
    assert ids[-1] == (tokenizer.sep_token_id or tokenizer.eos_token_id)  # BERT [SEP], CLIP <|endoftext|>
    assert set(_names_in(out["prompt"].caption)) >= {"traffic light", "fire hydrant"}
    assert set(out["prompt"].label_to_tokens) == {LABEL_OF[name] for name in _names_in(out["prompt"].caption)}
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [2, 3, 2]
    assert inst.positive_map.dtype == torch.bool and inst.positive_map.shape == (3, len(ids))
    for row, label in zip(inst.positive_map, inst.gt_classes.tolist()):
        assert _decode(tokenizer, ids, row.nonzero().flatten()) == clean_category_name(NAMES[label])
        assert row.nonzero().flatten().tolist() == out["prompt"].label_to_tokens[label]
    assert inst.gt_category_uids.tolist() == [category_uid(NAMES[label]) for label in [2, 3, 2]]
    assert "annotations" not in out


def test_same_seed_same_sample(tokenizer, image_file):
    record = _record(image_file, [((4, 4, 20, 30), 2)])
    mapper = DetectionGroundingMapper(_cfg(), True, tokenizer)
    python_state, numpy_state = random.getstate(), np.random.get_state()[1].copy()
    first = [mapper(record, seed=5) for _ in range(2)]
    assert random.getstate() == python_state and np.array_equal(np.random.get_state()[1], numpy_state)
    assert first[0]["prompt"].caption == first[1]["prompt"].caption
    assert torch.equal(first[0]["image"], first[1]["image"])
    assert len({mapper(record, seed=seed)["prompt"].caption for seed in range(5)}) > 1  # the seed drives the choices


def test_truncation_drops_boxes_of_categories_that_do_not_fit(tokenizer, image_file):
    cfg = _cfg(**{"MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN": 6, "DATASETS.MAX_NEGATIVE_CATEGORIES": 0})
    mapper = DetectionGroundingMapper(cfg, True, tokenizer)
    record = _record(image_file, [((0, 0, 10, 10), label) for label in (2, 5, 6, 10)])
    out = mapper(record, seed=0)
    classes = out["instances"].gt_classes.tolist()
    assert len(out["prompt"].input_ids) <= 6 and 0 < len(classes) < 4
    assert set(classes) == set(out["prompt"].label_to_tokens)
    assert sorted(_names_in(out["prompt"].caption)) == sorted({clean_category_name(NAMES[c]) for c in classes})


def test_horizontal_flip_mirrors_boxes_and_resize_picks_a_listed_size(tokenizer, image_file):
    cfg = _cfg(**{"INPUT.MIN_SIZE_TRAIN": (24, 48, 96)})
    record = _record(image_file, [((4, 6, 20, 30), 0)])
    seen = set()
    for seed in range(12):
        out = DetectionGroundingMapper(cfg, True, tokenizer)(record, seed=seed)
        _, h, w = out["image"].shape
        assert h in (24, 48, 96) and w == h * WIDTH // HEIGHT
        scale = h / HEIGHT
        flipped = bool(out["image"][0, 0, 0] == 255)  # BGR: blue on the left
        x0, y0, x1, y1 = out["instances"].gt_boxes.tensor[0].tolist()
        expected_x = (w - 20 * scale, w - 4 * scale) if flipped else (4 * scale, 20 * scale)
        assert (x0, x1) == pytest.approx(expected_x) and (y0, y1) == pytest.approx((6 * scale, 30 * scale))
        seen.add(flipped)
    assert seen == {True, False}


def test_empty_image_gets_negatives_and_empty_instances(tokenizer, image_file):
    mapper = DetectionGroundingMapper(_cfg(), True, tokenizer)
    for record in (_record(image_file, []), {k: v for k, v in _record(image_file, []).items() if k != "annotations"}):
        out = mapper(record, seed=0)
        assert len(out["instances"]) == 0 and out["prompt"].caption
        assert out["instances"].positive_map.shape == (0, len(out["prompt"].input_ids))
        assert out["instances"].gt_boxes.tensor.shape == (0, 4)


def test_degenerate_and_outside_boxes_are_dropped_or_clipped(tokenizer, image_file):
    cfg = _cfg(**{"INPUT.RANDOM_FLIP": "none"})
    mapper = DetectionGroundingMapper(cfg, True, tokenizer)
    boxes = [
        ((5, 5, 5, 20), 1),  # zero width
        ((70, 10, 90, 20), 2),  # wholly right of the image
        ((-10, -5, 30, 60), 3),  # overhangs: clipped
        ((10, 10, 20, 20), 4),
    ]
    record = _record(image_file, boxes)
    record["annotations"].append({"bbox": [0, 0, 5, 5], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 5, "iscrowd": 1})
    out = mapper(record, seed=0)
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [3, 4]
    assert inst.gt_boxes.tensor.tolist() == [[0, 0, 30, HEIGHT], [10, 10, 20, 20]]
    assert inst.positive_map.shape == (2, len(out["prompt"].input_ids))


def test_masks_follow_mask_on(tokenizer, image_file):
    record = _record(image_file, [((4, 4, 20, 30), 2)])
    record["annotations"][0]["segmentation"] = [[4, 4, 20, 4, 20, 30, 4, 30]]
    with_masks = DetectionGroundingMapper(_cfg(**{"MODEL.MASK_ON": True}), True, tokenizer)(record, seed=0)
    assert len(with_masks["instances"].gt_masks) == 1
    without = DetectionGroundingMapper(_cfg(), True, tokenizer)(record, seed=0)
    assert not without["instances"].has("gt_masks")


def test_test_mode_prompts_every_category_in_order(tokenizer, image_file):
    mapper = DetectionGroundingMapper(_cfg(), False, tokenizer)
    out = mapper(_record(image_file, [((4, 4, 20, 30), 2)]))
    assert out["prompt"].caption == ". ".join(clean_category_name(n) for n in NAMES)
    assert sorted(out["prompt"].label_to_tokens) == list(range(len(NAMES)))
    for label, tokens in out["prompt"].label_to_tokens.items():
        assert _decode(tokenizer, out["prompt"].input_ids, tokens) == clean_category_name(NAMES[label])
    assert "instances" not in out and "annotations" not in out
    assert out["image"].shape == (3, HEIGHT, WIDTH)
    # a vocabulary larger than one prompt: the first chunk, names whole
    small = DetectionGroundingMapper(_cfg(**{"MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN": 10}), False, tokenizer)
    out = small(_record(image_file, []))
    names = _names_in(out["prompt"].caption)
    assert names == [clean_category_name(n) for n in NAMES[: len(names)]] and len(out["prompt"].input_ids) <= 10


def test_global_rng_mode_is_reproducible_and_trainer_style_construction_works(image_file):
    # no tokenizer: the config's is built; dataset_names as the trainer passes it
    mapper = DetectionGroundingMapper(_cfg(**{"DATASETS.TRAIN": ()}), is_train=True, dataset_names=[DATASET])
    record = _record(image_file, [((4, 4, 20, 30), 2)])
    outputs = []
    for _ in range(2):
        random.seed(11)
        np.random.seed(11)
        outputs.append(mapper(record))
    assert outputs[0]["prompt"].caption == outputs[1]["prompt"].caption
    assert torch.equal(outputs[0]["image"], outputs[1]["image"])
    MetadataCatalog.get(DATASET + "_other").set(thing_classes=NAMES[::-1])
    with pytest.raises(ValueError, match="different 'thing_classes'"):
        DetectionGroundingMapper(_cfg(), is_train=True, dataset_names=[DATASET, DATASET + "_other"])
