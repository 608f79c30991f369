"""Attention that reads K and V through the quantized KV cache, as vllm-ascend's C8 does, or FlatQuant's KV4
(docs/kv-cache.md).

    use_kv_cache_attention(model)        # every layer's K (after RoPE) and V go through its cache scales
    plain_attention(model)               # back to the model's own attention

The model's attention modules (Llama, Qwen2, Qwen3 from transformers) compute K and V, apply RoPE to K and hand
both to an attention function picked by ``config._attn_implementation``. Here that function is wrapped: before it
runs, the layer's KV-cache module (``apply``) gives the query, K and V attention computes with: for a
:class:`~flatquant_lab.layers.QuantizedKVCache`, K and V written to int8 and read back (``int8 * scale``, no offset),
in the dtype the attention computes in; for a :class:`~flatquant_lab.layers.KV4Cache`, ``q T_k^{-T}`` and K, V
through the 4-bit cache. Transformers' cache still holds the
float K and V, so every step reads the codes of the original values, as vllm-ascend's int8 cache does.

vllm-ascend attends a prefill without a cache hit on the float K and V; ``float_prefill=True`` does the same (a
forward whose queries cover all the keys runs unquantized), the default quantizes every forward, as decode and
chunked prefill read the cache. Enabling registers one attention function (and its mask function, the wrapped
implementation's) in transformers' tables under a name of this module's; nothing is registered at import.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

from torch import nn

from ..layers import KV_CACHE_ATTR
from . import decoder_layers, kv_caches

NAME_PREFIX = "flatquant_kv_cache"


def _name(base: str, float_prefill: bool) -> str:
    return f"{NAME_PREFIX}:{'float_prefill' if float_prefill else 'all'}:{base}"


def wrapped_implementation(name: str | None) -> str | None:
    """The attention implementation one of our wrapped names stands for, else ``None``."""
    if isinstance(name, str) and name.startswith(NAME_PREFIX + ":"):
        return name.split(":", 2)[2]
    return None


def attention_function(model: nn.Module, base: str):
    """The attention function transformers registers under ``base`` (the family's eager one for ``"eager"``)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base != "eager" and base in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[base]
    attn = decoder_layers(model)[0].self_attn
    eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"model: no eager attention function in {type(attn).__module__} to wrap")
    return eager


def _wrap(base_fn, float_prefill: bool):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        cache = getattr(module, KV_CACHE_ATTR, None)
        if cache is not None and not (float_prefill and key.shape[-2] == query.shape[-2]):
            query, key, value = cache.apply(query, key, value)
        return base_fn(module, query, key, value, attention_mask, *args, **kwargs)

    attention.__name__ = f"kv_cache_{getattr(base_fn, '__name__', 'attention')}"
    return attention


def use_kv_cache_attention(model: nn.Module, float_prefill: bool = False, allow_none: bool = False) -> nn.Module:
    """Make every attention of ``model`` read K and V through its KV-cache module; returns ``model``.

    ``model`` must carry them (``attach_kv_cache`` or a checkpoint with ``kv_cache_type``), unless ``allow_none``
    (calibration switches the attention on before the first layer has one: a layer without one computes as
    before). ``float_prefill``: leave a forward without earlier cached tokens unquantized, as vllm-ascend's prefill
    does. Undo with :func:`plain_attention`.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    if not allow_none and not kv_caches(model):
        raise ValueError("model: carries no KV-cache scales (attach_kv_cache, or load a checkpoint with "
                         "kv_cache_type)")
    current = model.config._attn_implementation or "eager"
    base = wrapped_implementation(current) or current
    name = _name(base, float_prefill)
    AttentionInterface.register(name, _wrap(attention_function(model, base), float_prefill))
    if base in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.config._attn_implementation = name
    return model


def plain_attention(model: nn.Module) -> nn.Module:
    """Undo :func:`use_kv_cache_attention`: the model's own attention again (the scales stay attached)."""
    base = wrapped_implementation(model.config._attn_implementation)
    if base is not None:
        model.config._attn_implementation = base
    return model


def kv_cache_attention_on(model: nn.Module) -> bool:
    """Whether ``model``'s attention reads K and V through its cache scales."""
    return wrapped_implementation(getattr(model.config, "_attn_implementation", None)) is not None


RECORD_PREFIX = "flatquant_kv_record"


@contextmanager
def recording_attention(model: nn.Module, record, through_cache: bool = False):
    """Every attention call of ``model`` goes through ``record(module, query, key, value, mask, args, kwargs)`` first
    (the query, K after RoPE and V as the cache receives them), then through the model's own attention function on
    the float K and V, or, with ``through_cache``, on what the module's KV cache gives (as the KV-cache attention
    computes). Yields that attention function; the model's attention is restored on exit."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    before = model.config._attn_implementation or "eager"
    base = wrapped_implementation(before) or before
    base_fn = attention_function(model, base)

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        record(module, query, key, value, attention_mask, args, kwargs)
        cache = getattr(module, KV_CACHE_ATTR, None) if through_cache else None
        if cache is not None:
            query, key, value = cache.apply(query, key, value)
        return base_fn(module, query, key, value, attention_mask, *args, **kwargs)

    name = f"{RECORD_PREFIX}:{'cache' if through_cache else 'float'}:{base}"
    AttentionInterface.register(name, attention)
    if base in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.config._attn_implementation = name
    try:
        yield base_fn
    finally:
        model.config._attn_implementation = before
