"""Layer-wise FlatQuant calibration, and the RTN / Hadamard baselines on the same machinery.

Per decoder layer, one transform per linear input: q/k/v share one, o_proj has one, gate/up share
one, down_proj has one. A transform is ``x -> (x / d) @ kron(L, R)`` followed by per-token int4
fake quantization with clip ``c = sigmoid(alpha)``; its linears hold
``Q4((W * d) @ kron(L, R)^{-T})`` with per-channel clip ``sigmoid(beta)``.
Training minimises ``MSE(layer_fp(X), layer_q(X))`` with ``X`` the full-precision input, AdamW and a
cosine schedule. The training forward rounds where the Ascend kernels round (x, ``x @ R`` to the
activation dtype, ``L^T (x R)`` to fp16, the output to the activation dtype) with straight-through
gradients, so what was trained is what the int4 path computes.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
from einops import rearrange
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import nn
from tqdm.auto import tqdm

from ._io import atomic_write_bytes, atomic_write_text
from .config import QuantConfig
from .gptq import HessianAccumulator, gptq_quantize
from .kronecker import decompose_dim, fold_weight, npu_supported
from .linear import W4A4FlatQuantLinear
from .models import GROUPS, decoder_layers, layer_prefix, model_info, set_submodule
from .quantizers import fake_quant_act, fake_quant_weight, quantize_weight, round_to as ste_cast
from .transforms import orthogonal_factor

log = logging.getLogger(__name__)

CLIP_GRID = torch.linspace(1.0, 0.55, 16)  # candidate clip ratios for the initial search
CLIP_CAP = 0.995  # a sigmoid factor cannot reach 1: start searches' winners here at most
STAT_TOKENS = 2048  # tokens kept per group for the initial clip search


# ---------------------------------------------------------------------------- plan
@dataclass
class Group:
    """One transform of one decoder layer and the linears that share it."""

    name: str  # attn | o | mlp | down
    linears: tuple[str, ...]  # paths inside the decoder layer
    size: int
    n1: int
    n2: int
    smooth_target: str | None  # where d folds: a norm, or the rows of a preceding linear
    kv_tied: tuple[int, int] | None = None  # (num_kv_heads, n_rep) when d is tied across GQA heads
    skip_reason: str = ""

    @property
    def quantized(self) -> bool:
        return not self.skip_reason


def plan_layer(model: nn.Module, index: int, cfg: QuantConfig, info=None) -> list[Group]:
    """The four transform groups of decoder layer ``index``, with the reason if one stays float."""
    info = info or model_info(model)
    prefix = layer_prefix(index)
    smooth_targets = {"attn": "input_layernorm", "o": "self_attn.v_proj",
                      "mlp": "post_attention_layernorm", "down": "mlp.up_proj"}
    groups = []
    for name, linears in GROUPS.items():
        size = info.intermediate_size if name == "down" else (
            info.num_heads * info.head_dim if name == "o" else info.hidden_size)
        n1, n2 = decompose_dim(size)
        reason = ""
        support = npu_supported(n1, n2, cfg.cann)
        if size % 8:
            reason = f"input size {size} is not divisible by 8"
        elif not support:
            reason = f"npu_kronecker_quant cannot run {n1}x{n2}: {support.reason}"
        else:
            hit = [p for p in cfg.skip for lin in linears if fnmatch.fnmatchcase(f"{prefix}.{lin}", p)]
            if hit:
                # vllm-ascend fuses q/k/v and gate/up: a fused module is all W4A4 or all float
                reason = f"QuantConfig.skip matches {hit[0]!r}" + (
                    " (the fused group stays float together)" if len(linears) > 1 else "")
        kv_tied = None
        if name == "o":
            kv_tied = (info.num_kv_heads, info.num_heads // info.num_kv_heads)
        groups.append(Group(name, linears, size, n1, n2, smooth_targets[name] if cfg.smooth else None,
                            kv_tied, reason))
    return groups


# ---------------------------------------------------------------------------- training modules
def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class KronTransform(nn.Module):
    """Learnable ``x -> Q4_tok((x / d) @ kron(L, R); c)`` with ``c = sigmoid(act_clip)``."""

    def __init__(self, group: Group, left, right, log_smooth, act_clip, act_dtype, learn_clip=True):
        super().__init__()
        self.group = group
        self.left = nn.Parameter(left.float().clone())
        self.right = nn.Parameter(right.float().clone())
        self.log_smooth = nn.Parameter(log_smooth.float().clone()) if log_smooth is not None else None
        self.act_clip = nn.Parameter(act_clip.float().clone().reshape(1), requires_grad=learn_clip)
        self.act_dtype = act_dtype
        self.collect: HessianAccumulator | None = None
        # q/k/v (gate/up) call this transform with one input tensor per forward: compute once.
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._inv: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def smooth_in(self) -> torch.Tensor | None:
        """``d`` over the group's input channels (expanded across the query heads of a kv head)."""
        if self.log_smooth is None:
            return None
        d = self.log_smooth.exp()
        if self.group.kv_tied is not None:
            kv, rep = self.group.kv_tied
            d = rearrange(d, "(kv hd) -> kv hd", kv=kv).repeat_interleave(rep, dim=0).flatten()
        return d

    def clip_ratio(self) -> torch.Tensor:
        return torch.sigmoid(self.act_clip)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``L``, ``R`` as the device holds them: rounded to the activation dtype."""
        return ste_cast(self.left, self.act_dtype), ste_cast(self.right, self.act_dtype)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        bq = fake_quant_act(self.transformed(x), self.clip_ratio())
        if self.collect is not None:
            self.collect.add(bq.detach())
        self._last = (x, bq)
        return bq

    def clear_cache(self) -> None:
        self._last = self._inv = None

    def inverse_t(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``L^{-T}``, ``R^{-T}`` of the rounded factors, recomputed only after an update."""
        key = (self.left._version, self.right._version, torch.is_grad_enabled())
        if self._inv is None or self._inv[0] != key:
            lt, rt = self.factors()
            self._inv = (key, (torch.linalg.inv(lt).transpose(0, 1), torch.linalg.inv(rt).transpose(0, 1)))
        return self._inv[1]

    def transformed(self, x: torch.Tensor) -> torch.Tensor:
        """``b = L^T (X / d) R`` per token, rounded as the kernel rounds."""
        d = self.smooth_in()
        # A norm-folded d divides here; a row-folded one (o, down) was already divided out by the
        # preceding linear's output rows (FakeQuantLinear.out_div), as in the exported model.
        if d is not None and self.group.smooth_target.endswith("layernorm"):
            x = x / d
        x = ste_cast(x, self.act_dtype)
        lt, rt = self.factors()
        xm = rearrange(x, "... (a b) -> ... a b", a=self.group.n1)
        a = ste_cast(xm @ rt, self.act_dtype)
        b = ste_cast(lt.transpose(0, 1) @ a, torch.float16)
        return rearrange(b, "... a b -> ... (a b)")

    def fold(self, weight: torch.Tensor) -> torch.Tensor:
        """``(W * d) @ kron(L, R)^{-T}`` (float32, differentiable)."""
        d = self.smooth_in()
        w = weight * d if d is not None else weight
        li, ri = self.inverse_t()
        wm = rearrange(w, "o (a b) -> o a b", a=self.group.n1)
        return rearrange(li.transpose(0, 1) @ wm @ ri, "o a b -> o (a b)")


class FakeQuantLinear(nn.Module):
    """Training stand-in for one linear: ``y = Q4(T(x)) @ Q4(fold(W))^T + bias``, optionally ``/ d_next``."""

    def __init__(self, linear: nn.Linear, transform: KronTransform, weight_clip: torch.Tensor,
                 out_div: KronTransform | None = None, learn_clip: bool = True):
        super().__init__()
        self.linear = linear
        self.transform = transform
        self.weight_clip = nn.Parameter(weight_clip.float().clone(), requires_grad=learn_clip)
        self.out_div = out_div  # the next group's smoothing that folds into these output rows

    def quantized_weight(self) -> torch.Tensor:
        """``Q4(fold(W))``; reused across batches while nothing it depends on has moved."""
        tr = self.transform
        key = (tr.left._version, tr.right._version, None if tr.log_smooth is None else tr.log_smooth._version,
               self.weight_clip._version, torch.is_grad_enabled())
        if getattr(self, "_wq", None) is None or self._wq[0] != key or torch.is_grad_enabled():
            wq = fake_quant_weight(tr.fold(self.linear.weight.float()), torch.sigmoid(self.weight_clip))
            self._wq = (key, wq)
        return self._wq[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bq = self.transform.quantized_input(x)
        wq = self.quantized_weight()
        y = bq @ wq.transpose(0, 1)
        bias = self.linear.bias.float() if self.linear.bias is not None else None
        if self.out_div is not None:  # v_proj's rows are kv channels: d is the un-expanded [kv * head_dim]
            d = self.out_div.log_smooth.exp()
            y = y / d
            bias = bias / d if bias is not None else None
        act = self.transform.act_dtype
        y = ste_cast(y, act)  # the int4 matmul returns the activation dtype
        if bias is not None:  # then the bias is added in that dtype, as vllm-ascend does
            y = ste_cast(y + ste_cast(bias, act), act)
        return y


def _divides_rows_of(groups: list[Group], learned: dict) -> dict[str, str]:
    """linear path -> name of the group whose smoothing folds into its output rows."""
    out = {}
    for g in groups:
        if (g.quantized and f"{g.name}.log_smooth" in learned and g.smooth_target
                and not g.smooth_target.endswith("layernorm")):
            out[g.smooth_target] = g.name
    return out


def install_fake_quant(layer: nn.Module, groups: list[Group], learned: dict, cfg: QuantConfig,
                       learn: bool = False) -> dict[str, KronTransform]:
    """Swap a float decoder layer's linears for fake-quant stand-ins built from ``learned`` tensors."""
    transforms = {}
    for g in groups:
        if not g.quantized:
            continue
        transforms[g.name] = KronTransform(
            g, learned[f"{g.name}.left"], learned[f"{g.name}.right"], learned.get(f"{g.name}.log_smooth"),
            learned[f"{g.name}.act_clip"], cfg.act_dtype, learn_clip=learn and cfg.learn_act_clip)
    row_div = _divides_rows_of(groups, learned)
    for g in groups:
        if not g.quantized:
            continue
        for path in g.linears:
            div = transforms.get(row_div.get(path, ""))
            fq = FakeQuantLinear(layer.get_submodule(path), transforms[g.name], learned[f"{path}.weight_clip"],
                                 out_div=div, learn_clip=learn and cfg.learn_weight_clip)
            set_submodule(layer, path, fq)
    # smoothing of a group whose predecessor stays float: divide that float linear's output instead
    for path, gname in row_div.items():
        mod = layer.get_submodule(path)
        if isinstance(mod, nn.Linear):
            set_submodule(layer, path, _RowDivLinear(mod, transforms[gname]))
    return transforms


class _RowDivLinear(nn.Module):
    def __init__(self, linear: nn.Linear, div: KronTransform):
        super().__init__()
        self.linear, self.div = linear, div

    def forward(self, x):
        return self.linear(x) / self.div.log_smooth.exp()


def uninstall_fake_quant(layer: nn.Module) -> None:
    """Put the original float linears back."""
    for name, mod in list(layer.named_modules()):
        if isinstance(mod, (FakeQuantLinear, _RowDivLinear)):
            set_submodule(layer, name, mod.linear)


# ---------------------------------------------------------------------------- data capture
class _Stop(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int):
    """Hidden states entering decoder layer 0 (float32 ``[n, seqlen, hidden]``) and its kwargs per batch size."""
    layers = decoder_layers(model)
    states, kwargs_by_bs = [], {}

    def hook(_mod, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        states.append(hs.detach().float())
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kwargs_by_bs.setdefault(hs.shape[0], kw)
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[start:start + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(states), kwargs_by_bs


def _batches(n: int, batch_size: int):
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def _run_layer(layer, x, kwargs):
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def float_forward(layer, groups, X, kwargs_by_bs, batch_size):
    """Full-precision outputs, and per group the input channels' abs-max plus a token sample."""
    stats, handles = {}, []
    n_batches = len(_batches(X.shape[0], batch_size))
    for g in groups:
        if not g.quantized:
            continue
        st = stats[g.name] = {"absmax": None, "sample": []}

        def hook(_m, args, st=st):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            am = x.abs().amax(0)
            st["absmax"] = am if st["absmax"] is None else torch.maximum(st["absmax"], am)
            stride = max(1, x.shape[0] * n_batches // STAT_TOKENS)
            st["sample"].append(x[::stride])

        handles.append(layer.get_submodule(g.linears[0]).register_forward_pre_hook(hook))
    try:
        Y = torch.cat([_run_layer(layer, X[s:e], kwargs_by_bs[e - s]) for s, e in _batches(X.shape[0], batch_size)])
    finally:
        for h in handles:
            h.remove()
    for st in stats.values():
        st["sample"] = torch.cat(st["sample"])[:STAT_TOKENS]
    return Y.float(), stats


# ---------------------------------------------------------------------------- initialisation
def _search_act_clip(b: torch.Tensor) -> float:
    """The clip ratio in CLIP_GRID with the least per-token int4 MSE on transformed activations ``b``."""
    errs = [float(((fake_quant_act(b, float(c)) - b) ** 2).sum()) for c in CLIP_GRID]
    return float(CLIP_GRID[int(torch.tensor(errs).argmin())])


def _search_weight_clip(w: torch.Tensor) -> torch.Tensor:
    """Per row, the clip ratio in CLIP_GRID with the least int4 round-to-nearest MSE."""
    errs = torch.stack([((fake_quant_weight(w, torch.full((w.shape[0],), float(c))) - w) ** 2).sum(1)
                        for c in CLIP_GRID])
    return CLIP_GRID[errs.argmin(0)]


@torch.no_grad()
def init_learned(layer: nn.Module, groups: list[Group], cfg: QuantConfig, stats: dict | None,
                 layer_index: int) -> dict[str, torch.Tensor]:
    """Starting tensors: factors, smoothing ``log d``, clip logits (searched or fixed)."""
    learned = {}
    baseline = cfg.method != "flatquant"
    kind = {"rtn": "identity", "hadamard": "hadamard"}.get(cfg.method, cfg.transform_init)
    for gi, g in enumerate(groups):
        if not g.quantized:
            continue
        seed = cfg.seed * 100003 + layer_index * 17 + gi * 2
        left = orthogonal_factor(g.n1, kind, seed).float()
        right = orthogonal_factor(g.n2, kind, seed + 1).float()
        learned[f"{g.name}.left"], learned[f"{g.name}.right"] = left, right
        weights = [layer.get_submodule(p).weight.detach().float() for p in g.linears]
        d = None
        if not baseline and g.smooth_target and stats is not None:
            act = stats[g.name]["absmax"].clamp_min(1e-5)
            wmax = torch.cat(weights).abs().amax(0).clamp_min(1e-5)
            if g.kv_tied is not None:  # one d per kv channel: reduce over the query heads sharing it
                kv, rep = g.kv_tied
                act = rearrange(act, "(kv rep hd) -> kv rep hd", kv=kv, rep=rep).amax(1).flatten()
                wmax = rearrange(wmax, "(kv rep hd) -> kv rep hd", kv=kv, rep=rep).amax(1).flatten()
            d = (act.pow(cfg.smooth_alpha) / wmax.pow(1 - cfg.smooth_alpha)).clamp(1e-4, 1e4)
            learned[f"{g.name}.log_smooth"] = d.log()
        tr = KronTransform(g, left, right, learned.get(f"{g.name}.log_smooth"), torch.zeros(1), cfg.act_dtype)
        if baseline:  # the baselines use the full range: clip ratio 1 (logit +inf)
            act_clip = math.inf
        elif cfg.act_clip_init == "search" and stats is not None:
            act_clip = _logit(min(_search_act_clip(tr.transformed(stats[g.name]["sample"])), CLIP_CAP))
        else:
            act_clip = _logit(CLIP_CAP) if cfg.act_clip_init == "search" else float(cfg.act_clip_init)
        learned[f"{g.name}.act_clip"] = torch.tensor([act_clip])
        for p, w in zip(g.linears, weights):
            if baseline:
                logits = torch.full((w.shape[0],), math.inf)
            elif cfg.weight_clip_init == "search":
                logits = torch.logit(_search_weight_clip(tr.fold(w)).clamp_max(CLIP_CAP))
            else:
                logits = torch.full((w.shape[0],), float(cfg.weight_clip_init))
            learned[f"{p}.weight_clip"] = logits
    return learned


# ---------------------------------------------------------------------------- training
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
        batches = _batches(X.shape[0], cfg.budget("batch_size"))
        epochs = cfg.budget("epochs")
        total = max(1, epochs * len(batches))
        r = cfg.min_lr_ratio
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + layer_index)
        epoch_losses = []
        for epoch in range(epochs):
            order = torch.randperm(len(batches), generator=gen).tolist()
            tot = 0.0
            for bi in order:
                s, e = batches[bi]
                out = _run_layer(layer, X[s:e], kwargs_by_bs[e - s])
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
        for s, e in _batches(X.shape[0], cfg.budget("batch_size")):
            out = _run_layer(layer, X[s:e], kwargs_by_bs[e - s])
            tot += float(torch.nn.functional.mse_loss(out, Y[s:e])) * (e - s)
        return tot / X.shape[0], (hess if collect else None)
    finally:
        uninstall_fake_quant(layer)


# ---------------------------------------------------------------------------- finalisation
@torch.no_grad()
def finalize_layer(layer, groups, learned, cfg: QuantConfig, hessians=None, backend=None) -> None:
    """Fold the smoothing scales, quantize every weight, and swap in ``W4A4FlatQuantLinear`` modules."""
    d_in = {}
    for g in groups:
        if not g.quantized or f"{g.name}.log_smooth" not in learned:
            continue
        d = learned[f"{g.name}.log_smooth"].double().exp()
        target = layer.get_submodule(g.smooth_target)
        if g.smooth_target.endswith("layernorm"):
            target.weight.copy_((target.weight.double() / d).to(target.weight.dtype))
        else:  # rows of v_proj (kv channels) or up_proj
            target.weight.copy_((target.weight.double() / d[:, None]).to(target.weight.dtype))
            if target.bias is not None:
                target.bias.copy_((target.bias.double() / d).to(target.bias.dtype))
        if g.kv_tied is not None:
            kv, rep = g.kv_tied
            d = rearrange(d, "(kv hd) -> kv hd", kv=kv).repeat_interleave(rep, 0).flatten()
        d_in[g.name] = d
    for g in groups:
        if not g.quantized:
            continue
        lt = learned[f"{g.name}.left"].to(cfg.act_dtype)
        rt = learned[f"{g.name}.right"].to(cfg.act_dtype)
        clip_ratio = float(torch.sigmoid(learned[f"{g.name}.act_clip"]).item())
        folded, scales, qs = [], [], []
        for path in g.linears:
            w = layer.get_submodule(path).weight.double()
            if g.name in d_in:
                w = w * d_in[g.name]
            folded.append(fold_weight(w, lt, rt))
            q, scale = quantize_weight(folded[-1], torch.sigmoid(learned[f"{path}.weight_clip"]).double())
            qs.append(q)
            scales.append(scale)
        if hessians is not None:  # one GPTQ pass for the linears sharing this input
            q_all = gptq_quantize(torch.cat(folded), hessians[g.name].h, torch.cat(scales), block=cfg.gptq_block,
                                  damp=cfg.gptq_damp, act_order=cfg.gptq_act_order)
            qs = list(q_all.split([q.shape[0] for q in qs]))
        for path, q, scale in zip(g.linears, qs, scales):
            lin = layer.get_submodule(path)
            tensors = {"weight": q.contiguous(), "weight_scale": scale, "weight_offset": torch.zeros_like(scale),
                       "left_trans": lt, "right_trans": rt,
                       "clip_ratio": torch.tensor([clip_ratio], dtype=torch.float32)}
            if lin.bias is not None:
                tensors["bias"] = lin.bias.detach().to(cfg.act_dtype)
            set_submodule(layer, path, W4A4FlatQuantLinear.from_checkpoint(
                tensors, backend=backend, act_dtype=cfg.act_dtype))


# ---------------------------------------------------------------------------- resumable driver
class WorkDir:
    """Per-layer learned tensors on disk, each file written atomically, for resuming a run."""

    def __init__(self, path: str, cfg: QuantConfig, num_layers: int):
        self.path = path
        os.makedirs(path, exist_ok=True)
        meta = os.path.join(path, "run.json")
        fingerprint = json.loads(cfg.fingerprint())
        if os.path.exists(meta):
            with open(meta) as f:
                old = json.load(f)
            if old.get("config") != fingerprint or old.get("num_layers") != num_layers:
                raise ValueError(f"work_dir: {path} holds a run with another configuration; "
                                 "use a fresh directory or the same QuantConfig")
        else:
            atomic_write_text(meta, json.dumps({"config": fingerprint, "num_layers": num_layers}, indent=1))

    def file(self, i: int) -> str:
        return os.path.join(self.path, f"layer_{i:04d}.safetensors")

    def has(self, i: int) -> bool:
        return os.path.exists(self.file(i))

    def load(self, i: int) -> tuple[dict, list[float]]:
        t = load_file(self.file(i))
        losses = t.pop("__epoch_losses__", torch.zeros(0)).tolist()
        return t, losses

    def save(self, i: int, learned: dict, losses: list[float]) -> None:
        tensors = {k: v.detach().contiguous() for k, v in learned.items()}
        tensors["__epoch_losses__"] = torch.tensor(losses, dtype=torch.float64)
        # a unique temp name per write: two runs sharing a work_dir never write into each other's file
        atomic_write_bytes(self.file(i), save_tensors(tensors))


@dataclass
class CalibrationReport:
    """What ``calibrate`` did: per layer, losses and seconds; the linears kept in float and why."""

    method: str
    layers: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"method": self.method, "layers": self.layers, "skipped": self.skipped, "seconds": self.seconds}


def calibrate(model: nn.Module, cfg: QuantConfig, calib_ids: torch.Tensor | None = None,
              backend: str | None = None, after_layer=None) -> CalibrationReport:
    """Quantize every decoder linear of ``model`` in place, layer by layer (see module docstring).

    ``calib_ids``: token ids ``[n, seqlen]``; needed for ``flatquant`` and for GPTQ weights.
    ``after_layer(i)``: called after each finished layer (progress hooks, tests of resumption).
    """
    t0 = time.perf_counter()
    info = model_info(model)
    layers = decoder_layers(model)
    report = CalibrationReport(cfg.method)
    need_data = cfg.method == "flatquant" or cfg.weight_quantizer == "gptq"
    if need_data and calib_ids is None:
        raise ValueError(f"calib_data: method={cfg.method!r} with weight_quantizer={cfg.weight_quantizer!r} "
                         "needs calibration token ids [n, seqlen]")
    if not need_data and calib_ids is not None:
        warnings.warn(f"calib_data: method={cfg.method!r} with weight_quantizer={cfg.weight_quantizer!r} uses no "
                      "calibration data; it is ignored", stacklevel=3)
    unused = [n for n in ("epochs", "lr") if getattr(cfg, n) is not None and cfg.method != "flatquant"]
    if unused:
        warnings.warn(f"{', '.join(unused)}: only method='flatquant' trains; ignored for method={cfg.method!r}",
                      stacklevel=3)
    model_dtype = next(model.parameters()).dtype
    if model_dtype in (torch.float16, torch.bfloat16) and model_dtype != cfg.act_dtype:
        # The W4A4 layers take the model's hidden states as they are (vllm-ascend: act dtype = model dtype).
        raise ValueError(f"act_dtype: the model is {model_dtype}, so its W4A4 layers must compute in it; "
                         f"expected act_dtype={model_dtype} (or a float32 model), got {cfg.act_dtype}")
    torch.manual_seed(cfg.seed)
    plans = [plan_layer(model, i, cfg, info) for i in range(info.num_layers)]
    names = [f"{layer_prefix(i)}.{lin}" for i, groups in enumerate(plans) for g in groups for lin in g.linears]
    unmatched = [p for p in cfg.skip if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(f"skip: {unmatched} match no decoder linear (their names look like {names[-1]!r}; "
                         "e.g. '*.o_proj' or 'model.layers.0.*'); the output head always stays float")
    for i, groups in enumerate(plans):
        for g in groups:
            if not g.quantized:
                for lin in g.linears:
                    report.skipped[f"{layer_prefix(i)}.{lin}"] = g.skip_reason
    if report.skipped:
        reasons = {}
        for name, why in report.skipped.items():
            reasons.setdefault(why, []).append(name)
        for why, names in reasons.items():
            log.warning("kept in float (%s): %s", why, ", ".join(names[:6]) + (" ..." if len(names) > 6 else ""))
    log.info("lm_head stays in float: the NPU W4A4 path serves decoder linears only")
    report.skipped["lm_head"] = "output head: kept in float"
    work = WorkDir(cfg.work_dir, cfg, info.num_layers) if cfg.work_dir else None
    X = kwargs_by_bs = None
    bs = cfg.budget("batch_size")
    if need_data:
        if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.dtype != torch.long:
            raise ValueError(f"calib_data: expected a LongTensor [n, seqlen], got {getattr(calib_ids, 'shape', calib_ids)}")
        X, kwargs_by_bs = capture_layer_inputs(model, calib_ids, bs)
    bar = tqdm(range(info.num_layers), desc=f"{cfg.method} layers", unit="layer")
    for i in bar:
        lt0 = time.perf_counter()
        layer, groups = layers[i], plans[i]
        layer.float()
        Y = stats = None
        if need_data:
            Y, stats = float_forward(layer, groups, X, kwargs_by_bs, bs)
        losses, resumed = [], False
        if work is not None and work.has(i):
            learned, losses = work.load(i)
            resumed = True
        else:
            learned = init_learned(layer, groups, cfg, stats, i)
            if cfg.trains and any(g.quantized for g in groups):
                learned, losses = train_layer(layer, groups, learned, X, Y, kwargs_by_bs, cfg, i, progress=bar)
            if work is not None:
                work.save(i, learned, losses)
        entry = {"layer": i, "epoch_losses": losses, "resumed": resumed}
        hess = None
        if need_data and any(g.quantized for g in groups):
            entry["fake_quant_mse"], hess = fake_quant_pass(layer, groups, learned, X, Y, kwargs_by_bs, cfg,
                                                            collect=cfg.weight_quantizer == "gptq")
        finalize_layer(layer, groups, learned, cfg, hess, backend=backend)
        layer.to(model_dtype)
        entry["clip_ratios"] = {g.name: float(torch.sigmoid(learned[f"{g.name}.act_clip"]).item())
                                for g in groups if g.quantized}
        entry["seconds"] = time.perf_counter() - lt0
        report.layers.append(entry)
        if need_data:
            X = Y  # the next layer learns from full-precision inputs
        if after_layer is not None:
            after_layer(i)
    report.seconds = time.perf_counter() - t0
    return report
