"""One ``nn.Module`` per checkpoint scheme, built from the checkpoint's tensors by their names.

Each layer's forward calls :mod:`flatquant_lab.ops` only; which backend runs is the ops' business.
"""
from __future__ import annotations

from .w4a4_flatquant import CHECKPOINT_KEYS, DEFAULT_CHUNK_TOKENS, MAX_CHUNK_TOKENS, W4A4FlatQuantLinear

__all__ = ["CHECKPOINT_KEYS", "DEFAULT_CHUNK_TOKENS", "MAX_CHUNK_TOKENS", "W4A4FlatQuantLinear"]
