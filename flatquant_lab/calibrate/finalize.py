"""Finalisation of one decoder layer: fold the smoothing, quantize every weight (RTN or GPTQ), swap in the
quantized layers, each built by its checkpoint scheme from the integer weights computed here
(``W4A4_FLATQUANT_DYNAMIC`` for FlatQuant groups, ``W4A4_MXFP4_FLATQUANT`` for MXFP4 ones, ``W8A8_DYNAMIC`` for
W8A8_DYNAMIC ones)."""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .. import schemes
from ..devices import exact_dtype
from ..dtypes import HALF_DTYPES, check_half
from ..gptq import HessianAccumulator, gptq_clip_search, gptq_quantize, gptq_quantize_mxfp4
from ..kronecker import fold_weight
from ..layers import W8A8DynamicLinear
from ..models import set_submodule
from ..mxfp4 import MxOptions, quantize_weight_mxfp4
from ..quantizers import quantize_weight
from ..recipe import FLATQUANT, MXFP4, W8A8_DYNAMIC, WEIGHT_QUANTIZERS, QuantConfig
from .kv4 import fold_kv
from .memory import row_spans
from .state import LayerState


def w8a8_hessian_hooks(layer, groups, hessians: dict) -> list:
    """Forward pre-hooks that add ``H = x^T x`` of each W8A8_DYNAMIC group's input to ``hessians[group]``
    (one per group: q/k/v share their input); returns the handles to remove."""
    handles = []
    for g in groups:
        if g.scheme != W8A8_DYNAMIC:
            continue
        acc = hessians[g.name] = HessianAccumulator(g.size)

        def hook(_mod, args, acc=acc):
            acc.add(args[0].detach())

        handles.append(layer.get_submodule(g.linears[0]).register_forward_pre_hook(hook))
    return handles


def w8a8_dynamic_layer(linear: nn.Linear, weights: str = "rtn", hessian: torch.Tensor | None = None,
                       act_dtype: torch.dtype | None = None, backend: str | None = None, gptq_block: int = 128,
                       gptq_damp: float = 0.01, gptq_act_order: bool = True) -> W8A8DynamicLinear:
    """Quantize ``linear.weight`` per output channel to int8 (round to nearest, or GPTQ with ``hessian``) and build
    its W8A8_DYNAMIC layer.

    The scale ``max|w_row| / 127`` is rounded to ``act_dtype`` first (what runs after vllm-ascend's load) and the
    codes are computed against that rounded scale; GPTQ moves the codes, never the scale.
    """
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
    if weights not in WEIGHT_QUANTIZERS:
        raise ValueError(f"weights: expected one of {WEIGHT_QUANTIZERS}, got {weights!r}")
    if act_dtype is None:
        act_dtype = linear.weight.dtype if linear.weight.dtype in HALF_DTYPES else torch.bfloat16
    check_half(act_dtype)
    w = linear.weight.detach()  # quantize_weight and gptq_quantize pick the exact dtype of its device
    q, scale = quantize_weight(w, bits=8, scale_dtype=act_dtype)
    if weights == "gptq":
        k = w.shape[1]
        if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (k, k):
            raise ValueError(f"hessian: weights='gptq' needs H = X^T X of the layer's inputs, shape [{k}, {k}], "
                             f"got {getattr(hessian, 'shape', hessian)}")
        q = gptq_quantize(w, hessian, scale, block=gptq_block, damp=gptq_damp, act_order=gptq_act_order, bits=8)
    elif hessian is not None:
        raise ValueError("hessian: only used with weights='gptq'")
    return schemes.W8A8_DYNAMIC.from_float(linear, q, scale, act_dtype=act_dtype, backend=backend)


def _w8a8_group(layer, g, cfg: QuantConfig, learned, d_in, hessians, backend, xd) -> None:
    """Each linear of a W8A8_DYNAMIC group on its own: int8 RTN, or GPTQ with the group's float-input Hessian."""
    h = hessians[g.name].h if hessians is not None and g.name in hessians else None
    for path in g.linears:
        set_submodule(layer, path, w8a8_dynamic_layer(
            layer.get_submodule(path), weights="gptq" if h is not None else "rtn", hessian=h,
            act_dtype=cfg.schemes.act_dtype, backend=backend, gptq_block=cfg.gptq.block, gptq_damp=cfg.gptq.damp,
            gptq_act_order=cfg.gptq.act_order))


def _flatquant_group(layer, g, cfg: QuantConfig, learned, d_in, hessians, backend, xd) -> None:
    """The group's linears folded with its learned transform (in ``xd``), int4 RTN or one GPTQ pass over all."""
    state = learned[g.name]
    lt = state.left.to(cfg.schemes.act_dtype)
    rt = state.right.to(cfg.schemes.act_dtype)
    clip_ratio = state.clip_ratio()
    folded, scales, qs, clips = [], [], [], []
    for path in g.linears:
        weight = layer.get_submodule(path).weight
        clip = torch.sigmoid(state.weight_clip[path]).to(xd)
        clips.append(clip.reshape(-1))

        def fold(r0, r1):
            w = weight[r0:r1].to(xd)
            return fold_weight(w * d_in[g.name] if g.name in d_in else w, lt, rt, blocks=g.tp)

        if hessians is not None:  # GPTQ needs the group's folded weights together
            folded.append(fold(0, weight.shape[0]))
            q, scale = quantize_weight(folded[-1], clip)
        else:  # RTN: rows fold and round independently, a chunk at a time
            parts = [quantize_weight(fold(r0, r1), clip[r0:r1])
                     for r0, r1 in row_spans(*weight.shape, itemsize=torch.finfo(xd).bits // 8)]
            q, scale = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        qs.append(q)
        scales.append(scale)
    if hessians is not None:  # one GPTQ pass for the linears sharing this input
        opts = dict(block=cfg.gptq.block, damp=cfg.gptq.damp, act_order=cfg.gptq.act_order)
        if cfg.gptq.clip_grid:
            q_all, s_all = gptq_clip_search(torch.cat(folded), hessians[g.name].h,
                                            [torch.cat(clips), *cfg.gptq.clip_grid], **opts)
            scales = list(s_all.split([q.shape[0] for q in qs]))
        else:
            q_all = gptq_quantize(torch.cat(folded), hessians[g.name].h, torch.cat(scales), **opts)
        qs = list(q_all.split([q.shape[0] for q in qs]))
    for path, q, scale in zip(g.linears, qs, scales):
        set_submodule(layer, path, schemes.W4A4_FLATQUANT_DYNAMIC.from_float(
            layer.get_submodule(path), q.contiguous(), scale, act_dtype=cfg.schemes.act_dtype, backend=backend,
            tp_size=g.tp, left_trans=lt, right_trans=rt, clip_ratio=clip_ratio))


def _mxfp4_group(layer, g, cfg: QuantConfig, learned, d_in, hessians, backend, xd) -> None:
    """The group's linears folded with its learned transform (in ``xd``; ``L`` block-diagonal over ``g.blocks``),
    MXFP4 per output row and 32 along K under ``mx_scale_rule``: round to nearest, or one GPTQ pass over all of
    them with each group's E8M0 scales fixed from its updated columns (``gptq_quantize_mxfp4``; no act_order)."""
    state = learned[g.name]
    lt = state.left.to(cfg.schemes.act_dtype)
    rt = state.right.to(cfg.schemes.act_dtype)
    rule = cfg.schemes.mx_scale_rule
    folded = []
    for path in g.linears:
        weight = layer.get_submodule(path).weight
        w = weight.to(xd)
        folded.append(fold_weight(w * d_in[g.name] if g.name in d_in else w, lt, rt))
    if hessians is not None:  # one GPTQ pass for the linears sharing this input (rows are independent)
        q_all, s_all = gptq_quantize_mxfp4(torch.cat(folded), hessians[g.name].h, block=cfg.gptq.block,
                                           damp=cfg.gptq.damp, options=MxOptions(scale_rule=rule))
        rows = [f.shape[0] for f in folded]
        parts = list(zip(q_all.split(rows), s_all.split(rows)))
    else:
        parts = [quantize_weight_mxfp4(f, scale_rule=rule) for f in folded]
    for path, (q, scale) in zip(g.linears, parts):
        set_submodule(layer, path, schemes.W4A4_MXFP4_FLATQUANT.from_float(
            layer.get_submodule(path), q.contiguous(), scale.contiguous(), act_dtype=cfg.schemes.act_dtype,
            backend=backend, left_trans=lt, right_trans=rt, clip_ratio=state.clip_ratio(),
            max_supported_tp=cfg.schemes.mx_max_tp))


# Integer weights are the calibration method's, per recipe scheme; a float group (recipe.FLOAT) keeps its linears.
GROUP_FINALIZERS = {FLATQUANT: _flatquant_group, W8A8_DYNAMIC: _w8a8_group, MXFP4: _mxfp4_group}


@torch.no_grad()
def finalize_layer(layer, groups, learned: LayerState, cfg: QuantConfig, hessians=None, backend=None) -> None:
    """Fold the smoothing scales, quantize every weight, and swap in the quantized layers of each group's scheme.

    Smoothing: a norm's weight, or the preceding linear's rows, ``/ d``; the group's weights ``* d`` (in the fold).
    KV4 (``learned.kv``): ``T_v`` folded into ``v_proj`` and ``o_proj`` first, and the attention gets its ``KV4Cache``
    (C8 with ``T_v``: the fold alone; C8's scales are calibrated after the linears).

    ``hessians``: group name -> ``HessianAccumulator`` for GPTQ weights (FlatQuant groups: of the
    quantized transformed inputs; W8A8_DYNAMIC groups: of the float inputs); RTN without.
    """
    d_in = {}
    dev = next(layer.parameters()).device
    xd = exact_dtype(dev)  # float64 on the CPU; float32 on an accelerator
    if learned.kv is not None:  # KV4: T_v into v_proj / o_proj before the smoothing divides v_proj's rows
        fold_kv(layer, groups, learned.kv, xd, attach=cfg.schemes.kv_cache == "KV4")  # C8's comes after
    for g in groups:
        if not g.quantized or learned[g.name].log_smooth is None:
            continue
        d = learned[g.name].log_smooth.to(xd).exp()
        target = layer.get_submodule(g.smooth_target)
        if g.smooth_target.endswith("layernorm"):
            target.weight.copy_((target.weight.to(xd) / d).to(target.weight.dtype))
        else:  # rows of v_proj (kv channels) or up_proj, held in float32 until quantized (one linear's copy)
            wd = torch.promote_types(target.weight.dtype, torch.float32)
            target.weight.data = (target.weight.to(xd) / d[:, None]).to(wd)
            if target.bias is not None:
                target.bias.data = (target.bias.to(xd) / d).to(wd)
        if g.kv_tied is not None:
            kv, rep = g.kv_tied
            d = rearrange(d, "(kv hd) -> kv hd", kv=kv).repeat_interleave(rep, 0).flatten()
        d_in[g.name] = d
    for g in groups:  # after the smoothing fold above: W8A8_DYNAMIC rows may have taken a 1 / d
        finalize_group = GROUP_FINALIZERS.get(g.scheme)
        if finalize_group is not None:
            finalize_group(layer, g, cfg, learned, d_in, hessians, backend, xd)
