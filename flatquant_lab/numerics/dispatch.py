"""Which op-by-op check a quantized layer gets, looked up by its scheme: ``check_layer(qlinear, x)``."""
from __future__ import annotations

import torch
from torch import nn

from ..schemes import W4A4_FLATQUANT_DYNAMIC, W4A4_MXFP4_FLATQUANT, W8A8_DYNAMIC, scheme_of
from .int4 import check_linear
from .int8 import check_linear_w8a8
from .mxfp4 import check_linear_mxfp4
from .report import CheckReport

# A scheme without an entry has no op-by-op check (its layer still loads, saves and serves).
LAYER_CHECKS = {W4A4_FLATQUANT_DYNAMIC.quant_type: check_linear, W8A8_DYNAMIC.quant_type: check_linear_w8a8,
                W4A4_MXFP4_FLATQUANT.quant_type: check_linear_mxfp4}


def check_layer(qlinear: nn.Module, x: torch.Tensor, float_linear: nn.Linear | None = None, **options) -> CheckReport:
    """The check of ``qlinear``'s scheme (:data:`LAYER_CHECKS`) on tokens ``x[..., K]``, with its ``options``."""
    scheme = scheme_of(qlinear)
    check = LAYER_CHECKS.get(scheme.quant_type) if scheme is not None else None
    if check is None:
        what = f"{type(qlinear).__name__}" + (f" ({scheme.quant_type})" if scheme is not None else "")
        raise ValueError(f"qlinear: no op-by-op check for a {what}; there are checks for "
                         f"{', '.join(map(repr, LAYER_CHECKS))} layers")
    return check(qlinear, x, float_linear, **options)
