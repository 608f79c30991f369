"""``W4A4_MXFP4_FLATQUANT`` (Ascend 950): FP4 E2M1 weights and activations with E8M0 scales per 32, in a learned
Kronecker basis (docs/mxfp4.md).

Tensors per linear ``[O, K]``: ``weight`` uint8 ``[O, K/2]`` (two E2M1 codes per byte, the even element in the low
nibble), ``weight_scale`` uint8 ``[O, K/32]`` (E8M0), ``left_trans`` ``[L, L]`` and ``right_trans`` ``[R, R]`` in the
model dtype, ``clip_ratio`` float32 ``[1]``, optional ``bias``. Top-level description fields ``group_size`` (32) and
``max_supported_tp`` (4). Column-parallel ``(L, R) = decompose_dim(K)``; row-parallel ``R = decompose_dim(K / max_tp)[1]``,
``L = K / R`` with ``left_trans`` block-diagonal over ``max_supported_tp`` blocks: rank ``r`` of ``tp`` keeps diagonal
block ``r`` (size ``L / tp``) and its ``K / tp`` columns, so the layer computes the same at every ``tp`` that divides
``max_tp``.
Layer: :class:`~flatquant_lab.layers.W4A4MXFP4FlatQuantLinear`.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..dtypes import FLOAT_DTYPES
from ..kronecker import decompose_dim
from ..layers import W4A4MXFP4FlatQuantLinear
from ..layers.w4a4_mxfp4_flatquant import (
    DEFAULT_MAX_TP, MAX_FACTOR, MX_CHECKPOINT_KEYS, block_diagonal_problem, mx_factors,
)
from ..mxfp4 import GROUP
from .base import TensorSpec, TransformScheme, check_specs, matrix_shape

U8 = (torch.uint8,)
FP32 = (torch.float32,)


class W4A4MXFP4FlatQuantScheme(TransformScheme):
    """W4A4 MXFP4 FlatQuant: ``y = MX4(x @ kron(L, R)) @ MX4(W @ kron(L, R)^{-T})^T (+ bias)``."""

    quant_type = "W4A4_MXFP4_FLATQUANT"
    layer_cls = W4A4MXFP4FlatQuantLinear
    names = MX_CHECKPOINT_KEYS
    weight_dtypes = U8
    weight_what = "a uint8 matrix of packed FP4 codes"
    precedence = 3
    shared = ("left_trans", "right_trans", "clip_ratio")
    input_dim = ("weight", "weight_scale")
    act_dtype_tensors = ("left_trans", "right_trans", "bias")
    folded = ("left_trans", "right_trans")
    fields = {"group_size": GROUP, "max_supported_tp": DEFAULT_MAX_TP}

    def linear_shape(self, weight: torch.Tensor) -> tuple[int, int]:
        return weight.shape[0], 2 * weight.shape[1]

    def tensor_specs(self, out_features: int, in_features: int, tp_size: int = 1,
                     factors: tuple[int, int] | None = None) -> dict[str, TensorSpec]:
        """``factors``: ``(L, R)`` (default ``decompose_dim(K)``, a column-parallel linear's)."""
        n1, n2 = factors or decompose_dim(in_features)
        return {
            "weight": TensorSpec((out_features, in_features // 2), U8),
            "weight_scale": TensorSpec((out_features, in_features // GROUP), U8),
            "left_trans": TensorSpec((n1, n1), FLOAT_DTYPES),
            "right_trans": TensorSpec((n2, n2), "left_trans"),
            "clip_ratio": TensorSpec((1,), FP32),
            "bias": TensorSpec((out_features,), "left_trans"),
        }

    def check(self, tensors: Mapping[str, torch.Tensor], tp_size: int = 1) -> None:
        """Shapes and dtypes; ``left_trans``/``right_trans`` may be any square pair with ``L * R == K`` (which pair
        vLLM allocates depends on the linear's kind: :meth:`tp_load_problem`)."""
        out_f, k_half = matrix_shape(tensors, self.weight_dtypes, self.weight_what)
        in_f = 2 * k_half
        if in_f % GROUP:
            raise ValueError(f"weight: in-features K = {in_f} must be a multiple of {GROUP} (one E8M0 scale each)")
        lt, rt = tensors.get("left_trans"), tensors.get("right_trans")
        factors = None
        if isinstance(lt, torch.Tensor) and isinstance(rt, torch.Tensor) and lt.dim() == rt.dim() == 2:
            n1, n2 = lt.shape[0], rt.shape[0]
            if n1 * n2 != in_f:
                raise ValueError(f"left_trans: sizes {n1} x {n2} must multiply to K = {in_f}")
            if max(n1, n2) > MAX_FACTOR:
                raise ValueError(f"left_trans: factor sizes {n1} x {n2} exceed {MAX_FACTOR}")
            factors = (n1, n2)
        check_specs(tensors, self.tensor_specs(out_f, in_f, tp_size, factors))

    def fields_problem(self, desc: Mapping) -> str:
        f = self.read_fields(desc)
        if f["group_size"] != GROUP:
            return f"group_size is {f['group_size']!r}; {self.quant_type} groups {GROUP} values per E8M0 scale"
        tp = f["max_supported_tp"]
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            return f"max_supported_tp is {tp!r}, expected a positive int"
        return ""

    def build(self, tensors: Mapping[str, torch.Tensor], *, backend: str | None = None,
              act_dtype: torch.dtype | None = None, tp_size: int = 1, group_size: int = GROUP,
              max_supported_tp: int = DEFAULT_MAX_TP) -> W4A4MXFP4FlatQuantLinear:
        if group_size != GROUP:
            raise ValueError(f"group_size: {self.quant_type} takes {GROUP}, got {group_size!r}")
        return W4A4MXFP4FlatQuantLinear.from_checkpoint(tensors, backend=backend, act_dtype=act_dtype,
                                                        tp_size=tp_size, max_supported_tp=max_supported_tp)

    def from_float(self, linear: nn.Linear, q: torch.Tensor | None = None, scale: torch.Tensor | None = None, *,
                   act_dtype: torch.dtype, backend: str | None = None, tp_size: int = 1,
                   left_trans: torch.Tensor = None, right_trans: torch.Tensor = None, clip_ratio: float = 1.0,
                   max_supported_tp: int = DEFAULT_MAX_TP, scale_rule: str = "kernel") -> W4A4MXFP4FlatQuantLinear:
        """From packed codes ``q`` and E8M0 ``scale`` already computed, or (both ``None``) RTN of ``linear.weight``
        folded with ``kron(left_trans, right_trans)^{-T}`` under ``scale_rule``; the bias is rounded to ``act_dtype``."""
        if q is None and scale is None:
            return W4A4MXFP4FlatQuantLinear.from_float(
                linear, left_trans, right_trans, clip_ratio=clip_ratio, act_dtype=act_dtype, backend=backend,
                tp_size=tp_size, max_supported_tp=max_supported_tp, scale_rule=scale_rule)
        tensors = {"weight": q, "weight_scale": scale, "left_trans": left_trans, "right_trans": right_trans,
                   "clip_ratio": torch.tensor([float(clip_ratio)], dtype=torch.float32, device=q.device)}
        if linear.bias is not None:
            tensors["bias"] = linear.bias.detach().to(act_dtype)
        return self.build(tensors, backend=backend, act_dtype=act_dtype, tp_size=tp_size,
                          max_supported_tp=max_supported_tp)

    def weight_bytes(self, layer: W4A4MXFP4FlatQuantLinear) -> int:
        names = ("weight", "weight_scale", "left_trans", "right_trans", "clip_ratio")
        return sum(getattr(layer, n).numel() * getattr(layer, n).element_size() for n in names)

    def input_basis_weight(self, layer: W4A4MXFP4FlatQuantLinear) -> torch.Tensor:
        """``W = L W'_o R^T`` per output row (``W'`` the dequantized FP4 weight, viewed ``[L, R]``)."""
        w = layer.dequantized_weight(torch.float64).cpu()
        left, right = layer.left_trans.detach().cpu().double(), layer.right_trans.detach().cpu().double()
        o, k = w.shape
        return (left @ w.reshape(o, layer.n1, layer.n2) @ right.T).reshape(o, k)

    def shard(self, tensors: Mapping[str, torch.Tensor], *, rank: int, tp: int,
              rows: slice | None = None) -> dict[str, torch.Tensor]:
        """Row-parallel: rank ``rank`` keeps diagonal block ``rank`` of ``left_trans`` (size ``L / tp``), its
        ``K / tp`` columns of ``weight`` and ``weight_scale``, the bias on rank 0; column-parallel: the default."""
        if rows is not None:
            return super().shard(tensors, rank=rank, tp=tp, rows=rows)
        kb, kg = tensors["weight"].shape[1] // tp, tensors["weight_scale"].shape[1] // tp
        b = tensors["left_trans"].shape[0] // tp
        part = dict(tensors)
        part["weight"] = tensors["weight"][:, rank * kb:(rank + 1) * kb]
        part["weight_scale"] = tensors["weight_scale"][:, rank * kg:(rank + 1) * kg]
        part["left_trans"] = tensors["left_trans"][rank * b:(rank + 1) * b, rank * b:(rank + 1) * b]
        if rank != 0:
            part.pop("bias", None)
        return part

    def tp_load_problem(self, prefix: str, tensors: Mapping[str, torch.Tensor], k_rank: int, tp: int, cann: str,
                        max_supported_tp: int = DEFAULT_MAX_TP, group_size: int = GROUP) -> str:
        """vLLM refuses ``tp > max_supported_tp``; a column-parallel linear (``k_rank == K``) has
        ``decompose_dim(K)`` transforms; a row-parallel one the pair sized for ``max_supported_tp`` with
        ``left_trans`` block-diagonal over that many blocks, served at a ``tp`` that divides ``max_supported_tp``
        (else its ranks compute another transform)."""
        if tp > max_supported_tp:
            return (f"{prefix}: TP {tp} exceeds max_supported_tp = {max_supported_tp} of the description "
                    f"(vLLM refuses {self.quant_type} above it)")
        k = self.linear_shape(tensors["weight"])[1]
        have = (tensors["left_trans"].shape[0], tensors["right_trans"].shape[0])
        column = decompose_dim(k)
        try:
            row = mx_factors(k, True, max_supported_tp)
        except ValueError:
            row = None
        if tp > 1 and k_rank == k:
            allowed, kind = [column], "column-parallel"
        elif tp > 1:
            allowed, kind = [row], "row-parallel"
        else:
            allowed, kind = [f for f in (column, row) if f is not None], "linear"
        if have not in allowed:
            return (f"{prefix}.left_trans: a {kind} {self.quant_type} linear of K = {k} has transforms "
                    f"{' or '.join(f'{a} x {b}' for a, b in allowed)}, the checkpoint has {have[0]} x {have[1]} "
                    "(vllm-ascend asserts equal shapes)")
        if tp > 1 and k_rank != k:
            if max_supported_tp % tp:
                return (f"{prefix}.left_trans: TP {tp} does not divide max_supported_tp = {max_supported_tp}: "
                        f"each rank's diagonal block ({have[0]} / {tp} rows) would cut across the {max_supported_tp} "
                        f"learned blocks of {have[0] // max_supported_tp}, so the ranks would compute another "
                        f"transform (serve at a TP that divides {max_supported_tp})")
            problem = block_diagonal_problem(tensors["left_trans"], max_supported_tp)
            if problem:
                return (f"{prefix}.left_trans: not block-diagonal over max_supported_tp = {max_supported_tp} blocks "
                        f"({problem}); rank r keeps only diagonal block r, so TP {tp} would compute another transform")
            if k_rank % GROUP:
                return f"{prefix}.weight: each rank's {k_rank} input columns are not whole groups of {GROUP}"
        return ""
