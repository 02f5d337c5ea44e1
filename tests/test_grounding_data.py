"""MDETR-format grounding / caption data and the GroundingMapper: records, phrases, spans, tokens."""

import json
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from glipv2_d2.data.datasets.mdetr import (
    load_mdetr_json,
    parse_flickr_sentence,
    register_mdetr_datasets,
    register_mdetr_grounding,
)
from glipv2_d2.data.grounding_mapper import GroundingMapper, swap_left_right
from glipv2_d2.modeling.language import build_tokenizer
from glipv2_quickstart import register_synthetic_grounding

from .conftest import half_red_half_blue_png
from .tiny_model import base_cfg

WIDTH, HEIGHT = 64, 48
GOATS = "Two girls feed a goat while the goat eats ."  # "Two girls" [0, 9), "a goat" [15, 21), "the goat" [28, 36)


def _anno(anno_id, image_id, tokens_positive, **extra):
    return {
        "id": anno_id,
        "image_id": image_id,
        "category_id": 1,
        "bbox": [1, 2, 10, 20],
        "iscrowd": 0,
        "tokens_positive": tokens_positive,
        **extra,
    }


def _image(image_id, caption, **extra):
    return {
        "id": image_id,
        "file_name": f"{image_id}.jpg",
        "height": HEIGHT,
        "width": WIDTH,
        "caption": caption,
        **extra,
    }


def _write(path: Path, images, annotations) -> str:
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture(scope="module")
def mdetr_json(tmp_path_factory) -> str:
    """Four sentences: Flickr-style (phrase list, raw phrase ids numbered otherwise), ids only, neither, empty."""
    flickr = _image(
        0,
        GOATS,
        height=str(HEIGHT),  # as in MDETR's Flickr30K files
        width=str(WIDTH),
        dataset_name="flickr",
        sentence_id=0,
        original_img_id=1000,
        tokens_negative=[[0, len(GOATS)]],
        tokens_positive_eval=[[[0, 9]], [[15, 21]], [[28, 36]]],
    )
    annotations = [
        _anno(1, 0, [[0, 9]], phrase_ids=5),  # two boxes for "Two girls"
        _anno(2, 0, [[0, 9]], phrase_ids=5),
        _anno(3, 0, [[15, 21], [28, 36]], phrase_ids=[7, 8]),  # the goat box, shared by two phrases
        _anno(4, 1, [[0, 10]], phrase_ids=[3]),
        _anno(5, 1, [[0, 10]], phrase_ids=[3]),
        _anno(6, 1, [[0, 10], [15, 26]], phrase_ids=[3, 9]),
        _anno(7, 1, [[15, 26]], phrase_ids=[9]),
        _anno(8, 2, [[12, 19]]),
        _anno(9, 2, [[0, 7]]),
        _anno(10, 2, [[0, 7]]),
        _anno(11, 2, []),  # an object the sentence does not mention
    ]
    images = [
        flickr,
        _image(1, "a red ball and a blue cube"),
        _image(2, "the cat on the left"),
        _image(3, "nothing is boxed here"),
    ]
    return _write(tmp_path_factory.mktemp("mdetr") / "tiny.json", images, annotations)


@pytest.fixture(scope="module")
def records(mdetr_json) -> dict:
    return {r["image_id"]: r for r in load_mdetr_json(mdetr_json, "/images")}


# --- loader --------------------------------------------------------------------------------------


def test_flickr_style_record_contract(records):
    record = records[0]
    assert record["file_name"] == "/images/0.jpg"
    assert (record["height"], record["width"]) == (HEIGHT, WIDTH)  # strings in the json
    assert record["task"] == "grounding" and record["weak"] is False and record["caption"] == GOATS
    assert (record["dataset_name"], record["sentence_id"], record["original_img_id"]) == ("flickr", 0, 1000)
    assert "tokens_positive_eval" not in record and "tokens_negative" not in record
    assert [p["tokens_positive"] for p in record["phrases"]] == [[[0, 9]], [[15, 21]], [[28, 36]]]
    assert [p["phrase_id"] for p in record["phrases"]] == [0, 1, 2]
    assert {p["phrase_type"] for p in record["phrases"]} == {"other"}
    annos = record["annotations"]
    assert [a["phrase_ids"] for a in annos] == [[0], [0], [1, 2]]  # spans decide, not the raw ids
    assert all(a["bbox_mode"] == BoxMode.XYWH_ABS and a["category_id"] == 0 for a in annos)
    assert annos[0]["bbox"] == [1.0, 2.0, 10.0, 20.0]


def test_raw_phrase_ids_group_boxes_when_there_is_no_phrase_list(records):
    record = records[1]
    assert [p["tokens_positive"] for p in record["phrases"]] == [[[0, 10]], [[15, 26]]]
    assert [a["phrase_ids"] for a in record["annotations"]] == [[0], [0], [0, 1], [1]]


def test_identical_spans_form_one_phrase_and_unmentioned_boxes_none(records):
    record = records[2]
    assert [p["tokens_positive"] for p in record["phrases"]] == [[[0, 7]], [[12, 19]]]  # caption order
    assert [a["phrase_ids"] for a in record["annotations"]] == [[1], [0], [0], []]


def test_records_without_boxes_are_dropped_unless_kept(mdetr_json, records):
    assert sorted(records) == [0, 1, 2]
    kept = load_mdetr_json(mdetr_json, "/images", keep_empty=True)
    empty = [r for r in kept if r["image_id"] == 3]
    assert len(kept) == 4 and empty[0]["annotations"] == [] and empty[0]["phrases"] == []


def test_phrase_types_from_a_sentences_folder(mdetr_json, tmp_path):
    line = "[/EN#1/people/other Two girls] feed [/EN#2/animals a goat] while [/EN#2/animals the goat] eats ."
    (tmp_path / "1000.txt").write_text(line + "\n")
    record = load_mdetr_json(mdetr_json, "/images", sentences_root=str(tmp_path))[0]
    assert [p["phrase_types"] for p in record["phrases"]] == [["people", "other"], ["animals"], ["animals"]]
    assert [p["phrase_type"] for p in record["phrases"]] == ["people", "animals", "animals"]
    (tmp_path / "1000.txt").write_text(line.replace("eats", "sleeps"))
    with pytest.raises(ValueError, match="differs from the Flickr30K Entities sentence"):
        load_mdetr_json(mdetr_json, "/images", sentences_root=str(tmp_path))


def test_phrase_types_from_the_json(tmp_path):
    image = _image(7, "a dog", tokens_positive_eval=[[[0, 5]]], phrase_types=[["animals", "other"]])
    record = load_mdetr_json(_write(tmp_path / "types.json", [image], [_anno(1, 7, [[0, 5]])]), "/images")[0]
    assert record["phrases"][0]["phrase_types"] == ["animals", "other"]
    assert record["phrases"][0]["phrase_type"] == "animals"
    image["phrase_types"] = ["animals", "people"]
    with pytest.raises(ValueError, match="image 7: 2 phrase_types for 1 phrases"):
        load_mdetr_json(_write(tmp_path / "types.json", [image], [_anno(1, 7, [[0, 5]])]), "/images")


def test_parse_flickr_sentence():
    sentence, phrases = parse_flickr_sentence("[/EN#18/people A man] in [/EN#19/clothing/other a hat] .")
    assert sentence == "A man in a hat ."
    assert [(p.start, p.end, p.entity_id, p.types) for p in phrases] == [
        (0, 5, "18", ("people",)),
        (9, 14, "19", ("clothing", "other")),
    ]
    assert [sentence[p.start : p.end] for p in phrases] == ["A man", "a hat"]
    with pytest.raises(ValueError, match="unclosed"):
        parse_flickr_sentence("[/EN#1/people A man sits .")


def test_spans_outside_the_caption_are_refused_naming_file_image_and_span(tmp_path):
    bad_box = _write(tmp_path / "bad_box.json", [_image(4, "a dog")], [_anno(1, 4, [[2, 9]])])
    with pytest.raises(ValueError, match=r"bad_box\.json: image 4, annotation 1: span \[2, 9\)"):
        load_mdetr_json(bad_box, "/images")
    bad_phrase = _write(
        tmp_path / "bad_phrase.json", [_image(5, "a dog", tokens_positive_eval=[[[0, 5]], [[3, 1]]])], [_anno(1, 5, [])]
    )
    with pytest.raises(ValueError, match=r"bad_phrase\.json: image 5, tokens_positive_eval #1: span \[3, 1\)"):
        load_mdetr_json(bad_phrase, "/images")
    no_caption = _write(tmp_path / "no_caption.json", [_image(6, "  ")], [_anno(1, 6, [])])
    with pytest.raises(ValueError, match="image 6: 'caption' must be a non-empty string"):
        load_mdetr_json(no_caption, "/images")


def test_caption_data_score_threshold_and_weak_flag(tmp_path):
    images = [_image(1, "a dog and a cat"), _image(2, "a bird")]
    annotations = [
        _anno(1, 1, [[0, 5]], score=0.9),
        _anno(2, 1, [[10, 15]], score=0.3),
        _anno(3, 1, [[10, 15]]),  # no score: kept
        _anno(4, 2, [[0, 6]], score=0.2),
    ]
    json_file = _write(tmp_path / "captions.json", images, annotations)
    records = load_mdetr_json(json_file, "/images", task="caption", min_score=0.5)
    assert [r["image_id"] for r in records] == [1]  # image 2 lost its only box
    assert records[0]["task"] == "caption" and records[0]["weak"] is True
    assert [a.get("score") for a in records[0]["annotations"]] == [0.9, None]
    kept = load_mdetr_json(json_file, "/images", task="caption", min_score=0.5, keep_empty=True)
    assert [len(r["annotations"]) for r in kept] == [2, 0]
    assert len(load_mdetr_json(json_file, "/images", task="caption")[0]["annotations"]) == 3
    with pytest.raises(ValueError, match="task must be one of"):
        load_mdetr_json(json_file, "/images", task="detection")


@pytest.fixture
def _restore_catalog(tmp_path):
    """Tests below point builtin names at temporary folders; leave none of that behind."""
    yield
    register_mdetr_datasets(str(tmp_path / "no_such_root"))
    register_synthetic_grounding()
    DatasetCatalog.pop("glipv2_test_custom_grounding", None)


@pytest.mark.usefixtures("_restore_catalog")
def test_builtin_names_follow_the_files_present(mdetr_json, tmp_path):
    annotations = tmp_path / "mdetr_annotations"
    annotations.mkdir()
    (tmp_path / "flickr30k" / "flickr30k_images" / "val").mkdir(parents=True)
    text = Path(mdetr_json).read_text()
    for name in ("final_flickr_separateGT_val.json", "final_mixed_train_no_coco.json"):
        (annotations / name).write_text(text)
    register_mdetr_datasets(str(tmp_path))
    assert "glipv2_flickr30k_val" in DatasetCatalog.list()
    assert "glipv2_flickr30k_test" not in DatasetCatalog.list() and "glipv2_goldg_train" not in DatasetCatalog.list()
    metadata = MetadataCatalog.get("glipv2_flickr30k_val")
    assert metadata.evaluator_type == "flickr30k" and metadata.image_root.endswith("flickr30k_images/val")
    assert len(DatasetCatalog.get("glipv2_flickr30k_val")) == 3

    (annotations / "final_flickr_separateGT_train.json").write_text(text)
    register_mdetr_datasets(str(tmp_path))
    goldg = DatasetCatalog.get("glipv2_goldg_train")
    assert len(goldg) == 6 and len({r["image_id"] for r in goldg}) == 6  # second file's ids offset
    assert [r["file_name"].split("/")[-2] for r in goldg][::3] == ["images", "flickr30k_images"]
    register_mdetr_grounding("glipv2_test_custom_grounding", mdetr_json, "/images", task="caption")
    assert DatasetCatalog.get("glipv2_test_custom_grounding")[0]["weak"] is True


@pytest.mark.usefixtures("_restore_catalog")
def test_synthetic_grounding_and_caption_splits(tmp_path):
    register_synthetic_grounding(tmp_path / "shapes", num_train=8, num_val=2, num_heldout=1, caption_min_score=0.5)
    grounding = DatasetCatalog.get("glipv2_synthetic_grounding_train")
    assert len(grounding) >= 1 and {r["task"] for r in grounding} == {"grounding"}
    for record in grounding:
        for anno in record["annotations"]:
            assert [record["phrases"][j]["tokens_positive"] for j in anno["phrase_ids"]] in (
                [],
                [anno["tokens_positive"]],
            )
    assert MetadataCatalog.get("glipv2_synthetic_grounding_val").evaluator_type == "flickr30k"
    captions = DatasetCatalog.get("glipv2_synthetic_caption_train")
    assert captions == DatasetCatalog.get("glipv2_synthetic_caption_train")  # deterministic
    scores = [a["score"] for r in captions for a in r["annotations"]]
    assert scores and all(0.5 <= s <= 1 for s in scores)
    assert all(r["task"] == "caption" and r["weak"] and r["annotations"] for r in captions)
    register_synthetic_grounding(tmp_path / "shapes", num_train=8, num_val=2, num_heldout=1, caption_min_score=0.0)
    all_scores = [a["score"] for r in DatasetCatalog.get("glipv2_synthetic_caption_train") for a in r["annotations"]]
    assert len(all_scores) > len(scores) and min(all_scores) < 0.5  # the threshold matters
    mentioned = sum(bool(a["tokens_positive"]) for r in grounding for a in r["annotations"])
    assert len(all_scores) == mentioned  # unmentioned objects get no pseudo box


# --- mapper --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("minilm")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    return half_red_half_blue_png(tmp_path_factory.mktemp("images") / "grounding.png", HEIGHT, WIDTH)


def _cfg(**overrides):
    cfg = base_cfg()
    cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER = "minilm"
    cfg.INPUT.MIN_SIZE_TRAIN = (HEIGHT,)
    cfg.INPUT.MIN_SIZE_TEST = HEIGHT
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.merge_from_list([item for pair in overrides.items() for item in pair])
    return cfg


def _grounding_record(image_file, caption, spans_of_boxes, **extra):
    annotations = [
        {
            "bbox": [4 + 8 * i, 4, 10, 20],
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": 0,
            "iscrowd": 0,
            "tokens_positive": spans,
        }
        for i, spans in enumerate(spans_of_boxes)
    ]
    return {
        "file_name": image_file,
        "height": HEIGHT,
        "width": WIDTH,
        "image_id": 3,
        "task": "grounding",
        "weak": False,
        "caption": caption,
        "annotations": annotations,
        **extra,
    }


def _rows(instances):
    return [row.nonzero().flatten().tolist() for row in instances.positive_map]


def test_positive_map_marks_the_tokens_of_each_box(tokenizer, image_file):
    # [CLS] the snow ##board ##er grabs his board near a red flag . [SEP]
    caption = "The snowboarder grabs his board near a red flag ."
    record = _grounding_record(image_file, caption, [[[0, 15]], [[22, 31]], [[0, 15], [39, 47]], []])
    out = GroundingMapper(_cfg(), True, tokenizer)(record, seed=0)
    prompt = out["prompt"]
    assert prompt.caption == caption and out["loss_weight"] == 1.0 and not prompt.names_categories
    assert prompt.input_ids.tolist() == tokenizer(caption)["input_ids"] and prompt.attention_mask.all()
    assert prompt.label_to_tokens == {0: [1, 2, 3, 4], 1: [6, 7], 2: [1, 2, 3, 4, 10, 11]}
    inst = out["instances"]
    assert inst.positive_map.dtype == torch.bool and inst.positive_map.shape == (3, 14)  # unmentioned box dropped
    assert _rows(inst) == [[1, 2, 3, 4], [6, 7], [1, 2, 3, 4, 10, 11]]
    assert inst.gt_boxes.tensor.tolist() == [[4, 4, 14, 24], [12, 4, 22, 24], [20, 4, 30, 24]]
    assert (out["height"], out["width"]) == (HEIGHT, WIDTH) and out["image"].shape == (3, HEIGHT, WIDTH)
    assert "annotations" not in out and "phrases" not in out


def test_swap_left_right_keeps_case_whole_words_and_moves_positions():
    caption = "Left of the LEFT left-hand leftover, right upright."
    swapped, move = swap_left_right(caption)
    assert swapped == "Right of the RIGHT right-hand leftover, left upright."
    assert swapped[move(5) : move(16)] == "of the RIGHT"  # starts shift by one per earlier "left"
    assert swapped[move(37) : move(42)] == "left"  # "right" -> "left" pulls later text back
    assert move(len(caption)) == len(swapped) and swap_left_right("no sides")[0] == "no sides"


def test_flip_swaps_left_and_right_and_moves_spans(tokenizer, image_file):
    caption = "the left dog chases the cat on the right ."
    spans = [[[0, 12]], [[20, 27]], [[31, 40]]]  # "the left dog", "the cat", "the right"
    record = _grounding_record(image_file, caption, spans)
    seen = set()
    for seed in range(8):
        out = GroundingMapper(_cfg(**{"INPUT.RANDOM_FLIP": "horizontal"}), True, tokenizer)(record, seed=seed)
        flipped = bool(out["image"][0, 0, 0] == 255)  # BGR: blue on the left
        seen.add(flipped)
        words = [tokenizer.decode(out["prompt"].input_ids[row].tolist()) for row in out["instances"].positive_map]
        if flipped:
            assert out["prompt"].caption == "the right dog chases the cat on the left ."
            assert words == ["the right dog", "the cat", "the left"]
            assert out["instances"].gt_boxes.tensor[0].tolist() == [WIDTH - 14, 4, WIDTH - 4, 24]
        else:
            assert out["prompt"].caption == caption and words == ["the left dog", "the cat", "the right"]
    assert seen == {True, False}
    again = [
        GroundingMapper(_cfg(**{"INPUT.RANDOM_FLIP": "horizontal"}), True, tokenizer)(record, seed=3) for _ in range(2)
    ]
    assert again[0]["prompt"].caption == again[1]["prompt"].caption
    assert torch.equal(again[0]["image"], again[1]["image"])


def test_long_captions_are_truncated_and_boxes_beyond_dropped(tokenizer, image_file):
    caption = "The snowboarder grabs his board near a red flag ."
    record = _grounding_record(image_file, caption, [[[0, 15]], [[22, 31]], [[37, 47]]])
    out = GroundingMapper(_cfg(**{"MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN": 8}), True, tokenizer)(record, seed=0)
    # [CLS] the snow ##board ##er grabs his [SEP]: "his board" keeps "his", "a red flag" is gone
    assert len(out["prompt"].input_ids) == 8 and out["prompt"].input_ids[-1] == tokenizer.sep_token_id
    assert _rows(out["instances"]) == [[1, 2, 3, 4], [6]]
    assert out["instances"].gt_boxes.tensor.tolist() == [[4, 4, 14, 24], [12, 4, 22, 24]]


def test_test_mode_maps_phrases_to_tokens_and_keeps_annotations(tokenizer, image_file, records):
    record = dict(records[0], file_name=image_file)
    out = GroundingMapper(_cfg(), False, tokenizer)(record)
    # [CLS] two girls feed a goat while the goat eats . [SEP]
    assert out["prompt"].label_to_tokens == {0: [1, 2], 1: [4, 5], 2: [7, 8]}
    assert out["prompt"].label_names == {0: "Two girls", 1: "a goat", 2: "the goat"}
    assert out["phrases"] == records[0]["phrases"] and out["annotations"] == records[0]["annotations"]
    assert "instances" not in out and out["image"].shape == (3, HEIGHT, WIDTH)
    short = GroundingMapper(_cfg(**{"MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN": 7}), False, tokenizer)(record)
    assert short["prompt"].label_to_tokens == {0: [1, 2], 1: [4, 5]}  # "the goat" truncated away


def test_weak_caption_records_get_the_weak_loss_weight(tokenizer, image_file):
    record = _grounding_record(image_file, "a red flag", [[[0, 10]]], task="caption", weak=True)
    out = GroundingMapper(_cfg(), True, tokenizer)(record, seed=0)
    assert out["loss_weight"] == 1.0 and _rows(out["instances"]) == [[1, 2, 3]]  # the default weight
    cfg = _cfg(**{"MODEL.WEAK_SAMPLE_LOSS_WEIGHT": 0.25})
    assert GroundingMapper(cfg, True, tokenizer)(record, seed=0)["loss_weight"] == 0.25
    assert GroundingMapper(cfg, True, tokenizer)(dict(record, weak=False), seed=0)["loss_weight"] == 1.0


def test_spans_outside_the_caption_are_errors_naming_image_and_span(tokenizer, image_file):
    record = _grounding_record(image_file, "a red flag", [[[0, 5]], [[6, 30]]])
    message = r"grounding\.png \(image 3\), box #1: span \[6, 30\) is empty or outside the caption of 10"
    with pytest.raises(ValueError, match=message):
        GroundingMapper(_cfg(), True, tokenizer)(record, seed=0)
    record = _grounding_record(image_file, "a red flag", [], phrases=[{"phrase_id": 0, "tokens_positive": [[4, 2]]}])
    with pytest.raises(ValueError, match=r"phrase #0: span \[4, 2\) is empty"):
        GroundingMapper(_cfg(), False, tokenizer)(record)
