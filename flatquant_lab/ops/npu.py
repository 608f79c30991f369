"""The Ascend backend: thin calls into ``torch_npu``, imported lazily.

This is the only module in the package that touches ``torch_npu``. Importing it without the CANN
toolkit raises ``ImportError`` (docs/ascend-ops.md, 'torch_npu off an Ascend host'); we turn that into an error
that says so.
"""
from __future__ import annotations

import importlib
import sys

import torch

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


def kronecker_quant(x, p1, p2, clip_ratio=1.0, dst_dtype=torch.int32):
    return torch_npu().npu_kronecker_quant(x, p1, p2, clip_ratio=clip_ratio, dst_dtype=dst_dtype)


def quant_matmul(x1, x2, scale, offset=None, pertoken_scale=None, bias=None, output_dtype=torch.float16):
    return torch_npu().npu_quant_matmul(
        x1, x2, scale, offset=offset, pertoken_scale=pertoken_scale, bias=bias, output_dtype=output_dtype
    )


def convert_weight_to_int4pack(weight, inner_k_tiles=1):
    return torch_npu().npu_convert_weight_to_int4pack(weight, inner_k_tiles=inner_k_tiles)


def dynamic_quant(x, smooth_scales=None, dst_type=torch.int8):
    return torch_npu().npu_dynamic_quant(x, smooth_scales=smooth_scales, dst_type=dst_type)
