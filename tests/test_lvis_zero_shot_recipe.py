"""The zero-shot LVIS recipe (configs/lvis/glipv2_T_zeroshot.yaml) is GLIP's: minival, prompts of
40 names, 300 detections per chunk and image, fixed AP with APr / APc / APf."""

from detectron2.data import MetadataCatalog

from glipv2_d2.config import setup_cfg
from glipv2_d2.engine.trainer import GLIPv2Trainer
from glipv2_d2.evaluation import LVISFixedAPEvaluator

from .tiny_model import REPO


def test_the_recipe_chunks_by_40_and_scores_fixed_ap(tmp_path):
    cfg = setup_cfg(REPO / "configs" / "lvis" / "glipv2_T_zeroshot.yaml")
    assert cfg.DATASETS.TEST == ("glipv2_lvis_v1_minival",)
    assert (cfg.TEST.PROMPT_CHUNK_SIZE, cfg.TEST.LVIS_FIXED_AP, cfg.MODEL.ATSS.DETECTIONS_PER_IMG) == (40, True, 300)
    json_file = tmp_path / "minival.json"
    json_file.write_text('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a", "frequency": "r"}]}')
    MetadataCatalog.get("lvis_recipe_probe").set(evaluator_type="lvis", json_file=str(json_file))
    evaluator = GLIPv2Trainer.build_evaluator(cfg, "lvis_recipe_probe")
    assert isinstance(evaluator, LVISFixedAPEvaluator) and evaluator._topk_per_category == 10_000
    MetadataCatalog.remove("lvis_recipe_probe")
