"""Calibrating the static scales of a quantized KV cache (vllm-ascend's ``C8``; docs/kv-cache.md, 'Calibration').

    report = calibrate_kv_cache(model, calib_ids)                   # msModelSlim's rule: max|x| / 127 per channel
    report = calibrate_kv_cache(model, calib_ids, clip="search")    # times a clip searched per kv head (V: channel)

It runs on the model as it is (float, W4A4, any linear recipe), after its linears are quantized: the K it sees is
K after RoPE and the V is what the (quantized, possibly transformed) ``v_proj`` outputs, as the cache receives them.
Decoder layer by decoder layer, on the hidden states the model itself computes (float attention, as msModelSlim
observes them):

1. per channel over all calibration tokens, ``absmax = max |x|`` of K and of V (``num_kv_heads * head_dim``
   channels, index ``h * head_dim + d``); ``scale = max(c * absmax / 127, eps_fp32)``, offset 0, ``c = 1`` for
   ``clip="max"``;
2. ``clip="search"``: ``c`` is chosen on ``grid`` to minimise the squared error of the layer's attention output
   (the attention function's output, before ``o_proj``) with K and V written to int8 and read back, against the
   same attention on the float K and V, over the first ``search_windows`` calibration windows. The output of the
   query heads of kv head ``h`` depends on kv head ``h`` alone, so every head is searched at once: first K's clip
   per head (V at ``c = 1``), then V's clip (K at its chosen clip) per head, or with ``granularity="channel"`` per
   channel of V (output column ``d`` depends on V's channel ``d`` alone, so that search is exact as well). The grid
   holds 1.0, so neither step can raise the error above that of the plain max scales. On the bundled model the
   search lowers that error but not the perplexity (docs/kv-cache.md), so ``"max"`` is the default.

Memory: the max is reduced while the layer runs; the search holds one layer's Q, K and V for at most
``search_windows`` windows (in the model dtype), besides the hidden states of all windows (one
``[n, seqlen, hidden]`` buffer, as calibration holds them).
"""
from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from ..checks import one_of, positive_int
from ..devices import module_device
from ..models import attach_kv_cache, decoder_layers, kv_sizes
from ..models.kv_attention import recording_attention
from ..models.kv_cache import model_dtype
from ..ops import kv_cache_dequantize, kv_cache_inverse, kv_cache_quantize
from ..schemes import kv_cache_scheme_for
from .capture import batches, capture_layer_inputs, run_layer

log = logging.getLogger(__name__)

CLIPS = ("search", "max")
GRANULARITIES = ("head", "channel")
# clip factors tried (1.0 first: on a tie the plain max scale stays)
DEFAULT_GRID = (1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
DEFAULT_SEARCH_WINDOWS = 32
INT8_MAX = 127.0
SCALE_FLOOR = torch.finfo(torch.float32).eps  # msModelSlim's floor of a per-channel scale


def channel_scales(absmax: torch.Tensor, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``max(clip * absmax / 127, eps_fp32)`` per channel, in float32 (``clip`` broadcasts against ``absmax``)."""
    return (torch.as_tensor(clip, dtype=torch.float32, device=absmax.device) * absmax.float() / INT8_MAX).clamp_min(
        SCALE_FLOOR)


def cache_roundtrip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` (``[B, H, T, D]``) written to the int8 cache with per-channel ``scale`` (``[H * D]``, held in ``x``'s
    dtype as the model holds it) and read back: the C8 write and read paths, offset 0."""
    s = scale.to(x.dtype).view(x.shape[1], 1, x.shape[3])
    return kv_cache_dequantize(kv_cache_quantize(x, kv_cache_inverse(s, x.dtype)), s, x.dtype)


class _LayerRecord:
    """What one decoder layer's attention saw: per-channel abs-max of K and V over every window, and Q, K, V (and
    the call's mask and options) of the first ``keep`` windows, for the search."""

    def __init__(self, keep: int):
        self.keep, self.kept = keep, 0
        self.k_max = self.v_max = None
        self.calls = []  # (query, key, value, mask, args, kwargs) per batch kept

    def __call__(self, module, query, key, value, mask, args, kwargs):
        heads, dim = key.shape[1], key.shape[3]
        km = key.detach().abs().amax(dim=(0, 2)).float().reshape(heads * dim)
        vm = value.detach().abs().amax(dim=(0, 2)).float().reshape(heads * dim)
        self.k_max = km if self.k_max is None else torch.maximum(self.k_max, km)
        self.v_max = vm if self.v_max is None else torch.maximum(self.v_max, vm)
        take = min(self.keep - self.kept, key.shape[0])
        if take > 0:
            m = mask[:take] if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[0] > 1 else mask
            self.calls.append((query[:take].detach(), key[:take].detach(), value[:take].detach(), m, args,
                               {k: v for k, v in kwargs.items()}))
            self.kept += take


def _errors(base_fn, module, calls, k_scale, v_scale, reference, heads: int) -> torch.Tensor:
    """Squared error of the attention output per ``[kv head, output column]`` (float64) with K and V read through
    the cache at ``k_scale`` / ``v_scale`` (``None``: float), against ``reference`` (one output per call)."""
    total = None
    for (q, k, v, mask, args, kwargs), want in zip(calls, reference):
        kq = k if k_scale is None else cache_roundtrip(k, k_scale)
        vq = v if v_scale is None else cache_roundtrip(v, v_scale)
        got = base_fn(module, q, kq, vq, mask, *args, **kwargs)[0]  # [B, T, Hq, D]
        err = (got.double() - want.double()).pow(2).sum(dim=(0, 1))  # [Hq, D]
        err = err.view(heads, -1, err.shape[-1]).sum(1)  # query head j reads kv head j // (Hq / H)
        total = err if total is None else total + err
    return total


def _search(base_fn, module, rec: _LayerRecord, heads: int, dim: int, grid, granularity: str) -> dict:
    """The clip factors of one layer (per kv head for K; per head or per channel for V) and the errors."""
    calls = rec.calls
    reference = [base_fn(module, q, k, v, m, *a, **kw)[0] for q, k, v, m, a, kw in calls]
    energy = sum(float(r.double().pow(2).sum()) for r in reference) or 1.0
    dev = rec.k_max.device  # where the layer ran: the clips index and scale its statistics there
    grid_t = torch.tensor(grid, dtype=torch.float32, device=dev)
    ones_k = torch.ones(heads, 1, device=dev)

    # 1. K's clip per kv head, V read at its max scales
    v_max_scale = channel_scales(rec.v_max)
    k_err = torch.stack([_errors(base_fn, module, calls, channel_scales(rec.k_max.view(heads, dim), c * ones_k)
                                 .reshape(-1), v_max_scale, reference, heads).sum(1) for c in grid])  # [G, H]
    error_max = float(k_err[0].sum())
    k_clip = grid_t[k_err.argmin(0)]  # [H]; argmin keeps the first (1.0) on a tie
    k_scale = channel_scales(rec.k_max.view(heads, dim), k_clip[:, None]).reshape(-1)
    # 2. V's clip, K read at its chosen scales
    v_err = torch.stack([_errors(base_fn, module, calls, k_scale, channel_scales(rec.v_max, c), reference, heads)
                         for c in grid])  # [G, H, D]
    if granularity == "head":
        best = v_err.sum(2).argmin(0)  # [H]
        v_clip = grid_t[best][:, None].expand(heads, dim)
        error = float(v_err.sum(2).min(0).values.sum())
    else:
        best = v_err.argmin(0)  # [H, D]
        v_clip = grid_t[best]
        error = float(v_err.min(0).values.sum())
    v_scale = channel_scales(rec.v_max.view(heads, dim), v_clip).reshape(-1)
    return {"k_scale": k_scale, "v_scale": v_scale, "k_clip": k_clip.tolist(),
            "v_clip": (v_clip[:, 0] if granularity == "head" else v_clip.mean(1)).tolist(),
            "rel_error_max": error_max / energy, "rel_error": error / energy}


@torch.no_grad()
def calibrate_kv_cache(model: nn.Module, calib_ids: torch.Tensor, cache_type: str = "C8", clip: str = "max",
                       granularity: str = "channel", grid=DEFAULT_GRID, batch_size: int = 1,
                       search_windows: int = DEFAULT_SEARCH_WINDOWS) -> dict:
    """Calibrate per-channel static KV-cache scales of every decoder layer and attach them; returns a report.

    ``calib_ids``: token ids ``[n, seqlen]`` (the calibration windows). ``clip``: ``"max"`` (``max|x| / 127`` per
    channel, msModelSlim's rule) or ``"search"`` (that, times a clip factor from ``grid`` chosen per kv head, or
    for V per channel with ``granularity="channel"``, minimising the layer's attention-output error over the first
    ``search_windows`` windows). Offsets are 0. The scales go on the model with :func:`attach_kv_cache`, in the
    model dtype; the attention itself is left as it was (``use_kv_cache_attention`` reads K and V through them).

    The report: ``cache_type``, ``clip``, ``granularity``, ``windows``, ``search_windows``, ``seconds`` and per
    layer ``k_clip`` (per kv head), ``v_clip`` (per kv head; the mean over each head's channels with
    ``granularity="channel"``), ``rel_error_max`` and ``rel_error`` (the attention output's squared error over its
    squared norm, at the max scales and at the chosen ones; equal with ``clip="max"``).
    """
    kv_cache_scheme_for(cache_type)  # a registered KV-cache type, else a ValueError naming the choices
    if cache_type != "C8":
        raise ValueError(f"cache_type: calibrate_kv_cache chooses C8's static scales; {cache_type!r} is learned with "
                         "the linears (QuantConfig(kv_cache='KV4') in quantize)")
    one_of(clip, "clip", CLIPS)
    one_of(granularity, "granularity", GRANULARITIES)
    positive_int(batch_size, "batch_size")
    positive_int(search_windows, "search_windows")
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.dtype != torch.long:
        raise ValueError(f"calib_ids: expected a LongTensor [n, seqlen], got {getattr(calib_ids, 'dtype', calib_ids)} "
                         f"{tuple(getattr(calib_ids, 'shape', ()))}")
    grid = tuple(float(c) for c in grid)
    if not grid or not all(math.isfinite(c) and 0 < c <= 1 for c in grid):
        raise ValueError(f"grid: expected clip factors in (0, 1], got {grid!r}")
    grid = (1.0,) + tuple(c for c in grid if c != 1.0)  # 1.0 first: the search never does worse than the max
    t0 = time.perf_counter()
    heads, dim = kv_sizes(model)
    dtype = model_dtype(model)
    device = module_device(model)
    was_training = model.training
    model.eval()
    layers = decoder_layers(model)
    keep = search_windows  # the error is reported for "max" too, on the same windows
    X, kwargs_by_bs = capture_layer_inputs(model, calib_ids, batch_size, device=device, dtype=dtype)
    k_scales, v_scales, rows = [], [], []
    try:
        for i, layer in enumerate(layers):
            rec = _LayerRecord(keep)
            with recording_attention(model, rec) as base_fn:
                for s, e in batches(X.shape[0], batch_size):
                    X.write(s, run_layer(layer, X[s:e].to(dtype), kwargs_by_bs[e - s]))
            module = layer.self_attn
            if clip == "search":
                found = _search(base_fn, module, rec, heads, dim, grid, granularity)
            else:
                found = {"k_scale": channel_scales(rec.k_max), "v_scale": channel_scales(rec.v_max),
                         "k_clip": [1.0] * heads, "v_clip": [1.0] * heads}
                ref = [base_fn(module, q, k, v, m, *a, **kw)[0] for q, k, v, m, a, kw in rec.calls]
                energy = sum(float(r.double().pow(2).sum()) for r in ref) or 1.0
                err = float(_errors(base_fn, module, rec.calls, found["k_scale"], found["v_scale"], ref, heads).sum())
                found["rel_error_max"] = found["rel_error"] = err / energy
            k_scales.append(found.pop("k_scale"))
            v_scales.append(found.pop("v_scale"))
            rows.append({"layer": i, **found})
            log.info("layer %d: KV-cache clip K %s V %s, attention error %.3g -> %.3g", i,
                     [round(c, 3) for c in found["k_clip"]], [round(c, 3) for c in found["v_clip"]],
                     found["rel_error_max"], found["rel_error"])
            del rec
    finally:
        model.train(was_training)
    attach_kv_cache(model, k_scales, v_scales, cache_type=cache_type, dtype=dtype)
    return {"cache_type": cache_type, "clip": clip, "granularity": granularity if clip == "search" else None,
            "windows": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]),
            "search_windows": min(keep, int(calib_ids.shape[0])), "grid": list(grid),
            "seconds": time.perf_counter() - t0, "layers": rows}


__all__ = ["CLIPS", "DEFAULT_GRID", "GRANULARITIES", "cache_roundtrip", "calibrate_kv_cache", "channel_scales"]
