"""Dataset registration for GLIPv2; importing it registers the builtin names, like Detectron2.

Registered lazily (nothing is read or generated until DatasetCatalog.get) under the root
$DETECTRON2_DATASETS (default "datasets"): glipv2_coco_2017_{train,val}, glipv2_lvis_v1_{train,val}
(+ minival when present), glipv2_synthetic_{train,val,heldout} and glipv2_synthetic_lvis_val (the
synthetic val split in LVIS format), MDETR-format grounding sets when their files exist
(glipv2_flickr30k_{train,val,test}, glipv2_flickr30k_merged_*, glipv2_goldg_train) and the synthetic
grounding / caption splits glipv2_synthetic_grounding_{train,val}, glipv2_synthetic_caption_train.
"""

import os

from .coco_lvis import (
    datasets_root,
    load_grounding_coco_json,
    register_coco_and_lvis,
    register_grounding_coco,
)
from .mdetr import load_mdetr_json, register_mdetr_datasets, register_mdetr_grounding, register_synthetic_grounding
from .synthetic_lvis import coco_to_lvis, register_synthetic_lvis
from .synthetic_shapes import (
    HELDOUT_CATEGORY_IDS,
    SYNTHETIC_CATEGORIES,
    generate_synthetic_shapes,
    register_synthetic_shapes,
)

__all__ = [
    "HELDOUT_CATEGORY_IDS",
    "SYNTHETIC_CATEGORIES",
    "coco_to_lvis",
    "datasets_root",
    "generate_synthetic_shapes",
    "load_grounding_coco_json",
    "load_mdetr_json",
    "register_coco_and_lvis",
    "register_all_glipv2_datasets",
    "register_grounding_coco",
    "register_mdetr_datasets",
    "register_mdetr_grounding",
    "register_synthetic_grounding",
    "register_synthetic_lvis",
    "register_synthetic_shapes",
]


def register_all_glipv2_datasets(root: str | os.PathLike | None = None) -> None:
    """(Re-)register every builtin name under `root` (default $DETECTRON2_DATASETS); idempotent, so
    a training script may call it again after changing the environment."""
    root = str(root) if root is not None else datasets_root()
    register_coco_and_lvis(root)
    register_synthetic_shapes(os.path.join(root, "glipv2_synthetic"))
    register_synthetic_lvis("val")
    register_mdetr_datasets(root)
    register_synthetic_grounding(os.path.join(root, "glipv2_synthetic"))


register_all_glipv2_datasets()
