"""Detectron2 DefaultTrainer for GLIPv2: mixed detection/grounding data, AdamW groups, AMP dtype, EMA,
exact resume, and evaluation of detection sets (vocabulary prompts) and grounding sets (own captions)."""

import logging
import random
import weakref

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.engine import DefaultTrainer, HookBase, hooks
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, LVISEvaluator
from detectron2.modeling import build_model
from detectron2.utils import comm
from torch import nn

from ..checkpoint import GLIPv2Checkpointer
from ..data.build import build_resumable_train_loader
from ..data.grounding_mapper import GroundingMapper
from ..data.mappers import DetectionGroundingMapper
from ..evaluation import Flickr30kGroundingEvaluator, LVISFixedAPEvaluator, PromptedDetector
from .ema import EMAHook, ModelEMA
from .optimization import build_glipv2_optimizer, freeze_parameters

logger = logging.getLogger(__name__)

GROUNDING_EVALUATOR_TYPE = "flickr30k"


def is_grounding_test_set(dataset_name: str) -> bool:
    """Phrase-grounding test sets are scored per caption (Recall@k), not with a vocabulary prompt."""
    return MetadataCatalog.get(dataset_name).get("evaluator_type") == GROUNDING_EVALUATOR_TYPE


class PerIterationSeed(HookBase):
    """Seed every RNG from (seed, iteration, rank) before each step: dropout and drop-path then
    draw the same numbers in a resumed run as in an uninterrupted one."""

    def __init__(self, seed: int):
        self.seed = seed

    def before_step(self) -> None:
        step_seed = (self.seed * 1_000_003 + self.trainer.iter * comm.get_world_size() + comm.get_rank()) % 2**31
        random.seed(step_seed)
        np.random.seed(step_seed)
        torch.manual_seed(step_seed)


class GLIPv2Trainer(DefaultTrainer):
    """DefaultTrainer with GLIP's training recipe; `--resume` continues bit for bit."""

    def __init__(self, cfg: CfgNode):
        self.ema = None
        super().__init__(cfg)
        if cfg.SOLVER.AMP.ENABLED:
            precision = {"float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.SOLVER.AMP.PRECISION]
            self._trainer.precision = precision
            if precision == torch.bfloat16:
                self._trainer.grad_scaler = torch.amp.GradScaler("cuda", enabled=False)

    @classmethod
    def build_model(cls, cfg: CfgNode) -> nn.Module:
        model = build_model(cfg)
        frozen = freeze_parameters(cfg, model)
        if frozen:
            logger.info("frozen parameters: %d tensors", len(frozen))
        return model

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
        return build_glipv2_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        """Every dataset of cfg.DATASETS.TRAIN with the mapper of its task, mixed by DATASETS.TRAIN_RATIOS."""
        loader, sampler = build_resumable_train_loader(cfg)
        loader.draw_sampler = sampler
        return loader

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        """Grounding sets keep each image's caption, "phrases" and "annotations" (the evaluator's
        ground truth); detection sets get the dataset's vocabulary prompt."""
        if is_grounding_test_set(dataset_name):
            mapper = GroundingMapper(cfg, is_train=False)
        else:
            mapper = DetectionGroundingMapper(cfg, is_train=False, dataset_names=[dataset_name])
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None) -> DatasetEvaluator:
        """COCO AP; for LVIS-type sets LVIS AP (fixed AP when cfg.TEST.LVIS_FIXED_AP); for Flickr30K-type
        sets phrase-grounding Recall@k, on merged boxes when the metadata's "gt_type" is "merged" (as
        the glipv2_flickr30k_merged_* registrations say) and on any single box otherwise."""
        metadata = MetadataCatalog.get(dataset_name)
        evaluator_type = metadata.get("evaluator_type", "coco")
        if evaluator_type == GROUNDING_EVALUATOR_TYPE:
            return Flickr30kGroundingEvaluator(merge_boxes=metadata.get("gt_type") == "merged")
        if evaluator_type == "lvis" and cfg.TEST.LVIS_FIXED_AP:
            return LVISFixedAPEvaluator(dataset_name, output_dir=output_folder)
        if evaluator_type == "lvis":
            return LVISEvaluator(dataset_name, tasks=("bbox",), output_dir=output_folder,
                                 max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)
        return COCOEvaluator(dataset_name, tasks=("bbox",), output_dir=output_folder,
                             max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)

    @classmethod
    def test(cls, cfg: CfgNode, model: nn.Module, evaluators=None):
        """Evaluate every test set: detection sets with their whole vocabulary as the (chunked) prompt,
        grounding sets with each image's own caption. Results as DefaultTrainer.test: one set's
        dict, or {dataset name: its dict} for several."""
        model = getattr(model, "module", model)
        results = {}
        for index, dataset_name in enumerate(cfg.DATASETS.TEST):
            single = cfg.clone()
            single.defrost()
            single.DATASETS.TEST = (dataset_name,)
            evaluator = None if evaluators is None else [evaluators[index]]
            results[dataset_name] = super().test(single, cls._evaluated_model(cfg, model, dataset_name), evaluator)
        return next(iter(results.values())) if len(results) == 1 else results

    @staticmethod
    def _evaluated_model(cfg: CfgNode, model: nn.Module, dataset_name: str) -> nn.Module:
        """Grounding inputs already carry their caption and phrase label map; detection inputs get the
        dataset's vocabulary as prompts."""
        if is_grounding_test_set(dataset_name):
            return model
        names = MetadataCatalog.get(dataset_name).thing_classes
        return PromptedDetector(model, names, cfg.TEST.PROMPT_CHUNK_SIZE)

    def build_hooks(self) -> list[HookBase]:
        model = getattr(self.model, "module", self.model)
        self.checkpointer = GLIPv2Checkpointer(model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        built = super().build_hooks()
        extra: list[HookBase] = [PerIterationSeed(self.cfg.DATALOADER.SEED)]
        if self.cfg.SOLVER.EMA.ENABLED:
            self.ema = ModelEMA(model, self.cfg.SOLVER.EMA.DECAY)
            extra.append(EMAHook(self.ema, model))
            if self.cfg.SOLVER.EMA.EVAL_WITH_EMA:
                for hook in built:
                    if isinstance(hook, hooks.EvalHook):
                        hook._func = self._with_ema(hook._func)
        return extra + built

    def _with_ema(self, evaluate):
        def evaluate_with_ema():
            with self.ema.applied_to(getattr(self.model, "module", self.model)):
                return evaluate()

        return evaluate_with_ema

    def resume_or_load(self, resume: bool = True) -> None:
        super().resume_or_load(resume)
        self._trainer.data_loader.draw_sampler.start = self.start_iter * self.cfg.SOLVER.IMS_PER_BATCH

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
