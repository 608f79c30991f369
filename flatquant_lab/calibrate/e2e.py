"""The end-to-end stage: after every decoder layer is quantized, tune what the checkpoint holds as floats.

Learned: one log-multiplier per output row of each ``W4A4FlatQuantLinear``, ``weight_scale <- weight_scale
exp(u)``, and one activation clip per shared input (``c = sigmoid(a)``; q/k/v share one and gate/up share one,
as vLLM loads one ``clip_ratio`` per fused module). The int4 codes and the transforms stay as the layer-wise
stage left them. Loss: ``KL(p_fp || p_q)`` per token, with ``p_fp = softmax(lm_head(norm(h_fp)))`` from the
full-precision last-layer hidden states the layer-wise stage already computed (no second model), Adam and a
cosine schedule. The forward rounds where the Ascend kernels round (straight-through), so the tuned
tensors written back are what the int4 path then computes.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from ..devices import module_device
from ..layers import W4A4FlatQuantLinear, W8A8DynamicLinear
from ..models import adapter_for, set_submodule
from ..quantizers import fake_quant_act, round_to as ste_cast
from ..recipe import QuantConfig
from .memory import recompute_blocks, saved_bytes
from .modules import _CodesMatmul, kron_rounded, logit
from .train import cosine_schedule

log = logging.getLogger(__name__)

# recompute_blocks="auto" recomputes each decoder layer in the backward pass when a step would keep more than
# this (the bundled model's steps keep about a GiB; a 7B model's at 4 x 2048 tokens, tens of GiB)
E2E_RECOMPUTE_MIN_BYTES = 4 * 2**30


class TunableW4A4(nn.Module):
    """Differentiable twin of one ``W4A4FlatQuantLinear``: its int4 path with ``weight_scale exp(u)`` and
    ``clip = sigmoid(clip_logit)`` (shared with the other linears of its input).

    Per tensor-parallel rank ``r`` (``kron(I_tp, L, R)``): ``b_r = Q4(round_16(L^T round_a(x_r) R))``,
    ``y_r = round_a(b_r @ (codes_r s)^T)`` (+ bias on rank 0); ``y = round_a(sum_r y_r)``.
    """

    def __init__(self, linear: W4A4FlatQuantLinear, clip_logit: nn.Parameter):
        super().__init__()
        self.linear = linear
        self.clip_logit = clip_logit
        self.log_mult = nn.Parameter(torch.zeros(linear.out_features, device=linear.weight_scale.device))

    def scale(self) -> torch.Tensor:
        """``weight_scale exp(u)`` ``[O, 1]`` in float32."""
        return self.linear.weight_scale.float() * self.log_mult.exp()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.linear
        act, tp = m.act_dtype, m.tp_size
        # p1 holds L^T: passing its transpose gives kron_rounded the L whose transpose it multiplies by
        t = kron_rounded(x.float(), m.p1.float().transpose(0, 1), m.p2.float(), tp, act)
        bq = fake_quant_act(t.flatten(-2), torch.sigmoid(self.clip_logit))  # per token and rank
        codes, s = m.weight_int, self.scale()
        k = m.in_features // tp
        total = None
        for r in range(tp):
            y = ste_cast(_CodesMatmul.apply(bq[..., r, :], codes[:, r * k:(r + 1) * k].float(), s), act)
            if r == 0 and m.bias is not None:  # in the output dtype, as vllm-ascend adds it (rank 0 only)
                y = ste_cast(y + m.bias.float(), act)
            total = y if total is None else total + y
        y = total if tp == 1 else ste_cast(total, act)  # the all-reduce: an fp32 sum, rounded once
        return y.to(x.dtype)


class _StraightThrough(torch.autograd.Function):
    """``y = layer(x)`` exactly (int8 per-token path); ``dx = g @ W_hat``, the dequantized weight (straight-through)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer, ctx.in_dtype = layer, x.dtype
        return layer(x)

    @staticmethod
    def backward(ctx, g):
        return (g.float() @ ctx.layer.dequantized_weight(torch.float32)).to(ctx.in_dtype), None


class PassW8A8(nn.Module):
    """A ``W8A8DynamicLinear`` (msModelSlim's o/down) as it computes, passing gradients on to the layers
    before it: without it the int8 casts would cut the graph and the W4A4 linears feeding it would learn nothing."""

    def __init__(self, linear: W8A8DynamicLinear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(x, self.linear) if torch.is_grad_enabled() else self.linear(x)


def _recompute(model: nn.Module, ids: torch.Tensor, cfg: QuantConfig) -> bool:
    """``cfg.recompute_blocks`` for the whole model's step; "auto": on when a step on ``ids`` would keep more
    than E2E_RECOMPUTE_MIN_BYTES of activations (counted by one forward)."""
    if cfg.recompute_blocks != "auto":
        return cfg.recompute_blocks
    kept = saved_bytes(lambda: model(input_ids=ids, use_cache=False).logits)
    on = kept > E2E_RECOMPUTE_MIN_BYTES
    log.info("end-to-end stage: a step keeps %.2f GiB of activations: recomputing each decoder layer %s",
             kept / 2**30, "on" if on else "off")
    return on


def _train(model, calib_ids, teacher_hidden, norm, head, opt, sched, gen, n, bs, epochs, steps, progress) -> list[float]:
    """The stage's loop: per step, KL(p_fp || p_q) on a shuffled batch of windows; returns the mean KL per epoch."""
    dev, dtype = module_device(model), next(head.parameters()).dtype
    kl_epochs = []
    bar = tqdm(total=steps, desc="end-to-end", unit="step", disable=not progress)
    for ep in range(epochs):
        total = 0.0
        for idx in torch.randperm(n, generator=gen, device="cpu").split(bs):  # the generator is the host's
            ids = calib_ids[idx].to(dev)
            with torch.no_grad():
                h = torch.cat([teacher_hidden[i:i + 1] for i in idx.tolist()]).to(dev, dtype)
                target = head(norm(h)).float().log_softmax(-1)
            out = model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
            loss = (target.exp() * (target - out)).sum(-1).mean()  # KL(p_fp || p_q) per token
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            kl = float(loss.detach())
            total += kl * len(idx)
            bar.update(1)
            bar.set_postfix(epoch=ep, kl=f"{kl:.4f}")
        kl_epochs.append(total / n)
        log.info("end-to-end epoch %d: KL %.4f", ep, kl_epochs[-1])
    bar.close()
    return kl_epochs


def clip_groups(model: nn.Module) -> dict[str, list[str]]:
    """Module names of the ``W4A4FlatQuantLinear`` sharing one input (and so one clip), per group:
    ``"model.layers.0.attn" -> [q_proj, k_proj, v_proj]`` (their full names)."""
    adapter = adapter_for(model)
    groups = {}
    for i, layer in enumerate(adapter.decoder_layers(model)):
        prefix = adapter.layer_prefix(i)
        for g in adapter.groups:
            names = [f"{prefix}.{lin}" for lin in g.linears
                     if isinstance(layer.get_submodule(lin), W4A4FlatQuantLinear)]
            if names:
                groups[f"{prefix}.{g.name}"] = names
    return groups


def _final_norm_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    norm = getattr(getattr(model, "model", None), "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(norm, nn.Module) or not isinstance(head, nn.Module):
        raise ValueError(f"model: the end-to-end stage needs model.model.norm and an output head; "
                         f"{type(model).__name__} lacks {'model.model.norm' if norm is None else 'the head'}")
    return norm, head


def tune_scales(model: nn.Module, calib_ids: torch.Tensor, teacher_hidden, cfg: QuantConfig,
                progress: bool = True) -> dict:
    """Tune every ``W4A4FlatQuantLinear``'s ``weight_scale`` rows and each input's ``clip_ratio`` in place
    (see module docstring) on the first ``cfg.budget("e2e_samples")`` windows of ``calib_ids`` ``[n, seqlen]``.

    ``teacher_hidden``: the full-precision model's last decoder layer outputs on ``calib_ids`` (a tensor or
    ``HeldActivations`` ``[n, seqlen, hidden]``, read one window at a time as ``teacher_hidden[i:i + 1]``). Runs
    where the model is; returns the stage's report (per-epoch KL, seconds, the multipliers' range, the clips).
    """
    t0 = time.perf_counter()
    n = cfg.budget("e2e_samples")
    if calib_ids.dim() != 2 or calib_ids.shape[0] < n:
        raise ValueError(f"calib_ids: expected [n >= {n} (e2e_samples), seqlen] token ids, got {tuple(calib_ids.shape)}")
    if tuple(teacher_hidden.shape[:2]) != tuple(calib_ids.shape):
        raise ValueError(f"teacher_hidden: expected [{calib_ids.shape[0]}, {calib_ids.shape[1]}, hidden] (one state "
                         f"per calibration token), got {tuple(teacher_hidden.shape)}")
    dev = module_device(model)
    norm, head = _final_norm_and_head(model)
    groups = clip_groups(model)
    if not groups or cfg.budget("e2e_epochs") == 0:
        log.info("end-to-end stage: %s", "e2e_epochs=0" if groups else "no W4A4FlatQuantLinear to tune")
        return {"samples": n, "epochs": 0, "kl": [], "seconds": 0.0}
    twins: dict[str, TunableW4A4] = {}
    clips: dict[str, nn.Parameter] = {}
    for key, names in groups.items():
        mods = [model.get_submodule(nm) for nm in names]
        c = {float(m.clip_ratio.item()) for m in mods}
        if len(c) > 1:  # a checkpoint edited by hand: keep each its own clip rather than merge them
            log.warning("%s: its linears have different clip ratios %s; each keeps its own", key, sorted(c))
        for nm, m in zip(names, mods):
            ck = key if len(c) == 1 else nm
            if ck not in clips:
                clips[ck] = nn.Parameter(torch.tensor(logit(min(float(m.clip_ratio.item()), 1 - 1e-6)), device=dev))
            twins[nm] = TunableW4A4(m, clips[ck])
    passes = {nm: PassW8A8(m) for nm, m in model.named_modules() if isinstance(m, W8A8DynamicLinear)}
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in requires:
        p.requires_grad_(False)
    for nm, tw in [*twins.items(), *passes.items()]:
        set_submodule(model, nm, tw)
    lr = cfg.budget("e2e_lr")
    opt = torch.optim.Adam([{"params": [tw.log_mult for tw in twins.values()], "lr": lr},
                            {"params": list(clips.values()), "lr": lr * cfg.e2e_clip_lr_mult}])
    bs, epochs = cfg.budget("e2e_batch_size"), cfg.budget("e2e_epochs")
    steps = epochs * math.ceil(n / bs)
    sched = cosine_schedule(opt, steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    try:
        recompute = _recompute(model, calib_ids[:bs].to(dev), cfg)
        layers = list(adapter_for(model).decoder_layers(model))
        with recompute_blocks(layers) if recompute else nullcontext():
            kl_epochs = _train(model, calib_ids, teacher_hidden, norm, head, opt, sched, gen, n, bs, epochs, steps,
                               progress)
    finally:
        with torch.no_grad():
            for nm, tw in [*twins.items(), *passes.items()]:
                set_submodule(model, nm, tw.linear)
            for p, r in requires.items():
                p.requires_grad_(r)
    with torch.no_grad():
        mult = torch.cat([tw.log_mult.detach().exp() for tw in twins.values()])
        for tw in twins.values():
            tw.linear.weight_scale.copy_(tw.scale().to(tw.linear.weight_scale.dtype))
            tw.linear.set_clip_ratio(float(torch.sigmoid(tw.clip_logit)))
        tuned_clips = {k: float(torch.sigmoid(v)) for k, v in clips.items()}
    return {"samples": n, "epochs": epochs, "batch_size": bs, "lr": lr, "kl": kl_epochs, "recompute_layers": recompute,
            "scale_multiplier_range": [float(mult.min()), float(mult.max())], "clip_ratios": tuned_clips,
            "seconds": time.perf_counter() - t0}
