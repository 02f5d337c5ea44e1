"""L_inter (GLIPv2 eq. 4-5): region selection, batch-wide targets, loss value, gradients, 2-process gather."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from glipv2_d2.modeling.inter_image_loss import (
    InterImageContrastiveLoss,
    RegionWordLabels,
    region_word_targets,
    select_regions,
)

# A batch of three prompts, padded to T = 7 tokens:
#   sample 0, detection  "person. dog"          [CLS] person . dog [SEP] <pad> <pad>   (categories 1, 2)
#   sample 1, detection  "cat. person"          [CLS] cat . person [SEP] <pad> <pad>   (categories 3, 1)
#   sample 2, grounding  "a person with a dog"  [CLS] a person with a dog [SEP]        (phrases "a person", "a dog")
# Real tokens are numbered batch-wide: sample 0 -> 0..4, sample 1 -> 5..9, sample 2 -> 10..16.
TEXT_MASK = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
# Category of each token ({1: [1], 2: [3]}, {3: [1], 1: [3]}, {1: [2], 2: [5]}); sample 2's must be ignored: grounding
TOKEN_CATEGORIES = torch.tensor([[-1, 1, -1, 2, -1, -1, -1], [-1, 3, -1, 1, -1, -1, -1], [-1, -1, 1, -1, -1, 2, -1]])
IS_DETECTION = torch.tensor([True, True, False])
GT_CATEGORIES = [torch.tensor([1, 2]), torch.tensor([1]), torch.tensor([-1, -1])]
POSITIVE_MAPS = [
    torch.tensor([[0, 1, 0, 0, 0], [0, 0, 0, 1, 0]]),  # narrower than T: maps may cover only their own prompt
    torch.tensor([[0, 0, 0, 1, 0, 0]]),
    torch.tensor([[0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0]]),
]
# Anchors: a 2x2 level then a 1x1 level (A = 5). Sample 0 has 5 positives, so with max_regions >= 5
# every anchor of every image is selected and the selection is deterministic.
MATCHED_IDXS = torch.tensor([[0, 1, 0, 0, 1], [-1, 0, -1, -1, -1], [-1, 1, 0, 0, -1]])
NUM_POSITIVES = 9

# Paper rule, one row per (sample, matched GT): batch-wide token indices that are positive.
#   person of sample 0 -> its own "person" (1) + "person" of detection sample 1 (8); not sample 2's (grounding)
#   dog of sample 0    -> its own "dog" (3) only: sample 1 has no dog, sample 2's "dog" is a grounding text
#   person of sample 1 -> its own (8) + sample 0's "person" (1)
#   grounding phrases  -> their own tokens only (no category, nothing propagated)
EXPECTED_POSITIVES = {(0, 0): {1, 8}, (0, 1): {3}, (1, 0): {1, 8}, (2, 0): {11, 12}, (2, 1): {14, 15}}

IMAGE_CHANNELS, TEXT_DIM, DIM = 4, 6, 3


def _labels(matched_idxs=MATCHED_IDXS, num_tokens=7, samples=slice(None)) -> RegionWordLabels:
    index = range(3)[samples]
    return RegionWordLabels(
        matched_idxs=matched_idxs[samples],
        positive_maps=[POSITIVE_MAPS[i] for i in index],
        gt_categories=[GT_CATEGORIES[i] for i in index],
        token_categories=TOKEN_CATEGORIES[samples, :num_tokens],
        is_detection=IS_DETECTION[samples],
    )


def _inputs(generator_seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(generator_seed)
    features = [
        torch.randn(3, IMAGE_CHANNELS, 2, 2, generator=generator),
        torch.randn(3, IMAGE_CHANNELS, 1, 1, generator=generator),
    ]
    text = torch.randn(3, 7, TEXT_DIM, generator=generator) * 5
    return features, text


def _module(**kwargs) -> InterImageContrastiveLoss:
    torch.manual_seed(1)
    module = InterImageContrastiveLoss(IMAGE_CHANNELS, TEXT_DIM, DIM, **kwargs)
    with torch.no_grad():
        module.log_scale.fill_(-0.7)  # a temperature other than 1, so the division is exercised
    return module


def _reference_loss(module, features, text, anchor_indices) -> float:
    """The loss written out element by element from the paper's rule (EXPECTED_POSITIVES)."""
    with torch.no_grad():
        flat = torch.cat([level.flatten(2).transpose(1, 2) for level in features], dim=1)
        regions, region_keys = [], []
        for b in range(3):
            for a in anchor_indices[b].tolist():
                regions.append(F.normalize(module.image_projection(flat[b, a]), dim=0))
                region_keys.append((b, int(MATCHED_IDXS[b, a])))
        tokens = [
            F.normalize(module.text_projection(F.normalize(text[b, t], dim=0)), dim=0)
            for b in range(3)
            for t in range(7)
            if TEXT_MASK[b, t]
        ]
        temperature = math.exp(float(module.log_scale))
        sims = [[float(r @ t) / temperature for t in tokens] for r in regions]
    targets = [[j in EXPECTED_POSITIVES.get(key, set()) for j in range(len(tokens))] for key in region_keys]

    def soft_cross_entropy(rows, row_targets):
        total = 0.0
        for logits, positives in zip(rows, row_targets, strict=True):
            count = sum(positives)
            if count == 0:
                continue
            log_normaliser = math.log(sum(math.exp(x) for x in logits))
            total -= sum((x - log_normaliser) / count for x, p in zip(logits, positives, strict=True) if p)
        return total

    by_region = soft_cross_entropy(sims, targets)
    by_token = soft_cross_entropy([list(col) for col in zip(*sims, strict=True)],
                                  [list(col) for col in zip(*targets, strict=True)])
    return (by_region + by_token) / 2 / NUM_POSITIVES


def test_target_matrix_follows_the_paper_rule_literally():
    # Regions: sample 0 -> person, dog, negative; sample 1 -> person, negative;
    # sample 2 -> "a person", "a dog", negative.
    region_sample = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    region_category = torch.tensor([1, 2, -1, 1, -1, -1, -1, -1])
    region_gt = [(0, 0), (0, 1), None, (1, 0), None, (2, 0), (2, 1), None]
    own = torch.zeros(8, 7, dtype=torch.bool)
    for row, key in enumerate(region_gt):
        if key is not None:
            positive_map = POSITIVE_MAPS[key[0]][key[1]] > 0
            own[row, : positive_map.shape[0]] = positive_map
    sample, position = torch.nonzero(TEXT_MASK, as_tuple=True)
    category = TOKEN_CATEGORIES[sample, position]
    category = torch.where(IS_DETECTION[sample], category, -1)  # grounding prompts carry no category

    targets = region_word_targets(region_sample, region_category, own, sample, position, category)

    expected = torch.tensor([
        # sample 0 tokens  sample 1 tokens   sample 2 tokens
        [0, 1, 0, 0, 0,    0, 0, 0, 1, 0,    0, 0, 0, 0, 0, 0, 0],  # s0 person
        [0, 0, 0, 1, 0,    0, 0, 0, 0, 0,    0, 0, 0, 0, 0, 0, 0],  # s0 dog
        [0, 0, 0, 0, 0,    0, 0, 0, 0, 0,    0, 0, 0, 0, 0, 0, 0],  # s0 negative
        [0, 1, 0, 0, 0,    0, 0, 0, 1, 0,    0, 0, 0, 0, 0, 0, 0],  # s1 person
        [0, 0, 0, 0, 0,    0, 0, 0, 0, 0,    0, 0, 0, 0, 0, 0, 0],  # s1 negative
        [0, 0, 0, 0, 0,    0, 0, 0, 0, 0,    0, 1, 1, 0, 0, 0, 0],  # s2 "a person"
        [0, 0, 0, 0, 0,    0, 0, 0, 0, 0,    0, 0, 0, 0, 1, 1, 0],  # s2 "a dog"
        [0, 0, 0, 0, 0,    0, 0, 0, 0, 0,    0, 0, 0, 0, 0, 0, 0],  # s2 negative
    ], dtype=torch.bool)  # fmt: skip
    assert torch.equal(targets, expected)
    for row, key in enumerate(region_gt):
        assert set(torch.nonzero(expected[row]).flatten().tolist()) == EXPECTED_POSITIVES.get(key, set())


def test_selection_caps_positives_pads_with_negatives_and_follows_the_seed():
    matched = torch.full((2, 20), -1)
    matched[0, [2, 3, 5, 8, 11, 13, 17]] = torch.arange(7)
    matched[1, [4, 9]] = torch.tensor([1, 0])

    torch.manual_seed(3)
    first = select_regions(matched, 4)
    torch.manual_seed(3)
    again = select_regions(matched, 4)
    assert torch.equal(first.anchor_indices, again.anchor_indices)
    seeded = [select_regions(matched, 4, torch.Generator().manual_seed(3)).anchor_indices for _ in range(2)]
    assert torch.equal(*seeded)

    anchors, gts = first.anchor_indices, first.gt_indices
    assert anchors.shape == gts.shape == (2, 4)
    assert torch.equal(gts, matched.gather(1, anchors))
    assert (gts[0] >= 0).all()  # 7 positives capped at 4, no negative
    assert set(anchors[0].tolist()) <= {2, 3, 5, 8, 11, 13, 17} and anchors[0].tolist() == sorted(anchors[0].tolist())
    assert anchors[1, :2].tolist() == [4, 9] and gts[1, :2].tolist() == [1, 0]  # both positives, then 2 negatives
    assert (gts[1, 2:] == -1).all() and anchors[1, 2] < anchors[1, 3]
    draws = {tuple(select_regions(matched, 4).anchor_indices.flatten().tolist()) for _ in range(20)}
    assert len(draws) > 1  # the subset and the padding are random
    with pytest.raises(ValueError, match="only 20 anchors"):
        select_regions(matched, 21)


def test_loss_of_a_one_region_batch_is_the_hand_computed_value():
    module = InterImageContrastiveLoss(
        image_channels=2, text_dim=2, dim=2, log_scale_init=math.log(0.5), loss_weight=3.0
    )
    with torch.no_grad():
        for projection in (module.image_projection, module.text_projection):
            projection.weight.copy_(torch.eye(2))
    features = [torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])]  # (1, 2, 1, 2): anchor 0 = (1, 0), anchor 1 = (0, 1)
    text = torch.tensor([[[3.0, 0.0], [0.0, 2.0]]])  # tokens along (1, 0) and (0, 1)
    labels = RegionWordLabels(
        matched_idxs=torch.tensor([[0, -1]]),
        positive_maps=[torch.tensor([[1, 0]])],
        gt_categories=[torch.tensor([1])],
        token_categories=torch.tensor([[1, -1]]),
        is_detection=torch.tensor([True]),
    )
    loss = module(features, text, torch.ones(1, 2), labels)
    # One region (the largest positive count is 1, so no negative padding), similarities 1 / 0.5 and 0:
    # region row -log softmax([2, 0])[0]; the token column has a single region, so log softmax = 0.
    expected = 3.0 * (math.log(math.exp(2.0) + 1.0) - 2.0 + 0.0) / 2 / 1
    assert float(loss) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("max_regions, seed", [(100, 0), (2, 7)])
def test_loss_matches_the_element_wise_reference(max_regions, seed):
    module = _module(max_regions=max_regions)
    features, text = _inputs()
    torch.manual_seed(seed)
    selection = select_regions(MATCHED_IDXS, min(max_regions, 5))
    torch.manual_seed(seed)
    loss = module(features, text, TEXT_MASK, _labels())
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(_reference_loss(module, features, text, selection.anchor_indices), rel=1e-5)


def test_gradients_reach_both_encoders_inputs_and_the_projections():
    module = _module()
    features, text = _inputs()
    features = [level.requires_grad_() for level in features]
    text.requires_grad_()
    module(features, text, TEXT_MASK, _labels()).backward()
    assert all(level.grad.abs().sum() > 0 for level in features)
    token_grad = text.grad.abs().sum(dim=-1)
    assert (token_grad[TEXT_MASK.bool()] > 0).all()
    assert (token_grad[~TEXT_MASK.bool()] == 0).all()  # padding tokens take no part
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_batch_without_positives_gives_zero_with_every_parameter_in_the_graph():
    module = _module()
    features, text = _inputs()
    loss = module(features, text, TEXT_MASK, _labels(matched_idxs=torch.full_like(MATCHED_IDXS, -1)))
    loss.backward()
    assert float(loss) == 0.0
    # DDP without find_unused_parameters needs a (zero) gradient for every parameter.
    assert all(p.grad is not None and not p.grad.any() for p in module.parameters())


def test_runs_in_float32_under_autocast():
    module = _module()
    features, text = _inputs()
    reference = module(features, text, TEXT_MASK, _labels())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module([f.bfloat16() for f in features], text.bfloat16(), TEXT_MASK, _labels())
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(reference), rel=2e-2)


def test_state_dict_keys_and_bad_inputs():
    module = InterImageContrastiveLoss()
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == {
        "image_projection.weight": (64, 256), "image_projection.bias": (64,),
        "text_projection.weight": (64, 768), "text_projection.bias": (64,),
        "log_scale": (1,),
    }  # fmt: skip
    assert float(module.log_scale) == 0.0 and module.max_regions == 100
    small = _module()
    features, text = _inputs()
    with pytest.raises(ValueError, match="labels.matched_idxs"):
        small(features, text, TEXT_MASK, _labels(matched_idxs=MATCHED_IDXS[:, :4]))
    with pytest.raises(ValueError, match=r"features\[1\]"):
        small([features[0], features[1][:, :2]], text, TEXT_MASK, _labels())


def _ddp_worker(rank: int, world_size: int, init_file: str, data_file: str, out_dir: str) -> None:
    """One rank of a 2-process gloo run: rank 0 holds samples 0-1 (6 padded tokens), rank 1 sample 2 (7)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        data = torch.load(data_file, weights_only=True)
        module = InterImageContrastiveLoss(IMAGE_CHANNELS, TEXT_DIM, DIM)
        module.load_state_dict(data["state"])
        samples, num_tokens = (slice(0, 2), 6) if rank == 0 else (slice(2, 3), 7)
        features = [level[samples].clone().requires_grad_() for level in data["features"]]
        text = data["text"][samples, :num_tokens].clone().requires_grad_()
        labels = _labels(num_tokens=num_tokens, samples=samples)
        loss = module(features, text, TEXT_MASK[samples, :num_tokens], labels)
        loss.backward()
        grads = {}
        for name, parameter in module.named_parameters():  # what DDP does: average over ranks
            dist.all_reduce(parameter.grad)
            grads[name] = parameter.grad / world_size
        torch.save(
            {"loss": loss.detach(), "grads": grads, "features": [f.grad for f in features], "text": text.grad},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process_with_the_whole_batch(tmp_path):
    module = _module()
    features, text = _inputs()
    data_file = tmp_path / "data.pt"
    torch.save({"state": module.state_dict(), "features": features, "text": text}, data_file)

    features = [level.clone().requires_grad_() for level in features]
    text = text.clone().requires_grad_()
    loss = module(features, text, TEXT_MASK, _labels())
    loss.backward()

    # "fork" rather than "spawn": a spawned child re-imports glipv2_d2 (transformers...), ~10 s each on CI.
    args = (2, str(tmp_path / "init"), str(data_file), str(tmp_path))
    mp.start_processes(_ddp_worker, args=args, nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # Each rank's loss covers its own regions (rows) and tokens (columns) over the whole batch, normalised
    # by positives per GPU: the mean over ranks, which DDP's gradient averaging optimises, is the
    # one-process loss.
    assert float(ranks[0]["loss"]) != pytest.approx(float(ranks[1]["loss"]))
    assert float((ranks[0]["loss"] + ranks[1]["loss"]) / 2) == pytest.approx(float(loss), rel=1e-5)
    for name, parameter in module.named_parameters():
        torch.testing.assert_close(ranks[0]["grads"][name], parameter.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ranks[1]["grads"][name], parameter.grad, rtol=1e-4, atol=1e-6)
    # Input gradients are the sum over ranks' losses = world_size x the one-process gradient; the
    # encoders' parameter gradients, averaged by DDP, then equal the one-process ones.
    for level, rank0, rank1 in zip(features, ranks[0]["features"], ranks[1]["features"], strict=True):
        torch.testing.assert_close(torch.cat((rank0, rank1)) / 2, level.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ranks[0]["text"] / 2, text.grad[:2, :6], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ranks[1]["text"] / 2, text.grad[2:], rtol=1e-4, atol=1e-6)
