"""The end-to-end stage: after every decoder layer is quantized, tune what the checkpoint holds as floats.

Learned: one log-multiplier per output row of each ``W4A4FlatQuantLinear``, ``weight_scale <- weight_scale
exp(u)``, and one activation clip per shared input (``c = sigmoid(a)``; q/k/v share one and gate/up share one,
as vLLM loads one ``clip_ratio`` per fused module); with a KV4 cache, its clip pairs of K and V (logits, through a
twin of each ``KV4Cache``). A ``W4A4MXFP4FlatQuantLinear`` has no float scale (E8M0 powers of two) and no clip
that acts: its transforms are what is tuned, ``L <- L (I + A)``, ``R <- R (I + B)``, one pair per shared input,
``A`` per diagonal block of a row-parallel ``L`` (so every TP size up to ``max_supported_tp`` still loads). The
int4 and FP4 codes (and the int4 transforms) stay as the layer-wise stage left them.
Loss: ``KL(p_fp || p_q)`` per token, with ``p_fp = softmax(lm_head(norm(h_fp)))`` from the
full-precision last-layer hidden states the layer-wise stage already computed (no second model), Adam and a
cosine schedule. The forward rounds where the Ascend kernels round (straight-through), so the tuned
tensors written back are what the int4 path then computes.

Guard: ``KL(p_fp || p_q)`` is measured over ``e2e_holdout`` calibration windows the stage never trains on,
before it starts and after each epoch (through the twins); the best state seen is kept, the starting one included,
and only if it also beats the start through the int4 modules themselves (else the model is the layer-wise one bit
for bit). A step with a non-finite loss or gradient is skipped; a non-finite parameter ends the stage. Both warn
(docs/method.md, "The end-to-end stage").
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from ..devices import module_device
from ..layers import (KV_CACHE_ATTR, KV4Cache, W4A4FlatQuantLinear, W4A4MXFP4FlatQuantLinear, W8A8DynamicLinear,
                      kv4_attention_inputs, sum_over_ranks)
from ..layers.w4a4_mxfp4_flatquant import block_diagonal_problem
from ..models import adapter_for, clip_groups, is_row_parallel, kv_caches, set_submodule
from ..mxfp4 import GROUP as MX_GROUP, MxOptions, e2m1_values, e8m0_values, unpack_fp4
from ..quantizers import fake_quant_act, fake_quant_mx, round_to as ste_cast
from ..recipe import QuantConfig
from .memory import decide_recompute, recompute_blocks, saved_bytes
from .modules import CodesMatmul, diagonal_blocks, kron_rounded, logit, mx_kron_rounded, mx_options
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
        # the layer-wise scale: the linear's own buffer is overwritten with candidates while the guard measures them
        self.register_buffer("base_scale", linear.weight_scale.detach().clone(), persistent=False)

    def scale(self, log_mult: torch.Tensor | None = None) -> torch.Tensor:
        """``weight_scale exp(u)`` ``[O, 1]`` in float32 (``u``: this twin's, or a kept copy of it)."""
        return self.base_scale.float() * (self.log_mult if log_mult is None else log_mult).exp()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.linear
        act, tp = m.act_dtype, m.tp_size
        # p1 holds L^T: passing its transpose gives kron_rounded the L whose transpose it multiplies by
        t = kron_rounded(x.float(), m.p1.float().transpose(0, 1), m.p2.float(), tp, act)
        bq = fake_quant_act(t.flatten(-2), torch.sigmoid(self.clip_logit))  # per token and rank
        codes, s = m.weight_int, self.scale()
        k = m.in_features // tp

        def rank_output(r: int) -> torch.Tensor:
            return ste_cast(CodesMatmul.apply(bq[..., r, :], codes[:, r * k:(r + 1) * k].float(), s), act)

        # the layer's own per-rank sum, bias and all-reduce rounding, with straight-through roundings
        y = sum_over_ranks(rank_output, tp, None if m.bias is None else m.bias.float(), lambda t: ste_cast(t, act))
        return y.to(x.dtype)


class MxWeightMatmul(torch.autograd.Function):
    """``y = b @ W^T`` with ``W = codes * s`` per group of 32 along K: ``codes`` int8 (twice the E2M1 value, an
    integer), ``s`` half the E8M0 scale (float32; products exact). ``W`` is fixed (no gradient) and rebuilt in each
    pass, one linear at a time, so the stage keeps one byte per weight rather than a float copy of the model."""

    @staticmethod
    def forward(ctx, b, codes, s):
        ctx.save_for_backward(codes, s)
        return b @ _mx_weight(codes, s).transpose(0, 1)

    @staticmethod
    def backward(ctx, gy):
        return gy @ _mx_weight(*ctx.saved_tensors), None, None


def _mx_weight(codes: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (codes.unflatten(-1, (-1, MX_GROUP)).float() * s[..., None]).flatten(-2)


def mx_rank_codes(m: W4A4MXFP4FlatQuantLinear, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``r``'s ``[O, K / tp]`` columns of the FP4 weight: ``(int8 2 * E2M1 value, float32 E8M0 scale / 2)``."""
    k = m.in_features // m.tp_size
    packed = m.weight[:, r * k // 2:(r + 1) * k // 2]
    scale = m.weight_scale[:, r * k // MX_GROUP:(r + 1) * k // MX_GROUP]
    codes = (2 * e2m1_values(unpack_fp4(packed))).to(torch.int8)  # 2 x {0, 0.5, ..., 6}: integers up to 12
    return codes, e8m0_values(scale, torch.float32) / 2


class MxTransformTuning(nn.Module):
    """The tuned transforms of one MXFP4 input (q/k/v share one, gate/up share one): ``L (I + A)``, ``R (I + B)``,
    ``A`` one block per diagonal block of ``L`` (``blocks``: ``max_supported_tp`` for a row-parallel input, each rank
    keeping its own block), both zero at the start."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor, blocks: int, act_dtype: torch.dtype):
        super().__init__()
        n1, n2 = left.shape[0], right.shape[0]
        self.act_dtype = act_dtype  # what the layer rounds its transforms to (a float32 model keeps them in float32)
        self.register_buffer("left_blocks", diagonal_blocks(left.detach().float(), blocks), persistent=False)
        self.register_buffer("right_start", right.detach().float().clone(), persistent=False)  # not the layer's own
        self.a = nn.Parameter(torch.zeros(blocks, n1 // blocks, n1 // blocks, device=left.device))
        self.b = nn.Parameter(torch.zeros(n2, n2, device=left.device))

    def matrices(self, a: torch.Tensor | None = None,
                 b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L (I + A), R (I + B))`` rounded to the act dtype (straight-through), float32; ``a``, ``b``: kept copies
        in place of this tuning's own."""
        a = self.a if a is None else a
        b = self.b if b is None else b
        eye_a = torch.eye(a.shape[-1], device=a.device)
        left = torch.block_diag(*(self.left_blocks @ (eye_a + a)).unbind(0))
        right = self.right_start @ (torch.eye(b.shape[0], device=b.device) + b)
        return ste_cast(left, self.act_dtype), ste_cast(right, self.act_dtype)


class TunableMXFP4(nn.Module):
    """Differentiable twin of one ``W4A4MXFP4FlatQuantLinear``: its FP4 path with the transforms of ``tuning``.

    Per rank ``r`` (diagonal block ``L_r``): ``b_r = MX4(bf16(L_r^T round_a(x_r) R))``,
    ``y_r = round_a(b_r @ W_r^T)`` (+ bias on rank 0); ``y = round_a(sum_r y_r)``; ``W_r`` the fixed FP4 weight.
    """

    def __init__(self, linear: W4A4MXFP4FlatQuantLinear, tuning: MxTransformTuning, options: MxOptions):
        super().__init__()
        self.linear = linear
        self.tuning = tuning
        self.options = options
        self.codes = [mx_rank_codes(linear, r) for r in range(linear.tp_size)]  # fixed while the stage runs
        self.clip = float(linear.clip_ratio.item())  # fixed too: read once, not on every step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.linear
        act, tp = m.act_dtype, m.tp_size
        left, right = self.tuning.matrices()
        k, b1 = m.in_features // tp, m.n1 // tp

        def rank_output(r: int) -> torch.Tensor:
            t = mx_kron_rounded(x[..., r * k:(r + 1) * k].float(), left[r * b1:(r + 1) * b1, r * b1:(r + 1) * b1],
                                right, act)
            bq = fake_quant_mx(t.flatten(-2), self.options, self.clip)
            return ste_cast(MxWeightMatmul.apply(bq, *self.codes[r]), act)

        y = sum_over_ranks(rank_output, tp, None if m.bias is None else m.bias.float(), lambda t: ste_cast(t, act))
        return y.to(x.dtype)


class TunableKV4(nn.Module):
    """Differentiable twin of one ``KV4Cache``: its clip pairs ``sigmoid(k_logit)``, ``sigmoid(v_logit)`` learned,
    ``T_k`` as it is."""

    def __init__(self, cache: KV4Cache):
        super().__init__()
        self.cache = cache
        self.k_logit, self.v_logit = (nn.Parameter(torch.logit(c.detach().float().clamp_max(1 - 1e-6)))
                                      for c in (cache.k_clip, cache.v_clip))

    def apply(self, query, key, value):
        c = self.cache
        return kv4_attention_inputs(query, key, value, c.k_trans, c.k_trans_inv_t, torch.sigmoid(self.k_logit),
                                    torch.sigmoid(self.v_logit))


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
    """``cfg.placement.recompute_blocks`` for the whole model's step; "auto": on when a step on ``ids`` would keep more
    than E2E_RECOMPUTE_MIN_BYTES of activations (counted by one forward)."""
    on, kept = decide_recompute(cfg.placement.recompute_blocks,
                                lambda: saved_bytes(lambda: model(input_ids=ids, use_cache=False).logits),
                                E2E_RECOMPUTE_MIN_BYTES)
    if kept is None:
        return on
    log.info("end-to-end stage: a step keeps %.2f GiB of activations: recomputing each decoder layer %s",
             kept / 2**30, "on" if on else "off")
    return on


def _kl(target_logp: torch.Tensor, out_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_fp || p_q)`` per token ``[batch, seqlen]`` from the teacher's log-probabilities and the model's logits."""
    out = out_logits.float().log_softmax(-1)
    return (target_logp.exp() * (target_logp - out)).sum(-1)


def _teacher(teacher_hidden, idx: torch.Tensor, norm, head, dev, dtype) -> torch.Tensor:
    with torch.no_grad():
        h = torch.cat([teacher_hidden[i:i + 1] for i in idx.tolist()]).to(dev, dtype)
        return head(norm(h)).float().log_softmax(-1)


def _heldout_kl(model, calib_ids, teacher_hidden, idx: torch.Tensor, norm, head, bs: int) -> torch.Tensor:
    """Mean ``KL(p_fp || p_q)`` of each window of ``idx`` ``[len(idx)]`` (float64), through the model as it is."""
    dev, dtype = module_device(model), next(head.parameters()).dtype
    per_window = []
    with torch.no_grad():
        for b in idx.split(bs):
            target = _teacher(teacher_hidden, b, norm, head, dev, dtype)
            out = model(input_ids=calib_ids[b].to(dev), use_cache=False).logits
            per_window.append(_kl(target, out).mean(-1).double().cpu())
    return torch.cat(per_window)


def _finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _train_epoch(model, calib_ids, teacher_hidden, norm, head, opt, sched, order, bs, params, bar, ep) -> dict:
    """One epoch of ``KL(p_fp || p_q)`` steps over the windows ``order`` (already shuffled), in batches of ``bs``.

    A step whose loss or gradient is not finite is skipped (the schedule still advances, so the run stays the
    same run); a step that leaves a parameter non-finite ends the epoch with ``stopped`` set, the parameters
    put back to where they were before it. Returns the mean training KL, the skipped steps and ``stopped``.
    """
    dev, dtype = module_device(model), next(head.parameters()).dtype
    total, seen, skipped, stopped = 0.0, 0, 0, None
    for idx in order.split(bs):
        target = _teacher(teacher_hidden, idx, norm, head, dev, dtype)
        loss = _kl(target, model(input_ids=calib_ids[idx].to(dev), use_cache=False).logits).mean()
        opt.zero_grad(set_to_none=True)
        kl = float(loss.detach())
        if math.isfinite(kl):
            loss.backward()
        if not math.isfinite(kl) or not _finite(p.grad for p in params if p.grad is not None):
            skipped += 1
            opt.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # torch warns when the schedule steps before any optimiser step
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                sched.step()
            bar.update(1)
            continue
        before = [p.detach().clone() for p in params]
        opt.step()
        sched.step()
        bar.update(1)
        if not _finite(p.detach() for p in params):
            with torch.no_grad():
                for p, b in zip(params, before):
                    p.copy_(b)
            stopped = f"a step of epoch {ep} made a parameter non-finite"
            break
        total += kl * len(idx)
        seen += len(idx)
        bar.set_postfix(epoch=ep, kl=f"{kl:.4f}")
    return {"kl": total / seen if seen else float("nan"), "skipped": skipped, "stopped": stopped}


def _final_norm_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    norm = getattr(getattr(model, "model", None), "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(norm, nn.Module) or not isinstance(head, nn.Module):
        raise ValueError(f"model: the end-to-end stage needs model.model.norm and an output head; "
                         f"{type(model).__name__} lacks {'model.model.norm' if norm is None else 'the head'}")
    return norm, head


def tune_scales(model: nn.Module, calib_ids: torch.Tensor, teacher_hidden, cfg: QuantConfig,
                progress: bool = True) -> dict:
    """Tune every ``W4A4FlatQuantLinear``'s ``weight_scale`` rows and each input's ``clip_ratio``, and every
    ``W4A4MXFP4FlatQuantLinear``'s transforms, in place (see module docstring) on the first ``e2e_samples``
    windows of ``calib_ids`` ``[n, seqlen]``, keeping the state with the least KL on its last ``e2e_holdout``
    windows (the starting state included).

    ``teacher_hidden``: the full-precision model's last decoder layer outputs on ``calib_ids`` (a tensor or
    ``HeldActivations`` ``[n, seqlen, hidden]``, read one window at a time as ``teacher_hidden[i:i + 1]``). Runs
    where the model is; returns the stage's report: training KL per epoch, held-out KL before and after each
    epoch, the epoch kept (0: the layer-wise state), skipped steps, seconds, the multipliers' range, the clips.
    """
    t0 = time.perf_counter()
    n, held = cfg.e2e.samples, cfg.e2e.holdout
    if calib_ids.dim() != 2 or calib_ids.shape[0] < n + held:
        raise ValueError(f"calib_ids: expected [n >= {n + held} (e2e_samples + e2e_holdout), seqlen] token ids, "
                         f"got {tuple(calib_ids.shape)}")
    if tuple(teacher_hidden.shape[:2]) != tuple(calib_ids.shape):
        raise ValueError(f"teacher_hidden: expected [{calib_ids.shape[0]}, {calib_ids.shape[1]}, hidden] (one state "
                         f"per calibration token), got {tuple(teacher_hidden.shape)}")
    dev = module_device(model)
    norm, head = _final_norm_and_head(model)
    groups = clip_groups(model)
    report = {"samples": n, "holdout": held, "epochs": 0, "kl": [], "heldout_kl": [], "kept_epoch": 0,
              "skipped_steps": 0, "stopped": None, "seconds": 0.0}
    if not groups or cfg.e2e.epochs == 0:
        log.info("end-to-end stage: %s", "e2e_epochs=0" if groups else "no W4A4 linear to tune")
        return report
    twins: dict[str, TunableW4A4] = {}
    mx_twins: dict[str, TunableMXFP4] = {}
    clips: dict[str, nn.Parameter] = {}
    tunings: dict[str, MxTransformTuning] = {}
    act_options = mx_options(cfg)[0]
    for key, names in groups.items():
        mods = [model.get_submodule(nm) for nm in names]
        if all(isinstance(m, W4A4MXFP4FlatQuantLinear) for m in mods):
            same = all(torch.equal(m.left_trans, mods[0].left_trans) and torch.equal(m.right_trans, mods[0].right_trans)
                       for m in mods)
            if not same:  # a checkpoint edited by hand: keep each its own transforms rather than merge them
                log.warning("%s: its linears have different transforms; each is tuned on its own", key)
            for nm, m in zip(names, mods):
                tk = key if same else nm
                if tk not in tunings:
                    blocks = m.max_supported_tp if is_row_parallel(nm) else 1
                    if block_diagonal_problem(m.left_trans, blocks):  # then it loads at TP 1 only: tune it whole
                        blocks = 1
                    tunings[tk] = MxTransformTuning(m.left_trans, m.right_trans, blocks, m.act_dtype)
                mx_twins[nm] = TunableMXFP4(m, tunings[tk], act_options)
            continue
        mods = [(nm, m) for nm, m in zip(names, mods) if isinstance(m, W4A4FlatQuantLinear)]
        c = {float(m.clip_ratio.item()) for _, m in mods}
        if len(c) > 1:  # a checkpoint edited by hand: keep each its own clip rather than merge them
            log.warning("%s: its linears have different clip ratios %s; each keeps its own", key, sorted(c))
        for nm, m in mods:
            ck = key if len(c) == 1 else nm
            if ck not in clips:
                clips[ck] = nn.Parameter(torch.tensor(logit(min(float(m.clip_ratio.item()), 1 - 1e-6)), device=dev))
            twins[nm] = TunableW4A4(m, clips[ck])
    passes = {nm: PassW8A8(m) for nm, m in model.named_modules() if isinstance(m, W8A8DynamicLinear)}
    kv_twins = {p: TunableKV4(c) for p, c in kv_caches(model).items() if isinstance(c, KV4Cache)}
    kv_logits = [t for tw in kv_twins.values() for t in (tw.k_logit, tw.v_logit)]
    start = {nm: (tw.linear.weight_scale.detach().clone(), tw.linear.clip_ratio.detach().clone())
             for nm, tw in twins.items()}
    mx_start = {nm: (tw.linear.left_trans.clone(), tw.linear.right_trans.clone()) for nm, tw in mx_twins.items()}
    kv_start = {p: (tw.cache.k_clip.clone(), tw.cache.v_clip.clone()) for p, tw in kv_twins.items()}
    mx_params = [t for tu in tunings.values() for t in (tu.a, tu.b)]
    params = [*(tw.log_mult for tw in twins.values()), *clips.values(), *kv_logits, *mx_params]
    lr = cfg.e2e.lr
    opt = torch.optim.Adam([{"params": [tw.log_mult for tw in twins.values()], "lr": lr},
                            {"params": [*clips.values(), *kv_logits], "lr": lr * cfg.e2e.clip_lr_mult},
                            {"params": mx_params, "lr": lr * cfg.e2e.transform_lr_mult}])
    bs, epochs = cfg.e2e.batch_size, cfg.e2e.epochs
    steps = epochs * math.ceil(n / bs)
    sched = cosine_schedule(opt, steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    heldout = torch.arange(calib_ids.shape[0] - held, calib_ids.shape[0], device="cpu")  # indexes host tensors

    def write(snapshot) -> None:
        """Put a state into the int4 and FP4 modules and the KV4 caches: ``None``, the layer-wise one exactly; else
        (log_mults, clip logits, KV clip logits, the FP4 transforms' corrections)."""
        with torch.no_grad():
            for nm, tw in twins.items():
                scale, clip = start[nm]
                if snapshot is None:
                    tw.linear.weight_scale.copy_(scale)
                    tw.linear.clip_ratio.copy_(clip)
                else:
                    mults, logits = snapshot[:2]
                    tw.linear.weight_scale.copy_(tw.scale(mults[nm]).to(scale.dtype))
                    tw.linear.set_clip_ratio(float(torch.sigmoid(logits[id(tw.clip_logit)])))
            for p, tw in kv_twins.items():
                k, v = kv_start[p] if snapshot is None else (torch.sigmoid(t) for t in snapshot[2][p])
                tw.cache.k_clip.copy_(k)
                tw.cache.v_clip.copy_(v)
            for nm, tw in mx_twins.items():
                left, right = mx_start[nm] if snapshot is None else tw.tuning.matrices(*snapshot[3][id(tw.tuning)])
                tw.linear.left_trans.copy_(left)
                tw.linear.right_trans.copy_(right)
                tw.linear._derive()

    guard_seconds = [0.0]
    swapped = [*twins.items(), *mx_twins.items(), *passes.items()]

    def install(on: bool) -> None:
        for nm, tw in swapped:
            set_submodule(model, nm, tw if on else tw.linear)
        for p, tw in kv_twins.items():
            setattr(model.get_submodule(p), KV_CACHE_ATTR, tw if on else tw.cache)

    def measure(twin: bool) -> torch.Tensor:
        """Held-out KL per window: through the twins (cheap: what the epochs are compared on), or through the int4
        modules as they serve (the start, and the state kept, which must beat it there)."""
        t = time.perf_counter()
        install(twin)
        kl = _heldout_kl(model, calib_ids, teacher_hidden, heldout, norm, head, bs)
        guard_seconds[0] += time.perf_counter() - t
        return kl

    requires = {p: p.requires_grad for p in model.parameters()}
    bar = tqdm(total=steps, desc="end-to-end", unit="step", disable=not progress)
    try:
        kl0 = measure(twin=False)
        if not math.isfinite(float(kl0.mean())):
            warnings.warn(f"end-to-end stage: the layer-wise model's held-out KL is {float(kl0.mean())}; stage "
                          "skipped", stacklevel=2)
            report.update(heldout_kl=[float(kl0.mean())], stopped="non-finite held-out KL before training")
            return report
        for p in requires:
            p.requires_grad_(False)
        kept, best, best_snap = 0, measure(twin=True), None
        heldout_kl = [float(best.mean())]
        recompute = _recompute(model, calib_ids[:bs].to(dev), cfg)
        layers = list(adapter_for(model).decoder_layers(model))
        kl_epochs, skipped, stopped = [], 0, None
        for ep in range(epochs):
            install(True)
            order = torch.randperm(n, generator=gen, device="cpu")  # the generator is the host's
            with recompute_blocks(layers) if recompute else nullcontext():
                out = _train_epoch(model, calib_ids, teacher_hidden, norm, head, opt, sched, order, bs, params, bar, ep)
            kl_epochs.append(out["kl"])
            skipped += out["skipped"]
            snap = ({nm: tw.log_mult.detach().clone() for nm, tw in twins.items()},
                    {id(c): c.detach().clone() for c in clips.values()},
                    {p: (tw.k_logit.detach().clone(), tw.v_logit.detach().clone()) for p, tw in kv_twins.items()},
                    {id(tu): (tu.a.detach().clone(), tu.b.detach().clone()) for tu in tunings.values()})
            logits = [*(c.reshape(1) for c in snap[1].values()), *(t for pair in snap[2].values() for t in pair)]
            ratios = torch.sigmoid(torch.cat(logits)) if logits else None  # none with FP4 linears alone
            if ratios is not None and not bool(((ratios > 0) & (ratios <= 1)).all()):  # sigmoid 0 in float32
                heldout_kl.append(float("nan"))
                stopped = f"epoch {ep} left a clip ratio outside (0, 1]"
                break
            kl = measure(twin=True)
            heldout_kl.append(float(kl.mean()))
            log.info("end-to-end epoch %d: training KL %.4f, held-out KL %.4f", ep + 1, out["kl"], heldout_kl[-1])
            if heldout_kl[-1] < float(best.mean()):  # a non-finite KL is never better
                kept, best, best_snap = ep + 1, kl, snap
            if out["stopped"]:
                stopped = out["stopped"]
                break
        install(False)
        after = kl0
        if best_snap is not None:  # the kept state must also beat the start on the int4 path itself
            write(best_snap)
            served = measure(twin=False)
            if float(served.mean()) < float(kl0.mean()):
                after = served
            else:
                log.info("end-to-end stage: epoch %d's gain on the twins (%.4f) is none on the int4 path (%.4f >= "
                         "%.4f): keeping the layer-wise model", kept, heldout_kl[kept], float(served.mean()),
                         float(kl0.mean()))
                kept, best_snap = 0, None
                write(None)
    except BaseException:
        install(False)
        write(None)
        raise
    finally:
        bar.close()
        install(False)
        for p, r in requires.items():
            p.requires_grad_(r)
    if skipped or stopped:
        warnings.warn(f"end-to-end stage: {skipped} step(s) skipped for a non-finite loss or gradient"
                      + (f"; ended early: {stopped}" if stopped else "") + f"; kept epoch {kept}", stacklevel=2)
    with torch.no_grad():
        mult = torch.cat([(tw.linear.weight_scale.float() / start[nm][0].float()).flatten()
                          for nm, tw in twins.items()]) if twins else None
        if mx_twins:  # how far the FP4 transforms moved: max ||T' - T|| / ||T|| over the linears
            report["transform_change"] = {
                side: max(float((getattr(tw.linear, side).float() - mx_start[nm][i].float()).norm()
                                / mx_start[nm][i].float().norm()) for nm, tw in mx_twins.items())
                for i, side in enumerate(("left_trans", "right_trans"))}
        tuned_clips = {k: float(model.get_submodule(groups[k][0] if k in groups else k).clip_ratio) for k in clips}
        if kv_twins:
            report["kv_clips"] = {p: {"k": tw.cache.k_clip.tolist(), "v": tw.cache.v_clip.tolist()}
                                  for p, tw in kv_twins.items()}
    diff = after - kl0  # per held-out window, on the int4 path: how sure the gain is
    report.update(epochs=epochs, batch_size=bs, lr=lr, kl=kl_epochs, heldout_kl=heldout_kl, kept_epoch=kept,
                  heldout_kl_before=float(kl0.mean()), heldout_kl_after=float(after.mean()),
                  heldout_gain_se=float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else None,
                  skipped_steps=skipped, stopped=stopped, recompute_layers=recompute,
                  scale_multiplier_range=None if mult is None else [float(mult.min()), float(mult.max())],
                  clip_ratios=tuned_clips,
                  guard_seconds=guard_seconds[0], seconds=time.perf_counter() - t0)
    log.info("end-to-end stage: held-out KL on the int4 path %.4f -> %.4f (kept epoch %d of %d)", float(kl0.mean()),
             float(after.mean()), kept, epochs)
    return report
