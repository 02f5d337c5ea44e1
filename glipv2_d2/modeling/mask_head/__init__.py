"""GLIPv2's language-guided mask head; importing registers "MaskHead" as a task head."""

from .head import MaskHead
from .paste import paste_masks

__all__ = ["MaskHead", "paste_masks"]
