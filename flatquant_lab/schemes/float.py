"""``FLOAT``: a tensor kept in the model's float dtype (embeddings, norms, the LM head, skipped linears).

Its tensors are the model's own parameters, saved and loaded as the state dict holds them; as a linear
scheme it is ``weight`` ``[O, K]`` and an optional ``bias`` ``[O]`` of one float dtype, computed by ``nn.Linear``.
With tied embeddings ``lm_head.weight`` is listed ``FLOAT`` but not stored (docs/checkpoint-format.md, 'Tied
embeddings').
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..dtypes import FLOAT_DTYPES
from ..recipe import FLOAT
from .base import OPTIONAL, Scheme, TensorSpec


class FloatScheme(Scheme):
    """The float tensors of the model, as they are; a linear computes ``y = x @ W^T (+ b)``."""

    quant_type = "FLOAT"
    layer_cls = nn.Linear
    names = ("weight",)
    weight_dtypes = FLOAT_DTYPES
    weight_what = "a float matrix"
    recipe_name = FLOAT
    quantized = False
    act_dtype_tensors = ("weight", "bias")

    def tensor_specs(self, out_features: int, in_features: int, tp_size: int = 1) -> dict[str, TensorSpec]:
        return {"weight": TensorSpec((out_features, in_features), FLOAT_DTYPES),
                "bias": TensorSpec((out_features,), "weight")}

    def build(self, tensors: Mapping[str, torch.Tensor], *, backend: str | None = None,
              act_dtype: torch.dtype | None = None, tp_size: int = 1) -> nn.Linear:
        """An ``nn.Linear`` holding the tensors (in ``act_dtype`` when given); ``backend`` and ``tp_size`` do not
        apply to float arithmetic."""
        extra = sorted(set(tensors) - set(self.names) - set(OPTIONAL))
        if "weight" not in tensors or extra:
            raise ValueError(f"tensors: expected 'weight' and optional 'bias', got {sorted(tensors)}")
        self.check(tensors)
        w = tensors["weight"]
        lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in tensors, device=w.device, dtype=act_dtype or w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if "bias" in tensors:
                lin.bias.copy_(tensors["bias"])
        return lin

    def from_float(self, linear: nn.Linear, q: torch.Tensor | None = None, scale: torch.Tensor | None = None, *,
                   act_dtype: torch.dtype | None = None, backend: str | None = None, tp_size: int = 1) -> nn.Linear:
        """The float linear itself: FLOAT quantizes nothing."""
        return linear

    def tensors_of(self, layer: nn.Linear) -> dict[str, torch.Tensor]:
        out = {"weight": layer.weight.detach()}
        if layer.bias is not None:
            out["bias"] = layer.bias.detach()
        return out

    def act_dtype_of(self, layer: nn.Linear) -> None:
        return None  # computes in its weight's dtype; nothing to record

    def tp_size_of(self, layer: nn.Linear) -> int:
        return 1

    def input_basis_weight(self, layer: nn.Linear) -> torch.Tensor:
        return layer.weight.detach().cpu().double()
