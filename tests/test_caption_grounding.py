"""Grounded captioning's text side: words from word pieces, phrases from content words, and the
box of the highest region-word logit."""

import torch

from glipv2_d2.modeling.caption.grounding import caption_words, content_phrases, ground_groups
from glipv2_d2.modeling.language import build_tokenizer


def test_words_join_word_pieces_and_punctuation_joins_the_word_before():
    tokenizer = build_tokenizer("minilm")
    ids = tokenizer("a red circle above two bluish squares.", add_special_tokens=False)["input_ids"]
    caption, words = caption_words(tokenizer, ids)
    assert caption == "a red circle above two bluish squares."
    assert [w.text for w in words] == ["a", "red", "circle", "above", "two", "bluish", "squares", "."]
    assert all(caption[w.span[0]:w.span[1]] == w.text for w in words)
    bluish = words[5]
    assert len(bluish.positions) == len(tokenizer.tokenize("bluish")) and bluish.positions[0] == 6  # [CLS] is 0
    phrases = content_phrases(words)
    assert [" ".join(w.text for w in p) for p in phrases] == ["red circle", "two bluish squares"]


def test_each_group_takes_the_anchor_with_the_highest_mean_logit():
    logits = torch.tensor([[0.0, 5.0, -1.0], [2.0, 0.0, 3.0], [1.0, 1.0, 1.0]])  # 3 anchors x 3 tokens
    boxes = torch.tensor([[0.0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]])
    chosen, scores = ground_groups(logits, boxes, [[1], [0, 2], [0, 1, 2]])
    assert chosen.tolist() == [[0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    torch.testing.assert_close(scores, torch.tensor([5.0, 2.5, 5.0 / 3]).sigmoid())
    empty_boxes, empty_scores = ground_groups(logits, boxes, [])
    assert empty_boxes.shape == (0, 4) and empty_scores.shape == (0,)
