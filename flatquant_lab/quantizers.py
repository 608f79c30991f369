"""THE symmetric integer quantizers: per token (activations) and per output channel (weights).

Every other module calls these; none writes its own copy of the arithmetic.

Per token, as ``npu_kronecker_quant`` does it on transformed activations ``b`` (docs/ascend-ops.md,
'npu_kronecker_quant'):
``m = max|b|``, ``s = m c / 7``, ``mult = (7 / c) / m``, ``q = sat[-8, 7](rint(round_fp16(b * mult)))``.
Per token, as ``npu_dynamic_quant`` does it (docs/ascend-ops.md, 'npu_dynamic_quant'):
``mult = qmax / max|x|``, ``q = sat(rint(x * mult))``, ``s = 1 / mult``.
Per output channel (weights): ``s = max|w| clip / qmax``, ``q = sat(rint(w / s))``.
The training forms (``fake_quant_*``) compute the same values with straight-through rounding, so
gradients reach the clip factors through ``s`` (LSQ-style), as in FlatQuant.

MXFP4 (:func:`fake_quant_mx`, docs/mxfp4.md): per group of 32 along the last dim, the arithmetic of
:mod:`flatquant_lab.mxfp4` (bfloat16 values, shared exponent ``floor(log2 amax) - 2``, E2M1 half to even,
saturation under the default ``"kernel"`` rule); the gradient is straight-through (identity). Its scales are
powers of two picked by a floor, so no gradient reaches a clip ratio through them.
"""
from __future__ import annotations

import torch

from .devices import exact_dtype
from .mxfp4 import DEFAULT_OPTIONS as MX_DEFAULT_OPTIONS, MxOptions, quantize_dequantize as mx_quantize_dequantize

QMAX = 7.0  # int4
QMIN = -8.0
INT8_QMAX = 127.0
INT8_QMIN = -128.0


def qrange(bits: int) -> tuple[float, float]:
    """``(qmin, qmax)`` of a symmetric signed integer of ``bits`` (4 or 8)."""
    if bits == 4:
        return QMIN, QMAX
    if bits == 8:
        return INT8_QMIN, INT8_QMAX
    raise ValueError(f"bits: expected 4 or 8, got {bits!r}")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``rint(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


# ---------------------------------------------------------------------------------------- per token
def kron_act_codes(b: torch.Tensor, clip: torch.Tensor):
    """Steps 3-6 of the kernel on float32 ``b[..., K]``: ``(q, s, t, m, mult)``; ``s``, ``m``, ``mult`` keep a trailing 1.

    ``t = round_fp16(b * mult)`` is the value just before the integer rounding (ties are decided on it).
    """
    m = b.abs().amax(dim=-1, keepdim=True)
    seven = torch.full_like(m, QMAX)
    # mult = (7 / c) / m in fp32; 7 where m == 0 (every code is then 0)
    mult = torch.where(m == 0, seven, (seven / clip) / torch.where(m == 0, torch.ones_like(m), m))
    t = (b * mult).to(torch.float16).to(b.dtype)
    q = torch.round(t).clamp_(QMIN, QMAX)
    return q, (m * clip) / seven, t, m, mult


def quant_act_reference(b: torch.Tensor, clip_ratio: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int4 codes ``q`` (float32, integer-valued) and scales ``s`` (float32 ``[...]``) of ``b[..., K]``.

    ``npu_kronecker_quant``'s arithmetic on a float ``b`` of any dtype (the op's own fp16 intermediate
    gives the op's own codes and scales): fp32 ``mult = (7 / c) / m``, fp16 product, half-to-even.
    """
    clip = torch.as_tensor(clip_ratio, dtype=torch.float32, device=b.device)
    q, s, _, _, _ = kron_act_codes(b.float(), clip)
    return q, s.squeeze(-1)


def dynamic_codes(x: torch.Tensor, bits: int = 8):
    """``npu_dynamic_quant``'s steps on ``x[..., K]``: ``(q, scale, t, mult)``; ``t = fl32(x * mult)``, the value rint sees.

    fp32 ``mult = qmax / max|x|`` (``qmax`` when the row is 0), ``q = sat(rint(t))``, ``scale = 1 / mult``.
    """
    qmin, qmax = qrange(bits)
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    top = torch.full_like(amax, qmax)
    mult = torch.where(amax == 0, top, top / torch.where(amax == 0, torch.ones_like(amax), amax))
    t = xf * mult[..., None]
    q = torch.round(t).clamp_(qmin, qmax)
    return q, 1.0 / mult, t, mult


def quant_dynamic_reference(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row codes ``q`` (float32, integer-valued) and scales ``1 / mult`` (float32 ``[...]``) of ``x[..., K]``.

    ``npu_dynamic_quant``'s arithmetic (:func:`dynamic_codes`): fp32 ``mult = qmax / max|x|``,
    ``q = sat(rint(x * mult))`` with no intermediate rounding, ``scale = 1 / mult``.
    """
    q, scale, _, _ = dynamic_codes(x, bits)
    return q, scale


class _ActQuant(torch.autograd.Function):
    """Per-token int4 quantize-dequantize with the kernel's steps; STE for ``b``, LSQ for ``c``.

    Forward ``b_hat = q s`` (``kron_act_codes``); backward ``db = g [q == rint(t)]``,
    ``dc = sum g (s / c) (q - [q == rint(t)] t)``; ``m`` is held constant. One fused function instead
    of a dozen autograd nodes: this runs on every training step.
    """

    @staticmethod
    def forward(ctx, b, clip):
        q, s, t, m, _ = kron_act_codes(b, clip)
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

    ``b_hat = q m c / 7`` with :func:`quant_act_reference`'s codes (the fp16 rounding of the product
    included, which decides near-ties) and straight-through rounding. An all-zero token gives zeros.
    """
    clip = torch.as_tensor(clip_ratio, dtype=b.dtype, device=b.device)
    return _ActQuant.apply(b, clip)


# ---------------------------------------------------------------------------------------- per channel
def weight_scale(weight: torch.Tensor, clip: torch.Tensor | float | None = None, bits: int = 4) -> torch.Tensor:
    """Per-output-channel symmetric scale ``[O, 1]``: ``max|w_row| * clip / qmax`` (clip 1 by default)."""
    amax = weight.abs().amax(dim=-1, keepdim=True)
    if clip is not None:
        clip = torch.as_tensor(clip, dtype=amax.dtype, device=amax.device)
        amax = amax * (clip.reshape(-1, 1) if clip.dim() else clip)
    return amax / qrange(bits)[1]


def quantize_weight(weight: torch.Tensor, clip=None, bits: int = 4,
                    scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest weights: ``(q int8 [O, K], scale float32 [O, 1])``.

    The scale is rounded to ``scale_dtype`` first (float32; W8A8_DYNAMIC passes the model dtype,
    which vllm-ascend rounds its scales to on load) and ``q`` computed from that rounded scale, so
    that ``q * scale`` is exactly what the NPU multiplies. All-zero rows get scale 0 and q 0. The
    division runs in float64 on the CPU and in float32 on an accelerator (no float64 there).
    """
    qmin, qmax = qrange(bits)
    w = weight.to(exact_dtype(weight.device))
    scale = weight_scale(w, clip, bits).to(scale_dtype).float()
    s = scale.to(w.dtype)
    q = torch.where(s > 0, torch.round(w / torch.where(s > 0, s, torch.ones_like(s))), torch.zeros_like(w))
    return q.clamp_(qmin, qmax).to(torch.int8), scale


def fake_quant_weight(weight: torch.Tensor, clip: torch.Tensor | None = None, bits: int = 4) -> torch.Tensor:
    """Differentiable per-channel quantize-dequantize (STE on the rounding): ``codes * s``."""
    codes, s = fake_quant_weight_codes(weight, clip, bits)
    return codes * s


def fake_quant_weight_codes(weight: torch.Tensor, clip: torch.Tensor | None = None,
                            bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, s)`` of :func:`fake_quant_weight`: ``codes = clamp(round(W / s))`` (integer values in
    ``weight``'s dtype, STE on the rounding) and ``s [O, 1]``, both differentiable."""
    qmin, qmax = qrange(bits)
    s = weight_scale(weight, clip, bits).clamp_min(1e-12)
    return torch.clamp(round_ste(weight / s), qmin, qmax), s


# ---------------------------------------------------------------------------------------- MXFP4
class _MxQuant(torch.autograd.Function):
    """MXFP4 quantize-dequantize per 32 along the last dim; identity backward (straight-through)."""

    @staticmethod
    def forward(ctx, x, options, clip):
        return mx_quantize_dequantize(x.detach(), options, clip).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


def fake_quant_mx(x: torch.Tensor, options: MxOptions = MX_DEFAULT_OPTIONS, clip: float = 1.0) -> torch.Tensor:
    """Differentiable MXFP4 quantize-dequantize of ``x[..., K]`` (``K`` a multiple of 32), per group of 32 along
    the last dim, under ``options`` (:func:`flatquant_lab.mxfp4.quantize_dequantize`: with the ``"kernel"`` rule the
    values are first rounded to bfloat16, as the FP4 ``npu_kronecker_quant`` rounds its products). Activations: one
    token per row; weights: one output row per row. Forward: exactly the values the stored codes and E8M0 scales
    stand for (in ``x``'s float dtype; float32 holds every one); backward: the identity. ``clip`` scales each group
    maximum only when ``options.apply_clip``."""
    return _MxQuant.apply(x, options, float(clip))


# ---------------------------------------------------------------------------------------- casts
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
