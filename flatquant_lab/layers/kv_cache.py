"""``QuantizedKVCache``: the static per-channel KV-cache scales of one attention layer, and their arithmetic.

A model carries a quantized KV cache as one of these per attention module, under the attribute
``kv_cache_quant`` (``flatquant_lab.models.attach_kv_cache`` sets it; ``load_quantized`` does for a checkpoint
with ``kv_cache_type``). It holds four vectors over the ``num_kv_heads * head_dim`` channels (index
``h * head_dim + d``), in the model dtype, as non-persistent buffers: ``model.to(...)`` moves and casts them, and
``state_dict`` does not list them (saving writes them under the checkpoint's own names, docs/kv-cache.md).
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import kv_cache_dequantize, kv_cache_inverse, kv_cache_quantize

KV_CACHE_ATTR = "kv_cache_quant"  # the attribute of an attention module that holds its QuantizedKVCache
BUFFERS = ("k_scale", "k_offset", "v_scale", "v_offset")
WHICH = ("k", "v")


class QuantizedKVCache(nn.Module):
    """Per-channel scales and offsets of K and V for one attention layer (``cache_type``: ``"C8"``).

    ``quantize(x, "k")`` / ``dequantize(q, "k")`` take ``x`` in Hugging Face's layout ``[..., num_kv_heads, T,
    head_dim]`` and compute in ``x``'s dtype (the write and read paths of docs/kv-cache.md).
    """

    def __init__(self, k_scale: torch.Tensor, k_offset: torch.Tensor, v_scale: torch.Tensor,
                 v_offset: torch.Tensor, *, num_kv_heads: int, head_dim: int, cache_type: str = "C8",
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.num_kv_heads, self.head_dim, self.cache_type = int(num_kv_heads), int(head_dim), cache_type
        channels = self.num_kv_heads * self.head_dim
        for name, t in zip(BUFFERS, (k_scale, k_offset, v_scale, v_offset)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"{name}: expected a float tensor, got {getattr(t, 'dtype', type(t).__name__)}")
            flat = t.detach().reshape(-1)
            if flat.numel() == 1:
                flat = flat.expand(channels)
            if flat.numel() != channels:
                raise ValueError(f"{name}: expected {channels} channels (num_kv_heads {num_kv_heads} x head_dim "
                                 f"{head_dim}) or a single value, got shape {list(t.shape)}")
            self.register_buffer(name, flat.to(dtype or t.dtype).clone(), persistent=False)

    @property
    def channels(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def symmetric(self) -> bool:
        """Whether both offsets are 0 (the only cache vllm-ascend reads back consistently)."""
        return not bool(self.k_offset.any() or self.v_offset.any())

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(self.num_kv_heads, 1, self.head_dim)  # broadcasts against [..., H, T, D]

    def _pick(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        if which not in WHICH:
            raise ValueError(f"which: expected 'k' or 'v', got {which!r}")
        return getattr(self, f"{which}_scale"), getattr(self, f"{which}_offset")

    def quantize(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """Int8 codes of K or V (``[..., H, T, D]``) as the cache write stores them, in ``x``'s dtype."""
        scale, offset = self._pick(which)
        return kv_cache_quantize(x, self._heads(kv_cache_inverse(scale, x.dtype)), self._heads(offset))

    def dequantize(self, q: torch.Tensor, which: str, dtype: torch.dtype) -> torch.Tensor:
        """What the cache read returns for codes ``q``: ``q * scale`` in ``dtype`` (no offset)."""
        scale, _ = self._pick(which)
        return kv_cache_dequantize(q, self._heads(scale), dtype)

    def roundtrip(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """``x`` written to the cache and read back, in ``x``'s dtype."""
        return self.dequantize(self.quantize(x, which), which, x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.cache_type}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"dtype={str(self.k_scale.dtype).replace('torch.', '')}, symmetric={self.symmetric}")
