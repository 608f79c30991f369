"""Deliberately broken MXFP4 backends (test-only): each gets one thing wrong that the W4A4_MXFP4_FLATQUANT path
relies on, and is the reference's otherwise (docs/mxfp4.md). ``BROKEN_MXFP4[name].part`` is the part of
:func:`flatquant_lab.numerics.check_linear_mxfp4` that must catch it. ``LEGITIMATE_MXFP4`` differ from the
reference only where a device may (another fp32 accumulation of the transform), and must pass.
"""
from __future__ import annotations

import types
from typing import NamedTuple

import torch

from flatquant_lab import mxfp4
from flatquant_lab.mxfp4 import FLOAT4_E2M1_X2, MxOptions
from flatquant_lab.ops import reference as ref


class Broken(NamedTuple):
    backend: types.SimpleNamespace
    part: str


def _backend(**ops) -> types.SimpleNamespace:
    base = {name: getattr(ref, name) for name in
            ("kronecker_quant", "quant_matmul", "convert_weight_to_int4pack", "dynamic_quant")}
    return types.SimpleNamespace(**{**base, **ops})


def _fp4_kq(fn):
    """A ``kronecker_quant`` whose FP4 path is ``fn(x, p1, p2, clip_ratio)`` and whose int4 path is the reference's."""
    def kronecker_quant(x, p1, p2, clip_ratio=1.0, dst_dtype=torch.int32):
        if dst_dtype == FLOAT4_E2M1_X2:
            return fn(x, p1, p2, clip_ratio)
        return ref.kronecker_quant(x, p1, p2, clip_ratio=clip_ratio, dst_dtype=dst_dtype)
    return kronecker_quant


def _from_ratios(x, b, ratios, scales):
    """Pack rounded ratios (already on the grid) and scales as the op returns them."""
    t, n1, n2 = x.shape
    return mxfp4.pack_fp4(mxfp4.e2m1_codes(ratios).reshape(t, -1)).reshape(t, n1, n2 // 2), scales


def _swapped_nibbles(x, p1, p2, clip_ratio):
    out, s = ref.kronecker_quant_mx(x, p1, p2, clip_ratio)
    return (out << 4) | (out >> 4), s


def _msmodelslim_rule(x, p1, p2, clip_ratio):
    return ref.kronecker_quant_mx(x, p1, p2, clip_ratio, MxOptions(scale_rule="msmodelslim"))


def _half_away(x, p1, p2, clip_ratio):
    tr = ref.kronecker_quant_mx_trace(x, p1, p2, clip_ratio)
    groups = tr.b.float().unflatten(-1, (-1, 32))
    ratio = torch.ldexp(groups, -(tr.scales.float() - 127).unsqueeze(-1)).to(torch.bfloat16)
    q = mxfp4.round_e2m1(ratio, half_even=False).flatten(-2)
    return _from_ratios(x, tr.b, q, tr.scales)


def _no_saturation(x, p1, p2, clip_ratio):
    # rounds ratios in (7, 8) up to 8 and writes magnitude index 8 into the 4-bit code: it lands in the sign bit
    tr = ref.kronecker_quant_mx_trace(x, p1, p2, clip_ratio)
    groups = tr.b.float().unflatten(-1, (-1, 32))
    ratio = torch.ldexp(groups, -(tr.scales.float() - 127).unsqueeze(-1)).flatten(-2).double()
    over = ratio.abs() >= 7
    codes = tr.codes.clone()
    codes[over] = 8  # (index 8) & 0xF, sign dropped
    t, n1, n2 = x.shape
    return mxfp4.pack_fp4(codes).reshape(t, n1, n2 // 2), tr.scales


def _scale_plus_one(x, p1, p2, clip_ratio):
    out, s = ref.kronecker_quant_mx(x, p1, p2, clip_ratio)
    return out, torch.where(s > 0, s + 1, s)


def _f64_transform(x, p1, p2, clip_ratio):
    # legitimate: the products accumulated in float64 can differ from fp32 only in the last bit of b
    a = torch.bmm(x.double(), p2.double().expand(x.shape[0], *p2.shape))
    b = torch.matmul(p1.double(), a).to(torch.bfloat16).reshape(x.shape[0], -1)
    mq = mxfp4.quantize_groups(b)
    t, n1, n2 = x.shape
    return mxfp4.pack_fp4(mq.codes).reshape(t, n1, n2 // 2), mq.scales


def _matmul_scale_off(x1, x2, scale, offset=None, pertoken_scale=None, bias=None, output_dtype=torch.float16,
                      **mx):
    if mx.get("x1_dtype") == FLOAT4_E2M1_X2:
        return ref.quant_matmul(x1, x2, scale + 1, pertoken_scale=pertoken_scale, bias=bias,
                                output_dtype=output_dtype, **mx)
    return ref.quant_matmul(x1, x2, scale, offset=offset, pertoken_scale=pertoken_scale, bias=bias,
                            output_dtype=output_dtype, **mx)


def _matmul_weight_nibbles_swapped(x1, x2, scale, offset=None, pertoken_scale=None, bias=None,
                                   output_dtype=torch.float16, **mx):
    if mx.get("x1_dtype") == FLOAT4_E2M1_X2:
        w = x2.t().contiguous()
        x2 = ((w << 4) | (w >> 4)).t()
    return ref.quant_matmul(x1, x2, scale, offset=offset, pertoken_scale=pertoken_scale, bias=bias,
                            output_dtype=output_dtype, **mx)


BROKEN_MXFP4 = {
    "swapped_nibbles": Broken(_backend(kronecker_quant=_fp4_kq(_swapped_nibbles)), "codes"),
    "msmodelslim_scale_rule": Broken(_backend(kronecker_quant=_fp4_kq(_msmodelslim_rule)), "scale"),
    "half_away_from_zero": Broken(_backend(kronecker_quant=_fp4_kq(_half_away)), "codes"),
    "no_saturation": Broken(_backend(kronecker_quant=_fp4_kq(_no_saturation)), "codes"),
    "scale_one_exponent_off": Broken(_backend(kronecker_quant=_fp4_kq(_scale_plus_one)), "scale"),
    "matmul_scale_one_exponent_off": Broken(_backend(quant_matmul=_matmul_scale_off), "product"),
    "matmul_weight_nibbles_swapped": Broken(_backend(quant_matmul=_matmul_weight_nibbles_swapped), "product"),
}
LEGITIMATE_MXFP4 = {
    "f64_transform": _backend(kronecker_quant=_fp4_kq(_f64_transform)),
    "mx_backend_defaults": ref.mx_backend(MxOptions()),
}
