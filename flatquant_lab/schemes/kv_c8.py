"""``C8``: vllm-ascend's static int8 KV cache, per channel, enabled by ``"kv_cache_type": "C8"`` (docs/kv-cache.md).

Tensors per decoder layer's attention ``attn`` (``model.layers.N.self_attn``): ``attn.k_proj.kv_cache_scale``,
``attn.k_proj.kv_cache_offset``, ``attn.v_proj.kv_cache_scale``, ``attn.v_proj.kv_cache_offset``, each over the
``num_kv_heads * head_dim`` channels (index ``h * head_dim + d``), shape ``[C]`` or ``[C, 1]`` (vLLM squeezes) or a
single value, a float dtype (vllm-ascend holds them in the model dtype). Each tensor's description entry is
``"C8"`` and the description's top level carries ``"kv_cache_type": "C8"`` (msModelSlim also writes
``"kv_quant_type": "C8"``). The write path quantizes post-RoPE K and V with ``clamp(round(x / scale + offset),
-128, 127)``, the read path dequantizes ``int8 * scale`` without the offset: only a symmetric cache serves
consistently. Every rank loads the whole tensors and keeps its kv heads' channels.
Module: :class:`~flatquant_lab.layers.QuantizedKVCache`; arithmetic: :mod:`flatquant_lab.ops.kv_cache`.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..dtypes import FLOAT_DTYPES, dtype_name
from ..layers import QuantizedKVCache
from ..ops import kv_cache_dequantize, kv_cache_inverse, kv_cache_quantize
from .base import KVCacheScheme

# vllm-ascend's C8 attention needs head_dim % 32 == 0 (and block_size % 32 == 0, a serving option)
HEAD_DIM_MULTIPLE = 32
BLOCK_SIZE_MULTIPLE = 32
# short name -> the QuantizedKVCache buffer holding it
BUFFER_OF = {"k_proj.kv_cache_scale": "k_scale", "k_proj.kv_cache_offset": "k_offset",
             "v_proj.kv_cache_scale": "v_scale", "v_proj.kv_cache_offset": "v_offset"}


class C8KVCache(KVCacheScheme):
    """C8: int8 K and V in the cache with static per-channel scales (and offsets, written with but never read)."""

    cache_type = "C8"
    layer_cls = QuantizedKVCache
    leaves = ("kv_cache_scale", "kv_cache_offset")
    fields = ("kv_cache_type", "kv_quant_type")

    def check(self, tensors: Mapping[str, torch.Tensor], channels: int) -> None:
        for name in self.names:
            t = tensors[name]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
            if t.dtype not in FLOAT_DTYPES:
                raise ValueError(f"{name}: expected dtype float16, bfloat16 or float32 (the model dtype), "
                                 f"got {dtype_name(t.dtype)}")
            shape = list(t.shape)
            if not (shape in ([channels], [channels, 1]) or (t.numel() == 1 and t.dim() <= 2)):
                raise ValueError(f"{name}: expected shape [{channels}] or [{channels}, 1] (num_kv_heads x head_dim "
                                 f"channels) or a single value, got {shape}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: holds a value that is not finite")
            if name.endswith("scale") and not bool((t > 0).all()):
                raise ValueError(f"{name}: expected positive scales (the write path divides by them), got "
                                 f"minimum {float(t.min()):g}")

    def build(self, tensors: Mapping[str, torch.Tensor], *, num_kv_heads: int, head_dim: int,
              dtype: torch.dtype | None = None) -> QuantizedKVCache:
        self.check(tensors, num_kv_heads * head_dim)
        return QuantizedKVCache(*(tensors[n] for n in self.names), num_kv_heads=num_kv_heads, head_dim=head_dim,
                                cache_type=self.cache_type, dtype=dtype)

    def tensors_of(self, module: QuantizedKVCache) -> dict[str, torch.Tensor]:
        return {n: getattr(module, b).detach() for n, b in BUFFER_OF.items()}

    def serve_problem(self, tensors: Mapping[str, torch.Tensor], *, num_kv_heads: int, head_dim: int) -> str:
        if head_dim % HEAD_DIM_MULTIPLE:
            return (f"head_dim {head_dim} is not a multiple of {HEAD_DIM_MULTIPLE}, which vllm-ascend's C8 attention "
                    "needs")
        for name in self.names:
            if name.endswith("offset") and bool(tensors[name].any()):
                return (f"{name}: nonzero offset (max |offset| {float(tensors[name].abs().max()):g}); vllm-ascend "
                        "writes the cache with the offset but reads it back as int8 * scale without it, so only a "
                        "symmetric cache (offset 0) serves consistently")
        return ""

    # ------------------------------------------------------------------ the arithmetic, channels last ([..., C])
    @staticmethod
    def write(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """Int8 codes the cache stores for ``x`` (post-RoPE K, or V), in ``x``'s dtype: ``inv = 1 / scale`` once,
        ``clamp(round(x * inv + offset), -128, 127)``, round half to even. ``scale``/``offset``: ``[C]`` or one
        value, broadcast over ``x``'s last dim."""
        inv = kv_cache_inverse(scale.reshape(-1), x.dtype)
        return kv_cache_quantize(x, inv, None if offset is None else offset.reshape(-1))

    @staticmethod
    def read(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """What the cache read returns for codes ``q``: ``q * scale`` in ``dtype``, no offset."""
        return kv_cache_dequantize(q, scale.reshape(-1), dtype)
