"""MXFP4 arithmetic (flatquant_lab/mxfp4.py) and its ops (docs/mxfp4.md): E2M1 rounding and codes, E8M0 scales,
the three scale rules, the FP4 Kronecker quantization, the MX matmul, and the NPU path through the test double."""
from __future__ import annotations

import sys

import pytest
import torch

from flatquant_lab import mxfp4, ops
from flatquant_lab.mxfp4 import FLOAT4_E2M1_X2, FLOAT8_E8M0, MxOptions
from flatquant_lab.ops import reference
from baselines import mx_dequantize_by_nibbles
from fake_torch_npu import make_fake_torch_npu

MX = dict(x1_dtype=FLOAT4_E2M1_X2, x2_dtype=FLOAT4_E2M1_X2, pertoken_scale_dtype=FLOAT8_E8M0,
          scale_dtype=FLOAT8_E8M0, group_sizes=[1, 1, 32])


def _group(*head, fill=0.0, dtype=torch.float32):
    """One group of 32 values: ``head`` then ``fill``."""
    g = torch.full((1, 32), fill, dtype=torch.float64)
    g[0, :len(head)] = torch.tensor(head, dtype=torch.float64)
    return g.to(dtype)


# ------------------------------------------------------------------ E2M1 rounding
def test_ties_round_half_to_even_on_the_e2m1_grid():
    r = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert mxfp4.round_e2m1(r).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert mxfp4.round_e2m1(-r).tolist() == [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]
    # off the ties: nearest
    assert mxfp4.round_e2m1(torch.tensor([0.24, 0.26, 2.49, 2.51, 4.9, 5.1])).tolist() == [0.0, 0.5, 2.0, 3.0, 4.0, 6.0]


def test_half_away_from_zero_rounds_ties_up():
    r = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -2.5])
    assert mxfp4.round_e2m1(r, half_even=False).tolist() == [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -3.0]


def test_ratios_above_six_saturate_or_raise():
    r = torch.tensor([6.5, 7.0, 7.9, -7.9, 6.0])
    assert mxfp4.round_e2m1(r).tolist() == [6.0, 6.0, 6.0, -6.0, 6.0]
    # 6.5 is nearer 6 than 8 anyway; 7 (a tie, 8 has the even code) and 7.9 round to 8, which E2M1 lacks
    with pytest.raises(ValueError, match=r"3 ratio\(s\) round above 6"):
        mxfp4.round_e2m1(r, saturate=False)
    assert mxfp4.round_e2m1(torch.tensor([6.5, 6.9]), saturate=False).tolist() == [6.0, 6.0]


def test_codes_sign_bit_and_magnitude_index():
    q = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -1.0, -6.0, -0.0])
    assert mxfp4.e2m1_codes(q).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 15, 8]
    all_codes = torch.arange(16, dtype=torch.uint8)
    assert mxfp4.e2m1_values(all_codes).tolist() == [0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6]
    with pytest.raises(ValueError, match="on the E2M1 grid"):
        mxfp4.e2m1_codes(torch.tensor([2.5]))


def test_nibble_order_even_element_low():
    codes = torch.tensor([[0x1, 0x2, 0xF, 0x8]], dtype=torch.uint8)
    packed = mxfp4.pack_fp4(codes)
    assert packed.tolist() == [[0x21, 0x8F]]
    assert torch.equal(mxfp4.unpack_fp4(packed), codes)
    with pytest.raises(ValueError, match="even"):
        mxfp4.pack_fp4(torch.zeros(1, 3, dtype=torch.uint8))


# ------------------------------------------------------------------ E8M0 scales and groups
def test_e8m0_values():
    s = torch.tensor([127, 128, 126, 0, 254, 0xFF], dtype=torch.uint8)
    v = mxfp4.e8m0_values(s)
    assert v[:5].tolist() == [1.0, 2.0, 0.5, 2.0**-127, 2.0**127] and torch.isnan(v[5])


@pytest.mark.parametrize("amax, code", [(6.0, 127), (4.0, 127), (7.9, 127), (7.99, 128), (3.99, 126), (1.0, 125), (0.5, 124),
                                        (448.0, 133)])
def test_shared_exponent_is_floor_log2_amax_minus_two(amax, code):
    # of the bfloat16 maximum: 7.99 rounds to 8 in bfloat16 (step 2^-5), hence 128
    q = mxfp4.quantize_groups(_group(amax, 0.1))
    assert q.scales.tolist() == [[code]]


def test_all_zero_group_gives_code_zero_and_zero_elements():
    x = torch.cat([_group(), _group(1.0)], dim=1)
    q = mxfp4.quantize_groups(x)
    assert q.scales.tolist() == [[0, 125]]
    assert q.codes[0, :32].tolist() == [0] * 32


def test_small_groups_clamp_the_e8m0_code_at_zero():
    # 2^-126: floor(log2) - 2 = -128, code -1 -> clamped to 0 (2^-127): the element becomes 2^-126 / 2^-127 = 2
    q = mxfp4.quantize_groups(_group(2.0**-126))
    assert q.scales.tolist() == [[0]] and q.ratios[0, 0].item() == 2.0 and q.codes[0, 0].item() == 4
    # 2^-130 (a bfloat16 subnormal): ratio 2^-3 rounds to 0; code still 0
    q = mxfp4.quantize_groups(_group(2.0**-130, -(2.0**-129)))
    assert q.scales.tolist() == [[0]] and q.ratios[0, :2].tolist() == [0.0, -0.0]
    # 2^-124: floor(log2) - 2 = -126, code 1, no clamp; the element is 2^-124 / 2^-126 = 4
    q = mxfp4.quantize_groups(_group(2.0**-124))
    assert q.scales.tolist() == [[1]] and q.ratios[0, 0].item() == 4.0


def test_negative_values_keep_their_sign():
    q = mxfp4.quantize_groups(_group(-6.0, 3.0, -1.5, -0.2))
    assert q.scales.tolist() == [[127]]
    assert q.ratios[0, :4].tolist() == [-6.0, 3.0, -1.5, -0.0]
    assert q.codes[0, :4].tolist() == [15, 5, 11, 8]


def test_the_kernel_rule_rounds_to_bfloat16_first():
    # 1.0039 is not a bfloat16: it rounds to 1.0 (step 2^-7), then sits on the E2M1 grid
    q = mxfp4.quantize_groups(_group(4.0, 1.0039))
    assert q.ratios[0, :2].tolist() == [4.0, 1.0]
    # 5.01 -> bfloat16 5.0 -> a tie between 4 and 6 -> 4; without the bfloat16 step it would be 6
    assert mxfp4.quantize_groups(_group(6.0, 5.01)).ratios[0, 1].item() == 4.0
    assert mxfp4.quantize_groups(_group(6.0, 5.01), MxOptions(scale_rule="ocp")).ratios[0, 1].item() == 6.0


def test_the_three_scale_rules_differ_on_one_group():
    x = _group(3.999, 2.5)  # float32
    got = {rule: mxfp4.quantize_groups(x, MxOptions(scale_rule=rule)) for rule in mxfp4.SCALE_RULES}
    # kernel: bf16(3.999) = 4 -> shared_exp 0 (code 127); 4 and 2.5 -> 4 and 2 (half to even)
    assert got["kernel"].scales.tolist() == [[127]] and got["kernel"].ratios[0, :2].tolist() == [4.0, 2.0]
    # OCP: floor(log2 3.999) - 2 = -1 (code 126); 7.998 -> 6 (clamped), 5 -> 4 (half to even)
    assert got["ocp"].scales.tolist() == [[126]] and got["ocp"].ratios[0, :2].tolist() == [6.0, 4.0]
    # msModelSlim: floor(log2(3.999 * 8/7)) - 2 = 0 (code 127); 3.999 -> 4, 2.5 -> 3 (half away from zero)
    assert got["msmodelslim"].scales.tolist() == [[127]]
    assert got["msmodelslim"].ratios[0, :2].tolist() == [4.0, 3.0]


def test_msmodelslim_rule_bumps_the_exponent_where_the_kernel_saturates():
    x = _group(7.0, 3.5)
    kern = mxfp4.quantize_groups(x)
    msm = mxfp4.quantize_groups(x, MxOptions(scale_rule="msmodelslim"))
    assert kern.scales.tolist() == [[127]] and kern.ratios[0, :2].tolist() == [6.0, 4.0]
    assert msm.scales.tolist() == [[128]] and msm.ratios[0, :2].tolist() == [4.0, 2.0]  # 3.5 and 1.75


def test_options_are_checked():
    with pytest.raises(ValueError, match="scale_rule: expected one of kernel, ocp, msmodelslim"):
        MxOptions(scale_rule="round")
    with pytest.raises(ValueError, match="saturate: expected a bool"):
        MxOptions(saturate=1)
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize_groups(torch.ones(1, 48))


def test_dequantize_is_each_nibble_times_its_scale_for_every_byte():
    """The byte table ``dequantize`` looks up gives, for all 256 bytes under scales from the smallest (code 0) to
    NaN (0xFF), what the definition gives: low nibble first, E2M1 value times ``2^(e - 127)``."""
    packed = torch.arange(256, dtype=torch.uint8).view(16, 16)  # 16 rows of 32 values: one group each
    scales = torch.tensor([0, 1, 100, 126, 127, 128, 200, 254, 255, 3, 50, 127, 130, 90, 10, 127],
                          dtype=torch.uint8).view(16, 1)
    want = mx_dequantize_by_nibbles(packed, scales)
    assert bool(want[8].isnan().all())  # 0xFF: E8M0 NaN
    got = mxfp4.dequantize(packed, scales)
    assert got.dtype == torch.float64 and torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    assert torch.equal(mxfp4.dequantize(packed, scales, torch.float32).nan_to_num(), got.float().nan_to_num())
    with pytest.raises(ValueError, match="packed: expected uint8"):
        mxfp4.dequantize(packed.to(torch.int16), scales)


def test_weight_quantizer_packs_and_dequantizes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=g, dtype=torch.float64)
    q, s = mxfp4.quantize_weight_mxfp4(w)
    assert q.shape == (6, 32) and q.dtype == torch.uint8 and s.shape == (6, 2) and s.dtype == torch.uint8
    back = mxfp4.dequantize(q, s)
    # per group: |error| <= half the largest step (1 at the top binade) times the scale, or the saturation gap 2
    step = mxfp4.e8m0_values(s).repeat_interleave(32, dim=-1)
    assert bool(((back - w).abs() <= 2.0 * step).all())
    for rule in mxfp4.SCALE_RULES:
        q2, s2 = mxfp4.quantize_weight_mxfp4(w, scale_rule=rule)
        assert q2.shape == q.shape
    with pytest.raises(ValueError, match=r"weight: expected a float matrix"):
        mxfp4.quantize_weight_mxfp4(torch.zeros(4, 32, dtype=torch.int8))


# ------------------------------------------------------------------ the ops
def _operands(t=3, n1=4, n2=16, o=5, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n1, n2, generator=g).to(dtype)
    q1, _ = torch.linalg.qr(torch.randn(n1, n1, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n2, n2, generator=g, dtype=torch.float64))
    w = torch.randn(o, n1 * n2, generator=g, dtype=torch.float64)
    return x, q1.to(dtype), q2.to(dtype), w


def test_kronecker_quant_fp4_is_the_bf16_product_then_groups():
    x, p1, p2, _ = _operands()
    xq, s = ops.kronecker_quant(x, p1, p2, dst_dtype=FLOAT4_E2M1_X2, backend="reference")
    assert xq.shape == (3, 4, 8) and xq.dtype == torch.uint8 and s.shape == (3, 2) and s.dtype == torch.uint8
    b = (p1.double() @ x.double() @ p2.double()).reshape(3, -1)  # L^T X R, p1 = L^T
    tr = ops.kronecker_quant_mx_trace(x, p1, p2)
    torch.testing.assert_close(tr.b.double(), b.to(torch.bfloat16).double(), rtol=2**-7, atol=1e-6)
    want = mxfp4.quantize_groups(tr.b)
    assert torch.equal(mxfp4.unpack_fp4(xq.reshape(3, -1)), want.codes) and torch.equal(s, want.scales)


def test_identity_factors_quantize_the_input_itself():
    x, _, _, _ = _operands()
    eye1, eye2 = torch.eye(4, dtype=torch.bfloat16), torch.eye(16, dtype=torch.bfloat16)
    xq, s = ops.kronecker_quant(x, eye1, eye2, dst_dtype=FLOAT4_E2M1_X2, backend="reference")
    want = mxfp4.quantize_groups(x.reshape(3, -1))
    assert torch.equal(xq.reshape(3, -1), mxfp4.pack_fp4(want.codes)) and torch.equal(s, want.scales)


def test_clip_ratio_is_unused_unless_asked():
    x, p1, p2, _ = _operands()
    a = ops.kronecker_quant(x, p1, p2, clip_ratio=0.5, dst_dtype=FLOAT4_E2M1_X2, backend="reference")
    b = ops.kronecker_quant(x, p1, p2, clip_ratio=1.0, dst_dtype=FLOAT4_E2M1_X2, backend="reference")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    clipped = reference.kronecker_quant_mx(x, p1, p2, 0.5, MxOptions(apply_clip=True))
    assert not torch.equal(clipped[1], b[1])  # the halved maximum lowers every group's exponent by one
    assert torch.equal(clipped[1].int(), b[1].int() - 1)


def test_quant_matmul_mx_is_the_exact_sum_of_scaled_groups():
    # one token, one output, K = 64 (two groups): by hand
    a = torch.zeros(1, 64, dtype=torch.uint8)
    a[0, 0], a[0, 32] = 2, 13  # 1.0 and -3.0
    w = torch.zeros(1, 64, dtype=torch.uint8)
    w[0, 0], w[0, 32] = 7, 3  # 6.0 and 1.5
    sa = torch.tensor([[127, 129]], dtype=torch.uint8)  # 1 and 4
    sw = torch.tensor([[128, 120]], dtype=torch.uint8)  # 2 and 2^-7
    y = ops.quant_matmul(mxfp4.pack_fp4(a), mxfp4.pack_fp4(w).t(), sw, pertoken_scale=sa,
                         output_dtype=torch.float16, backend="reference", **MX)
    assert y.dtype == torch.float16 and y.item() == 1.0 * 6.0 * 2 + (-3.0 * 4) * (1.5 * 2.0**-7)


def test_quant_matmul_mx_matches_the_dequantized_product():
    x, p1, p2, w = _operands(t=7, o=9)
    xq, s = ops.kronecker_quant(x, p1, p2, dst_dtype=FLOAT4_E2M1_X2, backend="reference")
    wq, ws = mxfp4.quantize_weight_mxfp4(w)
    bias = torch.randn(9, dtype=torch.float64).to(torch.bfloat16)
    y = ops.quant_matmul(xq.view(7, -1), wq.t(), ws, pertoken_scale=s, bias=bias, output_dtype=torch.bfloat16,
                         backend="reference", **MX)
    a = mxfp4.dequantize(xq.view(7, -1), s)
    want = ((a @ mxfp4.dequantize(wq, ws).T).float() + bias.float()).to(torch.bfloat16)
    assert torch.equal(y, want)


def test_ops_validate_the_mx_path():
    x, p1, p2, w = _operands()
    xq, s = ops.kronecker_quant(x, p1, p2, dst_dtype=FLOAT4_E2M1_X2, backend="reference")
    wq, ws = mxfp4.quantize_weight_mxfp4(w)
    args = (xq.view(3, -1), wq.t(), ws)
    with pytest.raises(ValueError, match=r"group_sizes: the MXFP4 path expects \[1, 1, 32\]"):
        ops.quant_matmul(*args, pertoken_scale=s, output_dtype=torch.bfloat16, **{**MX, "group_sizes": [1, 1, 16]})
    with pytest.raises(ValueError, match="scale_dtype: the MXFP4 path expects"):
        ops.quant_matmul(*args, pertoken_scale=s, output_dtype=torch.bfloat16, **{**MX, "scale_dtype": torch.float32})
    with pytest.raises(ValueError, match=r"pertoken_scale: expected a uint8 tensor \[3, 2\]"):
        ops.quant_matmul(*args, pertoken_scale=s[:, :1], output_dtype=torch.bfloat16, **MX)
    with pytest.raises(ValueError, match=r"scale: expected a uint8 tensor \[5, 2\]"):
        ops.quant_matmul(xq.view(3, -1), wq.t(), ws.float(), pertoken_scale=s, output_dtype=torch.bfloat16, **MX)
    with pytest.raises(ValueError, match="n2 = 15 must be even"):
        ops.kronecker_quant(torch.zeros(1, 32, 15, dtype=torch.bfloat16), torch.eye(32, dtype=torch.bfloat16),
                            torch.eye(15, dtype=torch.bfloat16), dst_dtype=FLOAT4_E2M1_X2)
    with pytest.raises(ValueError, match="n1 \\* n2 = 24 must be a multiple of 32"):
        ops.kronecker_quant(torch.zeros(1, 3, 8, dtype=torch.bfloat16), torch.eye(3, dtype=torch.bfloat16),
                            torch.eye(8, dtype=torch.bfloat16), dst_dtype=FLOAT4_E2M1_X2)


def test_a_backend_with_other_options_registers_like_any_backend():
    x, p1, p2, _ = _operands(seed=3)
    ops.register_backend("mx-ocp-test", ops.mx_backend(MxOptions(scale_rule="ocp")))
    try:
        got = ops.kronecker_quant(x, p1, p2, dst_dtype=FLOAT4_E2M1_X2, backend="mx-ocp-test")
    finally:
        ops.unregister_backend("mx-ocp-test")
    # on bfloat16 products the OCP rule is the kernel's (nothing left to round to bfloat16)
    want = ops.kronecker_quant(x, p1, p2, dst_dtype=FLOAT4_E2M1_X2, backend="reference")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_round_intermediate_option_rounds_x_p2_first():
    x, p1, p2, _ = _operands(t=16, seed=5)
    plain = reference.kronecker_quant_mx_trace(x, p1, p2)
    rounded = reference.kronecker_quant_mx_trace(x, p1, p2, options=MxOptions(round_intermediate=True))
    a = (x.float() @ p2.float()).to(torch.bfloat16).float()
    want = (p1.float() @ a).to(torch.bfloat16).reshape(16, -1)
    assert torch.equal(rounded.b, want)
    assert not torch.equal(plain.b, rounded.b)


# ------------------------------------------------------------------ the NPU path through the double
def test_npu_backend_passes_torch_npu_dtypes_and_equals_the_reference(monkeypatch):
    fake = make_fake_torch_npu()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    x, p1, p2, w = _operands(t=4, o=6, seed=7)
    xq, s = ops.kronecker_quant(x, p1, p2, clip_ratio=0.9, dst_dtype=FLOAT4_E2M1_X2, backend="npu")
    rq, rs = ops.kronecker_quant(x, p1, p2, clip_ratio=0.9, dst_dtype=FLOAT4_E2M1_X2, backend="reference")
    assert torch.equal(xq, rq) and torch.equal(s, rs)
    call = fake.calls[-1]
    assert call.op == "npu_kronecker_quant" and call.scalars["dst_dtype"] is fake.float4_e2m1fn_x2
    wq, ws = mxfp4.quantize_weight_mxfp4(w)
    y = ops.quant_matmul(xq.view(4, -1), wq.t(), ws, pertoken_scale=s, output_dtype=torch.bfloat16, backend="npu",
                         **MX)
    ref = ops.quant_matmul(xq.view(4, -1), wq.t(), ws, pertoken_scale=s, output_dtype=torch.bfloat16,
                           backend="reference", **MX)
    assert torch.equal(y, ref)
    call = fake.calls[-1]
    assert call.op == "npu_quant_matmul"
    assert call.scalars["x1_dtype"] is fake.float4_e2m1fn_x2 and call.scalars["x2_dtype"] is fake.float4_e2m1fn_x2
    assert call.scalars["scale_dtype"] is fake.float8_e8m0fnu and call.scalars["pertoken_scale_dtype"] is fake.float8_e8m0fnu
    assert call.scalars["group_sizes"] == [1, 1, 32]
    assert call.tensors["x2"].shape == (32, 6) and not call.tensors["x2"].contiguous  # the weight's transposed view


def test_int_paths_through_the_double_do_not_pass_mx_arguments(monkeypatch):
    fake = make_fake_torch_npu()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    x = torch.randn(2, 8, 8).to(torch.bfloat16)
    eye = torch.eye(8, dtype=torch.bfloat16)
    xq, s = ops.kronecker_quant(x, eye, eye, backend="npu")
    w = torch.randint(-8, 8, (3, 64), dtype=torch.int32)
    wp = ops.convert_weight_to_int4pack(w, backend="reference")
    ops.quant_matmul(xq.view(2, -1), wp.t(), torch.ones(3), pertoken_scale=s, output_dtype=torch.bfloat16,
                     backend="npu")
    assert set(fake.calls[-1].scalars) == {"output_dtype"}


@pytest.mark.skipif(not isinstance(FLOAT4_E2M1_X2, torch.dtype), reason="this torch has no float4_e2m1fn_x2")
def test_torchs_own_one_byte_dtypes_are_read_as_the_same_bytes():
    x, p1, p2, w = _operands(t=2, o=3)
    xq, s = ops.kronecker_quant(x, p1, p2, dst_dtype=FLOAT4_E2M1_X2, backend="reference")
    wq, ws = mxfp4.quantize_weight_mxfp4(w)
    want = ops.quant_matmul(xq.view(2, -1), wq.t(), ws, pertoken_scale=s, output_dtype=torch.bfloat16, **MX)
    got = ops.quant_matmul(xq.view(2, -1).view(FLOAT4_E2M1_X2), wq.view(FLOAT4_E2M1_X2).t(), ws.view(FLOAT8_E8M0),
                           pertoken_scale=s.view(FLOAT8_E8M0), output_dtype=torch.bfloat16, **MX)
    assert torch.equal(got, want)
