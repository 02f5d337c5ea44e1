"""Detectron2 DefaultTrainer for GLIPv2: mixed detection/grounding data, AdamW groups, AMP dtype, EMA,
exact resume, and evaluation of detection sets (vocabulary prompts) and grounding sets (own captions)."""

import logging
import os
import random
import weakref

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    HookBase,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
    hooks,
)
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, DatasetEvaluators
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoint import GLIPv2Checkpointer
from ..data.build import ResumableDrawSampler, build_resumable_train_loader
from ..data.caption_mapper import CaptionMapper
from ..data.datasets import CAPTION_EVALUATOR_TYPE, VQA_EVALUATOR_TYPE
from ..data.grounding_mapper import GroundingMapper
from ..data.mappers import DetectionGroundingMapper
from ..data.prompt_builder import PromptBuilder
from ..data.vqa_mapper import VQAMapper
from ..evaluation import (
    CaptionEvaluator,
    Flickr30kGroundingEvaluator,
    LVISFixedAPEvaluator,
    NumpyCompatibleLVISEvaluator,
    PhraseCutEvaluator,
    PromptedDetector,
    VQAEvaluator,
    majority_answer_per_type,
    most_frequent_caption,
)
from ..evaluation.vocabulary_coco import VocabularyCOCOEvaluator
from ..modeling.prompt_file import tuned_prompt_for
from ..utils.seeding import derived_seed
from .ema import EMAHook, ModelEMA
from .optimization import build_glipv2_optimizer, describe_trainable, freeze_parameters

logger = logging.getLogger(__name__)

GROUNDING_EVALUATOR_TYPE = "flickr30k"
REFERRING_EVALUATOR_TYPE = "phrasecut"


def is_grounding_test_set(dataset_name: str) -> bool:
    """Phrase-grounding and referring test sets are scored per caption (Recall@k, mask IoU), not
    with a vocabulary prompt."""
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
    return evaluator_type in (GROUNDING_EVALUATOR_TYPE, REFERRING_EVALUATOR_TYPE)


def is_vqa_test_set(dataset_name: str) -> bool:
    """VQA test sets are read question by question, each input with its own question prompt."""
    return MetadataCatalog.get(dataset_name).get("evaluator_type") == VQA_EVALUATOR_TYPE


def is_caption_test_set(dataset_name: str) -> bool:
    """Caption test sets are read image by image with their reference captions, no prompt."""
    return MetadataCatalog.get(dataset_name).get("evaluator_type") == CAPTION_EVALUATOR_TYPE


def training_captions(cfg: CfgNode) -> list[str]:
    """Every caption of cfg.DATASETS.TRAIN (references of caption sets, sentences of grounding
    sets): the most frequent one is the captioning baseline."""
    captions = []
    for name in cfg.DATASETS.TRAIN:
        for record in DatasetCatalog.get(name):
            if "captions" in record:
                captions.extend(record["captions"])
            elif "caption" in record:
                captions.append(record["caption"])
    return captions


def _training_vqa_records(cfg: CfgNode) -> list[dict]:
    """The records of cfg.DATASETS.TRAIN's VQA sets, whose majority answers are the baseline."""
    records = []
    for name in cfg.DATASETS.TRAIN:
        if MetadataCatalog.get(name).get("evaluator_type") == VQA_EVALUATOR_TYPE:
            records.extend(DatasetCatalog.get(name))
    return records


class PerIterationSeed(HookBase):
    """Seed every global RNG from (seed, iteration, rank) before each step: dropout, drop path and MLM
    masking then draw the same numbers in a resumed run as in an uninterrupted one. The data path
    leaves these generators alone (each sample derives its own), so nothing disturbs them."""

    def __init__(self, seed: int):
        self.seed = seed

    def before_step(self) -> None:
        step_seed = derived_seed(self.seed, self.trainer.iter * comm.get_world_size() + comm.get_rank())
        random.seed(step_seed)
        np.random.seed(step_seed)
        torch.manual_seed(step_seed)


class GLIPv2Trainer(DefaultTrainer):
    """DefaultTrainer with GLIP's training recipe; `--resume` continues bit for bit.

    It builds its pieces as DefaultTrainer.__init__ does, but keeps the resumable loader's sampler
    (``train_sampler``), builds the AMP trainer in the configured precision and wraps the model for
    several processes with find_unused_parameters when the configuration needs it.
    """

    def __init__(self, cfg: CfgNode):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader, self.train_sampler = self.build_resumable_train_loader(cfg)
        self._trainer = self.build_step_trainer(cfg, self.build_ddp_model(model), data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = self.build_checkpointer(cfg, model)
        self.ema = ModelEMA(model, cfg.SOLVER.EMA.DECAY) if cfg.SOLVER.EMA.ENABLED else None
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @property
    def unwrapped_model(self) -> nn.Module:
        """The model without its DistributedDataParallel wrapper."""
        return getattr(self.model, "module", self.model)

    @staticmethod
    def build_ddp_model(model: nn.Module) -> nn.Module:
        """Detectron2's DDP wrapper (the model itself in one process). find_unused_parameters only
        when the configuration leaves parameters without gradient: it costs a graph walk per step."""
        device_ids = [comm.get_local_rank()] if model.device.type == "cuda" else None
        return create_ddp_model(
            model,
            broadcast_buffers=False,
            device_ids=device_ids,
            find_unused_parameters=model.leaves_parameters_unused,
        )

    @classmethod
    def build_step_trainer(
        cls, cfg: CfgNode, model: nn.Module, data_loader: DataLoader, optimizer: torch.optim.Optimizer
    ) -> SimpleTrainer:
        """SimpleTrainer, or AMPTrainer autocasting to SOLVER.AMP.PRECISION; bfloat16 has float32's
        range, so it runs without loss scaling. AMPTrainer runs on CUDA only, so AMP on another device
        is refused here, naming the keys, rather than by its assertion at the first step."""
        if not cfg.SOLVER.AMP.ENABLED:
            return SimpleTrainer(model, data_loader, optimizer)
        if torch.device(cfg.MODEL.DEVICE).type != "cuda":
            raise ValueError(
                f"SOLVER.AMP.ENABLED trains with Detectron2's AMPTrainer, which needs CUDA, but MODEL.DEVICE is "
                f"{cfg.MODEL.DEVICE!r}; set SOLVER.AMP.ENABLED False (tools/benchmark.py --train times bf16 "
                "steps on the CPU)"
            )
        precision = {"float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.SOLVER.AMP.PRECISION]
        grad_scaler = torch.amp.GradScaler("cuda", enabled=precision == torch.float16)
        return AMPTrainer(model, data_loader, optimizer, grad_scaler=grad_scaler, precision=precision)

    def build_checkpointer(self, cfg: CfgNode, model: nn.Module) -> GLIPv2Checkpointer:
        """What checkpoints hold and --resume restores: the model and this trainer's state."""
        return GLIPv2Checkpointer(
            model, cfg.OUTPUT_DIR, trust_pickle=cfg.MODEL.TRUST_PICKLED_WEIGHTS, trainer=weakref.proxy(self)
        )

    @classmethod
    def build_model(cls, cfg: CfgNode) -> nn.Module:
        model = build_model(cfg)
        if freeze_parameters(cfg, model):
            logger.info("%s; the rest is frozen", describe_trainable(model))
        return model

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
        return build_glipv2_optimizer(cfg, model)

    @classmethod
    def build_resumable_train_loader(cls, cfg: CfgNode) -> tuple[DataLoader, ResumableDrawSampler]:
        """(loader, sampler) over every dataset of cfg.DATASETS.TRAIN with the mapper of its task, mixed
        by DATASETS.TRAIN_RATIOS; override this to train on other data."""
        return build_resumable_train_loader(cfg)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode) -> DataLoader:
        """Detectron2's hook (used by PreciseBN): the resumable loader without its sampler."""
        return cls.build_resumable_train_loader(cfg)[0]

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        """Grounding sets keep each image's caption, "phrases" and "annotations" (the evaluator's
        ground truth); detection sets get the dataset's vocabulary prompt."""
        if is_grounding_test_set(dataset_name):
            mapper = GroundingMapper(cfg, is_train=False)
        elif is_vqa_test_set(dataset_name):
            mapper = VQAMapper(cfg, is_train=False)
        elif is_caption_test_set(dataset_name):
            mapper = CaptionMapper(cfg, is_train=False)
        else:
            mapper = DetectionGroundingMapper(cfg, is_train=False, dataset_names=[dataset_name])
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None) -> DatasetEvaluator:
        """COCO AP; for LVIS-type sets LVIS AP (fixed AP when cfg.TEST.LVIS_FIXED_AP); for Flickr30K-type
        sets phrase-grounding Recall@k, on merged boxes when the metadata's "gt_type" is "merged" (as
        the glipv2_flickr30k_merged_* registrations say) and on any single box otherwise; for
        PhraseCut-type sets see build_referring_evaluator; for VQA-type sets VQA accuracy next to the
        majority-answer baseline of the training VQA sets; for caption-type sets BLEU, METEOR, ROUGE-L,
        CIDEr (SPICE with TEST.CAPTION_SPICE) next to the most frequent training caption. With
        MODEL.MASK_ON, AP is also mask AP."""
        metadata = MetadataCatalog.get(dataset_name)
        evaluator_type = metadata.get("evaluator_type", "coco")
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        if evaluator_type == GROUNDING_EVALUATOR_TYPE:
            return Flickr30kGroundingEvaluator(merge_boxes=metadata.get("gt_type") == "merged")
        if evaluator_type == REFERRING_EVALUATOR_TYPE:
            return cls.build_referring_evaluator(cfg, dataset_name, output_folder)
        if evaluator_type == VQA_EVALUATOR_TYPE:
            return VQAEvaluator(majority_answer_per_type(_training_vqa_records(cfg)) or None)
        if evaluator_type == CAPTION_EVALUATOR_TYPE:
            captions = training_captions(cfg)
            baseline = most_frequent_caption(captions) if captions else None
            return CaptionEvaluator(baseline, use_spice=cfg.TEST.CAPTION_SPICE)
        if evaluator_type == "lvis" and cfg.TEST.LVIS_FIXED_AP:
            return LVISFixedAPEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)
        if evaluator_type == "lvis":
            return NumpyCompatibleLVISEvaluator(dataset_name, tasks=tasks, output_dir=output_folder,
                                                max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)
        return VocabularyCOCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder,
                                       max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)

    @classmethod
    def build_referring_evaluator(
        cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None
    ) -> DatasetEvaluator:
        """PhraseCut's metrics on the predicted masks (with MODEL.MASK_ON) and on filled boxes (the
        trivial baseline), per phrase from the detections scoring >= TEST.REFERRING_SCORE_THRESHOLD,
        plus COCO box (and mask) AP of the phrases' instances, whose ground truth COCOEvaluator
        converts from the records into `output_folder` (default OUTPUT_DIR/inference/<name>)."""
        threshold = cfg.TEST.REFERRING_SCORE_THRESHOLD
        evaluators: list[DatasetEvaluator] = [PhraseCutEvaluator(threshold, use_boxes=True)]
        if cfg.MODEL.MASK_ON:
            evaluators.insert(0, PhraseCutEvaluator(threshold))
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        evaluators.append(COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder,
                                        max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE))
        return DatasetEvaluators(evaluators)

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
        """Grounding inputs already carry their caption's prompt; detection inputs get the dataset's
        vocabulary as prompts, built as training and the predictor build theirs, or TEST.PROMPT_FILE's
        tuned prompt when it was tuned on that vocabulary."""
        if any(test(dataset_name) for test in (is_grounding_test_set, is_vqa_test_set, is_caption_test_set)):
            return model
        names = MetadataCatalog.get(dataset_name).thing_classes
        prompts = PromptBuilder(cfg, model.tokenizer).categories(names, keep_repeats=True)
        if cfg.TEST.PROMPT_FILE:
            prompts = [tuned_prompt_for(cfg.TEST.PROMPT_FILE, model, prompts, f"dataset {dataset_name!r}")]
        return PromptedDetector(model, prompts)

    def build_hooks(self) -> list[HookBase]:
        """The per-step seed and the EMA update, then DefaultTrainer's hooks; the EMA update runs
        before the checkpointer, which saves the average. With SOLVER.EMA.EVAL_WITH_EMA the
        evaluation hook evaluates the EMA weights."""
        built = super().build_hooks()
        extra: list[HookBase] = [PerIterationSeed(self.cfg.DATALOADER.SEED)]
        if self.ema is not None:
            extra.append(EMAHook(self.ema, self.unwrapped_model))
            if self.cfg.SOLVER.EMA.EVAL_WITH_EMA:
                ema_eval = hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self.test_with_ema)
                built = [ema_eval if isinstance(hook, hooks.EvalHook) else hook for hook in built]
        return extra + built

    def test_with_ema(self) -> dict:
        """Evaluate cfg.DATASETS.TEST under the EMA weights, then restore the trained ones."""
        with self.ema.applied_to(self.unwrapped_model):
            self._last_eval_results = self.test(self.cfg, self.model)
        return self._last_eval_results

    def resume_or_load(self, resume: bool = True) -> None:
        """DefaultTrainer's, then the data stream restarts at the resumed iteration's first draw; a
        run that did not resume starts its EMA from the loaded weights (cfg.MODEL.WEIGHTS)."""
        super().resume_or_load(resume)
        resumed = resume and self.checkpointer.has_checkpoint()
        if self.ema is not None and not resumed:
            self.ema.reset(self.unwrapped_model)
        self.train_sampler.start = self.start_iter * self.cfg.SOLVER.IMS_PER_BATCH

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        elif self.ema is not None:  # the checkpoint of a run without EMA: average from its weights
            self.ema.reset(self.unwrapped_model)
