"""int4 packing in the NPU layout (docs/ascend-ops.md, 'int4 packing')."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flatquant_lab.ops.reference import unpack_int4_int8
from baselines import pack_int4_loop
from baselines import i32 as _i32
from flatquant_lab.packing import offset8_to_npu, pack_int4, unpack_int4


def old_offset8_pack(values: torch.Tensor) -> torch.Tensor:
    """The first vllm-ascend fallback packer: nibble j holds ``v + 8`` (an unsigned 0..15)."""
    rows = values.reshape(-1, values.shape[-1]).tolist()
    out = []
    for row in rows:
        words = []
        for g in range(0, len(row), 8):
            w = 0
            for j in range(8):
                w |= (int(row[g + j]) + 8) << (4 * j)
            words.append(_i32(w))
        out.append(words)
    return torch.tensor(out, dtype=torch.int32).reshape(*values.shape[:-1], values.shape[-1] // 8)


int4_arrays = hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=4).flatmap(
    lambda lead: st.integers(1, 4).flatmap(
        lambda groups: hnp.arrays(np.int8, (*lead[:-1], 8 * groups), elements=st.integers(-8, 7))
    )
)


# ------------------------------------------------------------------ golden words, worked by hand
def test_golden_one_word():
    # value j sits in bits [4j, 4j+3] as v & 0xF:
    #   j:      0   1   2   3   4   5   6   7
    #   v:      1  -1   2  -2   3  -3   7  -8
    #   nibble: 1   F   2   E   3   D   7   8   -> read from bit 31 down: 0x87D3E2F1
    v = torch.tensor([1, -1, 2, -2, 3, -3, 7, -8], dtype=torch.int8)
    assert pack_int4(v).tolist() == [_i32(0x87D3E2F1)]
    assert pack_int4(v).tolist() == [-2016156943]


def test_golden_two_rows_of_sixteen():
    v = torch.tensor([
        [0, 1, 2, 3, 4, 5, 6, 7, -1, -1, -1, -1, -1, -1, -1, -1],
        [-8, -8, -8, -8, -8, -8, -8, -8, 7, 0, 0, 0, 0, 0, 0, -5],
    ])
    expect = [
        [0x76543210, _i32(0xFFFFFFFF)],  # 0x76543210 = 1985229328; eight -1s = all bits set = -1
        [_i32(0x88888888), _i32(0xB0000007)],  # -5 & 0xF = 0xB in the top nibble
    ]
    assert pack_int4(v).tolist() == expect
    assert expect[0] == [1985229328, -1]
    assert torch.equal(unpack_int4(torch.tensor(expect, dtype=torch.int32)), v.to(torch.int8))


def test_golden_little_endian_bytes():
    # Read as bytes (little-endian) each byte holds two values, low nibble first.
    packed = pack_int4(torch.tensor([1, -1, 2, -2, 3, -3, 7, -8]))
    assert packed.view(torch.uint8).tolist() == [0xF1, 0xE2, 0xD3, 0x87]


# ------------------------------------------------------------------ properties
@settings(max_examples=60, deadline=None)
@given(int4_arrays)
def test_round_trip_any_leading_dims(arr):
    v = torch.from_numpy(arr)
    packed = pack_int4(v)
    assert packed.dtype == torch.int32
    assert packed.shape == (*v.shape[:-1], v.shape[-1] // 8)
    assert torch.equal(unpack_int4(packed), v)
    assert torch.equal(unpack_int4_int8(packed), v)


@settings(max_examples=40, deadline=None)
@given(int4_arrays)
def test_vectorized_equals_loop(arr):
    v = torch.from_numpy(arr)
    assert torch.equal(pack_int4(v), pack_int4_loop(v))


@settings(max_examples=30, deadline=None)
@given(int4_arrays, st.sampled_from([torch.int16, torch.int32, torch.int64, torch.float32, torch.float64]))
def test_any_integer_valued_dtype_packs_the_same(arr, dtype):
    v = torch.from_numpy(arr)
    assert torch.equal(pack_int4(v.to(dtype)), pack_int4(v))


@settings(max_examples=40, deadline=None)
@given(int4_arrays)
def test_offset8_to_npu_restores_the_layout(arr):
    v = torch.from_numpy(arr)
    old = old_offset8_pack(v)
    # Read as NPU words, the old nibbles come out wrong by 8: v + 8 for v < 0, v - 8 otherwise.
    wrong = torch.where(v < 0, v + 8, v - 8)
    assert torch.equal(unpack_int4(old), wrong)
    fixed = offset8_to_npu(old)
    assert torch.equal(fixed, pack_int4(v))
    assert torch.equal(unpack_int4(fixed), v)


def test_offset8_golden():
    v = torch.tensor([1, -1, 2, -2, 3, -3, 7, -8])
    # nibbles v + 8: 9 7 A 6 B 5 F 0 -> 0x0F5B6A79
    assert old_offset8_pack(v).tolist() == [0x0F5B6A79]
    assert offset8_to_npu(torch.tensor([0x0F5B6A79], dtype=torch.int32)).tolist() == [_i32(0x87D3E2F1)]


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("bad", [8, -9, 100, -128])
def test_values_out_of_range(bad):
    v = torch.zeros(2, 8, dtype=torch.int32)
    v[1, 3] = bad
    with pytest.raises(ValueError, match=r"values: expected int4 values in \[-8, 7\], got 1 outside"):
        pack_int4(v)


@pytest.mark.parametrize("k", [1, 7, 9, 12])
def test_last_dim_not_divisible_by_8(k):
    with pytest.raises(ValueError, match="values: last dim must be divisible by 8"):
        pack_int4(torch.zeros(3, k, dtype=torch.int8))


@pytest.mark.parametrize("values", [
    torch.zeros(8, dtype=torch.bool),
    torch.zeros(8, dtype=torch.complex64),
    torch.full((8,), 0.5),
    torch.full((8,), float("nan")),
    torch.full((8,), float("inf")),
])
def test_values_wrong_dtype_or_not_integer(values):
    with pytest.raises(ValueError, match="values: expected"):
        pack_int4(values)


def test_scalar_values():
    with pytest.raises(ValueError, match="values: expected a tensor with at least one dim"):
        pack_int4(torch.tensor(3))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.uint8, torch.float32])
def test_unpack_and_offset8_need_int32(dtype):
    with pytest.raises(ValueError, match="packed: expected an int32 tensor"):
        unpack_int4(torch.zeros(2, dtype=dtype))
    with pytest.raises(ValueError, match="packed: expected an int32 tensor"):
        offset8_to_npu(torch.zeros(2, dtype=dtype))


@settings(max_examples=30, deadline=None)
@given(int4_arrays)
def test_byte_fast_path_equals_the_generic_path(arr):
    # the little-endian byte path and the portable int64 path must produce the same words
    import sys

    v = torch.from_numpy(arr)
    fast = pack_int4(v)
    real = sys.byteorder
    try:
        sys.byteorder = "big"  # forces the portable paths
        slow = pack_int4(v)
        slow_unpack = unpack_int4_int8(fast)
    finally:
        sys.byteorder = real
    assert torch.equal(fast, slow)
    assert torch.equal(slow_unpack, v)


def test_non_contiguous_values():
    v = torch.randint(-8, 8, (16, 5), dtype=torch.int8).t()
    assert not v.is_contiguous()
    assert torch.equal(pack_int4(v), pack_int4_loop(v))
    assert torch.equal(unpack_int4_int8(pack_int4(v).t().contiguous().t()), v)
