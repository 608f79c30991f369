"""How a model carries a quantized KV cache (docs/kv-cache.md, 'In memory'): one
:class:`~flatquant_lab.layers.QuantizedKVCache` per decoder layer, at ``<attention>.kv_cache_quant``.

    attach_kv_cache(model, k_scale=[...], v_scale=[...])     # one [C] (or [C, 1], or single value) per layer
    kv_caches(model)                                          # {"model.layers.0.self_attn": QuantizedKVCache, ...}
    detach_kv_cache(model)

``save_quantized`` writes them (with ``"kv_cache_type"``) and ``load_quantized`` puts them back. Attaching changes
nothing the model computes: the attention that quantizes its cache is a separate step.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..layers import KV_CACHE_ATTR
from ..schemes import kv_cache_scheme_for, kv_cache_scheme_of
from . import adapter_for, decoder_layers


def kv_sizes(model: nn.Module) -> tuple[int, int]:
    """``(num_kv_heads, head_dim)`` of a supported model (or of one of its attention modules, which hold the same
    config), from its config."""
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = cfg.num_attention_heads
    return (getattr(cfg, "num_key_value_heads", None) or heads,
            getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)


def attention_prefixes(model: nn.Module) -> list[str]:
    """The state-dict prefix of every decoder layer's attention (``model.layers.N.self_attn``)."""
    adapter = adapter_for(model)
    return [f"{adapter.layer_prefix(i)}.{adapter.attention}" for i in range(len(decoder_layers(model)))]


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: its input embeddings', else its first float parameter's."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w.dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _per_layer(name: str, values, n: int) -> list:
    if values is None:
        return [None] * n
    if isinstance(values, torch.Tensor) and values.dim() == 0:
        raise ValueError(f"{name}: expected one tensor per decoder layer ({n}), got a single value")
    if not isinstance(values, (Sequence, torch.Tensor)) or len(values) != n:
        got = len(values) if hasattr(values, "__len__") else type(values).__name__
        raise ValueError(f"{name}: expected one tensor per decoder layer ({n}), got {got}")
    return list(values)


def attach_kv_cache(model: nn.Module, k_scale, v_scale, k_offset=None, v_offset=None, *, cache_type: str = "C8",
                    dtype: torch.dtype | None = None) -> nn.Module:
    """Give every decoder layer's attention its KV-cache scales; returns ``model`` (changed in place).

    ``k_scale``, ``v_scale`` (and the optional ``k_offset``, ``v_offset``, default 0): one tensor per decoder layer,
    each over the ``num_kv_heads * head_dim`` channels (index ``h * head_dim + d``) as ``[C]`` or ``[C, 1]``, or a
    single value; a ``[num_layers, C]`` tensor works too. Stored in ``dtype``, default the model dtype (its
    embedding's), on the attention's device. A ``ValueError`` names the layer and the tensor.
    """
    scheme = kv_cache_scheme_for(cache_type)
    layers = decoder_layers(model)
    prefixes = attention_prefixes(model)
    heads, head_dim = kv_sizes(model)
    dtype = dtype or model_dtype(model)
    columns = [_per_layer(n, v, len(layers)) for n, v in
               (("k_scale", k_scale), ("k_offset", k_offset), ("v_scale", v_scale), ("v_offset", v_offset))]
    for i, prefix in enumerate(prefixes):
        attn = model.get_submodule(prefix)
        device = next((p.device for p in attn.parameters()), torch.device("cpu"))
        ks, ko, vs, vo = (c[i] for c in columns)
        parts = {}
        for name, t, like in zip(scheme.names, (ks, ko, vs, vo), (None, ks, None, vs)):
            if t is None:
                t = torch.zeros_like(torch.as_tensor(like, dtype=dtype))
            parts[name] = torch.as_tensor(t).to(device)
        try:
            module = scheme.build(parts, num_kv_heads=heads, head_dim=head_dim, dtype=dtype)
        except ValueError as e:
            raise ValueError(f"{prefix}.{e}") from None
        setattr(attn, KV_CACHE_ATTR, module)
    return model


def kv_caches(model: nn.Module) -> dict[str, nn.Module]:
    """``{attention prefix: its KV-cache module}`` for the decoder layers that carry one, in layer order."""
    out = {}
    for prefix in attention_prefixes(model):
        module = getattr(model.get_submodule(prefix), KV_CACHE_ATTR, None)
        if module is not None:
            if kv_cache_scheme_of(module) is None:
                raise ValueError(f"{prefix}.{KV_CACHE_ATTR}: a {type(module).__name__} of no registered KV-cache "
                                 "scheme")
            out[prefix] = module
    return out


def set_kv_cache(model: nn.Module, prefix: str, module: nn.Module) -> None:
    """Put ``module`` on the attention at ``prefix``."""
    setattr(model.get_submodule(prefix), KV_CACHE_ATTR, module)


def detach_kv_cache(model: nn.Module) -> nn.Module:
    """Remove every attention's KV-cache module; returns ``model``."""
    for prefix in attention_prefixes(model):
        attn = model.get_submodule(prefix)
        if KV_CACHE_ATTR in attn._modules:
            delattr(attn, KV_CACHE_ATTR)
    return model
