"""Which op-by-op check a quantized layer gets, looked up by its scheme: ``check_layer(qlinear, x)``; and which check
a quantized KV cache gets, by its ``kv_cache_type``: ``check_kv_cache_module(cache, impl)``."""
from __future__ import annotations

import torch
from torch import nn

from ..schemes import W4A4_FLATQUANT_DYNAMIC, W4A4_MXFP4_FLATQUANT, W8A8_DYNAMIC, kv_cache_scheme_of, scheme_of
from .int4 import check_linear
from .int8 import check_linear_w8a8
from .kv_cache import REFERENCE, KVCacheReport, check_kv_cache
from .mxfp4 import check_linear_mxfp4
from .report import CheckReport

# A scheme without an entry has no op-by-op check (its layer still loads, saves and serves).
LAYER_CHECKS = {W4A4_FLATQUANT_DYNAMIC.quant_type: check_linear, W8A8_DYNAMIC.quant_type: check_linear_w8a8,
                W4A4_MXFP4_FLATQUANT.quant_type: check_linear_mxfp4}
# The same for KV-cache types: an implementation's write, read and TP split against the reference.
KV_CACHE_CHECKS = {"C8": check_kv_cache}


def check_layer(qlinear: nn.Module, x: torch.Tensor, float_linear: nn.Linear | None = None, **options) -> CheckReport:
    """The check of ``qlinear``'s scheme (:data:`LAYER_CHECKS`) on tokens ``x[..., K]``, with its ``options``."""
    scheme = scheme_of(qlinear)
    check = LAYER_CHECKS.get(scheme.quant_type) if scheme is not None else None
    if check is None:
        what = f"{type(qlinear).__name__}" + (f" ({scheme.quant_type})" if scheme is not None else "")
        raise ValueError(f"qlinear: no op-by-op check for a {what}; there are checks for "
                         f"{', '.join(map(repr, LAYER_CHECKS))} layers")
    return check(qlinear, x, float_linear, **options)


def check_kv_cache_module(cache: nn.Module, impl=REFERENCE, **options) -> KVCacheReport:
    """The check of ``cache``'s KV-cache type (:data:`KV_CACHE_CHECKS`) for the implementation ``impl``, on the
    cache's own scales besides synthetic ones (``cache``: a layer's ``kv_cache_quant`` module)."""
    scheme = kv_cache_scheme_of(cache)
    check = KV_CACHE_CHECKS.get(scheme.cache_type) if scheme is not None else None
    if check is None:
        raise ValueError(f"cache: no check for a {type(cache).__name__}; there are checks for the KV-cache types "
                         f"{', '.join(map(repr, KV_CACHE_CHECKS))}")
    return check(impl, cache, **options)
