"""Deliberately broken backends (test-only): each gets one thing wrong that vllm-ascend relies on.

Each is a namespace with the four ops (``kronecker_quant``, ``quant_matmul``,
``convert_weight_to_int4pack``, ``dynamic_quant``), the reference's except for the fault, so it is
plugged in the way any backend is: ``ops.register_backend(name, BROKEN[name].backend)``, or by spec,
``backend="broken_backends:scale_x1_5"`` (this folder is on ``sys.path`` under pytest).
``BROKEN[name].part`` is the part of :func:`flatquant_lab.numerics.check_linear` that must catch it.
``LEGITIMATE`` holds backends that differ from the reference only where a device may, and must pass.
``BROKEN_INT8`` and ``LEGITIMATE_INT8`` do the same for the int8 path (``dynamic_quant`` and int8
``quant_matmul``, docs/ascend-ops.md, 'W8A8_DYNAMIC layers') and :func:`flatquant_lab.numerics.check_linear_w8a8`.
"""
from __future__ import annotations

import types
from typing import NamedTuple

import torch

from flatquant_lab.ops import reference as ref
from flatquant_lab.packing import offset8_to_npu, pack_int4, unpack_int4
from flatquant_lab.quantizers import dynamic_codes, kron_act_codes


def _backend(**ops) -> types.SimpleNamespace:
    base = {name: getattr(ref, name) for name in
            ("kronecker_quant", "quant_matmul", "convert_weight_to_int4pack", "dynamic_quant")}
    return types.SimpleNamespace(**{**base, **ops})


def _codes(x, p1, p2, clip_ratio, rounding=None, b_dtype=torch.float16, acc_dtype=torch.float32):
    """``npu_kronecker_quant`` step by step with the faults as knobs: the integer ``rounding`` of
    ``t = round_fp16(b * mult)``, the dtype ``b`` is rounded to, the accumulation dtype of both GEMMs."""
    a = (x.to(acc_dtype) @ p2.to(acc_dtype)).to(x.dtype)
    b = (p1.to(acc_dtype) @ a.to(acc_dtype)).to(b_dtype).reshape(x.shape[0], -1)
    clip = torch.tensor(float(clip_ratio), dtype=torch.float32)
    q, scale, t, _, _ = kron_act_codes(b.float(), clip)
    if rounding is not None:
        q = rounding(t)
    return pack_int4(q.to(torch.int8).reshape(x.shape)), scale.squeeze(-1)


# ------------------------------------------------------------------ npu_kronecker_quant faults
def _scale_times(factor):
    def kronecker_quant(x, p1, p2, clip_ratio=1.0, dst_dtype=torch.int32):
        out, scale = ref.kronecker_quant(x, p1, p2, clip_ratio=clip_ratio, dst_dtype=dst_dtype)
        return out, scale * torch.tensor(factor, dtype=torch.float32)
    return kronecker_quant


def _half_away(x, p1, p2, clip_ratio=1.0, dst_dtype=torch.int32):
    return _codes(x, p1, p2, clip_ratio, rounding=lambda t: (torch.sign(t) * torch.floor(t.abs() + 0.5)).clamp(-8, 7))


def _saturate_7(x, p1, p2, clip_ratio=1.0, dst_dtype=torch.int32):
    return _codes(x, p1, p2, clip_ratio, rounding=lambda t: torch.round(t).clamp(-7, 7))


def _p1_untransposed(x, p1, p2, clip_ratio=1.0, dst_dtype=torch.int32):
    # computes L^T... with L itself: p1 is L^T already, and this transposes it back
    return ref.kronecker_quant(x, p1.t().contiguous(), p2, clip_ratio=clip_ratio, dst_dtype=dst_dtype)


def _b_bf16(x, p1, p2, clip_ratio=1.0, dst_dtype=torch.int32):
    return _codes(x, p1, p2, clip_ratio, b_dtype=torch.bfloat16)


def _clip_ignored(x, p1, p2, clip_ratio=1.0, dst_dtype=torch.int32):
    return ref.kronecker_quant(x, p1, p2, clip_ratio=1.0, dst_dtype=dst_dtype)


def _swap_two_scales(x, p1, p2, clip_ratio=1.0, dst_dtype=torch.int32):
    out, scale = ref.kronecker_quant(x, p1, p2, clip_ratio=clip_ratio, dst_dtype=dst_dtype)
    if scale.shape[0] >= 4:  # tokens 2 and 3 of each chunk trade scales
        scale = scale.clone()
        scale[[2, 3]] = scale[[3, 2]]
    return out, scale


def _f64_accumulation(x, p1, p2, clip_ratio=1.0, dst_dtype=torch.int32):
    # legitimate: another accumulation (float64) can differ from the reference only in the last bit
    return _codes(x, p1, p2, clip_ratio, acc_dtype=torch.float64)


# ------------------------------------------------------------------ packing faults
def _offset8_kronecker_quant(x, p1, p2, clip_ratio=1.0, dst_dtype=torch.int32):
    out, scale = ref.kronecker_quant(x, p1, p2, clip_ratio=clip_ratio, dst_dtype=dst_dtype)
    return offset8_to_npu(out), scale  # the same bit flip turns the NPU layout into offset-8


def _offset8_pack(weight, inner_k_tiles=1):
    return offset8_to_npu(ref.convert_weight_to_int4pack(weight, inner_k_tiles))


def _offset8_matmul(x1, x2, scale, offset=None, pertoken_scale=None, bias=None, output_dtype=torch.float16):
    # reads its operands as offset-8, consistent with its own packers (not with an NPU-layout checkpoint)
    return ref.quant_matmul(offset8_to_npu(x1), offset8_to_npu(x2.t()).t(), scale, offset=offset,
                            pertoken_scale=pertoken_scale, bias=bias, output_dtype=output_dtype)


# ------------------------------------------------------------------ npu_quant_matmul faults
def _epilogue(acc, scale, pertoken_scale, bias, output_dtype, row_scale=False):
    if row_scale:  # the weight scale indexed by token instead of by output column
        y = acc * scale[torch.arange(acc.shape[0], device=acc.device) % scale.shape[0]][:, None]
    else:
        y = acc * scale[None, :]
    if pertoken_scale is not None:
        y = y * pertoken_scale[:, None]
    if bias is not None:
        y = y + bias.float()
    return y.to(output_dtype)


def _operands(x1, x2):
    return unpack_int4(x1).float(), unpack_int4(x2.t().contiguous()).float()


def _scale_wrong_axis(x1, x2, scale, offset=None, pertoken_scale=None, bias=None, output_dtype=torch.float16):
    a, w = _operands(x1, x2)
    return _epilogue(a @ w.T, scale, pertoken_scale, bias, output_dtype, row_scale=True)


def _fp16_accumulation(x1, x2, scale, offset=None, pertoken_scale=None, bias=None, output_dtype=torch.float16):
    a, w = _operands(x1, x2)
    acc = torch.zeros(a.shape[0], w.shape[0], dtype=torch.float16)
    for k in range(a.shape[1]):  # every partial sum rounded to fp16
        acc = acc + (a[:, k:k + 1] * w[None, :, k]).half()
    return _epilogue(acc.float(), scale, pertoken_scale, bias, output_dtype)


# ------------------------------------------------------------------ int8 faults (W8A8_DYNAMIC)
def _int8_quant(x, scale_fn=None, rounding=None, qrange=(-128, 127)):
    """``npu_dynamic_quant`` int8 with knobs: the scale from ``(m, mult)``, the integer rounding of ``t``."""
    q, scale, t, mult = dynamic_codes(x, bits=8)
    if rounding is not None:
        q = rounding(t)
    if scale_fn is not None:
        scale = scale_fn(x.float().abs().amax(dim=-1), mult)
    return q.clamp(*qrange).to(torch.int8), scale


def _dq_scale_times(factor):
    def dynamic_quant(x, smooth_scales=None, dst_type=torch.int8):
        q, scale = ref.dynamic_quant(x, smooth_scales=smooth_scales, dst_type=dst_type)
        return q, scale * torch.tensor(factor, dtype=torch.float32)
    return dynamic_quant


def _dq_half_away(x, smooth_scales=None, dst_type=torch.int8):
    return _int8_quant(x, rounding=lambda t: torch.sign(t) * torch.floor(t.abs() + 0.5))


def _dq_swap_two_scales(x, smooth_scales=None, dst_type=torch.int8):
    q, scale = ref.dynamic_quant(x, smooth_scales=smooth_scales, dst_type=dst_type)
    if scale.shape[0] >= 4:  # tokens 2 and 3 of each call trade scales
        scale = scale.clone()
        scale[[2, 3]] = scale[[3, 2]]
    return q, scale


def _dq_saturate_127(x, smooth_scales=None, dst_type=torch.int8):
    # legitimate: |x * mult| never rounds past 127, so [-127, 127] and [-128, 127] give the same codes
    return _int8_quant(x, qrange=(-127, 127))


def _dq_scale_max_times_inv127(x, smooth_scales=None, dst_type=torch.int8):
    # legitimate: the kernel path that forms the scale as max * (1/127) (docs/ascend-ops.md, 'npu_dynamic_quant'),
    # 0 for a zero row
    inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(127.0, dtype=torch.float32)
    return _int8_quant(x, scale_fn=lambda m, mult: m * inv)


def _dq_divide_by_scale(x, smooth_scales=None, dst_type=torch.int8):
    # legitimate: the CANN docs' formula, scale = max / 127 and y = round(x / scale)
    m = x.float().abs().amax(dim=-1)
    scale = torch.where(m == 0, torch.ones_like(m) / 127.0, m / 127.0)
    return torch.round(x.float() / scale[:, None]).clamp(-128, 127).to(torch.int8), scale


def _dq_reciprocal_mult(x, smooth_scales=None, dst_type=torch.int8):
    # legitimate: the codes' multiplier formed as 127 * fl(1 / max), at times one fp32 ulp from 127 / max;
    # the scale as docs/ascend-ops.md, 'npu_dynamic_quant', has it (1 / that multiplier would be 2 ulps off at
    # times: not allowed)
    m = x.float().abs().amax(dim=-1)
    mult = torch.where(m == 0, torch.full_like(m, 127.0), 127.0 * (1.0 / torch.where(m == 0, torch.ones_like(m), m)))
    return torch.round(x.float() * mult[:, None]).clamp(-128, 127).to(torch.int8), ref.dynamic_quant(x)[1]


def _int8_acc(x1, x2):
    return x1.double() @ x2.double()  # exact for int8 operands


def _int8_epilogue(acc, scale, pertoken_scale, bias, output_dtype, scale_dtype=None, bias_after=False):
    s = scale.to(scale_dtype) if scale_dtype is not None else scale
    y = acc.float() * s.float()[None, :]
    if pertoken_scale is not None:
        y = y * pertoken_scale.float()[:, None]
    if bias is None:
        return y.to(output_dtype)
    if bias_after:  # rounded to the output dtype first, then the bias added in that dtype
        return y.to(output_dtype) + bias.to(output_dtype)
    return (y + bias.float()).to(output_dtype)


def _mm_scale_fp16(x1, x2, scale, offset=None, pertoken_scale=None, bias=None, output_dtype=torch.float16):
    if x1.dtype != torch.int8:
        return ref.quant_matmul(x1, x2, scale, offset, pertoken_scale, bias, output_dtype)
    return _int8_epilogue(_int8_acc(x1, x2), scale, pertoken_scale, bias, output_dtype, scale_dtype=torch.float16)


def _mm_bias_after(x1, x2, scale, offset=None, pertoken_scale=None, bias=None, output_dtype=torch.float16):
    if x1.dtype != torch.int8:
        return ref.quant_matmul(x1, x2, scale, offset, pertoken_scale, bias, output_dtype)
    return _int8_epilogue(_int8_acc(x1, x2), scale, pertoken_scale, bias, output_dtype, bias_after=True)


def _mm_int8_fp16_accumulation(x1, x2, scale, offset=None, pertoken_scale=None, bias=None,
                               output_dtype=torch.float16):
    if x1.dtype != torch.int8:
        return ref.quant_matmul(x1, x2, scale, offset, pertoken_scale, bias, output_dtype)
    a, w = x1.float(), x2.float()
    acc = torch.zeros(a.shape[0], w.shape[1], dtype=torch.float16)
    for k in range(a.shape[1]):  # every partial sum rounded to fp16
        acc = acc + (a[:, k:k + 1] * w[k][None, :]).half()
    return _int8_epilogue(acc.double(), scale, pertoken_scale, bias, output_dtype)


def _mm_misreads_min(x1, x2, scale, offset=None, pertoken_scale=None, bias=None, output_dtype=torch.float16):
    if x1.dtype != torch.int8:
        return ref.quant_matmul(x1, x2, scale, offset, pertoken_scale, bias, output_dtype)
    return ref.quant_matmul(x1.clamp(-127, 127), x2, scale, offset, pertoken_scale, bias, output_dtype)


class Broken(NamedTuple):
    backend: types.SimpleNamespace
    part: str  # the first part of check_linear that must fail
    fault: str


scale_x1_5 = _backend(kronecker_quant=_scale_times(1.5))
scale_x1_2m10 = _backend(kronecker_quant=_scale_times(1 + 2**-10))
half_away = _backend(kronecker_quant=_half_away)
saturate_7 = _backend(kronecker_quant=_saturate_7)
offset8 = _backend(kronecker_quant=_offset8_kronecker_quant, convert_weight_to_int4pack=_offset8_pack,
                   quant_matmul=_offset8_matmul)
p1_untransposed = _backend(kronecker_quant=_p1_untransposed)
b_bf16 = _backend(kronecker_quant=_b_bf16)
clip_ignored = _backend(kronecker_quant=_clip_ignored)
swapped_scales = _backend(kronecker_quant=_swap_two_scales)
weight_scale_axis = _backend(quant_matmul=_scale_wrong_axis)
fp16_accumulation = _backend(quant_matmul=_fp16_accumulation)

BROKEN = {
    "scale-x1-5": Broken(scale_x1_5, "scale", "every per-token scale x 1.5"),
    "scale-x1-2m10": Broken(scale_x1_2m10, "scale", "every per-token scale x (1 + 2^-10)"),
    "half-away": Broken(half_away, "codes", "codes rounded half away from zero"),
    "saturate-7": Broken(saturate_7, "codes", "codes saturated to [-7, 7]"),
    "offset8": Broken(offset8, "codes", "the offset-8 nibble layout (packing and reading)"),
    "p1-untransposed": Broken(p1_untransposed, "scale", "p1 used untransposed"),
    "b-bf16": Broken(b_bf16, "scale", "the second intermediate rounded to bf16"),
    "clip-ignored": Broken(clip_ignored, "scale", "the clip ratio ignored"),
    "swapped-scales": Broken(swapped_scales, "scale", "two tokens' scales swapped"),
    "weight-scale-axis": Broken(weight_scale_axis, "output", "weight scales applied along the token axis"),
    "fp16-accumulation": Broken(fp16_accumulation, "product", "the integer product accumulated in fp16"),
}

LEGITIMATE = {
    "f64-accumulation": _backend(kronecker_quant=_f64_accumulation),
}

dq_scale_x1_2m10 = _backend(dynamic_quant=_dq_scale_times(1 + 2**-10))
dq_half_away = _backend(dynamic_quant=_dq_half_away)
dq_swapped_scales = _backend(dynamic_quant=_dq_swap_two_scales)
mm_weight_scale_fp16 = _backend(quant_matmul=_mm_scale_fp16)
mm_int8_fp16_accumulation = _backend(quant_matmul=_mm_int8_fp16_accumulation)
mm_bias_after_rounding = _backend(quant_matmul=_mm_bias_after)
mm_misreads_min = _backend(quant_matmul=_mm_misreads_min)

BROKEN_INT8 = {
    "dq-scale-x1-2m10": Broken(dq_scale_x1_2m10, "scale", "every dynamic_quant per-token scale x (1 + 2^-10)"),
    "dq-half-away": Broken(dq_half_away, "codes", "dynamic_quant codes rounded half away from zero"),
    "dq-swapped-scales": Broken(dq_swapped_scales, "scale", "two tokens' dynamic_quant scales swapped"),
    "mm-weight-scale-fp16": Broken(mm_weight_scale_fp16, "output", "the weight scale rounded to fp16"),
    "mm-int8-fp16-accumulation": Broken(mm_int8_fp16_accumulation, "product",
                                        "the int8 product accumulated in fp16"),
    "mm-bias-after-rounding": Broken(mm_bias_after_rounding, "output",
                                     "the bias added after the rounding to the output dtype"),
    "mm-misreads-min": Broken(mm_misreads_min, "product", "int8 quant_matmul reading -128 as -127"),
}

LEGITIMATE_INT8 = {
    "dq-saturate-127": _backend(dynamic_quant=_dq_saturate_127),
    "dq-scale-max-times-inv127": _backend(dynamic_quant=_dq_scale_max_times_inv127),
    "dq-divide-by-scale": _backend(dynamic_quant=_dq_divide_by_scale),
    "dq-reciprocal-mult": _backend(dynamic_quant=_dq_reciprocal_mult),
}


# ------------------------------------------------------------------ C8 KV cache (numerics.check_kv_cache)
# Each is the reference's write / read / shard (numerics.kv_cache.REFERENCE) but for one fault.
def _kv(**parts) -> types.SimpleNamespace:
    from flatquant_lab.numerics.kv_cache import REFERENCE

    return types.SimpleNamespace(**{**vars(REFERENCE), **parts})


def _kv_write_half_away(x, scale, offset=None):
    y = x * torch.reciprocal(scale.to(x.dtype))
    if offset is not None:
        y = y + offset.to(x.dtype)
    return (torch.sign(y) * torch.floor(y.abs() + 0.5)).clamp(-128, 127).to(torch.int8)


def _kv_write_divides(x, scale, offset=None):
    # x / scale instead of x * (1 / scale): another rounding in bf16
    y = x / scale.to(x.dtype)
    if offset is not None:
        y = y + offset.to(x.dtype)
    return torch.round(y).clamp(-128, 127).to(torch.int8)


def _kv_read_with_offset(q, scale, offset, dtype):
    return (q.to(dtype) - offset.to(dtype)) * scale.to(dtype)


def _kv_shard_strided(tensors, *, rank, tp, num_kv_heads, head_dim):
    # rank r keeps heads r, r + tp, ... (an interleaved split) instead of the block [r H / tp, (r + 1) H / tp)
    heads = list(range(rank, num_kv_heads, tp)) if num_kv_heads >= tp else [rank % num_kv_heads]
    return {n: t.reshape(-1).view(num_kv_heads, head_dim)[heads].reshape(-1) if t.numel() > 1 else t.reshape(-1)
            for n, t in tensors.items()}


def _kv_shard_replica_modulo(tensors, *, rank, tp, num_kv_heads, head_dim):
    # tp > num_kv_heads: head rank % H instead of rank // (tp / H)
    heads = [rank % num_kv_heads] if tp > num_kv_heads else range(rank * num_kv_heads // tp,
                                                                    (rank + 1) * num_kv_heads // tp)
    return {n: t.reshape(-1).view(num_kv_heads, head_dim)[list(heads)].reshape(-1) if t.numel() > 1 else t.reshape(-1)
            for n, t in tensors.items()}


BROKEN_KV = {
    "kv-write-half-away": Broken(_kv(write=_kv_write_half_away), "write", "codes rounded half away from zero"),
    "kv-write-divides": Broken(_kv(write=_kv_write_divides), "write", "x / scale instead of x * (1 / scale)"),
    "kv-read-with-offset": Broken(_kv(read=_kv_read_with_offset), "read", "the read subtracts the offset"),
    "kv-shard-strided": Broken(_kv(shard=_kv_shard_strided), "shard", "rank r keeps kv heads r, r + tp, ..."),
    "kv-shard-replica-modulo": Broken(_kv(shard=_kv_shard_replica_modulo), "shard",
                                      "a replica rank keeps head rank % H, not rank // (tp / H)"),
}
