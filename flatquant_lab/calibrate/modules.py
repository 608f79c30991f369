"""The training stand-ins: a learnable Kronecker transform and the fake-quant linear that uses it.

``KronTransform``: ``x -> Q4_tok((x / d) @ kron(L, R); c)`` with ``c = sigmoid(act_clip)``.
``FakeQuantLinear``: ``y = Q4(T(x)) @ Q4((W * d) @ kron(L, R)^{-T})^T + bias``, rounding where the
Ascend kernels round (x, ``x @ R`` to the act dtype, ``L^T (x R)`` to fp16, the output to the act
dtype), with straight-through gradients, so what is trained is what the int4 path computes.

An MXFP4 group (``Group.mx``, W4A4_MXFP4_FLATQUANT) learns ``L`` as ``Group.blocks`` independent diagonal blocks
(block-diagonal by construction) and quantizes as the FP4 kernel does: ``b = bf16(L^T x R)`` (fp32 products, one
rounding), then :func:`~flatquant_lab.quantizers.fake_quant_mx` per 32 along the token; its weights are
``fake_quant_mx`` of the fold per output row and 32 along K under ``QuantConfig.mx_scale_rule``. Power-of-two
scales leave no gradient for a clip ratio: such a group learns no clip (docs/mxfp4.md, "Calibration").
"""
from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..gptq import HessianAccumulator
from ..kronecker import fold_weight, kron_inverse_t
from ..layers import sum_over_ranks
from ..models import set_submodule
from ..mxfp4 import MxOptions
from ..quantizers import fake_quant_act, fake_quant_mx, fake_quant_weight_codes, round_to as ste_cast
from ..recipe import QuantConfig
from .kv4 import MappedLinear, install_kv, uninstall_kv
from .memory import row_spans
from .plan import Group
from .state import LayerState

def logit(p: float) -> float:
    """``sigmoid^-1(p)``: the clip factor that gives clip ratio ``p``."""
    return math.log(p / (1.0 - p))


def cayley(p: torch.Tensor) -> torch.Tensor:
    """``Q = (I - A/2)^{-1} (I + A/2)`` with ``A = tril(p, -1) - tril(p, -1)^T`` skew: orthogonal, ``I`` at ``p = 0``."""
    low = torch.tril(p, -1)
    a = 0.5 * (low - low.transpose(0, 1))
    eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    # I - A/2 has eigenvalues 1 - i*lambda/2 (|.| >= 1): the solve is always well conditioned
    return torch.linalg.solve(eye - a, eye + a)


def mx_options(cfg: QuantConfig) -> tuple[MxOptions, MxOptions]:
    """``(activations, weights)`` MXFP4 options of ``cfg``: the kernel's rule on activations (``mx_apply_clip``
    deciding whether the clip ratio acts), ``mx_scale_rule`` on weights."""
    return (MxOptions(apply_clip=cfg.schemes.mx_apply_clip), MxOptions(scale_rule=cfg.schemes.mx_scale_rule))


def mx_kron_rounded(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, act_dtype: torch.dtype) -> torch.Tensor:
    """``bf16(L^T round_a(x) R)`` per token with fp32 products (the FP4 kernel's step 1, straight-through);
    ``[..., n1, n2]``."""
    xm = rearrange(ste_cast(x, act_dtype), "... (a b) -> ... a b", a=left.shape[0])
    return ste_cast(left.transpose(0, 1) @ (xm @ right), torch.bfloat16)


def diagonal_blocks(m: torch.Tensor, blocks: int) -> torch.Tensor:
    """The ``blocks`` diagonal blocks of a square ``m``, stacked ``[blocks, n / blocks, n / blocks]``."""
    b = m.shape[0] // blocks
    return torch.stack([m[j * b:(j + 1) * b, j * b:(j + 1) * b] for j in range(blocks)])


def kron_rounded(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, tp: int,
                 act_dtype: torch.dtype) -> torch.Tensor:
    """``round_16(L^T round_a(round_a(x_r) R))`` per token and TP rank ``r`` (``kron(I_tp, L, R)``): steps 1-2 of
    ``ops.reference.kronecker_quant``, rounded where the kernel rounds (straight-through); ``[..., tp, n1, n2]``."""
    xm = rearrange(ste_cast(x, act_dtype), "... (t a b) -> ... t a b", t=tp, a=left.shape[0])
    a = ste_cast(xm @ right, act_dtype)
    return ste_cast(left.transpose(0, 1) @ a, torch.float16)


class SVDFactor(nn.Module):
    """One learnable factor ``F = (U0 C(P_u)) diag(exp(log_s)) (V0 C(P_v))^T`` around a start ``F0 = U0 diag(s0) V0^T``.

    ``U0, s0, V0`` are ``F0``'s SVD (float64, then float32); ``P_u = P_v = 0`` and ``log_s = log s0``
    at the start, so ``F == F0`` there. ``C`` is the Cayley map (``cayley``): U and V stay orthogonal
    whatever the optimiser does, and ``F^{-T} = U diag(1/s) V^T`` needs no matrix inverse.
    """

    def __init__(self, start: torch.Tensor):
        super().__init__()
        u0, s0, vh0 = torch.linalg.svd(start.double())
        if float(s0.min()) <= 0:
            raise ValueError(f"start: expected an invertible factor, got singular values down to {float(s0.min())}")
        self.register_buffer("u0", u0.float())
        self.register_buffer("v0", vh0.transpose(0, 1).float())
        n = start.shape[0]
        self.p_u = nn.Parameter(torch.zeros(n, n, dtype=torch.float32, device=start.device))
        self.p_v = nn.Parameter(torch.zeros(n, n, dtype=torch.float32, device=start.device))
        self.log_s = nn.Parameter(s0.log().float())

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``U``, ``s``, ``V`` (float32, differentiable)."""
        return self.u0 @ cayley(self.p_u), self.log_s.exp(), self.v0 @ cayley(self.p_v)

    def learnable(self) -> list[nn.Parameter]:
        return [self.p_u, self.p_v, self.log_s]

    def version(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.learnable())


class KronTransform(nn.Module):
    """Learnable ``x -> Q4_tok((x / d) @ kron(L, R); c)`` with ``c = sigmoid(act_clip)``.

    ``param="plain"``: ``L``, ``R`` are parameters, their inverses taken with ``linalg.inv`` (float32).
    ``param="svd"``: each is an ``SVDFactor``; the forward is the same function of the same ``L``, ``R``
    (the weight side holds the inverse of the rounded factors the device holds), but the gradient of
    ``L^{-T}`` is taken through the exact ``U diag(1/s) V^T``.
    """

    def __init__(self, group: Group, left, right, log_smooth, act_clip, act_dtype, learn_clip=True,
                 param: str = "plain", mx: tuple[MxOptions, MxOptions] | None = None):
        super().__init__()
        self.group = group
        self.param = param
        self.mx = mx  # (activation, weight) MXFP4 options of an MXFP4 group; None: int4
        if group.mx:
            if mx is None:
                raise ValueError(f"mx: an MXFP4 group ({group.name}) needs its (activation, weight) MxOptions")
            if param != "plain":
                raise ValueError(f"param: MXFP4 groups learn plain block-diagonal factors, got {param!r}")
            # L as its diagonal blocks, each a parameter of its own: block-diagonal whatever the optimiser does
            self.left_blocks = nn.Parameter(diagonal_blocks(left.float(), group.blocks).clone())
            self.right = nn.Parameter(right.float().clone())
        elif param == "plain":
            self.left = nn.Parameter(left.float().clone())
            self.right = nn.Parameter(right.float().clone())
        elif param == "svd":
            self.left_svd, self.right_svd = SVDFactor(left), SVDFactor(right)
        else:
            raise ValueError(f"param: expected 'plain' or 'svd', got {param!r}")
        self.log_smooth = nn.Parameter(log_smooth.float().clone()) if log_smooth is not None else None
        # an MXFP4 group's clip gets no gradient (power-of-two scales): it is never a learned parameter
        self.act_clip = nn.Parameter(act_clip.float().clone().reshape(1), requires_grad=learn_clip and not group.mx)
        self.act_dtype = act_dtype
        self.collect: HessianAccumulator | None = None
        # q/k/v (gate/up) call this transform with one input tensor per forward: compute once.
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._mats: tuple[tuple, tuple[torch.Tensor, ...]] | None = None

    def factor_parameters(self) -> list[nn.Parameter]:
        """What the optimiser moves to change ``L`` and ``R``."""
        if self.group.mx:
            return [self.left_blocks, self.right]
        if self.param == "plain":
            return [self.left, self.right]
        return self.left_svd.learnable() + self.right_svd.learnable()

    def factor_version(self) -> tuple[int, ...]:
        """Changes whenever an optimiser step moved ``L`` or ``R`` (cache key)."""
        return tuple(p._version for p in self.factor_parameters())

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``L``, ``R`` in float32, unrounded, detached: what the checkpoint stores (rounded there)."""
        with torch.no_grad():
            if self.group.mx:
                return torch.block_diag(*self.left_blocks.detach()).clone(), self.right.detach().clone()
            if self.param == "plain":
                return self.left.detach().clone(), self.right.detach().clone()
            return tuple(u @ torch.diag(s) @ v.transpose(0, 1)
                         for u, s, v in (self.left_svd.parts(), self.right_svd.parts()))

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

    def _factors_and_inverses(self) -> tuple[torch.Tensor, ...]:
        """``(L_r, R_r, L_r^{-T}, R_r^{-T})``, ``L_r`` = ``L`` rounded to the act dtype (straight-through);
        built once per optimiser step (q/k/v share it) or once for a no-grad pass."""
        key = (self.factor_version(), torch.is_grad_enabled())
        if self._mats is not None and self._mats[0] == key:
            return self._mats[1]
        if self.group.mx:  # inverted block by block: L^{-T} is block-diagonal too
            blocks = ste_cast(self.left_blocks, self.act_dtype)
            rt = ste_cast(self.right, self.act_dtype)
            lt = torch.block_diag(*blocks)
            li = torch.block_diag(*torch.linalg.inv(blocks).transpose(-1, -2))
            ri = torch.linalg.inv(rt).transpose(0, 1)
        elif self.param == "plain":
            lt, rt = ste_cast(self.left, self.act_dtype), ste_cast(self.right, self.act_dtype)
            li, ri = kron_inverse_t(lt, rt, dtype=torch.float32)
        else:
            mats = []
            for u, s, v in (self.left_svd.parts(), self.right_svd.parts()):
                f = ste_cast(u @ torch.diag(s) @ v.transpose(0, 1), self.act_dtype)
                exact = u @ torch.diag(1.0 / s) @ v.transpose(0, 1)  # (U S V^T)^{-T}, no inverse taken
                # value: the inverse of the rounded factor (what finalize folds); gradient: the exact one
                rounded = torch.linalg.inv(f.detach()).transpose(0, 1)
                mats.append((f, exact + (rounded - exact).detach()))
            (lt, li), (rt, ri) = mats
        self._mats = (key, (lt, rt, li, ri))
        return self._mats[1]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``L``, ``R`` as the device holds them: rounded to the activation dtype."""
        return self._factors_and_inverses()[:2]

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        def quant(t, lt, rt):
            if self.group.mx:  # no gradient reaches the clip through a power-of-two scale: a plain number here
                return fake_quant_mx(self.transformed(t, (lt, rt)), self.mx[0], float(self.clip_ratio().detach()))
            return fake_quant_act(self.per_rank(self.transformed(t, (lt, rt))), self.clip_ratio()).flatten(-2)

        # The factors come from a cache filled once per step: taken outside the checkpointed region so that
        # its recomputation sees the same graph as the forward.
        lt, rt = self.factors()
        if torch.is_grad_enabled():
            # Recomputed in the backward pass (a few % of the step's FLOPs): autograd keeps x and bq,
            # not the transform's five token-sized intermediates.
            bq = checkpoint(quant, x, lt, rt, use_reentrant=False, preserve_rng_state=False)
        else:
            bq = quant(x, lt, rt)
        if self.collect is not None:
            self.collect.add(bq.detach())
        self._last = (x, bq)
        return bq

    def per_rank(self, b: torch.Tensor) -> torch.Tensor:
        """``b[..., K]`` as ``[..., tp, K / tp]``: each tensor-parallel rank quantizes its slice per token."""
        return b.unflatten(-1, (self.group.tp, -1))

    def forget_input(self) -> None:
        """Drop the cached last input and its quantized form (kept so q/k/v quantize their input once)."""
        self._last = None

    def clear_cache(self) -> None:
        self._last = self._mats = None

    def inverse_t(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``L^{-T}``, ``R^{-T}`` of the rounded factors, recomputed only after an update."""
        return self._factors_and_inverses()[2:]

    def transformed(self, x: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``b = L^T (X / d) R`` per token, rounded as the kernel rounds (the straight-through twin of
        steps 1-2 of ``ops.reference.kronecker_quant``); ``factors`` default to :meth:`factors`."""
        d = self.smooth_in()
        # A norm-folded d divides here; a row-folded one (o, down) was already divided out by the
        # preceding linear's output rows (FakeQuantLinear.out_div), as in the exported model.
        if d is not None and self.group.smooth_target.endswith("layernorm"):
            x = x / d
        lt, rt = self.factors() if factors is None else factors
        if self.group.mx:
            return mx_kron_rounded(x, lt, rt, self.act_dtype).flatten(-2)
        return rearrange(kron_rounded(x, lt, rt, self.group.tp, self.act_dtype), "... t a b -> ... (t a b)")

    def fold(self, weight: torch.Tensor, inverse_t=None) -> torch.Tensor:
        """``(W * d) @ kron(L, R)^{-T}`` (float32, differentiable); ``inverse_t`` defaults to :meth:`inverse_t`."""
        d = self.smooth_in()
        w = weight * d if d is not None else weight
        return fold_weight(w, *self.factors(), inverse_t=inverse_t or self.inverse_t(), blocks=self.group.tp)


class CodesMatmul(torch.autograd.Function):
    """``y = b @ (codes * s)^T``, keeping ``codes`` for the backward pass as int8 (a quarter of the
    float32 weight it stands for), ``s`` and ``b``; the float weight is rebuilt there, one linear at a time."""

    @staticmethod
    def forward(ctx, b, codes, s):
        ctx.save_for_backward(b, codes.to(torch.int8), s)
        return b @ (codes * s).transpose(0, 1)

    @staticmethod
    def backward(ctx, gy):
        b, codes8, s = ctx.saved_tensors
        codes = codes8.to(s.dtype)
        gb = gy @ (codes * s) if ctx.needs_input_grad[0] else None
        gw = gy.reshape(-1, gy.shape[-1]).transpose(0, 1) @ b.reshape(-1, b.shape[-1])  # dL/d(codes * s)
        return gb, gw * s if ctx.needs_input_grad[1] else None, (gw * codes).sum(1, keepdim=True)


class FakeQuantLinear(nn.Module):
    """Training stand-in for one linear: ``y = Q4(T(x)) @ Q4(fold(W))^T + bias``, optionally ``/ d_next``.

    The weight may stay in the model's dtype (bf16): it is upcast to float32 where it is folded.
    """

    def __init__(self, linear: nn.Linear, transform: KronTransform, weight_clip: torch.Tensor,
                 out_div: KronTransform | None = None, learn_clip: bool = True):
        super().__init__()
        self.linear = linear
        self.transform = transform
        self.weight_clip = nn.Parameter(weight_clip.float().clone(), requires_grad=learn_clip)
        self.out_div = out_div  # the next group's smoothing that folds into these output rows
        self.weight_map = None  # KV4's T_v folded into the weight before its quantizer (calibrate.kv4.ValueMap)
        self._codes = None  # no-grad passes: (key, int8 codes, s) while nothing they depend on moves

    def _weight(self, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of the float32 weight, after ``weight_map``."""
        if self.weight_map is None:
            return self.linear.weight[r0:r1].float()
        return self.weight_map.weight_rows(self.linear.weight, r0, r1)

    def _map_version(self):
        return None if self.weight_map is None else self.weight_map.version()

    def _fold_mx(self, li, ri, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of ``MX4(fold(W))`` (MXFP4 per output row and 32 along K), float32."""
        return fake_quant_mx(self.transform.fold(self._weight(r0, r1), (li, ri)), self.transform.mx[1])

    def _product_mx(self, bq: torch.Tensor) -> torch.Tensor:
        """``bq @ MX4(fold(W))^T``: with grad, each chunk of rows' fold and rounding checkpointed; without, the
        dequantized weight cached while nothing it depends on moves."""
        tr = self.transform
        if not torch.is_grad_enabled():
            smooth = None if tr.log_smooth is None else tr.log_smooth._version
            key = (tr.factor_version(), smooth, self._map_version())
            if self._codes is None or self._codes[0] != key:
                li, ri = tr.inverse_t()
                self._codes = (key, torch.cat([self._fold_mx(li, ri, r0, r1) for r0, r1 in self._spans()]))
            return bq @ self._codes[1].transpose(0, 1)
        self._codes = None
        li, ri = tr.inverse_t()
        ys = [bq @ checkpoint(self._fold_mx, li, ri, r0, r1, use_reentrant=False,
                              preserve_rng_state=False).transpose(0, 1) for r0, r1 in self._spans()]
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)

    def _fold_codes(self, li, ri, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, s)`` of rows ``r0:r1`` of ``Q4(fold(W))`` (rows fold and round independently)."""
        return fake_quant_weight_codes(self.transform.fold(self._weight(r0, r1), (li, ri)),
                                       torch.sigmoid(self.weight_clip[r0:r1]))

    def _spans(self) -> list[tuple[int, int]]:
        return row_spans(*self.linear.weight.shape)

    def weight_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(int8 codes, s)`` of ``Q4(fold(W))`` for no-grad passes, folded in row chunks and cached
        across batches while nothing they depend on moves."""
        tr = self.transform
        smooth = None if tr.log_smooth is None else tr.log_smooth._version
        key = (tr.factor_version(), smooth, self.weight_clip._version, self._map_version())
        if self._codes is None or self._codes[0] != key:
            li, ri = tr.inverse_t()
            parts = [self._fold_codes(li, ri, r0, r1) for r0, r1 in self._spans()]
            self._codes = (key, torch.cat([c.to(torch.int8) for c, _ in parts]), torch.cat([s for _, s in parts]))
        return self._codes[1], self._codes[2]

    def _product(self, bq: torch.Tensor) -> torch.Tensor:
        """``bq @ Q4(fold(W))^T``. With grad, per chunk of rows: the chunk's fold and rounding are
        checkpointed (recomputed in the backward pass, so autograd keeps none of their weight-sized
        intermediates) and ``CodesMatmul`` keeps int8 codes, so a step holds one byte per weight and
        the temporaries of one chunk at a time, not GiBs for a 7B layer."""
        if not torch.is_grad_enabled():
            codes, s = self.weight_codes()
            return bq @ (codes.to(s.dtype) * s).transpose(0, 1)
        self._codes = None
        li, ri = self.transform.inverse_t()
        ys = []
        for r0, r1 in self._spans():
            codes, s = checkpoint(self._fold_codes, li, ri, r0, r1, use_reentrant=False, preserve_rng_state=False)
            ys.append(CodesMatmul.apply(bq, codes, s))
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bq = self.transform.quantized_input(x)
        y = self._product_mx(bq) if self.transform.group.mx else self._product(bq)
        bias = self.linear.bias.float() if self.linear.bias is not None else None
        if self.weight_map is not None:
            bias = self.weight_map.bias(bias)
        if self.out_div is not None:  # v_proj's rows are kv channels: d is the un-expanded [kv * head_dim]
            d = self.out_div.log_smooth.exp()
            y = y / d
            bias = bias / d if bias is not None else None
        act = self.transform.act_dtype
        # the int4 matmul returns the activation dtype, then the bias is added in it, as vllm-ascend does; the
        # stand-in takes the ranks' products as one (one rank: no per-rank rounding before the sum)
        return sum_over_ranks(lambda _r: ste_cast(y, act), 1, None if bias is None else ste_cast(bias, act),
                              lambda t: ste_cast(t, act))


def _divides_rows_of(groups: list[Group], learned: LayerState) -> dict[str, str]:
    """linear path -> name of the group whose smoothing folds into its output rows."""
    out = {}
    for g in groups:
        if (g.quantized and learned[g.name].log_smooth is not None and g.smooth_target
                and not g.smooth_target.endswith("layernorm")):
            out[g.smooth_target] = g.name
    return out


def install_fake_quant(layer: nn.Module, groups: list[Group], learned: LayerState | dict, cfg: QuantConfig,
                       learn: bool = False) -> dict[str, KronTransform]:
    """Swap a float decoder layer's linears for fake-quant stand-ins built from the ``learned`` state (a
    ``LayerState``, or the flat tensor dict a work dir holds)."""
    learned = LayerState.of(learned, groups)
    transforms = {}
    for g in groups:
        if not g.quantized:
            continue
        st = learned[g.name]
        # an MXFP4 group learns no clip: its power-of-two scales pass no gradient to one
        transforms[g.name] = KronTransform(
            g, st.left, st.right, st.log_smooth, st.act_clip, cfg.schemes.act_dtype,
            learn_clip=learn and cfg.train.learn_act_clip and not g.mx,
            param=cfg.train.factor_param if learn and not g.mx else "plain", mx=mx_options(cfg) if g.mx else None)
    row_div = _divides_rows_of(groups, learned)
    for g in groups:
        if not g.quantized:
            continue
        for path in g.linears:
            div = transforms.get(row_div.get(path, ""))
            fq = FakeQuantLinear(layer.get_submodule(path), transforms[g.name], learned[g.name].weight_clip[path],
                                 out_div=div, learn_clip=learn and cfg.train.learn_weight_clip and not g.mx)
            set_submodule(layer, path, fq)
    # smoothing of a group whose predecessor stays float: divide that float linear's output instead
    for path, gname in row_div.items():
        mod = layer.get_submodule(path)
        if isinstance(mod, nn.Linear):
            set_submodule(layer, path, RowDivLinear(mod, transforms[gname]))
    if learned.kv is not None:  # KV4: after the stand-ins above, which take T_v's map
        install_kv(layer, groups, learned.kv, learn, cfg.schemes.kv_learned in ("kv", "v"), cfg.schemes.kv_cache)
    return transforms


class RowDivLinear(nn.Module):
    def __init__(self, linear: nn.Linear, div: KronTransform):
        super().__init__()
        self.linear, self.div = linear, div

    def forward(self, x):
        return self.linear(x) / self.div.log_smooth.exp()


def uninstall_fake_quant(layer: nn.Module) -> None:
    """Put the original float linears back (and take a KV4 stand-in off the attention)."""
    uninstall_kv(layer)
    wrapped = True
    while wrapped:  # a stand-in may wrap another (a row-divided linear around a T_v-mapped one)
        wrapped = False
        for name, mod in list(layer.named_modules()):
            if isinstance(mod, (FakeQuantLinear, RowDivLinear, MappedLinear)):
                set_submodule(layer, name, mod.linear)
                wrapped = True
                break
