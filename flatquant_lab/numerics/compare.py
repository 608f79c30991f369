"""Comparisons the op-by-op checks share (``check_linear`` and ``check_linear_w8a8``): input validation,
per-part verdicts, exact integer products, output intervals, float metrics."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..dtypes import dtype_name
from ..layers import W4A4FlatQuantLinear
from ..schemes import scheme_of
from .report import FP32_EPILOGUE_REL, PartCheck, sqnr_db_of, ulp


def fitting_check_hint(qlinear, layer_cls: type) -> str:
    """A hint naming the check that fits ``qlinear``'s scheme when it is not ``layer_cls``'s, else ``""``."""
    from .dispatch import LAYER_CHECKS  # it imports this module

    scheme = scheme_of(qlinear)
    check = LAYER_CHECKS.get(scheme.quant_type) if scheme is not None else None
    if check is None or scheme.layer_cls is layer_cls:
        return ""
    return f" (a {scheme.quant_type} layer: use {check.__name__})"


def check_inputs(qlinear, x, float_linear, name: str = "float_linear", layer_cls: type = W4A4FlatQuantLinear) -> None:
    if not isinstance(qlinear, layer_cls):
        hint = fitting_check_hint(qlinear, layer_cls)
        raise ValueError(f"qlinear: expected a {layer_cls.__name__}, got {type(qlinear).__name__}{hint}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x: expected a float tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or x.shape[-1] != qlinear.in_features:
        raise ValueError(f"x: expected last dim {qlinear.in_features} (in_features), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError("x: expected at least one token, got none")
    if float_linear is not None:
        if not isinstance(float_linear, nn.Linear):
            raise ValueError(f"{name}: expected an nn.Linear, got {type(float_linear).__name__}")
        want = (qlinear.out_features, qlinear.in_features)
        if tuple(float_linear.weight.shape) != want:
            raise ValueError(f"{name}: expected weight shape {list(want)}, got {list(float_linear.weight.shape)}")


def malformed(t, what: str, shape: tuple, dtype: torch.dtype) -> str | None:
    """Why ``t`` is not a ``dtype`` tensor of ``shape`` (``None`` when it is)."""
    if not isinstance(t, torch.Tensor):
        return f"{what}: expected a {dtype_name(dtype)} tensor {list(shape)}, got {type(t).__name__}"
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        return f"{what}: expected {dtype_name(dtype)} {list(shape)}, got {dtype_name(t.dtype)} {list(t.shape)}"
    return None


def first_bad(part: str, bad: torch.Tensor, got: torch.Tensor, want: torch.Tensor, what: str) -> PartCheck:
    """A failed :class:`PartCheck` for the first True of ``bad[rows, cols]``."""
    row, col = divmod(int(bad.flatten().nonzero()[0]), bad.shape[1])
    g, w = float(got[row, col]), float(want[row, col])
    n = int(bad.sum())
    reason = (f"{n} {what} in {int(bad.any(dim=1).sum())} of {bad.shape[0]} rows differ; first at row {row}, "
              f"position {col}: backend {g:.9g}, reference {w:.9g}")
    return PartCheck(part, False, bad.numel(), n, row, col, g, w, reason)


def merge_checks(part: str, checks: list[PartCheck]) -> PartCheck:
    """One :class:`PartCheck` from several runs of a part: the first failure, else the counts summed."""
    for c in checks:
        if not c.passed:
            return c
    return PartCheck(part, True, sum(c.compared for c in checks))


def compare_scales(s_b: torch.Tensor, s_ref: torch.Tensor, at: str, free: torch.Tensor | None = None) -> PartCheck:
    """Per-token scales: ``|s_b - s_ref| <= ulp_fp32(s_ref)``; a token in ``free`` takes any finite scale >= 0."""
    t_count = s_ref.shape[0]
    ok = (s_b.double() - s_ref.double()).abs() <= ulp(s_ref, torch.float32)  # a NaN is not ok
    if free is not None:
        ok = ok | (free & torch.isfinite(s_b) & (s_b >= 0))
    bad = ~ok
    if not bool(bad.any()):
        return PartCheck("scale", True, t_count)
    c = first_bad("scale", bad[:, None], s_b[:, None], s_ref[:, None], "per-token scales")
    ratio = c.backend_value / c.reference_value if c.reference_value else math.nan
    c.reason = (f"{c.mismatches} of {t_count} per-token scales differ from the reference by more than one fp32 ulp; "
                f"first at token {c.token}: backend {c.backend_value:.9g}, reference {c.reference_value:.9g} "
                f"(ratio {ratio:.9g})" + at)
    return c


def compare_codes(q_b, q_ref, t, window, qrange: tuple, tie_share: float, bits: str, at: str):
    """``(PartCheck, tie flips, codes near a tie)``: codes ``q_b`` against ``q_ref`` (int16 ``[T, K]``).

    A code may differ only by one step to the other side of the tie ``h = floor(t) + 1/2`` nearest the
    reference's value before rounding ``t``, when ``|t - h| <= window``; at most ``tie_share`` of the
    codes inside the window (and at least one) may do so.
    """
    t_count = q_ref.shape[0]
    h = torch.floor(t) + 0.5  # the nearest half-integer
    near = (t - h).abs() <= window
    lo = torch.floor(h).clamp(*qrange).to(torch.int16)
    hi = (torch.floor(h) + 1).clamp(*qrange).to(torch.int16)
    differ = q_b != q_ref
    flip = differ & near & (((q_ref == lo) & (q_b == hi)) | ((q_ref == hi) & (q_b == lo)))
    bad = differ & ~flip
    n_near, n_flip = int(near.sum()), int(flip.sum())
    allowed = max(1, math.floor(tie_share * n_near)) if tie_share > 0 else 0
    if bool(bad.any()):
        codes = first_bad("codes", bad, q_b, q_ref, f"{bits} codes")
        codes.reason = (f"{codes.mismatches} {bits} codes in {int(bad.any(dim=1).sum())} of {t_count} tokens differ "
                        f"from the reference away from a rounding tie; first at token {codes.token}, code "
                        f"{codes.index}: backend {codes.backend_value:g}, reference {codes.reference_value:g} "
                        f"(reference value before rounding {float(t[codes.token, codes.index]):.6g})" + at)
    elif n_flip > allowed:
        codes = first_bad("codes", flip, q_b, q_ref, f"{bits} codes")
        codes.reason = (f"{n_flip} {bits} codes differ by one step at a rounding tie, {n_flip / n_near:.1%} of the "
                        f"{n_near} codes within the tie window (at most {allowed} allowed): a systematic rounding "
                        f"difference (a tie rule other than half to even, another intermediate precision); first at "
                        f"token {codes.token}, code {codes.index}: backend {codes.backend_value:g}, reference "
                        f"{codes.reference_value:g} (reference value before rounding "
                        f"{float(t[codes.token, codes.index]):.6g})" + at)
    else:
        codes = PartCheck("codes", True, q_ref.numel())
    return codes, n_flip, n_near


def exact_acc(a: torch.Tensor, w: torch.Tensor, gemm_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``acc[i, j] = sum_k a[i, k] w[j, k]`` in float64, exact: an fp32 GEMM of int4 values is exact
    while |acc| <= 64 K < 2^24 (docs/ascend-ops.md, 'npu_quant_matmul'); int8 values take a float64 GEMM
    (|acc| <= 2^14 K < 2^53)."""
    return (a.to(gemm_dtype) @ w.to(gemm_dtype).T).double()


def unit_scale(acc: torch.Tensor) -> float:
    """A power of two ``2^-s`` with ``|acc| 2^-s <= 2^15`` (below fp16's max); exact as a scale."""
    top = float(acc.abs().max())
    return 2.0**-(max(0, math.ceil(math.log2(top)) - 15) if top > 0 else 0)


def compare_unit_product(label: str, y: torch.Tensor, acc: torch.Tensor, unit: float) -> PartCheck:
    """``y == round_fp16(fl32(acc) * unit)``: the product at unit scales (fp32 holds ``acc`` up to 2^24)."""
    want = (acc.float() * unit).half()  # the int32 -> fp32 conversion, an exact scaling, one rounding to fp16
    bad = ~(y == want)
    if not bool(bad.any()):
        return PartCheck("product", True, want.numel())
    c = first_bad("product", bad, y.double() / unit, want.double() / unit, "integer products")
    c.reason = (f"quant_matmul ({label}, unit scales): {c.mismatches} of {want.numel()} integer products differ "
                f"from the exact int32 sum; first at row {c.token}, column {c.index}: backend "
                f"{c.backend_value:.9g}, reference {c.reference_value:.9g} (the exact sum "
                f"{float(acc[c.token, c.index]):.0f} rounded to fp16)")
    return c


def output_interval(z: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs in ``dtype`` an fp32 epilogue within ``FP32_EPILOGUE_REL`` of exact ``z`` can give.

    ``[round(v_lo), round(v_hi)]``, ``v = z + bias -+ (|z| 2^-22 + |z + bias| 2^-23)`` taken to fp32 outwards
    (the second term, for the bias added in fp32: one more fp32 rounding, with a factor of two; absent
    without a bias): rounding is monotone, so any fp32 value between them rounds into this range.
    """
    radius = z.abs() * FP32_EPILOGUE_REL
    centre = z
    if bias is not None:
        centre = z + bias.detach().cpu().double()
        radius = radius + centre.abs() * 2.0**-23
    lo, hi = centre - radius, centre + radius
    lo32, hi32 = lo.float(), hi.float()
    lo32 = torch.where(lo32.double() > lo, torch.nextafter(lo32, torch.tensor(-math.inf)), lo32)
    hi32 = torch.where(hi32.double() < hi, torch.nextafter(hi32, torch.tensor(math.inf)), hi32)
    return lo32.to(dtype), hi32.to(dtype)


def outside(y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return ~((y.double() >= lo.double()) & (y.double() <= hi.double()))  # a NaN is outside


def check_forward(y_layer: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, y_ref: torch.Tensor,
                   act: torch.dtype) -> PartCheck:
    """The layer's forward ``y_layer`` inside ``[lo, hi]``, the roundings of the exact result ``y_ref`` of
    the backend's own codes and scales."""
    bad = outside(y_layer, lo, hi)
    if not bool(bad.any()):
        return PartCheck("output", True, bad.numel())
    c = first_bad("output", bad, y_layer, y_ref, "outputs")
    c.reason = (f"the layer's forward: {c.mismatches} of {bad.numel()} outputs lie outside one {dtype_name(act)} "
                f"rounding of the exact result of the backend's own codes and scales; first at token {c.token}, "
                f"column {c.index}: backend {c.backend_value:.6g}, reference {c.reference_value:.6g}")
    return c


def prepare_check(qlinear, x, float_linear, layer_cls: type, weight_attr: str, tie_ulps, tie_share):
    """Validated inputs: ``(tie_ulps, tie_share, backend, x as [T, K], x in the act dtype on the weight's device)``."""
    check_inputs(qlinear, x, float_linear, layer_cls=layer_cls)
    weight = getattr(qlinear, weight_attr)
    tie_ulps, tie_share = float(tie_ulps), float(tie_share)
    if not math.isfinite(tie_ulps) or tie_ulps < 0:
        raise ValueError(f"tie_ulps: expected a finite float >= 0, got {tie_ulps}")
    if not 0.0 <= tie_share <= 1.0:
        raise ValueError(f"tie_share: expected a float in [0, 1], got {tie_share}")
    backend = ops.resolve_backend(qlinear.backend, weight)
    x2 = x.reshape(-1, qlinear.in_features)
    x_act = x2.to(device=weight.device, dtype=qlinear.act_dtype).contiguous()
    return tie_ulps, tie_share, backend, x2, x_act


def report_fields(parts: list[PartCheck], ties, notes: list[str], tie_share: float, tie_ulps: float) -> dict:
    """The verdict (the first failing part) and the tie counts ``(flips, near a tie, codes)`` as report fields."""
    failed = next((p for p in parts if not p.passed), None)
    n_flip, n_near, n_codes = ties
    if n_flip:
        over = any(p.part == "codes" and not p.passed for p in parts)
        notes.append(f"{n_flip} code(s) differ from the reference by one step at a rounding tie "
                     f"({'more than the bound allows' if over else 'allowed'})")
    return dict(passed=failed is None, failed_part=failed.part if failed else None,
                reason=failed.reason if failed else "", parts=parts, tie_codes=n_flip,
                tie_code_share=n_flip / n_codes if n_codes else 0.0, near_tie_codes=n_near,
                tie_share_bound=tie_share, tie_ulps=tie_ulps)


def float_metrics(y_int: torch.Tensor, float_linear: nn.Linear, y_plain: torch.Tensor) -> dict:
    """SQNR, cosine, relative and worst-token error of ``y_int`` against ``y_plain (+ float_linear.bias)``, float64."""
    fb = float_linear.bias.detach().cpu().double() if float_linear.bias is not None else None
    y_fp = y_plain + fb if fb is not None else y_plain
    err = y_int - y_fp
    tok_err = err.norm(dim=1)
    worst = int(tok_err.argmax())
    ref_norm = float(y_fp.norm())
    tok_norm = float(y_fp[worst].norm())
    return dict(
        sqnr_db=sqnr_db_of(y_fp, err),
        cosine=float(torch.nn.functional.cosine_similarity(y_int.flatten(), y_fp.flatten(), dim=0)),
        rel_err=float(err.norm()) / ref_norm if ref_norm > 0 else math.inf,
        max_abs_err=float(err.abs().max()), worst_token=worst, worst_token_err=float(tok_err[worst]),
        worst_token_rel_err=float(tok_err[worst]) / tok_norm if tok_norm > 0 else math.inf,
    )
