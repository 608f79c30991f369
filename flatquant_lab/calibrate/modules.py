"""The training stand-ins: a learnable Kronecker transform and the fake-quant linear that uses it.

``KronTransform``: ``x -> Q4_tok((x / d) @ kron(L, R); c)`` with ``c = sigmoid(act_clip)``.
``FakeQuantLinear``: ``y = Q4(T(x)) @ Q4((W * d) @ kron(L, R)^{-T})^T + bias``, rounding where the
Ascend kernels round (x, ``x @ R`` to the act dtype, ``L^T (x R)`` to fp16, the output to the act
dtype), with straight-through gradients, so what is trained is what the int4 path computes.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..gptq import HessianAccumulator
from ..kronecker import fold_weight, kron_inverse_t
from ..models import set_submodule
from ..quantizers import fake_quant_act, fake_quant_weight, round_to as ste_cast
from ..recipe import QuantConfig
from .plan import Group

def logit(p: float) -> float:
    """``sigmoid^-1(p)``: the clip factor that gives clip ratio ``p``."""
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
        if torch.is_grad_enabled():
            # Recomputed in the backward pass (a few % of the step's FLOPs): autograd keeps x and bq,
            # not the transform's five token-sized intermediates.
            bq = checkpoint(lambda t: fake_quant_act(self.transformed(t), self.clip_ratio()), x,
                            use_reentrant=False, preserve_rng_state=False)
        else:
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
            self._inv = (key, kron_inverse_t(*self.factors(), dtype=torch.float32))
        return self._inv[1]

    def transformed(self, x: torch.Tensor) -> torch.Tensor:
        """``b = L^T (X / d) R`` per token, rounded as the kernel rounds (the straight-through twin of
        steps 1-2 of ``ops.reference.kronecker_quant``)."""
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

    def fold(self, weight: torch.Tensor, inverse_t=None) -> torch.Tensor:
        """``(W * d) @ kron(L, R)^{-T}`` (float32, differentiable); ``inverse_t`` defaults to :meth:`inverse_t`."""
        d = self.smooth_in()
        w = weight * d if d is not None else weight
        return fold_weight(w, self.left, self.right, inverse_t=inverse_t or self.inverse_t())


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
            def fq(li, ri):
                return fake_quant_weight(tr.fold(self.linear.weight.float(), (li, ri)), torch.sigmoid(self.weight_clip))
            if torch.is_grad_enabled():
                # Recomputed in the backward pass: autograd keeps one weight-sized tensor per linear,
                # not the fold's and the rounding's half-dozen (GiBs for a 7B layer).
                wq = checkpoint(fq, *tr.inverse_t(), use_reentrant=False, preserve_rng_state=False)
            else:
                wq = fq(*tr.inverse_t())
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
