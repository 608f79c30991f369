"""The arithmetic of a quantized KV cache (docs/kv-cache.md), in plain PyTorch: vllm-ascend's static int8 ``C8``
and FlatQuant's asymmetric 4-bit ``KV4`` (a research mode: no serving engine runs it).

vllm-ascend runs both directions as ordinary tensor arithmetic in the model dtype, not as an NPU op, so there is
no backend to dispatch to: these functions are the reference and the only implementation.

- write: ``inv = 1 / scale`` (once, in the model dtype), then ``clamp(round(x * inv + offset), -128, 127)`` as int8,
  every step in ``x``'s dtype, ``round`` to the nearest even integer on a tie;
- read: ``int8 * scale`` in the model dtype, **without** the offset (so only an offset of 0 reads back what was
  written).

``scale`` and ``offset`` broadcast against ``x`` (the caller shapes a per-channel vector to its layout).

KV4 (FlatQuant's, per token and per head over ``head_dim``, the last dim of ``x``), in float32:

- ``xmax = max(rowmax, 0) * c_max``, ``xmin = min(rowmin, 0) * c_min`` (``xmin = xmax = 0`` becomes ``-1, +1``);
- ``scale = fp16((xmax - xmin) / 15)`` (the deployed kernel keeps scale and zero in fp16), ``zero = rint(-xmin /
  scale)``;
- ``q = clamp(rint(x / scale) + zero, 0, 15)``, read back as ``scale * (q - zero)``; ``rint`` rounds half to even.
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


KV4_LEVELS = 15  # 4-bit codes 0..15
KV4_SCALE_FLOOR = 2.0 ** -24  # fp16's smallest subnormal


def _kv4_scale_zero(x: torch.Tensor, clip_max, clip_min, rnd) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16-rounded ``scale`` and ``zero`` per row of float32 ``x`` (``[..., 1]`` each); ``rnd`` rounds to integers
    (``torch.round``, or a straight-through one)."""
    xmax = x.amax(-1, keepdim=True).clamp_min(0) * clip_max
    xmin = x.amin(-1, keepdim=True).clamp_max(0) * clip_min
    flat = (xmax == 0) & (xmin == 0)  # an all-zero row: the official quantizer's [-1, 1]
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    scale = ((xmax - xmin) / KV4_LEVELS).clamp_min(KV4_SCALE_FLOOR)  # fp16 would round a tinier one to 0
    scale = scale + (scale.to(torch.float16).float() - scale).detach()  # fp16, straight-through
    return scale, rnd(-xmin / scale)


def _ratio(c, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(c, dtype=torch.float32, device=like.device)


def kv4_quantize(x: torch.Tensor, clip_max=1.0, clip_min=1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes uint8 in 0..15, scale fp16, zero fp16)`` of ``x`` per row of its last dim (one token of one head),
    the clip ratios ``clip_max``, ``clip_min`` scaling the row's max and min (float or 0-dim tensors)."""
    if not x.is_floating_point():
        raise ValueError(f"x: expected a float tensor, got {x.dtype}")
    xf = x.float()
    scale, zero = _kv4_scale_zero(xf, _ratio(clip_max, xf), _ratio(clip_min, xf), torch.round)
    q = (torch.round(xf / scale) + zero).clamp(0, KV4_LEVELS)
    return q.to(torch.uint8), scale.to(torch.float16), zero.to(torch.float16)


def kv4_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale * (q - zero)`` (float32, then ``dtype``) for KV4 codes ``q`` and their fp16 ``scale``, ``zero``."""
    if q.dtype != torch.uint8:
        raise ValueError(f"q: expected uint8 codes 0..15, got {q.dtype}")
    return (scale.float() * (q.float() - zero.float())).to(dtype)


def kv4_roundtrip(x: torch.Tensor, clip_max=1.0, clip_min=1.0) -> torch.Tensor:
    """``kv4_dequantize(kv4_quantize(x))`` in ``x``'s dtype, differentiable: straight-through rounding, and the
    gradient reaches ``clip_max``/``clip_min`` (tensors) through the scale, as FlatQuant's learned clipping trains."""
    if not x.is_floating_point():
        raise ValueError(f"x: expected a float tensor, got {x.dtype}")
    xf = x.float()

    def rnd(t):
        return t + (torch.round(t) - t).detach()

    scale, zero = _kv4_scale_zero(xf, _ratio(clip_max, xf) if not isinstance(clip_max, torch.Tensor) else clip_max,
                                  _ratio(clip_min, xf) if not isinstance(clip_min, torch.Tensor) else clip_min, rnd)
    q = (rnd(xf / scale) + zero).clamp(0, KV4_LEVELS)
    return (scale * (q - zero)).to(x.dtype)


__all__ = ["INT8_MAX", "INT8_MIN", "KV4_LEVELS", "kv4_dequantize", "kv4_quantize", "kv4_roundtrip",
           "kv_cache_dequantize", "kv_cache_inverse", "kv_cache_quantize"]
