"""Kronecker-factored transforms: sizes, application, and the weight fold (docs/checkpoint-format.md, 'Factor sizes';
docs/ascend-ops.md, 'The W4A4 FlatQuant linear').

``T(x) = x @ kron(L, R) = vec(L^T X R)`` with ``X = x.view(n1, n2)`` row-major.
The weight side holds ``W' = W @ kron(L, R)^{-T}`` so that ``T(x) @ W'^T == x @ W^T``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .checks import positive_int
from .devices import exact_dtype

# Largest factor size npu_kronecker_quant accepts, by CANN release (docs/ascend-ops.md, 'npu_kronecker_quant').
NPU_MAX_FACTOR = {"8.1": 128, "8.2": 128, "8.3": 128, "8.5": 256}
DEFAULT_CANN = "8.3"


def decompose_dim(k: int) -> tuple[int, int]:
    """Factor pair ``(n1, n2)`` of ``k``, ``n1 <= n2``, ``n1 * n2 == k``, as vllm-ascend picks it.

    vllm-ascend's ``get_decompose_dim`` (which fixes the checkpoint's ``left_trans``/``right_trans``
    shapes) solves ``a^2 - b^2 = k`` for the smallest ``a >= ceil(sqrt(k))`` and returns
    ``(a - b, a + b)``: the pair closest to a square among pairs of the same parity (both odd for
    odd ``k``, both even for ``k % 4 == 0``). E.g. 40 -> (4, 10), not (5, 8). It never ends when
    ``k % 4 == 2`` (no same-parity pair exists). A divisor search from ``isqrt(k)`` downwards with the
    same parity rule gives the same pair wherever that loop ends, and always ends; for
    ``k % 4 == 2`` it returns the pair closest to a square (primes give ``(1, k)``).
    """
    positive_int(k, "k")
    same_parity = k % 4 != 2  # odd k: every pair is odd-odd; k % 4 == 0: need both even
    for n1 in range(math.isqrt(k), 0, -1):
        if k % n1 == 0 and (not same_parity or (n1 - k // n1) % 2 == 0):
            return n1, k // n1
    raise AssertionError("unreachable: (1, k) or, for k % 4 == 0, (2, k / 2) always qualifies")


@dataclass(frozen=True)
class Support:
    """Whether npu_kronecker_quant can run a factor pair, and why not."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def npu_supported(n1: int, n2: int, cann: str = DEFAULT_CANN) -> Support:
    """Check the op limits (docs/ascend-ops.md, 'npu_kronecker_quant'): ``n2 % 8 == 0`` and
    ``n1, n2 <= 128`` (256 on CANN 8.5)."""
    if cann not in NPU_MAX_FACTOR:
        raise ValueError(f"cann: expected one of {sorted(NPU_MAX_FACTOR)}, got {cann!r}")
    limit = NPU_MAX_FACTOR[cann]
    problems = []
    if n2 % 8:
        problems.append(f"n2={n2} is not divisible by 8 (the int32 output packs 8 values along n2)")
    if n1 > limit or n2 > limit:
        problems.append(f"factor sizes ({n1}, {n2}) exceed {limit} (CANN {cann} limit)")
    return Support(not problems, "; ".join(problems))


def _check_factors(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> tuple[int, int]:
    for name, f in (("left", left), ("right", right)):
        if f.dim() != 2 or f.shape[0] != f.shape[1]:
            raise ValueError(f"{name}: expected a square matrix, got shape {tuple(f.shape)}")
    n1, n2 = left.shape[0], right.shape[0]
    if x.shape[-1] != n1 * n2:
        raise ValueError(
            f"x: last dim {x.shape[-1]} must equal n1 * n2 = {n1} * {n2} = {n1 * n2} "
            "(the sizes of left and right)"
        )
    return n1, n2


def _blocks(t: torch.Tensor, blocks: int, name: str) -> torch.Tensor:
    """``t[..., blocks * k]`` viewed as ``[..., blocks, k]``."""
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1 or t.shape[-1] % blocks:
        raise ValueError(f"blocks: expected a positive int dividing {name}'s last dim {t.shape[-1]}, got {blocks!r}")
    return t.unflatten(-1, (blocks, t.shape[-1] // blocks))


def kron_apply(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """``x @ kron(I_blocks, left, right)`` for ``x[..., blocks*n1*n2]`` without forming the Kronecker product.

    Costs ``2 * K * (n1 + n2)`` multiply-adds per token instead of ``2 * K^2``. ``blocks > 1`` is the
    tensor-parallel form: each of the ``blocks`` slices of ``x`` is transformed on its own.
    """
    if blocks != 1:
        return kron_apply(_blocks(x, blocks, "x"), left, right).reshape(x.shape)
    n1, n2 = _check_factors(x, left, right)
    xm = x.reshape(-1, n1, n2)  # row-major X per token
    # X R as one small GEMM per token: on CPU a batched GEMM beats the equivalent tall-skinny
    # [T * n1, n2] @ [n2, n2] GEMM (about 2x at 64 x 64 factors).
    y = torch.bmm(xm, right.expand(xm.shape[0], n2, n2))
    y = torch.matmul(left.transpose(0, 1), y)  # L^T (X R), broadcast over tokens
    return y.reshape(x.shape)


def kron_inverse_t(left: torch.Tensor, right: torch.Tensor,
                   dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of ``kron(L, R)^{-T} = kron(L^{-T}, R^{-T})``, inverted in ``dtype`` where the factors are
    (differentiable). Never ask for float64 on an accelerator: :func:`fold_weight` inverts on the CPU."""
    li = torch.linalg.inv(left.to(dtype)).transpose(0, 1)
    ri = torch.linalg.inv(right.to(dtype)).transpose(0, 1)
    return li, ri


# Measured bound of the float32 fold against float64 (tests/test_devices.py): per output row,
# max |W'_fp32 - W'_fp64| <= FOLD_FP32_RTOL * max |W'_fp64|, 4 orders below half an int4 step (1 / 14).
FOLD_FP32_RTOL = 2.0**-18


def fold_weight(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                inverse_t: tuple[torch.Tensor, torch.Tensor] | None = None, blocks: int = 1,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W' = W @ kron(I_blocks, L, R)^{-T}``, so that ``kron_apply(x, L, R, blocks) @ W'^T == x @ W^T``.

    Per output row and block that is ``L^{-1} W_o R^{-T}``.

    The inverse in float64 on the CPU (the factors are small), the product on the weight's device in
    ``dtype``: by default float64 on the CPU and float32 on an accelerator (error bound FOLD_FP32_RTOL).
    ``inverse_t`` (the factors of :func:`kron_inverse_t`, e.g. float32 ones kept across training
    steps) replaces the inverse and sets the dtype; differentiable either way.
    """
    if blocks != 1:
        return fold_weight(_blocks(weight, blocks, "weight"), left, right, inverse_t, dtype=dtype).reshape(weight.shape)
    n1, n2 = _check_factors(weight, left, right)
    if inverse_t is not None:
        li, ri = inverse_t
    else:
        dtype = dtype if dtype is not None else exact_dtype(weight.device)
        li, ri = kron_inverse_t(left.to("cpu"), right.to("cpu"))
        li, ri = li.to(weight.device, dtype), ri.to(weight.device, dtype)
    wm = weight.to(li.dtype).reshape(*weight.shape[:-1], n1, n2)
    return (li.transpose(0, 1) @ wm @ ri).reshape(weight.shape)
