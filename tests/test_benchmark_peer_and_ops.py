"""tools/benchmark.py --peer and --profile-ops on CPU with tiny models, so the GPU run is known to work."""

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, GroundingDinoConfig, SwinConfig

from glipv2_d2.benchmarking import peers
from glipv2_d2.benchmarking.peers import top_detections
from tools.benchmark import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = ["--config-file", str(REPO / "configs" / "quickstart" / "demo.yaml"), "--device", "cpu",
              "--iters", "1", "--warmup", "0", "--height", "64", "--width", "96"]
LONG_PROMPT = ["MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN", "256"]


def tiny_grounding_dino_config() -> GroundingDinoConfig:
    """Grounding DINO's structure at toy width and depth (bert-base-uncased vocabulary kept for the
    prompt's token ids), 120 queries so that 100 can be selected; two decoder layers, since
    transformers ties the later layers' box heads to the first and fails without a later one."""
    return GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], out_indices=[2, 3, 4]),
        text_config=BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=120,
    )


@pytest.fixture
def tiny_peer(monkeypatch):
    monkeypatch.setitem(peers.PEER_CONFIGS, "grounding-dino", tiny_grounding_dino_config)


def test_peer_rows_carry_both_timings_and_their_ratio(tmp_path, tiny_peer):
    out, lines = tmp_path / "bench.json", tmp_path / "bench.jsonl"
    argv = [*QUICKSTART, "--precision", "fp32,bf16", "--peer", "grounding-dino", "--json", str(out),
            "--json-lines", str(lines), *LONG_PROMPT]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert [r["precision"] for r in report["peer_rows"]] == ["fp32", "bf16"]
    for ours, peer in zip(report["rows"], report["peer_rows"], strict=True):
        assert peer["model"] == "grounding-dino" and peer["detections"] == 100
        assert ours["ms_per_batch_median"] > 0 and peer["ms_per_batch_median"] > 0
        assert peer["glipv2_ms_per_batch_median"] == ours["ms_per_batch_median"]
        assert peer["ratio_to_glipv2"] == pytest.approx(peer["ms_per_batch_median"] / ours["ms_per_batch_median"])
        assert peer["prompt_tokens"] > 128  # the 80 COCO names, as GLIPv2 reads them
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    speed = [(r["model"], r["precision"]) for r in records if r["table"] == "speed"]
    assert speed == [("glipv2", "fp32"), ("glipv2", "bf16"), ("grounding-dino", "fp32"), ("grounding-dino", "bf16")]


def test_peer_selects_100_boxes_inside_the_image(tiny_peer):
    peer = peers.build_peer("grounding-dino", "cpu")
    generator = torch.Generator().manual_seed(0)
    prompt = type("Prompt", (), {"input_ids": torch.tensor([101, 2711, 1012, 3899, 1012, 102]),
                                 "attention_mask": torch.ones(6, dtype=torch.long)})()
    inputs = [{"image": torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8, generator=generator), "prompt": prompt}
              for _ in range(2)]
    with torch.inference_mode():
        results = peer(inputs)
    assert len(results) == 2
    for result in results:
        instances = result["instances"]
        boxes = instances.pred_boxes.tensor
        assert boxes.shape == (100, 4) and instances.scores.shape == (100,)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= 128).all() and (boxes[:, 3] <= 96).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
        assert (instances.pred_classes < 6).all()  # a token of the prompt, never the -inf padding
        assert (instances.scores[:-1] >= instances.scores[1:]).all()


def test_top_detections_converts_cxcywh_to_clipped_pixels():
    logits = torch.full((1, 3, 4), float("-inf"))
    logits[0, :, :2] = torch.tensor([[0.0, 1.0], [3.0, -1.0], [-2.0, -3.0]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.5, 0.4, 0.2], [0.5, 0.5, 1.0, 1.0]]])
    scores, tokens, xyxy = top_detections(logits, boxes, height=100, width=200, k=2)
    assert scores[0].tolist() == pytest.approx([torch.sigmoid(torch.tensor(3.0)).item(),
                                                torch.sigmoid(torch.tensor(1.0)).item()])
    assert tokens.tolist() == [[0, 1]]
    torch.testing.assert_close(xyxy[0], torch.tensor([[0.0, 40.0, 60.0, 60.0], [80.0, 30.0, 120.0, 70.0]]))


def test_profile_ops_lists_real_ops_of_each_piece(tmp_path):
    """torchvision's deformable conv (the CPU default is a gather + matmul) so that its op is named."""
    out, lines = tmp_path / "bench.json", tmp_path / "bench.jsonl"
    argv = [*QUICKSTART, "--precision", "fp32", "--profile-ops", "--json", str(out), "--json-lines", str(lines),
            *LONG_PROMPT, "MODEL.DYHEAD.DEFORM_CONV_IMPL", "torchvision"]
    assert main(argv) == 0
    ops = json.loads(out.read_text())["op_profile"]
    assert list(ops) == ["fusion layer 0", "prediction head", "post-processing"]
    for rows in ops.values():
        assert rows and all(r["self_ms"] > 0 and r["calls"] >= 1 for r in rows)
        assert sum(r["share"] for r in rows) <= 100 + 1e-6
    assert any("deform_conv" in r["op"] for r in ops["fusion layer 0"])
    assert any(name in r["op"] for r in ops["prediction head"] for name in ("conv", "mm", "matmul", "einsum"))
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    assert {r["piece"] for r in records if r["table"] == "ops"} == set(ops)


@pytest.mark.parametrize(("height", "width"), [(96, 128), (100, 130)])
def test_position_count_is_what_the_peer_encodes(height, width):
    """check_enough_positions counts the encoder's image tokens exactly (odd sizes round up)."""
    config = tiny_grounding_dino_config()
    torch.manual_seed(0)
    detector = peers.GroundingDinoForObjectDetection(config).eval()
    with torch.inference_mode():
        outputs = detector(pixel_values=torch.zeros(1, 3, height, width), input_ids=torch.tensor([[101, 2711, 102]]))
    encoded = outputs.encoder_last_hidden_state_vision.shape[1]
    small = tiny_grounding_dino_config()
    small.num_queries = encoded + 1
    peers.check_enough_positions(config, height, width)
    with pytest.raises(ValueError, match=rf"{height}x{width} image gives {encoded} image positions"):
        peers.check_enough_positions(small, height, width)
