"""Finalisation of one decoder layer: fold the smoothing, quantize every weight (RTN or GPTQ), swap in the
quantized layers (``W4A4FlatQuantLinear`` for FlatQuant groups, ``W8A8DynamicLinear`` for W8A8_DYNAMIC ones)."""
from __future__ import annotations

import torch
from einops import rearrange

from ..devices import exact_dtype
from ..gptq import HessianAccumulator, gptq_clip_search, gptq_quantize
from ..kronecker import fold_weight
from ..layers import W4A4FlatQuantLinear, W8A8DynamicLinear
from ..models import set_submodule
from ..quantizers import quantize_weight
from ..recipe import W8A8_DYNAMIC, QuantConfig
from .memory import row_spans


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


@torch.no_grad()
def finalize_layer(layer, groups, learned, cfg: QuantConfig, hessians=None, backend=None) -> None:
    """Fold the smoothing scales, quantize every weight, and swap in the quantized layers of each group's scheme.

    ``hessians``: group name -> ``HessianAccumulator`` for GPTQ weights (FlatQuant groups: of the
    quantized transformed inputs; W8A8_DYNAMIC groups: of the float inputs); RTN without.
    """
    d_in = {}
    dev = next(layer.parameters()).device
    xd = exact_dtype(dev)  # float64 on the CPU; float32 on an accelerator
    for g in groups:
        if not g.quantized or f"{g.name}.log_smooth" not in learned:
            continue
        d = learned[f"{g.name}.log_smooth"].to(xd).exp()
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
    for g in groups:
        if g.scheme == W8A8_DYNAMIC:  # after the smoothing fold above: these rows may have taken a 1 / d
            h = hessians[g.name].h if hessians is not None and g.name in hessians else None
            for path in g.linears:
                set_submodule(layer, path, W8A8DynamicLinear.from_float(
                    layer.get_submodule(path), weights="gptq" if h is not None else "rtn", hessian=h,
                    act_dtype=cfg.schemes.act_dtype, backend=backend, gptq_block=cfg.gptq.block, gptq_damp=cfg.gptq.damp,
                    gptq_act_order=cfg.gptq.act_order))
            continue
        if not g.quantized:
            continue
        lt = learned[f"{g.name}.left"].to(cfg.schemes.act_dtype)
        rt = learned[f"{g.name}.right"].to(cfg.schemes.act_dtype)
        clip_ratio = float(torch.sigmoid(learned[f"{g.name}.act_clip"]).item())
        folded, scales, qs, clips = [], [], [], []
        for path in g.linears:
            weight = layer.get_submodule(path).weight
            clip = torch.sigmoid(learned[f"{path}.weight_clip"]).to(xd)
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
            lin = layer.get_submodule(path)
            tensors = {"weight": q.contiguous(), "weight_scale": scale, "weight_offset": torch.zeros_like(scale),
                       "left_trans": lt, "right_trans": rt,
                       "clip_ratio": torch.tensor([clip_ratio], dtype=torch.float32, device=dev)}
            if lin.bias is not None:
                tensors["bias"] = lin.bias.detach().to(cfg.schemes.act_dtype)
            set_submodule(layer, path, W4A4FlatQuantLinear.from_checkpoint(
                tensors, backend=backend, act_dtype=cfg.schemes.act_dtype, tp_size=g.tp))
