"""Random layers with planted outlier channels, for the check and the notebooks."""
from __future__ import annotations

import math

import torch
from torch import nn


def random_problem(in_features: int, out_features: int, tokens: int, outlier_channels: int = 8,
                   outlier_scale: float = 20.0, bias: bool = False, seed: int = 0):
    """A float ``nn.Linear`` and tokens ``x[T, K]`` (fp32) with ``outlier_channels`` channels x ``outlier_scale``."""
    if outlier_channels > in_features:
        raise ValueError(f"outlier_channels: expected at most in_features = {in_features}, got {outlier_channels}")
    if not math.isfinite(outlier_scale) or outlier_scale <= 0:
        raise ValueError(f"outlier_scale: expected a finite float > 0, got {outlier_scale}")
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_features, in_features, generator=g) / math.sqrt(in_features))
        if bias:
            lin.bias.copy_(0.1 * torch.randn(out_features, generator=g))
    x = torch.randn(tokens, in_features, generator=g)
    channels = torch.randperm(in_features, generator=g)[:outlier_channels]
    x[:, channels] *= outlier_scale
    return lin, x
