"""The exported fixed-prompt detector gives the eager model's detections exactly, on an image other
than the one it was traced on, when loaded in a process with only torch and torchvision."""

import json
import subprocess
import sys

import torch

from glipv2_d2.engine.predictor import GLIPv2Predictor
from glipv2_d2.export import export_torchscript
from tools import export as export_tool

from .tiny_model import tiny_cfg

RUN_WITHOUT_PACKAGE = """
import sys, torch, torchvision
detector = torch.jit.load(sys.argv[1])
boxes, scores, labels = detector(torch.load(sys.argv[2]))
assert not any(name.startswith(("glipv2_d2", "detectron2")) for name in sys.modules), "package imported"
torch.save({"boxes": boxes, "scores": scores, "labels": labels}, sys.argv[3])
"""


def test_exported_detections_equal_the_eager_models(tmp_path, single_thread):
    predictor = GLIPv2Predictor(tiny_cfg())
    prompt = predictor.build_prompts(["red circle", "blue square"])[0]
    generator = torch.Generator().manual_seed(0)
    traced_on, checked_on = (torch.randint(0, 256, (3, 128, 160), generator=generator).float() for _ in range(2))
    info = export_torchscript(predictor.model, prompt, traced_on, tmp_path / "detector.pt")
    assert info["input_size"] == [128, 160] and info["label_names"] == {"0": "red circle", "1": "blue square"}

    torch.save(checked_on, tmp_path / "image.pt")
    subprocess.run([sys.executable, "-c", RUN_WITHOUT_PACKAGE, str(tmp_path / "detector.pt"),
                    str(tmp_path / "image.pt"), str(tmp_path / "out.pt")], check=True, cwd=tmp_path)
    exported = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        eager = predictor.model.inference([{"image": checked_on, "prompt": prompt}], do_postprocess=False)[0]
    eager = eager["instances"]
    assert len(eager) > 10
    assert torch.equal(exported["labels"], eager.pred_classes)
    assert torch.allclose(exported["boxes"], eager.pred_boxes.tensor, atol=1e-4)
    assert torch.allclose(exported["scores"], eager.scores, atol=1e-6)


def test_export_tool_writes_the_file_and_its_sidecar(tmp_path, monkeypatch, single_thread):
    monkeypatch.setattr(export_tool, "setup_cfg", lambda *args, **kwargs: tiny_cfg())
    output = tmp_path / "shapes.pt"
    assert export_tool.main(["--config-file", "unused.yaml", "--caption", "a red circle near a blue square",
                             "--phrases", "red circle,blue square", "--height", "96", "--width", "128",
                             "--output", str(output)]) == 0
    info = json.loads((tmp_path / "shapes.pt.json").read_text())
    assert info["input_size"] == [96, 128] and info["prompt"] == "a red circle near a blue square"
    boxes, scores, labels = torch.jit.load(str(output))(torch.full((3, 96, 128), 100.0))
    assert boxes.shape == (len(scores), 4) and set(labels.tolist()) <= {0, 1}
