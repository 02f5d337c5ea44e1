"""The quick start's own data: synthetic coloured shapes generated on first use, registered as
detection (COCO and LVIS format), grounding, referring, (grounded) VQA and pseudo-labelled caption sets.

Not part of the glipv2_d2 library; projects/GLIPv2/train_net.py and the tests register the sets
with ``register_quickstart_datasets``.
"""

import os

from .captions import register_synthetic_captions
from .grounding import pseudo_label_synthetic, register_synthetic_grounding
from .lvis_format import coco_to_lvis, register_synthetic_lvis
from .referring import register_synthetic_referring
from .renamed import register_synthetic_renamed
from .shapes import (
    HELDOUT_CATEGORY_IDS,
    SYNTHETIC_CATEGORIES,
    default_synthetic_root,
    generate_synthetic_shapes,
    register_synthetic_shapes,
)
from .vqa import register_synthetic_vqa, synthetic_vqa_records, vqa_vocabulary_path

__all__ = [
    "HELDOUT_CATEGORY_IDS",
    "SYNTHETIC_CATEGORIES",
    "coco_to_lvis",
    "default_synthetic_root",
    "generate_synthetic_shapes",
    "pseudo_label_synthetic",
    "register_quickstart_datasets",
    "register_synthetic_captions",
    "register_synthetic_grounding",
    "register_synthetic_lvis",
    "register_synthetic_referring",
    "register_synthetic_renamed",
    "register_synthetic_shapes",
    "register_synthetic_vqa",
    "synthetic_vqa_records",
    "vqa_vocabulary_path",
]


def register_quickstart_datasets(root: str | os.PathLike | None = None) -> None:
    """(Re-)register every synthetic set over the shapes under `root` (default
    $DETECTRON2_DATASETS/glipv2_synthetic): glipv2_synthetic_{train,val,heldout},
    glipv2_synthetic_lvis_val, glipv2_synthetic_grounding_{train,val}, glipv2_synthetic_referring_{train,val},
    glipv2_synthetic_vqa_{train,val}, glipv2_synthetic_caption_train and glipv2_synthetic_captions_val."""
    register_synthetic_shapes(root)
    register_synthetic_renamed()
    register_synthetic_lvis("val")
    register_synthetic_grounding(root)
    register_synthetic_captions(root)
    register_synthetic_referring(root)
    register_synthetic_vqa(root)
