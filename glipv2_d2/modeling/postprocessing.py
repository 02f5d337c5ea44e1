"""Inference post-processing of GLIP's ATSS head with a label -> token map.

Follows the official ``ATSSPostProcessor`` + ``convert_grounding_to_od_logits`` (SCORE_AGG "MEAN")
step for step, but batched: one tensor program per FPN level for all images, one NMS call and one
detections-per-image cap for the whole batch, and a different label -> token map per image.

Differences from the official code, all deliberate:

* Labels are arbitrary integers (the keys of the map) and are returned as they are. The official
  code writes label ``j`` into column ``j - 1`` of an 80-column tensor (the legacy class count), so
  it raises for labels above 80; here the label table is sized by the map.
* The official code takes one map for the whole batch; here each image may have its own.
* Detectron2's ``Boxes.clip`` / ``nonempty`` are not used: they clip to ``[0, w]`` and measure
  ``x2 - x1``, while the official post-processing clips to ``[0, w - 1]`` and measures
  ``x2 - x1 + 1``.
* Detections come out grouped by image and sorted by descending score. The official order follows
  ``topk(sorted=False)`` and the NMS kernel, so only the detection sets are comparable.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from detectron2.config import CfgNode, configurable
from detectron2.structures import Boxes, Instances
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import batched_nms

from .box_coder import LegacyBoxCoder

__all__ = [
    "ATSSPostProcessor",
    "Candidates",
    "LabelTokenMap",
    "batch_label_token_matrices",
    "cap_detections_per_image",
    "label_token_matrix",
    "legacy_batched_nms",
    "token_logits_to_label_scores",
]

LabelTokenMap = Mapping[int, Sequence[int]]


def label_token_matrix(
    label_to_tokens: LabelTokenMap, num_tokens: int, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Label ids ``(L,)`` and a row-normalised ``(L, num_tokens)`` matrix averaging each label's tokens.

    A token listed twice for a label counts twice, as in the official indexed mean.
    """
    label_ids, rows, cols, weights = [], [], [], []
    for row, (label, tokens) in enumerate(label_to_tokens.items()):
        tokens = [tokens] if isinstance(tokens, int) else list(tokens)
        if not tokens:
            raise ValueError(f"label {label} has no tokens in the label->token map")
        bad = [t for t in tokens if not 0 <= t < num_tokens]
        if bad:
            raise ValueError(
                f"label {label}: token indices {bad} are outside the prompt's {num_tokens} tokens"
            )
        label_ids.append(int(label))
        rows += [row] * len(tokens)
        cols += tokens
        weights += [1.0 / len(tokens)] * len(tokens)
    matrix = torch.zeros(len(label_ids), num_tokens, device=device)
    index = (
        torch.tensor(rows, dtype=torch.long, device=device),
        torch.tensor(cols, dtype=torch.long, device=device),
    )
    matrix.index_put_(index, torch.tensor(weights, device=device), accumulate=True)
    return torch.tensor(label_ids, dtype=torch.long, device=device), matrix


def batch_label_token_matrices(
    label_maps: Sequence[LabelTokenMap], num_tokens: int, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image label tables padded to the longest one.

    Returns label ids ``(B, L)``, label->token matrices ``(B, L, T)`` (padding rows are zero) and a
    validity mask ``(B, L)``.
    """
    tables = [label_token_matrix(m, num_tokens, device) for m in label_maps]
    ids = pad_sequence([image_ids for image_ids, _ in tables], batch_first=True)
    matrices = pad_sequence([image_matrix for _, image_matrix in tables], batch_first=True)
    valid = pad_sequence([torch.ones_like(image_ids, dtype=torch.bool) for image_ids, _ in tables], batch_first=True)
    return ids, matrices, valid


def token_logits_to_label_scores(token_logits: Tensor, label_matrices: Tensor) -> Tensor:
    """Mean token probability per label: ``(B, A, T)`` logits x ``(B, L, T)`` matrices -> ``(B, A, L)``.

    One float32 batched matmul; with ``torch.backends.cuda.matmul.allow_tf32`` on, it runs at TF32
    precision and scores move in the fourth digit.
    """
    return torch.bmm(token_logits.float().sigmoid(), label_matrices.float().transpose(1, 2))


def legacy_batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Group-wise greedy NMS with maskrcnn_benchmark's "+1" box areas; kept indices by descending score.

    Adding 1 to ``x2, y2`` turns torchvision's areas and intersections into the legacy ones exactly.
    The boxes go to float64 because ``batched_nms`` may offset each group by
    ``group * (max_coordinate + 1)``, which in float32 would round coordinates once there are many
    (image, label) groups.
    """
    boxes = boxes.double()
    boxes = torch.cat((boxes[:, :2], boxes[:, 2:] + 1), dim=1)
    return batched_nms(boxes, scores.double(), groups, iou_threshold)


def cap_detections_per_image(
    scores: Tensor, image_index: Tensor, num_images: int, max_per_image: int
) -> Tensor:
    """Indices kept by the official cap, grouped by image and sorted by descending score.

    Keeps every detection scoring at least the ``max_per_image``-th best score of its image (the
    official ``kthvalue`` rule), so ties at the cut are all kept.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(image_index[order], stable=True)]
    if max_per_image <= 0:
        return order
    counts = torch.bincount(image_index, minlength=num_images)
    over = counts > max_per_image
    cut_position = (counts.cumsum(0) - counts + max_per_image - 1)[over]
    threshold = torch.full((num_images,), float("-inf"), dtype=scores.dtype, device=scores.device)
    threshold[over] = scores[order[cut_position]]
    return order[scores[order] >= threshold[image_index[order]]]


@dataclass
class Candidates:
    """Detections of a whole batch in flat form; row ``i`` belongs to image ``image_index[i]``."""

    boxes: Tensor  # (N, 4) x1, y1, x2, y2
    scores: Tensor  # (N,)
    label_index: Tensor  # (N,) column of the batch's label table
    image_index: Tensor  # (N,)

    def __getitem__(self, index: Tensor) -> "Candidates":
        return Candidates(
            self.boxes[index], self.scores[index], self.label_index[index], self.image_index[index]
        )

    def __len__(self) -> int:
        return self.scores.shape[0]

    @staticmethod
    def cat(parts: Sequence["Candidates"]) -> "Candidates":
        return Candidates(
            torch.cat([p.boxes for p in parts]),
            torch.cat([p.scores for p in parts]),
            torch.cat([p.label_index for p in parts]),
            torch.cat([p.image_index for p in parts]),
        )


class ATSSPostProcessor:
    """Turn head outputs into per-image ``Instances`` (``pred_boxes``, ``scores``, ``pred_classes``).

    Per level: sigmoid, per-label mean over its tokens, keep ``score > score_thresh``, top
    ``pre_nms_top_n`` by ``score * sigmoid(centerness)``, decode, score ``sqrt(score *
    sigmoid(centerness))``, clip to the unpadded image, drop boxes smaller than ``min_size``
    (legacy "+1" sides). Per image: class-aware NMS (IoU > ``nms_thresh`` suppresses, "+1" areas) and
    the ``detections_per_img`` cap with ties kept. Runs in float32 with autocast off.
    """

    @configurable
    def __init__(
        self,
        box_coder: LegacyBoxCoder | None = None,
        score_thresh: float = 0.05,
        pre_nms_top_n: int = 1000,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
        min_size: float = 0.0,
    ) -> None:
        self.box_coder = box_coder or LegacyBoxCoder()
        self.score_thresh = score_thresh
        self.pre_nms_top_n = pre_nms_top_n
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.min_size = min_size

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        atss = cfg.MODEL.ATSS
        return {
            "box_coder": LegacyBoxCoder(cfg),
            "score_thresh": atss.INFERENCE_TH,
            "pre_nms_top_n": atss.PRE_NMS_TOP_N,
            "nms_thresh": atss.NMS_TH,
            "detections_per_img": atss.DETECTIONS_PER_IMG,
        }

    def select_level(
        self,
        box_regression: Tensor,
        centerness: Tensor,
        token_logits: Tensor,
        anchors: Tensor,
        image_sizes: Tensor,
        label_matrices: Tensor,
        label_valid: Tensor,
    ) -> Candidates:
        """Candidates of one level: box_regression ``(B, 4A, H, W)``, centerness ``(B, A, H, W)``,
        token_logits ``(B, H*W*A, T)``, anchors ``(H*W*A, 4)``, image_sizes ``(B, 2)`` as (h, w)."""
        num_images, _, height, width = box_regression.shape
        deltas = box_regression.float().reshape(num_images, -1, 4, height, width)
        deltas = deltas.permute(0, 3, 4, 1, 2).reshape(num_images, -1, 4)
        ctr = centerness.float().permute(0, 2, 3, 1).reshape(num_images, -1).sigmoid()

        label_scores = token_logits_to_label_scores(token_logits, label_matrices)
        is_candidate = (label_scores > self.score_thresh) & label_valid[:, None, :]
        # Non-candidates get -1, below any candidate's product (>= 0), so top-k takes candidates first.
        ranking = torch.where(is_candidate, label_scores * ctr[:, :, None], -1.0).flatten(1)
        top_values, top_index = ranking.topk(min(self.pre_nms_top_n, ranking.shape[1]), dim=1)
        keep = is_candidate.flatten(1).gather(1, top_index)

        num_labels = label_scores.shape[2]
        location = top_index // num_labels
        top_deltas = deltas.gather(1, location[..., None].expand(-1, -1, 4))
        boxes = self.box_coder.decode(top_deltas, anchors[location])
        boxes = _clip_legacy(boxes, image_sizes)
        keep &= _min_size_mask(boxes, self.min_size)

        image_index = torch.arange(num_images, device=boxes.device)[:, None].expand_as(top_index)
        return Candidates(
            boxes[keep], top_values[keep].sqrt(), (top_index % num_labels)[keep], image_index[keep]
        )

    def nms(self, candidates: Candidates, num_labels: int) -> Candidates:
        """Class-aware NMS inside each image; the result is sorted by descending score."""
        groups = candidates.image_index * num_labels + candidates.label_index
        return candidates[legacy_batched_nms(candidates.boxes, candidates.scores, groups, self.nms_thresh)]

    def cap(self, candidates: Candidates, num_images: int) -> Candidates:
        """The official detections-per-image cap (ties kept); grouped by image, best first."""
        keep = cap_detections_per_image(
            candidates.scores, candidates.image_index, num_images, self.detections_per_img
        )
        return candidates[keep]

    def __call__(
        self,
        box_regression: Sequence[Tensor],
        centerness: Sequence[Tensor],
        token_logits: Sequence[Tensor],
        anchors: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        label_maps: LabelTokenMap | Sequence[LabelTokenMap],
    ) -> list[Instances]:
        """Detections per image from per-level head outputs (finest level first).

        ``anchors`` are per level ``(H*W*A, 4)``, shared by all images; ``image_sizes`` are the
        unpadded ``(h, w)``; ``label_maps`` is one ``{label: [token indices]}`` for the whole
        batch or one per image. Boxes are in the unpadded image's coordinates.
        """
        num_images = box_regression[0].shape[0]
        device = box_regression[0].device
        if isinstance(label_maps, Mapping):
            label_maps = [label_maps] * num_images
        if len(label_maps) != num_images or len(image_sizes) != num_images:
            raise ValueError(
                f"got {num_images} images but {len(label_maps)} label maps and {len(image_sizes)} image sizes"
            )
        label_ids, label_matrices, label_valid = batch_label_token_matrices(
            label_maps, token_logits[0].shape[-1], device
        )
        sizes = torch.as_tensor(image_sizes, dtype=torch.float32, device=device).reshape(num_images, 2)
        with torch.autocast(device_type=device.type, enabled=False):
            per_level = [
                self.select_level(b, c, t, a, sizes, label_matrices, label_valid)
                for b, c, t, a in zip(box_regression, centerness, token_logits, anchors, strict=True)
            ]
            detections = self.cap(self.nms(Candidates.cat(per_level), label_ids.shape[1]), num_images)
        return self.to_instances(detections, label_ids, image_sizes)

    @staticmethod
    def to_instances(
        detections: Candidates, label_ids: Tensor, image_sizes: Sequence[tuple[int, int]]
    ) -> list[Instances]:
        """Split flat detections (grouped by image) into one ``Instances`` per image."""
        counts = torch.bincount(detections.image_index, minlength=len(image_sizes)).tolist()
        classes = label_ids[detections.image_index, detections.label_index]
        results = []
        for (height, width), boxes, scores, image_classes in zip(
            image_sizes,
            detections.boxes.split(counts),
            detections.scores.split(counts),
            classes.split(counts),
            strict=True,
        ):
            instances = Instances((int(height), int(width)))
            instances.pred_boxes = Boxes(boxes)
            instances.scores = scores
            instances.pred_classes = image_classes
            results.append(instances)
        return results


def _clip_legacy(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """Clip ``(B, K, 4)`` boxes to ``[0, w - 1] x [0, h - 1]`` of each image (``image_sizes`` (h, w))."""
    upper = (image_sizes.flip(1) - 1).repeat(1, 2)[:, None, :]
    return torch.minimum(boxes.clamp(min=0), upper)


def _min_size_mask(boxes: Tensor, min_size: float) -> Tensor:
    """Official ``remove_small_boxes``: both "+1" sides must be at least ``min_size``."""
    widths = boxes[..., 2] - boxes[..., 0] + 1
    heights = boxes[..., 3] - boxes[..., 1] + 1
    return (widths >= min_size) & (heights >= min_size)
