"""The arithmetic of a static int8 KV cache (vllm-ascend's ``C8``; docs/kv-cache.md), in plain PyTorch.

vllm-ascend runs both directions as ordinary tensor arithmetic in the model dtype, not as an NPU op, so there is
no backend to dispatch to: these functions are the reference and the only implementation.

- write: ``inv = 1 / scale`` (once, in the model dtype), then ``clamp(round(x * inv + offset), -128, 127)`` as int8,
  every step in ``x``'s dtype, ``round`` to the nearest even integer on a tie;
- read: ``int8 * scale`` in the model dtype, **without** the offset (so only an offset of 0 reads back what was
  written).

``scale`` and ``offset`` broadcast against ``x`` (the caller shapes a per-channel vector to its layout).
"""
from __future__ import annotations

import torch

INT8_MIN, INT8_MAX = -128, 127


def kv_cache_inverse(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``1 / scale`` computed in ``dtype`` (the reciprocal vllm-ascend takes once, at load)."""
    return torch.reciprocal(scale.to(dtype))


def kv_cache_quantize(x: torch.Tensor, inv_scale: torch.Tensor, offset: torch.Tensor | None = None,
                      qmin: int = INT8_MIN, qmax: int = INT8_MAX) -> torch.Tensor:
    """Int8 codes of ``x`` as the cache write stores them: ``x * inv_scale`` rounded to ``x.dtype``, plus
    ``offset`` (rounded again), rounded half to even, clamped to ``[qmin, qmax]``."""
    if not x.is_floating_point():
        raise ValueError(f"x: expected a float tensor, got {x.dtype}")
    y = x * inv_scale.to(x.dtype)
    if offset is not None:
        y = y + offset.to(x.dtype)
    return torch.round(y).clamp(qmin, qmax).to(torch.int8)


def kv_cache_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the cache read computes from codes ``q``: ``q * scale`` in ``dtype``; no offset is subtracted."""
    if q.dtype != torch.int8:
        raise ValueError(f"q: expected int8 codes, got {q.dtype}")
    return q.to(dtype) * scale.to(dtype)


__all__ = ["INT8_MAX", "INT8_MIN", "kv_cache_dequantize", "kv_cache_inverse", "kv_cache_quantize"]
