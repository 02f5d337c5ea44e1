"""Op-level profiles of GLIPv2's hot pieces for tools/benchmark.py ``--profile-ops``.

The fusion tower and head take most of the inference time, so the profile looks inside ONE fusion
layer (bidirectional attention + BERT text layer + DyConv), the prediction head and the
post-processing. Each piece is called on the inputs it received in a real forward of the
benchmark's batch (captured with hooks), once to warm up and once under torch.profiler, and its ops
are ranked by self time: CPU time on the CPU, the device time of the kernels each op launched on
CUDA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from .timing import synchronize

TOP_OPS = 12


def capture_calls(modules: list[nn.Module], run: Callable[[], object]) -> tuple[object, list[tuple[tuple, dict]]]:
    """``run()``'s result and, per module, the positional and keyword arguments of its first call."""
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in modules]
    hooks = [module.register_forward_pre_hook(lambda _, args, kwargs, seen=seen: seen.append((args, kwargs)),
                                              with_kwargs=True)
             for module, seen in zip(modules, calls)]
    try:
        result = run()
    finally:
        for hook in hooks:
            hook.remove()
    missing = [type(module).__name__ for module, seen in zip(modules, calls) if not seen]
    if missing:
        raise RuntimeError(f"the forward pass did not call {missing}")
    return result, [seen[0] for seen in calls]



def top_ops(fn: Callable[[], object], device: str, top: int = TOP_OPS) -> list[dict]:
    """Warm-up call, then one profiled call: the ``top`` ops by self time (op, calls, self_ms, share %
    of the piece's total self time)."""
    fn()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    if device == "cuda":  # ops (CPU-side events) with the time of the kernels they launched themselves
        ops = [(e.key, e.count, e.self_device_time_total) for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CPU]
    else:
        ops = [(e.key, e.count, e.self_cpu_time_total) for e in prof.key_averages()]
    ops = sorted((op for op in ops if op[2] > 0), key=lambda op: op[2], reverse=True)
    total = sum(us for _, _, us in ops)
    return [{"op": name, "calls": count, "self_ms": us / 1000, "share": 100 * us / total}
            for name, count, us in ops[:top]]


def profile_pieces(model: nn.Module, inputs: list[dict], device: str) -> dict[str, list[dict]]:
    """fp32 op profiles of fusion layer 0, the prediction head and the post-processing on ``inputs``.

    The forward runs GLIPv2.inference's steps one by one (as ``profile_stages`` does) so that the
    post-processing's inputs are at hand; hooks catch the fusion layer's and the head's inputs.
    """
    prompts = [x["prompt"] for x in inputs]
    layer = model.fusion.layers[0]
    with torch.inference_mode():
        images = model.preprocess_image(inputs)
        text = model.encode_text(prompts)
        outputs, [(layer_args, layer_kwargs), (head_args, head_kwargs)] = capture_calls(
            [layer, model.head], lambda: model.run_network(images, text))
        pieces = {
            "fusion layer 0": lambda: layer(*layer_args, **layer_kwargs),
            "prediction head": lambda: model.head(*head_args, **head_kwargs),
            "post-processing": lambda: model.postprocess(images, inputs, prompts, text, outputs),
        }
        return {name: top_ops(fn, device) for name, fn in pieces.items()}


def markdown(piece: str, rows: list[dict], device: str) -> str:
    """One piece's table, for the README's "where the time goes"."""
    clock = "self CUDA" if device == "cuda" else "self CPU"
    lines = [f"| {piece}: op | calls | {clock} ms | share |", "|---|---|---|---|"]
    lines += [f"| `{r['op']}` | {r['calls']} | {r['self_ms']:.2f} | {r['share']:.1f}% |" for r in rows]
    return "\n".join(lines)
