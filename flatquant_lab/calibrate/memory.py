"""Calibration memory: a layer computing in float32 without a float32 copy of its weights, weights
processed in row chunks so that no weight-sized float temporaries pile up, exact-bf16 activations
saved for the backward pass as bf16, and (optionally) attention and MLP recomputed in it.

Calibration runs each layer in float32. ``layer.float()`` would hold a float32 copy of every weight
(0.75 GiB for a LLaMA-2-7B layer, twice its bf16 bytes); instead each ``nn.Linear`` upcasts its weight
per call, ``y = x @ W.float()^T + b`` (the same values: a bf16 -> float32 cast is exact), and only
the small non-linear parameters (norms) are converted. The fake-quant linears read the weight and
upcast it where they fold it.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop


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


# Float32 bytes of one chunk of weight rows: the fold and the rounding make about ten temporaries of a
# chunk (more while autograd recomputes them), so a 7B linear's [11008, 4096] becomes 22 chunks of
# ~0.16 GiB peak each instead of ~2 GiB at once; the bundled 135M model's linears fit in one.
CHUNK_BYTES = 16 * 2**20


def row_spans(rows: int, cols: int, itemsize: int = 4) -> list[tuple[int, int]]:
    """``[start, end)`` row ranges of a ``[rows, cols]`` weight, each at most ``CHUNK_BYTES`` at ``itemsize``."""
    step = max(1, CHUNK_BYTES // (cols * itemsize))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


COMPACT_MIN_NUMEL = 2**20  # smaller saved tensors are not worth the check


def _compact(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` when that loses nothing and is worth the check, else ``t`` itself."""
    if t.dtype != torch.float32 or t.numel() < COMPACT_MIN_NUMEL or isinstance(t, nn.Parameter):
        return t
    half = t.to(dtype)
    return half if torch.equal(half.to(torch.float32), t) else t


@contextmanager
def compact_saved_tensors(dtype: torch.dtype):
    """Within: autograd keeps a float32 activation whose values are all exactly ``dtype`` values (bf16 or
    fp16: what the kernels round to the activation dtype, e.g. every quantized linear's output) in
    ``dtype`` and restores it for the backward pass. Lossless; half the bytes of those tensors."""
    if dtype not in (torch.bfloat16, torch.float16):
        yield
        return

    def pack(t: torch.Tensor):
        return _compact(t, dtype)

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32) if t.dtype == dtype else t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


@contextmanager
def recompute_blocks(blocks: list[nn.Module], after=None):
    """Within: each of ``blocks`` (a decoder layer's attention and MLP) runs checkpointed, so a training
    step keeps each block's input, not its activations, and the backward pass recomputes one block at a
    time: the step's activation peak is the larger block's, not their sum, for one more forward.
    ``after(block)`` runs after each block's forward (to drop caches that would keep activations)."""
    patched = []
    for block in blocks:
        run = block.forward

        def run_then_forget(*args, _run=run, _block=block, **kwargs):
            out = _run(*args, **kwargs)
            if after is not None:  # in the forward and in its recomputation alike
                after(_block)
            return out

        def forward(*args, _run=run_then_forget, **kwargs):
            # early stop ends a block's recomputation by an exception once it has what backward needs, which
            # strands the frames of the fake-quant checkpoints nested inside: 0.33 GiB kept per training
            # call at 512 tokens of a 7B layer (measured), so recompute the whole block
            with set_checkpoint_early_stop(False):
                return checkpoint(_run, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

        block.forward = forward
        patched.append(block)
    try:
        yield
    finally:
        for block in patched:
            block.__dict__.pop("forward", None)


def saved_bytes(step, dtype: torch.dtype | None = None) -> int:
    """Bytes autograd would keep for the backward pass of ``step()`` (a forward), counted as
    ``compact_saved_tensors(dtype)`` would keep them, each tensor once; nothing is kept meanwhile, so
    the count costs a forward's transient memory, not a training step's."""
    seen: dict[int, weakref.ref] = {}
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        alive = seen.get(key)
        if isinstance(t, nn.Parameter) or (alive is not None and alive() is not None):
            return None  # a parameter, or a tensor already counted: no new bytes
        seen[key] = weakref.ref(t)
        kept = _compact(t, dtype) if dtype in (torch.bfloat16, torch.float16) else t
        total += kept.numel() * kept.element_size()
        return None  # dropped: this forward is never differentiated

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        step()
    return total


def decide_recompute(setting: bool | str, kept_bytes: Callable[[], int], min_bytes: int) -> tuple[bool, int | None]:
    """``recompute_blocks`` resolved: ``(setting, None)`` for True or False; for "auto", ``(kept > min_bytes, kept)``
    with ``kept = kept_bytes()`` the activations a step would keep (counted only then: it costs a forward)."""
    if setting != "auto":
        return setting, None
    kept = kept_bytes()
    return kept > min_bytes, kept
