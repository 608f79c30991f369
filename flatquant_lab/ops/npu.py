"""The Ascend backend: thin calls into ``torch_npu``, imported lazily.

This is the only module in the package that touches ``torch_npu``. Importing it without the CANN
toolkit raises ``ImportError`` (docs/ascend-ops.md, 'torch_npu off an Ascend host'); we turn that into an error
that says so.
"""
from __future__ import annotations

import importlib
import sys

import torch

from ..mxfp4 import FLOAT4_E2M1_X2, FLOAT8_E8M0

_CANN_HINT = (
    "torch_npu could not be imported: it needs the Ascend CANN toolkit (source "
    "/usr/local/Ascend/ascend-toolkit/set_env.sh) and a torch_npu wheel built for this torch "
    f"release ({torch.__version__.split('+')[0]}). Without an Ascend host use backend='reference'."
)


class NPUUnavailableError(RuntimeError):
    """torch_npu or the CANN toolkit is not usable on this host."""


def torch_npu():
    """Return the ``torch_npu`` module, importing it on first use."""
    mod = sys.modules.get("torch_npu")
    if mod is not None:
        return mod
    try:
        return importlib.import_module("torch_npu")
    except ImportError as exc:  # missing wheel, or missing libhccl.so etc. from CANN
        raise NPUUnavailableError(f"{_CANN_HINT} (cause: {exc})") from exc


def is_available() -> bool:
    """True when torch_npu imports and reports at least one NPU device."""
    try:
        mod = torch_npu()
    except NPUUnavailableError:
        return False
    npu = getattr(torch, "npu", None) or getattr(mod, "npu", None)
    try:
        return bool(npu is not None and npu.is_available())
    except Exception:  # a half-installed CANN can fail here too
        return False


def _npu_dtype(mod, dtype):
    """torch_npu's own object for an FP4 / E8M0 dtype of ours (``torch_npu.float4_e2m1fn_x2`` ...), else ``dtype``."""
    if dtype in (FLOAT4_E2M1_X2, FLOAT8_E8M0):
        name = dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")
        return getattr(mod, name, dtype)
    return dtype


def _as_bytes(t):
    """An FP4 or E8M0 result as the uint8 bytes the rest of the package handles (assumed: a byte view)."""
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def kronecker_quant(x, p1, p2, clip_ratio=1.0, dst_dtype=torch.int32):
    mod = torch_npu()
    out = mod.npu_kronecker_quant(x, p1, p2, clip_ratio=clip_ratio, dst_dtype=_npu_dtype(mod, dst_dtype))
    if dst_dtype == FLOAT4_E2M1_X2:
        return _as_bytes(out[0]), _as_bytes(out[1])
    return out


def quant_matmul(x1, x2, scale, offset=None, pertoken_scale=None, bias=None, output_dtype=torch.float16,
                 x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None):
    mod = torch_npu()
    if x1_dtype is None:
        return mod.npu_quant_matmul(
            x1, x2, scale, offset=offset, pertoken_scale=pertoken_scale, bias=bias, output_dtype=output_dtype
        )
    # MXFP4 (docs/mxfp4.md): byte tensors with their FP4 / E8M0 dtypes named, groups of 32 along k
    return mod.npu_quant_matmul(
        x1, x2, scale, offset=offset, pertoken_scale=pertoken_scale, bias=bias, output_dtype=output_dtype,
        x1_dtype=_npu_dtype(mod, x1_dtype), x2_dtype=_npu_dtype(mod, x2_dtype),
        pertoken_scale_dtype=_npu_dtype(mod, pertoken_scale_dtype), scale_dtype=_npu_dtype(mod, scale_dtype),
        group_sizes=group_sizes,
    )


def convert_weight_to_int4pack(weight, inner_k_tiles=1):
    return torch_npu().npu_convert_weight_to_int4pack(weight, inner_k_tiles=inner_k_tiles)


def dynamic_quant(x, smooth_scales=None, dst_type=torch.int8):
    return torch_npu().npu_dynamic_quant(x, smooth_scales=smooth_scales, dst_type=dst_type)
