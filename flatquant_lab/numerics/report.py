"""The check reports (one verdict, the failing part and where), the sweep results, and the checks' constants."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch


PARTS = ("scale", "codes", "pack", "product", "output")
# fp32 rounding budget of the matmul epilogue: y = fl32(fl32(acc * s_w) * s_tok) (or s_w * s_tok
# first, docs/ascend-ops.md), two roundings of at most 2^-24 relative each; 2^-22 leaves a factor of two.
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


def sqnr_db_of(signal: torch.Tensor, noise: torch.Tensor) -> float:
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


class PartsReport:
    """What every check's report shares: its ``parts`` by name and a JSON-ready dict."""

    parts: list[PartCheck]

    def part(self, name: str) -> PartCheck:
        for p in self.parts:
            if p.part == name:
                return p
        raise ValueError(f"name: expected one of {', '.join(p.part for p in self.parts)}, got {name!r}")

    def to_dict(self) -> dict:
        return _json_float(asdict(self))


@dataclass(kw_only=True)
class CheckReport(PartsReport):
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
    if v is None or (isinstance(v, float) and math.isnan(v)):  # nan: not measured for this scheme
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
