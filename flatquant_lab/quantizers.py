"""Symmetric int4 quantizers shared by export, calibration and the numerics checks.

Activation side (per token, after the transform), as ``npu_kronecker_quant`` does it:
``s = max|b| * c / 7``, ``q = sat[-8, 7](rint(b / s))``, ``b_hat = q * s``.
Weight side (per output channel): ``s = max|w| * clip / 7``, ``q = sat[-8, 7](rint(w / s))``.
The fake-quant forms use a straight-through estimator on the rounding only, so gradients reach the
clip factors through ``s`` (LSQ-style), as in FlatQuant.
"""
from __future__ import annotations

import torch

QMAX = 7.0
QMIN = -8.0


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``rint(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def weight_scale(weight: torch.Tensor, clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """Per-output-channel symmetric scale ``[O, 1]``: ``max|w_row| * clip / 7`` (clip 1 by default)."""
    amax = weight.abs().amax(dim=-1, keepdim=True)
    if clip is not None:
        clip = torch.as_tensor(clip, dtype=amax.dtype, device=amax.device)
        amax = amax * (clip.reshape(-1, 1) if clip.dim() else clip)
    return amax / QMAX


def quantize_weight(weight: torch.Tensor, clip=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest int4 weights: ``(q int8 [O, K], scale float32 [O, 1])``.

    The scale is rounded to float32 first and ``q`` computed from that stored scale, so that
    ``q * scale`` is exactly what the NPU multiplies. All-zero rows get scale 0 and q 0.
    """
    w = weight.double()
    scale = weight_scale(w, clip).float()
    s = scale.double()
    q = torch.where(s > 0, torch.round(w / torch.where(s > 0, s, 1.0)), torch.zeros_like(w))
    return q.clamp_(QMIN, QMAX).to(torch.int8), scale


def fake_quant_weight(weight: torch.Tensor, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable per-channel int4 quantize-dequantize (STE on the rounding)."""
    s = weight_scale(weight, clip).clamp_min(1e-12)
    return torch.clamp(round_ste(weight / s), QMIN, QMAX) * s


class _ActQuant(torch.autograd.Function):
    """Per-token int4 quantize-dequantize with the kernel's steps; STE for ``b``, LSQ for ``c``.

    ``t = round_fp16(b * ((7 / c) / m))``, ``q = sat(rint(t))``, ``b_hat = q * s`` with ``s = m c / 7``;
    backward: ``db = g [q == rint(t)]``, ``dc = sum g (s / c) (q - [q == rint(t)] t)``; ``m`` is held
    constant. One fused function instead of a dozen autograd nodes: this runs on every training step.
    """

    @staticmethod
    def forward(ctx, b, clip):
        m = b.abs().amax(dim=-1, keepdim=True)
        m_safe = torch.where(m > 0, m, torch.ones_like(m))
        t = (b * ((QMAX / clip) / m_safe)).to(torch.float16).to(b.dtype)
        q = torch.round(t).clamp_(QMIN, QMAX)
        s = m * clip / QMAX
        ctx.save_for_backward(t, m, clip)
        return q * s

    @staticmethod
    def backward(ctx, g):
        t, m, clip = ctx.saved_tensors
        r = torch.round(t)
        q = r.clamp(QMIN, QMAX)
        inside = (q == r).to(g.dtype)
        grad_b = g * inside if ctx.needs_input_grad[0] else None
        grad_c = None
        if ctx.needs_input_grad[1]:
            gc = g * (m * (1.0 / QMAX)) * (q - inside * t)
            grad_c = gc.sum().reshape(clip.shape) if clip.numel() == 1 else gc.sum_to_size(clip.shape)
        return grad_b, grad_c


def fake_quant_act(b: torch.Tensor, clip_ratio: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Differentiable per-token int4 quantize-dequantize of transformed activations ``b[..., K]``.

    ``q = sat(rint(round_fp16(b * ((7 / c) / m))))``, ``b_hat = q * m * c / 7``: the kernel's own
    steps (the fp16 rounding of the product included, which decides near-ties), with straight-through
    rounding. An all-zero token quantizes to zeros, never NaN.
    """
    clip = torch.as_tensor(clip_ratio, dtype=b.dtype, device=b.device)
    return _ActQuant.apply(b, clip)


class _RoundTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dtype):
        return x.to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g, None


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round ``x`` to ``dtype`` and back in the forward pass; identity gradient (straight-through)."""
    return _RoundTo.apply(x, dtype)


def quant_act_reference(b: torch.Tensor, clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int4 values and scales with the kernel's arithmetic, but on a float ``b`` of any dtype.

    ``mult = (7 / c) / m`` in fp32, ``q = sat(rint(round_fp16(b * mult)))``, ``scale = m * c / 7``.
    Used by the dequantized reference in ``numerics``: same scales and values as the op when ``b``
    is the op's own fp16 intermediate.
    """
    m = b.abs().amax(dim=-1).float()
    c = torch.tensor(clip_ratio, dtype=torch.float32)
    seven = torch.tensor(QMAX)
    scale = (m * c) / seven
    mult = torch.where(m == 0, seven, (seven / c) / torch.where(m == 0, torch.ones_like(m), m))
    q = torch.round((b.float() * mult[..., None]).half().float()).clamp_(QMIN, QMAX)
    return q, scale
