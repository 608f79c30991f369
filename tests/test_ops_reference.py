"""The reference ops against docs/ascend-ops.md: hand-worked goldens, each rounding step, bad input,
backend selection."""
import importlib
import importlib.abc
import sys
import types

import pytest
import torch

from baselines import i32 as _i32
from flatquant_lab import ops
from flatquant_lab.ops import npu as npu_mod
from flatquant_lab.ops import reference as ref
from flatquant_lab.packing import pack_int4, unpack_int4
from flatquant_lab.transforms import orthogonal_factor


def kq(x, p1=None, p2=None, c=1.0, backend="reference"):
    _, n1, n2 = x.shape
    p1 = torch.eye(n1, dtype=x.dtype) if p1 is None else p1
    p2 = torch.eye(n2, dtype=x.dtype) if p2 is None else p2
    return ops.kronecker_quant(x, p1, p2, clip_ratio=c, backend=backend)


# ------------------------------------------------------------------ hand-worked goldens
def test_golden_identity_transform_fp16():
    # One token, n1 = 2, n2 = 8, p1 = p2 = I, c = 1, so b = x.  m = max|b| = 14:
    #   quant_scale = (14 * 1) / 7 = 2.0;  mult = (7 / 1) / 14 = 0.5
    # row 0: b * mult = [7, -7, 3.5, -3.5, 1.5, -1.5, 0.5, 0] -> rint half-even [7, -7, 4, -4, 2, -2, 0, 0]
    #   nibbles j0..j7 = 7 9 4 C 2 E 0 0 -> word 0x00E2C497
    # row 1: b * mult = [2.5, -2.5, 4.5, -4.5, 5.5, 6.5, -6.5, 1] -> [2, -2, 4, -4, 6, 6, -6, 1]
    #   nibbles 2 E 4 C 6 6 A 1 -> word 0x1A66C4E2
    x = torch.tensor([[[14, -14, 7, -7, 3, -3, 1, 0],
                       [5, -5, 9, -9, 11, 13, -13, 2]]], dtype=torch.float16)
    out, scale = kq(x)
    assert out.dtype == torch.int32 and out.shape == (1, 2, 1)
    assert out.tolist() == [[[0x00E2C497], [0x1A66C4E2]]]
    assert scale.dtype == torch.float32 and scale.tolist() == [2.0]


def test_golden_swap_double_clip_half_bf16():
    # p1 swaps the two rows, p2 = 2 I, c = 0.5, bf16 input: b = 2 * x with rows swapped.
    # m = 2 * 14 = 28: quant_scale = (28 * 0.5) / 7 = 2.0;  mult = (7 / 0.5) / 28 = 0.5, so b * mult = x.
    # out row 0 <- x row 1 = [1, 2, 3, 4, 5, 6, 7, -2.5] -> [1, 2, 3, 4, 5, 6, 7, -2]
    #   nibbles 1 2 3 4 5 6 7 E -> 0xE7654321
    # out row 1 <- x row 0 = [14, -14, 8, -8, 7.5, -8.5, 0.25, -0.75]
    #   -> rint [14, -14, 8, -8, 8, -8, 0, -1] -> saturate [7, -8, 7, -8, 7, -8, 0, -1]
    #   nibbles 7 8 7 8 7 8 0 F -> 0xF0878787
    x = torch.tensor([[[14, -14, 8, -8, 7.5, -8.5, 0.25, -0.75],
                       [1, 2, 3, 4, 5, 6, 7, -2.5]]], dtype=torch.bfloat16)
    p1 = torch.tensor([[0, 1], [1, 0]], dtype=torch.bfloat16)
    p2 = 2 * torch.eye(8, dtype=torch.bfloat16)
    out, scale = kq(x, p1, p2, c=0.5)
    assert out.tolist() == [[[_i32(0xE7654321)], [_i32(0xF0878787)]]]
    assert scale.tolist() == [2.0]


def test_golden_fp16_rounding_of_the_scaled_value():
    # Step 6 rounds b * mult to fp16 before rint. m = 5: mult = fp32(7 / 5) = 1.39999998.
    #   1.0712890625 * mult = 1.49980... -> fp16 1.5 -> rint 2   (fp32 rint would give 1)
    #   1.7861328125 * mult = 2.50058... -> fp16 2.5 -> rint 2   (fp32: 3)
    #   3.21484375   * mult = 4.50078... -> fp16 4.5 -> rint 4   (fp32: 5)
    #   2.5          * mult = 3.49999... -> fp16 3.5 -> rint 4   (fp32: 3)
    # row 0 q = [7, -7, 2, -2, 2, -2, 4, 0]: nibbles 7 9 2 E 2 E 4 0 -> 0x04E2E297
    # row 1 q = [4, -1, 0, 1, 4, -4, 6, -6] (-0.7, 0.35, 1.4, 4.2, 5.6 round plainly)
    #   nibbles 4 F 0 1 4 C 6 A -> 0xA6C410F4
    x = torch.tensor([[[5, -5, 1.0712890625, -1.0712890625, 1.7861328125, -1.7861328125, 3.21484375, 0],
                       [2.5, -0.5, 0.25, 1, 3, -3, 4, -4]]], dtype=torch.float16)
    out, scale = kq(x)
    assert out.tolist() == [[[0x04E2E297], [_i32(0xA6C410F4)]]]
    assert scale.tolist() == [(torch.tensor(5.0) / torch.tensor(7.0)).item()]


# ------------------------------------------------------------------ the rounding steps one by one
def test_step1_a_is_rounded_to_the_input_dtype():
    # bf16: x00 = 1 + 2^-7, p2 = (1 - 2^-8) I: a = 1 + 2^-8 - 2^-15, just below the bf16 midpoint
    # between 1 and 1 + 2^-7, so a rounds to 1 and m = 1. Kept in fp32 it would reach b as 1 + 2^-8.
    x = torch.zeros(1, 2, 8, dtype=torch.bfloat16)
    x[0, 0, 0] = 1 + 2**-7
    p2 = (1 - 2**-8) * torch.eye(8, dtype=torch.bfloat16)
    _, scale = kq(x, None, p2)
    assert scale.item() == (torch.tensor(1.0) / 7).item()


def test_step2_b_is_rounded_to_fp16_also_for_bf16():
    # p1 = [[1, 1], [0, 1]]: b00 = x00 + x10 = 1 + 2^-9 + 2^-12 (exact in fp32).
    # fp16 (ulp 2^-10) gives 1 + 2^-9; bf16 would give 1; fp32 would keep 2^-12.
    x = torch.zeros(1, 2, 8, dtype=torch.bfloat16)
    x[0, 0, 0] = 1
    x[0, 1, 0] = 2**-9 + 2**-12
    p1 = torch.tensor([[1, 1], [0, 1]], dtype=torch.bfloat16)
    _, scale = kq(x, p1)
    assert scale.item() == (torch.tensor(1 + 2**-9) / 7).item()
    assert scale.item() not in ((torch.tensor(1.0) / 7).item(), (torch.tensor(1 + 2**-9 + 2**-12) / 7).item())


@pytest.mark.parametrize("c", [1.0, 0.9, 0.3, 0.123456789])
def test_steps4_5_scale_and_mult_in_fp32_in_that_order(c):
    x = torch.zeros(1, 1, 8, dtype=torch.float16)
    x[0, 0, :2] = torch.tensor([5.0, 3.0])
    out, scale = kq(x, c=c)
    c32, m32, seven = torch.tensor(c, dtype=torch.float32), torch.tensor(5.0), torch.tensor(7.0)
    assert scale.item() == ((m32 * c32) / seven).item()
    mult = (seven / c32) / m32
    q1 = torch.round((torch.tensor(3.0) * mult).half().float()).clamp(-8, 7)
    assert unpack_int4(out)[0, 0, 1].item() == q1.item()


def test_matches_an_independent_per_token_emulation():
    # docs/ascend-ops.md, 'npu_kronecker_quant', written out token by token, in plain float32/float16 steps.
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float16, torch.bfloat16):
        for c in (1.0, 0.85):
            x = (4 * torch.randn(9, 4, 16, generator=g)).to(dtype)
            x[2] = 0
            p1 = orthogonal_factor(4, "random", 1).to(dtype)
            p2 = orthogonal_factor(16, "hadamard").to(dtype)
            out, scale = kq(x, p1, p2, c=c)
            for t in range(x.shape[0]):
                a = (x[t].float() @ p2.float()).to(dtype)
                b = (p1.float() @ a.float()).half()
                m = b.abs().max().float()
                c32 = torch.tensor(c, dtype=torch.float32)
                s = (m * c32) / 7
                mult = torch.tensor(7.0) if m == 0 else (torch.tensor(7.0) / c32) / m
                q = torch.round((b.float() * mult).half().float()).clamp(-8, 7)
                assert scale[t].item() == s.item()
                assert torch.equal(unpack_int4(out[t]), q.to(torch.int8))


# ------------------------------------------------------------------ zeros and saturation
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_zero_token_gives_zero_values_and_scale_0(dtype):
    x = torch.randn(3, 2, 8).to(dtype)
    x[1] = 0
    out, scale = kq(x, orthogonal_factor(2, "hadamard").to(dtype), orthogonal_factor(8, "hadamard").to(dtype))
    assert scale[1].item() == 0.0
    assert not torch.isnan(scale).any()
    assert (out[1] == 0).all()
    assert (scale[[0, 2]] > 0).all()


def test_clip_below_one_saturates_at_both_ends():
    x = torch.randn(64, 4, 16).to(torch.float16)
    vals = unpack_int4(kq(x, c=0.8)[0])
    assert (vals == -8).any() and (vals == 7).any()
    assert vals.min().item() == -8 and vals.max().item() == 7
    # with c = 1 the largest |b| maps to exactly +-7: -8 never occurs
    vals1 = unpack_int4(kq(x, c=1.0)[0])
    assert vals1.min().item() >= -7


# ------------------------------------------------------------------ quant_matmul
def _int64_expect(a, w, scale, pertoken, bias, out_dtype):
    acc = a.long() @ w.long().T  # exact
    y = acc.float() * scale  # |acc| < 2**24: the fp32 conversion is exact
    y = y * pertoken[:, None]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_quant_matmul_equals_exact_int64(out_dtype, with_bias):
    g = torch.Generator().manual_seed(2)
    m, k, n = 7, 256, 12
    a = torch.randint(-8, 8, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.05
    pertoken = torch.rand(m, generator=g) * 0.3
    bias = torch.randn(n, generator=g).to(out_dtype) if with_bias else None
    y = ops.quant_matmul(pack_int4(a), pack_int4(w).t(), scale, pertoken_scale=pertoken, bias=bias,
                         output_dtype=out_dtype, backend="reference")
    assert y.dtype == out_dtype and y.shape == (m, n)
    assert torch.equal(y, _int64_expect(a, w, scale, pertoken, bias, out_dtype))


def test_quant_matmul_extreme_accumulator_is_exact():
    k = 4096
    a = torch.full((2, k), -8, dtype=torch.int8)
    w = torch.full((3, k), -8, dtype=torch.int8)
    w[1] = 7
    y = ref.quant_matmul(pack_int4(a), pack_int4(w).t(), torch.ones(3), pertoken_scale=torch.full((2,), 2.0**-10),
                         output_dtype=torch.float16)
    # acc = 64 k = 262144 and -56 k; times 2^-10
    assert y[0].tolist() == [256.0, -224.0, 256.0]


def test_quant_matmul_without_pertoken_scale():
    a = torch.tensor([[1, 2, 3, 4, 5, 6, 7, -8]], dtype=torch.int8)
    w = torch.tensor([[1] * 8, [-1] * 8], dtype=torch.int8)
    y = ops.quant_matmul(pack_int4(a), pack_int4(w).t(), torch.tensor([0.5, 0.25]), output_dtype=torch.bfloat16,
                         backend="reference")
    assert y.tolist() == [[10.0, -5.0]]  # acc = 20 and -20


@pytest.mark.parametrize("bits,k", [(4, 64), (8, 1024), (8, 1025), (8, 3000)])
def test_int_gemm_is_the_exact_int32_accumulator(bits, k):
    # int8 past k = 1024 takes several fp32 slices; the worst case (-128 * -128 in every term) included
    g = torch.Generator().manual_seed(3)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    a = torch.randint(lo, hi, (5, k), generator=g, dtype=torch.int8)
    w = torch.randint(lo, hi, (6, k), generator=g, dtype=torch.int8)
    a[0], w[0] = lo, lo
    acc = ref._int_matmul(a, w, bits=bits)
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), a.long() @ w.long().T)
    assert acc[0, 0] == lo * lo * k


def test_convert_weight_to_int4pack_and_dynamic_quant():
    w = torch.randint(-8, 8, (4, 16), dtype=torch.int32)
    assert torch.equal(ops.convert_weight_to_int4pack(w, backend="reference"), pack_int4(w))
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float16)
    y, s = ops.dynamic_quant(x, backend="reference")
    assert y.tolist() == [[32, -64, 16, 127], [0, 0, 0, 0]]  # mult = 127 / 4
    # scale = 1 / mult in fp32: measured 3.7e-9 off the exact ratio
    assert s.tolist() == [pytest.approx(4 / 127, rel=4e-8), pytest.approx(1 / 127, rel=4e-8)]
    x4 = torch.tensor([[7.0, -7.0, 3.5, 0, 0, 0, 0, 1]], dtype=torch.bfloat16)
    y4, s4 = ops.dynamic_quant(x4, dst_type=torch.quint4x2, backend="reference")
    assert unpack_int4(y4).tolist() == [[7, -7, 4, 0, 0, 0, 0, 1]] and s4.tolist() == [1.0]


# ------------------------------------------------------------------ the int8 path (W8A8_DYNAMIC, docs/ascend-ops.md)
def test_golden_dynamic_quant_int8_bf16():
    # row 0: max|x| = 2, mult = 127 / 2 = 63.5: x * mult = [127, -63.5, 31.75, -15.875]
    #   -> rint half-even [127, -64, 32, -16]; scale = 1 / 63.5
    # row 1: max|x| = 254, mult = 0.5: [127, 0.5, 1.5, -2.5] -> [127, 0, 2, -2] (ties to even); scale 2
    # row 2: zeros -> mult = 127 (the op's 0 row), codes 0, scale 1 / 127
    x = torch.tensor([[2, -1, 0.5, -0.25], [254, 1, 3, -5], [0, 0, 0, 0]], dtype=torch.bfloat16)
    y, s = ops.dynamic_quant(x, backend="reference")
    assert y.dtype == torch.int8 and y.tolist() == [[127, -64, 32, -16], [127, 0, 2, -2], [0, 0, 0, 0]]
    assert s.dtype == torch.float32
    assert s.tolist() == [(1 / torch.tensor(63.5)).item(), 2.0, (1 / torch.tensor(127.0)).item()]


def test_dynamic_quant_trace_keeps_each_step():
    # row 0: max|x| = 254 -> mult = 0.5 exactly: t = [127, -63.5, 1.5, 0.5] -> q [127, -64, 2, 0] (half to even)
    # row 1: max|x| = 3 -> mult = fl32(127 / 3); row 2: zeros -> mult 127, t and q 0
    x = torch.tensor([[254, -127, 3, 1], [3, -1, 0.5, 2], [0, 0, 0, 0]], dtype=torch.bfloat16)
    tr = ops.dynamic_quant_trace(x)
    mult1 = (torch.tensor(127.0) / torch.tensor(3.0)).item()
    assert tr.mult.tolist() == [0.5, mult1, 127.0]
    assert tr.t[0].tolist() == [127.0, -63.5, 1.5, 0.5] and tr.t[1].tolist() == (x[1].float() * mult1).tolist()
    assert tr.q.dtype == torch.int8 and tr.q[0].tolist() == [127, -64, 2, 0] and tr.q[2].tolist() == [0] * 4
    assert tr.scale.tolist() == (1.0 / tr.mult).tolist()
    y, s = ops.dynamic_quant(x, backend="reference")  # the op is the trace's q and scale
    assert torch.equal(y, tr.q) and torch.equal(s, tr.scale)


def test_dynamic_quant_int8_is_fp32_mult_then_rint_without_a_half_rounding():
    # An independent emulation in numpy: mult = fp32(127 / m), q = rint(fp32(x * mult)).
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(64, 96, generator=g) * 3).to(torch.float16)
    y, s = ops.dynamic_quant(x, backend="reference")
    xf = x.float().numpy()
    m = np.abs(xf).max(axis=1, keepdims=True).astype(np.float32)
    mult = (np.float32(127.0) / m).astype(np.float32)
    want = np.rint((xf * mult).astype(np.float32))
    assert np.array_equal(y.numpy(), want.astype(np.int8))
    assert np.array_equal(s.numpy(), (np.float32(1.0) / mult[:, 0]).astype(np.float32))
    # rounding x * mult to fp16 first (the kronecker op's step) changes some codes: the test can tell
    assert not np.array_equal(np.rint((xf * mult).astype(np.float16).astype(np.float32)), want)


def test_golden_quant_matmul_int8():
    # acc = a @ w^T: row 0 [127 - 128 + 1, -127 * 127 + 2] = [0, -16127]; row 1 [2 - 3, -6] = [-1, -6]
    # y = acc * scale * pertoken + bias, scale (bf16) [0.5, 0.25], pertoken [2, 0.125], bias [1, -0.5]:
    #   [[0 + 1, -8063.5 - 0.5], [-0.0625 + 1, -0.1875 - 0.5]] = [[1, -8064], [0.9375, -0.6875]] (exact in bf16)
    a = torch.tensor([[127, -128, 1], [0, 2, -3]], dtype=torch.int8)
    w = torch.tensor([[1, 1, 1], [-127, 0, 2]], dtype=torch.int8)
    y = ops.quant_matmul(a, w.t().contiguous(), torch.tensor([0.5, 0.25], dtype=torch.bfloat16),
                         pertoken_scale=torch.tensor([2.0, 0.125]),
                         bias=torch.tensor([1.0, -0.5], dtype=torch.bfloat16),
                         output_dtype=torch.bfloat16, backend="reference")
    assert y.dtype == torch.bfloat16 and y.tolist() == [[1.0, -8064.0], [0.9375, -0.6875]]


def test_golden_quant_matmul_int8_rounds_the_output_half_to_even():
    # acc = 1; y = 257 and 259 in fp32; bf16 holds 256, 258, 260 here: 257 -> 256, 259 -> 260 (even mantissa)
    y = ops.quant_matmul(torch.ones(1, 1, dtype=torch.int8), torch.ones(1, 2, dtype=torch.int8),
                         torch.tensor([257.0, 259.0]), pertoken_scale=torch.ones(1), output_dtype=torch.bfloat16,
                         backend="reference")
    assert y.tolist() == [[256.0, 260.0]]


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_quant_matmul_int8_equals_exact_int64(out_dtype):
    # k = 4096: |acc| reaches ~2**26, past fp32's exact integers; the sliced GEMM must give the exact
    # accumulator, converted once to fp32
    g = torch.Generator().manual_seed(6)
    m, k, n = 5, 4096, 7
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    a[0] = -128
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    w[0] = -127
    scale = torch.rand(n, generator=g) * 1e-4
    pertoken = torch.rand(m, generator=g) * 1e-2
    bias = torch.randn(n, generator=g)
    y = ops.quant_matmul(a, w.t().contiguous(), scale, pertoken_scale=pertoken, bias=bias, output_dtype=out_dtype,
                         backend="reference")
    acc = a.long() @ w.long().T
    want = ((acc.float() * scale) * pertoken[:, None] + bias).to(out_dtype)
    assert torch.equal(y, want)
    assert acc.abs().max() > 2**24  # the case where an fp32 accumulator would not be exact


def test_quant_matmul_int8_bad_inputs():
    a = torch.zeros(3, 4, dtype=torch.int8)
    w = torch.zeros(4, 5, dtype=torch.int8)
    s, pt = torch.ones(5), torch.ones(3)
    good = dict(pertoken_scale=pt, output_dtype=torch.bfloat16, backend="reference")
    with pytest.raises(ValueError, match="x2: expected a 2-D int8 tensor"):
        ops.quant_matmul(a, w.int(), s, **good)
    with pytest.raises(ValueError, match="x2: k dim 5 disagrees with x1's 4"):
        ops.quant_matmul(a, w.t(), s, **good)
    with pytest.raises(ValueError, match=r"scale: expected float32 or bfloat16 \[5\]"):
        ops.quant_matmul(a, w, s.half(), **good)
    with pytest.raises(ValueError, match=r"scale: expected float32 or bfloat16 \[5\]"):
        ops.quant_matmul(a, w, torch.ones(5, 1), **good)
    with pytest.raises(ValueError, match=r"pertoken_scale: expected float32 \[3\]"):
        ops.quant_matmul(a, w, s, pertoken_scale=torch.ones(3, 1), output_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="offset: W8A8_DYNAMIC weights are symmetric"):
        ops.quant_matmul(a, w, s, offset=torch.zeros(5), **good)
    with pytest.raises(ValueError, match=r"bias: expected a float tensor of shape \[5\]"):
        ops.quant_matmul(a, w, s, bias=torch.zeros(5, dtype=torch.int32), **good)
    with pytest.raises(ValueError, match="output_dtype: expected torch.float16 or torch.bfloat16"):
        ops.quant_matmul(a, w, s, pertoken_scale=pt, output_dtype=torch.float32)
    with pytest.raises(ValueError, match="x2: dims .* exceed 65535"):
        ops.quant_matmul(a, torch.zeros(4, 65536, dtype=torch.int8), torch.ones(65536), **good)


def test_dynamic_quant_bad_inputs():
    with pytest.raises(ValueError, match="x: expected a float16 or bfloat16 tensor"):
        ops.dynamic_quant(torch.ones(2, 4), backend="reference")
    with pytest.raises(ValueError, match="x: expected a float16 or bfloat16 tensor"):
        ops.dynamic_quant(torch.ones(2, 4, dtype=torch.int8), backend="reference")
    with pytest.raises(ValueError, match="dst_type: expected torch.int8 or torch.quint4x2"):
        ops.dynamic_quant(torch.ones(2, 4, dtype=torch.float16), dst_type=torch.int32, backend="reference")


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("c", [0.0, -0.5, 1.0000001, 2, float("nan"), float("inf"), True, "0.5", None,
                               torch.tensor([0.5, 0.5])])
def test_bad_clip_ratio(c):
    with pytest.raises(ValueError, match="clip_ratio: expected"):
        kq(torch.zeros(1, 2, 8, dtype=torch.float16), c=c)


def test_kronecker_quant_bad_inputs():
    x = torch.zeros(2, 2, 8, dtype=torch.float16)
    eye2, eye8 = torch.eye(2, dtype=torch.float16), torch.eye(8, dtype=torch.float16)
    with pytest.raises(ValueError, match="x: expected float16 or bfloat16"):
        ops.kronecker_quant(x.float(), eye2.float(), eye8.float())
    with pytest.raises(ValueError, match=r"x: expected \[tokens, n1, n2\]"):
        ops.kronecker_quant(x.view(2, 16), eye2, eye8)
    with pytest.raises(ValueError, match=r"p1: expected shape \(2, 2\)"):
        ops.kronecker_quant(x, torch.eye(3, dtype=torch.float16), eye8)
    with pytest.raises(ValueError, match="p2: expected dtype torch.float16"):
        ops.kronecker_quant(x, eye2, eye8.bfloat16())
    with pytest.raises(ValueError, match="x: n2 = 12 must be divisible by 8"):
        ops.kronecker_quant(torch.zeros(1, 2, 12, dtype=torch.float16), eye2, torch.eye(12, dtype=torch.float16))
    with pytest.raises(ValueError, match="x: factor sizes .* exceed 256"):
        ops.kronecker_quant(torch.zeros(1, 1, 264, dtype=torch.float16), torch.eye(1, dtype=torch.float16),
                            torch.eye(264, dtype=torch.float16))
    with pytest.raises(ValueError, match="dst_dtype: expected torch.int32"):
        ops.kronecker_quant(x, eye2, eye8, dst_dtype=torch.int8, backend="reference")


def test_quant_matmul_bad_inputs():
    x1 = torch.zeros(3, 4, dtype=torch.int32)
    w = torch.zeros(5, 4, dtype=torch.int32)
    s, pt = torch.ones(5), torch.ones(3)
    good = dict(pertoken_scale=pt, output_dtype=torch.float16, backend="reference")
    with pytest.raises(ValueError, match="x1: expected a 2-D int32"):
        ops.quant_matmul(x1.long(), w.t(), s, **good)
    with pytest.raises(ValueError, match="x2: expected a 2-D int32"):
        ops.quant_matmul(x1, w.t().float(), s, **good)
    with pytest.raises(ValueError, match="x2: packed k dim 3 disagrees with x1's 4"):
        ops.quant_matmul(x1, torch.zeros(5, 3, dtype=torch.int32).t(), s, **good)
    with pytest.raises(ValueError, match=r"scale: expected float32 \[5\]"):
        ops.quant_matmul(x1, w.t(), s.half(), **good)
    with pytest.raises(ValueError, match=r"scale: expected float32 \[5\]"):
        ops.quant_matmul(x1, w.t(), torch.ones(4), **good)
    with pytest.raises(ValueError, match=r"pertoken_scale: expected float32 \[3\]"):
        ops.quant_matmul(x1, w.t(), s, pertoken_scale=torch.ones(2), output_dtype=torch.float16)
    with pytest.raises(ValueError, match="offset: the int4 path is symmetric"):
        ops.quant_matmul(x1, w.t(), s, offset=torch.zeros(5), **good)
    with pytest.raises(ValueError, match=r"bias: expected shape \[5\]"):
        ops.quant_matmul(x1, w.t(), s, bias=torch.zeros(4), **good)
    with pytest.raises(ValueError, match="output_dtype: expected torch.float16 or torch.bfloat16"):
        ops.quant_matmul(x1, w.t(), s, pertoken_scale=pt, output_dtype=torch.float32)
    with pytest.raises(ValueError, match="x2: packed dims .* exceed 65535"):
        ops.quant_matmul(x1, torch.zeros(65536, 4, dtype=torch.int32).t(), torch.ones(65536), **good)


def test_convert_weight_bad_inputs():
    with pytest.raises(ValueError, match="weight: expected a 2-D int32"):
        ops.convert_weight_to_int4pack(torch.zeros(4, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="values: expected int4 values"):
        ops.convert_weight_to_int4pack(torch.full((4, 8), 9, dtype=torch.int32), backend="reference")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp16_overflow_of_the_intermediate(dtype):
    # b = p1 @ a is kept in fp16 even for bf16 input: 3e4 * 4 = 1.2e5 > 65504. The device would
    # produce an inf scale; the reference refuses with Fp16OverflowError.
    x = torch.randn(3, 2, 8).to(dtype)
    x[1, 0, 0] = 3e4
    p1 = 2 * torch.eye(2, dtype=dtype)
    p2 = 2 * torch.eye(8, dtype=dtype)
    with pytest.raises(ops.Fp16OverflowError, match=r"x: the transformed activation .* in 1 of 3 token") as e:
        kq(x, p1, p2)
    assert isinstance(e.value, ValueError)


def test_nonfinite_input_to_the_op_is_reported_too():
    x = torch.zeros(2, 2, 8, dtype=torch.float16)
    x[0, 1, 3] = float("nan")
    with pytest.raises(ops.Fp16OverflowError, match="non-finite input"):
        kq(x)


# ------------------------------------------------------------------ backend selection
@pytest.mark.parametrize("env, want", [("reference", "reference"), ("npu", "npu"), ("auto", "reference"),
                                       (" NPU ", "npu"), ("Reference", "reference")])
def test_env_selects_backend(monkeypatch, env, want):
    monkeypatch.setenv("FLATQUANT_BACKEND", env)
    assert ops.resolve_backend(None, torch.zeros(1)) == want


def test_env_unset_means_auto(monkeypatch):
    monkeypatch.delenv("FLATQUANT_BACKEND", raising=False)
    assert ops.resolve_backend(None, torch.zeros(1)) == "reference"


def test_argument_overrides_env(monkeypatch):
    monkeypatch.setenv("FLATQUANT_BACKEND", "npu")
    assert ops.resolve_backend("reference") == "reference"
    # and really runs the reference with the env saying npu
    out, _ = kq(torch.ones(1, 2, 8, dtype=torch.float16), backend="reference")
    assert out.shape == (1, 2, 1)


def test_bad_env_value(monkeypatch):
    monkeypatch.setenv("FLATQUANT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FLATQUANT_BACKEND: expected one of auto, npu, reference, got 'cuda'"):
        kq(torch.ones(1, 2, 8, dtype=torch.float16), backend=None)


def test_bad_backend_argument():
    with pytest.raises(ValueError, match="backend: expected one of auto, npu, reference"):
        ops.resolve_backend("gpu")


# ------------------------------------------------------------------ the backend registry
def _namespace(**over):
    base = {op: getattr(ref, op) for op in ops.OPS}
    return types.SimpleNamespace(**{**base, **over})


@pytest.fixture
def registered():
    names = []
    yield names
    for name in names:
        if name in ops.backends():
            ops.unregister_backend(name)


def test_builtin_backends_are_registered_like_any_other():
    assert ops.backends() == ("npu", "reference")
    assert ops.get_backend("reference") is ref and ops.get_backend("npu") is npu_mod


def test_a_registered_backend_runs_every_op(registered):
    calls = []

    def counting(op):
        def run(*args, **kwargs):
            calls.append(op)
            return getattr(ref, op)(*args, **kwargs)
        return run

    ops.register_backend("counting", _namespace(**{op: counting(op) for op in ops.OPS}))
    registered.append("counting")
    assert "counting" in ops.backends() and ops.resolve_backend(" Counting ") == "counting"
    x = torch.ones(1, 2, 8, dtype=torch.float16)
    kq(x, backend="counting")
    w = torch.zeros(2, 8, dtype=torch.int32)
    packed = ops.convert_weight_to_int4pack(w, backend="counting")
    ops.quant_matmul(packed, packed.t(), torch.ones(2), output_dtype=torch.float16, backend="counting")
    ops.dynamic_quant(torch.ones(2, 8, dtype=torch.float16), backend="counting")
    assert sorted(calls) == sorted(ops.OPS) and len(calls) == 4


def test_a_registered_backend_from_the_environment(registered, monkeypatch):
    ops.register_backend("env-one", _namespace())
    registered.append("env-one")
    monkeypatch.setenv("FLATQUANT_BACKEND", "env-one")
    assert ops.resolve_backend(None, torch.zeros(1)) == "env-one"


@pytest.mark.parametrize("name, msg", [
    ("", "name: expected lowercase letters"),
    ("Mine", "name: expected lowercase letters"),
    ("1st", "name: expected lowercase letters"),
    ("my backend", "name: expected lowercase letters"),
    (None, "name: expected lowercase letters"),
    ("auto", "name: 'auto' is reserved"),
    ("npu", "name: 'npu' is reserved"),
    ("reference", "name: 'reference' is reserved"),
])
def test_register_backend_bad_names(name, msg):
    with pytest.raises(ValueError, match=msg):
        ops.register_backend(name, _namespace())


def test_register_backend_missing_ops():
    with pytest.raises(ValueError, match="backend 'half': expected a module or namespace with callables "
                                         "kronecker_quant, .* lacks quant_matmul, dynamic_quant"):
        ops.register_backend("half", types.SimpleNamespace(kronecker_quant=ref.kronecker_quant,
                                                           convert_weight_to_int4pack=ref.convert_weight_to_int4pack,
                                                           quant_matmul=3))
    assert "half" not in ops.backends()


def test_register_backend_twice(registered):
    first, second = _namespace(), _namespace()
    ops.register_backend("twice", first)
    registered.append("twice")
    ops.register_backend("twice", first)  # the same object again: nothing changes
    with pytest.raises(ValueError, match="name: a backend 'twice' is already registered; pass replace=True"):
        ops.register_backend("twice", second)
    ops.register_backend("twice", second, replace=True)
    assert ops.get_backend("twice") is second


def test_unregister_backend(registered):
    ops.register_backend("gone", _namespace())
    ops.unregister_backend("gone")
    with pytest.raises(ValueError, match="backend: expected one of auto, npu, reference, got 'gone'"):
        ops.resolve_backend("gone")
    with pytest.raises(ValueError, match="name: no backend 'gone' is registered"):
        ops.unregister_backend("gone")
    with pytest.raises(ValueError, match="name: the built-in backend 'reference' cannot be removed"):
        ops.unregister_backend("reference")


def test_backend_spec_is_imported_and_registered(registered, monkeypatch):
    mod = types.ModuleType("my_out_of_tree_backend")
    mod.BACKEND = types.SimpleNamespace(inner=_namespace())
    monkeypatch.setitem(sys.modules, "my_out_of_tree_backend", mod)
    spec = "my_out_of_tree_backend:BACKEND.inner"
    registered.append(spec)
    assert ops.resolve_backend(f" {spec} ") == spec  # the attribute path keeps its case
    assert ops.get_backend(spec) is mod.BACKEND.inner and spec in ops.backends()
    out, _ = kq(torch.ones(1, 2, 8, dtype=torch.float16), backend=spec)
    assert out.shape == (1, 2, 1)


@pytest.mark.parametrize("spec, msg", [
    ("no_such_module_xyz:B", "backend: cannot import module 'no_such_module_xyz' of backend spec"),
    ("flatquant_lab.ops:nothing", "backend: module 'flatquant_lab.ops' has no attribute 'nothing'"),
    ("flatquant_lab.ops:OPS", "backend 'flatquant_lab.ops:OPS': expected a module or namespace with callables"),
])
def test_bad_backend_spec(spec, msg):
    with pytest.raises(ValueError, match=msg):
        ops.resolve_backend(spec)
    assert spec not in ops.backends()


def test_backend_must_be_a_name():
    with pytest.raises(ValueError, match="backend: expected a backend name"):
        ops.resolve_backend(ref)


class _NoCannFinder(importlib.abc.MetaPathFinder):
    """Makes ``import torch_npu`` fail the way it does on a host without CANN (docs/ascend-ops.md)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch_npu" or name.startswith("torch_npu."):
            raise ImportError("libhccl.so: cannot open shared object file: No such file or directory. "
                              "Please check that the cann package is installed.")
        return None


@pytest.fixture
def no_torch_npu(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NoCannFinder(), *sys.meta_path])


def test_npu_backend_without_cann_raises(no_torch_npu):
    x = torch.ones(1, 2, 8, dtype=torch.float16)
    with pytest.raises(ops.NPUUnavailableError, match="CANN") as e:
        kq(x, backend="npu")
    assert "libhccl.so" in str(e.value) and "backend='reference'" in str(e.value)
    assert not npu_mod.is_available()


def test_npu_backend_from_env_without_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import of torch_npu halted: absent
    monkeypatch.setenv("FLATQUANT_BACKEND", "npu")
    w = torch.zeros(2, 8, dtype=torch.int32)
    with pytest.raises(ops.NPUUnavailableError, match="CANN toolkit"):
        ops.convert_weight_to_int4pack(w)
    with pytest.raises(ops.NPUUnavailableError):
        ops.quant_matmul(pack_int4(w), pack_int4(w).t(), torch.ones(2), output_dtype=torch.float16)


class _RecordingFinder(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.asked = []

    def find_spec(self, name, path=None, target=None):
        self.asked.append(name)
        return None


def test_importing_the_package_does_not_import_torch_npu(monkeypatch):
    # torch_npu must be imported lazily, on first npu call only (docs/ascend-ops.md, 'torch_npu off an Ascend host')
    finder = _RecordingFinder()
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    for mod in [m for m in sys.modules if m.startswith("flatquant_lab")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.delenv("FLATQUANT_BACKEND", raising=False)
    fresh = importlib.import_module("flatquant_lab")
    importlib.import_module("flatquant_lab.layers")
    importlib.import_module("flatquant_lab.numerics")
    fresh.ops.resolve_backend(None, torch.zeros(1))
    assert "flatquant_lab.layers" in finder.asked  # the finder did see the imports
    assert "torch_npu" not in finder.asked
