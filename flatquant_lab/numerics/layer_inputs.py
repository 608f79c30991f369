"""A layer of a saved checkpoint as a check problem: its real inputs, and a full-precision reference from its own weights.

    x = capture_inputs(model, "model.layers.3.self_attn.q_proj", calib_ids)   # [tokens, K]
    report = check_linear(layer, x, dequantized_reference(layer))
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers import W4A4FlatQuantLinear, W8A8DynamicLinear
from ..schemes import quantized_schemes, scheme_of


class _Captured(Exception):
    """Raised by the hook once the layer's input is held: the layers after it need not run."""


def capture_inputs(model: nn.Module, name: str, input_ids: torch.Tensor) -> torch.Tensor:
    """What module ``name`` of ``model`` receives while ``model`` reads ``input_ids`` ``[windows, seqlen]``, as
    ``[windows * seqlen, in_features]`` in the model's dtype, on the CPU. The forward stops at that module."""
    module = model.get_submodule(name)
    held = []

    def hook(mod, args):
        held.append(args[0].detach())
        raise _Captured

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not held:
        raise ValueError(f"name: {name} never ran in the model's forward, so it has no inputs to capture")
    x = held[0]
    return x.reshape(-1, x.shape[-1]).cpu()


def dequantized_reference(qlinear: W4A4FlatQuantLinear | W8A8DynamicLinear) -> nn.Linear:
    """The full-precision reference of a quantized layer whose float original is not at hand: an ``nn.Linear``
    (float64, CPU) holding the layer's own dequantized weights, in the input basis, and its bias.

    W4A4: ``W = L W'_o R^T`` per output row (and per tensor-parallel block), ``W' = weight * weight_scale``, so
    ``x @ W^T == kron_apply(x, L, R) @ W'^T`` exactly: against it ``check_linear`` measures what the activations'
    int4 quantization and the half-precision transforms cost, and its transform check shows how well the
    stored ``left_trans`` / ``right_trans`` invert. W8A8_DYNAMIC: ``weight * weight_scale`` as the device
    rounds the scale (no transform), so the comparison measures the activations' int8 quantization.
    Any scheme's weight comes from ``Scheme.input_basis_weight``.
    """
    scheme = scheme_of(qlinear)
    if scheme is None or not scheme.quantized:
        layers = " or ".join(s.layer_cls.__name__ for s in quantized_schemes().values())
        raise ValueError(f"qlinear: expected a {layers}, got {type(qlinear).__name__}")
    w = scheme.input_basis_weight(qlinear)
    ref = nn.Linear(w.shape[1], w.shape[0], bias=qlinear.bias is not None, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(w)
        if qlinear.bias is not None:
            ref.bias.copy_(qlinear.bias.detach().cpu().double())
    return ref.requires_grad_(False)
