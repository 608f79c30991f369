"""A test double of the ``torch_npu`` module: records every call and computes with the reference ops.

Install it for one test with ``monkeypatch.setitem(sys.modules, "torch_npu", make_fake_torch_npu())``.
Each call is appended to ``module.calls`` as a :class:`Call` holding, per tensor argument, its
shape, dtype, strides, contiguity and storage pointer (plus a clone of the values), and the scalar
arguments as given. The double also enforces what the real ops require (docs/ascend-ops.md),
so that a caller passing the wrong layout fails here as it would on a device.

The MXFP4 path (docs/mxfp4.md): ``float4_e2m1fn_x2`` and ``float8_e8m0fnu`` are attributes of the double, as
of ``torch_npu``; they are opaque tokens here, and FP4 / E8M0 tensors are modelled as uint8 bytes.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch

from flatquant_lab.mxfp4 import FLOAT4_E2M1_X2, FLOAT8_E8M0
from flatquant_lab.ops import reference


@dataclass(frozen=True)
class TensorArg:
    shape: tuple
    dtype: torch.dtype
    stride: tuple
    contiguous: bool
    data_ptr: int
    value: torch.Tensor  # a clone, for value checks after the call


@dataclass
class Call:
    op: str
    tensors: dict[str, TensorArg | None] = field(default_factory=dict)
    scalars: dict[str, object] = field(default_factory=dict)


def _arg(t):
    if t is None:
        return None
    return TensorArg(tuple(t.shape), t.dtype, tuple(t.stride()), t.is_contiguous(), t.data_ptr(), t.detach().clone())


class NpuDtype(str):
    """One of torch_npu's own dtype objects (``torch_npu.float4_e2m1fn_x2``), an opaque token in the double."""


class FakeTorchNpu(types.ModuleType):
    """Stands in for ``torch_npu``; ``calls`` lists what was called, in order."""

    float4_e2m1fn_x2 = NpuDtype("torch_npu.float4_e2m1fn_x2")
    float8_e8m0fnu = NpuDtype("torch_npu.float8_e8m0fnu")

    def __init__(self):
        super().__init__("torch_npu")
        self.calls: list[Call] = []

    def _record(self, op, tensors, scalars):
        call = Call(op, {k: _arg(v) for k, v in tensors.items()}, dict(scalars))
        self.calls.append(call)
        return call

    def ops(self) -> list[str]:
        return [c.op for c in self.calls]

    # -------------------------------------------------------------- the ops
    def npu_kronecker_quant(self, x, kronecker_p1, kronecker_p2, clip_ratio=1.0, dst_dtype=torch.int32):
        self._record("npu_kronecker_quant", {"x": x, "p1": kronecker_p1, "p2": kronecker_p2},
                     {"clip_ratio": clip_ratio, "dst_dtype": dst_dtype})
        assert x.dim() == 3 and x.dtype in (torch.float16, torch.bfloat16), "x: [T, n1, n2] fp16/bf16"
        assert kronecker_p1.dtype == kronecker_p2.dtype == x.dtype, "one dtype for x, p1, p2"
        assert isinstance(clip_ratio, float), "clip_ratio is a python float attribute of the op"
        if isinstance(dst_dtype, NpuDtype):
            assert dst_dtype == self.float4_e2m1fn_x2, "FP4 path: dst_dtype torch_npu.float4_e2m1fn_x2"
            assert x.shape[-1] % 2 == 0 and (x.shape[1] * x.shape[2]) % 32 == 0, "FP4: n2 even, groups of 32"
            return reference.kronecker_quant(x, kronecker_p1, kronecker_p2, clip_ratio=clip_ratio,
                                             dst_dtype=FLOAT4_E2M1_X2)
        return reference.kronecker_quant(x, kronecker_p1, kronecker_p2, clip_ratio=clip_ratio, dst_dtype=dst_dtype)

    def npu_quant_matmul(self, x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                         x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None):
        mx = {"x1_dtype": x1_dtype, "x2_dtype": x2_dtype, "pertoken_scale_dtype": pertoken_scale_dtype,
              "scale_dtype": scale_dtype, "group_sizes": group_sizes}
        self._record("npu_quant_matmul",
                     {"x1": x1, "x2": x2, "scale": scale, "offset": offset, "pertoken_scale": pertoken_scale,
                      "bias": bias},
                     {"output_dtype": output_dtype, **{k: v for k, v in mx.items() if v is not None}})
        if x1_dtype is not None:  # the MXFP4 path
            assert x1_dtype == x2_dtype == self.float4_e2m1fn_x2, "MXFP4: both operands torch_npu.float4_e2m1fn_x2"
            assert scale_dtype == pertoken_scale_dtype == self.float8_e8m0fnu, "MXFP4: E8M0 scales on both sides"
            assert list(group_sizes) == [1, 1, 32], "MXFP4: group_sizes [1, 1, 32]"
            assert x1.dtype == x2.dtype == scale.dtype == pertoken_scale.dtype == torch.uint8, "bytes (modelled)"
            assert x2.t().is_contiguous(), "x2: expected the transposed view of a contiguous [n, k/2]"
            return reference.quant_matmul(x1, x2, scale, pertoken_scale=pertoken_scale, bias=bias,
                                          output_dtype=output_dtype, x1_dtype=FLOAT4_E2M1_X2, x2_dtype=FLOAT4_E2M1_X2,
                                          pertoken_scale_dtype=FLOAT8_E8M0, scale_dtype=FLOAT8_E8M0,
                                          group_sizes=group_sizes)
        if x1.dtype == torch.int8:  # the int8 path (W8A8_DYNAMIC, docs/ascend-ops.md)
            assert x2.dtype == torch.int8, "int8 path: both operands int8"
            # vllm-ascend stores the weight transposed to [k, n], contiguous (then NZ: layout only)
            assert x2.is_contiguous() and x2.shape[0] == x1.shape[1], "x2: expected a contiguous int8 [k, n]"
            assert scale.dtype in (torch.float32, torch.bfloat16), "int8 path: float32 or bfloat16 scale"
        else:
            assert x1.dtype == x2.dtype == torch.int32, "int4 path: int32-packed operands"
            # x2 must be the transpose of a contiguous [n, k/8] (docs/ascend-ops.md, 'npu_quant_matmul')
            assert x2.t().is_contiguous(), "x2: expected the transposed view of a contiguous [n, k/8]"
        return reference.quant_matmul(x1, x2, scale, offset=offset, pertoken_scale=pertoken_scale, bias=bias,
                                      output_dtype=output_dtype)

    def npu_convert_weight_to_int4pack(self, weight, inner_k_tiles=0):
        self._record("npu_convert_weight_to_int4pack", {"weight": weight}, {"inner_k_tiles": inner_k_tiles})
        return reference.convert_weight_to_int4pack(weight, inner_k_tiles=inner_k_tiles)

    def npu_dynamic_quant(self, x, smooth_scales=None, dst_type=torch.int8):
        self._record("npu_dynamic_quant", {"x": x, "smooth_scales": smooth_scales}, {"dst_type": dst_type})
        assert x.dtype in (torch.float16, torch.bfloat16), "x: fp16/bf16 (the op takes half inputs)"
        return reference.dynamic_quant(x, smooth_scales=smooth_scales, dst_type=dst_type)


def make_fake_torch_npu() -> FakeTorchNpu:
    return FakeTorchNpu()
