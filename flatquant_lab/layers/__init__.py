"""The module computing each quantized checkpoint scheme, built from the checkpoint's tensors by their names.

Each layer's forward calls :mod:`flatquant_lab.ops` only; which backend runs is the ops' business. Which
description value a layer computes, and the checks of its tensors, are its scheme's (:mod:`flatquant_lab.schemes`).
"""
from __future__ import annotations

from .base import sum_over_ranks
from .kv_cache import KV_CACHE_ATTR, KV4Cache, QuantizedKVCache, kv4_attention_inputs
from .w4a4_flatquant import CHECKPOINT_KEYS, DEFAULT_CHUNK_TOKENS, MAX_CHUNK_TOKENS, W4A4FlatQuantLinear
from .w4a4_mxfp4_flatquant import MX_CHECKPOINT_KEYS, W4A4MXFP4FlatQuantLinear
from .w8a8_dynamic import CHECKPOINT_KEYS as W8A8_CHECKPOINT_KEYS
from .w8a8_dynamic import W8A8DynamicLinear

__all__ = ["CHECKPOINT_KEYS", "DEFAULT_CHUNK_TOKENS", "KV_CACHE_ATTR", "KV4Cache", "MAX_CHUNK_TOKENS", "MX_CHECKPOINT_KEYS",
           "QuantizedKVCache", "W4A4FlatQuantLinear", "W4A4MXFP4FlatQuantLinear", "W8A8DynamicLinear", "kv4_attention_inputs",
           "W8A8_CHECKPOINT_KEYS", "sum_over_ranks"]
