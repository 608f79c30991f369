"""The training loop of one decoder layer: AdamW on the layer-wise MSE, then a fake-quant pass."""
from __future__ import annotations

import math

import torch

from ..gptq import HessianAccumulator
from ..recipe import QuantConfig
from .capture import batches, run_layer
from .modules import FakeQuantLinear, install_fake_quant, uninstall_fake_quant


def train_layer(layer, groups, learned, X, Y, kwargs_by_bs, cfg: QuantConfig, layer_index: int,
                progress=None) -> tuple[dict, list[float]]:
    """AdamW on the layer-wise MSE; returns the learned tensors and the per-epoch mean losses."""
    transforms = install_fake_quant(layer, groups, learned, cfg, learn=True)
    try:
        for p in layer.parameters():
            p.requires_grad_(False)
        main, clips = [], []
        for tr in transforms.values():
            tr.left.requires_grad_(True)
            tr.right.requires_grad_(True)
            main += [tr.left, tr.right]
            if tr.log_smooth is not None:
                tr.log_smooth.requires_grad_(True)
                main.append(tr.log_smooth)
            if cfg.learn_act_clip:
                tr.act_clip.requires_grad_(True)
                clips.append(tr.act_clip)
        fqs = [m for m in layer.modules() if isinstance(m, FakeQuantLinear)]
        if cfg.learn_weight_clip:
            for m in fqs:
                m.weight_clip.requires_grad_(True)
                clips.append(m.weight_clip)
        lr = cfg.budget("lr")
        opt = torch.optim.AdamW([{"params": main, "lr": lr},
                                 {"params": clips, "lr": lr * cfg.clip_lr_mult}], weight_decay=0.0)
        spans = batches(X.shape[0], cfg.budget("batch_size"))
        epochs = cfg.budget("epochs")
        total = max(1, epochs * len(spans))
        r = cfg.min_lr_ratio
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + layer_index)
        epoch_losses = []
        for epoch in range(epochs):
            order = torch.randperm(len(spans), generator=gen, device="cpu").tolist()
            tot = 0.0
            for bi in order:
                s, e = spans[bi]
                out = run_layer(layer, X[s:e], kwargs_by_bs[e - s])
                loss = torch.nn.functional.mse_loss(out, Y[s:e])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                tot += float(loss.detach()) * (e - s)
            epoch_losses.append(tot / X.shape[0])
            if progress is not None:
                progress.set_postfix(layer=layer_index, epoch=epoch + 1, loss=f"{epoch_losses[-1]:.3g}")
        out = {}
        for name, tr in transforms.items():
            out[f"{name}.left"] = tr.left.detach().clone()
            out[f"{name}.right"] = tr.right.detach().clone()
            if tr.log_smooth is not None:
                out[f"{name}.log_smooth"] = tr.log_smooth.detach().clone()
            out[f"{name}.act_clip"] = tr.act_clip.detach().clone()
        for path, mod in layer.named_modules():
            if isinstance(mod, FakeQuantLinear):
                out[f"{path}.weight_clip"] = mod.weight_clip.detach().clone()
        return out, epoch_losses
    finally:
        uninstall_fake_quant(layer)


@torch.no_grad()
def fake_quant_pass(layer, groups, learned, X, Y, kwargs_by_bs, cfg, collect: bool):
    """One pass of the fake-quant layer built from ``learned``: its mean MSE against ``Y`` and,
    with ``collect``, ``H = b^T b`` of each group's quantized transformed inputs (for GPTQ)."""
    transforms = install_fake_quant(layer, groups, learned, cfg)
    hess = {}
    try:
        if collect:
            for name, tr in transforms.items():  # the shared-input cache makes q/k/v count once
                tr.collect = hess[name] = HessianAccumulator(tr.group.size)
        tot = 0.0
        for s, e in batches(X.shape[0], cfg.budget("batch_size")):
            out = run_layer(layer, X[s:e], kwargs_by_bs[e - s])
            tot += float(torch.nn.functional.mse_loss(out, Y[s:e])) * (e - s)
        return tot / X.shape[0], (hess if collect else None)
    finally:
        uninstall_fake_quant(layer)
