"""Clip-ratio sweeps: SQNR of a W4A4 layer against a reference, per activation clip ratio."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .. import ops
from ..kronecker import kron_apply
from ..layers import W4A4FlatQuantLinear
from .compare import check_inputs
from .report import DEFAULT_RATIOS, SweepResult, SweepRow, sqnr_db_of


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
    check_inputs(qlinear, x, reference if isinstance(reference, nn.Module) else None, name="reference")
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
                rows.append(SweepRow(ratio=float(r), sqnr_db=sqnr_db_of(y_ref, err),
                                     rel_err=float(err.norm()) / ref_norm if ref_norm > 0 else math.inf))
        finally:
            qlinear.clip_ratio.copy_(kept)
    best = max(rows, key=lambda row: row.sqnr_db)  # max() keeps the first of equal keys
    return SweepResult(rows=rows, best_ratio=best.ratio, reference=label)
