"""ODinW: registration from the standard folders (the id-0 supercategory dropped, a missing split
named), k-shot sampling (reproducible per seed, never more than k shots of a category), and
tools/odinw.py end to end on small synthetic stand-ins with their own vocabularies."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from PIL import Image

from glipv2_d2.data.datasets.odinw import ODINW_13, odinw_dataset_name, register_odinw
from glipv2_d2.data.few_shot import sample_k_shot, shot_counts
from tools import odinw as odinw_tool

from .tiny_model import REPO, tiny_cfg

BY_NAME = {d.name: d for d in ODINW_13}
# Stand-ins: two of Table 12's folder layouts (a Roboflow export with spaces in its path, and
# Pistols' one folder with a json per split), each with its own vocabulary.
VOCABULARIES = {"Aquarium": ["fish", "jellyfish", "shark"], "Pistols": ["pistol"]}
SPLIT_SIZES = {"train": 6, "val": 2, "test": 2, "minival": 2}


def _write_split(json_file: Path, image_dir: Path, names: list[str], count: int, seed: int) -> None:
    """``count`` images of coloured rectangles, one or two boxes each, and a COCO json whose
    categories start with the Roboflow supercategory entry (id 0)."""
    rng = np.random.default_rng(seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        image = np.full((96, 128, 3), 220, dtype=np.uint8)
        file_name = f"{json_file.stem}_{index:03d}.jpg"
        for _ in range(1 + index % 2):
            x, y = int(rng.integers(0, 70)), int(rng.integers(0, 40))
            image[y:y + 40, x:x + 50] = rng.integers(0, 200, 3)
            category = 1 + int(rng.integers(0, len(names)))
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": category,
                                "bbox": [x, y, 50, 40], "area": 2000, "iscrowd": 0})
        Image.fromarray(image).save(image_dir / file_name)
        images.append({"id": index + 1, "file_name": file_name, "height": 96, "width": 128})
    categories = [{"id": 0, "name": "things", "supercategory": "none"}] + [
        {"id": i + 1, "name": name, "supercategory": "things"} for i, name in enumerate(names)
    ]
    json_file.parent.mkdir(parents=True, exist_ok=True)
    json_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def _make_stand_in(root: Path, name: str) -> None:
    dataset = BY_NAME[name]
    for seed, (split, (json_file, image_dir)) in enumerate(dataset.files(str(root)).items()):
        _write_split(Path(json_file), Path(image_dir), VOCABULARIES[name], SPLIT_SIZES[split], seed)


@pytest.fixture(scope="module")
def odinw_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    for name in VOCABULARIES:
        _make_stand_in(root, name)
    return root


def test_registration_drops_the_supercategory_and_keeps_contiguous_ids(odinw_root):
    names = register_odinw(BY_NAME["Aquarium"], odinw_root)
    assert names == [f"glipv2_odinw_aquarium_{s}" for s in ("train", "val", "test")]
    metadata = MetadataCatalog.get("glipv2_odinw_aquarium_val")
    assert metadata.thing_classes == ["fish", "jellyfish", "shark"]
    assert metadata.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}
    records = DatasetCatalog.get("glipv2_odinw_aquarium_train")
    assert len(records) == 6
    assert {a["category_id"] for r in records for a in r["annotations"]} <= {0, 1, 2}


def test_a_folder_missing_a_split_names_the_missing_file(tmp_path):
    _make_stand_in(tmp_path, "Aquarium")
    missing = Path(BY_NAME["Aquarium"].files(str(tmp_path))["val"][0])
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=rf"val split's annotation file {missing} is missing"):
        register_odinw(BY_NAME["Aquarium"], tmp_path)


def _records(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"image_id": i, "annotations": [{"category_id": int(c)} for c in rng.integers(0, 4, rng.integers(0, 4))]}
        for i in range(count)
    ]


@pytest.mark.parametrize("k", [1, 3, 5, 10])
def test_k_shot_sampling_is_reproducible_and_never_exceeds_k(k):
    records = _records(200, seed=k)
    first = sample_k_shot(records, k, seed=3)
    assert [r["image_id"] for r in first] == [r["image_id"] for r in sample_k_shot(records, k, seed=3)]
    assert [r["image_id"] for r in first] != [r["image_id"] for r in sample_k_shot(records, k, seed=30)]
    counts = shot_counts(first)
    assert max(counts.values()) <= k
    assert min(counts.values()) >= 1 and set(counts) == {0, 1, 2, 3}
    assert all(r["annotations"] for r in first)


def test_odinw_tool_runs_every_mode_and_writes_the_table(odinw_root, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pth"
    torch.save({"model": build_model(tiny_cfg()).state_dict()}, weights)
    output = tmp_path / "odinw"
    code = odinw_tool.main([
        "--config-file", str(REPO / "configs" / "quickstart" / "demo.yaml"), "--output", str(output),
        "--root", str(odinw_root), "--shots", "1", "--seeds", "3",
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(weights),
        "MODEL.LANGUAGE_BACKBONE.LOAD_PRETRAINED", "False", "MODEL.LANGUAGE_BACKBONE.NUM_HIDDEN_LAYERS", "2",
        "MODEL.DYHEAD.PRIOR_PROB", "0.5", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", "2", "SOLVER.STEP_FRACTIONS", "()", "SOLVER.WARMUP_ITERS", "0",
        "DATALOADER.NUM_WORKERS", "0", "TEST.DETECTIONS_PER_IMAGE", "20",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "zero-shot" in printed and "1-shot prompt tuning" in printed and "1-shot full fine-tuning" in printed
    with open(output / "odinw_table.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == ["method", "Aquarium", "Pistols", "Avg"]
    assert [row[0] for row in table[1:]] == ["zero-shot", "1-shot prompt tuning", "1-shot full fine-tuning"]
    for row in table[1:]:
        values = [float(v) for v in row[1:]]
        assert all(0.0 <= v <= 100.0 for v in values)
        assert values[-1] == pytest.approx(sum(values[:-1]) / 2, abs=0.011)
    prompt_file = output / "Aquarium" / "prompt_tuning_1shot_seed3" / "prompt_final.pth"
    assert prompt_file.is_file() and prompt_file.stat().st_size < 100_000
    subset = DatasetCatalog.get(odinw_dataset_name(BY_NAME["Aquarium"], "train") + "_1shot_seed3")
    assert max(shot_counts(subset).values()) == 1
