"""What every checkpoint-scheme layer shares: its contract's float32 buffers survive ``Module.to(dtype)``; a
row-parallel layer's ranks sum as vLLM's all-reduce does (``sum_over_ranks``)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def check_transforms(left_trans, right_trans) -> tuple[int, int]:
    """``(n1, n2)`` of a checkpoint's Kronecker factors, after checking each is a square float matrix and the two
    share a dtype; ``ValueError`` naming the tensor otherwise."""
    for name, t in (("left_trans", left_trans), ("right_trans", right_trans)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != t.shape[1]:
            raise ValueError(f"{name}: expected a square matrix, got shape {list(getattr(t, 'shape', []))}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a float dtype, got {t.dtype}")
    if left_trans.dtype != right_trans.dtype:
        raise ValueError(f"right_trans: expected dtype {left_trans.dtype} (that of left_trans), got {right_trans.dtype}")
    return left_trans.shape[0], right_trans.shape[0]


def check_bias(bias, out_features: int) -> None:
    """``bias`` is ``None`` or a float tensor ``[out_features]``."""
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_features,)
                             or not bias.is_floating_point()):
        raise ValueError(f"bias: expected a float tensor [{out_features}], got {getattr(bias, 'shape', bias)}")


class QuantizedLayer(nn.Module):
    """Base of the layers in this package. ``FP32_BUFFERS`` name the buffers the checkpoint contract keeps
    in float32 (scales, offsets, clip ratios): a dtype cast moves them by device only."""

    FP32_BUFFERS: tuple[str, ...] = ()

    def activation_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x[..., in_features]`` in the layer's ``act_dtype``: float32 is rounded to it, any other dtype refused."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dim {self.in_features} (in_features), got shape {tuple(x.shape)}")
        if x.dtype == torch.float32:
            return x.to(self.act_dtype)
        if x.dtype != self.act_dtype:
            raise ValueError(f"x: expected {self.act_dtype} (the layer's activation dtype) or float32, got {x.dtype}")
        return x

    def _apply_keeping_fp32(self, fn, recurse: bool = True) -> None:
        """``nn.Module._apply`` with the ``FP32_BUFFERS`` moved by device only (fn would round them)."""
        kept = {name: getattr(self, name) for name in self.FP32_BUFFERS}
        nn.Module._apply(self, fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if new.dtype != torch.float32:
                setattr(self, name, old.to(new.device))


def sum_over_ranks(rank_output: Callable[[int], torch.Tensor], tp_size: int, bias: torch.Tensor | None,
                   round_out: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The per-rank forward of a row-parallel layer and its all-reduce: ``y = round_out(sum_r fp32(y_r))``.

    ``y_r = rank_output(r)``: rank ``r``'s partial product, already in the output dtype; the bias is added on
    rank 0 only, in the output dtype (``y_0 <- round_out(y_0 + bias)``), as vLLM does. One rank has nothing to
    reduce: ``y = fp32(y_0)``, not rounded again. ``round_out`` rounds to the output dtype: a cast for the layer, a straight-through
    rounding for the differentiable twins (calibrate), which thereby compute what the layer computes.
    Assumed: HCCL's order and precision are not known, so the sum is emulated in fp32 and rounded once.
    """
    total = None
    for r in range(tp_size):
        y = rank_output(r)
        if r == 0 and bias is not None:
            y = round_out(y + bias)  # vLLM adds a row-parallel bias on rank 0 only
        total = y.float() if total is None else total + y.float()
    return total if tp_size == 1 else round_out(total)
