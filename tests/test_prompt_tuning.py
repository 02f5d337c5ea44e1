"""Prompt tuning (official language_prompt_v2): only the offset learns, every other parameter and
buffer stays bit for bit; a tuned prompt runs without the text encoder; its file reloads to the same
detections and refuses another model or another prompt, naming both."""

import dataclasses
import json

import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

from glipv2_d2.data.prompt_builder import PromptBuilder
from glipv2_d2.engine.predictor import GLIPv2Predictor
from glipv2_d2.modeling.prompt_file import check_same_prompt, load_prompt_file, save_prompt_file
from glipv2_d2.modeling.prompt_tuning import PromptTuningModel

from .test_training_step import NAMES, tiny_batch
from .tiny_model import REPO, tiny_cfg


def _labelled_batch(model) -> list[dict]:
    """tiny_batch with each box's label (the mapper's gt_classes), read by prompt tuning."""
    batch = tiny_batch(model)
    for x, labels in zip(batch, ([0, 1], [2])):
        x["instances"].gt_classes = torch.tensor(labels)
    return batch


def _tuned(steps: int = 3):
    torch.manual_seed(0)
    detector = build_model(tiny_cfg())
    prompt = PromptBuilder(tiny_cfg(), detector.tokenizer).categories(list(NAMES.values()))[0]
    model = PromptTuningModel(detector, prompt).train()
    before = {name: value.detach().clone() for name, value in detector.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    batch = _labelled_batch(detector)
    for _ in range(steps):
        loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, before, batch


@pytest.fixture(scope="module")
def tuned():
    return _tuned()


def _images(batch: list[dict]) -> list[dict]:
    return [{"image": x["image"], "height": 128, "width": 128} for x in batch]


def test_only_the_offset_trains_and_the_network_stays_bit_for_bit(tuned):
    model, before, _ = tuned
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["prompt.offset"]
    after = model.detector.state_dict()
    assert before.keys() == after.keys()
    assert [name for name in before if not torch.equal(before[name], after[name])] == []
    assert float(model.prompt.offset.abs().max()) > 1e-3
    assert not model.detector.fusion.training and model.training


def test_a_zero_offset_reproduces_the_plain_prompt_exactly():
    torch.manual_seed(0)
    detector = build_model(tiny_cfg()).eval()
    prompt = PromptBuilder(tiny_cfg(), detector.tokenizer).categories(list(NAMES.values()))[0]
    untuned = PromptTuningModel(detector, prompt).eval()
    images = _images(_labelled_batch(detector))
    with torch.no_grad():
        plain = detector.inference([{**x, "prompt": prompt} for x in images])
        through_offset = untuned(images)
    for a, b in zip(plain, through_offset):
        assert len(a["instances"]) > 0
        assert torch.equal(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)
        assert torch.equal(a["instances"].scores, b["instances"].scores)


def test_the_saved_prompt_reloads_to_identical_detections_without_the_text_encoder(tuned, tmp_path):
    model, _, batch = tuned
    model.eval()
    path = tmp_path / "task.pth"
    save_prompt_file(path, model.prompt, model.detector)
    assert path.stat().st_size < 200_000
    calls = []
    hook = model.detector.language_backbone.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            in_memory = model(_images(batch))
            prompt = load_prompt_file(path, model.detector)
            from_file = model.detector.inference([{**x, "prompt": prompt} for x in _images(batch)])
    finally:
        hook.remove()
        model.train()
    assert calls == []
    for a, b in zip(in_memory, from_file):
        assert len(a["instances"]) > 0
        assert torch.equal(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)
        assert torch.equal(a["instances"].scores, b["instances"].scores)


def test_a_prompt_file_for_other_weights_names_both_models(tuned, tmp_path):
    model, _, _ = tuned
    path = tmp_path / "task.pth"
    save_prompt_file(path, model.prompt, model.detector)
    torch.manual_seed(1)
    other = build_model(tiny_cfg())
    with pytest.raises(ValueError, match=r"made for another model: BertTextEncoder .*weights [0-9a-f]{16}; "
                                         r"this model is BertTextEncoder .*weights [0-9a-f]{16}"):
        load_prompt_file(path, other)


def test_a_prompt_file_for_another_prompt_names_both_prompts(tuned):
    model, _, _ = tuned
    tuned_prompt = model.prompt.tuned()
    other = PromptBuilder(tiny_cfg(), model.tokenizer).categories(["red square", "blue circle"])[0]
    with pytest.raises(ValueError, match=r"task.pth was tuned on the prompt 'red square. blue circle. green "
                                         r"triangle' .* but dataset 'x' reads the prompt 'red square. blue circle' "):
        check_same_prompt(tuned_prompt, other, "task.pth", "dataset 'x'")
    check_same_prompt(tuned_prompt, dataclasses.replace(tuned_prompt, text_embedding=None), "task.pth", "x")


def test_a_tuned_prompt_and_a_plain_one_share_a_batch(tuned):
    model, _, batch = tuned
    detector = model.detector.eval()
    tuned_prompt = model.prompt.tuned().text_embedding.detach()
    prompt = dataclasses.replace(model.prompt.prompt, text_embedding=tuned_prompt)
    plain = PromptBuilder(tiny_cfg(), detector.tokenizer).categories(["red square"])[0]
    images = _images(batch)
    with torch.no_grad():
        mixed = detector.inference([{**images[0], "prompt": prompt}, {**images[1], "prompt": plain}])
        alone = detector.inference([{**images[1], "prompt": plain}])
    assert torch.allclose(mixed[1]["instances"].scores, alone[0]["instances"].scores, atol=1e-5)
    model.train()


def test_one_predictor_serves_several_tasks_prompt_files(tuned, tmp_path):
    model, _, batch = tuned
    weights = tmp_path / "weights.pth"
    torch.save({"model": model.detector.state_dict()}, weights)
    shapes = tmp_path / "shapes.pth"
    save_prompt_file(shapes, model.prompt, model.detector)
    other_task = PromptTuningModel(model.detector, PromptBuilder(tiny_cfg(), model.tokenizer).categories(["dog"])[0])
    with torch.no_grad():
        other_task.prompt.offset.add_(0.1)
    dogs = tmp_path / "dogs.pth"
    save_prompt_file(dogs, other_task.prompt, model.detector)
    cfg = tiny_cfg()
    cfg.MODEL.WEIGHTS = str(weights)
    predictor = GLIPv2Predictor(cfg)
    image = batch[0]["image"].permute(1, 2, 0).numpy()
    calls = []
    predictor.model.language_backbone.register_forward_hook(lambda *args: calls.append(1))
    by_shapes = predictor(image, prompt_file=shapes)
    by_dogs = predictor(image, prompt_file=dogs)
    assert calls == []
    assert set(by_shapes.pred_phrases) <= set(NAMES.values()) and len(by_shapes) > 0
    assert set(by_dogs.pred_phrases) == {"dog"}
    same = predictor(image, list(NAMES.values()), prompt_file=shapes)
    assert torch.equal(same.scores, by_shapes.scores)
    with pytest.raises(ValueError, match=r"prompt file .*dogs.pth was tuned on the prompt 'dog' .* but the call "
                                         r"reads the prompt 'cat'"):
        predictor(image, ["cat"], prompt_file=dogs)
    model.train()


def test_demo_reads_its_categories_with_a_prompt_file(tuned, tmp_path, capsys):
    from tools import demo

    model, _, batch = tuned
    weights, prompt_file = tmp_path / "weights.pth", tmp_path / "shapes.pth"
    torch.save({"model": model.detector.state_dict()}, weights)
    save_prompt_file(prompt_file, model.prompt, model.detector)
    image = tmp_path / "scene.png"
    Image.fromarray(batch[0]["image"].permute(1, 2, 0).numpy()[:, :, ::-1]).save(image)
    tiny = ["MODEL.WEIGHTS", str(weights), "MODEL.LANGUAGE_BACKBONE.LOAD_PRETRAINED", "False",
            "MODEL.LANGUAGE_BACKBONE.NUM_HIDDEN_LAYERS", "2", "MODEL.DYHEAD.PRIOR_PROB", "0.5",
            "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192"]

    def run(categories: str, output: str) -> int:
        return demo.main(["--config-file", str(REPO / "configs" / "quickstart" / "demo.yaml"), "--input", str(image),
                          "--categories", categories, "--prompt-file", str(prompt_file), "--cpu",
                          "--output", str(tmp_path / output), *tiny])

    assert run(",".join(NAMES.values()), "out") == 0
    record = json.loads((tmp_path / "out" / "scene.png.json").read_text())
    assert record["detections"] and {d["phrase"] for d in record["detections"]} <= set(NAMES.values())
    assert run("cat", "bad") == 1
    assert "was tuned on the prompt 'red square. blue circle. green triangle'" in capsys.readouterr().err
    model.train()
