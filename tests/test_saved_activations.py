"""The benchmark's count of activations kept for backward: exact bytes, each storage once, the
model's own tensors left out, and only a checkpoint's inputs inside a checkpointed region."""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from glipv2_d2.benchmarking.saved_activations import SavedActivations


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_each_saved_storage_counts_once_and_weights_not_at_all():
    model, x = mlp(), torch.randn(8, 4)
    with SavedActivations(model) as saved:
        model(x)
    # The first Linear keeps x (8x4 float32 = 128 bytes) for its weight's gradient; the ReLU output
    # (8x3 = 96 bytes) is kept by the ReLU and by the second Linear, one storage; weights are left out.
    assert saved.mib * 2**20 == 128 + 96


def test_a_checkpointed_region_keeps_only_its_input():
    model, x = mlp(), torch.randn(8, 4)
    with SavedActivations(model) as saved:
        output = checkpoint(model, x, use_reentrant=False)
    assert saved.mib * 2**20 == 128
    output.sum().backward()
    assert model[0].weight.grad is not None


def test_nothing_is_counted_outside_the_block():
    model, x = mlp(), torch.randn(8, 4)
    meter = SavedActivations(model)
    with meter:
        pass
    model(x)
    assert meter.mib == 0
