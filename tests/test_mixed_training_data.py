"""Mixed pre-training data: detection, grounding and caption sets in one exactly-resumable stream."""

import copy
import math
from collections import Counter

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from glipv2_d2.data.build import (
    DrawDataset,
    build_resumable_train_loader,
    build_train_sources,
    dataset_task,
    validated_train_ratios,
)
from glipv2_d2.data.mappers import category_uid
from glipv2_d2.engine.trainer import GLIPv2Trainer
from glipv2_quickstart import register_synthetic_grounding, register_synthetic_shapes

from .tiny_model import tiny_cfg

DETECTION = "glipv2_synthetic_train"
GROUNDING = "glipv2_synthetic_grounding_train"
CAPTION = "glipv2_synthetic_caption_train"
REORDERED = "glipv2_test_reordered_synthetic_train"  # DETECTION with its class list reversed


pytestmark = pytest.mark.usefixtures("single_thread")


def _reversed_ids(records: list[dict], num_classes: int) -> list[dict]:
    records = copy.deepcopy(records)
    for record in records:
        for anno in record["annotations"]:
            anno["category_id"] = num_classes - 1 - anno["category_id"]
    return records


@pytest.fixture(scope="module", autouse=True)
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    sizes = {"num_train": 12, "num_val": 2, "num_heldout": 1}
    register_synthetic_shapes(root=root, **sizes)
    register_synthetic_grounding(root=root, **sizes)
    names = MetadataCatalog.get(DETECTION).thing_classes
    DatasetCatalog.register(REORDERED, lambda: _reversed_ids(DatasetCatalog.get(DETECTION), len(names)))
    MetadataCatalog.get(REORDERED).set(thing_classes=names[::-1])
    yield
    DatasetCatalog.pop(REORDERED)
    MetadataCatalog.pop(REORDERED)
    register_synthetic_shapes()
    register_synthetic_grounding()


def mixed_cfg(train, ratios=(), seed=0):
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN = tuple(train)
    cfg.DATASETS.TRAIN_RATIOS = list(ratios)
    cfg.DATASETS.TEST = ()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.SEED = seed
    cfg.INPUT.MIN_SIZE_TRAIN = (64, 80)
    cfg.INPUT.MAX_SIZE_TRAIN = 112
    cfg.SOLVER.IMS_PER_BATCH = 2
    return cfg


def draw_dataset(cfg) -> DrawDataset:
    return DrawDataset(build_train_sources(cfg), cfg.DATALOADER.SEED, cfg.DATASETS.TRAIN_RATIOS)


def signature(sample: dict) -> tuple:
    """What a sample means to the model, comparable with ==."""
    instances = sample["instances"]
    return (
        sample["file_name"],
        sample["dataset_name"],
        sample["prompt"].caption,
        sample["prompt"].input_ids.tolist(),
        instances.gt_boxes.tensor.tolist(),
        instances.positive_map.tolist(),
    )


def test_ratios_set_the_shares_deterministically():
    cfg = mixed_cfg([DETECTION, GROUNDING], ratios=[3, 1])
    draws = range(4000)
    first, second = draw_dataset(cfg), draw_dataset(cfg)
    picks = [first.order(k) for k in draws]
    assert picks == [second.order(k) for k in draws]  # a second build: the same stream
    shares = Counter(dataset for dataset, _ in picks)
    assert shares[0] / len(draws) == pytest.approx(0.75, abs=0.03)
    assert shares[1] / len(draws) == pytest.approx(0.25, abs=0.03)
    for dataset in (0, 1):  # every entry of both datasets is read
        assert {entry for d, entry in picks if d == dataset} == set(range(12))
    other_seed = draw_dataset(mixed_cfg([DETECTION, GROUNDING], ratios=[3, 1], seed=1))
    assert [other_seed.order(k) for k in draws] != picks


def test_without_ratios_every_entry_is_read_once_per_epoch():
    dataset = draw_dataset(mixed_cfg([DETECTION, CAPTION]))
    sizes = [len(source.dataset_dicts) for source in dataset.sources]
    assert sizes == [12, len(DatasetCatalog.get(CAPTION))] and len(dataset) == sum(sizes)
    for epoch in range(2):
        epoch_draws = [dataset.order(k) for k in range(epoch * len(dataset), (epoch + 1) * len(dataset))]
        assert sorted(epoch_draws) == [(d, i) for d, size in enumerate(sizes) for i in range(size)]


def test_resumed_mixed_stream_equals_the_uninterrupted_tail():
    cfg = mixed_cfg([DETECTION, GROUNDING, CAPTION], ratios=[2, 1, 1])
    loader, _ = build_resumable_train_loader(cfg)
    batches = iter(loader)
    straight = [signature(sample) for _ in range(5) for sample in next(batches)]
    assert {s[1] for s in straight} == {DETECTION, GROUNDING, CAPTION}  # the mix is exercised

    resumed_loader, sampler = build_resumable_train_loader(cfg)
    sampler.start = 4  # iteration 2 x IMS_PER_BATCH 2
    resumed_batches = iter(resumed_loader)
    resumed = [signature(sample) for _ in range(3) for sample in next(resumed_batches)]
    assert resumed == straight[4:]


def test_detection_labels_share_uids_across_vocabularies():
    dataset = draw_dataset(mixed_cfg([DETECTION, REORDERED], ratios=[1, 1]))
    uid_of_name, labels_of_name = {}, {}
    for draw in range(12):
        sample = dataset[draw]
        prompt, instances = sample["prompt"], sample["instances"]
        assert prompt.names_categories
        names = MetadataCatalog.get(sample["dataset_name"]).thing_classes
        for label, uid in zip(instances.gt_classes.tolist(), instances.gt_category_uids.tolist()):
            assert uid == category_uid(names[label])
        for label, tokens in prompt.label_to_tokens.items():
            (uid,) = set(prompt.token_categories[tokens].tolist())
            assert uid == category_uid(names[label]) and 0 <= uid < 2**31
            assert uid_of_name.setdefault(names[label], uid) == uid
            labels_of_name.setdefault(names[label], set()).add((sample["dataset_name"], label))
    shared = [name for name, labels in labels_of_name.items() if {d for d, _ in labels} == {DETECTION, REORDERED}]
    assert shared  # names drawn from both datasets: different contiguous ids, one uid
    assert all(len({label for _, label in labels_of_name[name]}) == 2 for name in shared)
    assert len(set(uid_of_name.values())) == len(uid_of_name)
    assert category_uid("Person") == category_uid("person ") == category_uid("person_(human)")


def test_grounding_and_caption_samples():
    cfg = mixed_cfg([GROUNDING, CAPTION])
    cfg.MODEL.WEAK_SAMPLE_LOSS_WEIGHT = 0.5
    dataset = draw_dataset(cfg)
    drawn = Counter()
    for draw in range(10):
        sample = dataset[draw]
        drawn[sample["dataset_name"]] += 1
        weight = cfg.MODEL.WEAK_SAMPLE_LOSS_WEIGHT if sample["dataset_name"] == CAPTION else 1.0
        assert sample["loss_weight"] == weight
        positive_map = sample["instances"].positive_map
        assert positive_map.dtype == torch.bool
        assert positive_map.shape == (len(sample["instances"]), len(sample["prompt"]))
        assert len(positive_map) > 0 and positive_map.any(dim=1).all()
        assert not sample["prompt"].names_categories and not sample["instances"].has("gt_category_uids")
    assert set(drawn) == {GROUNDING, CAPTION}


@pytest.mark.parametrize(
    ("ratios", "message"),
    [([1.0], "1 entries"), ([1.0, -2.0], ">= 0"), ([0.0, 0.0], "all 0"), ([1.0, math.inf], ">= 0")],
)
def test_bad_ratios_are_refused(ratios, message):
    with pytest.raises(ValueError, match=message):
        validated_train_ratios(ratios, [DETECTION, GROUNDING])


def test_dataset_tasks_are_checked():
    assert dataset_task("d", [{}, {"task": "detection"}]) == "detection"
    with pytest.raises(ValueError, match="'keypoints'"):
        dataset_task("keypoint_set", [{"task": "keypoints"}])
    with pytest.raises(ValueError, match="mixes tasks"):
        dataset_task("mixed_set", [{"task": "grounding"}, {"task": "caption"}])


def test_mixed_training_run_logs_finite_losses(tmp_path):
    cfg = mixed_cfg([DETECTION, GROUNDING], ratios=[1, 1])
    cfg.SOLVER.MAX_ITER = 3
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.WARMUP_ITERS = 1
    cfg.SOLVER.CHECKPOINT_PERIOD = 100
    cfg.OUTPUT_DIR = str(tmp_path)
    order = draw_dataset(cfg).order
    assert {order(k)[0] for k in range(3 * cfg.SOLVER.IMS_PER_BATCH)} == {0, 1}  # both datasets reach the model

    trainer = GLIPv2Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    losses = trainer.storage.history("total_loss").values()
    assert [iteration for _, iteration in losses] == [0, 1, 2]
    assert all(math.isfinite(value) and value > 0 for value, _ in losses)
