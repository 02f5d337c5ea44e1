"""Flickr30kGroundingEvaluator on a hand-made split whose recalls are worked out below, for both
MDETR protocols, plus its errors on bad input and a 2-process gloo run."""

import datetime
import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.structures import Boxes, BoxMode, Instances

from glipv2_d2.evaluation.flickr30k import NO_MATCH, Flickr30kGroundingEvaluator, first_match_ranks

FAR_AWAY = [500.0, 500.0, 510.0, 510.0]


def phrase(phrase_id, phrase_type=None):
    entry = {"phrase_id": phrase_id, "tokens_positive": [[0, 1]]}
    if phrase_type is not None:
        entry["phrase_type"] = phrase_type
    return entry


def box(xyxy, phrase_ids):
    return {"bbox": xyxy, "bbox_mode": BoxMode.XYXY_ABS, "phrase_ids": phrase_ids}


def predictions(rows):
    """rows: (phrase index, score, XYXY box)."""
    instances = Instances((480, 640))
    instances.pred_classes = torch.tensor([r[0] for r in rows], dtype=torch.long)
    instances.scores = torch.tensor([r[1] for r in rows], dtype=torch.float32)
    instances.pred_boxes = Boxes(torch.tensor([r[2] for r in rows], dtype=torch.float32).reshape(-1, 4))
    return {"instances": instances}


def image(image_id, phrases, annotations):
    return {"image_id": image_id, "height": 480, "width": 640, "phrases": phrases, "annotations": annotations}


def synthetic_split():
    """Four image-sentences. Outcome per evaluated phrase, as the 0-based rank of its first matching
    prediction (any box | merged boxes):

    image 1 people    one box, matched first                                     0 | 0
    image 1 clothing  two boxes 100 px apart (merged box 300x100): a prediction
                      on the 2nd box (IoU 1/3 with the merged box) ranks 2nd,
                      the merged box itself (IoU 1/3 with each box) ranks 3rd    1 | 2
    image 1 scene     no box: skipped, though it has the best-scored prediction  - | -
    image 2 people    the match is output first but has the 6th best score        5 | 5
    image 2 (no type) counted as "other"; no prediction at all                    miss | miss
    image 3 people    entity 30 has boxes A and B (A also serves entity 31);
                      B ranks 1st, A∪B 2nd                                        0 | 1
    image 3 bodyparts entity 31 = box A; a half-height box, IoU exactly 0.5       0 | 0
    image 3 people    a second mention of entity 30: only box A predicted         0 | miss
    image 4 other     no box: skipped
    image 4 animals   3x3 box, a 3x1 prediction: IoU 1/3 (0.5 with the legacy +1) miss | miss
    """
    clothing_second_box = [400.0, 200.0, 500.0, 300.0]
    clothing_merged = [200.0, 200.0, 500.0, 300.0]
    image_1 = image(
        1,
        [phrase(10, "people"), phrase(11, "clothing"), phrase(12, "scene")],
        [
            box([0.0, 0.0, 100.0, 100.0], [10]),
            {"bbox": [200.0, 200.0, 100.0, 100.0], "bbox_mode": BoxMode.XYWH_ABS, "phrase_ids": [11]},
            box(clothing_second_box, [11]),
        ],
    )
    output_1 = predictions(
        [
            (2, 0.95, [0.0, 0.0, 640.0, 480.0]),
            (0, 0.9, [0.0, 0.0, 100.0, 100.0]),
            (1, 0.8, [0.0, 0.0, 50.0, 50.0]),
            (1, 0.7, clothing_second_box),
            (1, 0.6, clothing_merged),
        ]
    )
    image_2 = image(2, [phrase(20, "people"), phrase(21)], [box([10.0, 10.0, 60.0, 60.0], [20]), box(FAR_AWAY, [21])])
    output_2 = predictions([(0, 0.4, [10.0, 10.0, 60.0, 60.0])] + [(0, 0.9 - 0.1 * i, FAR_AWAY) for i in range(5)])
    box_a, box_b = [0.0, 0.0, 100.0, 100.0], [300.0, 300.0, 400.0, 400.0]
    image_3 = image(
        3,
        [phrase(30, "people"), phrase(31, "bodyparts"), phrase(30, "people")],
        [box(box_a, [30, 31]), box(box_b, [30])],
    )
    output_3 = predictions(
        [
            (0, 0.9, box_b),
            (0, 0.8, [0.0, 0.0, 400.0, 400.0]),
            (1, 0.3, [0.0, 0.0, 100.0, 50.0]),
            (2, 0.4, box_a),
        ]
    )
    image_4 = image(4, [phrase(40, "other"), phrase(41, "animals")], [box([0.0, 0.0, 3.0, 3.0], [41])])
    output_4 = predictions([(0, 0.9, FAR_AWAY), (1, 0.9, [0.0, 0.0, 3.0, 1.0])])
    return [image_1, image_2, image_3, image_4], [output_1, output_2, output_3, output_4]


ANY_BOX_RECALLS = {
    "R@1": 50.0,  # 4 of 8 phrases at rank 0
    "R@5": 62.5,  # + clothing (rank 1)
    "R@10": 75.0,  # + image 2 people (rank 5)
    "R@1/animals": 0.0,
    "R@5/animals": 0.0,
    "R@10/animals": 0.0,
    "R@1/bodyparts": 100.0,
    "R@5/bodyparts": 100.0,
    "R@10/bodyparts": 100.0,
    "R@1/clothing": 0.0,
    "R@5/clothing": 100.0,
    "R@10/clothing": 100.0,
    "R@1/other": 0.0,
    "R@5/other": 0.0,
    "R@10/other": 0.0,
    "R@1/people": 75.0,  # ranks 0, 5, 0, 0
    "R@5/people": 75.0,
    "R@10/people": 100.0,
}

MERGED_BOXES_RECALLS = {
    **ANY_BOX_RECALLS,
    "R@1": 25.0,  # ranks 0, 2, 5, miss, 1, 0, miss, miss
    "R@5": 50.0,
    "R@10": 62.5,
    "R@1/people": 25.0,  # ranks 0, 5, 1, miss
    "R@5/people": 50.0,
    "R@10/people": 75.0,
}


def evaluate(evaluator, inputs, outputs):
    evaluator.reset()
    for input_dict, output in zip(inputs, outputs):
        evaluator.process([input_dict], [output])
    return evaluator.evaluate()


@pytest.mark.parametrize("merge_boxes, expected", [(False, ANY_BOX_RECALLS), (True, MERGED_BOXES_RECALLS)])
def test_recalls_of_both_protocols(merge_boxes, expected):
    results = evaluate(Flickr30kGroundingEvaluator(merge_boxes=merge_boxes, distributed=False), *synthetic_split())
    assert results == {"grounding": pytest.approx(expected)}
    assert list(results["grounding"])[:3] == ["R@1", "R@5", "R@10"]


def test_upper_bound_counts_a_match_at_any_rank():
    results = evaluate(Flickr30kGroundingEvaluator(topk=(1, -1), distributed=False), *synthetic_split())
    assert results["grounding"]["R@upper_bound"] == pytest.approx(75.0)
    assert results["grounding"]["R@upper_bound/people"] == pytest.approx(100.0)


def test_a_stricter_threshold_drops_the_half_overlap():
    results = evaluate(Flickr30kGroundingEvaluator(iou_threshold=0.6, distributed=False), *synthetic_split())
    assert results["grounding"]["R@1/bodyparts"] == 0.0
    assert results["grounding"]["R@1"] == pytest.approx(37.5)


def test_several_types_count_the_phrase_under_each():
    grounded = {**phrase(1, "people"), "phrase_types": ["people", "clothing"]}
    inputs = [image(1, [grounded], [box([0.0, 0.0, 10.0, 10.0], [1])])]
    outputs = [predictions([(0, 0.5, [0.0, 0.0, 10.0, 10.0])])]
    results = evaluate(Flickr30kGroundingEvaluator(topk=(1,), distributed=False), inputs, outputs)
    assert results == {"grounding": {"R@1": 100.0, "R@1/clothing": 100.0, "R@1/people": 100.0}}


def test_bad_phrase_type_names_the_phrase():
    inputs, outputs = synthetic_split()
    inputs[0]["phrases"][1]["phrase_type"] = 7
    with pytest.raises(ValueError, match=r"image_id 1: phrases\[1\]\['phrase_type'\]"):
        evaluate(Flickr30kGroundingEvaluator(distributed=False), inputs, outputs)


def test_first_match_ranks_breaks_score_ties_by_output_order():
    scores = torch.tensor([0.5, 0.5, 0.9, 0.5])
    pred_classes = torch.tensor([0, 0, 1, 0])
    matches = torch.tensor([[False, True], [True, False], [False, False], [True, True]])
    assert first_match_ranks(scores, pred_classes, matches).tolist() == [1, NO_MATCH]
    no_predictions = first_match_ranks(torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, 3, dtype=bool))
    assert no_predictions.tolist() == [NO_MATCH] * 3


def test_split_without_grounded_phrases_reports_nothing():
    no_boxes = [image(5, [phrase(50, "other")], [])]
    assert evaluate(Flickr30kGroundingEvaluator(distributed=False), no_boxes, [predictions([])]) == {}


def test_pred_class_outside_the_phrases_names_the_image():
    inputs, outputs = synthetic_split()
    outputs[2]["instances"].pred_classes[1] = 3
    with pytest.raises(ValueError, match=r"image_id 3: pred_classes \[3\]"):
        evaluate(Flickr30kGroundingEvaluator(distributed=False), inputs, outputs)


def test_box_of_an_unknown_phrase_names_the_annotation():
    inputs, outputs = synthetic_split()
    inputs[1]["annotations"][1]["phrase_ids"] = [21, 99]
    with pytest.raises(ValueError, match=r"image_id 2, annotations\[1\]: phrase_ids \[99\]"):
        evaluate(Flickr30kGroundingEvaluator(distributed=False), inputs, outputs)


def test_input_stripped_of_annotations_says_so():
    inputs, outputs = synthetic_split()
    del inputs[0]["annotations"]
    with pytest.raises(KeyError, match="image_id 1: the input has no 'annotations'"):
        evaluate(Flickr30kGroundingEvaluator(distributed=False), inputs, outputs)


def test_image_evaluated_twice_is_refused():
    inputs, outputs = synthetic_split()
    with pytest.raises(ValueError, match=r"image_ids \[2\] were evaluated more than once"):
        evaluate(Flickr30kGroundingEvaluator(distributed=False), inputs + inputs[1:2], outputs + outputs[1:2])


@pytest.mark.parametrize("topk", [(), (0,), (1, 1), (-2,)])
def test_bad_topk_is_refused(topk):
    with pytest.raises(ValueError, match="topk"):
        Flickr30kGroundingEvaluator(topk=topk)


def _evaluate_on_rank(rank: int, port: int, result_dir: str) -> None:
    timeout = datetime.timedelta(seconds=60)  # a hang in gather fails the test instead of stalling it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timeout)
    try:
        inputs, outputs = synthetic_split()
        results = evaluate(Flickr30kGroundingEvaluator(merge_boxes=True), inputs[rank::2], outputs[rank::2])
        with open(f"{result_dir}/rank{rank}.json", "w") as file:
            json.dump(results, file)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_gather_on_the_main_one(tmp_path):
    """Each rank scores half the split; forked ranks inherit the imports (spawn re-imports for ~15 s)."""
    mp.start_processes(_evaluate_on_rank, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    main = json.loads((tmp_path / "rank0.json").read_text())
    assert main == {"grounding": pytest.approx(MERGED_BOXES_RECALLS)}
    assert json.loads((tmp_path / "rank1.json").read_text()) == {}
