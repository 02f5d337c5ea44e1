"""A shifted task for the quick-start detector: the same synthetic shapes under new names.

The detector learned "red circle", "blue square", ...; here every colour and shape word is replaced
by another one ("crimson disc", "navy block", ...), the kind of vocabulary shift prompt tuning is
for (paper section 3.3): the images and boxes are those of glipv2_synthetic_{train,val}, only the
prompt's words change. Zero-shot, prompt tuning and full fine-tuning are compared on it in
projects/GLIPv2/README.md.
"""

from __future__ import annotations

from detectron2.data import DatasetCatalog, MetadataCatalog

from glipv2_d2.data.datasets import unregister_dataset

from .shapes import ALL_PAIRS

__all__ = ["RENAMED_COLOURS", "RENAMED_SHAPES", "register_synthetic_renamed", "renamed_classes"]

RENAMED_COLOURS = {"red": "crimson", "green": "emerald", "blue": "navy", "yellow": "golden"}
RENAMED_SHAPES = {"circle": "disc", "square": "block", "triangle": "wedge"}


def renamed_classes() -> list[str]:
    """The 12 categories' new names, in the synthetic category order."""
    return [f"{RENAMED_COLOURS[colour]} {RENAMED_SHAPES[shape]}" for colour, shape in ALL_PAIRS]


def register_synthetic_renamed(splits: tuple[str, ...] = ("train", "val")) -> None:
    """Register glipv2_synthetic_renamed_<split> over the registered glipv2_synthetic_<split>
    (call ``register_synthetic_shapes`` first): same records and evaluation json, new names."""
    for split in splits:
        source, name = f"glipv2_synthetic_{split}", f"glipv2_synthetic_renamed_{split}"
        unregister_dataset(name)
        DatasetCatalog.register(name, lambda source=source: DatasetCatalog.get(source))
        metadata = MetadataCatalog.get(source)
        MetadataCatalog.get(name).set(
            json_file=metadata.json_file,
            image_root=metadata.image_root,
            evaluator_type="coco",
            thing_classes=renamed_classes(),
            thing_dataset_id_to_contiguous_id=dict(metadata.thing_dataset_id_to_contiguous_id),
        )
