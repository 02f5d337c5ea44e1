"""COCO AP over the categories a dataset prompts, for jsons that list more.

ODinW's Roboflow jsons list a supercategory with id 0 that is no category of the dataset (GLIP
drops it, see ``glipv2_d2.data.datasets.odinw``). Detectron2's COCOEvaluator would evaluate it as
a category of its own and then fail to name the per-category APs; this one forgets every category
that the metadata's ``thing_dataset_id_to_contiguous_id`` does not map, and is COCOEvaluator
itself for any json whose categories are exactly the vocabulary.
"""

import contextlib
import io

from detectron2.evaluation import COCOEvaluator

__all__ = ["VocabularyCOCOEvaluator"]


class VocabularyCOCOEvaluator(COCOEvaluator):
    def __init__(self, dataset_name: str, *args, **kwargs):
        super().__init__(dataset_name, *args, **kwargs)
        vocabulary = set(getattr(self._metadata, "thing_dataset_id_to_contiguous_id", {}))
        categories = self._coco_api.dataset.get("categories", [])
        kept = [c for c in categories if c["id"] in vocabulary]
        if vocabulary and len(kept) < len(categories):
            self._coco_api.dataset["categories"] = kept
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
                self._coco_api.createIndex()
