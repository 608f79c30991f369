"""Numerical checks of one quantized layer: does a backend compute what vllm-ascend expects?

:func:`check_linear` runs the layer's backend (``npu``, ``reference``, or one plugged in with
:func:`flatquant_lab.ops.register_backend`) op by op against the reference arithmetic of SPEC
sections 3-5. Each op gets the reference's own inputs, so a fault is pinned on the op that made it:
  ``scale``    per-token scales of ``npu_kronecker_quant``
  ``codes``    its int4 codes
  ``pack``     the words of ``npu_convert_weight_to_int4pack``
  ``product``  the integer product inside ``npu_quant_matmul``
  ``output``   ``npu_quant_matmul``'s fp32 epilogue and rounding, and the layer's forward
The report has one verdict, ``passed``, and names the first failing part, the token and both values.
For information only (outside the verdict) it also compares with the float layer (SQNR, cosine,
worst token) and checks the transform alone at full precision.
:func:`check_linear_w8a8` does the same for a W8A8_DYNAMIC layer (SPEC section 10), parts ``scale`` and
``codes`` (``npu_dynamic_quant``), ``product`` and ``output`` (int8 ``npu_quant_matmul``, the forward);
both return a :class:`CheckReport` (:class:`LinearReport`, :class:`W8A8Report`).
:func:`sweep_clip_ratio` tabulates SQNR against the float layer over activation clip ratios;
:func:`sweep_layer_clip_ratio` does the same for an existing layer (a loaded checkpoint), by default
against that layer with unquantized activations.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn

from . import ops
from .dtypes import dtype_name
from .kronecker import fold_weight, kron_apply
from .layers import W4A4FlatQuantLinear, W8A8DynamicLinear
from .packing import INT4_MAX, INT4_MIN, offset8_to_npu, pack_int4, unpack_int4
from .quantizers import INT8_QMAX, INT8_QMIN

PARTS = ("scale", "codes", "pack", "product", "output")
# fp32 rounding budget of the matmul epilogue: y = fl32(fl32(acc * s_w) * s_tok) (or s_w * s_tok
# first, SPEC section 5), two roundings of at most 2^-24 relative each; 2^-22 leaves a factor of two.
FP32_EPILOGUE_REL = 2.0**-22
# Tie window, in fp16 roundings of b (see check_linear), and the share of the codes inside it that
# may differ from the reference.
DEFAULT_TIE_ULPS = 1.0
DEFAULT_TIE_SHARE = 1.0 / 32
# With clip ratio 1 neither -8 nor the clip ratio itself shows in the codes: the check then also runs
# npu_kronecker_quant at this ratio (exact in binary).
PROBE_CLIP_RATIO = 0.875
DEFAULT_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)


def ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at ``|v|`` (float64): ``2^floor(log2|v|) * eps``, subnormal spacing near 0."""
    fi = torch.finfo(dtype)
    a = v.double().abs()
    _, e = torch.frexp(a)  # a = m * 2^e, m in [0.5, 1): floor(log2 a) = e - 1
    binade = torch.ldexp(torch.ones_like(a), (e - 1).to(torch.int64))
    binade = torch.where(a > 0, binade, torch.zeros_like(a)).clamp_min(fi.tiny)
    return binade * fi.eps


def _sqnr_db(signal: torch.Tensor, noise: torch.Tensor) -> float:
    """``10 log10(sum signal^2 / sum noise^2)``; +inf for zero noise."""
    s, n = float(signal.pow(2).sum()), float(noise.pow(2).sum())
    if n == 0.0:
        return math.inf
    if s == 0.0:
        return -math.inf
    return 10.0 * math.log10(s / n)


def _json_float(v):
    """``v`` made JSON-safe: a non-finite float becomes its string ("inf", "-inf", "nan"; JSON has no
    such numbers), lists and dicts are walked, anything else comes back unchanged."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _json_float(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_float(x) for x in v]
    return v


# ---------------------------------------------------------------------------------------- report
@dataclass
class PartCheck:
    """One part of the verdict: how many values were compared, how many disagree, the first that does."""

    part: str
    passed: bool
    compared: int = 0
    mismatches: int = 0
    token: int | None = None  # row of the first bad value (a token; a weight row for ``pack``)
    index: int | None = None  # its place in the row (code, packed word, output column)
    backend_value: float | None = None
    reference_value: float | None = None
    reason: str = ""  # one line, "" when the part passed


@dataclass(kw_only=True)
class CheckReport:
    """What a layer check found (:class:`LinearReport`, :class:`W8A8Report`); ``table()`` renders it,
    ``to_dict()`` is JSON-ready."""

    in_features: int
    out_features: int
    tokens: int
    act_dtype: str
    backend: str
    has_bias: bool
    passed: bool  # THE verdict: every part in ``parts`` passed
    failed_part: str | None  # the first failing part, in the check's part order
    reason: str  # why it failed, with where and both values ("" when passed)
    parts: list[PartCheck]
    # codes that differ from the reference by one step at a rounding tie (tolerated, bounded)
    tie_codes: int
    tie_code_share: float  # ... of all codes checked
    near_tie_codes: int  # codes within the tie window
    tie_share_bound: float  # at most this share of near_tie_codes may differ (at least one)
    tie_ulps: float
    # the layer's forward against the exact result of the backend's own codes and scales
    max_abs_diff_ref: float
    max_err_ulps: float  # |y - y_ref| / (ulp(z) [+ ulp(y_ref) with a bias]), output dtype: about 1/2
    # the quantized path vs the float layer (None without float_linear); not part of the verdict
    sqnr_db: float | None = None
    cosine: float | None = None
    rel_err: float | None = None
    max_abs_err: float | None = None
    worst_token: int | None = None
    worst_token_err: float | None = None  # ||y_int - y_fp|| of that token (L2)
    worst_token_rel_err: float | None = None
    notes: list[str] = field(default_factory=list)

    _path = "quantized path"  # how the table names what is compared with the float layer

    @property
    def bound_ok(self) -> bool:
        """The verdict under its older name (notebook 01 reads it): the same as ``passed``."""
        return self.passed

    def part(self, name: str) -> PartCheck:
        for p in self.parts:
            if p.part == name:
                return p
        raise ValueError(f"name: expected one of {', '.join(p.part for p in self.parts)}, got {name!r}")

    def to_dict(self) -> dict:
        return _json_float(asdict(self))

    def _layer_row(self) -> str:
        """The ``layer`` row of the table."""
        return f"{self.out_features} x {self.in_features}, {self.act_dtype}, bias {'yes' if self.has_bias else 'no'}"

    def _probe_rows(self) -> list[tuple[str, str]]:
        """Rows after the tie count: what else the ops were run on."""
        return []

    def _tail_rows(self) -> list[tuple[str, str]]:
        """Rows at the end of the table."""
        return []

    def table(self) -> str:
        verdict = "PASSED" if self.passed else f"FAILED ({self.failed_part}): {self.reason}"
        rows = [
            ("layer", self._layer_row()),
            ("tokens / backend", f"{self.tokens} / {self.backend}"),
            ("verdict", verdict),
            ("-- backend vs reference, op by op", ""),
        ]
        for p in self.parts:
            rows.append((f"  {p.part}", f"ok ({p.compared} compared)" if p.passed else
                         f"FAILED: {p.mismatches} of {p.compared} differ; {p.reason}"))
        rows += [
            ("codes differing at a tie", f"{self.tie_codes} ({self.tie_code_share:.3g} of all codes; "
             f"{self.near_tie_codes} codes near a tie, bound {self.tie_share_bound:.3g} of those)"),
            *self._probe_rows(),
            ("max |y - y_ref| (layer forward)", _fmt(self.max_abs_diff_ref)),
            ("max error in output ulps", _fmt(self.max_err_ulps, ".3f")),
            (f"-- {self._path} vs float layer (information)", ""),
            ("SQNR (dB)", _fmt(self.sqnr_db, ".2f")),
            ("cosine similarity", _fmt(self.cosine, ".6f")),
            ("relative error (Frobenius)", _fmt(self.rel_err)),
            ("max abs error", _fmt(self.max_abs_err)),
            ("worst token", "n/a" if self.worst_token is None else
             f"#{self.worst_token}: L2 error {self.worst_token_err:.4g} (relative {self.worst_token_rel_err:.4g})"),
            *self._tail_rows(),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" if v else k for k, v in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _fmt(v, spec=".4g") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


@dataclass(kw_only=True)
class LinearReport(CheckReport):
    """What :func:`check_linear` found (W4A4 FlatQuant): the shared fields, the Kronecker factors, the
    clip ratios probed and the transform's full-precision reconstruction."""

    n1: int
    n2: int
    clip_ratio: float
    probe_clip_ratios: list[float]  # clip ratios npu_kronecker_quant was checked at
    # transform reconstruction at full precision (None without float_linear)
    transform_rel_err: float | None = None
    transform_max_abs_err: float | None = None

    _path = "int4 path"

    def _layer_row(self) -> str:
        return (f"{self.out_features} x {self.in_features}, kron {self.n1} x {self.n2}, {self.act_dtype}, "
                f"clip_ratio {self.clip_ratio:.4g}, bias {'yes' if self.has_bias else 'no'}")

    def _probe_rows(self) -> list[tuple[str, str]]:
        return [("kronecker_quant clip ratios", ", ".join(f"{r:g}" for r in self.probe_clip_ratios))]

    def _tail_rows(self) -> list[tuple[str, str]]:
        return [("-- transform at full precision (float64)", ""),
                ("relative reconstruction error", _fmt(self.transform_rel_err)),
                ("max abs reconstruction error", _fmt(self.transform_max_abs_err))]


@dataclass(kw_only=True)
class W8A8Report(CheckReport):
    """What :func:`check_linear_w8a8` found (W8A8_DYNAMIC): the shared fields, the dtype of the weight
    scale the layer runs, and the probes the ops were also run on."""

    weight_scale_dtype: str  # the dtype the layer hands its (model-dtype rounded) weight scale to quant_matmul in
    tie_probe_tokens: int  # dynamic_quant also ran on these tokens, whose codes sit on exact ties
    # the tie counts split: on the probe (bound tie_share_bound) and on the layer's tokens (bound token_tie_share_bound)
    probe_tie_codes: int
    probe_near_tie_codes: int
    token_tie_share_bound: float

    _path = "int8 path"

    def _layer_row(self) -> str:
        return (f"{self.out_features} x {self.in_features}, W8A8_DYNAMIC, {self.act_dtype}, weight scale "
                f"{self.weight_scale_dtype}, bias {'yes' if self.has_bias else 'no'}")

    def _probe_rows(self) -> list[tuple[str, str]]:
        return [("  on the tie probe", f"{self.probe_tie_codes} of {self.probe_near_tie_codes} near a tie "
                 f"(bound {self.tie_share_bound:.3g}); {self.tie_probe_tokens} tokens, max|x| = 127 * 2^j"),
                ("  on the layer's tokens", f"{self.tie_codes - self.probe_tie_codes} of "
                 f"{self.near_tie_codes - self.probe_near_tie_codes} near a tie (bound {self.token_tie_share_bound:.3g})")]


@dataclass
class SweepRow:
    ratio: float
    sqnr_db: float
    rel_err: float


@dataclass
class SweepResult:
    """SQNR and relative error against a reference output per activation clip ratio."""

    rows: list[SweepRow]
    best_ratio: float  # the ratio with the highest SQNR (the first such on a tie)
    reference: str = "float layer"  # what the SQNR is measured against

    def to_dict(self) -> dict:
        return {"rows": [{k: _json_float(v) for k, v in asdict(r).items()} for r in self.rows],
                "best_ratio": self.best_ratio, "reference": self.reference}

    def table(self) -> str:
        lines = [f"against the {self.reference}:", f"{'clip_ratio':>10}  {'SQNR (dB)':>9}  {'rel err':>9}"]
        for r in self.rows:
            mark = "  <- best" if r.ratio == self.best_ratio else ""
            lines.append(f"{r.ratio:>10.4g}  {r.sqnr_db:>9.2f}  {r.rel_err:>9.4g}{mark}")
        return "\n".join(lines)

    __str__ = table


# ---------------------------------------------------------------------------------------- checks
def _check_inputs(qlinear, x, float_linear, name: str = "float_linear", layer_cls: type = W4A4FlatQuantLinear) -> None:
    if not isinstance(qlinear, layer_cls):
        hint = (" (a W8A8_DYNAMIC layer: use check_linear_w8a8)" if isinstance(qlinear, W8A8DynamicLinear)
                and layer_cls is W4A4FlatQuantLinear else "")
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
    # scales: equal up to one fp32 ulp (SPEC section 3: (m * c) / 7 in fp32, two roundings)
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
                             "offset-8 layout, not the NPU layout (SPEC section 4)")
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
            c.reason += "; they are the offset-8 layout (nibble v + 8), not the NPU layout (SPEC section 4)"
        checks.append(c)
    return _merge("pack", checks)


def _exact_acc(a: torch.Tensor, w: torch.Tensor, gemm_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``acc[i, j] = sum_k a[i, k] w[j, k]`` in float64, exact: an fp32 GEMM of int4 values is exact
    while |acc| <= 64 K < 2^24 (SPEC section 5); int8 values take a float64 GEMM (|acc| <= 2^14 K < 2^53)."""
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
    scale:   ``|s - s_ref| <= ulp_fp32(s_ref)`` per token, ``s_ref = (m c) / 7`` (SPEC section 3);
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
    ``a`` and ``b`` in fp32 in another order can differ from the reference in their last bit, SPEC
    section 3): ``mult`` times ``b``'s ulp, plus ``t``'s own fp16 rounding. Only a code inside that
    window may differ, only by one step, and only to the other side of the tie. Such codes are
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
        sqnr_db=_sqnr_db(y_fp, err),
        cosine=float(torch.nn.functional.cosine_similarity(y_int.flatten(), y_fp.flatten(), dim=0)),
        rel_err=float(err.norm()) / ref_norm if ref_norm > 0 else math.inf,
        max_abs_err=float(err.abs().max()), worst_token=worst, worst_token_err=float(tok_err[worst]),
        worst_token_rel_err=float(tok_err[worst]) / tok_norm if tok_norm > 0 else math.inf,
    )


# ---------------------------------------------------------------------------------------- int8 (W8A8_DYNAMIC)
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
    why = (_malformed(q_b, "dynamic_quant y", (t_count, k), torch.int8)
           or _malformed(s_b, "dynamic_quant scale", (t_count,), torch.float32))
    if why:
        fail = PartCheck("codes", False, reason=why + at)
        return PartCheck("scale", False, reason=why + at), fail, (0, 0, 0), tr, None, None
    q_b, s_b = q_b.cpu(), s_b.cpu()
    # scales: within one fp32 ulp (1 / mult and max * (1/127) differ by at most that, SPEC section 10); an
    # all-zero token's scale multiplies only zero codes, and SPEC leaves it open: any finite value >= 0
    scale = _compare_scales(s_b, tr.scale, at, free=(x_cpu == 0).all(dim=1))
    # codes: equal, or one step across a tie that a last-bit difference in mult moves t over
    t = tr.t.double()
    window = tie_ulps * (x_cpu.double().abs() * ulp(tr.mult, torch.float32)[:, None]
                         + ulp(torch.floor(t) + 0.5, torch.float32))
    codes, n_flip, n_near = _compare_codes(q_b.to(torch.int16), tr.q.to(torch.int16), t, window,
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
        acc = _exact_acc(a, w, torch.float64)
        unit = _unit_scale(acc)
        scale = torch.full((w.shape[0],), unit, dtype=torch.float32, device=device)
        ones = torch.ones(a.shape[0], dtype=torch.float32, device=device)
        y = ops.quant_matmul(a.to(device), w.t().contiguous().to(device), scale, pertoken_scale=ones,
                             output_dtype=torch.float16, backend=backend)
        why = _malformed(y, f"quant_matmul int8 ({label})", (a.shape[0], w.shape[0]), torch.float16)
        if why:
            return PartCheck("product", False, reason=why)
        checks.append(_compare_unit_product(f"int8, {label}", y.cpu(), acc, unit))
    return _merge("product", checks)


def _check_output_int8(qlinear, x_act, tr, q_b, s_b, backend: str):
    """The int8 epilogue and the forward: ``(PartCheck, the layer's output, max |y - y_ref|, max error in ulps)``.

    The epilogue runs on the reference's codes and scales twice: with the layer's weight scale and bias,
    and with a float32 weight scale of full mantissa (what the op must use as given) and a bias (the
    layer's, else a probe one), so a scale narrowed to fp16 or a bias added after the rounding shows.
    """
    act = qlinear.act_dtype
    device = qlinear.weight_t.device
    o = qlinear.out_features
    acc_ref = _exact_acc(tr.q, qlinear.weight_int.cpu(), torch.float64)
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
        why = _malformed(y, f"quant_matmul int8 ({label})", tuple(z.shape), act)
        if why:
            checks.append(PartCheck("output", False, reason=why))
            break
        lo, hi = _interval(z, act, b)
        bad = _outside(y.cpu(), lo, hi)
        if not bool(bad.any()):
            checks.append(PartCheck("output", True, bad.numel()))
            continue
        c = _first_bad("output", bad, y.cpu(), z if b is None else z + b.double(), "outputs")
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
        return _merge("output", checks), y_layer, math.nan, math.nan
    z = _exact_acc(q_b, qlinear.weight_int.cpu(), torch.float64) * s_run.double()[None, :] * s_b.double()[:, None]
    y_ref = z if bias is None else z + bias.double()
    lo, hi = _interval(z, act, bias)
    diff = (y_layer.double() - y_ref).abs()
    checks.append(_check_forward(y_layer, lo, hi, y_ref, act))
    # one rounding of z + bias (in fp32) to the output dtype: about half an ulp
    return _merge("output", checks), y_layer, float(diff.max()), float((diff / ulp(y_ref, act)).max())


def check_linear_w8a8(qlinear: W8A8DynamicLinear, x: torch.Tensor, float_linear: nn.Linear | None = None,
                      tie_ulps: float = DEFAULT_TIE_ULPS, tie_share: float = DEFAULT_TIE_SHARE,
                      token_tie_share: float = DEFAULT_TOKEN_TIE_SHARE_INT8) -> W8A8Report:
    """Check a W8A8_DYNAMIC layer's backend op by op against the reference on tokens ``x[..., K]``; one verdict.

    ``x`` is first rounded to the layer's model dtype. The backend runs each op on the reference's
    inputs; the parts (SPEC section 10), each of which must hold (``passed``):
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

    The scale tolerance. ``1 / fl32(127 / m)`` and ``fl32(m fl32(1/127))`` (both in use, SPEC section 10)
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
    tie_ulps, tie_share, backend, x2, x_act = _prepare(qlinear, x, float_linear, W8A8DynamicLinear,
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
        parts = [_merge("scale", [scale, p_scale]), _merge("codes", [codes, p_codes]),
                 _check_product_int8(qlinear, tr.q, backend)]
        output, y_int, max_diff, err_ulps = _check_output_int8(qlinear, x_act, tr, q_b, s_b, backend)
        parts.append(output)
        report = _report_fields(parts, [a + b for a, b in zip(ties, p_ties)], notes, tie_share, tie_ulps)
        report.update(
            in_features=k, out_features=o, tokens=x_act.shape[0], act_dtype=dtype_name(act), backend=backend,
            has_bias=qlinear.bias is not None, max_abs_diff_ref=max_diff, max_err_ulps=err_ulps,
            weight_scale_dtype=dtype_name(qlinear.scale.dtype), tie_probe_tokens=probe.shape[0],
            probe_tie_codes=p_ties[0], probe_near_tie_codes=p_ties[1], token_tie_share_bound=token_tie_share,
        )
        if float_linear is not None:
            w = float_linear.weight.detach().cpu().double()
            report.update(_float_metrics(y_int.double(), float_linear, x2.detach().cpu().double() @ w.T))
    return W8A8Report(**report, notes=notes)


def sweep_clip_ratio(float_linear: nn.Linear, left: torch.Tensor, right: torch.Tensor, x: torch.Tensor,
                     ratios: Sequence[float] = DEFAULT_RATIOS, act_dtype: torch.dtype | None = None,
                     backend: str | None = None, weight_clip: torch.Tensor | None = None) -> SweepResult:
    """Per ratio ``c``: SQNR and relative error of ``W4A4(c)(x)`` against ``float_linear(x)`` (float64).

    The layer is folded and quantized once (RTN weights, on ``x``'s device); only the activation
    clip ratio changes between rows. To sweep a layer that already exists (a loaded checkpoint,
    GPTQ weights), use :func:`sweep_layer_clip_ratio`.
    """
    if not isinstance(float_linear, nn.Linear):
        raise ValueError(f"float_linear: expected an nn.Linear, got {type(float_linear).__name__}")
    ratios = _check_ratios(ratios)
    qlin = W4A4FlatQuantLinear.from_float(float_linear, left, right, clip_ratio=ratios[0],
                                          weight_clip=weight_clip, act_dtype=act_dtype, backend=backend)
    k = qlin.in_features
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != k or x.numel() == 0:
        raise ValueError(f"x: expected a non-empty tensor [..., {k}], got {getattr(x, 'shape', x)}")
    return sweep_layer_clip_ratio(qlin.to(x.device), x, ratios, reference=float_linear)


def _check_ratios(ratios: Sequence[float]) -> list[float]:
    ratios = list(ratios)
    if not ratios:
        raise ValueError("ratios: expected at least one clip ratio in (0, 1], got none")
    for r in ratios:
        try:
            ops.check_clip_ratio(r)
        except ValueError as exc:
            raise ValueError(f"ratios: {exc}") from None
    return ratios


def sweep_layer_clip_ratio(qlinear: W4A4FlatQuantLinear, x: torch.Tensor,
                           ratios: Sequence[float] = DEFAULT_RATIOS,
                           reference: nn.Linear | torch.Tensor | None = None) -> SweepResult:
    """Per ratio ``c``: SQNR and relative error of an existing layer's ``W4A4(c)(x)`` against a reference.

    ``reference``: ``None`` is the layer itself with unquantized activations,
    ``y = kron_apply(x, L, R) @ W_hat^T + bias`` in float64 (its own int4 weights, whatever made them:
    RTN, GPTQ, weight clipping), so the curve is exactly the activation-quantization error that
    ``clip_ratio`` trades; an ``nn.Linear`` is its float output on ``x``; a tensor ``[..., O]`` is taken
    as the output itself. The layer runs on its own device and backend, and keeps the clip ratio it had.
    """
    _check_inputs(qlinear, x, reference if isinstance(reference, nn.Module) else None, name="reference")
    ratios = _check_ratios(ratios)
    k, o = qlinear.in_features, qlinear.out_features
    x2 = x.detach().reshape(-1, k)
    x_act = x2.to(qlinear.act_dtype)
    with torch.no_grad():
        if reference is None:
            # Start from what the layer sees: x rounded to its act dtype, and the transforms it runs
            # (p1 = L^T, p2 = R in the act dtype), which need not be the stored ones.
            lt, rt = qlinear.p1.t().cpu().double(), qlinear.p2.cpu().double()
            y_ref = kron_apply(x_act.cpu().double(), lt, rt) @ qlinear.dequantized_weight(torch.float64).cpu().T
            if qlinear.bias is not None:
                y_ref = y_ref + qlinear.bias.detach().cpu().double()
            label = "layer with unquantized activations"
        elif isinstance(reference, nn.Linear):
            y_ref = x2.cpu().double() @ reference.weight.detach().cpu().double().T
            if reference.bias is not None:
                y_ref = y_ref + reference.bias.detach().cpu().double()
            label = "float layer"
        elif isinstance(reference, torch.Tensor):
            if reference.shape[-1] != o or reference.numel() != x2.shape[0] * o:
                raise ValueError(f"reference: expected an output of shape [{x2.shape[0]}, {o}] (one row per token "
                                 f"of x), got {tuple(reference.shape)}")
            y_ref = reference.detach().reshape(-1, o).cpu().double()
            label = "given output"
        else:
            raise ValueError(f"reference: expected None, an nn.Linear or a tensor, got {type(reference).__name__}")
        ref_norm = float(y_ref.norm())
        kept = qlinear.clip_ratio.detach().clone()
        rows = []
        try:
            for r in ratios:
                qlinear.set_clip_ratio(r)
                err = qlinear(x_act).cpu().double() - y_ref
                rows.append(SweepRow(ratio=float(r), sqnr_db=_sqnr_db(y_ref, err),
                                     rel_err=float(err.norm()) / ref_norm if ref_norm > 0 else math.inf))
        finally:
            qlinear.clip_ratio.copy_(kept)
    best = max(rows, key=lambda row: row.sqnr_db)  # max() keeps the first of equal keys
    return SweepResult(rows=rows, best_ratio=best.ratio, reference=label)


# ---------------------------------------------------------------------------------------- problems
def random_problem(in_features: int, out_features: int, tokens: int, outlier_channels: int = 8,
                   outlier_scale: float = 20.0, bias: bool = False, seed: int = 0):
    """A float ``nn.Linear`` and tokens ``x[T, K]`` (fp32) with ``outlier_channels`` channels x ``outlier_scale``."""
    if outlier_channels > in_features:
        raise ValueError(f"outlier_channels: expected at most in_features = {in_features}, got {outlier_channels}")
    if not math.isfinite(outlier_scale) or outlier_scale <= 0:
        raise ValueError(f"outlier_scale: expected a finite float > 0, got {outlier_scale}")
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_features, in_features, generator=g) / math.sqrt(in_features))
        if bias:
            lin.bias.copy_(0.1 * torch.randn(out_features, generator=g))
    x = torch.randn(tokens, in_features, generator=g)
    channels = torch.randperm(in_features, generator=g)[:outlier_channels]
    x[:, channels] *= outlier_scale
    return lin, x
