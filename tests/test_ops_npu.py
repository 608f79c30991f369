"""The npu backend, run against the torch_npu test double: the exact call sequence vllm-ascend makes."""

import pytest
import torch

from flatquant_lab import ops
from flatquant_lab.layers import W4A4FlatQuantLinear
from flatquant_lab.transforms import orthogonal_factor
from tiny_models import random_linear

K, O = 128, 24  # decompose_dim(128) = (8, 16)
N1, N2 = 8, 16




def _layers(dtype, chunk_tokens, bias=False):
    lin = random_linear(K, O, bias=bias, seed=7)
    # a non-symmetric left factor, so that passing L instead of L^T would be caught
    left = orthogonal_factor(N1, "random", seed=1) * torch.linspace(0.5, 1.5, N1, dtype=torch.float64)
    right = orthogonal_factor(N2, "hadamard")
    kw = dict(clip_ratio=0.9, act_dtype=dtype, chunk_tokens=chunk_tokens)
    npu = W4A4FlatQuantLinear.from_float(lin, left, right, backend="npu", **kw)
    ref = W4A4FlatQuantLinear.from_float(lin, left, right, backend="reference", **kw)
    return npu, ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_call_sequence_with_chunks(fake, dtype):
    layer, ref_layer = _layers(dtype, chunk_tokens=5)
    assert fake.calls == []  # loading packs with the reference, no device op
    x = torch.randn(3, 4, K).to(dtype)  # 12 tokens -> chunks of 5, 5, 2
    y = layer(x)

    assert fake.ops() == ["npu_kronecker_quant", "npu_quant_matmul"] * 3
    p1_want = layer.left_trans.t().contiguous()
    for i, (tokens, start) in enumerate([(5, 0), (5, 5), (2, 10)]):
        kq, mm = fake.calls[2 * i], fake.calls[2 * i + 1]
        xa = kq.tensors["x"]
        assert xa.shape == (tokens, N1, N2) and xa.dtype == dtype and xa.contiguous
        assert torch.equal(xa.value, x.reshape(-1, K)[start:start + tokens].view(-1, N1, N2))
        p1, p2 = kq.tensors["p1"], kq.tensors["p2"]
        assert p1.shape == (N1, N1) and p1.dtype == dtype and p1.contiguous
        assert torch.equal(p1.value, p1_want)  # the transposed left factor, contiguous
        assert not torch.equal(p1.value, layer.left_trans)
        assert p2.shape == (N2, N2) and p2.dtype == dtype and torch.equal(p2.value, layer.right_trans)
        # the checkpoint's float32 clip ratio, as a python float
        assert kq.scalars == {"clip_ratio": torch.tensor(0.9, dtype=torch.float32).item(), "dst_dtype": torch.int32}

        x1, x2 = mm.tensors["x1"], mm.tensors["x2"]
        assert x1.shape == (tokens, K // 8) and x1.dtype == torch.int32 and x1.contiguous
        # x2: the transposed view of the layer's contiguous [O, K/8] packed weight, not a copy
        assert x2.shape == (K // 8, O) and x2.dtype == torch.int32
        assert not x2.contiguous and x2.stride == (1, K // 8)
        assert x2.data_ptr == layer.weight_packed.data_ptr()
        assert layer.weight_packed.is_contiguous()
        scale, pts = mm.tensors["scale"], mm.tensors["pertoken_scale"]
        assert scale.shape == (O,) and scale.dtype == torch.float32
        assert torch.equal(scale.value, layer.weight_scale.view(-1))
        assert pts.shape == (tokens,) and pts.dtype == torch.float32
        assert mm.tensors["offset"] is None and mm.tensors["bias"] is None
        assert mm.scalars == {"output_dtype": dtype}

    # the results are those of the reference backend, bit for bit
    y_ref = ref_layer(x)
    assert y.dtype == dtype and y.shape == (3, 4, O)
    assert torch.equal(y, y_ref)


def test_one_chunk_when_tokens_fit(fake):
    layer, _ = _layers(torch.bfloat16, chunk_tokens=12)
    layer(torch.randn(12, K).bfloat16())
    assert fake.ops() == ["npu_kronecker_quant", "npu_quant_matmul"]
    assert fake.calls[0].tensors["x"].shape == (12, N1, N2)


def test_bias_is_added_after_the_matmul_in_the_output_dtype(fake):
    layer, ref_layer = _layers(torch.float16, chunk_tokens=8192, bias=True)
    x = torch.randn(6, K).half()
    y = layer(x)
    assert fake.calls[1].tensors["bias"] is None  # vllm-ascend adds it in the output dtype itself
    assert torch.equal(y, ref_layer(x))
    no_bias = W4A4FlatQuantLinear.from_checkpoint(
        {k: v for k, v in layer.checkpoint_tensors().items() if k != "bias"}, backend="reference")
    assert torch.equal(y, no_bias(x) + layer.bias)


def test_fp32_input_is_cast_before_the_op(fake):
    layer, ref_layer = _layers(torch.bfloat16, chunk_tokens=8192)
    x = torch.randn(4, K)
    y = layer(x)
    assert y.dtype == torch.float32
    assert fake.calls[0].tensors["x"].dtype == torch.bfloat16
    assert torch.equal(y, ref_layer(x))


def test_env_selects_the_double(fake, monkeypatch):
    monkeypatch.setenv("FLATQUANT_BACKEND", "npu")
    layer, ref_layer = _layers(torch.bfloat16, chunk_tokens=8192)
    layer.backend = None  # from the environment
    x = torch.randn(3, K).bfloat16()
    assert torch.equal(layer(x), ref_layer(x))
    assert fake.ops() == ["npu_kronecker_quant", "npu_quant_matmul"]


def test_ops_entry_points_route_to_the_double(fake):
    w = torch.randint(-8, 8, (4, 16), dtype=torch.int32)
    packed = ops.convert_weight_to_int4pack(w, backend="npu")
    x = torch.randn(2, 16).bfloat16()
    ops.dynamic_quant(x, backend="npu")
    assert fake.ops() == ["npu_convert_weight_to_int4pack", "npu_dynamic_quant"]
    assert torch.equal(packed, ops.convert_weight_to_int4pack(w, backend="reference"))


def test_validation_happens_before_the_device_call(fake):
    layer, _ = _layers(torch.bfloat16, chunk_tokens=8192)
    x = torch.randn(2, K).bfloat16()
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="x: expected finite activations"):
        layer(x)
    with pytest.raises(ValueError, match="clip_ratio"):
        ops.kronecker_quant(torch.zeros(1, 2, 8, dtype=torch.float16), torch.eye(2).half(), torch.eye(8).half(),
                            clip_ratio=1.5, backend="npu")
    assert fake.calls == []
