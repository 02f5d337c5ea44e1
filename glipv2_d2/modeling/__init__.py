"""Model components; importing registers the backbone, text encoder, meta-architecture and task heads."""

from . import (
    backbone,  # noqa: F401  (registers build_swin_fpn_p6p7_backbone)
    caption,  # noqa: F401  (registers the CaptionHead task head)
    mask_head,  # noqa: F401  (registers the MaskHead task head)
    vqa_head,  # noqa: F401  (registers the VQAHead task head)
)
from .language import LANGUAGE_BACKBONE_REGISTRY  # noqa: F401
from .meta_arch import GLIPv2

__all__ = ["GLIPv2"]
