"""Text encoder, offline tokenizer and prompt/token-map utilities."""

import pytest
import torch
from detectron2.config import get_cfg
from transformers import BertModel

from glipv2_d2.config import add_glipv2_config
from glipv2_d2.data.prompt_builder import PromptBuilder
from glipv2_d2.data.prompts import (
    build_detection_prompt,
    build_labeled_prompt,
    category_uid,
    check_spans,
    chunk_categories,
    clean_category_name,
    locate_phrases,
    positive_map_to_token_map,
    spans_to_token_map,
    token_map_to_positive_map,
    token_map_to_token_labels,
    tokenize_prompts,
)
from glipv2_d2.modeling.language import (
    LANGUAGE_BACKBONE_REGISTRY,
    BertTextEncoder,
    build_language_backbone,
    build_tokenizer,
    minilm_model_dir,
)
from glipv2_d2.structures import Prompt

TINY = dict(
    vocab_size=30522,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
COCO_LIKE = ["person", "bicycle", "traffic light", "fire_hydrant", "hot dog", "teddy bear", "hair drier"]


@pytest.fixture(scope="module")
def bert_tokenizer():
    return build_tokenizer("bert-base-uncased")


@pytest.fixture(scope="module", params=["bert-base-uncased", "clip"])
def tokenizer(request):
    """Every prompt test runs with GLIPv2-T's WordPiece and GLIPv2-B / -H's CLIP BPE tokenizer."""
    return build_tokenizer(request.param)


def _decode(tokenizer, ids, indices):
    return tokenizer.decode([int(ids[i]) for i in indices])


# --- text encoder -----------------------------------------------------------------------------


def test_tiny_encoder_matches_bertmodel_and_masks_padding(bert_tokenizer):
    torch.manual_seed(0)
    encoder = BertTextEncoder(TINY, num_last_layers=1).eval()
    assert encoder.hidden_size == 32 and encoder.num_layers == 2
    assert "model.encoder.layer.1.output.dense.weight" in encoder.state_dict()
    assert not any(k.startswith("model.pooler") for k in encoder.state_dict())
    tok = tokenize_prompts(bert_tokenizer, ["person. bicycle", "a cat"], max_len=16, pad_to_max=True)
    with torch.no_grad():
        out = encoder(tok["input_ids"], tok["attention_mask"])
        ref = encoder.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    assert out["hidden"].shape == (2, 16, 32)
    torch.testing.assert_close(out["hidden"], ref.last_hidden_state)
    mask = tok["attention_mask"].bool()
    assert out["embedded"][~mask].abs().sum() == 0
    torch.testing.assert_close(out["embedded"][mask], out["hidden"][mask])
    assert out["masks"] is tok["attention_mask"]
    expected_aggregate = torch.stack([out["hidden"][i, mask[i]].mean(0) for i in range(2)])
    torch.testing.assert_close(out["aggregate"], expected_aggregate)


def test_num_last_layers_reproduces_official_double_division():
    torch.manual_seed(0)
    encoder = BertTextEncoder(TINY, num_last_layers=2).eval()
    ids = torch.tensor([[101, 2711, 1012, 102, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    with torch.no_grad():
        out = encoder(ids, mask)
        states = encoder.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    expected = (states[-1] + states[-2]) / 2 / 2 * mask[..., None]
    torch.testing.assert_close(out["embedded"], expected)
    torch.testing.assert_close(out["hidden"], states[-1])
    with pytest.raises(ValueError, match="num_last_layers=3"):
        BertTextEncoder(TINY, num_last_layers=3)


def test_padding_to_longest_equals_padding_to_max(bert_tokenizer):
    torch.manual_seed(0)
    encoder = BertTextEncoder(TINY).eval()
    captions = ["person. bicycle. traffic light", "dog"]
    short = tokenize_prompts(bert_tokenizer, captions, max_len=32, pad_to_max=False)
    full = tokenize_prompts(bert_tokenizer, captions, max_len=32, pad_to_max=True)
    with torch.no_grad():
        a = encoder(short["input_ids"], short["attention_mask"])
        b = encoder(full["input_ids"], full["attention_mask"])
    length = short["input_ids"].shape[1]
    torch.testing.assert_close(a["hidden"], b["hidden"][:, :length], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["aggregate"], b["aggregate"], atol=1e-5, rtol=1e-5)


def _language_cfg(model_path: str, load_pretrained: bool, num_hidden_layers: int = 0):
    cfg = add_glipv2_config(get_cfg())
    cfg.MODEL.LANGUAGE_BACKBONE.MODEL_PATH = model_path
    cfg.MODEL.LANGUAGE_BACKBONE.LOAD_PRETRAINED = load_pretrained
    cfg.MODEL.LANGUAGE_BACKBONE.NUM_HIDDEN_LAYERS = num_hidden_layers
    return cfg


def test_bert_base_structure_and_registry():
    encoder = build_language_backbone(_language_cfg("bert-base-uncased", False))
    assert "build_bert_language_backbone" in LANGUAGE_BACKBONE_REGISTRY
    assert encoder.hidden_size == 768 and encoder.num_layers == 12
    shapes = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert shapes["model.embeddings.word_embeddings.weight"] == (30522, 768)
    assert shapes["model.encoder.layer.11.intermediate.dense.weight"] == (3072, 768)
    assert "model.encoder.layer.12.output.dense.weight" not in shapes


def test_text_depth_comes_from_config():
    encoder = build_language_backbone(_language_cfg("minilm", False, num_hidden_layers=3))
    assert encoder.num_layers == 3 and encoder.hidden_size == 384


def test_pretrained_minilm_folder_runs_offline(bert_tokenizer):
    encoder = build_language_backbone(_language_cfg("minilm", True)).eval()
    assert encoder.hidden_size == 384 and encoder.num_layers == 6
    tok = tokenize_prompts(bert_tokenizer, ["a person riding a bicycle", "a dog"], max_len=32)
    with torch.no_grad():
        out = encoder(tok["input_ids"], tok["attention_mask"])
        ref = BertModel.from_pretrained(str(minilm_model_dir()), add_pooling_layer=False).eval()(
            input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
        )
    torch.testing.assert_close(out["hidden"], ref.last_hidden_state)
    assert torch.isfinite(out["hidden"]).all() and out["hidden"].abs().mean() > 0.01


def test_missing_bert_folder_is_named():
    with pytest.raises(FileNotFoundError, match="no_such_bert"):
        build_language_backbone(_language_cfg("./no_such_bert", True))


# --- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_offline_name_and_folder(bert_tokenizer):
    from_folder = build_tokenizer(str(minilm_model_dir()))
    for tk in (bert_tokenizer, from_folder):
        assert tk.is_fast and len(tk) == 30522
        assert tk.convert_tokens_to_ids(["[CLS]", "[SEP]", "[PAD]", "[MASK]"]) == [101, 102, 0, 103]
        assert tk.tokenize("Traffic Light") == ["traffic", "light"]
    long = " ".join(["word"] * 300)
    assert len(bert_tokenizer(long)["input_ids"]) == 302, "the folder's 128-token truncation must not leak"


def test_tokenizer_errors_name_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_tokenizer("./nowhere/bert")
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        build_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="empty"):
        build_tokenizer(" ")


# --- prompts ----------------------------------------------------------------------------------


def test_detection_prompt_spans_exact():
    caption, spans = build_detection_prompt(COCO_LIKE)
    assert caption == "person. bicycle. traffic light. fire hydrant. hot dog. teddy bear. hair drier"
    assert [caption[s:e] for s, e in spans] == [clean_category_name(n) for n in COCO_LIKE]
    assert spans[:3] == [(0, 6), (8, 15), (17, 30)]
    assert clean_category_name("bait_(lure)") == "bait"
    assert build_detection_prompt(["a", "b"], separator=" ")[0] == "a b"


def test_detection_prompt_errors_name_input():
    with pytest.raises(ValueError, match="empty"):
        build_detection_prompt([])
    with pytest.raises(ValueError, match=r"#1 \('\(only parens\)'\)"):
        build_detection_prompt(["cat", "(only parens)"])
    with pytest.raises(TypeError, match="person"):
        build_detection_prompt("person")


def _detection_prompt(tokenizer, names: dict) -> Prompt:
    return PromptBuilder(tokenizer).categories(names)[0]


def test_token_map_for_coco_names(tokenizer):
    names = {1: "person", 2: "bicycle", 10: "traffic light"}
    prompt = _detection_prompt(tokenizer, names)
    assert prompt.caption == "person. bicycle. traffic light"
    assert prompt.label_to_tokens == {1: [1], 2: [3], 10: [5, 6]}
    assert {k: _decode(tokenizer, prompt.input_ids, v) for k, v in prompt.label_to_tokens.items()} == {
        1: "person",
        2: "bicycle",
        10: "traffic light",
    }
    assert prompt.label_names == names and prompt.names_categories
    assert prompt.input_ids.tolist() == tokenizer(prompt.caption)["input_ids"] and prompt.attention_mask.all()
    uids = {label: category_uid(name) for label, name in names.items()}
    expected = [-1, uids[1], -1, uids[2], -1, uids[10], uids[10], -1]
    assert prompt.token_categories.tolist() == expected


def test_free_form_caption_prompt_has_no_categories(tokenizer):
    prompt = PromptBuilder(tokenizer).caption("a man throws a frisbee", phrases=["man", "frisbee"])
    frisbee = [5] if tokenizer.bos_token == "<|startoftext|>" else [5, 6, 7]  # one CLIP BPE token, 3 WordPieces
    assert prompt.label_to_tokens == {0: [2], 1: frisbee} and prompt.label_names == {0: "man", 1: "frisbee"}
    assert not prompt.names_categories and (prompt.token_categories == -1).all()
    with pytest.raises(ValueError, match="exceeds the 4-token limit"):
        PromptBuilder(tokenizer, max_query_len=4).caption("a man throws a frisbee")


def test_token_map_batch_index_and_subwords(tokenizer):
    captions = ["a cat", "hairdrier. cat"]
    tokenized = tokenize_prompts(tokenizer, captions, max_len=16)
    token_map = spans_to_token_map(tokenized, {"drier": [[0, 9]], "cat": [[11, 14]]}, 16, batch_index=1)
    ids = tokenized["input_ids"][1]
    assert _decode(tokenizer, ids, token_map["drier"]).replace(" ##", "") == "hairdrier"
    assert _decode(tokenizer, ids, token_map["cat"]) == "cat"
    leading_space = spans_to_token_map(tokenized, {"cat": [[1, 5]]}, 16, batch_index=0, caption="a cat")
    assert leading_space == {"cat": [2]}


def test_token_map_errors_name_category(tokenizer):
    caption, spans = build_labeled_prompt({1: "person", 2: "toothbrush"})
    tokenized = tokenize_prompts(tokenizer, [caption], max_len=4)
    with pytest.raises(ValueError, match=r"label 2: phrase 'toothbrush'.*truncated"):
        spans_to_token_map(tokenized, spans, 4, caption=caption)
    tokenized = tokenize_prompts(tokenizer, ["person.   dog"], max_len=16)
    with pytest.raises(ValueError, match="label 'gap'.*covers no token"):
        spans_to_token_map(tokenized, {"gap": [[7, 10]]}, 16, caption="person.   dog")
    with pytest.raises(ValueError, match="label 'oob'.*outside the caption"):
        spans_to_token_map(tokenized, {"oob": [[10, 99]]}, 16, caption="person.   dog")
    with pytest.raises(ValueError, match="label 'dog'.*beyond max_len=2"):
        spans_to_token_map(tokenized, {"person": [[0, 6]], "dog": [[10, 13]]}, 2)


def test_positive_maps(tokenizer):
    token_map = _detection_prompt(tokenizer, {1: "person", 10: "traffic light"}).label_to_tokens
    binary = token_map_to_positive_map(token_map, [10, 1, 10], max_len=8)
    assert binary.shape == (3, 8) and binary.dtype == torch.float32
    assert binary[0].nonzero().flatten().tolist() == [3, 4] and set(binary.unique().tolist()) == {0.0, 1.0}
    normalised = token_map_to_positive_map(token_map, [10, 1], max_len=8, normalize=True)
    torch.testing.assert_close(normalised.sum(-1), torch.tensor([2 / (2 + 1e-6), 1 / (1 + 1e-6)]))
    assert positive_map_to_token_map(binary, labels=["tl", "p", "tl2"]) == {
        "tl": [3, 4],
        "p": [1],
        "tl2": [3, 4],
    }
    assert token_map_to_token_labels(token_map, 6).tolist() == [-1, 1, -1, 10, 10, -1]
    with pytest.raises(KeyError, match="label 7"):
        token_map_to_positive_map(token_map, [7], max_len=8)


def test_tokenize_prompts_errors_and_padding(tokenizer):
    enc = tokenize_prompts(tokenizer, ["person", "a very long caption here"], max_len=10, pad_to_max=False)
    longest = len(tokenizer("a very long caption here")["input_ids"])
    assert longest < 10 and enc["input_ids"].shape == (2, longest) and "offset_mapping" in enc
    assert tokenize_prompts(tokenizer, ["person"], max_len=10, pad_to_max=True)["input_ids"].shape == (1, 10)
    with pytest.raises(ValueError, match=r"caption #1 is empty"):
        tokenize_prompts(tokenizer, ["person", "   "], max_len=10)
    if tokenizer.bos_token == "<|startoftext|>":  # byte-level BPE has a token for every non-blank character
        assert tokenize_prompts(tokenizer, ["\u200b"], max_len=10)["attention_mask"].sum() == 3
    else:
        with pytest.raises(ValueError, match=r"caption #0 '\\u200b' tokenizes to no token"):
            tokenize_prompts(tokenizer, ["\u200b"], max_len=10)


def test_chunking_covers_everything_and_fits(tokenizer):
    words = ("sea lion", "hair_drier_(electric)", "ox", "fire hydrant", "bagpipe")
    names = {i + 1: f"{w}_{j}" for i, (w, j) in enumerate((w, j) for j in range(30) for w in words)}
    for chunk_size in (None, 7):
        chunks = chunk_categories(names, tokenizer, max_len=64, chunk_size=chunk_size)
        labels = [label for chunk in chunks for label, _ in chunk]
        assert labels == list(names)
        for chunk in chunks:
            caption, spans = build_labeled_prompt(chunk)
            tokenized = tokenize_prompts(tokenizer, [caption], max_len=64)
            assert int(tokenized["attention_mask"].sum()) <= 64
            token_map = spans_to_token_map(tokenized, spans, 64, caption=caption)
            assert all(token_map.values())
    greedy = chunk_categories(names, tokenizer, max_len=64)
    assert all(
        len(tokenizer(build_labeled_prompt(c + n[:1])[0])["input_ids"]) > 64
        for c, n in zip(greedy, greedy[1:])
    )
    assert [len(c) for c in chunk_categories(["cat"] * 85, tokenizer, chunk_size=40)] == [40, 40, 5]


def test_chunking_errors_name_input(tokenizer):
    with pytest.raises(ValueError, match="empty"):
        chunk_categories([], tokenizer)
    with pytest.raises(ValueError, match=r"category 1 \('__'\)"):
        chunk_categories(["cat", "__"], tokenizer)
    with pytest.raises(ValueError, match="category 'huge'"):
        chunk_categories({"huge": "word " * 70, "ok": "cat"}, tokenizer, max_len=64)
    with pytest.raises(ValueError, match="chunk #0"):
        chunk_categories(["sea lion"] * 30, tokenizer, max_len=64, chunk_size=30)


def test_locate_phrases():
    caption = "A man in a red shirt holds a cat. The cat sleeps."
    entities = locate_phrases(caption, phrases=["red shirt", "cat", "man"])
    assert entities == [("red shirt", [(11, 20)]), ("cat", [(29, 32)]), ("man", [(2, 5)])]
    assert locate_phrases("  a dog  ") == [("a dog", [(2, 7)])]
    assert locate_phrases(caption, spans=[(38, 41), [(2, 5), (29, 32)]]) == [
        ("cat", [(38, 41)]),
        ("man cat", [(2, 5), (29, 32)]),
    ]
    assert locate_phrases("concatenate the cat", phrases=["cat"]) == [("cat", [(16, 19)])]
    with pytest.raises(ValueError, match="'horse' does not occur"):
        locate_phrases(caption, phrases=["horse"])
    with pytest.raises(ValueError, match="empty"):
        locate_phrases("   ")
    with pytest.raises(ValueError, match="outside the caption"):
        locate_phrases("a dog", spans=[(0, 50)])


def test_check_spans_returns_int_pairs_and_names_the_source_of_a_bad_span():
    assert check_spans([[0, 1], (2.0, 5)], "a dog", "here") == [(0, 1), (2, 5)]
    assert check_spans([], "a dog", "here") == []
    assert check_spans([[3, 99]], None, "here") == [(3, 99)]  # no caption: no upper bound to check
    bad = [
        ("a dog", [[2, 6]], r"^img 7: span \[2, 6\) is empty or outside the caption of 5 characters 'a dog'$"),
        ("a dog", [[3, 3]], r"^img 7: span \[3, 3\) is empty"),
        ("a dog", [[-1, 2]], r"^img 7: span \[-1, 2\) is empty or outside"),
        ("a dog", [[0, 1, 2]], r"^img 7: span \[0, 1, 2\] is not a \[start, end\) pair$"),
        ("a dog", [5], r"^img 7: span 5 is not a \[start, end\) pair$"),
        ("a dog", "0-2", r"^img 7: expected a list of \[start, end\) spans, got '0-2'$"),
        (None, [[2, 1]], r"^img 7: span \[2, 1\) is empty or starts before the caption$"),
    ]
    for caption, spans, message in bad:
        with pytest.raises(ValueError, match=message):
            check_spans(spans, caption, "img 7")
