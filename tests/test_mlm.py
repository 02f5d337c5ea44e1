"""Masked language modelling: BERT masking rule, the head's official layout, its loss, pretrained loading."""

import csv

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM, BertForPreTraining, BertModel, BertPreTrainedModel

from glipv2_d2.checkpoint import convert_official_state_dict, official_to_model_key
from glipv2_d2.modeling.language import BertTextEncoder, build_tokenizer, minilm_model_dir
from glipv2_d2.modeling.mlm import (
    IGNORE_INDEX,
    MaskedLanguageModelingHead,
    MaskingVocabulary,
    load_pretrained_mlm_head,
    mask_tokens,
)

from .conftest import DATA_DIR

PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
BERT_VOCAB = MaskingVocabulary(mask_token_id=MASK, special_token_ids=(PAD, UNK, CLS, SEP, MASK), vocab_size=30522)
SPECIALS = torch.tensor(BERT_VOCAB.special_token_ids)


pytestmark = pytest.mark.usefixtures("single_thread")


def prompt_batch(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] words [SEP] [PAD]...: random lengths in [3, length], word ids avoid the special ids."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, length + 1, (batch,), generator=g)
    ids = torch.randint(1000, 30522, (batch, length), generator=g)
    positions = torch.arange(length).expand(batch, length)
    ids[:, 0] = CLS
    ids[positions == (lengths - 1)[:, None]] = SEP
    mask = (positions < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- masking


def test_masking_is_reproducible_from_a_seed():
    ids, mask = prompt_batch(8, 40)
    first = mask_tokens(ids, mask, BERT_VOCAB, generator=seeded(7))
    again = mask_tokens(ids, mask, BERT_VOCAB, generator=seeded(7))
    other = mask_tokens(ids, mask, BERT_VOCAB, generator=seeded(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[1], other[1])


def test_masking_leaves_its_inputs_untouched():
    ids, mask = prompt_batch(4, 20)
    before = ids.clone()
    mask_tokens(ids, mask, BERT_VOCAB, probability=1.0, generator=seeded(0))
    assert torch.equal(ids, before)


def test_only_eligible_real_non_special_tokens_are_chosen():
    ids, mask = prompt_batch(16, 30)
    eligible = torch.rand(ids.shape, generator=seeded(1)) < 0.5
    masked, labels = mask_tokens(ids, mask, BERT_VOCAB, probability=1.0, generator=seeded(2), eligible=eligible)
    candidates = mask.bool() & ~torch.isin(ids, SPECIALS) & eligible
    chosen = labels != IGNORE_INDEX
    assert torch.equal(chosen, candidates)  # probability 1: every candidate, nothing else
    assert torch.equal(labels[chosen], ids[chosen])
    assert (labels[~chosen] == IGNORE_INDEX).all()
    assert torch.equal(masked[~chosen], ids[~chosen])  # specials, padding, ineligible tokens untouched


def test_labels_are_ignore_index_exactly_outside_changed_or_kept_positions():
    ids, mask = prompt_batch(32, 50)
    masked, labels = mask_tokens(ids, mask, BERT_VOCAB, generator=seeded(3))
    changed = masked != ids
    chosen = labels != IGNORE_INDEX
    assert not (changed & ~chosen).any()  # nothing outside the chosen positions changes
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(labels[~chosen], torch.full_like(labels[~chosen], IGNORE_INDEX))


def test_probability_and_80_10_10_split_on_a_large_batch():
    ids, mask = prompt_batch(2048, 128)
    masked, labels = mask_tokens(ids, mask, BERT_VOCAB, generator=seeded(4))
    candidates = mask.bool() & ~torch.isin(ids, SPECIALS)
    chosen = labels != IGNORE_INDEX
    n = chosen.sum().item()
    to_mask = chosen & (masked == MASK)
    kept = chosen & (masked == ids)
    replaced = chosen & ~to_mask & ~kept
    # ~110k candidates, ~16k chosen: each tolerance is more than 6 standard deviations
    assert chosen.sum().item() / candidates.sum().item() == pytest.approx(0.15, abs=0.007)
    assert to_mask.sum().item() / n == pytest.approx(0.8, abs=0.02)
    assert replaced.sum().item() / n == pytest.approx(0.1, abs=0.015)
    assert kept.sum().item() / n == pytest.approx(0.1, abs=0.015)
    random_ids = masked[replaced]
    assert not torch.isin(random_ids, SPECIALS).any()
    assert random_ids.unique().numel() > 0.9 * random_ids.numel()  # spread over the vocabulary


def test_random_replacements_never_draw_special_ids_even_from_a_tiny_vocabulary():
    vocab = MaskingVocabulary(mask_token_id=4, special_token_ids=(0, 1, 2, 3, 4), vocab_size=7)
    ids = torch.full((64, 64), 5)
    masked, labels = mask_tokens(ids, torch.ones_like(ids), vocab, probability=1.0, generator=seeded(5))
    replaced = (labels != IGNORE_INDEX) & (masked != 4)
    assert set(masked[replaced].unique().tolist()) == {5, 6}


def test_vocabulary_from_the_project_tokenizer():
    vocab = MaskingVocabulary.from_tokenizer(build_tokenizer("bert-base-uncased"))
    assert vocab == BERT_VOCAB


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attention_mask": torch.ones(2, 5)}, "attention_mask shape"),
        ({"eligible": torch.ones(3, 4, dtype=torch.bool)}, "eligible shape"),
        ({"probability": 1.5}, "probability"),
        ({"input_ids": torch.zeros(2, 4)}, "input_ids"),
    ],
)
def test_masking_names_the_bad_input(kwargs, message):
    call = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4)} | kwargs
    with pytest.raises(ValueError, match=message):
        mask_tokens(call.pop("input_ids"), call.pop("attention_mask"), BERT_VOCAB, **call)


def test_vocabulary_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="vocab_size=100"):
        MaskingVocabulary(mask_token_id=103, special_token_ids=(0,), vocab_size=100)


# ---------------------------------------------------------------- head


def official_mlm_rows() -> dict[str, tuple[int, ...]]:
    with open(DATA_DIR / "glip_tiny_state_dict.tsv") as f:
        rows = csv.DictReader([line for line in f if not line.startswith("#")], delimiter="\t")
        return {r["key"]: tuple(int(d) for d in r["shape"].split("x")) for r in rows if r["group"] == "mlm"}


def test_head_keys_and_shapes_equal_the_official_checkpoint_rows():
    head = MaskedLanguageModelingHead.from_text_config(BertConfig())  # bert-base-uncased sizes
    official = {official_to_model_key(k): shape for k, shape in official_mlm_rows().items()}
    ours = {f"mlm_head.{k}": tuple(v.shape) for k, v in head.state_dict().items()}
    assert ours == official
    assert len(official) == 7
    assert head.decoder.bias is head.bias  # one tensor under two names, as in the official head
    assert len(list(head.parameters())) == 6


def test_official_mlm_tensors_convert_one_to_one_onto_the_head():
    """Both names of the tied bias are in the official file and in our state dict: no special case."""
    head = MaskedLanguageModelingHead.from_text_config(BertConfig())
    rows = official_mlm_rows()
    official = {k: torch.full(shape, float(i)) for i, (k, shape) in enumerate(rows.items())}
    official["rpn.head.mlm_head.decoder.bias"] = official["rpn.head.mlm_head.bias"]
    model_state = {f"mlm_head.{k}": v for k, v in head.state_dict().items()}
    converted = convert_official_state_dict(official, model_state)
    head.load_state_dict({k.removeprefix("mlm_head."): v for k, v in converted.items()})
    for key, value in official.items():
        assert torch.equal(head.state_dict()[key.removeprefix("rpn.head.mlm_head.")], value), key


def tiny_head(seed: int = 0, hidden: int = 8, vocab: int = 11) -> MaskedLanguageModelingHead:
    torch.manual_seed(seed)
    head = MaskedLanguageModelingHead(hidden_size=hidden, vocab_size=vocab)
    torch.nn.init.normal_(head.bias)  # non-zero, so the bias matters in the comparisons
    return head


def test_loss_equals_cross_entropy_by_hand():
    head = tiny_head()
    fused = torch.randn(2, 5, 8)
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 10, 0], [IGNORE_INDEX] * 4 + [7]])
    hidden = head.transform.LayerNorm(F.gelu(fused @ head.transform.dense.weight.T + head.transform.dense.bias))
    log_probs = torch.log_softmax(hidden @ head.decoder.weight.T + head.bias, dim=-1)
    picked = [log_probs[b, t, labels[b, t]] for b, t in labels.ne(IGNORE_INDEX).nonzero().tolist()]
    expected = -torch.stack(picked).mean()
    torch.testing.assert_close(head(fused, labels), expected, rtol=1e-6, atol=1e-6)


def test_loss_without_labels_is_zero_and_gives_every_parameter_a_gradient():
    head = tiny_head()
    fused = torch.randn(2, 5, 8, requires_grad=True)
    loss = head(fused, torch.full((2, 5), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0
    for name, param in head.named_parameters():
        assert param.grad is not None and not param.grad.any(), name
    assert fused.grad is not None and not fused.grad.any()


def test_loss_runs_in_float32_under_autocast():
    head = tiny_head()
    fused = torch.randn(2, 5, 8).bfloat16()
    labels = torch.tensor([[1, IGNORE_INDEX, 2, 3, IGNORE_INDEX], [4, 5, IGNORE_INDEX, 6, 7]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(fused, labels)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, head(fused.float(), labels))


def test_head_rejects_labels_of_another_shape():
    with pytest.raises(ValueError, match="labels shape"):
        tiny_head()(torch.randn(2, 5, 8), torch.zeros(2, 4, dtype=torch.long))


def test_mlm_loss_falls_when_training_a_tiny_bert():
    torch.manual_seed(0)
    config = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    encoder = BertTextEncoder(config)
    head = MaskedLanguageModelingHead.from_text_config(encoder.model.config)
    vocab = MaskingVocabulary(mask_token_id=4, special_token_ids=(0, 1, 2, 3, 4), vocab_size=64)
    ids = torch.randint(5, 64, (8, 16), generator=seeded(0))
    mask = torch.ones_like(ids)
    masked, labels = mask_tokens(ids, mask, vocab, probability=0.3, generator=seeded(1))
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=3e-3)
    losses = []
    for _ in range(30):
        loss = head(encoder(masked, mask)["hidden"], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------- pretrained LM head

TINY_BERT = {"vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 32}


def saved_masked_lm(folder, tie_word_embeddings: bool, architecture=BertForMaskedLM) -> BertPreTrainedModel:
    torch.manual_seed(0)
    model = architecture(BertConfig(**TINY_BERT, tie_word_embeddings=tie_word_embeddings)).eval()
    predictions = model.cls.predictions
    with torch.no_grad():
        predictions.bias.normal_()
        predictions.decoder.bias.normal_()  # untied: the value the model actually adds
        predictions.transform.LayerNorm.weight.normal_()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("architecture", [BertForMaskedLM, BertForPreTraining])
@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_loading_a_saved_masked_lm_reproduces_its_logits(tmp_path, tie_word_embeddings, architecture):
    model = saved_masked_lm(tmp_path, tie_word_embeddings, architecture)
    head = MaskedLanguageModelingHead.from_text_config(model.config)
    assert load_pretrained_mlm_head(head, tmp_path)
    hidden = torch.randn(3, 7, 16)
    with torch.no_grad():
        assert torch.equal(head.logits(hidden), model.cls.predictions(hidden))
    assert head.decoder.bias is head.bias


def save_weights_only(folder, model: BertPreTrainedModel, state: dict[str, torch.Tensor]) -> None:
    """A pre-safetensors folder: config.json and pytorch_model.bin holding ``state``."""
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(state, folder / "pytorch_model.bin")


def test_loading_a_legacy_bin_with_gamma_beta_names(tmp_path):
    model = saved_masked_lm(tmp_path / "modern", tie_word_embeddings=True)
    legacy = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in model.state_dict().items() if k != "cls.predictions.decoder.bias"
    }
    save_weights_only(tmp_path / "legacy", model, legacy)
    head = MaskedLanguageModelingHead.from_text_config(model.config)
    assert load_pretrained_mlm_head(head, tmp_path / "legacy")
    hidden = torch.randn(2, 4, 16)
    with torch.no_grad():
        assert torch.equal(head.logits(hidden), model.cls.predictions(hidden))


def test_a_bare_bert_model_has_no_lm_head_and_leaves_the_head_untouched(tmp_path):
    BertModel(BertConfig(**TINY_BERT), add_pooling_layer=False).save_pretrained(tmp_path)
    head = MaskedLanguageModelingHead(hidden_size=16, vocab_size=40)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    assert not load_pretrained_mlm_head(head, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())


def test_the_shipped_minilm_has_no_lm_head():
    assert not load_pretrained_mlm_head(MaskedLanguageModelingHead(hidden_size=384, vocab_size=8), minilm_model_dir())


def test_loading_names_the_folder_and_the_mismatched_shapes(tmp_path):
    saved_masked_lm(tmp_path / "full", tie_word_embeddings=False)
    head = MaskedLanguageModelingHead(hidden_size=16, vocab_size=41)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(ValueError, match=r"full: .*decoder\.weight: checkpoint \(40, 16\) vs head \(41, 16\)"):
        load_pretrained_mlm_head(head, tmp_path / "full")
    assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())


def test_loading_names_what_an_incomplete_lm_head_lacks(tmp_path):
    model = saved_masked_lm(tmp_path / "full", tie_word_embeddings=False)
    partial = {k: v for k, v in model.state_dict().items() if "transform.dense" not in k}
    save_weights_only(tmp_path / "partial", model, partial)
    lacking = r"cls\.predictions\.transform\.dense\.bias, cls\.predictions\.transform\.dense\.weight$"
    with pytest.raises(ValueError, match=r"partial: incomplete LM head, missing " + lacking):
        load_pretrained_mlm_head(MaskedLanguageModelingHead(hidden_size=16, vocab_size=40), tmp_path / "partial")


def test_loading_from_a_missing_path_names_it(tmp_path):
    with pytest.raises(OSError, match="nowhere"):
        load_pretrained_mlm_head(MaskedLanguageModelingHead(hidden_size=16, vocab_size=40), tmp_path / "nowhere")
