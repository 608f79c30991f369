"""int4 packing in the Ascend NPU layout (docs/ascend-ops.md, 'int4 packing').

Eight int4 values per int32 word; value ``j`` of each group of eight sits in bits ``[4j, 4j+3]``
as a two's-complement nibble ``v & 0xF``. Read as bytes (little-endian) each byte holds two
values, low nibble first. ``npu_convert_weight_to_int4pack`` and ``npu_kronecker_quant`` both
produce this layout.
"""
from __future__ import annotations

import sys

import torch

INT4_MIN = -8
INT4_MAX = 7
VALUES_PER_WORD = 8


def _shifts(device) -> torch.Tensor:
    """``shifts[j] = 4 * j``: where value j of a group of eight lives inside its int32 word."""
    return torch.arange(0, 32, 4, dtype=torch.int64, device=device)


def _check_last_dim(t: torch.Tensor, name: str, multiple: int) -> None:
    if t.dim() == 0:
        raise ValueError(f"{name}: expected a tensor with at least one dim, got a scalar")
    if t.shape[-1] % multiple != 0:
        raise ValueError(
            f"{name}: last dim must be divisible by {multiple}, got shape {tuple(t.shape)}"
        )


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack int4 values ``[..., K]`` along the last dim into int32 words ``[..., K // 8]``.

    ``values`` must be an integer (or integer-valued float) tensor in [-8, 7]; anything else raises
    ``ValueError``: nothing is clamped.
    """
    _check_last_dim(values, "values", VALUES_PER_WORD)
    if values.is_floating_point():
        # inf == round(inf), so check finiteness first (int(inf) below would raise OverflowError)
        if not bool(torch.isfinite(values).all()) or not torch.equal(values, torch.round(values)):
            raise ValueError("values: expected finite integer values, got non-integer or non-finite floats")
    elif values.dtype == torch.bool or values.is_complex():
        raise ValueError(f"values: expected an integer tensor, got {values.dtype}")
    if values.numel():
        lo, hi = (int(v) for v in torch.aminmax(values))
        if lo < INT4_MIN or hi > INT4_MAX:
            bad = int(((values < INT4_MIN) | (values > INT4_MAX)).sum())
            raise ValueError(
                f"values: expected int4 values in [{INT4_MIN}, {INT4_MAX}], "
                f"got {bad} outside (min {lo}, max {hi})"
            )
    if sys.byteorder == "little" and values.shape[-1]:
        return pack_int4_codes(values.to(torch.int8))
    v = values.to(torch.int64)
    nibbles = (v & 0xF).unflatten(-1, (-1, VALUES_PER_WORD))
    words = (nibbles << _shifts(v.device)).sum(dim=-1)  # disjoint bits: sum == bitwise or
    # Words >= 2**31 are negative int32: reinterpret the low 32 bits as two's complement.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def pack_int4_codes(v: torch.Tensor) -> torch.Tensor:
    """Pack int8 values ``[..., K]`` already in [-8, 7] (unchecked), on a little-endian host.

    Byte ``i`` of a row is ``(v[2i] & 0xF) | (v[2i+1] << 4)`` (low nibble first), and the bytes of a
    little-endian int32 word are in memory order, so the int8 row viewed as int32 is the NPU layout.
    Works in int8 throughout: no widening to int64.
    """
    byte = torch.bitwise_or(torch.bitwise_and(v[..., 0::2], 0xF), torch.bitwise_left_shift(v[..., 1::2], 4))
    return byte.contiguous().view(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Unpack int32 words ``[..., K // 8]`` (NPU layout) into int8 values ``[..., K]`` in [-8, 7]."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed: expected an int32 tensor, got {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("packed: expected a tensor with at least one dim, got a scalar")
    w = packed.to(torch.int64).unsqueeze(-1)
    nib = (w >> _shifts(packed.device)) & 0xF
    vals = torch.where(nib >= 8, nib - 16, nib)  # sign-extend the nibble
    return vals.flatten(-2).to(torch.int8)


def offset8_to_npu(packed: torch.Tensor) -> torch.Tensor:
    """Convert words packed by the old offset-8 fallback into the NPU layout.

    The first vllm-ascend fallback packer stored ``v + 8`` in each nibble, i.e. ``(v & 0xF) ^ 0x8``:
    the sign bit of every nibble is flipped. A device reads such a word as two's complement, so
    every value comes out as ``v + 8`` (for v < 0) or ``v - 8`` (for v >= 0): wrong by 8. Flipping
    bit 3 of every nibble again restores the NPU layout. Only call this on tensors known to come
    from that packer: the two layouts are indistinguishable from the bits alone.
    """
    if packed.dtype != torch.int32:
        raise ValueError(f"packed: expected an int32 tensor, got {packed.dtype}")
    mask = torch.tensor(0x88888888 - 2**32, dtype=torch.int32, device=packed.device)
    return packed ^ mask
