"""Numerical checks of one quantized layer: does a backend compute what vllm-ascend expects?

:func:`check_linear` runs the layer's backend (``npu``, ``reference``, or one plugged in with
:func:`flatquant_lab.ops.register_backend`) op by op against the reference arithmetic of
docs/ascend-ops.md. Each op gets the reference's own inputs, so a fault is pinned on the op that made it:
  ``scale``    per-token scales of ``npu_kronecker_quant``
  ``codes``    its int4 codes
  ``pack``     the words of ``npu_convert_weight_to_int4pack``
  ``product``  the integer product inside ``npu_quant_matmul``
  ``output``   ``npu_quant_matmul``'s fp32 epilogue and rounding, and the layer's forward
The report has one verdict, ``passed``, and names the first failing part, the token and both values.
For information only (outside the verdict) it also compares with the float layer (SQNR, cosine,
worst token) and checks the transform alone at full precision.
:func:`check_linear_w8a8` does the same for a W8A8_DYNAMIC layer (docs/ascend-ops.md, 'W8A8_DYNAMIC layers'),
parts ``scale`` and ``codes`` (``npu_dynamic_quant``), ``product`` and ``output`` (int8 ``npu_quant_matmul``,
the forward); both return a :class:`CheckReport` (:class:`LinearReport`, :class:`W8A8Report`).
:func:`check_linear_mxfp4` checks a W4A4_MXFP4_FLATQUANT layer (docs/mxfp4.md): parts ``scale``, ``codes``,
``product``, ``output`` and, for a layer computed by several ranks, ``ranks`` (:class:`MxReport`).
:func:`check_layer` runs the one that fits a layer's checkpoint scheme (:data:`LAYER_CHECKS`).
:func:`check_kv_cache` checks an implementation of the C8 KV cache (write, read, TP split; ``kv_cache``), and
:func:`check_kv_cache_module` picks it by a cache module's type (:data:`KV_CACHE_CHECKS`). ``kv4`` looks inside a
KV4 cache: :func:`capture_kv`, :func:`transform_views`, :func:`head_table`, :func:`kv_clip_sweep`.
:func:`sweep_clip_ratio` tabulates SQNR against the float layer over activation clip ratios;
:func:`sweep_layer_clip_ratio` does the same for an existing layer (a loaded checkpoint), by default
against that layer with unquantized activations.

Modules: ``report`` (the reports and constants), ``int4`` (``check_linear`` and the comparisons both
checks use), ``int8`` (``check_linear_w8a8``), ``dispatch`` (``check_layer``), ``sweep`` (clip-ratio sweeps),
``problems`` (random layers), ``layer_inputs`` (a saved checkpoint's layer: :func:`capture_inputs`,
:func:`dequantized_reference`).
"""
from __future__ import annotations

from .dispatch import KV_CACHE_CHECKS, LAYER_CHECKS, check_kv_cache_module, check_layer
from .int4 import check_linear
from .int8 import DEFAULT_TOKEN_TIE_SHARE_INT8, PARTS_W8A8, TIE_PROBE_EXPONENTS, check_linear_w8a8
from .kv4 import DEFAULT_KV_CLIPS, capture_kv, head_table, kv_clip_sweep, transform_views
from .kv_cache import KV_PARTS, KVCacheReport, check_kv_cache
from .layer_inputs import capture_inputs, dequantized_reference
from .mxfp4 import PARTS_MXFP4, MxReport, check_linear_mxfp4
from .problems import random_problem
from .report import (
    DEFAULT_RATIOS, DEFAULT_TIE_SHARE, DEFAULT_TIE_ULPS, FP32_EPILOGUE_REL, PARTS, PROBE_CLIP_RATIO, CheckReport,
    LinearReport, PartCheck, SweepResult, SweepRow, W8A8Report, ulp,
)
from .sweep import sweep_clip_ratio, sweep_layer_clip_ratio

__all__ = [
    "CheckReport", "DEFAULT_RATIOS", "DEFAULT_TIE_SHARE", "DEFAULT_TIE_ULPS", "DEFAULT_TOKEN_TIE_SHARE_INT8",
    "FP32_EPILOGUE_REL", "KVCacheReport", "KV_CACHE_CHECKS", "KV_PARTS", "LAYER_CHECKS", "LinearReport", "MxReport",
    "PARTS", "PARTS_MXFP4", "PARTS_W8A8", "PROBE_CLIP_RATIO", "PartCheck", "check_kv_cache", "check_kv_cache_module",
    "SweepResult", "SweepRow", "TIE_PROBE_EXPONENTS", "W8A8Report", "capture_inputs", "check_layer", "check_linear",
    "check_linear_mxfp4", "check_linear_w8a8", "dequantized_reference", "random_problem", "sweep_clip_ratio", "sweep_layer_clip_ratio", "ulp",
    "DEFAULT_KV_CLIPS", "capture_kv", "head_table", "kv_clip_sweep", "transform_views",
]
