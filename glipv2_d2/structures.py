"""The text a GLIPv2 model reads, tokenized once on the data side and carried as one object.

Mappers, the predictor and chunked evaluation build a ``Prompt`` (see ``glipv2_d2.data.prompts``);
the model pads a batch of them and never tokenizes again. It lives outside ``data/`` and
``modeling/`` because both sides read it, as Detectron2's ``Instances``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["NO_CATEGORY", "Prompt"]

# Token category of tokens that name no category: separators, special tokens, free-form captions.
NO_CATEGORY = -1


@dataclass(frozen=True, eq=False)  # tensors have no single truth value to compare
class Prompt:
    """One tokenized prompt and what its tokens stand for.

    Attributes:
        caption: the text.
        input_ids: ``(T,)`` int64 token ids, [CLS] ... [SEP], unpadded.
        attention_mask: ``(T,)`` int64, 1 on every token (padding is added per batch by the model).
        label_to_tokens: label -> sorted token indices; labels are the prompt's category ids (detection)
            or phrase / box indices (captions). Inference scores a label by the mean of its tokens.
        token_categories: ``(T,)`` int64 category identity of each token that names a category
            (``category_uid`` of its name, shared by every dataset), ``NO_CATEGORY`` elsewhere and for
            every token of a free-form caption. GLIPv2's inter-image loss propagates labels along it.
        label_names: label -> the category name or phrase text, for naming detections.
        text_embedding: ``(T, H)`` text-encoder output to use instead of running the encoder (a tuned
            prompt, see ``glipv2_d2.modeling.prompt_tuning``); None: the encoder reads the tokens.
    """

    caption: str
    input_ids: Tensor
    attention_mask: Tensor
    label_to_tokens: dict[int, list[int]]
    token_categories: Tensor
    label_names: dict[int, str] = field(default_factory=dict)
    text_embedding: Tensor | None = None

    def __post_init__(self) -> None:
        num_tokens = len(self.input_ids)
        if self.input_ids.dim() != 1 or self.attention_mask.shape != (num_tokens,):
            raise ValueError(
                f"prompt {self.caption!r}: input_ids {tuple(self.input_ids.shape)} and attention_mask "
                f"{tuple(self.attention_mask.shape)} must be one (T,) row each"
            )
        if self.token_categories.shape != (num_tokens,):
            raise ValueError(
                f"prompt {self.caption!r}: token_categories has shape {tuple(self.token_categories.shape)}, "
                f"expected ({num_tokens},)"
            )
        if self.text_embedding is not None and (
            self.text_embedding.dim() != 2 or self.text_embedding.shape[0] != num_tokens
        ):
            raise ValueError(
                f"prompt {self.caption!r}: text_embedding has shape {tuple(self.text_embedding.shape)}, "
                f"expected ({num_tokens}, hidden size)"
            )
        outside = {label: tokens for label, tokens in self.label_to_tokens.items()
                   if any(not 0 <= t < num_tokens for t in tokens)}
        if outside:
            raise ValueError(f"prompt {self.caption!r}: labels {outside} name tokens outside its {num_tokens} tokens")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def names_categories(self) -> bool:
        """Whether the prompt names dataset categories (a detection prompt), not a free-form caption."""
        return bool((self.token_categories != NO_CATEGORY).any())
