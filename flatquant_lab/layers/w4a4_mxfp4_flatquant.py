"""The W4A4 MXFP4 FlatQuant linear (Ascend 950), as vllm-ascend serves it (docs/mxfp4.md).

Forward for ``x[..., K]``, ``K = L * R``:
``xq, s = kronecker_quant(x.view(-1, L, R), L^T, R, c, dst_dtype=FP4)`` (FP4 codes, E8M0 scales per 32);
``y = quant_matmul(xq, weight^T, weight_scale, pertoken_scale=s, FP4 / E8M0 dtypes, group_sizes [1, 1, 32])``;
``y += bias`` in the output dtype (assumed, as the int4 layer adds it).

Row-parallel layers are TP-aware by construction: ``left_trans`` is block-diagonal over ``max_supported_tp``
blocks, and at ``tp_size`` ranks rank ``r`` uses diagonal block ``r`` of ``left_trans`` (size ``L / tp``), its
``K / tp`` input columns and their scales; the ranks' outputs are summed in fp32 and rounded once (the
all-reduce, assumed as for the int4 layer). The layer calls :mod:`flatquant_lab.ops` only.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .. import ops
from ..checks import positive_int
from ..dtypes import HALF_DTYPES, check_half
from ..kronecker import decompose_dim, fold_weight
from ..mxfp4 import E8M0_NAN, FLOAT4_E2M1_X2, FLOAT8_E8M0, GROUP, dequantize, quantize_weight_mxfp4
from .base import QuantizedLayer, check_bias, check_transforms
from .w4a4_flatquant import DEFAULT_CHUNK_TOKENS, MAX_CHUNK_TOKENS

MX_CHECKPOINT_KEYS = ("weight", "weight_scale", "left_trans", "right_trans", "clip_ratio")
DEFAULT_MAX_TP = 4  # vllm-ascend's default max_supported_tp
MAX_FACTOR = 256  # left_trans / right_trans at most 256 (SPEC section 15)


def mx_factors(in_features: int, row_parallel: bool, max_tp: int = DEFAULT_MAX_TP) -> tuple[int, int]:
    """``(L, R)``: ``decompose_dim(K)`` for a column-parallel linear; for a row-parallel one
    ``R = decompose_dim(K / max_tp)[1]`` (at most 256) and ``L = K / R``."""
    if not row_parallel:
        return decompose_dim(in_features)
    if in_features % max_tp:
        raise ValueError(f"in_features: {in_features} does not split over max_supported_tp = {max_tp} ranks")
    r = min(decompose_dim(in_features // max_tp)[1], MAX_FACTOR)
    if in_features % r:
        raise ValueError(f"in_features: {in_features} has no factor pair with R = {r}")
    return in_features // r, r


def block_diagonal_problem(left: torch.Tensor, blocks: int) -> str:
    """Why ``left`` is not block-diagonal over ``blocks`` equal blocks (``""`` when it is)."""
    n = left.shape[0]
    if n % blocks:
        return f"its size {n} does not split into {blocks} diagonal blocks"
    b = n // blocks
    mask = torch.block_diag(*[torch.ones(b, b, dtype=torch.bool, device=left.device)] * blocks)
    off = left.masked_select(~mask)
    if off.numel() and bool((off != 0).any()):
        return f"it has {int((off != 0).sum())} nonzero value(s) outside its {blocks} diagonal blocks of {b}"
    return ""


class W4A4MXFP4FlatQuantLinear(QuantizedLayer):
    """``y = MX4(x @ kron(L, R)) @ MX4(W @ kron(L, R)^{-T})^T (+ bias)``: FP4 E2M1 elements, E8M0 scales per 32.

    Build it with :meth:`from_checkpoint` (the per-layer tensors: ``weight`` uint8 [O, K/2], ``weight_scale``
    uint8 [O, K/32], ``left_trans`` [L, L], ``right_trans`` [R, R], ``clip_ratio`` float32 [1], optional
    ``bias``) or :meth:`from_float`. ``tp_size`` ranks (at most ``max_supported_tp``) compute a row-parallel
    layer, each on its diagonal block of ``left_trans``.
    """

    FP32_BUFFERS = ("clip_ratio",)

    def __init__(self, in_features: int, out_features: int, n1: int, n2: int, act_dtype: torch.dtype, bias: bool,
                 backend: str | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, tp_size: int = 1,
                 max_supported_tp: int = DEFAULT_MAX_TP, device=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("n1", n1), ("n2", n2),
                        ("tp_size", tp_size), ("max_supported_tp", max_supported_tp)):
            positive_int(v, name)
        if (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                or not 1 <= chunk_tokens <= MAX_CHUNK_TOKENS):
            raise ValueError(f"chunk_tokens: expected an int in [1, {MAX_CHUNK_TOKENS}], got {chunk_tokens!r}")
        if n1 * n2 != in_features:
            raise ValueError(f"n1, n2: expected n1 * n2 == in_features = {in_features}, got {n1} x {n2}")
        if max(n1, n2) > MAX_FACTOR:
            raise ValueError(f"n1, n2: factor sizes {n1} x {n2} exceed {MAX_FACTOR}")
        if n2 % 2:
            raise ValueError(f"n2: expected an even size (two FP4 codes per byte), got {n2}")
        if tp_size > max_supported_tp:
            raise ValueError(f"tp_size: {tp_size} exceeds max_supported_tp = {max_supported_tp} (vLLM refuses it)")
        if n1 % tp_size or (in_features // tp_size) % GROUP:
            raise ValueError(f"tp_size: each of {tp_size} ranks needs a whole diagonal block of left_trans ({n1} "
                             f"rows) and a multiple of {GROUP} input columns (K = {in_features})")
        check_half(act_dtype)
        if backend is not None:
            ops.resolve_backend(backend)
        self.in_features, self.out_features = in_features, out_features
        self.n1, self.n2 = n1, n2
        self.tp_size = tp_size
        self.max_supported_tp = max_supported_tp
        self.group_size = GROUP
        self.backend = backend
        self.chunk_tokens = chunk_tokens
        u8, f32, act = (dict(dtype=t, device=device) for t in (torch.uint8, torch.float32, act_dtype))
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, **u8))
        self.register_buffer("weight_scale", torch.zeros(out_features, in_features // GROUP, **u8))
        self.register_buffer("left_trans", torch.eye(n1, **act))
        self.register_buffer("right_trans", torch.eye(n2, **act))
        self.register_buffer("clip_ratio", torch.ones(1, **f32))
        self.register_buffer("bias", torch.zeros(out_features, **act) if bias else None)
        # What vllm-ascend derives after loading: p1 = L^T (per rank: its diagonal block), p2 = R, in the act dtype
        self.register_buffer("p1", torch.eye(n1, **act), persistent=False)
        self.register_buffer("p2", torch.eye(n2, **act), persistent=False)
        self.register_buffer("p1_ranks", None, persistent=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, tensors: Mapping[str, torch.Tensor], backend: str | None = None,
                        act_dtype: torch.dtype | None = None, tp_size: int = 1,
                        max_supported_tp: int = DEFAULT_MAX_TP, **kwargs) -> "W4A4MXFP4FlatQuantLinear":
        """Build from the checkpoint tensors; a wrong shape or dtype raises ``ValueError`` naming the tensor."""
        missing = [k for k in MX_CHECKPOINT_KEYS if k not in tensors]
        if missing:
            raise ValueError(f"tensors: missing {missing} (expected {list(MX_CHECKPOINT_KEYS)} and optional 'bias')")
        extra = sorted(set(tensors) - set(MX_CHECKPOINT_KEYS) - {"bias"})
        if extra:
            raise ValueError(f"tensors: unexpected keys {extra}")
        w = tensors["weight"]
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype != torch.uint8:
            raise ValueError(f"weight: expected a uint8 matrix [O, K/2] of packed FP4 codes, got "
                             f"{getattr(w, 'dtype', type(w).__name__)} {list(getattr(w, 'shape', []))}")
        out_f, in_f = w.shape[0], 2 * w.shape[1]
        if in_f % GROUP:
            raise ValueError(f"weight: in-features K = {in_f} must be a multiple of {GROUP}")
        lt, rt = tensors["left_trans"], tensors["right_trans"]
        n1, n2 = check_transforms(lt, rt)
        if n1 * n2 != in_f:
            raise ValueError(f"left_trans/right_trans: sizes {n1} x {n2} = {n1 * n2} must multiply to in-features {in_f}")
        ws = tensors["weight_scale"]
        if not isinstance(ws, torch.Tensor) or ws.dtype != torch.uint8 or tuple(ws.shape) != (out_f, in_f // GROUP):
            raise ValueError(f"weight_scale: expected uint8 [{out_f}, {in_f // GROUP}] (E8M0), got "
                             f"{getattr(ws, 'dtype', None)} {list(getattr(ws, 'shape', []))}")
        if bool((ws == E8M0_NAN).any()):
            raise ValueError(f"weight_scale: {int((ws == E8M0_NAN).sum())} code(s) 0xFF (E8M0 NaN)")
        cr = tensors["clip_ratio"]
        if not isinstance(cr, torch.Tensor) or cr.dtype != torch.float32 or tuple(cr.shape) != (1,):
            raise ValueError(f"clip_ratio: expected float32 [1], got {getattr(cr, 'dtype', None)} "
                             f"{list(getattr(cr, 'shape', []))}")
        clip = ops.check_clip_ratio(cr)
        if act_dtype is None:
            act_dtype = lt.dtype if lt.dtype in HALF_DTYPES else torch.bfloat16
        check_half(act_dtype)
        bias = tensors.get("bias")
        check_bias(bias, out_f)
        kwargs.setdefault("device", w.device)
        layer = cls(in_f, out_f, n1, n2, act_dtype, bias is not None, backend=backend, tp_size=tp_size,
                    max_supported_tp=max_supported_tp, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.weight_scale.copy_(ws)
            layer.left_trans = lt.detach().clone()
            layer.right_trans = rt.detach().clone()
            layer.clip_ratio.fill_(clip)
            if bias is not None:
                layer.bias = bias.detach().to(act_dtype).clone()
        layer._derive()
        return layer

    @classmethod
    def from_float(cls, linear: nn.Linear, left_trans: torch.Tensor, right_trans: torch.Tensor,
                   clip_ratio: float = 1.0, act_dtype: torch.dtype | None = None, backend: str | None = None,
                   tp_size: int = 1, max_supported_tp: int = DEFAULT_MAX_TP, scale_rule: str = "kernel",
                   **kwargs) -> "W4A4MXFP4FlatQuantLinear":
        """Fold ``kron(L, R)^{-T}`` into ``linear.weight`` (L, R first rounded to the activation dtype, the fold
        in float64) and round it to MXFP4 per 32 along K under ``scale_rule`` (RTN)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        if act_dtype is None:
            act_dtype = linear.weight.dtype if linear.weight.dtype in HALF_DTYPES else torch.bfloat16
        check_half(act_dtype)
        for name, t in (("left_trans", left_trans), ("right_trans", right_trans)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != t.shape[1] or not t.is_floating_point():
                raise ValueError(f"{name}: expected a square float matrix")
        w = linear.weight.detach()
        lt, rt = (t.detach().to(w.device, act_dtype) for t in (left_trans, right_trans))
        if lt.shape[0] * rt.shape[0] != w.shape[1]:
            raise ValueError(f"left_trans/right_trans: sizes {lt.shape[0]} x {rt.shape[0]} must multiply to "
                             f"linear's in_features {w.shape[1]}")
        q, scale = quantize_weight_mxfp4(fold_weight(w, lt, rt), scale_rule=scale_rule)
        tensors = {"weight": q, "weight_scale": scale, "left_trans": lt, "right_trans": rt,
                   "clip_ratio": torch.tensor([float(clip_ratio)], dtype=torch.float32, device=w.device)}
        if linear.bias is not None:
            tensors["bias"] = linear.bias.detach().to(act_dtype)
        return cls.from_checkpoint(tensors, backend=backend, act_dtype=act_dtype, tp_size=tp_size,
                                   max_supported_tp=max_supported_tp, **kwargs)

    def _derive(self) -> None:
        act = self.p1.dtype
        self.p1 = self.left_trans.detach().transpose(0, 1).contiguous().to(act)
        self.p2 = self.right_trans.detach().contiguous().to(act)
        if self.tp_size > 1:  # rank r keeps diagonal block r of left_trans (vllm-ascend's MXFP4 loader)
            b = self.n1 // self.tp_size
            self.p1_ranks = torch.stack([self.p1[r * b:(r + 1) * b, r * b:(r + 1) * b] for r in range(self.tp_size)])

    def _apply(self, fn, recurse=True):
        act = self.p1.dtype
        self._apply_keeping_fp32(fn, recurse)
        if self.p1.dtype not in HALF_DTYPES:  # an fp32 model cast must not make the act dtype fp32
            self.p1, self.p2 = self.p1.to(act), self.p2.to(act)
            if self.p1_ranks is not None:
                self.p1_ranks = self.p1_ranks.to(act)
        if self.bias is not None and self.bias.dtype != self.p1.dtype:
            self.bias = self.bias.to(self.p1.dtype)
        return self

    # ------------------------------------------------------------------ views
    @property
    def act_dtype(self) -> torch.dtype:
        return self.p1.dtype

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W'`` in the transformed basis: E2M1 values times their E8M0 scales (exact in float64)."""
        return dequantize(self.weight, self.weight_scale).to(dtype)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        out = {"weight": self.weight.clone(), "weight_scale": self.weight_scale.clone(),
               "left_trans": self.left_trans.clone(), "right_trans": self.right_trans.clone(),
               "clip_ratio": self.clip_ratio.clone()}
        if self.bias is not None:
            out["bias"] = self.bias.clone()
        return out

    def set_clip_ratio(self, clip_ratio: float) -> None:
        self.clip_ratio.fill_(ops.check_clip_ratio(clip_ratio))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kron=({self.n1}x{self.n2}), "
                f"group_size={self.group_size}, max_supported_tp={self.max_supported_tp}"
                f"{f', tp_size={self.tp_size}' if self.tp_size > 1 else ''}, "
                f"act_dtype={str(self.act_dtype).replace('torch.', '')}, bias={self.bias is not None}, "
                f"backend={self.backend or 'auto'}")

    # ------------------------------------------------------------------ forward
    def _rank(self, x: torch.Tensor, p1: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, c: float) -> torch.Tensor:
        """One rank's ``[T, k]`` slice: the FP4 quantization of its tokens, then the MX matmul."""
        k = x.shape[1]
        xq, s = ops.kronecker_quant(x.view(-1, p1.shape[0], self.n2), p1, self.p2, clip_ratio=c,
                                    dst_dtype=FLOAT4_E2M1_X2, backend=self.backend)
        return ops.quant_matmul(xq.view(-1, k // 2), w.t(), ws, pertoken_scale=s, output_dtype=self.act_dtype,
                                backend=self.backend, x1_dtype=FLOAT4_E2M1_X2, x2_dtype=FLOAT4_E2M1_X2,
                                pertoken_scale_dtype=FLOAT8_E8M0, scale_dtype=FLOAT8_E8M0,
                                group_sizes=list(ops.MX_GROUP_SIZES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x = self.activation_input(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features, dtype=in_dtype)
        if not bool(torch.isfinite(x2).all()):
            raise ValueError(f"x: expected finite activations in {self.act_dtype}")
        c = float(self.clip_ratio.item())
        tp, k = self.tp_size, self.in_features // self.tp_size
        kb, kg = k // 2, k // GROUP
        outs = []
        for start in range(0, x2.shape[0], self.chunk_tokens):
            chunk = x2[start:start + self.chunk_tokens]
            if tp == 1:
                y = self._rank(chunk, self.p1, self.weight, self.weight_scale, c)
                if self.bias is not None:
                    y = y + self.bias  # in the output dtype (assumed, as the int4 layer)
                outs.append(y)
                continue
            total = None
            for r in range(tp):
                yr = self._rank(chunk[:, r * k:(r + 1) * k].contiguous(), self.p1_ranks[r],
                                self.weight[:, r * kb:(r + 1) * kb].contiguous(),
                                self.weight_scale[:, r * kg:(r + 1) * kg].contiguous(), c)
                if r == 0 and self.bias is not None:
                    yr = yr + self.bias  # vLLM adds a row-parallel bias on rank 0 only
                total = yr.float() if total is None else total + yr.float()
            outs.append(total.to(self.act_dtype))  # the all-reduce: fp32 sum, one rounding (assumed)
        y = outs[0] if len(outs) == 1 else torch.cat(outs)
        return y.view(*lead, self.out_features).to(in_dtype)

