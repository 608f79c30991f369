"""``W8A8_DYNAMIC``: int8 per-channel weights, int8 per-token activations, no transform.

Tensors per linear ``[O, K]`` (docs/checkpoint-format.md, 'W8A8_DYNAMIC tensors'): ``weight`` int8 ``[O, K]``,
``weight_scale`` / ``weight_offset`` ``[O, 1]`` and an optional ``bias`` ``[O]``, any float dtype (msModelSlim
writes float32; vllm-ascend rounds them to the model dtype on load). Nothing is per-tensor, so every TP size that
splits the heads loads it (docs/tensor-parallel.md, 'msModelSlim's recipe').
Layer: :class:`~flatquant_lab.layers.W8A8DynamicLinear`.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..dtypes import FLOAT_DTYPES
from ..layers import W8A8_CHECKPOINT_KEYS, W8A8DynamicLinear
from ..recipe import W8A8_DYNAMIC
from .base import Scheme, TensorSpec


class W8A8DynamicScheme(Scheme):
    """W8A8_DYNAMIC: ``y = Q8_tok(x) @ (weight * round_t(weight_scale))^T (+ bias)``, ``t`` the model dtype."""

    quant_type = "W8A8_DYNAMIC"
    layer_cls = W8A8DynamicLinear
    names = W8A8_CHECKPOINT_KEYS
    recipe_name = W8A8_DYNAMIC
    precedence = 1

    def tensor_specs(self, out_features: int, in_features: int, tp_size: int = 1) -> dict[str, TensorSpec]:
        return {
            "weight": TensorSpec((out_features, in_features), (torch.int8,)),
            "weight_scale": TensorSpec((out_features, 1), FLOAT_DTYPES),
            "weight_offset": TensorSpec((out_features, 1), FLOAT_DTYPES),
            "bias": TensorSpec((out_features,), FLOAT_DTYPES),
        }

    def build(self, tensors: Mapping[str, torch.Tensor], *, backend: str | None = None,
              act_dtype: torch.dtype | None = None, tp_size: int = 1) -> W8A8DynamicLinear:
        dtype = {} if act_dtype is None else {"act_dtype": act_dtype}  # the layer's own default otherwise
        return W8A8DynamicLinear.from_checkpoint(tensors, backend=backend, tp_size=tp_size, **dtype)

    def from_float(self, linear: nn.Linear, q: torch.Tensor, scale: torch.Tensor, *, act_dtype: torch.dtype,
                   backend: str | None = None, tp_size: int = 1) -> W8A8DynamicLinear:
        """``q``, ``scale``: int8 codes of ``linear.weight`` and their per-channel scale (rounded to ``act_dtype``,
        as vllm-ascend's load rounds it); the bias rounds to ``act_dtype`` in the layer."""
        tensors = {"weight": q, "weight_scale": scale, "weight_offset": torch.zeros_like(scale)}
        if linear.bias is not None:
            tensors["bias"] = linear.bias.detach()
        return self.build(tensors, backend=backend, act_dtype=act_dtype, tp_size=tp_size)

    def weight_bytes(self, layer: W8A8DynamicLinear) -> int:
        # the int8 weight; scale and offset as the model dtype holds them (vllm-ascend's allocation)
        half_bytes = torch.finfo(layer.act_dtype).bits // 8
        return layer.weight_t.numel() + 2 * layer.out_features * half_bytes

    def input_basis_weight(self, layer: W8A8DynamicLinear) -> torch.Tensor:
        """``weight * round_t(weight_scale)``, what the device multiplies (no transform)."""
        return layer.dequantized_weight(torch.float64).cpu()
