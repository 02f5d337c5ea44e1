"""Training for MODEL.PROMPT_TUNING: the GLIPv2 trainer with the network frozen and one prompt learned.

The model is the loaded MODEL.WEIGHTS (L_mlm and the EMA switched off) wrapped in
``PromptTuningModel`` (the training vocabulary as one fixed prompt); checkpoints hold the prompt
alone (a few hundred KB, so ``--resume`` works as usual) and the end of training writes the prompt
file OUTPUT_DIR/prompt_final.pth that evaluation (TEST.PROMPT_FILE, ``--prompt-file``) and the
predictor read.
"""

from __future__ import annotations

import logging
import os
import weakref

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.engine import HookBase
from detectron2.modeling import build_model
from detectron2.utils import comm
from torch import nn

from ..checkpoint import GLIPv2Checkpointer
from ..data.prompt_builder import PromptBuilder
from ..evaluation import PromptedDetector
from ..modeling.prompt_file import check_same_prompt, save_prompt_file
from ..modeling.prompt_tuning import PromptTuningModel
from .optimization import describe_trainable
from .trainer import GLIPv2Trainer

__all__ = ["PROMPT_FILE_NAME", "PromptTuningTrainer", "prompt_tuning_cfg"]

logger = logging.getLogger(__name__)

PROMPT_FILE_NAME = "prompt_final.pth"


def training_vocabulary(cfg: CfgNode) -> list[str]:
    """The one vocabulary every DATASETS.TRAIN set shares: the tuned prompt names it."""
    vocabularies = {name: list(MetadataCatalog.get(name).get("thing_classes") or []) for name in cfg.DATASETS.TRAIN}
    first = next(iter(vocabularies.values()), [])
    if not first or any(names != first for names in vocabularies.values()):
        raise ValueError(
            f"prompt tuning learns one prompt: DATASETS.TRAIN {list(vocabularies)} must share one non-empty "
            f"vocabulary (thing_classes), got {vocabularies}"
        )
    return first


class WritePromptFile(HookBase):
    """After training, the tuned prompt as its own file (main process)."""

    def __init__(self, path: str):
        self.path = path

    def after_train(self) -> None:
        if comm.is_main_process():
            model = self.trainer.unwrapped_model
            save_prompt_file(self.path, model.prompt, model.detector)
            logger.info("tuned prompt written to %s", self.path)


def prompt_tuning_cfg(cfg: CfgNode) -> CfgNode:
    """The config with what prompt tuning switches off, as official GLIP's tuning_highlevel_override
    sets its freezing keys: L_mlm (it would corrupt the fixed prompt) and the EMA (of one tensor)."""
    tuned = cfg.clone()
    tuned.defrost()
    tuned.MODEL.MLM.ENABLED = False
    tuned.SOLVER.EMA.ENABLED = False
    tuned.freeze()
    return tuned


class PromptTuningTrainer(GLIPv2Trainer):
    """GLIPv2Trainer whose model is a frozen MODEL.WEIGHTS plus one learned prompt offset."""

    def __init__(self, cfg: CfgNode):
        super().__init__(prompt_tuning_cfg(cfg))

    @classmethod
    def build_model(cls, cfg: CfgNode) -> nn.Module:
        if not cfg.MODEL.WEIGHTS:
            raise ValueError("prompt tuning needs the weights it tunes for: set MODEL.WEIGHTS")
        detector = build_model(cfg)
        GLIPv2Checkpointer(detector, strict=True, trust_pickle=cfg.MODEL.TRUST_PICKLED_WEIGHTS).load(
            cfg.MODEL.WEIGHTS
        )
        prompts = PromptBuilder(cfg, detector.tokenizer).categories(training_vocabulary(cfg), keep_repeats=True)
        if len(prompts) != 1:
            raise ValueError(
                f"prompt tuning needs the vocabulary in one prompt; it takes {len(prompts)} at "
                f"MAX_QUERY_LEN={cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN} and TEST.PROMPT_CHUNK_SIZE="
                f"{cfg.TEST.PROMPT_CHUNK_SIZE}"
            )
        model = PromptTuningModel(detector, prompts[0])
        logger.info("prompt tuning %r: %s", prompts[0].caption, describe_trainable(model))
        return model

    def build_checkpointer(self, cfg: CfgNode, model: nn.Module) -> GLIPv2Checkpointer:
        """Checkpoints of the prompt (P and offset) and the trainer state, not of the frozen network."""
        return GLIPv2Checkpointer(
            model.prompt, cfg.OUTPUT_DIR, trust_pickle=cfg.MODEL.TRUST_PICKLED_WEIGHTS, trainer=weakref.proxy(self)
        )

    def build_hooks(self) -> list[HookBase]:
        return super().build_hooks() + [WritePromptFile(os.path.join(self.cfg.OUTPUT_DIR, PROMPT_FILE_NAME))]

    def resume_or_load(self, resume: bool = True) -> None:
        """MODEL.WEIGHTS were loaded with the model; ``resume`` continues the last prompt checkpoint."""
        if resume and self.checkpointer.has_checkpoint():
            self.checkpointer.resume_or_load("", resume=True)
            self.start_iter = self.iter + 1
        self.train_sampler.start = self.start_iter * self.cfg.SOLVER.IMS_PER_BATCH

    @staticmethod
    def _evaluated_model(cfg: CfgNode, model: nn.Module, dataset_name: str) -> nn.Module:
        """Detection sets of the tuned vocabulary are read with the tuned prompt."""
        names = MetadataCatalog.get(dataset_name).get("thing_classes")
        if not names:
            raise ValueError(f"prompt tuning evaluates detection sets; {dataset_name!r} has no thing_classes")
        tuned = model.prompt.tuned()
        vocabulary = PromptBuilder(cfg, model.tokenizer).categories(names, keep_repeats=True)
        check_same_prompt(tuned, vocabulary[0], "the tuned prompt", f"dataset {dataset_name!r}")
        return PromptedDetector(model.detector, [tuned])
