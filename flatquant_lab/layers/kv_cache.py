"""``QuantizedKVCache`` (C8: static per-channel int8 scales) and ``KV4Cache`` (FlatQuant's 4-bit research mode): the
quantized KV cache of one attention layer, and its arithmetic.

A model carries a quantized KV cache as one of these per attention module, under the attribute
``kv_cache_quant`` (``flatquant_lab.models.attach_kv_cache`` sets it; ``load_quantized`` does for a checkpoint
with ``kv_cache_type``). It holds four vectors over the ``num_kv_heads * head_dim`` channels (index
``h * head_dim + d``), in the model dtype, as non-persistent buffers: ``model.to(...)`` moves and casts them, and
``state_dict`` does not list them (saving writes them under the checkpoint's own names, docs/kv-cache.md).
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import kv4_roundtrip, kv_cache_dequantize, kv_cache_inverse, kv_cache_quantize

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

    def apply(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        """What attention computes with: the query as it is, K and V written to the cache and read back."""
        return query, self.roundtrip(key, "k"), self.roundtrip(value, "v")

    def extra_repr(self) -> str:
        return (f"{self.cache_type}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"dtype={str(self.k_scale.dtype).replace('torch.', '')}, symmetric={self.symmetric}")


def kv4_attention_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_trans: torch.Tensor,
                         k_trans_inv_t: torch.Tensor, k_clip: torch.Tensor, v_clip: torch.Tensor):
    """``(q T_k^{-T}, KV4(k T_k; k_clip), KV4(v; v_clip))`` per head (``[..., T, head_dim]``, in their dtypes; the
    products in float32): ``q k^T`` is unchanged by ``T_k``, and K is quantized in the transformed basis.
    ``k_clip``/``v_clip``: ``[clip_max, clip_min]`` ratios; differentiable in all of them (training uses it too)."""
    q = (query.float() @ k_trans_inv_t).to(query.dtype)
    k = kv4_roundtrip(key.float() @ k_trans, k_clip[0], k_clip[1]).to(key.dtype)
    return q, k, kv4_roundtrip(value, v_clip[0], v_clip[1])


class KV4Cache(nn.Module):
    """FlatQuant's KV4 for one attention layer (``cache_type`` ``"KV4"``, docs/kv-cache.md): a research mode that no
    serving engine runs.

    ``k_trans`` (``T_k``, ``[head_dim, head_dim]``, shared by the heads) acts online after RoPE: ``q T_k^{-T}``,
    ``k T_k``; K and V are then quantized to asymmetric 4 bits per token and head with the clip ratios ``k_clip`` /
    ``v_clip`` (``[clip_max, clip_min]``). ``T_v`` is folded into ``v_proj``'s rows and ``o_proj``'s columns, so V
    arrives transformed; ``v_trans`` records it (identity when there is none) for inspection only. Buffers in
    float32 whatever the model dtype (non-persistent: saving writes them under the checkpoint's names).
    """

    cache_type = "KV4"

    def __init__(self, k_trans: torch.Tensor, k_clip: torch.Tensor, v_clip: torch.Tensor,
                 v_trans: torch.Tensor | None = None, *, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_kv_heads, self.head_dim = int(num_kv_heads), int(head_dim)
        d = self.head_dim
        if v_trans is None:
            v_trans = torch.eye(d, device=k_trans.device)
        for name, t, shape in (("k_trans", k_trans, (d, d)), ("v_trans", v_trans, (d, d)), ("k_clip", k_clip, (2,)),
                               ("v_clip", v_clip, (2,))):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"{name}: expected a float tensor, got {getattr(t, 'dtype', type(t).__name__)}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}: expected shape {list(shape)} (head_dim {d}), got {list(t.shape)}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: holds a value that is not finite")
            self.register_buffer(name, t.detach().float().clone(), persistent=False)
        for name in ("k_clip", "v_clip"):
            c = getattr(self, name)
            if not bool(((c > 0) & (c <= 1)).all()):
                raise ValueError(f"{name}: expected clip ratios in (0, 1], got {c.tolist()}")
        inv, info = torch.linalg.inv_ex(self.k_trans.double())
        if int(info) != 0 or not bool(torch.isfinite(inv).all()):
            raise ValueError("k_trans: expected an invertible matrix (queries are multiplied by its inverse)")
        self.register_buffer("k_trans_inv_t", inv.transpose(0, 1).float(), persistent=False)

    @property
    def channels(self) -> int:
        return self.num_kv_heads * self.head_dim

    def apply(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        """``(q T_k^{-T}, KV4(k T_k), KV4(v))`` in Hugging Face's layout ``[..., heads, T, head_dim]``."""
        return kv4_attention_inputs(query, key, value, self.k_trans, self.k_trans_inv_t, self.k_clip, self.v_clip)

    def roundtrip(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """K (in the ``T_k`` basis: ``x T_k`` quantized) or V written to the cache and read back, in ``x``'s dtype."""
        if which == "k":
            return kv4_roundtrip(x.float() @ self.k_trans, self.k_clip[0], self.k_clip[1]).to(x.dtype)
        if which == "v":
            return kv4_roundtrip(x, self.v_clip[0], self.v_clip[1])
        raise ValueError(f"which: expected 'k' or 'v', got {which!r}")

    def extra_repr(self) -> str:
        k, v = (", ".join(f"{c:.3f}" for c in getattr(self, n).tolist()) for n in ("k_clip", "v_clip"))
        return f"KV4, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, k_clip=[{k}], v_clip=[{v}]"
