"""Catalog bookkeeping shared by every registration function."""

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["unregister_dataset"]


def unregister_dataset(name: str) -> None:
    """Forget `name` in both catalogs (a no-op if it is not registered), so that registering it
    again, e.g. under another root, replaces the old entry instead of raising."""
    DatasetCatalog.pop(name, None)
    MetadataCatalog.pop(name, None)
