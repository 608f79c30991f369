"""The W8A8_DYNAMIC check, op by op (``check_linear_w8a8``), docs/ascend-ops.md, 'npu_dynamic_quant'."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..dtypes import dtype_name
from ..layers import W8A8DynamicLinear
from ..quantizers import INT8_QMAX, INT8_QMIN
from .compare import (check_forward, compare_codes, compare_scales, compare_unit_product, exact_acc, first_bad,
                      float_metrics, malformed, merge_checks, output_interval, outside, prepare_check, report_fields,
                      unit_scale)
from .report import DEFAULT_TIE_SHARE, DEFAULT_TIE_ULPS, PartCheck, W8A8Report, ulp

PARTS_W8A8 = ("scale", "codes", "product", "output")
# The dynamic_quant tie probe: tokens with max|x| = 127 * 2^j and every other value (k + 1/2) 2^j. Every
# way of forming the op's multiplier, 127 / m, 127 * fl(1/m), 1 / fl(m * fl(1/127)), or dividing by
# the scale m / 127, gives exactly 2^-j there (127 * fl32(1/127) == 1 exactly), so each such code sits
# on an exact tie that only the tie rule decides. All values are exact in fp16 and bf16 (8 bits).
TIE_PROBE_EXPONENTS = (0, -4, 5)
# On the layer's own tokens a last-bit difference in mult flips a sizeable share of the few codes in the
# tie window (up to 21% measured, see check_linear_w8a8): their bound is loose; the probe decides the tie rule.
DEFAULT_TOKEN_TIE_SHARE_INT8 = 0.5


def _tie_probe(k: int, dtype: torch.dtype) -> torch.Tensor:
    """``[len(TIE_PROBE_EXPONENTS) + 1, k]`` in ``dtype``: one tie row per exponent (signs +, -, +), then a zero row."""
    vals = torch.remainder(torch.arange(k, dtype=torch.float64) - 1, 254) - 126.5  # -126.5 ... 126.5
    vals[0] = 127.0  # the row's max|x|
    rows = [sign * 2.0**j * vals for j, sign in zip(TIE_PROBE_EXPONENTS, (1.0, -1.0, 1.0))]
    rows.append(torch.zeros(k, dtype=torch.float64))
    return torch.stack(rows).to(dtype)


def _check_dynamic(x_act: torch.Tensor, backend: str, tie_ulps: float, tie_share: float, at: str):
    """``(scale, codes, (tie flips, codes near a tie, codes), reference trace, backend codes, scales)`` of
    ``dynamic_quant`` on tokens ``x_act[T, K]``."""
    t_count, k = x_act.shape
    x_cpu = x_act.cpu()
    tr = ops.dynamic_quant_trace(x_cpu)
    q_b, s_b = ops.dynamic_quant(x_act, dst_type=torch.int8, backend=backend)
    why = (malformed(q_b, "dynamic_quant y", (t_count, k), torch.int8)
           or malformed(s_b, "dynamic_quant scale", (t_count,), torch.float32))
    if why:
        fail = PartCheck("codes", False, reason=why + at)
        return PartCheck("scale", False, reason=why + at), fail, (0, 0, 0), tr, None, None
    q_b, s_b = q_b.cpu(), s_b.cpu()
    # scales: within one fp32 ulp (1 / mult and max * (1/127) differ by at most that, docs/ascend-ops.md); an
    # all-zero token's scale multiplies only zero codes, and the kernel leaves it open: any finite value >= 0
    scale = compare_scales(s_b, tr.scale, at, free=(x_cpu == 0).all(dim=1))
    # codes: equal, or one step across a tie that a last-bit difference in mult moves t over
    t = tr.t.double()
    window = tie_ulps * (x_cpu.double().abs() * ulp(tr.mult, torch.float32)[:, None]
                         + ulp(torch.floor(t) + 0.5, torch.float32))
    codes, n_flip, n_near = compare_codes(q_b.to(torch.int16), tr.q.to(torch.int16), t, window,
                                           (INT8_QMIN, INT8_QMAX), tie_share, "int8", at)
    return scale, codes, (n_flip, n_near, tr.q.numel()), tr, q_b, s_b


def _check_product_int8(qlinear, q_ref: torch.Tensor, backend: str) -> PartCheck:
    """int8 ``quant_matmul`` at unit scales: ``round_fp16(fl32(acc) 2^-s)``, on the layer and on a probe.

    The probe's rows (codes in [100, 127], one row of -128, four random) make partial sums that any
    accumulator narrower than int32 rounds, and that a kernel misreading -128 gets wrong.
    """
    g = torch.Generator().manual_seed(0)
    k = qlinear.in_features
    probe_a = torch.cat([torch.randint(100, 128, (4, k), generator=g), torch.randint(-128, 128, (4, k), generator=g)])
    probe_a[0] = -128
    probe_w = torch.cat([torch.randint(100, 128, (8, k), generator=g), torch.randint(-127, 128, (8, k), generator=g)])
    device = qlinear.weight_t.device
    checks = []
    for label, a, w in (("layer", q_ref, qlinear.weight_int.cpu()), ("probe", probe_a.to(torch.int8),
                                                                      probe_w.to(torch.int8))):
        acc = exact_acc(a, w, torch.float64)
        unit = unit_scale(acc)
        scale = torch.full((w.shape[0],), unit, dtype=torch.float32, device=device)
        ones = torch.ones(a.shape[0], dtype=torch.float32, device=device)
        y = ops.quant_matmul(a.to(device), w.t().contiguous().to(device), scale, pertoken_scale=ones,
                             output_dtype=torch.float16, backend=backend)
        why = malformed(y, f"quant_matmul int8 ({label})", (a.shape[0], w.shape[0]), torch.float16)
        if why:
            return PartCheck("product", False, reason=why)
        checks.append(compare_unit_product(f"int8, {label}", y.cpu(), acc, unit))
    return merge_checks("product", checks)


def _check_output_int8(qlinear, x_act, tr, q_b, s_b, backend: str):
    """The int8 epilogue and the forward: ``(PartCheck, the layer's output, max |y - y_ref|, max error in ulps)``.

    The epilogue runs on the reference's codes and scales twice: with the layer's weight scale and bias,
    and with a float32 weight scale of full mantissa (what the op must use as given) and a bias (the
    layer's, else a probe one), so a scale narrowed to fp16 or a bias added after the rounding shows.
    """
    act = qlinear.act_dtype
    device = qlinear.weight_t.device
    o = qlinear.out_features
    acc_ref = exact_acc(tr.q, qlinear.weight_int.cpu(), torch.float64)
    s_run = qlinear.scale.detach().cpu()
    bias = qlinear.bias.detach().cpu() if qlinear.bias is not None else None
    g = torch.Generator().manual_seed(1)
    probe_scale = (s_run.double() * (1 + 2.0**-9 * torch.rand(o, generator=g, dtype=torch.float64))).float()
    z_run = acc_ref * s_run.double()[None, :] * tr.scale.double()[:, None]
    rms = float(z_run.pow(2).mean().sqrt()) or 1.0
    probe_bias = bias if bias is not None else (rms * torch.randn(o, generator=g, dtype=torch.float64)).to(act)
    checks = []
    for label, scale, b in (("the layer's weight scale", s_run, bias),
                            ("a float32 weight scale of full mantissa (probe)", probe_scale, probe_bias)):
        z = acc_ref * scale.double()[None, :] * tr.scale.double()[:, None]
        y = ops.quant_matmul(tr.q.to(device), qlinear.weight_t, scale.to(device), pertoken_scale=tr.scale.to(device),
                             bias=None if b is None else b.to(device), output_dtype=act, backend=backend)
        why = malformed(y, f"quant_matmul int8 ({label})", tuple(z.shape), act)
        if why:
            checks.append(PartCheck("output", False, reason=why))
            break
        lo, hi = output_interval(z, act, b)
        bad = outside(y.cpu(), lo, hi)
        if not bool(bad.any()):
            checks.append(PartCheck("output", True, bad.numel()))
            continue
        c = first_bad("output", bad, y.cpu(), z if b is None else z + b.double(), "outputs")
        c.reason = (f"int8 quant_matmul on the reference's codes and scales with {label}"
                    f"{', and a bias' if b is not None else ''}: {c.mismatches} of {bad.numel()} outputs lie outside "
                    f"one {dtype_name(act)} rounding of the exact result (bias in fp32); first at token {c.token}, "
                    f"column {c.index}: backend {c.backend_value:.6g}, reference {c.reference_value:.6g} (allowed "
                    f"[{float(lo[c.token, c.index]):.6g}, {float(hi[c.token, c.index]):.6g}])")
        checks.append(c)
    # the layer's forward against the exact result of the backend's own codes and scales
    y_layer = qlinear(x_act).cpu()
    if q_b is None:
        checks.append(PartCheck("output", False, reason="the layer forward cannot be checked: dynamic_quant's "
                                "output is malformed"))
        return merge_checks("output", checks), y_layer, math.nan, math.nan
    z = exact_acc(q_b, qlinear.weight_int.cpu(), torch.float64) * s_run.double()[None, :] * s_b.double()[:, None]
    y_ref = z if bias is None else z + bias.double()
    lo, hi = output_interval(z, act, bias)
    diff = (y_layer.double() - y_ref).abs()
    checks.append(check_forward(y_layer, lo, hi, y_ref, act))
    # one rounding of z + bias (in fp32) to the output dtype: about half an ulp
    return merge_checks("output", checks), y_layer, float(diff.max()), float((diff / ulp(y_ref, act)).max())


def check_linear_w8a8(qlinear: W8A8DynamicLinear, x: torch.Tensor, float_linear: nn.Linear | None = None,
                      tie_ulps: float = DEFAULT_TIE_ULPS, tie_share: float = DEFAULT_TIE_SHARE,
                      token_tie_share: float = DEFAULT_TOKEN_TIE_SHARE_INT8) -> W8A8Report:
    """Check a W8A8_DYNAMIC layer's backend op by op against the reference on tokens ``x[..., K]``; one verdict.

    ``x`` is first rounded to the layer's model dtype. The backend runs each op on the reference's
    inputs; the parts (docs/ascend-ops.md, 'W8A8_DYNAMIC layers'), each of which must hold (``passed``):
    scale:   ``|s - s_ref| <= ulp_fp32(s_ref)`` per token, ``s_ref = 1 / mult``, ``mult = fl32(127 / max|x|)``;
    codes:   ``q == q_ref = sat[-128, 127](rint(t))``, ``t = fl32(x mult)``, except one step across a tie:
             ``|t - h| <= w``, ``h`` the nearest half-integer, ``w = tie_ulps (|x| ulp_fp32(mult) + ulp_fp32(h))``;
    product: ``quant_matmul(q, W, 2^-s, 1) == round_fp16(fl32(acc) 2^-s)``, ``acc = sum_k q w`` exact in int32;
    output:  ``round(v - r) <= y <= round(v + r)``, ``v = acc s_w s_tok + bias`` exact,
             ``r = |acc s_w s_tok| 2^-22 + |v| 2^-23`` (fp32 epilogue, bias in fp32, one rounding to the output
             dtype), for quant_matmul on the reference's codes and scales and for the layer's forward on its own.
    dynamic_quant also runs on :data:`TIE_PROBE_EXPONENTS` tie-probe tokens and an all-zero token;
    quant_matmul also on a probe with int32-sized partial sums, and with a float32 weight scale of
    full mantissa (the layer's own is rounded to the model dtype, so narrowing it to fp16 changes nothing
    there) and a bias (the layer's, or a probe one).

    The scale tolerance. ``1 / fl32(127 / m)`` and ``fl32(m fl32(1/127))`` (both in use, docs/ascend-ops.md,
    'npu_dynamic_quant')
    differ by at most one fp32 ulp: measured over every positive fp16 ``m`` and every bf16 ``m`` whose
    multiplier is a normal fp32 (1.5e-36 <= m). An all-zero token's scale may be any finite value >= 0.

    The tie allowance. ``w`` is how far ``t`` moves when ``mult`` moves by one fp32 ulp (a reciprocal, or
    dividing by the scale as CANN's docs write it), plus ``t``'s own rounding. Only a code inside that
    window may differ, by one step, to the other side of the tie; every code outside it must match
    exactly, so no error larger than one step, or away from a tie, is excused. Such codes are counted
    (``tie_codes``) and bounded in two groups, each at least one (none with a share of 0):
    on the tie probe at most ``tie_share`` (1/32) of its window codes: there every formulation of the
    op has the exact multiplier ``2^-j``, so a legitimate backend flips none, while half away from zero
    flips every tie with an even floor (50.6% measured); this bound decides the tie rule.
    On the layer's tokens at most ``token_tie_share`` (1/2): there a last-bit difference in ``mult`` does
    flip window codes (4M random tokens' codes: dividing by the scale 3.3% (bf16) and 2.9% (fp16) of the
    481 and 68 window codes, multiplying by ``127 fl(1/m)`` 3.5% and 20.6%), close to what half away from
    zero flips there (48% and 40%), so those tokens cannot settle the tie rule and get a loose bound.
    Saturation: ``|t| <= 127 (1 + 2^-24)^2`` rounds to at most 127, so the reference never reaches -128 and a
    kernel saturating to [-127, 127] computes the same codes; -128 is still fed to quant_matmul by the probe.
    """
    tie_ulps, tie_share, backend, x2, x_act = prepare_check(qlinear, x, float_linear, W8A8DynamicLinear,
                                                       "weight_t", tie_ulps, tie_share)
    token_tie_share = float(token_tie_share)
    if not 0.0 <= token_tie_share <= 1.0:
        raise ValueError(f"token_tie_share: expected a float in [0, 1], got {token_tie_share}")
    if qlinear.tp_size != 1:
        raise ValueError(f"qlinear: expected tp_size 1 (the check runs one rank's ops), got tp_size "
                         f"{qlinear.tp_size}; check a layer built with tp_size=1")
    act = qlinear.act_dtype
    k, o = qlinear.in_features, qlinear.out_features
    probe = _tie_probe(k, act).to(x_act.device)
    notes: list[str] = []
    with torch.no_grad():
        scale, codes, ties, tr, q_b, s_b = _check_dynamic(x_act, backend, tie_ulps, token_tie_share, "")
        p_scale, p_codes, p_ties, _, _, _ = _check_dynamic(probe, backend, tie_ulps, tie_share,
                                                       " (in the tie probe; its tokens are numbered from 0)")
        parts = [merge_checks("scale", [scale, p_scale]), merge_checks("codes", [codes, p_codes]),
                 _check_product_int8(qlinear, tr.q, backend)]
        output, y_int, max_diff, err_ulps = _check_output_int8(qlinear, x_act, tr, q_b, s_b, backend)
        parts.append(output)
        report = report_fields(parts, [a + b for a, b in zip(ties, p_ties)], notes, tie_share, tie_ulps)
        report.update(
            in_features=k, out_features=o, tokens=x_act.shape[0], act_dtype=dtype_name(act), backend=backend,
            has_bias=qlinear.bias is not None, max_abs_diff_ref=max_diff, max_err_ulps=err_ulps,
            weight_scale_dtype=dtype_name(qlinear.scale.dtype), tie_probe_tokens=probe.shape[0],
            probe_tie_codes=p_ties[0], probe_near_tie_codes=p_ties[1], token_tie_share_bound=token_tie_share,
        )
        if float_linear is not None:
            w = float_linear.weight.detach().cpu().double()
            report.update(float_metrics(y_int.double(), float_linear, x2.detach().cpu().double() @ w.T))
    return W8A8Report(**report, notes=notes)
