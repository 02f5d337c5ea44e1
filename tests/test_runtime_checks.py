"""Run-time guards of issue 10: chunked vocabularies keep the per-image detection limit after merging,
config errors name their key at load time, DATASETS.REGISTER trains on a COCO json without Python,
and the README's Python snippet runs."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from detectron2.structures import Boxes, Instances
from PIL import Image
from torch import nn

from glipv2_d2.config import check_device_available, setup_cfg
from glipv2_d2.data.datasets import unregister_dataset
from glipv2_d2.engine import launcher
from glipv2_d2.engine.predictor import GLIPv2Predictor
from glipv2_d2.engine.trainer import GLIPv2Trainer
from glipv2_d2.evaluation.prompted_inference import PromptedDetector, merge_chunk_detections

from .tiny_model import REPO, tiny_cfg

QUICKSTART = REPO / "configs" / "quickstart" / "train.yaml"
PRETRAIN = REPO / "configs" / "quickstart" / "pretrain.yaml"


def detections(scores: list[float], first_label: int = 0) -> Instances:
    result = Instances((100, 100))
    result.pred_boxes = Boxes(torch.tensor([[0.0, 0.0, 10.0 + i, 10.0 + i] for i in range(len(scores))]))
    result.scores = torch.tensor(scores)
    result.pred_classes = torch.arange(first_label, first_label + len(scores))
    return result


def test_merge_keeps_the_best_by_score_up_to_the_cap():
    parts = [detections([0.9, 0.2, 0.5]), detections([0.8, 0.1, 0.7], first_label=3)]
    merged = merge_chunk_detections(parts, 3)
    assert merged.scores.tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert merged.pred_classes.tolist() == [0, 3, 5]
    assert merged.pred_boxes.tensor[:, 2].tolist() == [10.0, 10.0, 12.0]  # boxes follow their scores
    assert len(merge_chunk_detections(parts, None)) == len(merge_chunk_detections(parts, -1)) == 6


def test_merge_leaves_one_chunk_as_the_model_gave_it():
    single = detections([0.9, 0.2, 0.5, 0.4])
    assert merge_chunk_detections([single], 2) is single


class FixedOutputModel(nn.Module):
    """Answers every prompt (here: a string) with its preset detections, for every image, and
    counts the detections it is asked to finish (as GLIPv2's heads paste masks there)."""

    def __init__(self, outputs: dict[str, Instances]):
        super().__init__()
        self.outputs = outputs
        self.finished: list[int] = []

    def inference_over_prompts(self, batched_inputs: list[dict], prompts) -> list[list[Instances]]:
        return [[self.outputs[prompt] for prompt in prompts] for _ in batched_inputs]

    def finish_instances(self, instances: Instances) -> Instances:
        self.finished.append(len(instances))
        return instances


def test_prompted_detector_caps_merged_chunks_and_fixed_ap_keeps_all():
    outputs = {"a": detections([0.3, 0.6]), "b": detections([0.9, 0.1], first_label=2)}
    model = FixedOutputModel(outputs)
    capped = PromptedDetector(model, ["a", "b"], max_detections_per_image=2)
    result = capped([{"image": None}, {"image": None}])
    assert [r["instances"].scores.tolist() for r in result] == [pytest.approx([0.9, 0.6])] * 2
    assert model.finished == [2, 2]  # output-size fields are made for the kept detections only
    uncapped = PromptedDetector(FixedOutputModel(outputs), ["a", "b"])([{"image": None}])
    assert len(uncapped[0]["instances"]) == 4


@pytest.fixture(scope="module")
def predictor():
    cfg = tiny_cfg()
    cfg.MODEL.ATSS.DETECTIONS_PER_IMG = 300
    cfg.TEST.PROMPT_CHUNK_SIZE = 2
    torch.manual_seed(0)
    return GLIPv2Predictor(cfg, batch_size=4)


def test_predictor_limits_a_chunked_vocabulary_to_the_best_per_image(predictor):
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    names = [f"{colour} {shape}" for colour in ("red", "green", "blue") for shape in ("circle", "square", "cube")]
    predictor.cfg.TEST.DETECTIONS_PER_IMAGE = -1
    everything = predictor(image, names)
    cap = 7
    assert len(everything) > cap and len(predictor.build_prompts(names)) == 5
    predictor.cfg.TEST.DETECTIONS_PER_IMAGE = cap
    kept = predictor(image, names)
    assert len(kept) == cap
    assert kept.scores.tolist() == pytest.approx(everything.scores.sort(descending=True).values[:cap].tolist())
    assert list(kept.pred_phrases) == [names[int(c)] for c in kept.pred_classes]
    one_chunk = predictor(image, names[:2])
    assert len(one_chunk) > cap  # an unchunked prompt keeps the model's own cap (DETECTIONS_PER_IMG)


@pytest.mark.parametrize(
    ("config", "max_iter"), [(QUICKSTART, "0"), (QUICKSTART, "1"), (PRETRAIN, "2"), (PRETRAIN, "3")]
)
def test_schedule_too_short_for_its_steps_is_a_config_error(config, max_iter):
    with pytest.raises(ValueError, match=r"SOLVER\.MAX_ITER"):
        setup_cfg(config, ["SOLVER.MAX_ITER", max_iter])


def test_shortest_valid_schedules_load():
    assert setup_cfg(QUICKSTART, ["SOLVER.MAX_ITER", "2"]).SOLVER.STEPS == (1,)
    assert setup_cfg(PRETRAIN, ["SOLVER.MAX_ITER", "5"]).SOLVER.STEPS == (3, 4)
    assert setup_cfg(QUICKSTART, ["SOLVER.MAX_ITER", "1", "SOLVER.STEP_FRACTIONS", "()"]).SOLVER.MAX_ITER == 1


def test_cuda_without_gpu_says_use_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = setup_cfg(QUICKSTART, ["MODEL.DEVICE", "cuda"])
    for run in (lambda: check_device_available(cfg), lambda: GLIPv2Predictor(cfg)):
        with pytest.raises(ValueError, match="no GPU; use MODEL.DEVICE cpu"):
            run()
    monkeypatch.setattr(launcher, "default_setup", lambda cfg, args: None)
    args = default_argument_parser().parse_args(["--config-file", str(QUICKSTART), "MODEL.DEVICE", "cuda:0"])
    with pytest.raises(ValueError, match="no GPU; use MODEL.DEVICE cpu"):
        launcher.setup(args)
    check_device_available(setup_cfg(QUICKSTART, ["MODEL.DEVICE", "cpu"]))
    with pytest.raises(ValueError, match="MODEL.DEVICE 'gpu0'"):
        check_device_available(setup_cfg(QUICKSTART, ["MODEL.DEVICE", "gpu0"]))


def write_coco_set(root: Path) -> tuple[str, str]:
    images = root / "images"
    images.mkdir()
    records, annotations = [], []
    for index in range(2):
        pixels = np.full((96, 128, 3), 40, dtype=np.uint8)
        pixels[20:60, 30 + 20 * index:80 + 20 * index] = (220, 30, 30)
        Image.fromarray(pixels).save(images / f"{index}.png")
        records.append({"id": index + 1, "file_name": f"{index}.png", "height": 96, "width": 128})
        annotations.append({"id": index + 1, "image_id": index + 1, "category_id": 7, "iscrowd": 0,
                            "bbox": [30.0 + 20 * index, 20.0, 50.0, 40.0], "area": 2000.0})
    categories = [{"id": 7, "name": "red box"}, {"id": 9, "name": "green disk"}]
    json_file = root / "train.json"
    json_file.write_text(json.dumps({"images": records, "annotations": annotations, "categories": categories}))
    return str(json_file), str(images)


@pytest.fixture
def coco_set(tmp_path):
    json_file, image_root = write_coco_set(tmp_path)
    yield json_file, image_root
    unregister_dataset("mine")


def test_register_key_registers_a_coco_json(coco_set):
    json_file, image_root = coco_set
    cfg = setup_cfg(QUICKSTART, ["DATASETS.REGISTER", f'("mine:{json_file}:{image_root}",)'])
    launcher.register_config_datasets(cfg)
    assert MetadataCatalog.get("mine").thing_classes == ["red box", "green disk"]
    dicts = DatasetCatalog.get("mine")
    assert [d["file_name"] for d in dicts] == [str(Path(image_root) / f"{i}.png") for i in range(2)]
    assert [a["bbox"] for d in dicts for a in d["annotations"]] == [[30.0, 20.0, 50.0, 40.0], [50.0, 20.0, 50.0, 40.0]]
    assert {a["category_id"] for d in dicts for a in d["annotations"]} == {0}


@pytest.mark.parametrize(
    ("entry", "error", "message"),
    [
        ("mine:{json}", ValueError, "name:json_file:image_root"),
        ("mine:{json}:{images}:extra", ValueError, "three non-empty parts"),
        (":{json}:{images}", ValueError, "three non-empty parts"),
        ("mine:{images}/missing.json:{images}", FileNotFoundError, "missing.json"),
        ("mine:{json}:{images}/nowhere", FileNotFoundError, "nowhere"),
    ],
)
def test_malformed_register_entry_is_named(coco_set, entry, error, message):
    json_file, image_root = coco_set
    entry = entry.format(json=json_file, images=image_root)
    cfg = setup_cfg(QUICKSTART, ["DATASETS.REGISTER", f"({entry!r},)"])
    with pytest.raises(error, match=re.escape(message)) as raised:
        launcher.register_config_datasets(cfg)
    assert "DATASETS.REGISTER" in str(raised.value) and entry in str(raised.value)


def test_train_net_trains_on_a_registered_json(coco_set, tmp_path, monkeypatch):
    json_file, image_root = coco_set
    monkeypatch.setattr(launcher, "default_setup", lambda cfg, args: None)
    overrides = [
        "MODEL.DEVICE", "cpu", "MODEL.LANGUAGE_BACKBONE.LOAD_PRETRAINED", "False",
        "MODEL.LANGUAGE_BACKBONE.NUM_HIDDEN_LAYERS", "2", "INPUT.MIN_SIZE_TRAIN", "(96,)",
        "INPUT.MAX_SIZE_TRAIN", "128", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
        "SOLVER.STEP_FRACTIONS", "()", "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()",
        "DATASETS.REGISTER", f'("mine:{json_file}:{image_root}",)', "DATASETS.TRAIN", '("mine",)',
        "OUTPUT_DIR", str(tmp_path / "out"),
    ]
    config = str(REPO / "configs" / "quickstart" / "demo.yaml")
    args = default_argument_parser().parse_args(["--config-file", config, *overrides])
    launcher.main(args)
    assert (tmp_path / "out" / "model_final.pth").is_file()


def test_train_net_help_describes_the_project(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["train_net.py", "--help"])
    with pytest.raises(SystemExit):
        launcher.run_from_command_line()
    help_text = capsys.readouterr().out
    assert "GLIPv2" in help_text and "DATASETS.REGISTER" in help_text and "configs/quickstart/train.yaml" in help_text


def readme_python_snippet() -> str:
    readme = (REPO / "README.md").read_text()
    return re.search(r"From Python.*?```python\n(.*?)```", readme, re.S).group(1)


def test_readme_python_snippet_runs(tmp_path, monkeypatch):
    """The snippet as written, with the trained quick-start weights and val image it names swapped for
    a random initialisation and an image of ours, so the test needs neither `make quickstart` nor a GPU."""
    snippet = readme_python_snippet()
    assert '"MODEL.DEVICE", device' in snippet and "output/quickstart/model_final.pth" in snippet
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(photo)
    snippet = snippet.replace("output/quickstart/model_final.pth", "")
    snippet = snippet.replace("datasets/glipv2_synthetic/val/000001.png", str(photo))
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert isinstance(namespace["instances"], Instances) and len(namespace["results"]) == 2
    assert set(namespace["instances"].pred_phrases) <= {"red circle", "blue square"}


def test_amp_training_on_the_cpu_is_refused_naming_the_keys():
    cfg = tiny_cfg()
    cfg.SOLVER.AMP.ENABLED = True
    with pytest.raises(ValueError, match=r"SOLVER.AMP.ENABLED .* MODEL.DEVICE is 'cpu'"):
        GLIPv2Trainer.build_step_trainer(cfg, nn.Linear(2, 2), [], None)
