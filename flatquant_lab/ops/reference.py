"""Pure-PyTorch emulation of the Ascend W4A4 ops, step by step as docs/ascend-ops.md states.

Runs on any device. Integer products are formed as fp32 GEMMs over integer-valued operands, k cut
into slices where every partial sum is an integer below 2**24 (for int4 values one slice up to
k = 262144), so fp32 holds it exactly whatever the summation order; the slices add up in int32,
the device's accumulator. The fp32
matmuls run in full IEEE precision (:func:`ieee_fp32_matmul`): TF32 (CUDA) or bf16 passes (oneDNN)
would change the transformed activations, so the emulation would stop being bit-exact.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import types
from typing import NamedTuple

import torch

from .. import mxfp4
from ..mxfp4 import DEFAULT_OPTIONS, FLOAT4_E2M1_X2, MxOptions
from ..packing import pack_int4_codes, pack_int4, unpack_int4
from ..quantizers import dynamic_codes, kron_act_codes, quant_dynamic_reference

FP16_MAX = 65504.0
MAX_K_EXACT = 262144  # |acc| <= 64 * k stays below 2**24 up to here


@contextlib.contextmanager
def ieee_fp32_matmul():
    """fp32 matmuls in IEEE precision inside; the caller's precision settings are restored on exit."""
    backends = [b for b in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None))
                if b is not None and hasattr(b, "fp32_precision")]
    saved_global = torch.get_float32_matmul_precision()
    saved = [b.fp32_precision for b in backends]
    try:
        torch.set_float32_matmul_precision("highest")
        for b in backends:
            b.fp32_precision = "ieee"
        yield
    finally:
        torch.set_float32_matmul_precision(saved_global)
        for b, v in zip(backends, saved):
            b.fp32_precision = v


def _ieee(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with ieee_fp32_matmul():
            return fn(*args, **kwargs)
    return wrapper


class Fp16OverflowError(ValueError):
    """The transformed activation ``p1 @ x @ p2`` does not fit fp16, where the kernel keeps it."""


def unpack_int4_int8(packed: torch.Tensor) -> torch.Tensor:
    """Unpack NPU-layout int32 words ``[..., k/8]`` to int8 values ``[..., k]`` (same as ``unpack_int4``).

    Fast path: on a little-endian host the words' bytes are, in order, value pairs (low nibble
    first, docs/ascend-ops.md, 'int4 packing'), so an int8 view and two arithmetic shifts unpack them without widening.
    """
    if sys.byteorder != "little" or packed.dim() == 0 or packed.shape[-1] == 0:
        return unpack_int4(packed)
    b = packed.contiguous().view(torch.int8)  # [..., k/2]
    out = torch.empty(*b.shape, 2, dtype=torch.int8, device=b.device)
    # Low nibble to the top, then an arithmetic shift back sign-extends it; the high nibble needs
    # only the arithmetic shift. Written in place: no stack/cat pass over the output.
    torch.bitwise_right_shift(torch.bitwise_left_shift(b, 4), 4, out=out[..., 0])
    torch.bitwise_right_shift(b, 4, out=out[..., 1])
    return out.flatten(-2)


def _pack_int4_checked(q: torch.Tensor) -> torch.Tensor:
    """``pack_int4`` for int8 values already saturated to [-8, 7] (the kernel's own output): no re-check."""
    if sys.byteorder != "little" or q.dim() == 0 or q.shape[-1] == 0:
        return pack_int4(q)
    return pack_int4_codes(q)


def _int_matmul(a: torch.Tensor, w: torch.Tensor, bits: int) -> torch.Tensor:
    """``acc[i, j] = sum_k a[i, k] w[j, k]`` for ``bits``-bit integers held as int8 ``a[m, k]``, ``w[n, k]``, exactly, as int32.

    fp32 GEMMs over slices of k short enough that every partial sum (|a w| <= 4**(bits-1) per term) is an integer below 2**24
    (exact in fp32 whatever the summation order), summed in int32 like the device's accumulator.
    Not ``torch._int_mm``: on CPUs without VNNI it is ~25x slower than the fp32 GEMM
    (docs/ascend-ops.md, 'Emulating the integer GEMM').
    """
    k = a.shape[-1]
    step = max(1, min(k, 2**24 // 4 ** (bits - 1)))  # int4: 262144, int8: 1024
    acc = None
    for s in range(0, max(k, 1), step):
        part = (a[:, s:s + step].float() @ w[:, s:s + step].float().t()).to(torch.int32)
        acc = part if acc is None else acc.add_(part)
    return acc


class KroneckerTrace(NamedTuple):
    """``npu_kronecker_quant``'s intermediates for tokens ``[T, n1, n2]``, flattened to ``[T, K]``.

    ``b``: fp16 transformed activations; ``t``: ``round_fp16(b * mult)`` as float32, the value the
    integer rounding sees; ``q``: int8 codes in [-8, 7]; ``scale``: float32 ``[T]``; ``mult``: float32 ``[T]``.
    """

    b: torch.Tensor
    t: torch.Tensor
    q: torch.Tensor
    scale: torch.Tensor
    mult: torch.Tensor


@_ieee
def kronecker_quant_trace(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor,
                          clip_ratio: float = 1.0) -> KroneckerTrace:
    """Every step of ``npu_kronecker_quant`` (docs/ascend-ops.md) on tokens ``x[T, n1, n2]``, kept.

    a = round_t(x @ p2) with fp32 accumulation;  b = round_fp16(p1 @ a) with fp32 accumulation;
    m = max|b|;  quant_scale = (m * c) / 7;  mult = (7 / c) / m  (7 when m == 0);
    t = round_fp16(b * mult);  q = sat[-8, 7](rint(t)).
    """
    t_dtype = x.dtype
    n2 = x.shape[-1]
    # a = x @ p2 (fp32 accumulation), rounded to the input dtype; one small GEMM per token, which
    # on CPU beats the tall-skinny [T * n1, n2] @ [n2, n2] GEMM
    a = torch.bmm(x.float(), p2.float().expand(x.shape[0], n2, n2)).to(t_dtype)
    # b = p1 @ a (fp32 accumulation), rounded to fp16 even for bf16 input
    b = torch.matmul(p1.float(), a.float()).to(torch.float16)
    # max|b| per token in one pass: inf or nan exactly when the token has one
    overflow = ~torch.isfinite(torch.linalg.vector_norm(b, ord=float("inf"), dim=(-2, -1)))
    if overflow.any():
        # fp16 saturates to inf past 65504 (or x itself was not finite): the token's scale becomes
        # inf and its values garbage on the device, so refuse rather than emulate that.
        bad = int(overflow.sum())
        raise Fp16OverflowError(
            f"x: the transformed activation p1 @ x @ p2 is not finite in fp16 (|b| > {FP16_MAX:g} "
            f"or a non-finite input) in {bad} of {b.shape[0]} token(s); the kernel keeps it in fp16 "
            "and would produce inf scales. Scale the input or the transform down."
        )
    b = b.reshape(b.shape[0], -1)
    # steps 3-6 (the scale, the fp32 multiplier, the fp16 product, rint, saturation): the shared quantizer
    clip = torch.tensor(float(clip_ratio), dtype=torch.float32, device=b.device)
    q, scale, t, _, mult = kron_act_codes(b.float(), clip)
    return KroneckerTrace(b, t, q.to(torch.int8), scale.squeeze(-1), mult.squeeze(-1))


class DynamicTrace(NamedTuple):
    """``npu_dynamic_quant``'s intermediates (int8) for rows ``x[T, K]``.

    ``t``: ``fl32(x * mult)`` float32 ``[T, K]``, the value the integer rounding sees; ``q``: int8 codes;
    ``scale``: float32 ``[T]``; ``mult``: float32 ``[T]``.
    """

    t: torch.Tensor
    q: torch.Tensor
    scale: torch.Tensor
    mult: torch.Tensor


def dynamic_quant_trace(x: torch.Tensor) -> DynamicTrace:
    """Every step of int8 ``npu_dynamic_quant`` (docs/ascend-ops.md, 'npu_dynamic_quant') on rows ``x[T, K]``, kept.

    mult = 127 / max|x|  (127 when the row is 0);  t = fl32(x * mult);  q = sat[-128, 127](rint(t));  scale = 1 / mult.
    """
    q, scale, t, mult = dynamic_codes(x, bits=8)
    return DynamicTrace(t, q.to(torch.int8), scale, mult)


def kronecker_quant(
    x: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    clip_ratio: float = 1.0,
    dst_dtype: torch.dtype = torch.int32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Emulate ``npu_kronecker_quant``: per token ``b = p1 @ x @ p2`` then int4 quantization.

    The steps are :func:`kronecker_quant_trace`'s; the codes are packed 8 per int32 along n2.
    Returns ``(out int32 [T, n1, n2/8], quant_scale float32 [T])``.
    """
    if dst_dtype == FLOAT4_E2M1_X2:
        return kronecker_quant_mx(x, p1, p2, clip_ratio)
    if dst_dtype != torch.int32:
        raise ValueError(f"dst_dtype: expected torch.int32 (int4 packed) or {FLOAT4_E2M1_X2} (FP4), got {dst_dtype}")
    tr = kronecker_quant_trace(x, p1, p2, clip_ratio)
    return _pack_int4_checked(tr.q.reshape(x.shape)), tr.scale


@_ieee
def quant_matmul(
    x1: torch.Tensor,
    x2: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None = None,
    pertoken_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    output_dtype: torch.dtype = torch.float16,
    x1_dtype=None,
    x2_dtype=None,
    pertoken_scale_dtype=None,
    scale_dtype=None,
    group_sizes=None,
) -> torch.Tensor:
    """Emulate ``npu_quant_matmul`` on int4-packed int32 operands (int8 operands: :func:`_quant_matmul_int8`;
    ``x1_dtype`` FP4: :func:`quant_matmul_mx`).

    ``acc[i, j] = sum_k a[i, k] w[j, k]`` (exact);  ``y = acc * scale[j] * pertoken[i]`` in fp32;
    ``y += bias`` in fp32;  cast to ``output_dtype`` (round half to even).
    """
    if x1_dtype == FLOAT4_E2M1_X2:
        return quant_matmul_mx(x1, x2, scale, pertoken_scale, bias, output_dtype)
    if x1.dtype == torch.int8:
        return _quant_matmul_int8(x1, x2, scale, pertoken_scale, bias, output_dtype)
    k = x1.shape[-1] * 8
    if k > MAX_K_EXACT:
        raise ValueError(f"x1: k = {k} exceeds {MAX_K_EXACT}, where an fp32 accumulator stays exact")
    a = unpack_int4_int8(x1)  # [m, k]
    w = unpack_int4_int8(x2.transpose(0, 1))  # x2 is [k/8, n], the transpose of [n, k/8]
    acc = _int_matmul(a, w, bits=4)  # exact int32
    return _epilogue(acc, scale, pertoken_scale, bias, output_dtype)


def _quant_matmul_int8(x1, x2, scale, pertoken_scale, bias, output_dtype) -> torch.Tensor:
    """``npu_quant_matmul``'s int8 pertoken path (W8A8_DYNAMIC, docs/ascend-ops.md, 'npu_quant_matmul').

    ``x1`` int8 ``[m, k]``, ``x2`` int8 ``[k, n]`` (the weight ``[n, k]`` transposed);
    ``acc[i, j] = sum_k a[i, k] w[j, k]`` exact in int32, then the same epilogue as the int4 path.
    """
    return _epilogue(_int_matmul(x1, x2.transpose(0, 1), bits=8), scale, pertoken_scale, bias, output_dtype)


def _epilogue(acc, scale, pertoken_scale, bias, output_dtype) -> torch.Tensor:
    """``y = fp32(acc) * fp32(scale[j])``, ``* pertoken[i]`` in fp32, ``+ fp32(bias)``, one rounding to ``output_dtype``.

    ``fp32(acc)`` is one rounding, as the device's int32 -> fp32 conversion (exact for int4 products).
    """
    y = acc.to(torch.float32) * scale.float()
    if pertoken_scale is not None:
        y.mul_(pertoken_scale.float()[:, None])
    if bias is not None:
        y.add_(bias.float())
    return y.to(output_dtype)


def convert_weight_to_int4pack(weight: torch.Tensor, inner_k_tiles: int = 1) -> torch.Tensor:
    """Emulate ``npu_convert_weight_to_int4pack``: int32 values ``[n, k]`` -> packed ``[n, k/8]``."""
    return pack_int4(weight)


def dynamic_quant(
    x: torch.Tensor,
    smooth_scales: torch.Tensor | None = None,
    dst_type: torch.dtype = torch.int8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Emulate ``npu_dynamic_quant``: per row ``mult = qmax / max|x|``, ``y = rint(x * mult)``.

    ``dst_type=torch.int8`` gives int8 values; ``torch.quint4x2`` gives int4 values packed 8 per
    int32 along the last dim. Returns ``(y, scale)`` with ``scale = 1 / mult`` (float32, one per row).
    """
    if dst_type not in (torch.int8, torch.quint4x2):
        raise ValueError(f"dst_type: expected torch.int8 or torch.quint4x2, got {dst_type}")
    xf = x.float() * smooth_scales.float() if smooth_scales is not None else x
    q, scale = quant_dynamic_reference(xf, bits=8 if dst_type == torch.int8 else 4)
    if dst_type == torch.quint4x2:
        return _pack_int4_checked(q.to(torch.int8)), scale
    return q.to(torch.int8), scale


# ---------------------------------------------------------------------------------------------- MXFP4
class MxKroneckerTrace(NamedTuple):
    """The FP4 ``npu_kronecker_quant``'s intermediates for tokens ``[T, L, R]``, flattened to ``[T, K]``.

    ``b``: bfloat16 transformed activations; ``ratios``: the E2M1 values the codes stand for (float);
    ``codes``: unpacked uint8 E2M1 codes; ``scales``: uint8 E8M0 codes ``[T, K/32]``.
    """

    b: torch.Tensor
    ratios: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor


@_ieee
def kronecker_quant_mx_trace(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, clip_ratio: float = 1.0,
                             options: MxOptions = DEFAULT_OPTIONS) -> MxKroneckerTrace:
    """Every step of the FP4 ``npu_kronecker_quant`` (docs/mxfp4.md) on tokens ``x[T, L, R]``, kept.

    ``b = bf16(p1 @ x @ p2)`` with fp32 products (``options.round_intermediate``: ``x @ p2`` rounded to the
    input dtype first, as the int4 kernel does); then per group of 32 along the flattened token the shared
    exponent and the E2M1 elements of ``options.scale_rule``.
    """
    a = torch.bmm(x.float(), p2.float().expand(x.shape[0], *p2.shape))
    if options.round_intermediate:
        a = a.to(x.dtype).float()
    b = torch.matmul(p1.float(), a).to(torch.bfloat16).reshape(x.shape[0], -1)
    if not bool(torch.isfinite(b).all()):
        raise ValueError("x: the transformed activation p1 @ x @ p2 is not finite in bfloat16")
    mq = mxfp4.quantize_groups(b, options, clip=float(clip_ratio))
    return MxKroneckerTrace(b, mq.ratios, mq.codes, mq.scales)


def kronecker_quant_mx(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, clip_ratio: float = 1.0,
                       options: MxOptions = DEFAULT_OPTIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP4 ``npu_kronecker_quant``: ``(codes uint8 [T, L, R/2], scales uint8 E8M0 [T, K/32])``.

    FP4 is modelled as uint8 bytes (two codes each, low nibble first); E8M0 as uint8 codes.
    """
    tr = kronecker_quant_mx_trace(x, p1, p2, clip_ratio, options)
    t, n1, n2 = x.shape
    return mxfp4.pack_fp4(tr.codes).reshape(t, n1, n2 // 2), tr.scales


def quant_matmul_mx(x1: torch.Tensor, x2: torch.Tensor, scale: torch.Tensor, pertoken_scale: torch.Tensor,
                    bias: torch.Tensor | None, output_dtype: torch.dtype) -> torch.Tensor:
    """``npu_quant_matmul`` on MXFP4 operands (assumed, docs/mxfp4.md): ``x1`` uint8 ``[m, k/2]``, ``x2`` uint8
    ``[k/2, n]`` (the transpose of the weight ``[n, k/2]``), ``scale`` E8M0 ``[n, k/32]``, ``pertoken_scale``
    E8M0 ``[m, k/32]``.

    ``y = sum_g (a_g 2^(s_a - 127)) . (w_g 2^(s_w - 127))`` formed in float64 (every E2M1 product and power-of-two
    scaling is exact there), rounded once to fp32; ``bias`` added in fp32; one rounding to ``output_dtype``.
    """
    x1, x2, scale, pertoken_scale = (t if t.dtype == torch.uint8 else t.view(torch.uint8)  # torch's 1-byte FP4 / E8M0
                                     for t in (x1, x2, scale, pertoken_scale))
    a = mxfp4.dequantize(x1, pertoken_scale)  # [m, k] float64
    w = mxfp4.dequantize(x2.transpose(0, 1), scale)  # [n, k]
    y = (a @ w.transpose(0, 1)).to(torch.float32)
    if bias is not None:
        y = y + bias.float()
    return y.to(output_dtype)


def mx_backend(options: MxOptions) -> types.SimpleNamespace:
    """A backend (the four ops) computing the FP4 path under ``options`` and everything else as this module
    does: register it to run or compare another reading of the assumed points (docs/mxfp4.md)."""
    if not isinstance(options, MxOptions):
        raise ValueError(f"options: expected an MxOptions, got {type(options).__name__}")

    def kq(x, p1, p2, clip_ratio=1.0, dst_dtype=torch.int32):
        if dst_dtype == FLOAT4_E2M1_X2:
            return kronecker_quant_mx(x, p1, p2, clip_ratio, options)
        return kronecker_quant(x, p1, p2, clip_ratio, dst_dtype)

    return types.SimpleNamespace(kronecker_quant=kq, quant_matmul=quant_matmul,
                                 convert_weight_to_int4pack=convert_weight_to_int4pack, dynamic_quant=dynamic_quant,
                                 options=options)
