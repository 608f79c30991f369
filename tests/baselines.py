"""Slow, obviously-correct implementations that tests and bench/ check the package against (not shipped)."""
from __future__ import annotations

import torch

VALUES_PER_WORD = 8


def i32(word: int) -> int:
    """A 32-bit pattern written as hex, as the signed int32 torch stores."""
    return word - (1 << 32) if word >= 1 << 31 else word


def pack_int4_loop(values: torch.Tensor) -> torch.Tensor:
    """Per-nibble Python loop packer into the NPU layout (docs/ascend-ops.md, 'int4 packing'): value j of 8 in
    bits [4j, 4j+3]."""
    rows = values.reshape(-1, values.shape[-1]).tolist()
    out = []
    for row in rows:
        words = []
        for g in range(0, len(row), VALUES_PER_WORD):
            w = 0
            for j in range(VALUES_PER_WORD):
                w |= (int(row[g + j]) & 0xF) << (4 * j)
            words.append(w - 2**32 if w >= 2**31 else w)
        out.append(words)
    return torch.tensor(out, dtype=torch.int32).reshape(*values.shape[:-1], values.shape[-1] // 8)


def dense_kron(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The dense ``kron(L, R)`` (``K^2`` memory); ``torch.kron`` itself raises on some non-contiguous inputs."""
    return torch.kron(left.contiguous(), right.contiguous())


def mx_dequantize_by_nibbles(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 values by the definition (docs/mxfp4.md): unpack the nibbles (low first), look each E2M1 code up, times
    its group's ``2^(e - 127)`` repeated over the 32 values; float64."""
    from flatquant_lab import mxfp4

    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
    return mxfp4.e2m1_values(codes).double() * mxfp4.e8m0_values(scales).repeat_interleave(mxfp4.GROUP, dim=-1)
