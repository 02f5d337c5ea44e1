"""Detectron2 DefaultTrainer for GLIPv2: grounding data, AdamW groups, AMP dtype, EMA, exact resume."""

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
from ..data.mappers import DetectionGroundingMapper
from ..evaluation import LVISFixedAPEvaluator, PromptedDetector
from .ema import EMAHook, ModelEMA
from .optimization import build_glipv2_optimizer, freeze_parameters

logger = logging.getLogger(__name__)


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
        loader, sampler = build_resumable_train_loader(cfg, DetectionGroundingMapper(cfg, is_train=True))
        loader.draw_sampler = sampler
        return loader

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=DetectionGroundingMapper(cfg, is_train=False, dataset_names=[dataset_name])
        )

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None) -> DatasetEvaluator:
        """COCO AP, or for LVIS-type sets LVIS AP (fixed AP when cfg.TEST.LVIS_FIXED_AP)."""
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
        if evaluator_type == "lvis" and cfg.TEST.LVIS_FIXED_AP:
            return LVISFixedAPEvaluator(dataset_name, output_dir=output_folder)
        if evaluator_type == "lvis":
            return LVISEvaluator(dataset_name, tasks=("bbox",), output_dir=output_folder,
                                 max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)
        return COCOEvaluator(dataset_name, tasks=("bbox",), output_dir=output_folder,
                             max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)

    @classmethod
    def test(cls, cfg: CfgNode, model: nn.Module, evaluators=None):
        """Evaluate every test set with its whole vocabulary as the (chunked) prompt."""
        model = getattr(model, "module", model)
        results = {}
        for index, dataset_name in enumerate(cfg.DATASETS.TEST):
            names = MetadataCatalog.get(dataset_name).thing_classes
            prompted = PromptedDetector(model, names, cfg.TEST.PROMPT_CHUNK_SIZE)
            single = cfg.clone()
            single.defrost()
            single.DATASETS.TEST = (dataset_name,)
            evaluator = None if evaluators is None else [evaluators[index]]
            results.update(super().test(single, prompted, evaluator))
        return results

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
