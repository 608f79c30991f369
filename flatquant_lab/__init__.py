"""flatquant_lab: W4A4 FlatQuant quantization for Ascend NPUs, with faithful CPU emulation.

    import flatquant_lab as fq
    model = fq.quantize(model, fq.QuantConfig(method="flatquant"), calib_ids)
    fq.save_quantized(model, "out/", tokenizer=tok)      # what vllm-ascend loads
    model2 = fq.load_quantized("out/")

Data flows one way: ops -> layers -> schemes -> models -> calibrate -> io -> eval -> cli (README, Layout).
"""
from __future__ import annotations

import importlib

from . import ops
from .kronecker import decompose_dim, kron_apply, npu_supported
from .layers import KV4Cache, QuantizedKVCache, W4A4FlatQuantLinear, W8A8DynamicLinear
from .packing import offset8_to_npu, pack_int4, unpack_int4

__version__ = "0.1.0"

# Heavier parts (transformers, lm-eval) load on first use, so `import flatquant_lab` stays light.
_LAZY = {
    "QuantConfig": "flatquant_lab.recipe",
    "PROFILES": "flatquant_lab.recipe",
    "CalibrationSet": "flatquant_lab.recipe",
    "SchemeRecipe": "flatquant_lab.recipe",
    "LayerwiseTraining": "flatquant_lab.recipe",
    "GPTQConfig": "flatquant_lab.recipe",
    "EndToEndConfig": "flatquant_lab.recipe",
    "Placement": "flatquant_lab.recipe",
    "quantize": "flatquant_lab.api",
    "quantize_weights_only": "flatquant_lab.api",
    "save_quantized": "flatquant_lab.io",
    "load_quantized": "flatquant_lab.io",
    "CheckpointError": "flatquant_lab.io",
    "serve_check": "flatquant_lab.io",
    "RECIPES": "flatquant_lab.recipe",
    "check_linear": "flatquant_lab.numerics",
    "check_linear_w8a8": "flatquant_lab.numerics",
    "sweep_clip_ratio": "flatquant_lab.numerics",
    "sweep_layer_clip_ratio": "flatquant_lab.numerics",
    "load_model": "flatquant_lab.hub",
    "evaluate": "flatquant_lab.eval",
    "token_perplexity": "flatquant_lab.eval",
    "quantized_linear_names": "flatquant_lab.models",
    "clip_groups": "flatquant_lab.models",
    "set_group_clip_ratio": "flatquant_lab.models",
    "linear_weight_bytes": "flatquant_lab.models",
    "adapter_for": "flatquant_lab.models",
    "attach_kv_cache": "flatquant_lab.models",
    "kv_caches": "flatquant_lab.models",
    "save_figure": "flatquant_lab.files",
}

__all__ = [
    "KV4Cache", "QuantizedKVCache", "W4A4FlatQuantLinear", "W8A8DynamicLinear", "decompose_dim", "kron_apply",
    "npu_supported", "ops", "offset8_to_npu", "pack_int4", "unpack_int4", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flatquant_lab' has no attribute {name!r}")
