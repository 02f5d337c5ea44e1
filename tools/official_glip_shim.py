"""Run the official microsoft/GLIP code (2022) on today's torch / transformers without compiling it.

Used by ``tools/benchmark_official.py``. The official repository needs its compiled extension
``maskrcnn_benchmark._C``; :func:`install` puts a pure-Python stand-in into ``sys.modules`` whose
functions keep the compiled signatures (argument order included) and compute with torchvision ops:

- ``modulated_deform_conv_forward`` / ``deform_conv_forward``: ``torchvision.ops.deform_conv2d``
  (with ``mask`` for DCNv2). An offset/mask larger than the output is re-read flat, image by image,
  as the official CUDA kernel reads its raw buffer (DyConv hands level l's offsets to the conv that
  produces the coarser level l+1).
- ``nms`` / ``ml_nms``: ``torchvision.ops.nms`` / ``batched_nms`` on boxes whose x2, y2 are moved by
  +1, which gives exactly maskrcnn_benchmark's legacy ``(x2 - x1 + 1) * (y2 - y1 + 1)`` areas and
  intersections; a box is suppressed when IoU > threshold (the CUDA kernels' rule).
- ``roi_align_forward``: ``torchvision.ops.roi_align`` (aligned=False, the legacy ROIAlign).
- ``sigmoid_focalloss_forward``: the official formula in torch ops.
- every backward and ``soft_nms``: NotImplementedError (inference only).

Runtime patches for the official code (each applied by :func:`install` or :func:`offline_bert`):

1. ``torch._six`` (removed in torch 2.0): a module with PY3 / PY37, string_classes, int_classes,
   container_abcs and inf, read by ``maskrcnn_benchmark/utils/imports.py`` and the data code.
2. ``transformers.modeling_utils.apply_chunking_to_forward``, ``prune_linear_layer`` and
   ``find_pruneable_heads_and_indices`` (moved to ``transformers.pytorch_utils`` / removed):
   re-exported there so ``rpn/vldyhead.py`` and ``rpn/modeling_bert.py`` import.
3. Modules the official package imports at the top but GLIP-T inference never uses (``einops`` for
   Swin v2, ``prettytable``): empty stand-ins that raise if called, only when not installed.
4. ``layers.deform_conv.modulated_deform_conv`` / ``deform_conv``: the official autograd Functions
   raise NotImplementedError for CPU tensors before calling ``_C``; replaced by functions that call
   the stand-in ``_C`` forward (no autograd).
5. ``numpy.float`` (removed in numpy 1.24), used by ``modeling/rpn/anchor_generator.py``: that
   module alone gets a numpy view with the old aliases (``float``, ``int``, ``bool``, ``object``
   as the builtins); numpy itself is not changed.
6. ``modeling.rpn.inference.boxlist_ml_nms``: the official function takes a CPU-only branch that
   prints the labels and concatenates per-class NMS indices local to each class (so it keeps the
   wrong boxes); the replacement always takes the branch the released numbers come from (the
   class-aware ``_C.ml_nms`` of the CUDA build).
7. ``get_extended_attention_mask`` (dropped from transformers 5's PreTrainedModel), which the
   official ``BertEncoderLayer`` (a BertPreTrainedModel) calls on its 2-D token mask: added to that
   class with the 2022 transformers rule, ``(1 - mask[:, None, None, :]) * -10000``.
8. ``BertConfig.from_pretrained`` / ``BertModel.from_pretrained`` / ``AutoTokenizer.from_pretrained``
   for the name "bert-base-uncased" (no hub access offline): the config is ``BertConfig()`` (its
   defaults are bert-base-uncased), the model is built from it with random weights, the tokenizer
   is the caller's (the benchmark passes this project's offline bert-base-uncased WordPiece
   tokenizer, the same vocabulary). Other names go to transformers unchanged.
9. ``batch_encode_plus`` (removed in transformers 5), which the official forward calls on its
   tokenizer: added to that tokenizer object as a call of the tokenizer on the list of texts.
"""

from __future__ import annotations

import collections.abc
import importlib
import importlib.util
import math
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import batched_nms, deform_conv2d
from torchvision.ops import nms as tv_nms
from torchvision.ops import roi_align as tv_roi_align

__all__ = [
    "C_FUNCTIONS", "OFFICIAL_BERT_NAME", "deform_conv", "install", "make_c_module", "ml_nms",
    "modulated_deform_conv", "modulated_deform_conv_forward", "nms", "offline_bert",
]

OFFICIAL_BERT_NAME = "bert-base-uncased"
OPTIONAL_MODULES = ("einops", "prettytable")


# ---------------------------------------------------------------------------------------------
# Stand-in for maskrcnn_benchmark._C
# ---------------------------------------------------------------------------------------------

def _flat_per_image(t: Tensor, channels: int, height: int, width: int) -> Tensor:
    """Read each image's block as flat memory laid out for (channels, height, width).

    The official CUDA kernels index ``offset[b]`` / ``mask[b]`` through the raw pointer at the
    output size; when the tensor is larger than that (a finer level's offsets given to the conv
    producing a coarser level) they read its first ``channels * height * width`` values.
    """
    if tuple(t.shape[1:]) == (channels, height, width):
        return t
    batch = t.shape[0]
    per_image = t.contiguous().reshape(batch, -1)
    needed = channels * height * width
    if per_image.shape[1] < needed:
        raise ValueError(f"offset/mask of shape {tuple(t.shape)} is smaller than the conv output "
                         f"({channels}, {height}, {width})")
    return per_image[:, :needed].reshape(batch, channels, height, width)


def _deform(input: Tensor, weight: Tensor, bias: Tensor | None, offset: Tensor, mask: Tensor | None,
            stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
            deformable_groups: int) -> Tensor:
    """(Modulated) deformable conv with official buffer semantics, via torchvision."""
    kh, kw = weight.shape[-2:]
    out_h = (input.shape[2] + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    out_w = (input.shape[3] + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    offset = _flat_per_image(offset, 2 * deformable_groups * kh * kw, out_h, out_w)
    if mask is not None:
        mask = _flat_per_image(mask, deformable_groups * kh * kw, out_h, out_w)
    return deform_conv2d(input, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask)


def modulated_deform_conv_forward(input: Tensor, weight: Tensor, bias: Tensor, ones: Tensor, offset: Tensor,
                                  mask: Tensor, output: Tensor, columns: Tensor, kernel_h: int, kernel_w: int,
                                  stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
                                  dilation_w: int, group: int, deformable_group: int, with_bias: bool) -> None:
    """``_C.modulated_deform_conv_forward``: fills ``output`` in place (official csrc/deform_conv.h order).

    ``ones`` and ``columns`` are the CUDA kernel's scratch buffers and are not used.
    """
    if tuple(weight.shape[-2:]) != (kernel_h, kernel_w):
        raise ValueError(f"kernel ({kernel_h}, {kernel_w}) does not match the weight {tuple(weight.shape)}")
    if input.shape[1] != weight.shape[1] * group:
        raise ValueError(f"input channels {input.shape[1]} != weight channels {weight.shape[1]} x groups {group}")
    result = _deform(input, weight, bias if with_bias else None, offset, mask, (stride_h, stride_w),
                     (pad_h, pad_w), (dilation_h, dilation_w), deformable_group)
    output.resize_(result.shape).copy_(result)


def deform_conv_forward(input: Tensor, weight: Tensor, offset: Tensor, output: Tensor, columns: Tensor,
                        ones: Tensor, kW: int, kH: int, dW: int, dH: int, padW: int, padH: int, dilationW: int,
                        dilationH: int, group: int, deformable_group: int, im2col_step: int) -> int:
    """``_C.deform_conv_forward`` (DCNv1; note the width-first order of every pair): fills ``output``."""
    if tuple(weight.shape[-2:]) != (kH, kW):
        raise ValueError(f"kernel (kH={kH}, kW={kW}) does not match the weight {tuple(weight.shape)}")
    result = _deform(input, weight, None, offset, None, (dH, dW), (padH, padW), (dilationH, dilationW),
                     deformable_group)
    output.resize_(result.shape).copy_(result)
    return 1


def _legacy_boxes(dets: Tensor) -> Tensor:
    """Boxes whose torchvision area / intersection equal maskrcnn_benchmark's "+1" ones."""
    return torch.cat([dets[:, :2], dets[:, 2:4] + 1], dim=1)


def nms(dets: Tensor, scores: Tensor, threshold: float) -> Tensor:
    """``_C.nms``: kept indices by decreasing score, legacy +1 areas, suppression at IoU > threshold."""
    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    return tv_nms(_legacy_boxes(dets.float()), scores.float(), float(threshold))


def ml_nms(dets: Tensor, scores: Tensor, labels: Tensor, threshold: float) -> Tensor:
    """``_C.ml_nms``: class-aware NMS (boxes only suppress boxes of the same label), as ``nms``."""
    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    return batched_nms(_legacy_boxes(dets.float()), scores.float(), labels.long(), float(threshold))


def roi_align_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                      sampling_ratio: int) -> Tensor:
    """``_C.roi_align_forward``: rois are (K, 5) rows of (batch index, x1, y1, x2, y2)."""
    return tv_roi_align(input, rois, (pooled_height, pooled_width), spatial_scale, sampling_ratio, aligned=False)


def sigmoid_focalloss_forward(logits: Tensor, targets: Tensor, num_classes: int, gamma: float,
                              alpha: float) -> Tensor:
    """``_C.sigmoid_focalloss_forward``: per-element loss; targets are labels 1..C, 0 background."""
    classes = torch.arange(1, num_classes + 1, device=logits.device, dtype=targets.dtype).unsqueeze(0)
    t = targets.unsqueeze(1)
    p = torch.sigmoid(logits)
    pos = (1 - p) ** gamma * torch.log(p)
    neg = p ** gamma * torch.log(1 - p)
    return -(t == classes).float() * pos * alpha - ((t != classes) & (t >= 0)).float() * neg * (1 - alpha)


def _inference_only(name: str) -> Callable[..., Any]:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"maskrcnn_benchmark._C.{name} is not provided by the benchmark's stand-in "
                                  "(inference only)")
    unavailable.__name__ = name
    return unavailable


C_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "modulated_deform_conv_forward": modulated_deform_conv_forward,
    "deform_conv_forward": deform_conv_forward,
    "nms": nms,
    "ml_nms": ml_nms,
    "roi_align_forward": roi_align_forward,
    "sigmoid_focalloss_forward": sigmoid_focalloss_forward,
    **{name: _inference_only(name) for name in (
        "soft_nms", "modulated_deform_conv_backward", "deform_conv_backward_input",
        "deform_conv_backward_parameters", "roi_align_backward", "roi_pool_forward", "roi_pool_backward",
        "sigmoid_focalloss_backward", "deform_psroi_pooling_forward", "deform_psroi_pooling_backward")},
}


def make_c_module() -> types.ModuleType:
    """A module object standing in for the compiled ``maskrcnn_benchmark._C``."""
    module = types.ModuleType("maskrcnn_benchmark._C", "torchvision stand-in for the compiled extension")
    for name, function in C_FUNCTIONS.items():
        setattr(module, name, function)
    return module


# Python-level replacements for the official autograd Functions, which refuse CPU tensors.

def modulated_deform_conv(input: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None = None,
                          stride: int = 1, padding: int = 0, dilation: int = 1, groups: int = 1,
                          deformable_groups: int = 1) -> Tensor:
    """``ModulatedDeformConvFunction.apply`` (same arguments) on any device, through the ``_C`` forward."""
    kh, kw = weight.shape[-2:]
    output = input.new_empty(0)
    with_bias = bias is not None
    modulated_deform_conv_forward(input, weight, bias if with_bias else input.new_empty(1), input.new_empty(0),
                                  offset, mask, output, input.new_empty(0), kh, kw, stride, stride, padding,
                                  padding, dilation, dilation, groups, deformable_groups, with_bias)
    return output


def deform_conv(input: Tensor, offset: Tensor, weight: Tensor, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                groups: int = 1, deformable_groups: int = 1, im2col_step: int = 64) -> Tensor:
    """``DeformConvFunction.apply`` (same arguments) on any device, through the ``_C`` forward."""
    (sh, sw), (ph, pw), (dh, dw) = (torch.nn.modules.utils._pair(v) for v in (stride, padding, dilation))
    output = input.new_empty(0)
    deform_conv_forward(input, weight, offset, output, input.new_empty(0), input.new_empty(0), weight.shape[3],
                        weight.shape[2], sw, sh, pw, ph, dw, dh, groups, deformable_groups, im2col_step)
    return output


# ---------------------------------------------------------------------------------------------
# Installing the shim
# ---------------------------------------------------------------------------------------------

def _torch_six() -> types.ModuleType:
    six = types.ModuleType("torch._six", "stand-in for the module removed in torch 2.0")
    six.PY3 = True
    six.PY37 = True
    six.string_classes = (str, bytes)
    six.int_classes = int
    six.container_abcs = collections.abc
    six.inf = math.inf
    return six


def _unused_module(name: str) -> types.ModuleType:
    """An importable stand-in whose attributes raise when called (the code path needing it is unused)."""
    module = types.ModuleType(name, f"stand-in: {name} is not installed and GLIP-T inference does not use it")

    def attribute(attr: str) -> Callable[..., Any]:
        def missing(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"{name}.{attr} is needed here but {name} is not installed")
        return missing

    module.__getattr__ = attribute  # type: ignore[method-assign]
    return module


def _find_pruneable_heads_and_indices(heads: list[int], n_heads: int, head_size: int,
                                      already_pruned_heads: set[int]) -> tuple[set[int], Tensor]:
    """The helper transformers dropped (only used when pruning attention heads)."""
    mask = torch.ones(n_heads, head_size)
    heads_set = set(heads) - already_pruned_heads
    for head in heads_set:
        mask[head - sum(1 for h in already_pruned_heads if h < head)] = 0
    index = torch.arange(n_heads * head_size)[mask.view(-1).eq(1)].long()
    return heads_set, index


def _patch_transformers() -> None:
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
    if not hasattr(modeling_utils, "find_pruneable_heads_and_indices"):
        modeling_utils.find_pruneable_heads_and_indices = _find_pruneable_heads_and_indices


def _boxlist_ml_nms(boxlist: Any, nms_thresh: float, max_proposals: int = -1, score_field: str = "scores",
                    label_field: str = "labels") -> Any:
    """Official ``boxlist_ml_nms`` with its compiled-extension branch taken on every device."""
    if nms_thresh <= 0:
        return boxlist
    mode = boxlist.mode
    boxlist = boxlist.convert("xyxy")
    keep = ml_nms(boxlist.bbox, boxlist.get_field(score_field), boxlist.get_field(label_field).float(), nms_thresh)
    if max_proposals > 0:
        keep = keep[:max_proposals]
    return boxlist[keep].convert(mode)


def _numpy_with_old_aliases() -> types.ModuleType:
    """numpy's namespace plus the scalar aliases numpy 1.24 removed (they were the builtins)."""
    import numpy

    view = types.ModuleType("numpy", numpy.__doc__)
    view.__dict__.update({k: v for k, v in vars(numpy).items() if not k.startswith("__")})
    for name, builtin in (("float", float), ("int", int), ("bool", bool), ("object", object)):
        setattr(view, name, builtin)
    return view


def _get_extended_attention_mask(self: Any, attention_mask: Tensor, input_shape: Any = None,
                                 device: Any = None, dtype: torch.dtype | None = None) -> Tensor:
    """transformers 4.x's mask broadcast for a (batch, tokens) mask: 0 where attended, -10000 elsewhere."""
    if attention_mask.dim() == 3:
        extended = attention_mask[:, None, :, :]
    elif attention_mask.dim() == 2:
        extended = attention_mask[:, None, None, :]
    else:
        raise ValueError(f"attention mask of shape {tuple(attention_mask.shape)}: expected 2 or 3 dims")
    extended = extended.to(dtype or torch.float32)
    return (1.0 - extended) * -10000.0


def install(official_root: str | Path) -> None:
    """Make the official checkout at ``official_root`` importable and runnable on this torch (patches 1-7)."""
    root = Path(official_root).resolve()
    if not (root / "maskrcnn_benchmark" / "__init__.py").is_file():
        raise FileNotFoundError(f"{root} is not a microsoft/GLIP checkout (no maskrcnn_benchmark/__init__.py)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if not hasattr(torch, "_six"):
        torch._six = sys.modules["torch._six"] = _torch_six()
    for name in OPTIONAL_MODULES:
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = _unused_module(name)
    _patch_transformers()
    package = importlib.import_module("maskrcnn_benchmark")
    if Path(package.__file__).resolve().parent != root / "maskrcnn_benchmark":
        raise ImportError(f"maskrcnn_benchmark is imported from {package.__file__}, not from {root}")
    c_module = make_c_module()
    sys.modules["maskrcnn_benchmark._C"] = c_module
    package._C = c_module

    deform_module = importlib.import_module("maskrcnn_benchmark.layers.deform_conv")
    deform_module.modulated_deform_conv = modulated_deform_conv
    deform_module.deform_conv = deform_conv
    importlib.import_module("maskrcnn_benchmark.modeling.rpn.anchor_generator").np = _numpy_with_old_aliases()
    vldyhead = importlib.import_module("maskrcnn_benchmark.modeling.rpn.vldyhead")
    if not hasattr(vldyhead.BertEncoderLayer, "get_extended_attention_mask"):
        vldyhead.BertEncoderLayer.get_extended_attention_mask = _get_extended_attention_mask
    rpn_inference = importlib.import_module("maskrcnn_benchmark.modeling.rpn.inference")
    rpn_inference.boxlist_ml_nms = _boxlist_ml_nms


def with_batch_encode_plus(tokenizer: Any) -> Any:
    """Give a tokenizer the ``batch_encode_plus`` that transformers 5 removed (patch 9): the official
    forward tokenizes its captions with it; calling the tokenizer on the list is what it did."""
    if not hasattr(tokenizer, "batch_encode_plus"):
        tokenizer.batch_encode_plus = types.MethodType(lambda self, texts, **kwargs: self(texts, **kwargs), tokenizer)
    return tokenizer


@contextmanager
def offline_bert(build_tokenizer: Callable[[str], Any]) -> Iterator[None]:
    """While active, "bert-base-uncased" resolves without the hub (patches 8 and 9): BertConfig() defaults,
    a randomly initialised BertModel, and ``build_tokenizer(name)`` for the tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    originals = {
        (owner, "from_pretrained"): owner.__dict__.get("from_pretrained")
        for owner in (BertConfig, BertModel, AutoTokenizer)
    }
    config_from_pretrained = BertConfig.from_pretrained
    model_from_pretrained = BertModel.from_pretrained
    tokenizer_from_pretrained = AutoTokenizer.from_pretrained

    def config(cls: type, name: Any, *args: Any, **kwargs: Any) -> Any:
        if name == OFFICIAL_BERT_NAME:
            return cls(**kwargs)
        return config_from_pretrained(name, *args, **kwargs)

    def model(cls: type, name: Any, *args: Any, config: Any = None, add_pooling_layer: bool = True,
              **kwargs: Any) -> Any:
        if name == OFFICIAL_BERT_NAME:
            return cls(config if config is not None else BertConfig(), add_pooling_layer=add_pooling_layer)
        return model_from_pretrained(name, *args, config=config, add_pooling_layer=add_pooling_layer, **kwargs)

    def tokenizer(cls: type, name: Any, *args: Any, **kwargs: Any) -> Any:
        if name == OFFICIAL_BERT_NAME and not args and not kwargs:
            return with_batch_encode_plus(build_tokenizer(name))
        return tokenizer_from_pretrained(name, *args, **kwargs)

    BertConfig.from_pretrained = classmethod(config)
    BertModel.from_pretrained = classmethod(model)
    AutoTokenizer.from_pretrained = classmethod(tokenizer)
    try:
        yield
    finally:
        for (owner, name), original in originals.items():
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
