"""Dataset registration for GLIPv2; importing it registers the builtin names, like Detectron2.

Registered lazily (nothing is read until DatasetCatalog.get) under the root $DETECTRON2_DATASETS
(default "datasets"): glipv2_coco_2017_{train,val}, glipv2_lvis_v1_{train,val} (+ minival when
present), glipv2_objects365_train, the MDETR-format sets whose files exist
(glipv2_flickr30k_{train,val,test}, glipv2_flickr30k_merged_*, glipv2_goldg_train, glipv2_cap4m_train),
the PhraseCut splits whose refer files exist (glipv2_phrasecut_{train,val,test,miniv}), the VQAv2
splits whose question files exist (glipv2_vqav2_{train,val,test-dev}) and the caption sets whose
files exist (glipv2_{coco,flickr30k}_karpathy_{train,val,test},
glipv2_flickr30k_grounded_captions_train).
"""

import os

from .captions import (
    CAPTION_EVALUATOR_TYPE,
    CAPTIONING_TASK,
    load_karpathy_captions,
    register_caption_datasets,
)
from .catalog import unregister_dataset
from .coco_lvis import (
    coco_category_metadata,
    datasets_root,
    load_grounding_coco_json,
    register_coco_and_lvis,
    register_grounding_coco,
)
from .mdetr import load_mdetr_json, register_mdetr_datasets, register_mdetr_grounding
from .phrasecut import load_phrasecut_json, register_phrasecut, register_phrasecut_datasets
from .vqav2 import VQA_EVALUATOR_TYPE, load_vqav2_json, register_vqav2, register_vqav2_datasets

__all__ = [
    "CAPTIONING_TASK",
    "CAPTION_EVALUATOR_TYPE",
    "VQA_EVALUATOR_TYPE",
    "coco_category_metadata",
    "datasets_root",
    "load_grounding_coco_json",
    "load_karpathy_captions",
    "load_mdetr_json",
    "load_phrasecut_json",
    "load_vqav2_json",
    "register_all_glipv2_datasets",
    "register_caption_datasets",
    "register_coco_and_lvis",
    "register_grounding_coco",
    "register_mdetr_datasets",
    "register_mdetr_grounding",
    "register_phrasecut",
    "register_phrasecut_datasets",
    "register_vqav2",
    "register_vqav2_datasets",
    "unregister_dataset",
]


def register_all_glipv2_datasets(root: str | os.PathLike | None = None) -> None:
    """(Re-)register every builtin name under `root` (default $DETECTRON2_DATASETS); idempotent, so
    a training script may call it again after changing the environment."""
    root = str(root) if root is not None else datasets_root()
    register_coco_and_lvis(root)
    register_mdetr_datasets(root)
    register_phrasecut_datasets(root)
    register_caption_datasets(root)
    register_vqav2_datasets(root)


register_all_glipv2_datasets()
