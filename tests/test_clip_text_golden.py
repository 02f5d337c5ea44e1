"""Official parity of the CLIP-type text encoder and the CLIP tokenizer (GLIPv2-B / -H):
tests/data/glip_golden_clip_text.pt, made by the official GLIP code (projects/GLIPv2/NUMERICS.md)."""

import pytest
import torch

from glipv2_d2.checkpoint import convert_official_state_dict
from glipv2_d2.data.prompts import (
    build_detection_prompt,
    spans_to_token_map,
    token_map_to_positive_map,
    tokenize_prompts,
)
from glipv2_d2.modeling.language import ClipTextConfig, ClipTextEncoder, build_tokenizer
from glipv2_d2.modeling.language.clip_text import load_clip_text_weights, resize_positional_embedding

from .conftest import DATA_DIR

TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(DATA_DIR / "glip_golden_clip_text.pt", weights_only=True)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("clip")


def _encoder_from_official(case: dict) -> ClipTextEncoder:
    """The golden encoder's weights under their official names, renamed by the checkpoint converter."""
    used = case["config"]["used"]
    config = ClipTextConfig(width=used["WIDTH"], layers=used["LAYERS"], heads=used["HEADS"],
                            context_length=used["CONTEXT_LENGTH"], vocab_size=used["VOCAB_SIZE"])
    encoder = ClipTextEncoder(config).eval()
    official = {case["full_model_prefix"] + k: v for k, v in case["params"].items()}
    converted = convert_official_state_dict(official)
    encoder.load_state_dict({k.removeprefix("language_backbone."): v for k, v in converted.items()}, strict=True)
    return encoder


def test_encoder_reproduces_the_official_outputs_and_intermediates(golden):
    case = golden["clip_text_encoder"]
    encoder = _encoder_from_official(case)
    seen = {}

    def keep(name: str, value: torch.Tensor) -> None:
        seen[name] = value

    encoder.model.resblocks[0].register_forward_pre_hook(lambda m, args: keep("embeddings_in", args[0]))
    encoder.model.resblocks[0].register_forward_hook(lambda m, i, o: keep("block0_out", o))
    encoder.model.resblocks[-1].register_forward_hook(lambda m, i, o: keep("block_last_out", o))
    ids, mask = case["inputs"]["input_ids"], case["inputs"]["attention_mask"]
    with torch.no_grad():
        out = encoder(ids, mask)
    for name in ("embeddings_in", "block0_out", "block_last_out"):
        torch.testing.assert_close(seen[name], case["intermediates"][name], **TOL)
    for name in ("hidden", "embedded", "aggregate"):
        torch.testing.assert_close(out[name], case["outputs"][name], **TOL)
    assert out["hidden"] is out["embedded"] is out["aggregate"]  # official: one unpooled tensor
    assert torch.equal(out["masks"], case["outputs"]["masks"])
    assert out["hidden"][mask == 0].abs().sum() > 0  # padded positions are computed, as officially


def test_padding_to_the_longest_prompt_equals_the_official_256(golden):
    case = golden["clip_text_encoder"]
    encoder = _encoder_from_official(case)
    ids, mask = case["inputs"]["input_ids"], case["inputs"]["attention_mask"]
    longest = int(mask.sum(1).max())
    with torch.no_grad():
        short = encoder(ids[:, :longest], mask[:, :longest])["hidden"]
    real = mask[:, :longest].bool()
    torch.testing.assert_close(short[real], case["outputs"]["hidden"][:, :longest][real], **TOL)
    with pytest.raises(ValueError, match="exceeds the CLIP text context of 256"):
        encoder(torch.cat([ids, ids[:, :1]], dim=1), torch.cat([mask, mask[:, :1]], dim=1))


def test_unicl_positional_table_is_interpolated_to_the_context(golden, tmp_path):
    case = golden["clip_pos_embed_resize"]
    table_77 = case["inputs"]["positional_embedding_77"]
    expected = case["outputs"]["positional_embedding_256"]
    torch.testing.assert_close(resize_positional_embedding(table_77, 256), expected, **TOL)

    encoder = ClipTextEncoder(ClipTextConfig(width=8, layers=1, heads=2, vocab_size=16))
    unicl = {f"text.{k}": torch.randn_like(v) for k, v in encoder.model.state_dict().items()}
    unicl["text.positional_embedding"] = table_77
    unicl["visual.conv1.weight"] = torch.zeros(1)  # the image tower is not read
    torch.save({"model": unicl}, tmp_path / "unicl.pth")
    load_clip_text_weights(encoder.model, tmp_path / "unicl.pth")
    torch.testing.assert_close(encoder.model.positional_embedding.detach(), expected, **TOL)
    assert torch.equal(encoder.model.ln_final.weight.detach(), unicl["text.ln_final.weight"])
    del unicl["text.ln_final.bias"]
    torch.save(unicl, tmp_path / "incomplete.pth")
    with pytest.raises(RuntimeError, match="ln_final.bias"):
        load_clip_text_weights(encoder.model, tmp_path / "incomplete.pth")


TOKENIZER_CASES = [
    "detection", "caption_punct", "unicode_accents", "numbers", "many_bpe_pieces", "upper_case",
    "contractions_whitespace", "emoji_cjk", "partial_word_span", "overlong_truncated",
]


@pytest.mark.parametrize("name", TOKENIZER_CASES)
def test_tokenizer_reproduces_the_official_ids_offsets_and_positive_maps(golden, tokenizer, name):
    case = golden["clip_tokenizer"]["cases"][name]
    enc = tokenizer([case["text"]], max_length=256, padding="max_length", truncation=True,
                    return_special_tokens_mask=True, return_offsets_mapping=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "special_tokens_mask"):
        assert torch.equal(enc[key][0], case[key]), key
    n = case["num_tokens"]
    assert tokenizer.convert_ids_to_tokens(enc["input_ids"][0, :n].tolist()) == case["tokens"]
    assert torch.equal(enc["offset_mapping"][0, :n], case["offset_mapping"])
    raw = [[[_or_minus_one(enc.char_to_token(b)), _or_minus_one(enc.char_to_token(e - 1))] for b, e in spans]
           for spans in case["char_spans"]]
    assert raw == case["token_spans_beg_end_raw"]

    # Through the project's prompt path (dynamic padding, the overlap rule): every official row
    # that is not empty is reproduced; a span the official code leaves empty is an error here.
    tokenized = tokenize_prompts(tokenizer, case["text"], max_len=256, warn_truncation=False)
    for row, spans in enumerate(case["char_spans"]):
        expected = case["positive_map"][row]
        if not expected.any():
            with pytest.raises(ValueError, match="truncated away"):
                spans_to_token_map(tokenized, {row: spans}, 256, caption=case["text"])
            continue
        token_map = spans_to_token_map(tokenized, {row: spans}, 256, caption=case["text"])
        torch.testing.assert_close(token_map_to_positive_map(token_map, [row], 256, normalize=True)[0], expected)


def _or_minus_one(index: int | None) -> int:
    return -1 if index is None else index


def test_tokenizer_facts_and_the_official_eval_query(golden, tokenizer):
    facts = golden["clip_tokenizer"]["config"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        facts["bos_token_id"], facts["eos_token_id"], facts["pad_token_id"])
    assert len(tokenizer) == facts["vocab_size"] and tokenizer.mask_token_id == 49404
    case = golden["clip_tokenizer"]["cases"]["create_queries_and_maps"]
    query, spans = build_detection_prompt(case["label_list"], separator=case["SEPARATION_TOKENS"])
    assert query == case["query"]
    tokenized = tokenize_prompts(tokenizer, query, max_len=256)
    token_map = spans_to_token_map(tokenized, dict(zip(case["labels"], [[s] for s in spans])), 256, caption=query)
    assert token_map == case["positive_map_label_to_token"]
