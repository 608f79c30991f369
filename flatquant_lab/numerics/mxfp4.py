"""The W4A4_MXFP4_FLATQUANT check, op by op (``check_linear_mxfp4``), docs/mxfp4.md.

Parts, in order (each must hold):
  ``scale``    E8M0 scales of the FP4 ``kronecker_quant``, on the layer's tokens and on a probe
  ``codes``    its E2M1 codes (compared as values, so -0 equals 0), on the same tokens
  ``product``  the MX ``quant_matmul`` on the reference's codes and scales, and on a probe of random ones
  ``output``   the layer's forward against the reference matmul of the backend's own codes and scales
  ``ranks``    at ``tp_size > 1``: each rank's transform block quantizes exactly its slice of the whole token

The probe runs ``kronecker_quant`` with identity factors on values exact in the activation dtype, so its
products carry no accumulation-order freedom and every code and scale must match exactly: groups sitting on
every E2M1 rounding tie (half to even against half away from zero), groups whose maximum lies between 6 and 8
times the scale (saturation; msModelSlim's 8/7 exponent rule raises their exponent), an all-zero group, and, in
bfloat16, a group below 2^-125 (the E8M0 clamp at code 0). On the layer's tokens the device's fp32 products may
differ from the emulation in the last bit of ``b``; a code may then move one grid step across a rounding tie, and
a group's exponent by one where its maximum sits at a power of two. Those are tolerated, counted and bounded
(``tie_share`` of the codes near a tie, at least one), everything else must match.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..dtypes import dtype_name
from ..layers import W4A4MXFP4FlatQuantLinear
from ..mxfp4 import E2M1_GRID, GROUP, MxOptions, e2m1_values, pack_fp4, unpack_fp4
from ..ops import reference
from .compare import check_inputs, first_bad, float_metrics, merge_checks
from .report import DEFAULT_TIE_SHARE, CheckReport, PartCheck, ulp

PARTS_MXFP4 = ("scale", "codes", "product", "output", "ranks")
_MIDPOINTS = torch.tensor([(a + b) / 2 for a, b in zip(E2M1_GRID, E2M1_GRID[1:])], dtype=torch.float64)
_MX = dict(x1_dtype=ops.FLOAT4_E2M1_X2, x2_dtype=ops.FLOAT4_E2M1_X2, pertoken_scale_dtype=ops.FLOAT8_E8M0,
           scale_dtype=ops.FLOAT8_E8M0, group_sizes=list(ops.MX_GROUP_SIZES))


@dataclass(kw_only=True)
class MxReport(CheckReport):
    """What :func:`check_linear_mxfp4` found: the shared fields, the factor sizes and the probe's size."""

    n1: int
    n2: int
    tp_size: int
    max_supported_tp: int
    probe_groups: int

    _path = "MXFP4 path"

    def _layer_row(self) -> str:
        return (f"{self.out_features} x {self.in_features}, W4A4_MXFP4_FLATQUANT, kron {self.n1} x {self.n2}, "
                f"tp {self.tp_size} of at most {self.max_supported_tp}, {self.act_dtype}, "
                f"bias {'yes' if self.has_bias else 'no'}")

    def _probe_rows(self) -> list[tuple[str, str]]:
        return [("kronecker_quant probe", f"{self.probe_groups} groups of {GROUP} (ties, saturation, zero, small)")]


def _probe_groups(dtype: torch.dtype) -> torch.Tensor:
    """Groups ``[G, 32]`` in ``dtype`` whose codes and scales leave a backend no freedom (see the module doc)."""
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    rows = []
    for j, sign in ((0, 1.0), (-3, -1.0), (4, 1.0)):
        s = 2.0**j
        tie_row = [6.0, *ties, *(-t for t in ties), 0.5, 1.0, 3.0, -4.0]
        sat_row = [7.5, 6.5, 7.0, -7.5, -6.5, 5.5, 0.0, 1.5]
        for vals in (tie_row, sat_row):
            g = torch.zeros(GROUP, dtype=torch.float64)
            g[:len(vals)] = torch.tensor(vals, dtype=torch.float64) * s * sign
            g[len(vals):] = torch.linspace(-1.0, 1.0, GROUP - len(vals), dtype=torch.float64).round() * s
            rows.append(g)
    rows.append(torch.zeros(GROUP, dtype=torch.float64))  # all zero: code 0
    if dtype == torch.bfloat16:  # below 2^-125: the exponent clamps at code 0 (bfloat16 holds these exactly)
        small = torch.zeros(GROUP, dtype=torch.float64)
        small[:4] = torch.tensor([2.0**-126, -(2.0**-127), 2.0**-128, 1.5 * 2.0**-126], dtype=torch.float64)
        rows.append(small)
    return torch.stack(rows).to(dtype)


def _probe_tokens(n1: int, n2: int, dtype: torch.dtype) -> torch.Tensor:
    """The probe groups laid out as tokens ``[T, n1, n2]`` (the last token padded by repeating them)."""
    groups = _probe_groups(dtype)
    per = n1 * n2 // GROUP
    t = -(-groups.shape[0] // per)
    idx = torch.arange(t * per) % groups.shape[0]
    return groups[idx].reshape(t, n1, n2)


def _near_midpoint(ratio: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Whether ``|ratio|`` lies within ``window`` of an E2M1 rounding midpoint."""
    d = (ratio.abs().unsqueeze(-1) - _MIDPOINTS).abs().amin(dim=-1)
    return d <= window


def _compare_mx(b_ref: torch.Tensor, codes_ref: torch.Tensor, scales_ref: torch.Tensor, codes_b: torch.Tensor,
                scales_b: torch.Tensor, exact: bool, tie_share: float, what: str):
    """``(scale PartCheck, codes PartCheck, (tolerated, near a tie, codes))`` for ``[T, K]`` codes and ``[T, K/32]``
    scales; ``b_ref`` the reference's bfloat16 values before the division by the scale."""
    t, k = codes_ref.shape
    s_b, s_r = scales_b.to(torch.int32), scales_ref.to(torch.int32)
    v_b, v_r = e2m1_values(codes_b).double(), e2m1_values(codes_ref).double()
    bs = b_ref.double().reshape(t, -1, GROUP)
    amax = bs.abs().amax(dim=-1)
    if exact:
        free_groups = torch.zeros_like(s_r, dtype=torch.bool)
        near = torch.zeros(t, k, dtype=torch.bool)
    else:
        # a last-bit difference in b moves a group maximum at (or one bf16 step below) a power of two across it
        at_power = (amax > 0) & ((torch.frexp(amax)[0] == 0.5) | (torch.frexp(amax + ulp(amax, torch.bfloat16))[0] == 0.5))
        free_groups = at_power & ((s_b - s_r).abs() == 1)
        ratio = bs / torch.ldexp(torch.ones_like(amax), (s_r - 127).double()).unsqueeze(-1)
        near = _near_midpoint(ratio, 2 * ulp(ratio, torch.bfloat16)).reshape(t, k)
    bad_scale = (s_b != s_r) & ~free_groups
    scale = (first_bad("scale", bad_scale, s_b, s_r, f"E8M0 scales ({what})") if bool(bad_scale.any())
             else PartCheck("scale", True, s_r.numel()))
    skip = free_groups.repeat_interleave(GROUP, dim=1)
    diff = (v_b != v_r) & ~skip
    grid = torch.tensor(E2M1_GRID, dtype=torch.float64)
    step_b = torch.searchsorted(grid, v_b.abs().contiguous())
    step_r = torch.searchsorted(grid, v_r.abs().contiguous())
    same_sign = torch.sign(v_b) * torch.sign(v_r) >= 0
    one_step = ((step_b - step_r).abs() == 1) & same_sign
    tolerated = diff & near & one_step & (s_b == s_r).repeat_interleave(GROUP, dim=1)
    n_tol, n_near = int(tolerated.sum()), int(near.sum())
    allowed = 0 if exact else max(1, int(tie_share * n_near))
    bad = diff & ~tolerated
    if bool(bad.any()):
        codes = first_bad("codes", bad, v_b, v_r, f"E2M1 values ({what})")
    elif n_tol > allowed:
        codes = PartCheck("codes", False, v_r.numel(), n_tol, reason=(
            f"{n_tol} codes ({what}) differ by one step at a rounding tie, more than the bound {allowed} "
            f"({tie_share:.3g} of the {n_near} codes near a tie)"))
    else:
        codes = PartCheck("codes", True, v_r.numel())
    return scale, codes, (n_tol + int(free_groups.sum()) * GROUP, n_near, v_r.numel())


def _kq(x3: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, c: float, backend: str):
    """The backend's FP4 ``kronecker_quant``: ``(codes [T, K] uint8, scales [T, K/32])``, or a reason string."""
    t, n1, n2 = x3.shape
    try:
        out, s = ops.kronecker_quant(x3, p1, p2, clip_ratio=c, dst_dtype=ops.FLOAT4_E2M1_X2, backend=backend)
    except Exception as exc:  # a backend that fails on valid input: the verdict names it
        return f"kronecker_quant raised {type(exc).__name__}: {exc}"
    if (not isinstance(out, torch.Tensor) or tuple(out.shape) != (t, n1, n2 // 2) or out.dtype != torch.uint8
            or not isinstance(s, torch.Tensor) or tuple(s.shape) != (t, n1 * n2 // GROUP) or s.dtype != torch.uint8):
        return (f"kronecker_quant: expected uint8 [{t}, {n1}, {n2 // 2}] and uint8 [{t}, {n1 * n2 // GROUP}], got "
                f"{getattr(out, 'dtype', out)} {list(getattr(out, 'shape', []))} and {getattr(s, 'dtype', s)} "
                f"{list(getattr(s, 'shape', []))}")
    return unpack_fp4(out.cpu().reshape(t, -1)), s.cpu()


def _rank_slices(qlinear):
    """Per rank: ``(columns, p1, weight bytes, weight scales)`` as the layer's ranks hold them."""
    tp, k = qlinear.tp_size, qlinear.in_features // qlinear.tp_size
    if tp == 1:
        return [(slice(0, k), qlinear.p1, qlinear.weight, qlinear.weight_scale)]
    return [(slice(r * k, (r + 1) * k), qlinear.p1_ranks[r], qlinear.weight[:, r * k // 2:(r + 1) * k // 2].contiguous(),
             qlinear.weight_scale[:, r * k // GROUP:(r + 1) * k // GROUP].contiguous()) for r in range(tp)]


def _output_close(y: torch.Tensor, want: torch.Tensor, ulps: float, what: str, part: str) -> PartCheck:
    """``|y - want| <= ulps * ulp(want)`` in the output dtype, element by element."""
    yd, wd = y.double().cpu(), want.double().cpu()
    bad = ~(((yd - wd).abs() <= ulps * ulp(wd, y.dtype)) | (yd == wd))
    if bool(bad.any()):
        return first_bad(part, bad, yd, wd, what)
    return PartCheck(part, True, y.numel())


def check_linear_mxfp4(qlinear: W4A4MXFP4FlatQuantLinear, x: torch.Tensor, float_linear: nn.Linear | None = None,
                       tie_share: float = DEFAULT_TIE_SHARE, options: MxOptions | None = None) -> MxReport:
    """Check the layer's backend op by op against the reference (``options``: another reading of the assumed
    points, default the SPEC's) on tokens ``x[..., K]``; one verdict (see the module doc for the parts)."""
    check_inputs(qlinear, x, float_linear, layer_cls=W4A4MXFP4FlatQuantLinear)
    tie_share = float(tie_share)
    if not 0.0 <= tie_share <= 1.0:
        raise ValueError(f"tie_share: expected a float in [0, 1], got {tie_share}")
    opts = options or MxOptions()
    backend = ops.resolve_backend(qlinear.backend, qlinear.weight)
    act, dev = qlinear.act_dtype, qlinear.weight.device
    x2 = x.reshape(-1, qlinear.in_features)
    x_act = x2.to(device=dev, dtype=act).contiguous()
    c = float(qlinear.clip_ratio.item())
    t = x_act.shape[0]
    notes: list[str] = []
    ranks = _rank_slices(qlinear)
    n1r = qlinear.n1 // qlinear.tp_size
    with torch.no_grad():
        scales, codes, ties, own = [], [], [0, 0, 0], []
        # the probe: identity factors, exact values
        probe = _probe_tokens(n1r, qlinear.n2, act)
        eye1, eye2 = torch.eye(n1r, dtype=act, device=dev), torch.eye(qlinear.n2, dtype=act, device=dev)
        tr = reference.kronecker_quant_mx_trace(probe.cpu(), eye1.cpu(), eye2.cpu(), c, opts)
        got = _kq(probe.to(dev), eye1, eye2, c, backend)
        if isinstance(got, str):
            scales.append(PartCheck("scale", False, reason=got))
        else:
            sc, co, _ = _compare_mx(tr.b, tr.codes, tr.scales, got[0], got[1], True, tie_share, "probe")
            scales.append(sc)
            codes.append(co)
        # the layer's tokens, rank by rank with the rank's block
        for cols, p1, _, _ in ranks:
            xr = x_act[:, cols].contiguous().view(t, n1r, qlinear.n2)
            tr = reference.kronecker_quant_mx_trace(xr.cpu(), p1.cpu(), qlinear.p2.cpu(), c, opts)
            got = _kq(xr, p1, qlinear.p2, c, backend)
            if isinstance(got, str):
                scales.append(PartCheck("scale", False, reason=got))
                own.append(None)
                continue
            sc, co, counts = _compare_mx(tr.b, tr.codes, tr.scales, got[0], got[1], False, tie_share, "layer tokens")
            scales.append(sc)
            codes.append(co)
            ties = [a + b for a, b in zip(ties, counts)]
            own.append((tr, got))
        parts = [merge_checks("scale", scales), merge_checks("codes", codes) if codes else PartCheck("codes", False, reason=(
            "no codes to compare: kronecker_quant failed"))]
        parts.append(_check_product(qlinear, ranks, own, backend, opts))
        output, y_layer, max_diff = _check_output(qlinear, x_act, ranks, own, backend)
        parts.append(output)
        parts.append(_check_ranks(qlinear, x_act, c, opts, tie_share))
    failed = next((p for p in parts if not p.passed), None)
    if ties[0]:
        notes.append(f"{ties[0]} code(s) differ from the reference at a rounding tie or in a group whose maximum "
                     "sits at a power of two")
    report = dict(
        in_features=qlinear.in_features, out_features=qlinear.out_features, tokens=t, act_dtype=dtype_name(act),
        backend=backend, has_bias=qlinear.bias is not None, passed=failed is None,
        failed_part=failed.part if failed else None, reason=failed.reason if failed else "", parts=parts,
        tie_codes=ties[0], tie_code_share=ties[0] / ties[2] if ties[2] else 0.0, near_tie_codes=ties[1],
        tie_share_bound=tie_share, tie_ulps=2.0, max_abs_diff_ref=max_diff, max_err_ulps=float("nan"),
        n1=qlinear.n1, n2=qlinear.n2, tp_size=qlinear.tp_size, max_supported_tp=qlinear.max_supported_tp,
        probe_groups=_probe_groups(act).shape[0],
    )
    if float_linear is not None and y_layer is not None:
        w = float_linear.weight.detach().cpu().double()
        report.update(float_metrics(y_layer.double().cpu(), float_linear, x2.detach().cpu().double() @ w.T))
    return MxReport(**report, notes=notes)


def _matmul(xq_codes, s_tok, w, ws, act, backend):
    return ops.quant_matmul(pack_fp4(xq_codes).to(w.device), w.t(), ws, pertoken_scale=s_tok.to(w.device),
                            output_dtype=act, backend=backend, **_MX)


def _check_product(qlinear, ranks, own, backend: str, opts: MxOptions) -> PartCheck:
    """The MX matmul of the backend on the reference's codes and scales, and on a probe, against the reference."""
    act = qlinear.act_dtype
    checks = []
    g = torch.Generator().manual_seed(0)
    for (cols, _, w, ws), item in zip(ranks, own):
        if item is None:
            continue
        tr = item[0]
        try:
            y = _matmul(tr.codes, tr.scales, w, ws, act, backend)
        except Exception as exc:
            return PartCheck("product", False, reason=f"quant_matmul raised {type(exc).__name__}: {exc}")
        want = _matmul(tr.codes, tr.scales, w.cpu(), ws.cpu(), act, "reference")
        checks.append(_output_close(y, want, 1.0, "outputs (reference codes and scales)", "product"))
    # the probe: every code in both operands, scales spread over 2^-9 .. 2^1 (within fp16 range for any k here)
    k = ranks[0][2].shape[1] * 2
    a = torch.randint(0, 16, (8, k), generator=g, dtype=torch.uint8)
    sa = torch.randint(118, 129, (8, k // GROUP), generator=g, dtype=torch.uint8)
    wq = torch.randint(0, 16, (6, k), generator=g, dtype=torch.uint8)
    wp = pack_fp4(wq).to(qlinear.weight.device)
    sw = torch.randint(118, 128, (6, k // GROUP), generator=g, dtype=torch.uint8).to(qlinear.weight.device)
    try:
        y = _matmul(a, sa, wp, sw, act, backend)
    except Exception as exc:
        return PartCheck("product", False, reason=f"quant_matmul raised {type(exc).__name__}: {exc}")
    want = _matmul(a, sa, wp.cpu(), sw.cpu(), act, "reference")
    checks.append(_output_close(y, want, 1.0, "outputs (probe codes and scales)", "product"))
    return merge_checks("product", checks)


def _check_output(qlinear, x_act, ranks, own, backend: str):
    """The layer's forward on its backend against the reference matmul of the backend's own codes and scales
    (rank by rank, bias on rank 0 in the output dtype, fp32 sum rounded once): ``(PartCheck, y, max |diff|)``."""
    act = qlinear.act_dtype
    if any(item is None for item in own):
        return PartCheck("output", False, reason="kronecker_quant failed; no forward to compare"), None, float("nan")
    try:
        y = qlinear(x_act)
    except Exception as exc:
        return PartCheck("output", False, reason=f"the forward raised {type(exc).__name__}: {exc}"), None, float("nan")
    total = None
    for r, ((_, _, w, ws), (_, (codes_b, s_b))) in enumerate(zip(ranks, own)):
        yr = _matmul(codes_b, s_b, w.cpu(), ws.cpu(), act, "reference")
        if r == 0 and qlinear.bias is not None:
            yr = yr + qlinear.bias.cpu()
        total = yr.float() if total is None else total + yr.float()
    want = total.to(act)
    diff = float((y.double().cpu() - want.double()).abs().max()) if y.numel() else 0.0
    ulps = 1.0 + qlinear.tp_size  # the backend's matmul may be one ulp off per rank, plus the bias and the sum
    return _output_close(y, want, ulps, "outputs of the layer's forward", "output"), y, diff


def _check_ranks(qlinear, x_act, c: float, opts: MxOptions, tie_share: float) -> PartCheck:
    """At ``tp_size > 1``: the ranks' blocks quantize each token exactly as the whole transform does (the
    reference on both sides), so ``left_trans`` is block-diagonal and each rank holds its own block."""
    tp = qlinear.tp_size
    if tp == 1:
        return PartCheck("ranks", True, 0)
    t = x_act.shape[0]
    whole_p1 = qlinear.left_trans.detach().transpose(0, 1).contiguous().to(qlinear.act_dtype).cpu()
    whole = reference.kronecker_quant_mx_trace(x_act.cpu().view(t, qlinear.n1, qlinear.n2), whole_p1,
                                               qlinear.p2.cpu(), c, opts)
    parts = [reference.kronecker_quant_mx_trace(x_act[:, cols].cpu().contiguous().view(t, qlinear.n1 // tp, qlinear.n2),
                                                p1.cpu(), qlinear.p2.cpu(), c, opts)
             for cols, p1, _, _ in _rank_slices(qlinear)]
    codes = torch.cat([p.codes for p in parts], dim=1)
    scales = torch.cat([p.scales for p in parts], dim=1)
    sc, co, _ = _compare_mx(whole.b, whole.codes, whole.scales, codes, scales, False, tie_share,
                            "ranks against the whole transform")
    for p in (sc, co):
        if not p.passed:
            return PartCheck("ranks", False, p.compared, p.mismatches, p.token, p.index, p.backend_value,
                             p.reference_value, p.reason + " (is left_trans block-diagonal, and does each rank "
                             "hold its own diagonal block?)")
    return PartCheck("ranks", True, co.compared)
