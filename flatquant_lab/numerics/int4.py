"""The W4A4 check, op by op (``check_linear``); the comparisons it shares with the int8 check are in compare.py."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..dtypes import dtype_name
from ..kronecker import fold_weight, kron_apply
from ..layers import W4A4FlatQuantLinear
from ..packing import INT4_MAX, INT4_MIN, offset8_to_npu, pack_int4, unpack_int4
from .compare import (check_forward, compare_codes, compare_scales, compare_unit_product, exact_acc, first_bad,
                      float_metrics, malformed, merge_checks, output_interval, outside, prepare_check, report_fields,
                      unit_scale)
from .report import DEFAULT_TIE_SHARE, DEFAULT_TIE_ULPS, PROBE_CLIP_RATIO, LinearReport, PartCheck, ulp


def _kronecker_quant(qlinear, x_act: torch.Tensor, c: float, backend: str):
    """The backend's ``(out, scale)`` for tokens ``x_act[T, K]``, in the layer's chunks; or why malformed."""
    x3 = x_act.view(-1, qlinear.n1, qlinear.n2)
    outs, scales = [], []
    for start in range(0, x3.shape[0], qlinear.chunk_tokens):
        chunk = x3[start:start + qlinear.chunk_tokens]
        out, s = ops.kronecker_quant(chunk, qlinear.p1, qlinear.p2, clip_ratio=c, backend=backend)
        t = chunk.shape[0]
        why = (malformed(out, "kronecker_quant out", (t, qlinear.n1, qlinear.n2 // 8), torch.int32)
               or malformed(s, "kronecker_quant quant_scale", (t,), torch.float32))
        if why:
            return None, None, why
        outs.append(out.cpu())
        scales.append(s.cpu())
    return torch.cat(outs), torch.cat(scales), None


def _from_offset8(v: torch.Tensor) -> torch.Tensor:
    """Values as stored by the offset-8 packer (nibble ``v + 8``) and read in the NPU layout, undone."""
    return torch.where(v >= 0, v - 8, v + 8)


def _check_kronecker(qlinear, x_act, c: float, backend: str, tie_ulps: float, tie_share: float):
    """``(scale, codes, (tie flips, codes near a tie, codes), reference trace, backend codes [T, K], scales [T])``."""
    t_count, k = x_act.shape
    at = f" (clip_ratio {c:g})"
    tr = ops.kronecker_quant_trace(x_act.cpu().view(-1, qlinear.n1, qlinear.n2), qlinear.p1.cpu(),
                                   qlinear.p2.cpu(), c)
    out, s_b, why = _kronecker_quant(qlinear, x_act, c, backend)
    if why:
        fail = PartCheck("codes", False, reason=why + at)
        return PartCheck("scale", False, reason=why + at), fail, (0, 0, 0), tr, None, None
    # scales: equal up to one fp32 ulp ((m * c) / 7 in fp32, two roundings: docs/ascend-ops.md)
    scale = compare_scales(s_b, tr.scale, at)
    # codes: equal, or one step across a tie the device may see from the other side
    q_b = unpack_int4(out).reshape(t_count, k).to(torch.int16)
    q_ref = tr.q.to(torch.int16)
    t = tr.t.double()
    window = tie_ulps * (tr.mult.double()[:, None] * ulp(tr.b, torch.float16)
                         + ulp(torch.floor(t) + 0.5, torch.float16))
    codes, n_flip, n_near = compare_codes(q_b, q_ref, t, window, (INT4_MIN, INT4_MAX), tie_share, "int4", at)
    if not codes.passed and "away from a rounding tie" in codes.reason:
        if float((_from_offset8(q_b) == q_ref).double().mean()) > 0.99:
            codes.reason += ("; read as the offset-8 layout (nibble v + 8) they match: the backend packs in the "
                             "offset-8 layout, not the NPU layout (docs/ascend-ops.md, 'int4 packing')")
    return scale, codes, (n_flip, n_near, q_ref.numel()), tr, q_b, s_b


def _pack_probe() -> torch.Tensor:
    """int32 ``[16, 16]``: every int4 value at every nibble position of a word."""
    r = torch.arange(16).view(-1, 1) + torch.arange(16).view(1, -1)
    return (r % 16 - 8).to(torch.int32)


def _check_pack(qlinear, backend: str) -> PartCheck:
    checks = []
    device = qlinear.weight_packed.device
    for label, w in (("layer weight", qlinear.weight_int.cpu().to(torch.int32)), ("all-values probe", _pack_probe())):
        got = ops.convert_weight_to_int4pack(w.to(device), backend=backend)
        want = pack_int4(w)
        why = malformed(got, f"convert_weight_to_int4pack ({label})", tuple(want.shape), torch.int32)
        if why:
            return PartCheck("pack", False, reason=why)
        got = got.cpu()
        bad = got != want
        if not bool(bad.any()):
            checks.append(PartCheck("pack", True, want.numel()))
            continue
        c = first_bad("pack", bad, got, want, "packed words")
        g, wv = int(got[c.token, c.index]) & 0xFFFFFFFF, int(want[c.token, c.index]) & 0xFFFFFFFF
        c.reason = (f"convert_weight_to_int4pack ({label}): {c.mismatches} of {want.numel()} packed words differ; "
                    f"first at row {c.token}, word {c.index}: backend 0x{g:08x}, reference 0x{wv:08x}")
        if torch.equal(offset8_to_npu(got), want):
            c.reason += ("; they are the offset-8 layout (nibble v + 8), not the NPU layout "
                         "(docs/ascend-ops.md, 'int4 packing')")
        checks.append(c)
    return merge_checks("pack", checks)


def _check_product(qlinear, q_ref: torch.Tensor, backend: str) -> PartCheck:
    """``quant_matmul`` with scales that round nothing: its fp16 output must be ``round_fp16(acc * 2^-s)``.

    Run on the reference's codes and the layer's weights, and on a probe whose partial sums are large
    and odd (4 rows of codes in [5, 7], 4 random), where any accumulator narrower than int32 rounds.
    """
    g = torch.Generator().manual_seed(0)
    k = qlinear.in_features
    probe_a = torch.cat([torch.randint(5, 8, (4, k), generator=g), torch.randint(-8, 8, (4, k), generator=g)])
    probe_w = torch.cat([torch.randint(5, 8, (8, k), generator=g), torch.randint(-8, 8, (8, k), generator=g)])
    device = qlinear.weight_packed.device
    checks = []
    for label, a, w, x2 in (("layer", q_ref, qlinear.weight_int.cpu(), qlinear.weight_packed.t()),
                            ("probe", probe_a, probe_w, pack_int4(probe_w).to(device).t())):
        acc = exact_acc(a, w)
        unit = unit_scale(acc)
        scale = torch.full((w.shape[0],), unit, dtype=torch.float32, device=device)
        ones = torch.ones(a.shape[0], dtype=torch.float32, device=device)
        y = ops.quant_matmul(pack_int4(a).to(device), x2, scale, pertoken_scale=ones, output_dtype=torch.float16,
                             backend=backend)
        why = malformed(y, f"quant_matmul ({label})", (a.shape[0], w.shape[0]), torch.float16)
        if why:
            return PartCheck("product", False, reason=why)
        checks.append(compare_unit_product(label, y.cpu(), acc, unit))
    return merge_checks("product", checks)


def _check_output(qlinear, x_act, q_ref, s_ref, q_b, s_b, backend: str):
    """The epilogue and the forward: ``(PartCheck, the layer's output, max |y - y_ref|, max error in ulps)``."""
    act = qlinear.act_dtype
    device = qlinear.weight_packed.device
    w = qlinear.weight_int.cpu()
    s_w = qlinear.weight_scale.view(-1).cpu().double()
    # (1) quant_matmul on the reference's codes and scales: its fp32 epilogue and cast
    z = exact_acc(q_ref, w) * s_w[None, :] * s_ref.double()[:, None]
    y = ops.quant_matmul(pack_int4(q_ref).to(device), qlinear.weight_packed.t(), qlinear.weight_scale.view(-1),
                         pertoken_scale=s_ref.to(device), output_dtype=act, backend=backend)
    why = malformed(y, "quant_matmul", tuple(z.shape), act)
    y_layer = qlinear(x_act).cpu()
    if why:
        return PartCheck("output", False, reason=why), y_layer, math.nan, math.nan
    lo, hi = output_interval(z, act)
    bad = outside(y.cpu(), lo, hi)
    checks = [PartCheck("output", True, bad.numel())]
    if bool(bad.any()):
        c = first_bad("output", bad, y.cpu(), z, "outputs")
        c.reason = (f"quant_matmul on the reference's codes and scales: {c.mismatches} of {bad.numel()} outputs lie "
                    f"outside one {dtype_name(act)} rounding of the exact result; first at token {c.token}, column "
                    f"{c.index}: backend {c.backend_value:.6g}, reference {c.reference_value:.6g} "
                    f"(allowed [{float(lo[c.token, c.index]):.6g}, {float(hi[c.token, c.index]):.6g}])")
        checks = [c]
    # (2) the layer's forward against the exact result of the backend's own codes and scales
    if q_b is None:
        checks.append(PartCheck("output", False, reason="the layer forward cannot be checked: kronecker_quant's "
                                "output is malformed"))
        return merge_checks("output", checks), y_layer, math.nan, math.nan
    z = exact_acc(q_b, w) * s_w[None, :] * s_b.double()[:, None]
    lo, hi = output_interval(z, act)
    y_ref, budget = z, ulp(z, act)  # in output ulps: one rounding of z, and one more of z + bias
    if qlinear.bias is not None:
        bias = qlinear.bias.cpu()
        lo, hi = lo + bias, hi + bias  # the layer adds the bias in the output dtype; rounding is monotone
        y_ref = z + bias.double()
        budget = budget + ulp(y_ref, act)
    diff = (y_layer.double() - y_ref).abs()
    checks.append(check_forward(y_layer, lo, hi, y_ref, act))
    return merge_checks("output", checks), y_layer, float(diff.max()), float((diff / budget).max())


def check_linear(qlinear: W4A4FlatQuantLinear, x: torch.Tensor, float_linear: nn.Linear | None = None,
                 tie_ulps: float = DEFAULT_TIE_ULPS, tie_share: float = DEFAULT_TIE_SHARE) -> LinearReport:
    """Check the layer's backend op by op against the reference on tokens ``x[..., K]``; one verdict.

    ``x`` is first rounded to the layer's activation dtype (the op's input). The backend runs each op
    on the reference's inputs; the parts, each of which must hold (``passed``):
    scale:   ``|s - s_ref| <= ulp_fp32(s_ref)`` per token, ``s_ref = (m c) / 7`` (docs/ascend-ops.md);
    codes:   ``q == q_ref``, except one step across a tie: ``|t - h| <= w``, ``t = round_fp16(b mult)``,
             ``h`` the nearest half-integer, ``w = tie_ulps (mult ulp_fp16(b) + ulp_fp16(h))``;
    pack:    ``convert_weight_to_int4pack(W) == pack_npu(W)`` word for word (layer weight, all 16 values);
    product: ``quant_matmul(q, W, 2^-s, 1) == round_fp16(acc 2^-s)``, ``acc = sum_k q w`` exact in int32;
    output:  ``round(z (1 - 2^-22)) <= y <= round(z (1 + 2^-22))``, ``z = acc s_w s_tok`` exact, for
             quant_matmul on the reference's codes and scales and for the layer's forward on its own
             (plus the bias, added in the output dtype).
    With clip ratio 1, ``npu_kronecker_quant`` is also checked at ``PROBE_CLIP_RATIO`` (0.875): at 1
    neither the clip ratio nor the code -8 shows.

    The tie allowance. ``w`` is how far ``t`` moves when ``b`` moves by one fp16 ulp (a device summing
    ``a`` and ``b`` in fp32 in another order can differ from the reference in their last bit,
    docs/ascend-ops.md, 'npu_kronecker_quant'): ``mult`` times ``b``'s ulp, plus ``t``'s own fp16
    rounding. Only a code inside that window may differ, only by one step, and only to the other side of the tie. Such codes are
    counted (``tie_codes``, ``tie_code_share`` of all codes) and bounded: at most ``tie_share`` (1/32)
    of the ``near_tie_codes`` inside the window, and at least one (none with ``tie_share=0``).
    Why the bound is safe: every code outside the window must match exactly, so no error larger than
    one step, or away from a tie, is ever excused; a legitimate last-bit difference flips a window
    code only when that ``b`` itself flips, in the right direction (float64 and permuted-order fp32
    accumulation of ``a`` and ``b`` flipped at most 1 of the 4,200-4,600 window codes of a 1M-code
    run, 0.02%), whereas a systematic fault flips a fixed fraction of them (half away from zero flips
    every exact tie with an even floor: 11-19% of window codes measured). 1/32 sits 3.5 times below
    the latter and over 100 times above the former. A scale that differs by more than one fp32 ulp
    fails outright: ``m = max|b|`` would have to differ, and no such token was seen in those runs.
    """
    tie_ulps, tie_share, backend, x2, x_act = prepare_check(qlinear, x, float_linear, W4A4FlatQuantLinear,
                                                       "weight_packed", tie_ulps, tie_share)
    act = qlinear.act_dtype
    k, o = qlinear.in_features, qlinear.out_features
    t = x_act.shape[0]
    c = float(qlinear.clip_ratio.item())
    ratios = [c] + ([PROBE_CLIP_RATIO] if c == 1.0 else [])
    notes: list[str] = []

    with torch.no_grad():
        scales, codes, ties, own = [], [], [0, 0, 0], None
        for r in ratios:
            sc, co, counts, tr, q_b, s_b = _check_kronecker(qlinear, x_act, r, backend, tie_ulps, tie_share)
            scales.append(sc)
            codes.append(co)
            ties = [a + b for a, b in zip(ties, counts)]
            if own is None:
                own = (tr, q_b, s_b)  # at the layer's own ratio: what its forward uses
        tr, q_b, s_b = own
        parts = [merge_checks("scale", scales), merge_checks("codes", codes), _check_pack(qlinear, backend),
                 _check_product(qlinear, tr.q, backend)]
        output, y_int, max_diff, err_ulps = _check_output(qlinear, x_act, tr.q, tr.scale, q_b, s_b, backend)
        parts.append(output)
        report = report_fields(parts, ties, notes, tie_share, tie_ulps)
        report.update(
            in_features=k, out_features=o, tokens=t, n1=qlinear.n1, n2=qlinear.n2, act_dtype=dtype_name(act),
            clip_ratio=c, backend=backend, has_bias=qlinear.bias is not None, probe_clip_ratios=ratios,
            max_abs_diff_ref=max_diff, max_err_ulps=err_ulps,
        )
        if float_linear is not None:
            report.update(_float_comparison(qlinear, x2, y_int.double(), float_linear))
    return LinearReport(**report, notes=notes)


def _float_comparison(qlinear, x2, y_int, float_linear) -> dict:
    """Against the float layer (SQNR, cosine, worst token) and the transform alone in float64."""
    w = float_linear.weight.detach().cpu().double()
    xf = x2.detach().cpu().double()
    y_plain = xf @ w.T
    out = float_metrics(y_int, float_linear, y_plain)
    # the transform alone: exact algebra, so only float64 rounding remains
    lt, rt = qlinear.left_trans.cpu().double(), qlinear.right_trans.cpu().double()
    y_tr = kron_apply(xf, lt, rt) @ fold_weight(w, lt, rt).T
    plain_norm = float(y_plain.norm())
    out.update(transform_rel_err=float((y_tr - y_plain).norm()) / plain_norm if plain_norm > 0 else 0.0,
               transform_max_abs_err=float((y_tr - y_plain).abs().max()))
    return out


