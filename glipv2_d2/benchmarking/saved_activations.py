"""The activation memory a training step keeps for its backward pass, counted exactly.

Gradient checkpointing trades this memory for recomputation. A CUDA peak shows it among weights,
gradients and optimizer state, and on the CPU resident memory is only sampled and moves with the
allocator's caching by hundreds of MiB; autograd's saved-tensor hooks see every tensor the forward
keeps, so their sum is the same on every device and every run.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SavedActivations"]

MIB = 2**20


class SavedActivations:
    """A context manager over a forward whose ``mib`` is, after it, the size of the storages autograd
    saved for backward inside it, each counted once (views and tensors saved by several ops share
    one), ``model``'s parameters and buffers left out (they are kept anyway).

    Wrap the forward only: a reentrant checkpoint's recomputation in backward would be counted too.
    A region under non-reentrant checkpointing saves through its own hooks, which take precedence,
    so only what it keeps (its inputs) is counted, as intended. The hook is a Python call per saved
    tensor, so a measured step is slower than others.
    """

    def __init__(self, model: nn.Module):
        self._own = {tensor.untyped_storage().data_ptr() for tensor in (*model.parameters(), *model.buffers())}
        self._sizes: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: Tensor) -> Tensor:
        # A saved tensor stays alive until backward, so no other saved storage can reuse its address.
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address not in self._own:
            self._sizes[address] = max(self._sizes.get(address, 0), storage.nbytes())
        return tensor

    def __enter__(self) -> SavedActivations:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._hooks.__exit__(*exc_info)

    @property
    def mib(self) -> float:
        return sum(self._sizes.values()) / MIB
