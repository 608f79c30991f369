"""The W4A4 FlatQuant linear layer, as vllm-ascend serves it (docs/ascend-ops.md, 'The W4A4 FlatQuant linear').

Forward for ``x[..., K]``, ``K = n1 * n2``:
``xq, s_tok = kronecker_quant(x.view(-1, n1, n2), L^T, R, c)``;
``y = quant_matmul(xq, pack(W_q)^T, weight_scale, pertoken_scale=s_tok)``;  ``y += bias``.
The layer calls ``flatquant_lab.ops`` only; which backend runs is the ops' business.
"""
from __future__ import annotations

import logging
from typing import Mapping

import torch
from einops import rearrange
from torch import nn

from .. import ops
from ..checks import positive_int
from ..dtypes import HALF_DTYPES, cast_rounds, check_half
from ..kronecker import decompose_dim, fold_weight
from ..packing import INT4_MAX, INT4_MIN, unpack_int4
from ..quantizers import quantize_weight
from .base import QuantizedLayer, check_bias, check_transforms, sum_over_ranks

log = logging.getLogger(__name__)

CHECKPOINT_KEYS = ("weight", "weight_scale", "weight_offset", "left_trans", "right_trans", "clip_ratio")
DEFAULT_CHUNK_TOKENS = 8192  # npu_kronecker_quant's token limit on CANN 8.1/8.2
MAX_CHUNK_TOKENS = 262144  # ... and on CANN 8.5, the largest of any release (docs/ascend-ops.md)


def _expect(t, name: str, shape: tuple, dtypes: tuple) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    if t.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name}: expected dtype {names}, got {str(t.dtype).replace('torch.', '')}")


class W4A4FlatQuantLinear(QuantizedLayer):
    """``y = Q4(x @ kron(L, R)) @ Q4(W @ kron(L, R)^{-T})^T * scales (+ bias)`` on int4 operands.

    Build it with :meth:`from_checkpoint` (the per-layer tensors of the vllm-ascend contract) or
    :meth:`from_float` (fold and quantize a float ``nn.Linear``). Inputs may be float16 or bfloat16
    (the activation dtype the transforms were cast to; the other half type is refused). float32
    inputs are rounded to the activation dtype before the ops, as a serving engine would only ever
    see half inputs, and the result is returned in float32 (it carries the half dtype's rounding).
    """

    FP32_BUFFERS = ("weight_scale", "weight_offset", "clip_ratio")  # their dtype is the contract's: Module.to(dtype) keeps it

    def __init__(self, in_features: int, out_features: int, n1: int, n2: int, act_dtype: torch.dtype,
                 bias: bool, backend: str | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 check_finite: bool = True, tp_size: int = 1, device=None):
        super().__init__()
        if (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                or not 1 <= chunk_tokens <= MAX_CHUNK_TOKENS):
            raise ValueError(f"chunk_tokens: expected an int in [1, {MAX_CHUNK_TOKENS}] (the op's token limit: "
                             f"8192 on CANN 8.1/8.2, 32768 on 8.3, 262144 on 8.5), got {chunk_tokens!r}")
        for name, v in (("in_features", in_features), ("out_features", out_features), ("n1", n1), ("n2", n2),
                        ("tp_size", tp_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if in_features % (8 * tp_size):
            raise ValueError(f"in_features: expected a multiple of 8 * tp_size = {8 * tp_size} (int4 packing of "
                             f"each rank's slice), got {in_features}")
        if n1 * n2 * tp_size != in_features:
            per = f"in_features / tp_size = {in_features // tp_size}" if tp_size > 1 else f"in_features = {in_features}"
            raise ValueError(f"n1, n2: expected n1 * n2 == {per}, got {n1} x {n2}")
        check_half(act_dtype)
        if backend is not None:
            ops.resolve_backend(backend)  # a misspelt backend fails here, not at the first forward
        self.in_features, self.out_features = in_features, out_features
        self.n1, self.n2 = n1, n2
        self.tp_size = tp_size  # kron(I_tp, L, R): vLLM's ranks of a row-parallel layer, each on K / tp inputs
        self.backend = backend
        self.chunk_tokens = chunk_tokens
        self.check_finite = check_finite
        i32, f32, act = (dict(dtype=t, device=device) for t in (torch.int32, torch.float32, act_dtype))
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 8, **i32))
        self.register_buffer("weight_scale", torch.zeros(out_features, 1, **f32))
        self.register_buffer("weight_offset", torch.zeros(out_features, 1, **f32))
        self.register_buffer("left_trans", torch.eye(n1, **act))
        self.register_buffer("right_trans", torch.eye(n2, **act))
        self.register_buffer("clip_ratio", torch.ones(1, **f32))
        self.register_buffer("bias", torch.zeros(out_features, **act) if bias else None)
        # What vllm-ascend derives once after loading: p1 = L^T (contiguous), p2 = R, in the act dtype.
        self.register_buffer("p1", torch.eye(n1, **act), persistent=False)
        self.register_buffer("p2", torch.eye(n2, **act), persistent=False)
        # tp_size > 1: each rank's packed weight columns, contiguous [tp, O, K / (8 tp)] (as each rank holds them)
        self.register_buffer("weight_ranks", None, persistent=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, tensors: Mapping[str, torch.Tensor], backend: str | None = None,
                        act_dtype: torch.dtype | None = None, tp_size: int = 1, **kwargs) -> "W4A4FlatQuantLinear":
        """Build from the checkpoint tensors (docs/checkpoint-format.md: ``weight`` int8 [O, K], ``weight_scale`` ...).

        Every shape and dtype is checked; a wrong one raises ``ValueError`` naming the tensor.
        ``act_dtype`` defaults to the transforms' dtype when that is half, else bfloat16. ``tp_size``:
        the transforms are one rank's (``n1 * n2 = K / tp_size``) of a row-parallel layer. The layer is
        built on ``weight``'s device (or ``device=`` in ``kwargs``).
        """
        missing = [k for k in CHECKPOINT_KEYS if k not in tensors]
        if missing:
            raise ValueError(f"tensors: missing {missing} (expected {list(CHECKPOINT_KEYS)} and optional 'bias')")
        extra = sorted(set(tensors) - set(CHECKPOINT_KEYS) - {"bias"})
        if extra:
            raise ValueError(f"tensors: unexpected keys {extra}")
        w = tensors["weight"]
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"weight: expected an int8 tensor [O, K], got {getattr(w, 'shape', w)}")
        out_f, in_f = w.shape
        positive_int(tp_size, "tp_size")
        if in_f % (8 * tp_size):
            raise ValueError(f"weight: in-features K = {in_f} must be divisible by 8 * tp_size = {8 * tp_size} "
                             "(int4 packing of each rank's slice)")
        _expect(w, "weight", (out_f, in_f), (torch.int8,))
        lt, rt = tensors["left_trans"], tensors["right_trans"]
        n1, n2 = check_transforms(lt, rt)
        if n1 * n2 * tp_size != in_f:
            per = f"in-features / tp_size = {in_f} / {tp_size}" if tp_size > 1 else f"in-features {in_f}"
            raise ValueError(
                f"left_trans/right_trans: sizes {n1} x {n2} = {n1 * n2} must multiply to {per} "
                f"(expected {decompose_dim(in_f // tp_size)})"
            )
        _expect(tensors["weight_scale"], "weight_scale", (out_f, 1), (torch.float32,))
        _expect(tensors["weight_offset"], "weight_offset", (out_f, 1), (torch.float32,))
        _expect(tensors["clip_ratio"], "clip_ratio", (1,), (torch.float32,))
        clip = ops.check_clip_ratio(tensors["clip_ratio"])
        if not bool(torch.isfinite(tensors["weight_scale"]).all()):
            raise ValueError("weight_scale: expected finite values")
        wmin, wmax = int(w.min()), int(w.max())
        if wmin < INT4_MIN or wmax > INT4_MAX:
            raise ValueError(f"weight: expected int4 values in [{INT4_MIN}, {INT4_MAX}], got min {wmin}, max {wmax}")
        if act_dtype is None:
            act_dtype = lt.dtype if lt.dtype in HALF_DTYPES else torch.bfloat16
        check_half(act_dtype)
        bias = tensors.get("bias")
        check_bias(bias, out_f)
        kwargs.setdefault("device", w.device)
        layer = cls(in_f, out_f, n1, n2, act_dtype, bias is not None, backend=backend, tp_size=tp_size, **kwargs)
        with torch.no_grad():
            layer.weight_packed.copy_(ops.convert_weight_to_int4pack(w.to(torch.int32), backend="reference"))
            layer.weight_scale.copy_(tensors["weight_scale"])
            layer.weight_offset.copy_(tensors["weight_offset"])
            layer.left_trans = lt.detach().clone()
            layer.right_trans = rt.detach().clone()
            layer.clip_ratio.fill_(clip)
            if bias is not None:
                layer.bias = bias.detach().to(act_dtype).clone()  # added in the output dtype (docs/ascend-ops.md)
        layer._derive()
        return layer

    @classmethod
    def from_float(cls, linear: nn.Linear, left_trans: torch.Tensor, right_trans: torch.Tensor,
                   clip_ratio: float = 1.0, weight_clip: torch.Tensor | None = None,
                   act_dtype: torch.dtype | None = None, backend: str | None = None, tp_size: int = 1,
                   **kwargs) -> "W4A4FlatQuantLinear":
        """Fold ``kron(L, R)^{-T}`` into ``linear.weight``, quantize it per channel to int4, and build.

        ``L``, ``R`` are first rounded to the activation dtype (what the layer will hold and the
        device will use); the fold uses those rounded values in float64, so the transform cancels
        to float64 accuracy. ``weight_clip`` ([O] factors in (0, 1]) shrinks each channel's range.
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        if act_dtype is None:
            act_dtype = linear.weight.dtype if linear.weight.dtype in HALF_DTYPES else torch.bfloat16
        check_half(act_dtype)
        w = linear.weight.detach()
        if w.shape[1] % 8:
            raise ValueError(f"linear: in_features = {w.shape[1]} must be divisible by 8 (int4 packing)")
        if weight_clip is not None:
            weight_clip = torch.as_tensor(weight_clip).detach()
            if weight_clip.numel() != w.shape[0] or not bool(((weight_clip > 0) & (weight_clip <= 1)).all()):
                raise ValueError(f"weight_clip: expected {w.shape[0]} factors in (0, 1]")
        for name, t in (("left_trans", left_trans), ("right_trans", right_trans)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != t.shape[1] or not t.is_floating_point():
                raise ValueError(f"{name}: expected a square float matrix, got "
                                 f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1 or w.shape[1] % tp_size:
            raise ValueError(f"tp_size: expected a positive int dividing in_features {w.shape[1]}, got {tp_size!r}")
        if left_trans.shape[0] * right_trans.shape[0] * tp_size != w.shape[1]:
            per = f"in_features / tp_size = {w.shape[1] // tp_size}" if tp_size > 1 else f"in_features {w.shape[1]}"
            raise ValueError(f"left_trans/right_trans: sizes {left_trans.shape[0]} x {right_trans.shape[0]} must "
                             f"multiply to linear's {per} (expected {decompose_dim(w.shape[1] // tp_size)})")
        lt, rt = (t.detach().to(w.device, act_dtype) for t in (left_trans, right_trans))
        folded = fold_weight(w, lt, rt, blocks=tp_size)
        q, scale = quantize_weight(folded, weight_clip)
        tensors = {
            "weight": q,
            "weight_scale": scale,
            "weight_offset": torch.zeros_like(scale),
            "left_trans": lt,
            "right_trans": rt,
            "clip_ratio": torch.tensor([float(clip_ratio)], dtype=torch.float32, device=w.device),
        }
        if linear.bias is not None:
            tensors["bias"] = linear.bias.detach().to(act_dtype)
        return cls.from_checkpoint(tensors, backend=backend, act_dtype=act_dtype, tp_size=tp_size, **kwargs)

    def _derive(self) -> None:
        """What vllm-ascend does once after loading: ``p1 = L^T`` contiguous, ``p2 = R``, in the act dtype."""
        act = self.p1.dtype
        self.p1 = self.left_trans.detach().transpose(0, 1).contiguous().to(act)
        self.p2 = self.right_trans.detach().contiguous().to(act)
        if self.tp_size > 1:  # rank r holds columns [r K / tp, (r + 1) K / tp) of the weight (docs/tensor-parallel.md)
            self.weight_ranks = rearrange(self.weight_packed, "o (t k) -> t o k", t=self.tp_size).contiguous()

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) would cast the fp32 scales too; the contract keeps them float32.
        act = self.p1.dtype
        new = fn(self.p1).dtype
        if new in HALF_DTYPES and new != act:
            # The int4 weights were folded with the transforms as stored: rounding those anew would
            # leave kron(L, R) and its folded inverse out of step. Refuse before anything moves.
            for name in ("left_trans", "right_trans"):
                t = getattr(self, name)
                if t.dtype in HALF_DTYPES and t.dtype != new and cast_rounds(t, new):
                    raise ValueError(
                        f"dtype: casting {name} from {str(t.dtype).replace('torch.', '')} to "
                        f"{str(new).replace('torch.', '')} rounds it, and this layer's int4 weights were folded "
                        f"with the stored values; re-quantize from the float layer with act_dtype={new}"
                    )
        self._apply_keeping_fp32(fn, recurse)
        if self.p1.dtype not in HALF_DTYPES:  # an fp32 model cast must not make the act dtype fp32
            self.p1, self.p2 = self.p1.to(act), self.p2.to(act)
        if self.bias is not None and self.bias.dtype != self.p1.dtype:
            self.bias = self.bias.to(self.p1.dtype)
        return self

    # ------------------------------------------------------------------ views
    @property
    def act_dtype(self) -> torch.dtype:
        return self.p1.dtype

    @property
    def weight_int(self) -> torch.Tensor:
        """int8 ``[O, K]`` int4 values (unpacked)."""
        return unpack_int4(self.weight_packed)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_hat = weight * weight_scale`` in the transformed basis."""
        return (self.weight_int.to(torch.float64) * self.weight_scale.double()).to(dtype)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of this layer (docs/checkpoint-format.md), exactly as loaded (a round trip is
        bit-exact)."""
        out = {
            "weight": self.weight_int,
            "weight_scale": self.weight_scale.clone(),
            "weight_offset": self.weight_offset.clone(),
            "left_trans": self.left_trans.clone(),
            "right_trans": self.right_trans.clone(),
            "clip_ratio": self.clip_ratio.clone(),
        }
        if self.bias is not None:
            out["bias"] = self.bias.clone()
        return out

    def set_clip_ratio(self, clip_ratio: float) -> None:
        """Change the activation clip ratio in place (validated: a finite float in (0, 1])."""
        self.clip_ratio.fill_(ops.check_clip_ratio(clip_ratio))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kron=({self.n1}x{self.n2}){f', tp_size={self.tp_size}' if self.tp_size > 1 else ''}, "
                f"clip_ratio={self.clip_ratio.item():.4f}, "
                f"act_dtype={str(self.act_dtype).replace('torch.', '')}, bias={self.bias is not None}, "
                f"backend={self.backend or 'auto'}")

    # ------------------------------------------------------------------ forward
    def _check_finite(self, x: torch.Tensor) -> None:
        if bool(torch.isfinite(x).all()):  # the common case in two passes; count only on failure
            return
        bad = ~torch.isfinite(x)
        x2 = bad.reshape(-1, self.in_features)
        raise ValueError(
            f"x: expected finite activations, got {int(bad.sum())} non-finite values in "
            f"{int(x2.any(-1).sum())} of {x2.shape[0]} tokens (pass check_finite=False to skip this check)"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dim {self.in_features} (in_features), got shape {tuple(x.shape)}")
        in_dtype = x.dtype
        if in_dtype == torch.float32:
            if self.check_finite:
                self._check_finite(x)
            x = x.to(self.act_dtype)
            if self.check_finite and not bool(torch.isfinite(x).all()):
                # finite float32 values past the half type's range (65504 for fp16) became inf
                n = int((~torch.isfinite(x)).sum())
                raise ops.Fp16OverflowError(
                    f"x: {n} float32 value(s) overflow {self.act_dtype} (the layer's activation dtype, "
                    f"max {torch.finfo(self.act_dtype).max:g}) when cast for the ops; scale the input down"
                )
        elif in_dtype != self.act_dtype:
            raise ValueError(
                f"x: expected {self.act_dtype} (the layer's activation dtype) or float32, got {in_dtype}; "
                "cast the layer with .to(dtype) to change its activation dtype (where its transforms are "
                "exact in that dtype)"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()  # the op reads tokens as dense [n1, n2] tiles
        tokens = x2.shape[0]
        if tokens == 0:
            return x.new_zeros(*lead, self.out_features, dtype=in_dtype)
        if self.check_finite and in_dtype != torch.float32:  # float32 input was checked before the cast
            self._check_finite(x2)
        c = float(self.clip_ratio.item())
        if self.tp_size > 1:
            y = self._forward_ranks(x2, c)
        else:
            w_t = self.weight_packed.t()  # a transposed view of the contiguous [O, K/8], as vllm-ascend passes it
            scale = self.weight_scale.view(-1)
            outs = []
            for start in range(0, tokens, self.chunk_tokens):
                chunk = x2[start:start + self.chunk_tokens].view(-1, self.n1, self.n2)
                xq, s_tok = ops.kronecker_quant(chunk, self.p1, self.p2, clip_ratio=c, backend=self.backend)
                outs.append(ops.quant_matmul(xq.view(-1, self.in_features // 8), w_t, scale,
                                             pertoken_scale=s_tok, output_dtype=self.act_dtype,
                                             backend=self.backend))
            y = outs[0] if len(outs) == 1 else torch.cat(outs)
            if self.bias is not None:
                y = y + self.bias  # in the output dtype, as vllm-ascend adds it
        return y.view(*lead, self.out_features).to(in_dtype)

    def _forward_ranks(self, x2: torch.Tensor, c: float) -> torch.Tensor:
        """What vLLM's ``tp_size`` ranks of a row-parallel layer compute, then their all-reduce (:func:`sum_over_ranks`).

        Rank ``r``: ``y_r = W4A4(x[:, r K/tp : (r+1) K/tp])`` with its weight columns (+ bias on rank 0,
        in the output dtype); all-reduce ``y = round_t(sum_r fp32(y_r))`` (docs/tensor-parallel.md).
        """
        k_rank = self.in_features // self.tp_size
        scale = self.weight_scale.view(-1)
        outs = []
        for start in range(0, x2.shape[0], self.chunk_tokens):
            chunk = x2[start:start + self.chunk_tokens]

            def rank_output(r: int) -> torch.Tensor:
                xr = chunk[:, r * k_rank:(r + 1) * k_rank].contiguous().view(-1, self.n1, self.n2)
                xq, s_tok = ops.kronecker_quant(xr, self.p1, self.p2, clip_ratio=c, backend=self.backend)
                return ops.quant_matmul(xq.view(-1, k_rank // 8), self.weight_ranks[r].t(), scale,
                                        pertoken_scale=s_tok, output_dtype=self.act_dtype, backend=self.backend)

            outs.append(sum_over_ranks(rank_output, self.tp_size, self.bias, lambda t: t.to(self.act_dtype)))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

