"""``W4A4_FLATQUANT_DYNAMIC``: int4 weights in a learned Kronecker basis, int4 per-token activations.

Tensors per linear ``[O, K]`` (docs/checkpoint-format.md, 'W4A4_FLATQUANT_DYNAMIC tensors'): ``weight`` int8
``[O, K]`` (int4 codes), ``weight_scale`` / ``weight_offset`` float32 ``[O, 1]``, ``left_trans`` ``[n1, n1]``
and ``right_trans`` ``[n2, n2]`` in one float dtype, ``clip_ratio`` float32 ``[1]``, optional ``bias`` ``[O]``
in the transforms' dtype; ``(n1, n2) = decompose_dim(K / tp)``, ``tp`` the ranks a row-parallel linear is sized
for (docs/tensor-parallel.md, 'TP-aware FlatQuant'). Layer: :class:`~flatquant_lab.layers.W4A4FlatQuantLinear`.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..dtypes import FLOAT_DTYPES
from ..kronecker import decompose_dim, npu_supported
from ..layers import CHECKPOINT_KEYS, W4A4FlatQuantLinear
from ..recipe import FLATQUANT
from .base import TensorSpec, TransformScheme, check_specs, matrix_shape

FP32 = (torch.float32,)


class W4A4FlatQuantScheme(TransformScheme):
    """W4A4 FlatQuant: ``y = Q4(x @ kron(L, R)) @ Q4(W @ kron(L, R)^{-T})^T * scales (+ bias)``."""

    quant_type = "W4A4_FLATQUANT_DYNAMIC"
    layer_cls = W4A4FlatQuantLinear
    names = CHECKPOINT_KEYS
    recipe_name = FLATQUANT
    precedence = 2
    # vllm-ascend loads one transform and clip ratio per fused module and copies them whole to every rank
    shared = ("left_trans", "right_trans", "clip_ratio")
    act_dtype_tensors = ("left_trans", "right_trans", "bias")
    folded = ("left_trans", "right_trans")
    sized_for_tp = True

    def tensor_specs(self, out_features: int, in_features: int, tp_size: int = 1) -> dict[str, TensorSpec]:
        # vllm-ascend allocates left/right_trans from get_decompose_dim(K per rank): any other pair fails to load
        n1, n2 = decompose_dim(in_features // tp_size)
        return {
            "weight": TensorSpec((out_features, in_features), (torch.int8,)),
            "weight_scale": TensorSpec((out_features, 1), FP32),
            "weight_offset": TensorSpec((out_features, 1), FP32),
            "left_trans": TensorSpec((n1, n1), FLOAT_DTYPES),
            "right_trans": TensorSpec((n2, n2), "left_trans"),
            "clip_ratio": TensorSpec((1,), FP32),
            "bias": TensorSpec((out_features,), "left_trans"),
        }

    def check(self, tensors: Mapping[str, torch.Tensor], tp_size: int = 1) -> None:
        out_f, in_f = matrix_shape(tensors, self.weight_dtypes, self.weight_what)
        if in_f % (8 * tp_size):
            raise ValueError(f"weight: in-features K = {in_f} must be divisible by 8"
                             + (f" * tp_size = {8 * tp_size} (int4 packing of each rank's slice)" if tp_size > 1
                                else " (int4 packing)"))
        check_specs(tensors, self.tensor_specs(out_f, in_f, tp_size))

    def build(self, tensors: Mapping[str, torch.Tensor], *, backend: str | None = None,
              act_dtype: torch.dtype | None = None, tp_size: int = 1) -> W4A4FlatQuantLinear:
        return W4A4FlatQuantLinear.from_checkpoint(tensors, backend=backend, act_dtype=act_dtype, tp_size=tp_size)

    def from_float(self, linear: nn.Linear, q: torch.Tensor, scale: torch.Tensor, *, act_dtype: torch.dtype,
                   backend: str | None = None, tp_size: int = 1, left_trans: torch.Tensor = None,
                   right_trans: torch.Tensor = None, clip_ratio: float = 1.0) -> W4A4FlatQuantLinear:
        """``q``, ``scale``: the int4 codes and per-channel scales of ``linear.weight`` folded with
        ``kron(left_trans, right_trans)^{-T}`` (per block of ``tp_size``); the bias is rounded to ``act_dtype``."""
        tensors = {"weight": q, "weight_scale": scale, "weight_offset": torch.zeros_like(scale),
                   "left_trans": left_trans, "right_trans": right_trans,
                   "clip_ratio": torch.tensor([float(clip_ratio)], dtype=torch.float32, device=scale.device)}
        if linear.bias is not None:
            tensors["bias"] = linear.bias.detach().to(act_dtype)
        return self.build(tensors, backend=backend, act_dtype=act_dtype, tp_size=tp_size)

    def weight_bytes(self, layer: W4A4FlatQuantLinear) -> int:
        # the packed int4 weight as held; p1/p2 are derived copies vllm-ascend does not keep twice
        names = ("weight_packed", "weight_scale", "weight_offset", "left_trans", "right_trans", "clip_ratio")
        return sum(getattr(layer, n).numel() * getattr(layer, n).element_size() for n in names)

    def input_basis_weight(self, layer: W4A4FlatQuantLinear) -> torch.Tensor:
        """``W = L W'_o R^T`` per output row and tensor-parallel block, ``W' = weight * weight_scale``."""
        w = layer.dequantized_weight(torch.float64).cpu()
        left, right = layer.left_trans.detach().cpu().double(), layer.right_trans.detach().cpu().double()
        o, k = w.shape
        blocks = w.reshape(o, layer.tp_size, layer.n1, layer.n2)
        return (left @ blocks @ right.T).reshape(o, k)

    def tp_load_problem(self, prefix: str, tensors: Mapping[str, torch.Tensor], k_rank: int, tp: int,
                        cann: str) -> str:
        """docs/tensor-parallel.md: vLLM allocates the transforms from ``decompose_dim(K per rank)`` and asserts the
        stored shapes equal; each rank's slice packs into int4 words and its factor pair must be one the op runs."""
        n1, n2 = decompose_dim(k_rank)
        for name, want in (("left_trans", (n1, n1)), ("right_trans", (n2, n2))):
            have = tensors[name]
            if tuple(have.shape) != want:
                return (f"{prefix}.{name}: vLLM allocates {list(want)} at TP {tp}, the checkpoint has "
                        f"{list(have.shape)} (vllm-ascend asserts equal shapes and stops with a bare AssertionError)")
        if k_rank % 8:
            return f"{prefix}.weight: each rank's {k_rank} input columns do not pack into int4 words of 8"
        support = npu_supported(n1, n2, cann)
        if not support:
            return (f"{prefix}: each rank's transform is {n1}x{n2}, which npu_kronecker_quant cannot run "
                    f"({support.reason})")
        return ""
