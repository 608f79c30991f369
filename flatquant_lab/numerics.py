"""Numerical checks of one W4A4 FlatQuant layer, and the ``flatquant-lab check`` subcommand.

:func:`check_linear` compares the int4 path ``qlinear(x)`` with
(a) the dequantized reference: ``y_ref = Q(b) @ W_hat^T + bias`` in float64, where
    ``b = round_fp16(p1 @ round_act(X @ p2))`` per token, ``Q`` the per-token int4 fake quantization
    with the op's own scales (:func:`quantizers.quant_act_reference`), ``W_hat = q_w * s_w``;
(b) the float layer: ``y_fp = x @ W^T + bias`` (SQNR, cosine, relative error, worst token);
(c) the transform alone, at full precision: ``kron_apply(x, L, R) @ fold_weight(W, L, R)^T`` vs
    ``x @ W^T`` in float64.
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
from .layers import W4A4FlatQuantLinear
from .packing import unpack_int4
from .quantizers import quant_act_reference

# fp32 rounding budget of the matmul epilogue: y = fl32(fl32(acc * s_w) * s_tok), two roundings of
# at most 2^-24 relative each; 2^-22 leaves a factor of two to spare.
FP32_EPILOGUE_REL = 2.0**-22
# A mismatched int4 activation counts as "at a rounding tie" when the reference's scaled value
# b * mult lies within this distance of a half-integer (one step is 1.0). The op accumulates in
# fp32, the reference in float64, so a and b can differ in their last bit; near a tie that moves q
# by one step. See SPEC section 3.
DEFAULT_TIE_TOL = 2.0**-4
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
    such numbers), anything else comes back unchanged."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


# ---------------------------------------------------------------------------------------- report
@dataclass
class LinearReport:
    """What :func:`check_linear` found; ``table()`` renders it, ``to_dict()`` is JSON-ready."""

    in_features: int
    out_features: int
    tokens: int
    n1: int
    n2: int
    act_dtype: str
    clip_ratio: float
    backend: str
    has_bias: bool
    # (a) int4 path vs the dequantized reference
    bound_ok: bool
    max_abs_diff_ref: float
    # The next three are maxima over clean tokens (int4 activations and scale equal the op's);
    # None when no token is clean.
    max_err_ulps: float | None  # |y_int - y_ref| / (ulp(z) [+ ulp(y_ref) with bias]): about 1/2
    max_bound_ratio: float | None  # |y_int - y_ref| / bound: <= 1 when the bound holds
    max_violation: float | None  # |y_int - y_ref| - bound: <= 0 when the bound holds
    bound_violations: int  # elements over the bound, anywhere
    bound_violations_clean: int  # ... in tokens whose int4 activations and scale match the op's
    act_mismatches: int  # int4 activation values that differ between op and reference
    act_mismatch_tokens: int
    scale_mismatch_tokens: int
    act_tie_distance_max: float | None  # max distance of a mismatch from a half-integer (in steps)
    tie_tol: float
    # (b) int4 path vs the float layer (None without float_linear)
    sqnr_db: float | None = None
    cosine: float | None = None
    rel_err: float | None = None
    max_abs_err: float | None = None
    worst_token: int | None = None
    worst_token_err: float | None = None  # ||y_int - y_fp|| of that token (L2)
    worst_token_rel_err: float | None = None
    # (c) transform reconstruction at full precision (None without float_linear)
    transform_rel_err: float | None = None
    transform_max_abs_err: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: _json_float(v) for k, v in asdict(self).items()}

    def table(self) -> str:
        def fmt(v, spec=".4g"):
            if v is None:
                return "n/a"
            if isinstance(v, bool):
                return "yes" if v else "NO"
            if isinstance(v, float):
                return format(v, spec)
            return str(v)

        rows = [
            ("layer", f"{self.out_features} x {self.in_features}, kron {self.n1} x {self.n2}, "
                      f"{self.act_dtype}, clip_ratio {self.clip_ratio:.4g}, bias {'yes' if self.has_bias else 'no'}"),
            ("tokens / backend", f"{self.tokens} / {self.backend}"),
            ("-- int4 path vs dequantized reference", ""),
            ("bound holds", fmt(self.bound_ok)),
            ("max |y_int - y_ref|", fmt(self.max_abs_diff_ref)),
            ("max error in output ulps (clean tokens)", fmt(self.max_err_ulps, ".3f")),
            ("max error / bound (clean tokens)", fmt(self.max_bound_ratio, ".3f")),
            ("max excess over bound (clean tokens)", fmt(self.max_violation)),
            ("elements over bound (all / clean tokens)", f"{self.bound_violations} / {self.bound_violations_clean}"),
            ("int4 activations that differ", f"{self.act_mismatches} in {self.act_mismatch_tokens} token(s)"),
            ("tokens whose scale differs", str(self.scale_mismatch_tokens)),
            ("max tie distance of a mismatch", f"{fmt(self.act_tie_distance_max, '.3g')} (tolerance {self.tie_tol:.3g})"),
            ("-- int4 path vs float layer", ""),
            ("SQNR (dB)", fmt(self.sqnr_db, ".2f")),
            ("cosine similarity", fmt(self.cosine, ".6f")),
            ("relative error (Frobenius)", fmt(self.rel_err)),
            ("max abs error", fmt(self.max_abs_err)),
            ("worst token", "n/a" if self.worst_token is None else
             f"#{self.worst_token}: L2 error {self.worst_token_err:.4g} (relative {self.worst_token_rel_err:.4g})"),
            ("-- transform at full precision (float64)", ""),
            ("relative reconstruction error", fmt(self.transform_rel_err)),
            ("max abs reconstruction error", fmt(self.transform_max_abs_err)),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" if v else k for k, v in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = table


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
def _check_inputs(qlinear, x, float_linear, name: str = "float_linear") -> None:
    if not isinstance(qlinear, W4A4FlatQuantLinear):
        raise ValueError(f"qlinear: expected a W4A4FlatQuantLinear, got {type(qlinear).__name__}")
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


def _op_activations(qlinear: W4A4FlatQuantLinear, x_act: torch.Tensor):
    """The op's own int4 activations ``[T, K]`` and scales ``[T]``, chunked as the layer does."""
    qs, ss = [], []
    x3 = x_act.view(-1, qlinear.n1, qlinear.n2)
    c = float(qlinear.clip_ratio.item())
    for start in range(0, x3.shape[0], qlinear.chunk_tokens):
        xq, s = ops.kronecker_quant(x3[start:start + qlinear.chunk_tokens], qlinear.p1, qlinear.p2,
                                    clip_ratio=c, backend=qlinear.backend)
        qs.append(unpack_int4(xq.cpu()).reshape(xq.shape[0], -1))
        ss.append(s.cpu())
    return torch.cat(qs).double(), torch.cat(ss)


def reference_activations(qlinear: W4A4FlatQuantLinear, x_act: torch.Tensor):
    """Reference ``b`` (fp16 values in float64), int4 ``q`` and scales for tokens ``x_act[T, K]``.

    ``a = round_act(X @ p2)``, ``b = round_fp16(p1 @ a)``, products in float64 (SPEC section 3).
    """
    act = qlinear.act_dtype
    x3 = x_act.cpu().double().view(-1, qlinear.n1, qlinear.n2)
    p1, p2 = qlinear.p1.cpu().double(), qlinear.p2.cpu().double()
    # (torch casts float64 to a half type through float32: a second rounding that can only matter
    # at a tie, where the op's own fp32 accumulation is no closer)
    a = (x3 @ p2).to(act).double()
    b = (p1 @ a).to(torch.float16).double().reshape(x3.shape[0], -1)
    q, scale = quant_act_reference(b, float(qlinear.clip_ratio.item()))
    return b, q.double(), scale


def check_linear(qlinear: W4A4FlatQuantLinear, x: torch.Tensor, float_linear: nn.Linear | None = None,
                 tie_tol: float = DEFAULT_TIE_TOL) -> LinearReport:
    """Check ``qlinear(x)`` against the dequantized reference, the float layer and the exact transform.

    ``x[..., K]`` is first rounded to the layer's activation dtype (the op's input). The reference is
    ``y_ref = z + bias``, ``z = (q_ref * s_tok) @ W_hat^T`` in float64, and per element, with ``ulp``
    the output dtype's spacing at ``|.|`` (subnormals included), the bound is
    ``|y_int - y_ref| <= ulp(z) + [with bias] ulp(y_ref) + 2^-22 |z|``.
    Why: the op's int32 accumulator is exact; its fp32 epilogue ``(acc * s_w) * s_tok`` rounds twice
    (<= 2^-23 |z|, and z itself carries one float64 rounding); each cast to the output dtype adds
    half an ulp (a full ulp allows for a binade crossing); with a bias the sum is rounded again.
    It holds wherever the op's int4 activations and scale equal the reference's. They can differ
    only where ``b * mult`` sits at a rounding tie (the op accumulates ``a`` and ``b`` in fp32, the
    reference in float64, so they can differ in the last bit): such tokens are counted and left out
    of the bound, and ``bound_ok`` needs each mismatch within ``tie_tol`` steps of a half-integer.
    """
    _check_inputs(qlinear, x, float_linear)
    tie_tol = float(tie_tol)
    if not math.isfinite(tie_tol) or tie_tol < 0:
        raise ValueError(f"tie_tol: expected a finite float >= 0, got {tie_tol}")
    act = qlinear.act_dtype
    k, o = qlinear.in_features, qlinear.out_features
    x2 = x.reshape(-1, k)
    x_act = x2.to(act).contiguous()
    t = x_act.shape[0]
    notes: list[str] = []

    with torch.no_grad():
        y_int = qlinear(x_act).cpu().double()  # [T, O], act dtype values

        # (a) dequantized reference with the reference's own activations
        b_ref, q_ref, s_ref = reference_activations(qlinear, x_act)
        q_op, s_op = _op_activations(qlinear, x_act)
        w_hat = qlinear.dequantized_weight(torch.float64).cpu()
        # z = (q * s_tok) @ W_hat^T with s_tok taken out of the sum: every partial sum of row j is an
        # integer (|n| <= 64 K) times s_w[j], exact in float64, so z carries one float64 rounding.
        z = (q_ref @ w_hat.T) * s_ref.double()[:, None]
        bias = qlinear.bias.cpu().double() if qlinear.bias is not None else None
        y_ref = z + bias if bias is not None else z

        budget = ulp(z, act)  # output-dtype rounding part of the bound
        if bias is not None:
            budget = budget + ulp(y_ref, act)
        bound = budget + FP32_EPILOGUE_REL * z.abs()
        diff = (y_int - y_ref).abs()
        over = diff > bound
        excess = diff - bound

        act_diff = q_op != q_ref
        scale_diff = s_op != s_ref
        dirty = act_diff.any(dim=1) | scale_diff
        # Distance of the reference's scaled value r = b * mult (the kernel's fp32 step 6) from the
        # nearest half-integer: where q flips when b moves by an ulp.
        m = b_ref.abs().amax(dim=1).float()
        c32 = torch.tensor(float(qlinear.clip_ratio.item()), dtype=torch.float32)
        mult = torch.where(m == 0, torch.tensor(7.0), (7.0 / c32) / torch.where(m == 0, torch.ones_like(m), m))
        r = b_ref.float() * mult[:, None]
        tie_dist = (r - torch.floor(r) - 0.5).abs()
        tie_max = float(tie_dist[act_diff].max()) if bool(act_diff.any()) else None
        clean = ~dirty
        over_clean = int(over[clean].sum())
        bound_ok = over_clean == 0 and (tie_max is None or tie_max <= tie_tol)
        if bool(dirty.any()):
            notes.append(f"{int(dirty.sum())} token(s) whose int4 activations or scale differ from the "
                         "reference (fp32 vs float64 accumulation at a tie) are left out of the bound")

        def clean_max(v: torch.Tensor) -> float | None:
            return float(v[clean].max()) if bool(clean.any()) else None

        report = dict(
            in_features=k, out_features=o, tokens=t, n1=qlinear.n1, n2=qlinear.n2,
            act_dtype=dtype_name(act), clip_ratio=float(qlinear.clip_ratio.item()),
            backend=ops.resolve_backend(qlinear.backend, qlinear.weight_packed), has_bias=bias is not None,
            bound_ok=bool(bound_ok), max_abs_diff_ref=float(diff.max()),
            max_err_ulps=clean_max(diff / budget), max_bound_ratio=clean_max(diff / bound),
            max_violation=clean_max(excess), bound_violations=int(over.sum()), bound_violations_clean=over_clean,
            act_mismatches=int(act_diff.sum()), act_mismatch_tokens=int(act_diff.any(dim=1).sum()),
            scale_mismatch_tokens=int(scale_diff.sum()), act_tie_distance_max=tie_max, tie_tol=tie_tol,
        )

        if float_linear is not None:
            w = float_linear.weight.detach().cpu().double()
            fb = float_linear.bias.detach().cpu().double() if float_linear.bias is not None else None
            xf = x2.detach().cpu().double()
            y_plain = xf @ w.T
            y_fp = y_plain
            if fb is not None:
                y_fp = y_fp + fb
            err = y_int - y_fp
            tok_err = err.norm(dim=1)
            worst = int(tok_err.argmax())
            ref_norm = float(y_fp.norm())
            cos = torch.nn.functional.cosine_similarity(y_int.flatten(), y_fp.flatten(), dim=0)
            tok_norm = float(y_fp[worst].norm())
            report.update(
                sqnr_db=_sqnr_db(y_fp, err), cosine=float(cos),
                rel_err=float(err.norm()) / ref_norm if ref_norm > 0 else math.inf,
                max_abs_err=float(err.abs().max()), worst_token=worst, worst_token_err=float(tok_err[worst]),
                worst_token_rel_err=float(tok_err[worst]) / tok_norm if tok_norm > 0 else math.inf,
            )
            # (c) the transform alone: exact algebra, so only float64 rounding remains.
            lt, rt = qlinear.left_trans.cpu().double(), qlinear.right_trans.cpu().double()
            y_tr = kron_apply(xf, lt, rt) @ fold_weight(w, lt, rt).T
            plain_norm = float(y_plain.norm())
            report.update(
                transform_rel_err=float((y_tr - y_plain).norm()) / plain_norm if plain_norm > 0 else 0.0,
                transform_max_abs_err=float((y_tr - y_plain).abs().max()),
            )
    return LinearReport(**report, notes=notes)


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
