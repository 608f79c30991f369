"""A decoder layer computing in float32 without a float32 copy of its linear weights.

Calibration runs each layer in float32. ``layer.float()`` would hold a float32 copy of every weight
(0.75 GiB for a LLaMA-2-7B layer, twice its bf16 bytes); instead each ``nn.Linear`` upcasts its weight
per call, ``y = x @ W.float()^T + b`` (the same values: a bf16 -> float32 cast is exact), and only
the small non-linear parameters (norms) are converted. The fake-quant linears read the weight and
upcast it where they fold it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F


def _upcast_linear(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = lin.weight if lin.weight.dtype == x.dtype else lin.weight.to(x.dtype)
    b = lin.bias if lin.bias is None or lin.bias.dtype == x.dtype else lin.bias.to(x.dtype)
    return F.linear(x, w, b)


@contextmanager
def float_compute(layer: nn.Module, dtype: torch.dtype = torch.float32):
    """Within: ``layer`` computes in ``dtype``; its linear weights stay as they are (upcast per call)."""
    patched = []
    for mod in layer.modules():
        if isinstance(mod, nn.Linear):
            if mod.weight.dtype != dtype:
                # an instance attribute shadows the class's forward; hooks and __call__ work as before
                mod.forward = lambda x, mod=mod: _upcast_linear(mod, x)
                patched.append(mod)
            continue
        for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False)):
            if t.is_floating_point() and t.dtype != dtype:
                t.data = t.data.to(dtype)
    try:
        yield layer
    finally:
        for mod in patched:
            mod.__dict__.pop("forward", None)
