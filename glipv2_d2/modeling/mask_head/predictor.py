"""Per-pixel region-word matching: GLIP's ``VLMaskRCNNC4Predictor`` with per-image text.

A box's 28x28 pixel features are scored against the fused word features of ITS image's prompt,
so one batch may mix prompts (officially every box shares one sentence). Tokens are independent
of one another, so the caller may pass only the token columns it will read (never padding).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LOGIT_CLAMP", "VisionLanguageMaskPredictor"]

LOGIT_CLAMP = 50000.0  # |logit| bound, as in GLIP's region-word heads


class VisionLanguageMaskPredictor(nn.Module):
    """``(N, C, R, R)`` box features + ``(B, T, D)`` word features -> ``(N, T, 2R, 2R)`` logits.

    ``logit = relu(deconv2x2(x)) . Linear(normalize(word) / 2) / exp(log_scale) + normalize(word) .
    bias_lang``, clamped to +-50000. Pixel features are not normalised, words are.
    """

    def __init__(self, in_channels: int, text_dim: int, log_scale_init: float = 0.0):
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, in_channels, 2, stride=2)
        self.dot_product_projection_text = nn.Linear(text_dim, in_channels)
        self.log_scale = nn.Parameter(torch.tensor([float(log_scale_init)]))
        self.bias_lang = nn.Parameter(torch.zeros(text_dim))
        for weight in (self.conv5_mask.weight, self.dot_product_projection_text.weight):
            nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv5_mask.bias)
        nn.init.zeros_(self.dot_product_projection_text.bias)

    def project_tokens(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, T, D)`` words -> projected words ``(B, T, C)`` and their language bias ``(B, T)``."""
        words = F.normalize(text, p=2, dim=-1)
        return self.dot_product_projection_text(words / 2.0), torch.matmul(words, self.bias_lang)

    def forward(self, x: Tensor, text: Tensor, image_index: Tensor) -> Tensor:
        """Logits of each box (row of ``x``) against the tokens of its image ``image_index``."""
        if len(image_index) != len(x):
            raise ValueError(f"{len(x)} boxes but {len(image_index)} image indices")
        pixels = F.relu(self.conv5_mask(x))
        num_boxes, channels, height, width = pixels.shape
        tokens, token_bias = self.project_tokens(text)
        queries = pixels.permute(0, 2, 3, 1).reshape(num_boxes, height * width, channels)
        logits = torch.bmm(queries, tokens[image_index].transpose(1, 2)) / self.log_scale.exp()
        logits = (logits + token_bias[image_index][:, None, :]).clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
        return logits.view(num_boxes, height, width, -1).permute(0, 3, 1, 2)
