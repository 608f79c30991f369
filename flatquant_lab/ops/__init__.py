"""Backend-neutral entry points for the Ascend W4A4 ops (the only place that knows about backends).

Each function has the signature and results of its ``torch_npu.npu_*`` namesake. ``backend`` names
the implementation, looked up in a registry: ``"reference"`` (pure PyTorch, any device,
docs/ascend-ops.md step by step) and ``"npu"`` (``torch_npu``) are registered here; anything else is
plugged in the same way with :func:`register_backend`, or named ``"package.module:ATTR"`` and
imported on first use. Left as ``None`` the name comes from ``FLATQUANT_BACKEND`` (default
``auto``); ``auto`` picks npu for tensors on an NPU device. Inputs are validated here, once, for
every backend.

The registry is this package's one piece of module-level mutable state, on purpose: it is the
table through which every caller (layers, numerics, the CLI) reaches a backend, as ``codecs``
reaches codecs.
"""
from __future__ import annotations

import importlib
import math
import os
import re

import torch

from ..dtypes import HALF_DTYPES
from ..mxfp4 import FLOAT4_E2M1_X2, FLOAT8_E8M0, GROUP as MX_GROUP
from . import npu as _npu
from . import reference as _ref
from .kv_cache import (KV4_LEVELS, kv4_dequantize, kv4_quantize, kv4_roundtrip, kv_cache_dequantize, kv_cache_inverse,
                       kv_cache_quantize)
from .npu import NPUUnavailableError
from .reference import (
    DynamicTrace, Fp16OverflowError, KroneckerTrace, MxKroneckerTrace, dynamic_quant_trace, kronecker_quant_mx_trace,
    kronecker_quant_trace, mx_backend,
)

BACKENDS = ("reference", "npu")  # the built-in backends, always registered
ENV_VAR = "FLATQUANT_BACKEND"
# What a backend provides: one callable per op, with the signature of the torch_npu op.
OPS = ("kronecker_quant", "quant_matmul", "convert_weight_to_int4pack", "dynamic_quant")
KRONECKER_MAX_FACTOR = 256  # CANN 8.5; 8.1-8.3 allow 128 (see kronecker.npu_supported)
MAX_PACKED_DIM = 65535
_NAME = re.compile(r"[a-z][a-z0-9_\-]*\Z")
_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*\Z")
_REGISTRY: dict[str, object] = {}
# int8 path: the scale dtypes aclnnQuantMatmul takes with a per-token scale (assumed from the
# torch_npu docs: float32 or bfloat16; vllm-ascend passes bf16 scales for bf16 models)
INT8_SCALE_DTYPES = (torch.float32, torch.bfloat16)
# MXFP4 path (docs/mxfp4.md): FP4 codes and E8M0 scales travel as bytes; torch's own 1-byte dtypes of the same
# names are accepted too. Group sizes as npu_quant_matmul takes them: [m, n, k] = [1, 1, 32].
MX_GROUP_SIZES = (1, 1, MX_GROUP)
_FP4_TENSOR_DTYPES = tuple({torch.uint8, *(d for d in (FLOAT4_E2M1_X2, FLOAT8_E8M0) if isinstance(d, torch.dtype))})

__all__ = [
    "BACKENDS", "FLOAT4_E2M1_X2", "FLOAT8_E8M0", "MX_GROUP_SIZES", "OPS", "DynamicTrace", "Fp16OverflowError",
    "KroneckerTrace", "MxKroneckerTrace", "NPUUnavailableError", "backends",
    "convert_weight_to_int4pack", "dynamic_quant", "dynamic_quant_trace", "get_backend", "kronecker_quant", "kronecker_quant_trace",
    "kronecker_quant_mx_trace", "kv_cache_dequantize", "kv_cache_inverse", "kv_cache_quantize",
    "KV4_LEVELS", "kv4_dequantize", "kv4_quantize", "kv4_roundtrip", "mx_backend",
    "quant_matmul", "register_backend", "resolve_backend", "unregister_backend",
]


def _check_ops(name: str, backend) -> None:
    missing = [op for op in OPS if not callable(getattr(backend, op, None))]
    if missing:
        raise ValueError(f"backend {name!r}: expected a module or namespace with callables {', '.join(OPS)}; "
                         f"{type(backend).__name__} {backend!r} lacks {', '.join(missing)}")


def register_backend(name: str, backend, replace: bool = False) -> None:
    """Make ``backend`` (a module or namespace with the four ``OPS``) selectable as ``backend=name``.

    ``name``: lowercase letters, digits, ``_`` and ``-``, starting with a letter; ``auto`` and the
    built-in names are refused, and so is a name already taken unless ``replace=True``.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"name: expected lowercase letters, digits, '_' or '-', starting with a letter, got {name!r}")
    if name == "auto" or (name in BACKENDS and backend is not _builtin(name)):
        raise ValueError(f"name: {name!r} is reserved (auto and the built-in backends {', '.join(BACKENDS)})")
    if name in _REGISTRY and not replace and _REGISTRY[name] is not backend:
        raise ValueError(f"name: a backend {name!r} is already registered; pass replace=True to replace it")
    _check_ops(name, backend)
    _REGISTRY[name] = backend


def unregister_backend(name: str) -> None:
    """Remove a backend registered with :func:`register_backend` (the built-in ones stay)."""
    if name in BACKENDS:
        raise ValueError(f"name: the built-in backend {name!r} cannot be removed")
    if name not in _REGISTRY:
        raise ValueError(f"name: no backend {name!r} is registered (registered: {', '.join(backends())})")
    del _REGISTRY[name]


def backends() -> tuple[str, ...]:
    """The names a ``backend`` argument takes now (besides ``auto`` and ``module:attr`` specs), sorted."""
    return tuple(sorted(_REGISTRY))


def _builtin(name: str):
    return {"reference": _ref, "npu": _npu}[name]


def _load_spec(spec: str, src: str) -> str:
    """Import ``package.module:ATTR`` and register that object under the spec itself."""
    if spec in _REGISTRY:
        return spec
    mod_name, attr = spec.split(":", 1)
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"{src}: cannot import module {mod_name!r} of backend spec {spec!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{src}: module {mod_name!r} has no attribute {attr!r} (backend spec {spec!r})")
        obj = getattr(obj, part)
    _check_ops(spec, obj)
    _REGISTRY[spec] = obj
    return spec


def resolve_backend(backend: str | None = None, *tensors: torch.Tensor) -> str:
    """The backend to run: the argument, else ``$FLATQUANT_BACKEND``, where ``auto`` looks at devices.

    A ``package.module:ATTR`` spec is imported and registered under that spec on first use.
    """
    src = "backend" if backend is not None else ENV_VAR
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if not isinstance(choice, str):
        raise ValueError(f"{src}: expected a backend name (str), got {type(choice).__name__}")
    choice = choice.strip()
    if _SPEC.match(choice):
        return _load_spec(choice, src)
    choice = choice.lower()
    if choice == "auto":
        return "npu" if any(t.device.type == "npu" for t in tensors) else "reference"
    if choice not in _REGISTRY:
        raise ValueError(f"{src}: expected one of {', '.join(['auto', *backends()])}, got {choice!r} "
                         "(an out-of-tree backend: register_backend(name, module), or 'package.module:ATTR')")
    return choice


def get_backend(backend: str | None = None, *tensors: torch.Tensor):
    """The module or namespace that implements the ops for ``backend`` (resolved as :func:`resolve_backend`)."""
    return _REGISTRY[resolve_backend(backend, *tensors)]


register_backend("reference", _ref)
register_backend("npu", _npu)


def check_clip_ratio(clip_ratio) -> float:
    """``clip_ratio`` as a float in (0, 1], or a ValueError that says what was expected."""
    if isinstance(clip_ratio, torch.Tensor):
        if clip_ratio.numel() != 1:
            raise ValueError(f"clip_ratio: expected one value, got shape {tuple(clip_ratio.shape)}")
        clip_ratio = clip_ratio.item()
    if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, (int, float)):
        raise ValueError(f"clip_ratio: expected a float in (0, 1], got {clip_ratio!r}")
    c = float(clip_ratio)
    if not math.isfinite(c) or not 0.0 < c <= 1.0:
        raise ValueError(f"clip_ratio: expected a finite float in (0, 1], got {c}")
    return c


def kronecker_quant(x, p1, p2, clip_ratio=1.0, dst_dtype=torch.int32, backend=None):
    """``npu_kronecker_quant(x[T, n1, n2], p1[n1, n1], p2[n2, n2])`` -> (int32 [T, n1, n2/8], fp32 [T]).

    ``dst_dtype=FLOAT4_E2M1_X2`` (the MXFP4 path, docs/mxfp4.md) -> (FP4 codes as uint8 [T, n1, n2/2], E8M0
    scales as uint8 [T, n1 * n2 / 32]).
    """
    if dst_dtype == FLOAT4_E2M1_X2:
        return _kronecker_quant_mx(x, p1, p2, clip_ratio, backend)
    if x.dim() != 3:
        raise ValueError(f"x: expected [tokens, n1, n2], got shape {tuple(x.shape)}")
    _, n1, n2 = x.shape
    if x.dtype not in HALF_DTYPES:
        raise ValueError(f"x: expected float16 or bfloat16, got {x.dtype}")
    for name, p, n in (("p1", p1, n1), ("p2", p2, n2)):
        if tuple(p.shape) != (n, n):
            raise ValueError(f"{name}: expected shape ({n}, {n}) to match x {tuple(x.shape)}, got {tuple(p.shape)}")
        if p.dtype != x.dtype:
            raise ValueError(f"{name}: expected dtype {x.dtype} (that of x), got {p.dtype}")
    if n2 % 8:
        raise ValueError(f"x: n2 = {n2} must be divisible by 8 (8 int4 values per int32 word)")
    if max(n1, n2) > KRONECKER_MAX_FACTOR:
        raise ValueError(f"x: factor sizes ({n1}, {n2}) exceed {KRONECKER_MAX_FACTOR}, the op's limit")
    c = check_clip_ratio(clip_ratio)
    return get_backend(backend, x, p1, p2).kronecker_quant(x, p1, p2, clip_ratio=c, dst_dtype=dst_dtype)


def quant_matmul(x1, x2, scale, offset=None, pertoken_scale=None, bias=None,
                 output_dtype=torch.float16, backend=None, *, x1_dtype=None, x2_dtype=None,
                 pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None):
    """``npu_quant_matmul``: int4 path ``x1`` int32 [m, k/8], ``x2`` int32 [k/8, n] (transposed);
    int8 path (``x1`` int8) ``x1`` int8 [m, k], ``x2`` int8 [k, n] (see :func:`_quant_matmul_int8`);
    MXFP4 path (``x1_dtype=FLOAT4_E2M1_X2``, see :func:`_quant_matmul_mx`)."""
    mx = (x1_dtype, x2_dtype, pertoken_scale_dtype, scale_dtype, group_sizes)
    if any(v is not None for v in mx):
        return _quant_matmul_mx(x1, x2, scale, offset, pertoken_scale, bias, output_dtype, backend, *mx)
    if isinstance(x1, torch.Tensor) and x1.dtype == torch.int8:
        return _quant_matmul_int8(x1, x2, scale, offset, pertoken_scale, bias, output_dtype, backend)
    for name, t in (("x1", x1), ("x2", x2)):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D int32 tensor of packed int4, got {t.dtype} {tuple(t.shape)}")
    m, kp = x1.shape
    if x2.shape[0] != kp:
        raise ValueError(f"x2: packed k dim {x2.shape[0]} disagrees with x1's {kp} (x1 {tuple(x1.shape)}, x2 {tuple(x2.shape)})")
    n = x2.shape[1]
    if max(kp, n) > MAX_PACKED_DIM:
        raise ValueError(f"x2: packed dims ({kp}, {n}) exceed {MAX_PACKED_DIM}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (n,):
        raise ValueError(f"scale: expected float32 [{n}], got {scale.dtype} {tuple(scale.shape)}")
    if pertoken_scale is not None and (pertoken_scale.dtype != torch.float32 or tuple(pertoken_scale.shape) != (m,)):
        raise ValueError(f"pertoken_scale: expected float32 [{m}], got {pertoken_scale.dtype} {tuple(pertoken_scale.shape)}")
    if offset is not None:
        raise ValueError("offset: the int4 path is symmetric; expected None")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias: expected shape [{n}], got {tuple(bias.shape)}")
    if output_dtype not in HALF_DTYPES:
        raise ValueError(f"output_dtype: expected torch.float16 or torch.bfloat16, got {output_dtype}")
    return get_backend(backend, x1, x2).quant_matmul(
        x1, x2, scale, offset=offset, pertoken_scale=pertoken_scale, bias=bias, output_dtype=output_dtype
    )


def _quant_matmul_int8(x1, x2, scale, offset, pertoken_scale, bias, output_dtype, backend):
    """``npu_quant_matmul`` int8 path (W8A8_DYNAMIC, docs/ascend-ops.md): ``x1`` int8 [m, k], ``x2`` int8 [k, n].

    ``x2`` is the weight ``[n, k]`` transposed to ``[k, n]`` (vllm-ascend stores it so, contiguous);
    ``scale`` float32 or bfloat16 ``[n]``; ``pertoken_scale`` float32 ``[m]``; ``bias`` ``[n]`` any float.
    """
    for name, t in (("x1", x1), ("x2", x2)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int8 or t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D int8 tensor (the int8 path, as x1 is int8), got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    m, k = x1.shape
    if x2.shape[0] != k:
        raise ValueError(f"x2: k dim {x2.shape[0]} disagrees with x1's {k} (x1 {tuple(x1.shape)}, "
                         f"x2 {tuple(x2.shape)}; x2 is the weight transposed to [k, n])")
    n = x2.shape[1]
    if max(k, n) > MAX_PACKED_DIM:
        raise ValueError(f"x2: dims ({k}, {n}) exceed {MAX_PACKED_DIM}")
    if (not isinstance(scale, torch.Tensor) or scale.dtype not in INT8_SCALE_DTYPES
            or tuple(scale.shape) != (n,)):
        raise ValueError(f"scale: expected float32 or bfloat16 [{n}], got {getattr(scale, 'dtype', scale)} "
                         f"{tuple(getattr(scale, 'shape', ()))}")
    if pertoken_scale is not None and (pertoken_scale.dtype != torch.float32 or tuple(pertoken_scale.shape) != (m,)):
        raise ValueError(f"pertoken_scale: expected float32 [{m}], got {pertoken_scale.dtype} "
                         f"{tuple(pertoken_scale.shape)}")
    if offset is not None:
        raise ValueError("offset: W8A8_DYNAMIC weights are symmetric; expected None")
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.is_floating_point()):
        raise ValueError(f"bias: expected a float tensor of shape [{n}], got {bias.dtype} {tuple(bias.shape)}")
    if output_dtype not in HALF_DTYPES:
        raise ValueError(f"output_dtype: expected torch.float16 or torch.bfloat16, got {output_dtype}")
    return get_backend(backend, x1, x2).quant_matmul(
        x1, x2, scale, offset=offset, pertoken_scale=pertoken_scale, bias=bias, output_dtype=output_dtype
    )


def _kronecker_quant_mx(x, p1, p2, clip_ratio, backend):
    """The FP4 ``npu_kronecker_quant``'s inputs: ``x[T, L, R]`` fp16/bf16, ``R`` even, ``L * R`` a multiple of 32."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x: expected [tokens, n1, n2], got shape {tuple(getattr(x, 'shape', ()))}")
    _, n1, n2 = x.shape
    if x.dtype not in HALF_DTYPES:
        raise ValueError(f"x: expected float16 or bfloat16, got {x.dtype}")
    for name, p, n in (("p1", p1, n1), ("p2", p2, n2)):
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != (n, n):
            raise ValueError(f"{name}: expected shape ({n}, {n}) to match x {tuple(x.shape)}, "
                             f"got {tuple(getattr(p, 'shape', ()))}")
        if p.dtype != x.dtype:
            raise ValueError(f"{name}: expected dtype {x.dtype} (that of x), got {p.dtype}")
    if n2 % 2:
        raise ValueError(f"x: n2 = {n2} must be even (two FP4 codes per byte)")
    if (n1 * n2) % MX_GROUP:
        raise ValueError(f"x: n1 * n2 = {n1 * n2} must be a multiple of {MX_GROUP} (one E8M0 scale per group)")
    if max(n1, n2) > KRONECKER_MAX_FACTOR:
        raise ValueError(f"x: factor sizes ({n1}, {n2}) exceed {KRONECKER_MAX_FACTOR}, the op's limit")
    c = check_clip_ratio(clip_ratio)
    return get_backend(backend, x, p1, p2).kronecker_quant(x, p1, p2, clip_ratio=c, dst_dtype=FLOAT4_E2M1_X2)


def _bytes(name: str, t, shape: tuple) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in _FP4_TENSOR_DTYPES or tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected a uint8 tensor {list(shape)}, got {getattr(t, 'dtype', type(t).__name__)} "
                         f"{list(getattr(t, 'shape', ()))}")


def _quant_matmul_mx(x1, x2, scale, offset, pertoken_scale, bias, output_dtype, backend,
                     x1_dtype, x2_dtype, pertoken_scale_dtype, scale_dtype, group_sizes):
    """``npu_quant_matmul``'s MXFP4 path (docs/mxfp4.md; the layouts are assumed): ``x1`` FP4 [m, k/2] and
    ``x2`` FP4 [k/2, n] (the transpose of a contiguous weight [n, k/2]) as uint8 bytes, ``scale`` E8M0 [n, k/32],
    ``pertoken_scale`` E8M0 [m, k/32] as uint8, ``group_sizes`` [1, 1, 32]."""
    want = {"x1_dtype": (x1_dtype, FLOAT4_E2M1_X2), "x2_dtype": (x2_dtype, FLOAT4_E2M1_X2),
            "pertoken_scale_dtype": (pertoken_scale_dtype, FLOAT8_E8M0), "scale_dtype": (scale_dtype, FLOAT8_E8M0)}
    for name, (have, need) in want.items():
        if have != need:
            raise ValueError(f"{name}: the MXFP4 path expects {need}, got {have}")
    if group_sizes is None or tuple(group_sizes) != MX_GROUP_SIZES:
        raise ValueError(f"group_sizes: the MXFP4 path expects {list(MX_GROUP_SIZES)}, got {group_sizes}")
    if not isinstance(x1, torch.Tensor) or x1.dim() != 2:
        raise ValueError(f"x1: expected a 2-D tensor of FP4 bytes [m, k/2], got {tuple(getattr(x1, 'shape', ()))}")
    m, kb = x1.shape
    k = 2 * kb
    if k % MX_GROUP:
        raise ValueError(f"x1: k = {k} must be a multiple of {MX_GROUP}")
    if not isinstance(x2, torch.Tensor) or x2.dim() != 2:
        raise ValueError(f"x2: expected a 2-D tensor of FP4 bytes [k/2, n], got {tuple(getattr(x2, 'shape', ()))}")
    n = x2.shape[1]
    _bytes("x1", x1, (m, kb))
    _bytes("x2", x2, (kb, n))
    _bytes("scale", scale, (n, k // MX_GROUP))
    _bytes("pertoken_scale", pertoken_scale, (m, k // MX_GROUP))
    if offset is not None:
        raise ValueError("offset: the MXFP4 path is symmetric; expected None")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias: expected shape [{n}], got {tuple(getattr(bias, 'shape', ()))}")
    if output_dtype not in HALF_DTYPES:
        raise ValueError(f"output_dtype: expected torch.float16 or torch.bfloat16, got {output_dtype}")
    return get_backend(backend, x1, x2).quant_matmul(
        x1, x2, scale, offset=None, pertoken_scale=pertoken_scale, bias=bias, output_dtype=output_dtype,
        x1_dtype=x1_dtype, x2_dtype=x2_dtype, pertoken_scale_dtype=pertoken_scale_dtype, scale_dtype=scale_dtype,
        group_sizes=list(group_sizes))


def convert_weight_to_int4pack(weight, inner_k_tiles=1, backend=None):
    """``npu_convert_weight_to_int4pack``: int32 values [n, k] in [-8, 7] -> int32 [n, k/8]."""
    if weight.dtype != torch.int32 or weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D int32 tensor, got {weight.dtype} {tuple(weight.shape)}")
    return get_backend(backend, weight).convert_weight_to_int4pack(weight, inner_k_tiles=inner_k_tiles)


def dynamic_quant(x, smooth_scales=None, dst_type=torch.int8, backend=None):
    """``npu_dynamic_quant``: per row ``mult = qmax / max|x|``, ``y = rint(x * mult)``, ``scale = 1 / mult`` (float32).

    ``x[..., k]`` float16 / bfloat16; ``dst_type`` int8 (qmax 127) or ``torch.quint4x2`` (qmax 7, packed 8 per int32).
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in HALF_DTYPES:
        raise ValueError(f"x: expected a float16 or bfloat16 tensor (the op's input dtypes), got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if smooth_scales is not None and smooth_scales.shape[-1:] != x.shape[-1:]:
        raise ValueError(f"smooth_scales: expected shape [{x.shape[-1]}], got {tuple(smooth_scales.shape)}")
    return get_backend(backend, x).dynamic_quant(x, smooth_scales=smooth_scales, dst_type=dst_type)
