"""The W8A8_DYNAMIC linear layer, as vllm-ascend serves it (docs/ascend-ops.md, 'W8A8_DYNAMIC layers').

Forward for ``x[..., K]`` in the model dtype:
``q, s_tok = dynamic_quant(x, dst_type=int8)``;
``y = quant_matmul(q, weight^T, weight_scale, pertoken_scale=s_tok, bias=bias, output_dtype=x.dtype)``.
``weight_scale`` is the checkpoint's float32 scale rounded to the model dtype, as vllm-ascend
allocates it in that dtype on load. The layer calls ``flatquant_lab.ops`` only.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .. import ops
from ..checks import positive_int
from ..dtypes import HALF_DTYPES, check_half, dtype_name
from ..quantizers import quantize_weight
from .base import QuantizedLayer, sum_over_ranks

CHECKPOINT_KEYS = ("weight", "weight_scale", "weight_offset")


def _expect(t, name: str, shape: tuple, floating: bool | None = None, dtype: torch.dtype | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype_name(dtype)}, got {dtype_name(t.dtype)}")
    if floating and not t.is_floating_point():
        raise ValueError(f"{name}: expected a float dtype, got {dtype_name(t.dtype)}")


def op_scale_dtype(act_dtype: torch.dtype) -> torch.dtype:
    """The dtype the scale is handed to the int8 matmul in: bf16 models pass bf16 (as vllm-ascend does);
    the op takes no fp16 scale, so fp16 models pass the fp16-rounded values in float32 (the same numbers)."""
    return torch.bfloat16 if act_dtype == torch.bfloat16 else torch.float32


class W8A8DynamicLinear(QuantizedLayer):
    """``y = Q8_tok(x) @ (weight * round_t(weight_scale))^T (+ bias)`` on int8 operands, ``t`` the model dtype.

    Build it with :meth:`from_checkpoint` (``weight`` int8 [O, K], ``weight_scale`` / ``weight_offset``
    float32 [O, 1], optional ``bias`` [O]) or :meth:`from_float` (round-to-nearest int8 weights of a float
    ``nn.Linear``; GPTQ weights: ``flatquant_lab.calibrate.w8a8_dynamic_layer``). Inputs are ``act_dtype``
    (the model dtype) or float32, which is rounded to ``act_dtype`` first and the result returned in float32.
    """

    FP32_BUFFERS = ("weight_scale", "weight_offset")  # their dtype is the contract's: Module.to(dtype) keeps it

    def __init__(self, in_features: int, out_features: int, act_dtype: torch.dtype, bias: bool,
                 backend: str | None = None, tp_size: int = 1, device=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("tp_size", tp_size)):
            positive_int(v, name)
        if in_features % tp_size:
            raise ValueError(f"tp_size: expected a divisor of in_features {in_features}, got {tp_size}")
        check_half(act_dtype)
        ops.resolve_backend(backend)  # a misspelt backend fails here, not at the first forward
        self.in_features, self.out_features = in_features, out_features
        # > 1: compute as vLLM's ranks of a row-parallel layer do, each quantizing its K / tp inputs
        self.tp_size = tp_size
        self.backend = backend
        self.act_dtype = act_dtype
        # The weight as vllm-ascend keeps it after loading: transposed to [K, O], contiguous.
        self.register_buffer("weight_t", torch.zeros(in_features, out_features, dtype=torch.int8, device=device))
        # The checkpoint's float32 scale, kept exactly (a round trip is bit-exact) ...
        self.register_buffer("weight_scale", torch.zeros(out_features, 1, dtype=torch.float32, device=device))
        self.register_buffer("weight_offset", torch.zeros(out_features, 1, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=act_dtype, device=device) if bias else None)
        # ... and the one that runs: rounded to the model dtype, flattened (derived, not stored).
        self.register_buffer("scale", torch.zeros(out_features, dtype=op_scale_dtype(act_dtype), device=device),
                             persistent=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, tensors: Mapping[str, torch.Tensor], act_dtype: torch.dtype = torch.bfloat16,
                        backend: str | None = None, tp_size: int = 1) -> "W8A8DynamicLinear":
        """Build from the checkpoint tensors (docs/checkpoint-format.md, 'W8A8_DYNAMIC tensors'); ``act_dtype`` is
        the model dtype the scale and bias round to.

        ``tp_size > 1``: the layer computes what vLLM's ranks of a row-parallel layer compute (see forward).
        """
        missing = [k for k in CHECKPOINT_KEYS if k not in tensors]
        if missing:
            raise ValueError(f"tensors: missing {missing} (expected {list(CHECKPOINT_KEYS)} and optional 'bias')")
        extra = sorted(set(tensors) - set(CHECKPOINT_KEYS) - {"bias"})
        if extra:
            raise ValueError(f"tensors: unexpected keys {extra} (W8A8_DYNAMIC has {list(CHECKPOINT_KEYS)} and "
                             "optional 'bias'; deq_scale / input_scale belong to static W8A8)")
        check_half(act_dtype)
        w = tensors["weight"]
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"weight: expected an int8 tensor [O, K], got {getattr(w, 'shape', w)}")
        out_f, in_f = w.shape
        _expect(w, "weight", (out_f, in_f), dtype=torch.int8)
        # msModelSlim writes float32; any float dtype is read and rounded to the model dtype as vllm-ascend does
        _expect(tensors["weight_scale"], "weight_scale", (out_f, 1), floating=True)
        _expect(tensors["weight_offset"], "weight_offset", (out_f, 1), floating=True)
        if not bool(torch.isfinite(tensors["weight_scale"]).all()):
            raise ValueError("weight_scale: expected finite values")
        bias = tensors.get("bias")
        if bias is not None:
            _expect(bias, "bias", (out_f,), floating=True)
        # built where the weight is, as W4A4FlatQuantLinear.from_checkpoint is
        layer = cls(in_f, out_f, act_dtype, bias is not None, backend=backend, tp_size=tp_size, device=w.device)
        with torch.no_grad():
            layer.weight_t.copy_(w.t())
            layer.weight_scale.copy_(tensors["weight_scale"].float())
            layer.weight_offset.copy_(tensors["weight_offset"].float())
            if bias is not None:
                layer.bias.copy_(bias.to(act_dtype))  # allocated in the model dtype by vllm-ascend
        layer._derive()
        return layer

    @classmethod
    def from_float(cls, linear: nn.Linear, act_dtype: torch.dtype | None = None,
                   backend: str | None = None) -> "W8A8DynamicLinear":
        """Round ``linear.weight`` per output channel to int8 (GPTQ weights are calibration's:
        ``flatquant_lab.calibrate.w8a8_dynamic_layer``).

        The scale ``max|w_row| / 127`` is rounded to ``act_dtype`` first (what runs after vllm-ascend's
        load) and the codes are computed against that rounded scale.
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        if act_dtype is None:
            act_dtype = linear.weight.dtype if linear.weight.dtype in HALF_DTYPES else torch.bfloat16
        check_half(act_dtype)
        q, scale = quantize_weight(linear.weight.detach(), bits=8, scale_dtype=act_dtype)
        tensors = {"weight": q, "weight_scale": scale, "weight_offset": torch.zeros_like(scale)}
        if linear.bias is not None:
            tensors["bias"] = linear.bias.detach()
        return cls.from_checkpoint(tensors, act_dtype=act_dtype, backend=backend)

    def _derive(self) -> None:
        """What runs: ``weight_scale`` rounded to the model dtype, flattened (vllm-ascend's load)."""
        rounded = self.weight_scale.detach().view(-1).to(self.act_dtype)
        self.scale = rounded.to(op_scale_dtype(self.act_dtype))

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) would cast the float32 checkpoint scales: keep them, move them by device only,
        # and re-derive the running scale for the new model dtype (as a load into that dtype would).
        probe = fn(torch.zeros((), dtype=self.act_dtype, device=self.weight_scale.device))
        self._apply_keeping_fp32(fn, recurse)
        if probe.dtype in HALF_DTYPES:  # a float32 model cast leaves the act dtype as it was
            self.act_dtype = probe.dtype
        if self.bias is not None and self.bias.dtype != self.act_dtype:
            self.bias = self.bias.to(self.act_dtype)
        self._derive()
        return self

    # ------------------------------------------------------------------ views
    @property
    def weight_int(self) -> torch.Tensor:
        """int8 ``[O, K]``, the checkpoint's ``weight``."""
        return self.weight_t.t().contiguous()

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_hat = weight * round_t(weight_scale)``, what the device multiplies."""
        return (self.weight_int.double() * self.scale.double()[:, None]).to(dtype)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of this layer (docs/checkpoint-format.md, 'W8A8_DYNAMIC tensors'), exactly as
        loaded."""
        out = {"weight": self.weight_int, "weight_scale": self.weight_scale.clone(),
               "weight_offset": self.weight_offset.clone()}
        if self.bias is not None:
            out["bias"] = self.bias.clone()
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{f'tp_size={self.tp_size}, ' if self.tp_size > 1 else ''}act_dtype={dtype_name(self.act_dtype)}, "
                f"bias={self.bias is not None}, "
                f"backend={self.backend or 'auto'}")

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x = self.activation_input(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features, dtype=in_dtype)
        if not bool(torch.isfinite(x2).all()):
            raise ValueError(f"x: expected finite activations, got {int((~torch.isfinite(x2)).sum())} non-finite "
                             f"values (in {dtype_name(self.act_dtype)})")
        if self.tp_size == 1:
            q, s_tok = ops.dynamic_quant(x2, dst_type=torch.int8, backend=self.backend)
            y = ops.quant_matmul(q, self.weight_t, self.scale, pertoken_scale=s_tok, bias=self.bias,
                                 output_dtype=self.act_dtype, backend=self.backend)
        else:
            y = self._forward_ranks(x2)
        return y.view(*lead, self.out_features).to(in_dtype)

    def _forward_ranks(self, x2: torch.Tensor) -> torch.Tensor:
        """vLLM's ``tp_size`` ranks of a row-parallel layer, then their all-reduce.

        Rank ``r`` quantizes its slice ``x[:, r K/tp : (r+1) K/tp]`` per token and multiplies its weight
        rows (the bias on rank 0 only); all-reduce ``y = round_t(sum_r fp32(y_r))`` (assumed: HCCL's
        order and precision are not known, docs/tensor-parallel.md).
        """
        k = self.in_features // self.tp_size

        def rank_output(r: int) -> torch.Tensor:
            xr = x2[:, r * k:(r + 1) * k].contiguous()
            q, s_tok = ops.dynamic_quant(xr, dst_type=torch.int8, backend=self.backend)
            # the op adds the bias in its epilogue: rank 0's call takes it, so none is added after
            return ops.quant_matmul(q, self.weight_t[r * k:(r + 1) * k], self.scale, pertoken_scale=s_tok,
                                    bias=self.bias if r == 0 else None, output_dtype=self.act_dtype,
                                    backend=self.backend)

        return sum_over_ranks(rank_output, self.tp_size, None, lambda t: t.to(self.act_dtype))

