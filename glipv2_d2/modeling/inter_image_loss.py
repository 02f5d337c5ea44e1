"""L_inter: GLIPv2's inter-image region-word contrastive loss (paper §3.2, eq. 4-5).

Regions are ATSS anchors read from the image features BEFORE fusion; per image at most
``max_regions`` positives (a random subset when there are more) padded with random negative
anchors, every image of the (multi-GPU) batch getting the same number ``R = min(max_regions,
largest positive count of any image)``, as the official ``ATSSLossComputation`` does. Tokens are
all unmasked tokens of every prompt of the batch. Both sides are projected and L2-normalised; the
similarity is their dot product divided by ``exp(log_scale)``.

Targets span the whole batch: a region and a token of the same sample take the matched GT's
positive-map row; a region and a token of another sample are positive when that sample's prompt is
DETECTION-type and the token lies in the name of the region's GT category (label propagation).
Grounding-type prompts (free sentences) never receive propagated labels. The loss is a soft-target
cross-entropy in both directions (regions over tokens, tokens over regions), each row's target
spread evenly over its positives, halved and divided by the ATSS positives per GPU.

Which text features come in is the caller's choice: the paper uses the text encoder's output
(pre-fusion); the official code feeds the final fused text. Either way they are L2-normalised before
the projection, as the official code (which reuses its already normalised token embedding) does.

Deliberate differences from the official code, none of which changes the released weights' meaning:
positives are all anchors with a matched GT (the official list drops anchors matched to GT 0);
negatives are drawn from the remaining anchors with torch's RNG; padding tokens are left out rather
than masked with -1e6 (same softmax); and the cross-GPU gather back-propagates into every rank's
features (the official gather only keeps the local rank's own gradient, dropping how its loss
depends on the other ranks' features), so that under DDP's gradient averaging training matches one
process holding the whole batch.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.utils import comm
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

__all__ = [
    "InterImageContrastiveLoss",
    "RegionSelection",
    "RegionWordLabels",
    "multi_positive_cross_entropy",
    "region_word_targets",
    "select_regions",
]


@dataclass
class RegionWordLabels:
    """Everything L_inter needs about a batch besides the features.

    Attributes:
        matched_idxs: ``(B, A)`` int64 ATSS assignment (``GroundingTargets.matched_idxs``): the matched
            GT per anchor, -1 for negatives; anchors ordered by level, then ``y * W + x``.
        positive_maps: per image ``(N_i, T_i)`` GT-to-token maps, ``T_i <= T``; entries > 0 are positive.
        gt_categories: per image ``(N_i,)`` category id of each GT, -1 where unknown: pass -1 for
            grounding data, whose ``gt_classes`` are phrase indices, not categories. Ids are compared
            across images, so every dataset mixed into a batch must share one id space.
        token_categories: ``(B, T)`` category id whose name covers each token, -1 elsewhere
            (the prompts' ``token_categories``).
        is_detection: ``(B,)`` bool, True for detection-type prompts (joined category names).
    """

    matched_idxs: Tensor
    positive_maps: list[Tensor]
    gt_categories: list[Tensor]
    token_categories: Tensor
    is_detection: Tensor


@dataclass
class RegionSelection:
    """The anchors taking part in L_inter: positives first, then negative padding, each ascending.

    Attributes:
        anchor_indices: ``(B, R)`` int64 indices into each image's anchors.
        gt_indices: ``(B, R)`` int64 matched GT of each region, -1 for the negative padding.
    """

    anchor_indices: Tensor
    gt_indices: Tensor


def select_regions(matched_idxs: Tensor, num_regions: int, generator: torch.Generator | None = None) -> RegionSelection:
    """Pick ``num_regions`` anchors per image: positives first (a uniformly random subset when an image
    has more), the rest random negatives, so that every image contributes the same number of rows.

    One random key per anchor, raised by 1 for positives, and a top-k does both draws at once.
    """
    num_anchors = matched_idxs.shape[1]
    if num_regions > num_anchors:
        raise ValueError(f"cannot select {num_regions} regions from images with only {num_anchors} anchors")
    positive = matched_idxs >= 0
    keys = torch.rand(matched_idxs.shape, generator=generator, device=matched_idxs.device) + positive
    chosen = keys.topk(num_regions, dim=1).indices
    negative_chosen = ~positive.gather(1, chosen)
    order = (chosen + negative_chosen * num_anchors).argsort(dim=1)
    anchor_indices = chosen.gather(1, order)
    return RegionSelection(anchor_indices, matched_idxs.gather(1, anchor_indices))


def region_word_targets(
    region_sample: Tensor,
    region_category: Tensor,
    region_own_targets: Tensor,
    token_sample: Tensor,
    token_position: Tensor,
    token_category: Tensor,
) -> Tensor:
    """``(R, N)`` bool positives between regions and tokens of (possibly) different samples.

    Args:
        region_sample: ``(R,)`` batch-wide sample index of each region.
        region_category: ``(R,)`` category of each region's GT, -1 for none.
        region_own_targets: ``(R, T)`` each region's positive-map row over its own prompt's positions
            (zeros for negatives); only read where region and token share a sample.
        token_sample: ``(N,)`` batch-wide sample index of each token.
        token_position: ``(N,)`` position of each token in its prompt.
        token_category: ``(N,)`` category whose name covers the token; -1 for other tokens and for
            every token of a grounding-type prompt, which must receive no propagated label.
    """
    same_sample = region_sample[:, None] == token_sample[None, :]
    width = int(token_position.max()) + 1 if token_position.numel() else 0
    own_rows = F.pad(region_own_targets.bool(), (0, max(width - region_own_targets.shape[1], 0)))
    own = own_rows[:, token_position] & same_sample
    same_category = (region_category[:, None] == token_category[None, :]) & (region_category[:, None] >= 0)
    return own | (same_category & ~same_sample)


def multi_positive_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed softmax cross-entropy of each row against its positives, weighted evenly.

    Rows without a positive add nothing (the official ``normalized_positive_map`` + NLL).
    """
    targets = targets.to(logits.dtype)
    weights = targets / targets.sum(dim=1, keepdim=True).clamp(min=1.0)
    return -(weights * logits.log_softmax(dim=1)).sum()


@dataclass
class _Regions:
    """Selected regions of the local batch (or of the whole gathered batch)."""

    embeddings: Tensor  # (R, D) normalised projections
    sample: Tensor  # (R,) batch-wide sample index
    category: Tensor  # (R,) GT category, -1 for none
    own_targets: Tensor  # (R, T_local) own positive-map rows


@dataclass
class _Tokens:
    """Unmasked tokens of the local batch (or of the whole gathered batch)."""

    embeddings: Tensor  # (N, D) normalised projections
    sample: Tensor  # (N,) batch-wide sample index
    position: Tensor  # (N,) position in its prompt
    category: Tensor  # (N,) category id; -1 off category names and on grounding prompts


@dataclass
class _BatchLayout:
    """Per-rank sizes of the distributed batch, exchanged once so every later gather knows its sizes."""

    rank: int
    images: list[int]
    positives: list[int]
    max_positives: list[int]
    tokens: list[int]

    @property
    def sample_offset(self) -> int:
        return sum(self.images[: self.rank])

    def regions_per_image(self, max_regions: int) -> int:
        return min(max_regions, max(self.max_positives))

    def positives_per_rank(self) -> float:
        """The official normaliser: ATSS positives of all ranks over the rank count, at least 1."""
        return max(sum(self.positives) / len(self.positives), 1.0)


class InterImageContrastiveLoss(nn.Module):
    """L_inter with its learnable parts (two projections and the log temperature).

    Official checkpoint keys ``rpn.loss_evaluator.shallow_contrastive_projection_{image,text}.*`` and
    ``rpn.loss_evaluator.shallow_log_scale`` correspond to ``image_projection.*``, ``text_projection.*``
    and ``log_scale``.
    """

    @configurable
    def __init__(
        self,
        image_channels: int = 256,
        text_dim: int = 768,
        dim: int = 64,
        max_regions: int = 100,
        log_scale_init: float = 0.0,
        loss_weight: float = 1.0,
        text_features: str = "pre_fusion",
    ) -> None:
        """``text_features``: the token side, "pre_fusion" (text encoder output, as the paper says) or
        "fused" (the final fused text, as the official code does); the model passes the one named."""
        super().__init__()
        if max_regions < 1:
            raise ValueError(f"max_regions must be >= 1, got {max_regions}")
        if text_features not in ("pre_fusion", "fused"):
            raise ValueError(
                f"MODEL.INTER_IMAGE_LOSS.TEXT_FEATURES must be 'pre_fusion' or 'fused', got {text_features!r}"
            )
        self.text_features = text_features
        self.image_projection = nn.Linear(image_channels, dim)
        self.text_projection = nn.Linear(text_dim, dim)
        self.log_scale = nn.Parameter(torch.tensor([float(log_scale_init)]))
        self.max_regions = int(max_regions)
        self.loss_weight = float(loss_weight)
        for projection in (self.image_projection, self.text_projection):
            nn.init.xavier_uniform_(projection.weight)
            nn.init.zeros_(projection.bias)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Sequence[ShapeSpec], text_dim: int) -> dict:
        """Regions come from the pre-fusion levels ``input_shape``, tokens have width ``text_dim``."""
        settings = cfg.MODEL.INTER_IMAGE_LOSS
        return {
            "image_channels": input_shape[0].channels,
            "text_dim": text_dim,
            "dim": settings.DIM,
            "max_regions": settings.MAX_REGIONS,
            "log_scale_init": settings.LOG_SCALE_INIT,
            "loss_weight": settings.WEIGHT,
            "text_features": settings.TEXT_FEATURES,
        }

    def forward(
        self, features: list[Tensor], text_features: Tensor, text_mask: Tensor, labels: RegionWordLabels
    ) -> Tensor:
        """The weighted loss of this rank's rows and columns (in float32, also under autocast).

        Every rank must call this in every training step: it exchanges sizes and features with the
        other ranks. Summed over ranks, the losses equal ``world_size`` times the loss of one process
        holding the whole batch, like the other ATSS terms, so DDP's gradient averaging reproduces it.

        Args:
            features: per level ``(B, C, H_l, W_l)`` image features before fusion (the anchors' layout).
            text_features: ``(B, T, H)`` token features (pre-fusion per the paper, fused per the official code).
            text_mask: ``(B, T)``; tokens with a value > 0 take part.
            labels: the batch's assignment and category information.
        """
        self._check_inputs(features, text_features, text_mask, labels)
        with torch.autocast(device_type=text_features.device.type, enabled=False):
            layout = _exchange_layout(labels.matched_idxs, text_mask)
            selection = select_regions(labels.matched_idxs, layout.regions_per_image(self.max_regions))
            regions = self._local_regions(features, labels, selection, layout.sample_offset)
            tokens = self._local_tokens(text_features, text_mask, labels, layout.sample_offset)
            all_regions = _gather_regions(regions, layout, selection.anchor_indices.shape[1])
            all_tokens = _gather_tokens(tokens, layout)
            temperature = self.log_scale.exp()
            region_rows = multi_positive_cross_entropy(
                regions.embeddings @ all_tokens.embeddings.T / temperature, _targets(regions, all_tokens)
            )
            token_rows = multi_positive_cross_entropy(
                tokens.embeddings @ all_regions.embeddings.T / temperature, _targets(all_regions, tokens).T
            )
            loss = (region_rows + token_rows) / 2 / layout.positives_per_rank()
        return loss * self.loss_weight

    def _local_regions(
        self, features: list[Tensor], labels: RegionWordLabels, selection: RegionSelection, sample_offset: int
    ) -> _Regions:
        """Project the selected anchors' features and attach their GT's category and token row."""
        batch = selection.anchor_indices.shape[0]
        flat = torch.cat([level.flatten(2).transpose(1, 2) for level in features], dim=1)
        picked = flat[torch.arange(batch, device=flat.device)[:, None], selection.anchor_indices]
        embeddings = F.normalize(self.image_projection(picked.flatten(0, 1).float()), dim=-1)
        sample = torch.arange(batch, device=embeddings.device).repeat_interleave(selection.anchor_indices.shape[1])
        category, own_targets = _region_labels(labels, selection.gt_indices)
        return _Regions(embeddings, sample + sample_offset, category.to(sample.device), own_targets.to(sample.device))

    def _local_tokens(
        self, text_features: Tensor, text_mask: Tensor, labels: RegionWordLabels, sample_offset: int
    ) -> _Tokens:
        """Project the unmasked tokens; hide the categories of grounding-type prompts."""
        sample, position = torch.nonzero(text_mask > 0, as_tuple=True)
        states = F.normalize(text_features[sample, position].float(), dim=-1)
        embeddings = F.normalize(self.text_projection(states), dim=-1)
        token_categories = labels.token_categories.to(sample.device).long()
        is_detection = labels.is_detection.to(sample.device).bool()
        category = torch.where(is_detection[sample], token_categories[sample, position], -1)
        return _Tokens(embeddings, sample + sample_offset, position, category)

    def _check_inputs(
        self, features: list[Tensor], text_features: Tensor, text_mask: Tensor, labels: RegionWordLabels
    ) -> None:
        """Name the offending input instead of failing deep inside an indexing op."""
        batch, num_tokens = text_mask.shape
        num_anchors = sum(level.shape[2] * level.shape[3] for level in features)
        expected = {
            "text_features": (text_features.shape[:2], (batch, num_tokens)),
            "labels.matched_idxs": (tuple(labels.matched_idxs.shape), (batch, num_anchors)),
            "labels.token_categories": (tuple(labels.token_categories.shape), (batch, num_tokens)),
            "labels.is_detection": (tuple(labels.is_detection.shape), (batch,)),
        }
        for name, (shape, wanted) in expected.items():
            if tuple(shape) != tuple(wanted):
                raise ValueError(f"{name} has shape {tuple(shape)}, expected {tuple(wanted)} (batch, anchors/tokens)")
        for i, level in enumerate(features):
            if level.shape[:2] != (batch, self.image_projection.in_features):
                raise ValueError(
                    f"features[{i}] has shape {tuple(level.shape)}, expected ({batch}, "
                    f"{self.image_projection.in_features}, H, W)"
                )
        if text_features.shape[2] != self.text_projection.in_features:
            raise ValueError(
                f"text_features has width {text_features.shape[2]}, expected {self.text_projection.in_features}"
            )
        if not len(labels.positive_maps) == len(labels.gt_categories) == batch:
            raise ValueError(
                f"batch of {batch} but {len(labels.positive_maps)} positive_maps and "
                f"{len(labels.gt_categories)} gt_categories"
            )
        for i, (positive_map, categories) in enumerate(zip(labels.positive_maps, labels.gt_categories, strict=True)):
            num_gt = int(categories.shape[0])
            if positive_map.dim() != 2 or positive_map.shape[0] != num_gt or positive_map.shape[1] > num_tokens:
                raise ValueError(
                    f"positive_maps[{i}] has shape {tuple(positive_map.shape)}, expected ({num_gt}, <= {num_tokens})"
                )
        num_gts = torch.tensor([c.shape[0] for c in labels.gt_categories], device=labels.matched_idxs.device)
        beyond = (labels.matched_idxs >= num_gts[:, None]).any(dim=1)
        if beyond.any():
            i = int(beyond.nonzero()[0])
            raise ValueError(f"matched_idxs[{i}] names a GT index >= its {int(num_gts[i])} gt_categories")


def _region_labels(labels: RegionWordLabels, gt_indices: Tensor) -> tuple[Tensor, Tensor]:
    """Flat ``(B*R,)`` GT category and ``(B*R, T)`` own positive-map row of each region (-1 / zeros
    for the negative padding)."""
    num_tokens = labels.token_categories.shape[1]
    categories = _pad_rows([c.long() for c in labels.gt_categories], fill=-1, width=None).to(gt_indices.device)
    maps = _pad_rows([m > 0 for m in labels.positive_maps], fill=False, width=num_tokens).to(gt_indices.device)
    image = torch.arange(gt_indices.shape[0], device=gt_indices.device)[:, None].expand_as(gt_indices)
    is_positive = gt_indices >= 0
    gt = gt_indices.clamp(min=0)
    category = torch.where(is_positive, categories[image, gt], -1)
    own_targets = maps[image, gt] & is_positive[..., None]
    return category.flatten(), own_targets.flatten(0, 1)


def _targets(regions: _Regions, tokens: _Tokens) -> Tensor:
    return region_word_targets(
        regions.sample, regions.category, regions.own_targets, tokens.sample, tokens.position, tokens.category
    )


def _pad_rows(rows: list[Tensor], fill: int | bool, width: int | None) -> Tensor:
    """``(B, max(1, max N_i), ...)`` stack of per-image tensors (1-D, or 2-D widened to ``width``
    columns), padded with ``fill``. At least one row, so the negatives' clamped GT index 0 reads fill."""
    if width is not None:
        rows = [F.pad(r, (0, width - r.shape[1]), value=fill) for r in rows]
    padded = pad_sequence(rows, batch_first=True, padding_value=fill)
    if padded.shape[1] == 0:
        return padded.new_full((len(rows), 1, *padded.shape[2:]), fill)
    return padded


def _exchange_layout(matched_idxs: Tensor, text_mask: Tensor) -> _BatchLayout:
    """One all_gather of (images, positives, most positives in an image, tokens) per rank."""
    positives = (matched_idxs >= 0).sum(dim=1)
    local = torch.stack((
        torch.tensor(matched_idxs.shape[0], device=matched_idxs.device),
        positives.sum(),
        positives.max(),
        (text_mask > 0).sum().to(matched_idxs.device),
    ))
    per_rank = _all_gather_rows(local[None], [1] * comm.get_world_size()).tolist()
    images, num_positives, max_positives, tokens = (list(column) for column in zip(*per_rank, strict=True))
    return _BatchLayout(comm.get_rank(), images, num_positives, max_positives, tokens)


def _gather_regions(regions: _Regions, layout: _BatchLayout, per_image: int) -> _Regions:
    """All ranks' regions; own-target rows stay local (zeros elsewhere), since no other rank's
    region shares a sample with this rank's tokens."""
    counts = [n * per_image for n in layout.images]
    meta = _all_gather_rows(torch.stack((regions.sample, regions.category), dim=1), counts)
    own = regions.own_targets.new_zeros(sum(counts), regions.own_targets.shape[1])
    start = sum(counts[: layout.rank])
    own[start : start + regions.own_targets.shape[0]] = regions.own_targets
    return _Regions(_gather_with_grad(regions.embeddings, counts, layout.rank), meta[:, 0], meta[:, 1], own)


def _gather_tokens(tokens: _Tokens, layout: _BatchLayout) -> _Tokens:
    meta = _all_gather_rows(torch.stack((tokens.sample, tokens.position, tokens.category), dim=1), layout.tokens)
    embeddings = _gather_with_grad(tokens.embeddings, layout.tokens, layout.rank)
    return _Tokens(embeddings, meta[:, 0], meta[:, 1], meta[:, 2])


def _all_gather_rows(tensor: Tensor, counts: list[int]) -> Tensor:
    """Concatenate every rank's rows (rank ``r`` holding ``counts[r]``), padding to a common length
    because ``all_gather`` needs equal shapes."""
    if len(counts) == 1 or max(counts) == 0:
        return tensor
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    buffers = [torch.empty_like(padded) for _ in counts]
    torch.distributed.all_gather(buffers, padded.contiguous())
    return torch.cat([buffer[:count] for buffer, count in zip(buffers, counts, strict=True)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """``_all_gather_rows`` whose backward sums every rank's gradient for the local rows (a
    reduce-scatter), so each rank's loss term differentiates through all ranks' features."""

    @staticmethod
    def forward(ctx, tensor: Tensor, counts: list[int], rank: int) -> Tensor:
        ctx.counts, ctx.rank = counts, rank
        return _all_gather_rows(tensor, counts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        summed = grad.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(summed)
        start = sum(ctx.counts[: ctx.rank])
        return summed[start : start + ctx.counts[ctx.rank]], None, None


def _gather_with_grad(tensor: Tensor, counts: list[int], rank: int) -> Tensor:
    if len(counts) == 1 or max(counts) == 0:
        return tensor
    return _GatherWithGrad.apply(tensor, counts, rank)
