"""Looking inside a KV4 cache (docs/kv-cache.md "KV4"): K and V per head before and after ``T_k``/``T_v``, their 4-bit
error, and the attention error over a sweep of the KV clip ratios.

    kv = capture_kv(model, ids)            # {attention prefix: {"query", "key", "value"}} as the cache gets them
    views = transform_views(cache, kv[p]["key"], kv[p]["value"])
    head_table(views)                      # per head: max/rms of the channels, 4-bit error, before and after
    kv_clip_sweep(cache, **kv[p])          # attention-output error against clip ratios of K, of V

``key`` is K after RoPE and before ``T_k``; ``value`` is what ``v_proj`` outputs, ``T_v`` folded in: its "before"
view is ``v T_v^{-1}``. The attention error is causal attention per query head (its kv head repeated), in float32,
relative to the same attention on the float K and V.
"""
from __future__ import annotations

import torch
from einops import repeat
from torch import nn

from ..layers import KV4Cache
from ..models import recording_attention
from ..ops import kv4_roundtrip

DEFAULT_KV_CLIPS = (1.0, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6)


@torch.no_grad()
def capture_kv(model: nn.Module, ids: torch.Tensor, layers=None) -> dict[str, dict[str, torch.Tensor]]:
    """Query, K (after RoPE) and V of every decoder layer's attention (or of the layer indices ``layers``), as its KV
    cache receives them, float32 ``[batch, heads, T, head_dim]``, from one forward of ``ids`` through the model as it
    computes (each attention reading its quantized cache where it has one)."""
    name_of = {id(m): n for n, m in model.named_modules()}
    out: dict[str, dict[str, torch.Tensor]] = {}

    def record(module, query, key, value, mask, args, kwargs):
        out[name_of[id(module)]] = {"query": query.float(), "key": key.float(), "value": value.float()}

    with recording_attention(model, record, through_cache=True):
        model(input_ids=ids)
    if layers is not None:
        keep = set(layers)
        out = {name: t for i, (name, t) in enumerate(out.items()) if i in keep}
    return out


def transform_views(cache: KV4Cache, key: torch.Tensor, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """K before and after ``T_k`` (``k``, ``k T_k``) and V before and after ``T_v`` (``v T_v^{-1}``, ``v``)."""
    if not isinstance(cache, KV4Cache):
        raise ValueError(f"cache: expected a KV4Cache, got {type(cache).__name__}")
    v_before = value.float() @ torch.linalg.inv(cache.v_trans)
    return {"K before T_k": key.float(), "K after T_k": key.float() @ cache.k_trans,
            "V before T_v": v_before, "V after T_v": value.float()}


def head_table(views: dict[str, torch.Tensor], clip: float = 1.0) -> list[dict]:
    """Per view and kv head: ``max/rms`` (the largest channel's abs-max over the channels' RMS: how far one channel
    sticks out) and the relative error of the 4-bit round trip at ``clip`` (both ratios)."""
    rows = []
    for name, x in views.items():
        for h in range(x.shape[1]):
            xh = x[:, h].reshape(-1, x.shape[-1])
            rms = xh.pow(2).mean().sqrt().clamp_min(1e-30)
            err = (kv4_roundtrip(xh, clip, clip) - xh).norm() / xh.norm().clamp_min(1e-30)
            rows.append({"view": name, "head": h, "max_over_rms": float(xh.abs().amax(0).max() / rms),
                         "kv4_rel_error": float(err)})
    return rows


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    rep = q.shape[1] // k.shape[1]
    k, v = (repeat(t, "b h t d -> b (h r) t d", r=rep) for t in (k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


@torch.no_grad()
def kv_clip_sweep(cache: KV4Cache, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  clips=DEFAULT_KV_CLIPS) -> list[dict]:
    """Attention-output error relative to float K and V, with K's clip ratios (max and min together) swept and V at
    its own, then V's swept and K at its own; plus rows ``"learned"`` (the cache as it is) and ``"no T_k"`` (K
    quantized without ``T_k``, the learned clips)."""
    if not isinstance(cache, KV4Cache):
        raise ValueError(f"cache: expected a KV4Cache, got {type(cache).__name__}")
    clips = [float(c) for c in clips]
    if not clips or any(not 0 < c <= 1 for c in clips):
        raise ValueError(f"clips: expected clip ratios in (0, 1], got {clips}")
    q, k, v = query.float(), key.float(), value.float()
    want = _attention(q, k, v)
    energy = want.norm().clamp_min(1e-30)
    q_t, k_t = q @ cache.k_trans_inv_t, k @ cache.k_trans
    kc, vc = cache.k_clip, cache.v_clip

    def err(kq, vq, qq=q_t) -> float:
        return float((_attention(qq, kq, vq) - want).norm() / energy)

    k_learned, v_learned = kv4_roundtrip(k_t, kc[0], kc[1]), kv4_roundtrip(v, vc[0], vc[1])
    learned = {"k_clip": kc.tolist(), "v_clip": vc.tolist()}
    rows = [{"sweep": "learned", **learned, "rel_error": err(k_learned, v_learned)},
            {"sweep": "no T_k", **learned, "rel_error": err(kv4_roundtrip(k, kc[0], kc[1]), v_learned, q)}]
    for c in clips:
        rows.append({"sweep": "K", "clip": c, "rel_error": err(kv4_roundtrip(k_t, c, c), v_learned)})
    for c in clips:
        rows.append({"sweep": "V", "clip": c, "rel_error": err(k_learned, kv4_roundtrip(v, c, c))})
    return rows
