"""Config of glipv2-d2: the keys it adds to Detectron2's, and the one way every tool resolves a file.

The added keys' defaults describe GLIP-T / GLIPv2-T (Swin-T, bert-base-uncased, six VL-DyHead
layers) so that a config file only states what differs from the paper's tiny model. Detectron2
keys whose defaults GLIPv2 changes (meta-architecture, backbone, normalisation, solver) are set in
configs/Base-GLIPv2.yaml, which every config file derives from.
"""

import math
import os
from collections.abc import Sequence

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

__all__ = ["add_glipv2_config", "check_device_available", "setup_cfg"]


def setup_cfg(config_file: str | os.PathLike, opts: Sequence[str] = (), *, freeze: bool = True) -> CN:
    """The config training, evaluation, the demo and the benchmark all run with: Detectron2's
    defaults, the GLIPv2 keys, `config_file`, then `opts` (KEY VALUE pairs), with
    SOLVER.STEP_FRACTIONS turned into SOLVER.STEPS. Frozen unless `freeze` is False."""
    cfg = add_glipv2_config(get_cfg())
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    _resolve_step_fractions(cfg)
    _check_schedule(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def _resolve_step_fractions(cfg: CN) -> None:
    """SOLVER.STEPS from SOLVER.STEP_FRACTIONS of MAX_ITER, so a recipe keeps its schedule shape
    when MAX_ITER is overridden; without fractions STEPS is left as given."""
    fractions = tuple(cfg.SOLVER.STEP_FRACTIONS)
    if not fractions:
        return
    if not all(0.0 < f < 1.0 for f in fractions):
        raise ValueError(f"SOLVER.STEP_FRACTIONS must lie in (0, 1), got {fractions}")
    cfg.SOLVER.STEPS = tuple(int(f * cfg.SOLVER.MAX_ITER) for f in fractions)


def _check_schedule(cfg: CN) -> None:
    """The LR schedule Detectron2 will build from MAX_ITER and STEPS is valid, so that a run too
    short for its decay steps fails here naming the keys, not later inside the scheduler."""
    max_iter = cfg.SOLVER.MAX_ITER
    if max_iter < 1:
        raise ValueError(f"SOLVER.MAX_ITER must be a positive number of iterations, got {max_iter}")
    if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupMultiStepLR":
        return
    steps = [s for s in cfg.SOLVER.STEPS if s <= max_iter]  # Detectron2 ignores later steps
    if not steps:
        return
    distinct = all(a < b for a, b in zip(steps, steps[1:]))
    if steps[0] < 1 or not distinct or len(steps) >= max_iter:
        origin = f" (SOLVER.STEP_FRACTIONS {tuple(cfg.SOLVER.STEP_FRACTIONS)})" if cfg.SOLVER.STEP_FRACTIONS else ""
        raise ValueError(
            f"SOLVER.MAX_ITER {max_iter} is too small for the LR decay steps SOLVER.STEPS {tuple(steps)}{origin}: "
            "each step must be a distinct iteration in [1, SOLVER.MAX_ITER); raise SOLVER.MAX_ITER or change the steps"
        )


def check_device_available(cfg: CN) -> None:
    """Fail before a model is built on a device this machine lacks: torch's own error names the
    driver, not the config key to change."""
    try:
        device = torch.device(cfg.MODEL.DEVICE)
    except RuntimeError as error:
        raise ValueError(f"MODEL.DEVICE {cfg.MODEL.DEVICE!r} is not a device name torch knows: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but this machine has no GPU; use MODEL.DEVICE cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but this machine has {torch.cuda.device_count()} GPU(s)"
        )


def add_glipv2_config(cfg: CN) -> CN:
    """Add every GLIPv2 key, with its default, to a Detectron2 config (in place; also returned).
    Only adds: Detectron2's own keys keep their values (configs/Base-GLIPv2.yaml sets GLIPv2's)."""
    # Resize with maskrcnn_benchmark's size rule (int truncation, rounded max-size clamp) so that
    # images reach the network at exactly the official sizes; False uses Detectron2's rule.
    cfg.INPUT.LEGACY_RESIZE = True

    cfg.MODEL.SWIN = CN()
    cfg.MODEL.SWIN.PATCH_SIZE = 4  # side of the non-overlapping patch embedding
    cfg.MODEL.SWIN.EMBED_DIM = 96  # channels of stage 1 (doubled at every later stage)
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]  # Swin blocks per stage
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]  # attention heads per stage
    cfg.MODEL.SWIN.WINDOW_SIZE = 7  # side of the attention window
    cfg.MODEL.SWIN.MLP_RATIO = 4.0  # MLP hidden width / block width
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.2  # stochastic depth at the last block (linear ramp)
    cfg.MODEL.SWIN.APE = False  # absolute position embedding (off in GLIP)
    cfg.MODEL.SWIN.OUT_FEATURES = ["p1", "p2", "p3"]  # Swin stages fed to the FPN (strides 8, 16, 32)
    cfg.MODEL.SWIN.FROZEN_STAGES = -1  # freeze patch embedding + this many stages (-1: none)
    cfg.MODEL.SWIN.USE_CHECKPOINT = False  # gradient checkpointing inside Swin blocks

    cfg.MODEL.LANGUAGE_BACKBONE = CN()
    cfg.MODEL.LANGUAGE_BACKBONE.NAME = "build_bert_language_backbone"  # LANGUAGE_BACKBONE_REGISTRY key
    # A local Hugging Face folder, or "bert-base-uncased" (its architecture; weights come from a
    # GLIP checkpoint unless LOAD_PRETRAINED finds them locally).
    cfg.MODEL.LANGUAGE_BACKBONE.MODEL_PATH = "bert-base-uncased"
    cfg.MODEL.LANGUAGE_BACKBONE.LOAD_PRETRAINED = False  # load MODEL_PATH's weights (else random init)
    cfg.MODEL.LANGUAGE_BACKBONE.NUM_HIDDEN_LAYERS = 0  # override the text encoder depth (0: keep)
    cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER = "bert-base-uncased"  # local folder or name of the vocab
    cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN = 256  # token limit of one prompt
    cfg.MODEL.LANGUAGE_BACKBONE.NUM_LAST_LAYERS = 1  # hidden layers averaged into the text features
    # Pad every prompt to MAX_QUERY_LEN as the official code does; False pads to the batch's
    # longest prompt, which tests/test_meta_arch.py shows gives the same detections.
    cfg.MODEL.LANGUAGE_BACKBONE.PAD_MAX = False
    cfg.MODEL.LANGUAGE_BACKBONE.FREEZE = False  # keep the text encoder fixed in training
    cfg.MODEL.LANGUAGE_BACKBONE.USE_CHECKPOINT = False  # gradient checkpointing of every text-encoder layer

    # The CLIP-type text transformer of GLIPv2-B / -H (LANGUAGE_BACKBONE.NAME
    # "build_clip_language_backbone", TOKENIZER "clip", GLIPV2.FUSION "VLDyHeadTowerClipText").
    cfg.MODEL.CLIP = CN()
    cfg.MODEL.CLIP.WIDTH = 512  # token width of the text transformer (the fusion's text width)
    cfg.MODEL.CLIP.LAYERS = 12  # pre-LN blocks (LANGUAGE_BACKBONE.NUM_HIDDEN_LAYERS > 0 overrides)
    cfg.MODEL.CLIP.HEADS = 8  # attention heads of each block, and of the fusion's text layers
    cfg.MODEL.CLIP.CONTEXT_LENGTH = 256  # rows of the positional table (UniCL's 77 are interpolated to it)
    cfg.MODEL.CLIP.VOCAB_SIZE = 49408  # CLIP BPE vocabulary (token embedding and MLM decoder rows)

    cfg.MODEL.DYHEAD = CN()
    cfg.MODEL.DYHEAD.NUM_LAYERS = 6  # VL-DyHead layers (official NUM_CONVS)
    cfg.MODEL.DYHEAD.CHANNELS = 256  # width of the fused image features
    cfg.MODEL.DYHEAD.USE_GN = True  # GroupNorm(16) after each DyConv branch
    cfg.MODEL.DYHEAD.USE_DYRELU = True  # dynamic ReLU after scale attention
    cfg.MODEL.DYHEAD.USE_DEFORM = True  # modulated deformable 3x3 convs (else plain convs)
    cfg.MODEL.DYHEAD.DEFORM_CONV_IMPL = "auto"  # "auto" (gather on CPU, torchvision elsewhere), "torchvision", "gather"
    cfg.MODEL.DYHEAD.DYCONV_PRECISION = "fp32"  # "fp32" (official) or "autocast": DyConv follows AMP, deform convs too
    cfg.MODEL.DYHEAD.PRIOR_PROB = 0.01  # initial foreground probability of a region-word logit
    cfg.MODEL.DYHEAD.LOG_SCALE_INIT = 0.0  # initial log temperature of the region-word logits
    cfg.MODEL.DYHEAD.USE_CHECKPOINT = False  # gradient checkpointing of every fusion layer
    # Region-word scores from the fused text (GLIP-T, official USE_FUSED_FEATURES_DOT_PRODUCT) or,
    # when False, from the text encoder's output, with no BERT layer in the last fusion layer (the
    # last bi-attention's text branch then trains only through L_mlm: without it, multi-GPU DDP
    # needs find_unused_parameters, as the official FIND_UNUSED_PARAMETERS).
    cfg.MODEL.DYHEAD.SCORE_WITH_FUSED_TEXT = True
    cfg.MODEL.DYHEAD.FUSION = CN()
    cfg.MODEL.DYHEAD.FUSION.EMBED_DIM = 2048  # width of the bidirectional attention
    cfg.MODEL.DYHEAD.FUSION.NUM_HEADS = 8  # heads of the bidirectional attention
    cfg.MODEL.DYHEAD.FUSION.DROPOUT = 0.1  # attention dropout (training only)
    cfg.MODEL.DYHEAD.FUSION.DROP_PATH = 0.0  # stochastic depth of the fusion residuals
    cfg.MODEL.DYHEAD.FUSION.LAYER_SCALE_INIT = 0.0  # initial residual gamma (0: 1 / NUM_LAYERS)

    cfg.MODEL.ATSS = CN()
    cfg.MODEL.ATSS.ANCHOR_SIZES = [64, 128, 256, 512, 1024]  # anchor side per level
    cfg.MODEL.ATSS.ASPECT_RATIOS = [1.0]  # anchor aspect ratios (one anchor per location)
    cfg.MODEL.ATSS.SCALES_PER_OCTAVE = 1  # anchor scales per octave
    cfg.MODEL.ATSS.TOPK = 9  # ATSS candidates per level and ground-truth box (training)
    cfg.MODEL.ATSS.BBOX_REG_WEIGHTS = [10.0, 10.0, 5.0, 5.0]  # legacy box coder weights
    cfg.MODEL.ATSS.BBOX_XFORM_CLIP = math.log(1000.0 / 16)  # upper clamp of decoded dw, dh
    cfg.MODEL.ATSS.INFERENCE_TH = 0.05  # keep (anchor, label) pairs scoring above this
    cfg.MODEL.ATSS.PRE_NMS_TOP_N = 1000  # candidates kept per level before NMS
    cfg.MODEL.ATSS.NMS_TH = 0.6  # class-wise NMS IoU threshold
    cfg.MODEL.ATSS.DETECTIONS_PER_IMG = 100  # detections kept per image (ties at the cut kept)

    # GLIPv2 pre-training terms (paper eq. 2); L_loc and L_intra are weighted by the MODEL.ATSS keys.
    cfg.MODEL.INTER_IMAGE_LOSS = CN()
    cfg.MODEL.INTER_IMAGE_LOSS.ENABLED = False  # add L_inter (official USE_SHALLOW_CONTRASTIVE_LOSS)
    cfg.MODEL.INTER_IMAGE_LOSS.WEIGHT = 1.0  # weight of L_inter (official SHALLOW_CONTRASTIVE_LOSS_WEIGHT)
    cfg.MODEL.INTER_IMAGE_LOSS.DIM = 64  # region / token projection width (official SHALLOW_CONTRASTIVE_HIDDEN_DIM)
    cfg.MODEL.INTER_IMAGE_LOSS.MAX_REGIONS = 100  # regions per image (official SHALLOW_MAX_POSITIVE_ANCHORS)
    cfg.MODEL.INTER_IMAGE_LOSS.LOG_SCALE_INIT = 0.0  # initial log temperature (official SHALLOW_LOG_SCALE)
    # Token side of L_inter: "pre_fusion" (text encoder output, the paper §3.2) or "fused" (final
    # fused text, what the official code does).
    cfg.MODEL.INTER_IMAGE_LOSS.TEXT_FEATURES = "pre_fusion"
    cfg.MODEL.MLM = CN()
    cfg.MODEL.MLM.ENABLED = False  # add L_mlm: mask training prompts, predict them from the fused text
    cfg.MODEL.MLM.LOSS_WEIGHT = 1.0  # weight of L_mlm (official MLM_LOSS_COEF)
    cfg.MODEL.MLM.PROBABILITY = 0.15  # chance that a real, non-special token is chosen for corruption
    cfg.MODEL.MLM.ONLY_POSITIVE_PHRASES = False  # mask only grounded tokens (official MLM_OBJ_FOR_ONLY_POSITIVE)
    cfg.MODEL.MLM.INIT_FROM_TEXT_MODEL = True  # with LOAD_PRETRAINED, start from MODEL_PATH's LM head if it has one
    # Grounding losses of samples flagged "weak" (captions with pseudo boxes) are multiplied by this.
    cfg.MODEL.WEAK_SAMPLE_LOSS_WEIGHT = 1.0
    # Load checkpoints that need full unpickling (legacy .pkl, pickled objects): they can run code.
    cfg.MODEL.TRUST_PICKLED_WEIGHTS = False

    cfg.TEST.PROMPT_CHUNK_SIZE = 0  # categories per prompt at evaluation (0: as many as fit)
    cfg.TEST.LVIS_FIXED_AP = False  # LVIS "fixed AP": top 10,000 detections per category over the split
    cfg.TEST.REFERRING_SCORE_THRESHOLD = 0.5  # referring masks: union of a phrase's detections scoring >= this
    cfg.TEST.PROMPT_FILE = ""  # tuned prompt file replacing the vocabulary prompt in evaluation and the predictor
    cfg.TEST.COMPILE_FUSION = ""  # torch.compile mode of tower + head at inference ("", "default", "reduce-overhead")
    cfg.TEST.FUSION_BATCH_MEMORY_MB = 4096  # estimated memory of image-prompt pairs fused in one batch (0: one pair)

    # Prompt tuning (official GLIP language_prompt_v2): the training vocabulary's prompt gets a learned
    # offset on its text-encoder output, every network parameter frozen; writes OUTPUT_DIR/prompt_final.pth.
    cfg.MODEL.PROMPT_TUNING = CN()
    cfg.MODEL.PROMPT_TUNING.ENABLED = False  # train the prompt offset alone (tools/train_net.py picks the trainer)

    cfg.MODEL.ATSS.REG_LOSS_WEIGHT = 2.0  # weight of the GIoU box loss
    cfg.MODEL.ATSS.FOCAL_ALPHA = 0.25  # alpha of the token sigmoid focal loss
    cfg.MODEL.ATSS.FOCAL_GAMMA = 2.0  # gamma of the token sigmoid focal loss
    cfg.MODEL.ATSS.TOKEN_LOSS_WEIGHT = 1.0  # weight of the region-word focal loss (L_intra)
    cfg.MODEL.ATSS.CENTERNESS_LOSS_WEIGHT = 1.0  # weight of the centerness BCE

    # Train-mode ATSS proposals the mask head learns on (official box_selector_train), GT boxes appended.
    cfg.MODEL.ATSS.INFERENCE_TH_TRAIN = 0.0  # keep (anchor, GT phrase) pairs scoring above this
    cfg.MODEL.ATSS.PRE_NMS_TOP_N_TRAIN = 3000  # candidates kept per level before NMS
    cfg.MODEL.ATSS.POST_NMS_TOP_N_TRAIN = 1000  # proposals kept per image after NMS

    # GLIP's language-guided mask head (MODEL.MASK_ON with "MaskHead" in MODEL.GLIPV2.TASK_HEADS). Its
    # pooler reads Detectron2's POOLER_RESOLUTION / POOLER_SAMPLING_RATIO and always samples as GLIP's
    # (ROIAlign aligned=False, GLIP's level rule), so POOLER_TYPE is not read; masks are
    # 2 x POOLER_RESOLUTION (28) pixels square and matched by MODEL.ROI_HEADS.IOU_THRESHOLDS in training.
    cfg.MODEL.ROI_MASK_HEAD.CONV_LAYERS = [256, 256, 256, 256]  # width of each hourglass block (GLIPv2-T/B: [256])
    cfg.MODEL.ROI_MASK_HEAD.HG_SCALE = 1  # hourglass depth, halvings of the pooled box (GLIPv2-H: 2)
    cfg.MODEL.ROI_MASK_HEAD.USE_FUSED_FEATURES = False  # pool fused maps (official RETURN_FUSED_FEATURES), else FPN's
    cfg.MODEL.ROI_MASK_HEAD.PASTE_THRESHOLD = 0.5  # a pasted pixel is foreground above this mask probability

    cfg.DATASETS.MAX_NEGATIVE_CATEGORIES = 85  # negative categories sampled into a training prompt
    cfg.DATASETS.SEPARATOR = ". "  # between category names of a detection prompt
    cfg.DATASETS.FULL_NEGATIVES_PROB = 0.5  # chance a prompt gets all MAX_NEGATIVE_CATEGORIES (else 1..max)
    cfg.DATASETS.SHUFFLE_PROMPT = True  # random category order in training prompts
    cfg.DATALOADER.SEED = 0  # base seed of the training data order, each sample's and each step's randomness

    cfg.SOLVER.OPTIMIZER = "ADAMW"  # ADAMW (official GLIP) or SGD
    cfg.SOLVER.LANG_LR = 1e-5  # learning rate of the text encoder (rest: SOLVER.BASE_LR)
    cfg.SOLVER.BACKBONE_BODY_LR_FACTOR = 1.0  # Swin body learning rate = BASE_LR x this
    # BERT layers of the fusion tower: learning rate = BASE_LR x this. Randomly initialised, they
    # collapse every token onto one vector when trained far above GLIP's 1e-4 (quick start: 0.1).
    cfg.SOLVER.FUSION_TEXT_LR_FACTOR = 1.0
    cfg.SOLVER.STEP_FRACTIONS = []  # LR decay points as fractions of MAX_ITER (overrides STEPS)
    cfg.SOLVER.AMP.PRECISION = "float16"  # autocast dtype of AMP training: float16 or bfloat16
    cfg.SOLVER.EMA = CN()
    cfg.SOLVER.EMA.ENABLED = False  # keep an exponential moving average of the weights
    cfg.SOLVER.EMA.DECAY = 0.999  # EMA decay per iteration
    cfg.SOLVER.EMA.EVAL_WITH_EMA = True  # evaluate the EMA weights when EMA is enabled
    cfg.SOLVER.FREEZE_PREFIXES = []  # parameter-name prefixes kept frozen (prompt tuning, linear probe)
    cfg.SOLVER.TRAIN_ONLY_PREFIXES = []  # train only parameters under these name prefixes, freeze all else (mask stage)

    # Mixed pre-training data (glipv2_d2/data/build.py).
    cfg.DATASETS.TRAIN_RATIOS = []  # draw weight per DATASETS.TRAIN entry ([]: proportional to dataset sizes)
    cfg.DATASETS.REGISTER = []  # "name:json_file:image_root" COCO-format sets the launcher registers

    # VQA (paper section 3.3, appendix D.2): "VQAHead" in MODEL.GLIPV2.TASK_HEADS.
    cfg.MODEL.VQA = CN()
    cfg.MODEL.VQA.NUM_ANSWERS = 3129  # answer classes (VQAv2: answers of at least 9 train+val questions)
    cfg.MODEL.VQA.ANSWER_VOCAB_FILE = ""  # JSON list of the answers, tools/build_vqa_vocab.py writes it
    cfg.MODEL.VQA.POOLING = "attention"  # fused question -> one vector: "attention" or "first_token" ([CLS])
    cfg.MODEL.VQA.HIDDEN_DIM = 0  # width of the head's 2-layer MLP (0: the fused text width)
    cfg.MODEL.VQA.LOSS_WEIGHT = 1.0  # weight of the soft-score BCE (summed over answers, mean over questions)
    cfg.MODEL.VQA.GROUNDED = False  # grounded VQA: append [MASK] to questions and ground the answer's boxes on it
    cfg.MODEL.VQA.TOP_K = 5  # answers returned per question at inference, best first

    # Composition of the meta-architecture from registered parts (anchor strides and widths come
    # from the backbone's output shapes).
    cfg.MODEL.GLIPV2 = CN()
    cfg.MODEL.GLIPV2.FUSION = "VLDyHeadTower"  # FUSION_REGISTRY name of the image-text fusion module
    cfg.MODEL.GLIPV2.TASK_HEADS = []  # TASK_HEAD_REGISTRY names of extra heads (masks, answers, captions, ...)

    # Captioning (paper §3.3, app. D.2): "CaptionHead" in MODEL.GLIPV2.TASK_HEADS; caption mode reads
    # the text causally and keeps the image blind to it in every fusion layer.
    cfg.MODEL.CAPTION_ON = False  # run the model in caption mode by default (train the LM, infer captions)
    cfg.MODEL.CAPTION = CN()
    cfg.MODEL.CAPTION.LOSS_WEIGHT = 1.0  # weight of the next-token cross-entropy
    cfg.MODEL.CAPTION.INIT_FROM_TEXT_MODEL = True  # with LOAD_PRETRAINED, start the LM layer from MODEL_PATH's LM head
    cfg.MODEL.CAPTION.BEAM_SIZE = 1  # hypotheses kept per image at inference (1: greedy)
    cfg.MODEL.CAPTION.MAX_LENGTH = 20  # most generated tokens, end token included
    cfg.MODEL.CAPTION.MIN_LENGTH = 0  # fewest tokens before the end token may be generated
    cfg.MODEL.CAPTION.LENGTH_PENALTY = 1.0  # hypothesis score: sum(log p) / length ** this
    cfg.MODEL.CAPTION.USE_CACHE = True  # decode with the image side computed once and cached text keys/values
    cfg.TEST.CAPTION_SPICE = False  # add SPICE to caption metrics (first use downloads Stanford CoreNLP)
    return cfg
