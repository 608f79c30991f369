"""What every checkpoint-scheme layer shares: its contract's float32 buffers survive ``Module.to(dtype)``."""
from __future__ import annotations

import torch
from torch import nn


class QuantizedLayer(nn.Module):
    """Base of the layers in this package. ``FP32_BUFFERS`` name the buffers the checkpoint contract keeps
    in float32 (scales, offsets, clip ratios): a dtype cast moves them by device only."""

    FP32_BUFFERS: tuple[str, ...] = ()

    def _apply_keeping_fp32(self, fn, recurse: bool = True) -> None:
        """``nn.Module._apply`` with the ``FP32_BUFFERS`` moved by device only (fn would round them)."""
        kept = {name: getattr(self, name) for name in self.FP32_BUFFERS}
        nn.Module._apply(self, fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if new.dtype != torch.float32:
                setattr(self, name, old.to(new.device))
