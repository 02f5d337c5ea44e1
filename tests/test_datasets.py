"""Dataset registration and the synthetic quick-start set: determinism, valid annotations,
the compositional heldout split, and the Detectron2 catalog / evaluator contract."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances
from pycocotools import mask as mask_util

from glipv2_d2.data.datasets import (
    datasets_root,
    register_all_glipv2_datasets,
    register_coco_and_lvis,
    register_grounding_coco,
    unregister_dataset,
)
from glipv2_quickstart import (
    HELDOUT_CATEGORY_IDS,
    SYNTHETIC_CATEGORIES,
    generate_synthetic_shapes,
    register_quickstart_datasets,
    register_synthetic_shapes,
)
from glipv2_quickstart.scene_text import plural
from glipv2_quickstart.shapes import HELDOUT_PAIRS, SHAPES

COUNTS = {"num_train": 30, "num_val": 8, "num_heldout": 12}
SYNTHETIC_NAMES = [f"glipv2_synthetic_{s}" for s in ("train", "val", "heldout")]
QUICKSTART_NAMES = SYNTHETIC_NAMES + [
    "glipv2_synthetic_lvis_val",
    "glipv2_synthetic_grounding_train",
    "glipv2_synthetic_grounding_val",
    "glipv2_synthetic_caption_train",
    "glipv2_synthetic_referring_train",
    "glipv2_synthetic_referring_val",
]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, str]:
    return generate_synthetic_shapes(tmp_path_factory.mktemp("a") / "synthetic", seed=0, **COUNTS)


def _load(path: str) -> dict:
    return json.loads(Path(path).read_text())


def _folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(generated, tmp_path):
    again = generate_synthetic_shapes(tmp_path / "synthetic", seed=0, **COUNTS)
    first, second = Path(generated["train"]).parents[1], Path(again["train"]).parents[1]
    assert _folder_bytes(first) == _folder_bytes(second)
    other = generate_synthetic_shapes(tmp_path / "other", seed=1, **COUNTS)
    assert Path(other["train"]).read_bytes() != Path(generated["train"]).read_bytes()


def test_generation_is_skipped_when_present_and_redone_when_parameters_change(tmp_path):
    root = tmp_path / "synthetic"
    paths = generate_synthetic_shapes(root, num_train=2, num_val=1, num_heldout=1)
    stamp = Path(paths["train"]).stat().st_mtime_ns
    assert generate_synthetic_shapes(root, num_train=2, num_val=1, num_heldout=1) == paths
    assert Path(paths["train"]).stat().st_mtime_ns == stamp
    generate_synthetic_shapes(root, num_train=3, num_val=1, num_heldout=1)
    assert len(_load(paths["train"])["images"]) == 3
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["synthetic"]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        generate_synthetic_shapes(tmp_path / "mine", num_train=1, num_val=1, num_heldout=1)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("split", ["train", "val", "heldout"])
def test_annotations_are_valid(generated, split):
    coco = _load(generated[split])
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert coco["categories"] == SYNTHETIC_CATEGORIES
    assert len(coco["images"]) == COUNTS[f"num_{split}"]
    by_image: dict[int, list[dict]] = {}
    for anno in coco["annotations"]:
        by_image.setdefault(anno["image_id"], []).append(anno)
    image_root = Path(generated[split]).parents[1] / split
    for image in coco["images"]:
        h, w = image["height"], image["width"]
        pixels = cv2.imread(str(image_root / image["file_name"]))
        assert pixels.shape == (h, w, 3)
        annos = by_image[image["id"]]
        assert 1 <= len(annos) <= 5
        caption = image["caption"]
        assert any(anno["tokens_positive"] for anno in annos), caption
        for anno in annos:
            x, y, bw, bh = anno["bbox"]
            assert 0 <= x and 0 <= y and bw > 0 and bh > 0 and x + bw <= w and y + bh <= h
            mask = mask_util.decode(mask_util.merge(mask_util.frPyObjects(anno["segmentation"], h, w)))
            ys, xs = np.nonzero(mask)
            assert anno["area"] == mask.sum() > 0
            assert [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] == anno["bbox"]
            colour, shape = names[anno["category_id"]].split()
            for start, end in anno["tokens_positive"]:
                phrase = caption[start:end]
                assert colour in phrase and (shape in phrase or plural(shape) in phrase), (phrase, caption)
        assert len(image["captions"]) == 3 and all(image["captions"])
        for qa in image["qa"]:
            assert qa["question"].endswith("?") and qa["answers"][0]["score"] == 1.0


def test_counting_answers_match_annotations(generated):
    coco = _load(generated["val"])
    names = {c["id"]: c["name"] for c in coco["categories"]}
    singular = {plural(s): s for s in SHAPES}
    for image in coco["images"]:
        shapes = [names[a["category_id"]].split()[1] for a in coco["annotations"] if a["image_id"] == image["id"]]
        counting = [qa for qa in image["qa"] if qa["question"].startswith("how many ")]
        assert len(counting) == 1
        shape = singular[counting[0]["question"].split()[2]]
        assert counting[0]["answers"][0]["answer"] == str(shapes.count(shape))


def test_heldout_pairs_never_in_train_and_in_every_heldout_image(generated):
    heldout_names = [c["name"] for c in SYNTHETIC_CATEGORIES if c["id"] in HELDOUT_CATEGORY_IDS]
    assert sorted(heldout_names) == sorted(f"{colour} {shape}" for colour, shape in HELDOUT_PAIRS)
    assert len(heldout_names) >= 2
    for split in ("train", "val"):
        coco = _load(generated[split])
        assert not {a["category_id"] for a in coco["annotations"]} & set(HELDOUT_CATEGORY_IDS)
        text = json.dumps([[i["caption"], i["captions"], i["qa"]] for i in coco["images"]])
        assert not any(name in text for name in heldout_names)
    coco = _load(generated["heldout"])
    with_heldout = {a["image_id"] for a in coco["annotations"] if a["category_id"] in HELDOUT_CATEGORY_IDS}
    assert with_heldout == {i["id"] for i in coco["images"]}


@pytest.fixture
def synthetic_registered(tmp_path):
    root = tmp_path / "synthetic"
    register_synthetic_shapes(root, seed=0, **COUNTS)
    yield root
    for name in SYNTHETIC_NAMES:
        unregister_dataset(name)  # back to the library's registration, which has no synthetic sets


def test_registration_is_lazy_and_follows_detectron2_format(synthetic_registered):
    assert not synthetic_registered.exists()
    meta = MetadataCatalog.get("glipv2_synthetic_train")
    assert meta.thing_classes == [c["name"] for c in SYNTHETIC_CATEGORIES]
    assert meta.evaluator_type == "coco" and meta.heldout_category_ids == HELDOUT_CATEGORY_IDS
    dicts = DatasetCatalog.get("glipv2_synthetic_train")
    assert len(dicts) == COUNTS["num_train"] and Path(meta.json_file).is_file()
    classes = {a["category_id"] for d in dicts for a in d["annotations"]}
    assert classes <= set(range(len(SYNTHETIC_CATEGORIES)))
    for d in dicts:
        assert Path(d["file_name"]).is_file() and d["height"] > 0 and d["width"] > 0
        assert d["task"] == "detection" and d["caption"] and d["qa"] and len(d["captions"]) == 3
        for anno in d["annotations"]:
            assert anno["bbox_mode"] == BoxMode.XYWH_ABS and "tokens_positive" in anno and anno["segmentation"]


def test_coco_evaluator_scores_ground_truth_as_perfect(synthetic_registered):
    dicts = DatasetCatalog.get("glipv2_synthetic_val")
    evaluator = COCOEvaluator("glipv2_synthetic_val", tasks=("bbox",), distributed=False)
    evaluator.reset()
    for d in dicts:
        boxes = [BoxMode.convert(a["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for a in d["annotations"]]
        instances = Instances((d["height"], d["width"]))
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.scores = torch.ones(len(boxes))
        instances.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": instances}])
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100.0)


TINY = {
    "images": [
        {"id": 7, "file_name": "a.jpg", "height": 40, "width": 60, "caption": "a cat next to a dog"},
        {"id": 8, "file_name": "b.jpg", "height": 40, "width": 60},
    ],
    "annotations": [
        {"id": 1, "image_id": 7, "category_id": 9, "bbox": [1, 2, 10, 12], "iscrowd": 0, "area": 120,
         "tokens_positive": [[0, 5]]},
        {"id": 2, "image_id": 7, "category_id": 5, "bbox": [20, 2, 10, 12], "iscrowd": 0, "area": 120,
         "tokens_positive": [[14, 19]]},
        {"id": 3, "image_id": 8, "category_id": 5, "bbox": [3, 3, 5, 5], "iscrowd": 0, "area": 25},
    ],
    "categories": [{"id": 9, "name": "cat"}, {"id": 5, "name": "dog"}],
}  # fmt: skip


@pytest.fixture
def tiny_json(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    registered = []
    yield path, registered
    for name in registered:
        unregister_dataset(name)


def test_register_grounding_coco_keeps_caption_and_spans(tiny_json):
    path, registered = tiny_json
    register_grounding_coco("test_tiny_grounding", str(path), str(path.parent))
    registered.append("test_tiny_grounding")
    assert MetadataCatalog.get("test_tiny_grounding").thing_classes == ["dog", "cat"]  # sorted by id
    first, second = DatasetCatalog.get("test_tiny_grounding")
    assert first["task"] == "detection" and first["caption"] == "a cat next to a dog"
    assert [a["category_id"] for a in first["annotations"]] == [1, 0]
    assert [a["tokens_positive"] for a in first["annotations"]] == [[[0, 5]], [[14, 19]]]
    assert first["file_name"] == str(path.parent / "a.jpg")
    assert "caption" not in second and "tokens_positive" not in second["annotations"][0]
    assert MetadataCatalog.get("test_tiny_grounding").thing_dataset_id_to_contiguous_id == {5: 0, 9: 1}


def test_register_grounding_coco_refuses_spans_outside_the_caption(tiny_json):
    path, registered = tiny_json
    bad = json.loads(json.dumps(TINY))
    bad["annotations"][1]["tokens_positive"] = [[14, 40]]
    path.write_text(json.dumps(bad))
    register_grounding_coco("test_tiny_bad", str(path), str(path.parent), task="grounding")
    registered.append("test_tiny_bad")
    with pytest.raises(ValueError, match=r"image 7\b.*\[14, 40\)"):
        DatasetCatalog.get("test_tiny_bad")


def test_register_coco_and_lvis_names_and_metadata(tmp_path):
    try:
        register_coco_and_lvis(str(tmp_path))
        coco = MetadataCatalog.get("glipv2_coco_2017_val")
        assert len(coco.thing_classes) == 80 and coco.evaluator_type == "coco"
        assert coco.json_file == str(tmp_path / "coco/annotations/instances_val2017.json")
        lvis = MetadataCatalog.get("glipv2_lvis_v1_val")
        assert len(lvis.thing_classes) == 1203 and lvis.evaluator_type == "lvis"
        assert "glipv2_lvis_v1_train" in DatasetCatalog and "glipv2_lvis_v1_minival" not in DatasetCatalog
        (tmp_path / "lvis").mkdir()
        (tmp_path / "lvis/lvis_v1_minival.json").write_text("{}")
        register_coco_and_lvis(str(tmp_path))
        assert MetadataCatalog.get("glipv2_lvis_v1_minival").json_file == str(tmp_path / "lvis/lvis_v1_minival.json")
    finally:
        register_all_glipv2_datasets()


def test_register_all_is_idempotent_and_lazy(tmp_path):
    try:
        register_all_glipv2_datasets(tmp_path)
        register_all_glipv2_datasets(tmp_path)
        names = ["glipv2_coco_2017_train", "glipv2_coco_2017_val", "glipv2_lvis_v1_train", "glipv2_lvis_v1_val"]
        assert all(name in DatasetCatalog for name in names)
        assert MetadataCatalog.get("glipv2_coco_2017_val").image_root == str(tmp_path / "coco" / "val2017")
        assert not any(tmp_path.iterdir())
    finally:
        register_all_glipv2_datasets(datasets_root())


def test_quickstart_registration_is_idempotent_and_lazy(tmp_path):
    root = tmp_path / "glipv2_synthetic"
    try:
        register_quickstart_datasets(root)
        register_quickstart_datasets(root)
        assert all(name in DatasetCatalog for name in QUICKSTART_NAMES)
        assert MetadataCatalog.get("glipv2_synthetic_val").image_root == str(root / "val")
        assert MetadataCatalog.get("glipv2_synthetic_lvis_val").json_file == str(root / "annotations" / "lvis_val.json")
        assert MetadataCatalog.get("glipv2_synthetic_grounding_val").evaluator_type == "flickr30k"
        assert not root.exists()
    finally:
        for name in QUICKSTART_NAMES:
            unregister_dataset(name)


def test_library_registers_no_synthetic_data_and_never_imports_the_quick_start():
    names = ", ".join(repr(name) for name in QUICKSTART_NAMES)
    script = (
        "import sys; import glipv2_d2.data.datasets, glipv2_d2.engine.trainer, glipv2_d2.evaluation; "
        "from detectron2.data import DatasetCatalog; "
        f"assert not set(DatasetCatalog) & {{{names}}}, sorted(DatasetCatalog); "
        "assert not [m for m in sys.modules if m.startswith('glipv2_quickstart')]"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[1])
