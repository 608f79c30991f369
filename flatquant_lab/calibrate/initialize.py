"""Starting state of a layer: Kronecker factors, smoothing ``log d`` and clip logits (searched or fixed), and the KV4
cache's ``T_k``, ``T_v`` and clip logits with ``kv_cache="KV4"`` (calibrate/kv4.py).

An MXFP4 group starts with ``L`` block-diagonal (``Group.blocks`` factors of the method's kind, one per block) and
with clip ratio 1: its weights have no clip, and its activations one only with ``mx_apply_clip`` (then searched on
the MXFP4 error like the int4 one)."""
from __future__ import annotations

import functools
import math

import torch
from einops import rearrange
from torch import nn

from ..quantizers import fake_quant_act, fake_quant_mx, fake_quant_weight
from ..recipe import QuantConfig
from ..transforms import orthogonal_factor
from .kv4 import init_kv_state
from .memory import row_spans
from .modules import KronTransform, logit, mx_options
from .plan import Group
from .state import GroupState, LayerState

CLIP_CAP = 0.995  # a sigmoid factor cannot reach 1: start searches' winners here at most


@functools.cache
def clip_grid() -> tuple[float, ...]:
    """The candidate clip ratios: 16 float32 values from 1.0 down to 0.55 (computed on first use, not at import)."""
    return tuple(float(c) for c in torch.linspace(1.0, 0.55, 16, dtype=torch.float32, device="cpu"))


def _search_act_clip(b: torch.Tensor) -> float:
    """The clip ratio in clip_grid() with the least per-token int4 MSE on transformed activations ``b``."""
    grid = clip_grid()
    errs = [float(((fake_quant_act(b, c) - b) ** 2).sum()) for c in grid]
    return grid[min(range(len(errs)), key=errs.__getitem__)]  # the first of equal minima, as argmin


def _search_mx_act_clip(b: torch.Tensor, options) -> float:
    """The clip ratio in clip_grid() with the least MXFP4 MSE on transformed activations ``b`` (``apply_clip``)."""
    grid = clip_grid()
    errs = [float(((fake_quant_mx(b, options, c) - b) ** 2).sum()) for c in grid]
    return grid[min(range(len(errs)), key=errs.__getitem__)]


def _search_weight_clip(w: torch.Tensor) -> torch.Tensor:
    """Per row, the clip ratio in clip_grid() with the least int4 round-to-nearest MSE."""
    errs = torch.stack([((fake_quant_weight(w, torch.full((w.shape[0],), c, device=w.device)) - w) ** 2).sum(1)
                        for c in clip_grid()])
    return torch.tensor(clip_grid(), dtype=torch.float32, device=w.device)[errs.argmin(0)]


@torch.no_grad()
def init_learned(layer: nn.Module, groups: list[Group], cfg: QuantConfig, stats: dict | None,
                 layer_index: int) -> LayerState:
    """Starting state of each FlatQuant group: factors, smoothing ``log d``, clip logits (searched or fixed)."""
    learned = {}
    baseline = cfg.method != "flatquant"
    kind = {"rtn": "identity", "hadamard": "hadamard"}.get(cfg.method, cfg.train.transform_init)
    dev = next(layer.parameters()).device  # every starting tensor is made where the layer is
    for gi, g in enumerate(groups):
        if not g.quantized:
            continue
        seed = cfg.seed * 100003 + layer_index * 17 + gi * 2
        if g.mx:  # block-diagonal over g.blocks: each block a factor of its own
            b = g.n1 // g.blocks
            left = torch.block_diag(*[orthogonal_factor(b, kind, seed + 2 * 7919 * j, device=dev, dtype=torch.float32)
                                      for j in range(g.blocks)])
        else:
            left = orthogonal_factor(g.n1, kind, seed, device=dev, dtype=torch.float32)
        right = orthogonal_factor(g.n2, kind, seed + 1, device=dev, dtype=torch.float32)
        weights = [layer.get_submodule(p).weight.detach() for p in g.linears]  # in the model's dtype
        log_smooth = None
        if not baseline and g.smooth_target and stats is not None:
            act = stats[g.name]["absmax"].clamp_min(1e-5)
            wmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0).float().clamp_min(1e-5)
            if g.kv_tied is not None:  # one d per kv channel: reduce over the query heads sharing it
                kv, rep = g.kv_tied
                act = rearrange(act, "(kv rep hd) -> kv rep hd", kv=kv, rep=rep).amax(1).flatten()
                wmax = rearrange(wmax, "(kv rep hd) -> kv rep hd", kv=kv, rep=rep).amax(1).flatten()
            # d = max|x|^alpha / max|W|^(1 - alpha): the smoothing that balances the two ranges
            d = (act.pow(cfg.train.smooth_alpha) / wmax.pow(1 - cfg.train.smooth_alpha)).clamp(1e-4, 1e4)
            log_smooth = d.log()
        tr = KronTransform(g, left, right, log_smooth, torch.zeros(1, device=dev), cfg.schemes.act_dtype,
                           mx=mx_options(cfg) if g.mx else None)
        if baseline or (g.mx and not cfg.schemes.mx_apply_clip):  # the full range: clip ratio 1 (logit +inf)
            act_clip = math.inf
        elif g.mx and cfg.train.act_clip_init == "search" and stats is not None:
            act_clip = logit(min(_search_mx_act_clip(tr.transformed(stats[g.name]["sample"]), tr.mx[0]), CLIP_CAP))
        elif cfg.train.act_clip_init == "search" and stats is not None:
            act_clip = logit(min(_search_act_clip(tr.per_rank(tr.transformed(stats[g.name]["sample"]))), CLIP_CAP))
        else:
            act_clip = logit(CLIP_CAP) if cfg.train.act_clip_init == "search" else float(cfg.train.act_clip_init)
        weight_clip = {}
        for p, w in zip(g.linears, weights):
            if baseline or g.mx:  # MXFP4 weights: no clip (their scale rule picks the exponent)
                logits = torch.full((w.shape[0],), math.inf, device=dev)
            elif cfg.train.weight_clip_init == "search":  # rows search independently: a chunk of rows at a time
                ratios = torch.cat([_search_weight_clip(tr.fold(w[r0:r1].float())) for r0, r1 in row_spans(*w.shape)])
                logits = torch.logit(ratios.clamp_max(CLIP_CAP))
            else:
                logits = torch.full((w.shape[0],), float(cfg.train.weight_clip_init), device=dev)
            weight_clip[p] = logits
        learned[g.name] = GroupState(left, right, torch.tensor([act_clip], device=dev), weight_clip, log_smooth)
    return LayerState(learned, init_kv_state(layer, groups, cfg, layer_index))
