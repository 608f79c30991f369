"""The W4A4 check, op by op (``check_linear``), and the comparisons the int8 check shares with it."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..dtypes import dtype_name
from ..kronecker import fold_weight, kron_apply
from ..layers import W4A4FlatQuantLinear
from ..packing import INT4_MAX, INT4_MIN, offset8_to_npu, pack_int4, unpack_int4
from ..schemes import scheme_of
from .report import (DEFAULT_TIE_SHARE, DEFAULT_TIE_ULPS, FP32_EPILOGUE_REL, PROBE_CLIP_RATIO, LinearReport,
                     PartCheck, sqnr_db_of, ulp)

def _fitting_check(qlinear, layer_cls: type) -> str:
    """A hint naming the check that fits ``qlinear``'s scheme when it is not ``layer_cls``'s, else ``""``."""
    from .dispatch import LAYER_CHECKS  # it imports this module

    scheme = scheme_of(qlinear)
    check = LAYER_CHECKS.get(scheme.quant_type) if scheme is not None else None
    if check is None or scheme.layer_cls is layer_cls:
        return ""
    return f" (a {scheme.quant_type} layer: use {check.__name__})"


def _check_inputs(qlinear, x, float_linear, name: str = "float_linear", layer_cls: type = W4A4FlatQuantLinear) -> None:
    if not isinstance(qlinear, layer_cls):
        hint = _fitting_check(qlinear, layer_cls)
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


def _malformed(t, what: str, shape: tuple, dtype: torch.dtype) -> str | None:
    """Why ``t`` is not a ``dtype`` tensor of ``shape`` (``None`` when it is)."""
    if not isinstance(t, torch.Tensor):
        return f"{what}: expected a {dtype_name(dtype)} tensor {list(shape)}, got {type(t).__name__}"
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        return f"{what}: expected {dtype_name(dtype)} {list(shape)}, got {dtype_name(t.dtype)} {list(t.shape)}"
    return None


def _first_bad(part: str, bad: torch.Tensor, got: torch.Tensor, want: torch.Tensor, what: str) -> PartCheck:
    """A failed :class:`PartCheck` for the first True of ``bad[rows, cols]``."""
    row, col = divmod(int(bad.flatten().nonzero()[0]), bad.shape[1])
    g, w = float(got[row, col]), float(want[row, col])
    n = int(bad.sum())
    reason = (f"{n} {what} in {int(bad.any(dim=1).sum())} of {bad.shape[0]} rows differ; first at row {row}, "
              f"position {col}: backend {g:.9g}, reference {w:.9g}")
    return PartCheck(part, False, bad.numel(), n, row, col, g, w, reason)


def _merge(part: str, checks: list[PartCheck]) -> PartCheck:
    """One :class:`PartCheck` from several runs of a part: the first failure, else the counts summed."""
    for c in checks:
        if not c.passed:
            return c
    return PartCheck(part, True, sum(c.compared for c in checks))


def _kronecker_quant(qlinear, x_act: torch.Tensor, c: float, backend: str):
    """The backend's ``(out, scale)`` for tokens ``x_act[T, K]``, in the layer's chunks; or why malformed."""
    x3 = x_act.view(-1, qlinear.n1, qlinear.n2)
    outs, scales = [], []
    for start in range(0, x3.shape[0], qlinear.chunk_tokens):
        chunk = x3[start:start + qlinear.chunk_tokens]
        out, s = ops.kronecker_quant(chunk, qlinear.p1, qlinear.p2, clip_ratio=c, backend=backend)
        t = chunk.shape[0]
        why = (_malformed(out, "kronecker_quant out", (t, qlinear.n1, qlinear.n2 // 8), torch.int32)
               or _malformed(s, "kronecker_quant quant_scale", (t,), torch.float32))
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
    scale = _compare_scales(s_b, tr.scale, at)
    # codes: equal, or one step across a tie the device may see from the other side
    q_b = unpack_int4(out).reshape(t_count, k).to(torch.int16)
    q_ref = tr.q.to(torch.int16)
    t = tr.t.double()
    window = tie_ulps * (tr.mult.double()[:, None] * ulp(tr.b, torch.float16)
                         + ulp(torch.floor(t) + 0.5, torch.float16))
    codes, n_flip, n_near = _compare_codes(q_b, q_ref, t, window, (INT4_MIN, INT4_MAX), tie_share, "int4", at)
    if not codes.passed and "away from a rounding tie" in codes.reason:
        if float((_from_offset8(q_b) == q_ref).double().mean()) > 0.99:
            codes.reason += ("; read as the offset-8 layout (nibble v + 8) they match: the backend packs in the "
                             "offset-8 layout, not the NPU layout (docs/ascend-ops.md, 'int4 packing')")
    return scale, codes, (n_flip, n_near, q_ref.numel()), tr, q_b, s_b


def _compare_scales(s_b: torch.Tensor, s_ref: torch.Tensor, at: str, free: torch.Tensor | None = None) -> PartCheck:
    """Per-token scales: ``|s_b - s_ref| <= ulp_fp32(s_ref)``; a token in ``free`` takes any finite scale >= 0."""
    t_count = s_ref.shape[0]
    ok = (s_b.double() - s_ref.double()).abs() <= ulp(s_ref, torch.float32)  # a NaN is not ok
    if free is not None:
        ok = ok | (free & torch.isfinite(s_b) & (s_b >= 0))
    bad = ~ok
    if not bool(bad.any()):
        return PartCheck("scale", True, t_count)
    c = _first_bad("scale", bad[:, None], s_b[:, None], s_ref[:, None], "per-token scales")
    ratio = c.backend_value / c.reference_value if c.reference_value else math.nan
    c.reason = (f"{c.mismatches} of {t_count} per-token scales differ from the reference by more than one fp32 ulp; "
                f"first at token {c.token}: backend {c.backend_value:.9g}, reference {c.reference_value:.9g} "
                f"(ratio {ratio:.9g})" + at)
    return c


def _compare_codes(q_b, q_ref, t, window, qrange: tuple, tie_share: float, bits: str, at: str):
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
        codes = _first_bad("codes", bad, q_b, q_ref, f"{bits} codes")
        codes.reason = (f"{codes.mismatches} {bits} codes in {int(bad.any(dim=1).sum())} of {t_count} tokens differ "
                        f"from the reference away from a rounding tie; first at token {codes.token}, code "
                        f"{codes.index}: backend {codes.backend_value:g}, reference {codes.reference_value:g} "
                        f"(reference value before rounding {float(t[codes.token, codes.index]):.6g})" + at)
    elif n_flip > allowed:
        codes = _first_bad("codes", flip, q_b, q_ref, f"{bits} codes")
        codes.reason = (f"{n_flip} {bits} codes differ by one step at a rounding tie, {n_flip / n_near:.1%} of the "
                        f"{n_near} codes within the tie window (at most {allowed} allowed): a systematic rounding "
                        f"difference (a tie rule other than half to even, another intermediate precision); first at "
                        f"token {codes.token}, code {codes.index}: backend {codes.backend_value:g}, reference "
                        f"{codes.reference_value:g} (reference value before rounding "
                        f"{float(t[codes.token, codes.index]):.6g})" + at)
    else:
        codes = PartCheck("codes", True, q_ref.numel())
    return codes, n_flip, n_near


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
        why = _malformed(got, f"convert_weight_to_int4pack ({label})", tuple(want.shape), torch.int32)
        if why:
            return PartCheck("pack", False, reason=why)
        got = got.cpu()
        bad = got != want
        if not bool(bad.any()):
            checks.append(PartCheck("pack", True, want.numel()))
            continue
        c = _first_bad("pack", bad, got, want, "packed words")
        g, wv = int(got[c.token, c.index]) & 0xFFFFFFFF, int(want[c.token, c.index]) & 0xFFFFFFFF
        c.reason = (f"convert_weight_to_int4pack ({label}): {c.mismatches} of {want.numel()} packed words differ; "
                    f"first at row {c.token}, word {c.index}: backend 0x{g:08x}, reference 0x{wv:08x}")
        if torch.equal(offset8_to_npu(got), want):
            c.reason += ("; they are the offset-8 layout (nibble v + 8), not the NPU layout "
                         "(docs/ascend-ops.md, 'int4 packing')")
        checks.append(c)
    return _merge("pack", checks)


def _exact_acc(a: torch.Tensor, w: torch.Tensor, gemm_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``acc[i, j] = sum_k a[i, k] w[j, k]`` in float64, exact: an fp32 GEMM of int4 values is exact
    while |acc| <= 64 K < 2^24 (docs/ascend-ops.md, 'npu_quant_matmul'); int8 values take a float64 GEMM
    (|acc| <= 2^14 K < 2^53)."""
    return (a.to(gemm_dtype) @ w.to(gemm_dtype).T).double()


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
        acc = _exact_acc(a, w)
        unit = _unit_scale(acc)
        scale = torch.full((w.shape[0],), unit, dtype=torch.float32, device=device)
        ones = torch.ones(a.shape[0], dtype=torch.float32, device=device)
        y = ops.quant_matmul(pack_int4(a).to(device), x2, scale, pertoken_scale=ones, output_dtype=torch.float16,
                             backend=backend)
        why = _malformed(y, f"quant_matmul ({label})", (a.shape[0], w.shape[0]), torch.float16)
        if why:
            return PartCheck("product", False, reason=why)
        checks.append(_compare_unit_product(label, y.cpu(), acc, unit))
    return _merge("product", checks)


def _unit_scale(acc: torch.Tensor) -> float:
    """A power of two ``2^-s`` with ``|acc| 2^-s <= 2^15`` (below fp16's max); exact as a scale."""
    top = float(acc.abs().max())
    return 2.0**-(max(0, math.ceil(math.log2(top)) - 15) if top > 0 else 0)


def _compare_unit_product(label: str, y: torch.Tensor, acc: torch.Tensor, unit: float) -> PartCheck:
    """``y == round_fp16(fl32(acc) * unit)``: the product at unit scales (fp32 holds ``acc`` up to 2^24)."""
    want = (acc.float() * unit).half()  # the int32 -> fp32 conversion, an exact scaling, one rounding to fp16
    bad = ~(y == want)
    if not bool(bad.any()):
        return PartCheck("product", True, want.numel())
    c = _first_bad("product", bad, y.double() / unit, want.double() / unit, "integer products")
    c.reason = (f"quant_matmul ({label}, unit scales): {c.mismatches} of {want.numel()} integer products differ "
                f"from the exact int32 sum; first at row {c.token}, column {c.index}: backend "
                f"{c.backend_value:.9g}, reference {c.reference_value:.9g} (the exact sum "
                f"{float(acc[c.token, c.index]):.0f} rounded to fp16)")
    return c


def _interval(z: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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


def _outside(y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return ~((y.double() >= lo.double()) & (y.double() <= hi.double()))  # a NaN is outside


def _check_output(qlinear, x_act, q_ref, s_ref, q_b, s_b, backend: str):
    """The epilogue and the forward: ``(PartCheck, the layer's output, max |y - y_ref|, max error in ulps)``."""
    act = qlinear.act_dtype
    device = qlinear.weight_packed.device
    w = qlinear.weight_int.cpu()
    s_w = qlinear.weight_scale.view(-1).cpu().double()
    # (1) quant_matmul on the reference's codes and scales: its fp32 epilogue and cast
    z = _exact_acc(q_ref, w) * s_w[None, :] * s_ref.double()[:, None]
    y = ops.quant_matmul(pack_int4(q_ref).to(device), qlinear.weight_packed.t(), qlinear.weight_scale.view(-1),
                         pertoken_scale=s_ref.to(device), output_dtype=act, backend=backend)
    why = _malformed(y, "quant_matmul", tuple(z.shape), act)
    y_layer = qlinear(x_act).cpu()
    if why:
        return PartCheck("output", False, reason=why), y_layer, math.nan, math.nan
    lo, hi = _interval(z, act)
    bad = _outside(y.cpu(), lo, hi)
    checks = [PartCheck("output", True, bad.numel())]
    if bool(bad.any()):
        c = _first_bad("output", bad, y.cpu(), z, "outputs")
        c.reason = (f"quant_matmul on the reference's codes and scales: {c.mismatches} of {bad.numel()} outputs lie "
                    f"outside one {dtype_name(act)} rounding of the exact result; first at token {c.token}, column "
                    f"{c.index}: backend {c.backend_value:.6g}, reference {c.reference_value:.6g} "
                    f"(allowed [{float(lo[c.token, c.index]):.6g}, {float(hi[c.token, c.index]):.6g}])")
        checks = [c]
    # (2) the layer's forward against the exact result of the backend's own codes and scales
    if q_b is None:
        checks.append(PartCheck("output", False, reason="the layer forward cannot be checked: kronecker_quant's "
                                "output is malformed"))
        return _merge("output", checks), y_layer, math.nan, math.nan
    z = _exact_acc(q_b, w) * s_w[None, :] * s_b.double()[:, None]
    lo, hi = _interval(z, act)
    y_ref, budget = z, ulp(z, act)  # in output ulps: one rounding of z, and one more of z + bias
    if qlinear.bias is not None:
        bias = qlinear.bias.cpu()
        lo, hi = lo + bias, hi + bias  # the layer adds the bias in the output dtype; rounding is monotone
        y_ref = z + bias.double()
        budget = budget + ulp(y_ref, act)
    diff = (y_layer.double() - y_ref).abs()
    checks.append(_check_forward(y_layer, lo, hi, y_ref, act))
    return _merge("output", checks), y_layer, float(diff.max()), float((diff / budget).max())


def _check_forward(y_layer: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, y_ref: torch.Tensor,
                   act: torch.dtype) -> PartCheck:
    """The layer's forward ``y_layer`` inside ``[lo, hi]``, the roundings of the exact result ``y_ref`` of
    the backend's own codes and scales."""
    bad = _outside(y_layer, lo, hi)
    if not bool(bad.any()):
        return PartCheck("output", True, bad.numel())
    c = _first_bad("output", bad, y_layer, y_ref, "outputs")
    c.reason = (f"the layer's forward: {c.mismatches} of {bad.numel()} outputs lie outside one {dtype_name(act)} "
                f"rounding of the exact result of the backend's own codes and scales; first at token {c.token}, "
                f"column {c.index}: backend {c.backend_value:.6g}, reference {c.reference_value:.6g}")
    return c


def _prepare(qlinear, x, float_linear, layer_cls: type, weight_attr: str, tie_ulps, tie_share):
    """Validated inputs: ``(tie_ulps, tie_share, backend, x as [T, K], x in the act dtype on the weight's device)``."""
    _check_inputs(qlinear, x, float_linear, layer_cls=layer_cls)
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


def _report_fields(parts: list[PartCheck], ties, notes: list[str], tie_share: float, tie_ulps: float) -> dict:
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
    tie_ulps, tie_share, backend, x2, x_act = _prepare(qlinear, x, float_linear, W4A4FlatQuantLinear,
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
        parts = [_merge("scale", scales), _merge("codes", codes), _check_pack(qlinear, backend),
                 _check_product(qlinear, tr.q, backend)]
        output, y_int, max_diff, err_ulps = _check_output(qlinear, x_act, tr.q, tr.scale, q_b, s_b, backend)
        parts.append(output)
        report = _report_fields(parts, ties, notes, tie_share, tie_ulps)
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
    out = _float_metrics(y_int, float_linear, y_plain)
    # the transform alone: exact algebra, so only float64 rounding remains
    lt, rt = qlinear.left_trans.cpu().double(), qlinear.right_trans.cpu().double()
    y_tr = kron_apply(xf, lt, rt) @ fold_weight(w, lt, rt).T
    plain_norm = float(y_plain.norm())
    out.update(transform_rel_err=float((y_tr - y_plain).norm()) / plain_norm if plain_norm > 0 else 0.0,
               transform_max_abs_err=float((y_tr - y_plain).abs().max()))
    return out


def _float_metrics(y_int: torch.Tensor, float_linear: nn.Linear, y_plain: torch.Tensor) -> dict:
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
