"""W4A4FlatQuantLinear: construction, round trips, forward, and every bad input of the issue."""
from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from flatquant_lab import ops
from flatquant_lab.kronecker import decompose_dim
from flatquant_lab.layers import W4A4FlatQuantLinear
from flatquant_lab.packing import pack_int4
from flatquant_lab.quantizers import quantize_weight
from flatquant_lab.transforms import orthogonal_factor
from tiny_models import random_linear

K, O = 128, 24
N1, N2 = decompose_dim(K)  # (8, 16)


float_linear = partial(random_linear, K, O)


def make_layer(dtype=torch.bfloat16, bias=True, clip_ratio=0.9, **kw):
    n1, n2 = decompose_dim(K)
    return W4A4FlatQuantLinear.from_float(float_linear(bias=bias), orthogonal_factor(n1, "random", 1),
                                          orthogonal_factor(n2, "hadamard"), clip_ratio=clip_ratio,
                                          act_dtype=dtype, backend="reference", **kw)


def good_tensors(dtype=torch.bfloat16):
    return make_layer(dtype).checkpoint_tensors()


def with_(tensors, **changes):
    out = dict(tensors)
    out.update(changes)
    return out


# ------------------------------------------------------------------ construction and round trips
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_checkpoint_round_trip_is_bit_exact(dtype):
    layer = make_layer(dtype)
    t1 = layer.checkpoint_tensors()
    assert t1["weight"].dtype == torch.int8 and t1["weight"].shape == (O, K)
    assert t1["weight_scale"].dtype == torch.float32 and t1["weight_scale"].shape == (O, 1)
    assert t1["left_trans"].dtype == dtype and t1["left_trans"].shape == (N1, N1)
    assert t1["clip_ratio"].dtype == torch.float32 and t1["clip_ratio"].shape == (1,)
    layer2 = W4A4FlatQuantLinear.from_checkpoint(t1, backend="reference")
    t2 = layer2.checkpoint_tensors()
    assert t1.keys() == t2.keys()
    for k in t1:
        assert t1[k].dtype == t2[k].dtype and torch.equal(t1[k], t2[k]), k
    assert torch.equal(layer.weight_packed, layer2.weight_packed)
    x = torch.randn(5, K).to(dtype)
    assert torch.equal(layer(x), layer2(x))


def test_from_float_packs_the_folded_quantized_weight():
    lin = float_linear()
    left, right = orthogonal_factor(N1, "random", 1), orthogonal_factor(N2, "hadamard")
    layer = W4A4FlatQuantLinear.from_float(lin, left, right, act_dtype=torch.bfloat16, backend="reference")
    from flatquant_lab.kronecker import fold_weight
    q, s = quantize_weight(fold_weight(lin.weight.detach(), left.bfloat16(), right.bfloat16()))
    assert torch.equal(layer.weight_packed, pack_int4(q))
    assert torch.equal(layer.weight_scale, s)
    assert torch.equal(layer.p1, layer.left_trans.t().contiguous()) and torch.equal(layer.p2, layer.right_trans)


def test_module_to_keeps_the_fp32_buffers_exact():
    layer = make_layer(torch.bfloat16)
    scale, clip = layer.weight_scale.clone(), layer.clip_ratio.clone()
    layer.to(torch.float16)
    assert layer.act_dtype == torch.float16
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
    assert torch.equal(layer.clip_ratio, clip)


def test_module_to_refuses_a_lossy_transform_cast():
    layer = make_layer(torch.float16)  # random factors: fp16 values that bf16 cannot hold
    before = {k: v.clone() for k, v in layer.checkpoint_tensors().items()}
    with pytest.raises(ValueError, match="dtype: casting left_trans from float16 to bfloat16 rounds it"):
        layer.to(torch.bfloat16)
    assert layer.act_dtype == torch.float16  # refused before anything moved
    for k, v in layer.checkpoint_tensors().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    layer.to(torch.float32)  # fp32 holds fp16 exactly; the layer keeps computing in fp16
    assert layer.act_dtype == torch.float16


def test_from_checkpoint_adds_a_float32_bias_in_the_activation_dtype():
    t = good_tensors(torch.bfloat16)
    t["bias"] = torch.randn(O)  # float32, finer than bf16
    layer = W4A4FlatQuantLinear.from_checkpoint(t, backend="reference")
    assert layer.bias.dtype == torch.bfloat16 and torch.equal(layer.bias, t["bias"].bfloat16())
    x = torch.randn(3, K).bfloat16()
    assert layer(x).dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, match", [
    (dict(in_features=12, n1=3, n2=4), "in_features: expected a multiple of 8"),
    (dict(in_features=64, n1=4, n2=8), r"n1, n2: expected n1 \* n2 == in_features = 64"),
    (dict(act_dtype=torch.float32), "act_dtype: expected torch.float16 or torch.bfloat16"),
    (dict(backend="npuu"), "backend: expected one of auto, npu, reference"),
    (dict(out_features=0), "out_features: expected a positive int"),
])
def test_constructor_checks_its_arguments(kwargs, match):
    args = dict(in_features=64, out_features=16, n1=8, n2=8, act_dtype=torch.bfloat16, bias=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        W4A4FlatQuantLinear(**args)


# ------------------------------------------------------------------ forward
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_leading_dims_and_accuracy(dtype):
    layer = make_layer(dtype)
    x = torch.randn(2, 3, 4, K).to(dtype)
    y = layer(x)
    assert y.shape == (2, 3, 4, O) and y.dtype == dtype
    assert torch.equal(y.reshape(-1, O), layer(x.reshape(-1, K)))
    # the int4 path tracks the float layer (W4A4 with a Hadamard/random transform): measured 0.121 (fp16),
    # 0.118 (bf16)
    with torch.no_grad():
        yf = float_linear()(x.float()).double()
    rel = float((y.double() - yf).norm() / yf.norm())
    assert rel < 0.25


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_is_the_op_composition(dtype):
    layer = make_layer(dtype, bias=False)
    x = torch.randn(6, K).to(dtype)
    xq, s = ops.kronecker_quant(x.view(-1, N1, N2), layer.left_trans.t().contiguous(), layer.right_trans,
                                clip_ratio=layer.clip_ratio.item(), backend="reference")
    y = ops.quant_matmul(xq.view(6, K // 8), layer.weight_packed.t(), layer.weight_scale.view(-1),
                         pertoken_scale=s, output_dtype=dtype, backend="reference")
    assert torch.equal(layer(x), y)


def test_fp32_input_returns_fp32():
    layer = make_layer(torch.bfloat16)
    x = torch.randn(3, K)
    y = layer(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, layer(x.bfloat16()).float())


def test_empty_input_gives_empty_output():
    layer = make_layer()
    for shape in [(0, K), (2, 0, K)]:
        y = layer(torch.zeros(shape, dtype=torch.bfloat16))
        assert y.shape == (*shape[:-1], O) and y.dtype == torch.bfloat16
    assert layer(torch.zeros(0, K)).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_added_in_output_dtype(dtype):
    layer = make_layer(dtype, bias=True)
    no_bias = W4A4FlatQuantLinear.from_checkpoint(
        {k: v for k, v in layer.checkpoint_tensors().items() if k != "bias"}, backend="reference")
    x = torch.randn(7, K).to(dtype)
    y0 = no_bias(x)
    assert layer.bias.dtype == dtype
    # y = round(round(acc * scales) + bias): two roundings, not one fp32 sum
    assert torch.equal(layer(x), y0 + layer.bias)


def test_all_zero_tokens_give_zeros_not_nan():
    layer = make_layer(bias=False)
    x = torch.randn(5, K).bfloat16()
    x[[1, 3]] = 0
    y = layer(x)
    assert not torch.isnan(y).any()
    assert (y[[1, 3]] == 0).all()
    assert (y[[0, 2, 4]] != 0).any()
    y_all = layer(torch.zeros(4, K, dtype=torch.bfloat16))
    assert (y_all == 0).all()
    with_bias = make_layer(bias=True)
    assert torch.equal(with_bias(torch.zeros(2, K, dtype=torch.bfloat16)), with_bias.bias.expand(2, O))


@pytest.mark.parametrize("tokens", [1, 6, 7, 20])
def test_more_tokens_than_the_chunk_limit(tokens):
    big = make_layer()
    small = W4A4FlatQuantLinear.from_checkpoint(big.checkpoint_tensors(), backend="reference", chunk_tokens=6)
    x = torch.randn(tokens, K).bfloat16()
    assert torch.equal(small(x), big(x))


def test_non_contiguous_input():
    layer = make_layer()
    x = torch.randn(K, 5).bfloat16().t()
    assert not x.is_contiguous()
    assert torch.equal(layer(x), layer(x.contiguous()))


# ------------------------------------------------------------------ bad input, one test each
def test_in_features_not_divisible_by_8_from_checkpoint():
    t = with_(good_tensors(), weight=torch.zeros(O, 12, dtype=torch.int8),
              left_trans=torch.eye(3, dtype=torch.bfloat16), right_trans=torch.eye(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="weight: in-features K = 12 must be divisible by 8"):
        W4A4FlatQuantLinear.from_checkpoint(t)


def test_in_features_not_divisible_by_8_from_float():
    with pytest.raises(ValueError, match="linear: in_features = 12 must be divisible by 8"):
        W4A4FlatQuantLinear.from_float(nn.Linear(12, 4), torch.eye(3), torch.eye(4))


def test_transform_sizes_must_multiply_to_in_features():
    t = with_(good_tensors(), left_trans=torch.eye(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"left_trans/right_trans: sizes 4 x 16 = 64 must multiply to "
                                         r"in-features 128 \(expected \(8, 16\)\)"):
        W4A4FlatQuantLinear.from_checkpoint(t)


@pytest.mark.parametrize("name", ["left_trans", "right_trans"])
def test_transform_not_square(name):
    t = with_(good_tensors(), **{name: torch.zeros(8, 16, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match=f"{name}: expected a square matrix, got shape \\[8, 16\\]"):
        W4A4FlatQuantLinear.from_checkpoint(t)


def test_transform_not_square_from_float():
    with pytest.raises(ValueError, match=r"left_trans: expected a square float matrix, got \[8, 16\]"):
        W4A4FlatQuantLinear.from_float(float_linear(), torch.zeros(8, 16), torch.eye(16))
    with pytest.raises(ValueError, match="right_trans: expected a square float matrix, got list"):
        W4A4FlatQuantLinear.from_float(float_linear(), torch.eye(16), [[1.0]])
    with pytest.raises(ValueError, match="left_trans/right_trans: sizes 4 x 16 must multiply to linear's in_features 128"):
        W4A4FlatQuantLinear.from_float(float_linear(), torch.eye(4), torch.eye(16))


@pytest.mark.parametrize("c", [0.0, -0.25, 1.5, float("nan"), float("inf")])
def test_clip_ratio_out_of_range_or_not_finite(c):
    t = with_(good_tensors(), clip_ratio=torch.tensor([c], dtype=torch.float32))
    with pytest.raises(ValueError, match="clip_ratio: expected a finite float in \\(0, 1\\]"):
        W4A4FlatQuantLinear.from_checkpoint(t)
    with pytest.raises(ValueError, match="clip_ratio: expected a finite float in \\(0, 1\\]"):
        W4A4FlatQuantLinear.from_float(float_linear(), torch.eye(N1), torch.eye(N2), clip_ratio=c)
    layer = make_layer()
    with pytest.raises(ValueError, match="clip_ratio: expected a finite float in \\(0, 1\\]"):
        layer.set_clip_ratio(c)
    assert layer.clip_ratio.item() == torch.tensor(0.9).item()  # unchanged


def test_clip_ratio_wrong_shape():
    t = with_(good_tensors(), clip_ratio=torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"clip_ratio: expected shape \[1\]"):
        W4A4FlatQuantLinear.from_checkpoint(t)


@pytest.mark.parametrize("bad", [8, -9, 127])
def test_weights_outside_int4(bad):
    w = good_tensors()["weight"].clone()
    w[3, 5] = bad
    with pytest.raises(ValueError, match=r"weight: expected int4 values in \[-8, 7\]"):
        W4A4FlatQuantLinear.from_checkpoint(with_(good_tensors(), weight=w))


def test_weight_wrong_dtype():
    t = good_tensors()
    with pytest.raises(ValueError, match="weight: expected dtype int8, got int32"):
        W4A4FlatQuantLinear.from_checkpoint(with_(t, weight=t["weight"].int()))


def test_packed_dims_disagree_with_the_scales():
    t = good_tensors()
    with pytest.raises(ValueError, match=r"weight_scale: expected shape \[24, 1\], got \[25, 1\]"):
        W4A4FlatQuantLinear.from_checkpoint(with_(t, weight_scale=torch.ones(O + 1, 1)))


def test_packed_dims_disagree_in_the_matmul():
    layer = make_layer()
    xq = torch.zeros(3, K // 8 - 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="x2: packed k dim 16 disagrees with x1's 15"):
        ops.quant_matmul(xq, layer.weight_packed.t(), layer.weight_scale.view(-1),
                         pertoken_scale=torch.ones(3), output_dtype=torch.bfloat16)


def test_input_last_dim_disagrees():
    with pytest.raises(ValueError, match=r"x: expected last dim 128 \(in_features\), got shape \(2, 120\)"):
        make_layer()(torch.zeros(2, 120, dtype=torch.bfloat16))


def test_input_wrong_half_dtype():
    with pytest.raises(ValueError, match="x: expected torch.bfloat16 .* or float32, got torch.float16"):
        make_layer(torch.bfloat16)(torch.zeros(2, K, dtype=torch.float16))


def test_non_finite_activations_raise_with_a_count():
    layer = make_layer()
    x = torch.randn(4, K).bfloat16()
    x[1, 0], x[1, 7], x[3, 2] = float("nan"), float("inf"), float("-inf")
    with pytest.raises(ValueError, match=r"x: expected finite activations, got 3 non-finite values in 2 of 4 "
                                         r"tokens \(pass check_finite=False"):
        layer(x)
    with pytest.raises(ValueError, match="got 3 non-finite values in 2 of 4 tokens"):
        layer(x.float())  # float32 input is checked before the cast


def test_check_finite_false_skips_the_check():
    layer = make_layer(check_finite=False)
    x = torch.randn(4, K).bfloat16()
    x[1, 0] = float("nan")
    # without the layer's check the op sees the NaN: the reference refuses it as a non-finite
    # intermediate (a device would return garbage for that token)
    with pytest.raises(ops.Fp16OverflowError, match="non-finite input") as e:
        layer(x)
    assert "check_finite" not in str(e.value)
    x[1, 0] = 0.0
    assert torch.isfinite(layer(x)).all()


def test_fp16_overflow_of_the_intermediate():
    # A constant token c concentrates under the Hadamard factors: max|b| = 6.35 c here (computed
    # below), so c = 3e4 gives |b| ~ 1.9e5 > 65504: b does not fit fp16, where the kernel keeps it.
    layer = W4A4FlatQuantLinear.from_float(float_linear(), orthogonal_factor(N1), orthogonal_factor(N2),
                                           act_dtype=torch.bfloat16, backend="reference")
    const = torch.ones(1, N1, N2)
    b = layer.p1.double() @ (const.double() @ layer.p2.double())
    assert 6 < float(b.abs().max()) < 7
    x = torch.randn(3, K).bfloat16()
    x[2] = 3e4
    with pytest.raises(ops.Fp16OverflowError, match="x: the transformed activation p1 @ x @ p2 is not finite "
                                                    "in fp16 .* in 1 of 3 token"):
        layer(x)
    x[2] = 1e3  # |b| ~ 6.4e3 fits
    assert torch.isfinite(layer(x)).all()


def test_fp32_input_overflowing_fp16_cast():
    layer = make_layer(torch.float16)
    x = torch.randn(2, K)
    x[0, 0] = 1e5
    with pytest.raises(ops.Fp16OverflowError, match=r"x: 1 float32 value\(s\) overflow torch.float16"):
        layer(x)


@pytest.mark.parametrize("chunk", [0, -1, 2.5, True, 262145])
def test_bad_chunk_tokens(chunk):
    with pytest.raises(ValueError, match=r"chunk_tokens: expected an int in \[1, 262144\]"):
        make_layer(chunk_tokens=chunk)


def test_checkpoint_key_errors():
    t = good_tensors()
    with pytest.raises(ValueError, match=r"tensors: missing \['weight_scale'\]"):
        W4A4FlatQuantLinear.from_checkpoint({k: v for k, v in t.items() if k != "weight_scale"})
    with pytest.raises(ValueError, match=r"tensors: unexpected keys \['smooth'\]"):
        W4A4FlatQuantLinear.from_checkpoint(with_(t, smooth=torch.ones(K)))


def test_other_bad_checkpoint_tensors():
    t = good_tensors()
    with pytest.raises(ValueError, match="weight_scale: expected finite values"):
        W4A4FlatQuantLinear.from_checkpoint(with_(t, weight_scale=torch.full((O, 1), float("inf"))))
    with pytest.raises(ValueError, match=r"bias: expected a float tensor \[24\]"):
        W4A4FlatQuantLinear.from_checkpoint(with_(t, bias=torch.zeros(O + 1)))
    with pytest.raises(ValueError, match="right_trans: expected dtype torch.bfloat16"):
        W4A4FlatQuantLinear.from_checkpoint(with_(t, right_trans=t["right_trans"].half()))
    with pytest.raises(ValueError, match="act_dtype: expected torch.float16 or torch.bfloat16"):
        W4A4FlatQuantLinear.from_checkpoint(t, act_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"weight_clip: expected 24 factors in \(0, 1\]"):
        make_layer(weight_clip=torch.full((O,), 1.5))


# ------------------------------------------------------------------ the weight quantizer
rows = st.integers(1, 4).flatmap(lambda o: st.integers(1, 40).flatmap(
    lambda k: hnp.arrays(np.float64, (o, k), elements=st.floats(-1e3, 1e3, allow_nan=False, width=64))))


@settings(max_examples=80, deadline=None)
@given(rows)
def test_quantize_dequantize_within_half_a_step(w):
    w = torch.from_numpy(w)
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (w.shape[0], 1)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    s64 = s.double()
    # Rows whose scale max|w| / 7 is a normal float32 (below ~1.2e-38 it loses precision or
    # underflows to 0, and such a row quantizes to zeros: checked below).
    normal = (s >= torch.finfo(torch.float32).tiny).squeeze(1)
    err = (w - q.double() * s64).abs()
    # rounding to nearest: at most half a step (plus float64 rounding of w / s)
    assert bool((err[normal] <= (s64 / 2 * (1 + 1e-12)).expand_as(w)[normal]).all())
    zero_scale = (s == 0).squeeze(1)
    assert bool((q[zero_scale] == 0).all())
    assert bool((w[zero_scale].abs() < 7 * 2.0**-149).all())
    assert bool(zero_scale[(w == 0).all(dim=1)].all())  # all-zero rows get scale 0


@settings(max_examples=40, deadline=None)
@given(rows, st.floats(0.3, 1.0))
def test_quantize_with_clip_saturates_only_beyond_the_range(w, clip):
    w = torch.from_numpy(w)
    q, s = quantize_weight(w, torch.full((w.shape[0],), clip))
    s64 = s.double()
    inside = (w.abs() <= 7 * s64) & (s >= torch.finfo(torch.float32).tiny)  # covered by a normal scale
    err = (w - q.double() * s64).abs()
    assert bool((err[inside] <= (s64 / 2 * (1 + 1e-12)).expand_as(w)[inside]).all())
    assert int(q.min()) >= -8 and int(q.max()) <= 7
