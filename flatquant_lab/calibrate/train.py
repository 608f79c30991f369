"""The training loop of one decoder layer: AdamW on the layer-wise MSE, then a fake-quant pass."""
from __future__ import annotations

import logging
import math

import torch

from ..gptq import HessianAccumulator
from ..recipe import QuantConfig
from .capture import batches, run_layer
from .finalize import w8a8_hessian_hooks
from .kv4 import kv_stand_in
from .memory import compact_saved_tensors, decide_recompute, recompute_blocks, saved_bytes
from .modules import FakeQuantLinear, install_fake_quant, uninstall_fake_quant
from .state import GroupState, LayerState

log = logging.getLogger(__name__)

# recompute_blocks="auto" leaves a step's activations in memory below this: recomputing them would cost
# one more forward per step to save less than a quarter GiB (the bundled model's steps keep tens of MiB)
RECOMPUTE_MIN_BYTES = 256 * 2**20


def _recompute(layer, transforms, X, kwargs, cfg: QuantConfig, layer_index: int) -> bool:
    """``cfg.placement.recompute_blocks``, with "auto" decided from the bytes a training step on ``X`` would keep."""

    def kept_bytes() -> int:
        for tr in transforms.values():
            tr.factors()
        kept = saved_bytes(lambda: run_layer(layer, X, kwargs), cfg.schemes.act_dtype)
        for tr in transforms.values():
            tr.forget_input()
        return kept

    weights = sum(t.numel() * t.element_size() for t in layer.parameters())
    on, kept = decide_recompute(cfg.placement.recompute_blocks, kept_bytes, max(weights, RECOMPUTE_MIN_BYTES))
    if kept is None:
        return on
    log.log(logging.INFO if layer_index == 0 else logging.DEBUG,
            "layer %d: a training step keeps %.1f MiB of activations (weights %.1f MiB): recompute_blocks %s",
            layer_index, kept / 2**20, weights / 2**20, "on" if on else "off")
    return on


def cosine_schedule(opt: torch.optim.Optimizer, steps: int, min_ratio: float = 0.0):
    """``lr_t = lr (r + (1 - r) (1 + cos(pi min(t, T) / T)) / 2)`` over ``T = max(1, steps)`` steps, ``r = min_ratio``."""
    total = max(1, steps)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))


def layer_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """``mse``: ``mean_t,c (out - y)^2``; ``relative``: ``mean_t [mean_c (out - y)^2 / mean_c y^2]``, each token's
    error relative to its target's mean square (detached), so that every token counts alike."""
    if kind == "mse":
        return torch.nn.functional.mse_loss(out, target)
    t = target.float()
    err = (out.float() - t).square().mean(-1)
    return (err / t.square().mean(-1).clamp_min(torch.finfo(torch.float32).tiny)).mean()


def train_layer(layer, groups, learned: LayerState, X, Y, kwargs_by_bs, cfg: QuantConfig, layer_index: int,
                progress=None) -> tuple[LayerState, list[float]]:
    """AdamW on the layer loss (``cfg.train.layer_loss``), from the ``learned`` start; returns the trained state
    and the per-epoch mean losses.

    The loop's choices come from ``cfg``: ``factor_param`` (how L, R are learned), ``loss_norm``,
    ``weight_decay`` (on every learned tensor), ``batch_order``; the logged losses are the
    layer loss (``cfg.train.layer_loss``) itself, not divided by its value as ``loss_norm`` steps.
    """
    transforms = install_fake_quant(layer, groups, learned, cfg, learn=True)
    try:
        for p in layer.parameters():
            p.requires_grad_(False)
        main, clips = [], []
        for tr in transforms.values():
            for p in tr.factor_parameters():
                p.requires_grad_(True)
                main.append(p)
            if tr.log_smooth is not None:
                tr.log_smooth.requires_grad_(True)
                main.append(tr.log_smooth)
            if cfg.train.learn_act_clip and not tr.group.mx:  # MXFP4: no clip learned (power-of-two scales)
                tr.act_clip.requires_grad_(True)
                clips.append(tr.act_clip)
        fqs = [m for m in layer.modules() if isinstance(m, FakeQuantLinear)]
        if cfg.train.learn_weight_clip:
            for m in fqs:
                if m.transform.group.mx:
                    continue
                m.weight_clip.requires_grad_(True)
                clips.append(m.weight_clip)
        kv = kv_stand_in(layer)
        if kv is not None:  # KV4: T_k, T_v with the factors, the clip logits with the clips (lr x clip_lr_mult)
            if cfg.schemes.kv_learned in ("kv", "v"):
                main += [p.requires_grad_(True) for p in kv.transform_parameters()]
            clips += [p.requires_grad_(True) for p in kv.clip_parameters()]
        lr = cfg.train.lr
        opt = torch.optim.AdamW([{"params": main, "lr": lr},
                                 {"params": clips, "lr": lr * cfg.train.clip_lr_mult}], weight_decay=cfg.train.weight_decay)
        spans = batches(X.shape[0], cfg.train.batch_size)
        epochs = cfg.train.epochs
        sched = cosine_schedule(opt, epochs * len(spans), cfg.train.min_lr_ratio)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + layer_index)
        epoch_losses = []
        blocks = []
        s, e = max(spans, key=lambda se: se[1] - se[0])  # the largest step decides
        if _recompute(layer, transforms, X[s:e], kwargs_by_bs[e - s], cfg, layer_index):
            # the modules holding the quantized linears: attention and MLP
            paths = sorted({lin.rpartition(".")[0] for g in groups if g.quantized for lin in g.linears})
            blocks = [layer.get_submodule(p) for p in paths]
        # a transform's last input would keep the block's activations alive: drop it after each block
        with recompute_blocks(blocks, after=lambda _block: [tr.forget_input() for tr in transforms.values()]):
            for epoch in range(epochs):
                if cfg.train.batch_order == "shuffle":
                    order = torch.randperm(len(spans), generator=gen, device="cpu").tolist()
                else:
                    order = range(len(spans))
                tot = 0.0
                for bi in order:
                    s, e = spans[bi]
                    for tr in transforms.values():  # this step's factors and inverses, built once outside the
                        tr.factors()  # blocks: a recomputed block must save what its first forward saved
                    with compact_saved_tensors(cfg.schemes.act_dtype):
                        out = run_layer(layer, X[s:e], kwargs_by_bs[e - s])
                        loss = layer_loss(out, Y[s:e], cfg.train.layer_loss)
                    # loss / loss.detach() has value 1 and gradient grad(loss) / loss: every batch moves the
                    # parameters as if its loss were 1, and Adam's epsilon no longer swamps tiny gradients
                    objective = loss / loss.detach() if cfg.train.loss_norm else loss
                    opt.zero_grad(set_to_none=True)
                    objective.backward()
                    opt.step()
                    sched.step()
                    tot += float(loss.detach()) * (e - s)
                epoch_losses.append(tot / X.shape[0])
                if progress is not None:
                    progress.set_postfix(layer=layer_index, epoch=epoch + 1, loss=f"{epoch_losses[-1]:.3g}")
        weight_clips = {path: mod.weight_clip.detach().clone() for path, mod in layer.named_modules()
                        if isinstance(mod, FakeQuantLinear)}
        trained = {}
        for name, tr in transforms.items():
            left, right = tr.matrices()
            trained[name] = GroupState(left, right, tr.act_clip.detach().clone(),
                                       {path: weight_clips[path] for path in tr.group.linears},
                                       None if tr.log_smooth is None else tr.log_smooth.detach().clone())
        return LayerState(trained, None if kv is None else kv.state()), epoch_losses
    finally:
        uninstall_fake_quant(layer)


@torch.no_grad()
def fake_quant_pass(layer, groups, learned: LayerState, X, Y, kwargs_by_bs, cfg, collect: bool):
    """One pass of the fake-quant layer built from the ``learned`` state: its mean MSE against ``Y`` and,
    with ``collect``, ``H = b^T b`` of each group's quantized transformed inputs (for GPTQ; of the
    float inputs for W8A8_DYNAMIC groups)."""
    transforms = install_fake_quant(layer, groups, learned, cfg)
    hess, handles = {}, []
    try:
        if collect:
            for name, tr in transforms.items():  # the shared-input cache makes q/k/v count once
                tr.collect = hess[name] = HessianAccumulator(tr.group.size)
            handles = w8a8_hessian_hooks(layer, groups, hess)
        tot = 0.0
        for s, e in batches(X.shape[0], cfg.train.batch_size):
            out = run_layer(layer, X[s:e], kwargs_by_bs[e - s])
            tot += float(torch.nn.functional.mse_loss(out, Y[s:e])) * (e - s)
        return tot / X.shape[0], (hess if collect else None)
    finally:
        for h in handles:
            h.remove()
        uninstall_fake_quant(layer)
