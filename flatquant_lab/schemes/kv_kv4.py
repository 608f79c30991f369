"""``KV4``: FlatQuant's 4-bit KV cache (the paper's W4A4KV4), a research mode that this toolkit saves and loads but that
vllm-ascend cannot serve (it has no 4-bit KV-cache path); docs/kv-cache.md, "KV4".

Tensors per decoder layer's attention ``attn``, float32: ``attn.k_proj.kv_cache_trans`` (``T_k``, ``[head_dim,
head_dim]``, applied online after RoPE), ``attn.k_proj.kv_cache_clip`` (K's ``[clip_max, clip_min]`` ratios),
``attn.v_proj.kv_cache_trans`` (``T_v``, already folded into ``v_proj`` and ``o_proj``: a record, for inspection)
and ``attn.v_proj.kv_cache_clip``. Each entry of the description is ``"KV4"``, as is its top-level
``"kv_cache_type"``. Module: :class:`~flatquant_lab.layers.KV4Cache`; arithmetic: :mod:`flatquant_lab.ops.kv_cache`.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..dtypes import FLOAT_DTYPES, dtype_name
from ..layers import KV4Cache
from .base import KVCacheScheme

BUFFER_OF = {"k_proj.kv_cache_trans": "k_trans", "k_proj.kv_cache_clip": "k_clip",
             "v_proj.kv_cache_trans": "v_trans", "v_proj.kv_cache_clip": "v_clip"}
NOT_SERVED = ("vllm-ascend has no 4-bit KV cache: KV4 (FlatQuant's W4A4KV4) is a research mode that load_quantized "
              "evaluates but no vllm-ascend build serves; quantize with kv_cache='C8' for a cache that serves")


class KV4KVCache(KVCacheScheme):
    """KV4: ``T_k`` online after RoPE, asymmetric 4-bit K and V per token and head with learned clip ratios."""

    cache_type = "KV4"
    layer_cls = KV4Cache
    leaves = ("kv_cache_trans", "kv_cache_clip")
    served = False

    def check(self, tensors: Mapping[str, torch.Tensor], channels: int) -> None:
        sizes = set()
        for name in self.names:
            t = tensors[name]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
            if t.dtype not in FLOAT_DTYPES:
                raise ValueError(f"{name}: expected a float dtype, got {dtype_name(t.dtype)}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: holds a value that is not finite")
            if name.endswith("trans"):
                if t.dim() != 2 or t.shape[0] != t.shape[1]:
                    raise ValueError(f"{name}: expected a square [head_dim, head_dim] matrix, got {list(t.shape)}")
                sizes.add(t.shape[0])
            elif list(t.shape) != [2]:
                raise ValueError(f"{name}: expected [clip_max, clip_min], shape [2], got {list(t.shape)}")
            elif not bool(((t > 0) & (t <= 1)).all()):
                raise ValueError(f"{name}: expected clip ratios in (0, 1], got {t.tolist()}")
        head_dim = sizes.pop()
        if sizes or channels % head_dim:
            raise ValueError(f"k_proj.kv_cache_trans: its size {head_dim} must be head_dim, as "
                             f"v_proj.kv_cache_trans's, dividing the {channels} kv channels")

    def build(self, tensors: Mapping[str, torch.Tensor], *, num_kv_heads: int, head_dim: int,
              dtype: torch.dtype | None = None) -> KV4Cache:
        """The module (``dtype`` is not used: a research cache keeps its transforms and clips in float32)."""
        self.check(tensors, num_kv_heads * head_dim)
        t = {b: tensors[n] for n, b in BUFFER_OF.items()}
        if t["k_trans"].shape[0] != head_dim:
            raise ValueError(f"k_proj.kv_cache_trans: expected [{head_dim}, {head_dim}] (head_dim), got "
                             f"{list(t['k_trans'].shape)}")
        return KV4Cache(t["k_trans"], t["k_clip"], t["v_clip"], t["v_trans"], num_kv_heads=num_kv_heads,
                        head_dim=head_dim)

    def tensors_of(self, module: KV4Cache) -> dict[str, torch.Tensor]:
        return {n: getattr(module, b).detach() for n, b in BUFFER_OF.items()}

    def serve_problem(self, tensors: Mapping[str, torch.Tensor], *, num_kv_heads: int, head_dim: int) -> str:
        return NOT_SERVED

    def shard(self, tensors: Mapping[str, torch.Tensor], *, rank: int, tp: int, num_kv_heads: int,
              head_dim: int) -> dict[str, torch.Tensor]:
        """Every rank keeps all of them: one ``T_k`` and one clip pair serve every head."""
        return dict(tensors)
