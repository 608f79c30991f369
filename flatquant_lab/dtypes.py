"""The one definition of which dtypes go where, and of "this cast changes a value".

Half types carry activations and transforms (the NPU kernels run in them); float32 is also allowed
for whole models and checkpoints. Names are accepted as ``torch.bfloat16``, ``"bfloat16"`` or
``"torch.bfloat16"``.
"""
from __future__ import annotations

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


def _names(allowed) -> str:
    names = [str(d) for d in allowed]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def as_dtype(dtype, name: str = "dtype", allowed: tuple = FLOAT_DTYPES, optional: bool = False) -> torch.dtype | None:
    """``dtype`` (a torch.dtype or its name) as one of ``allowed``, else a ValueError naming ``name``.

    With ``optional``, ``None`` is accepted and returned.
    """
    if optional and dtype is None:
        return None
    resolved = dtype
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.strip().removeprefix("torch."), None)
    if isinstance(resolved, torch.dtype) and resolved in allowed:
        return resolved
    raise ValueError(f"{name}: expected {_names(allowed)} (or its name, e.g. "
                     f"{dtype_name(allowed[-1])!r}){' or None' if optional else ''}, got {dtype!r}")


def check_half(dtype, name: str = "act_dtype") -> torch.dtype:
    """``dtype`` if it is float16 or bfloat16 (the activation dtypes of the NPU kernels), else a ValueError."""
    if dtype not in HALF_DTYPES:
        raise ValueError(f"{name}: expected torch.float16 or torch.bfloat16, got {dtype}")
    return dtype


def cast_rounds(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether casting ``t`` to ``dtype`` changes a value (e.g. float16 transforms to bfloat16)."""
    return not torch.equal(t.to(dtype).to(t.dtype), t)
