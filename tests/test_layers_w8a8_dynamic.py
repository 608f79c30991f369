"""W8A8DynamicLinear (docs/ascend-ops.md, 'W8A8_DYNAMIC layers'): built from checkpoint tensors, the scale
rounded as vllm-ascend
rounds it on load, RTN / GPTQ weights, and the npu call sequence against the torch_npu double."""
from functools import partial

import pytest
import torch

from flatquant_lab import ops
from flatquant_lab.calibrate import w8a8_dynamic_layer
from flatquant_lab.gptq import HessianAccumulator
from flatquant_lab.layers import W8A8DynamicLinear
from tiny_models import random_linear

K, O = 64, 24


def _tensors(bias=False):
    return {
        "weight": torch.tensor([[1, -2], [127, 0]], dtype=torch.int8),
        "weight_scale": torch.tensor([[0.3], [0.001]], dtype=torch.float32),
        "weight_offset": torch.zeros(2, 1),
        **({"bias": torch.tensor([0.1, -0.25])} if bias else {}),
    }


_linear = partial(random_linear, K, O)


# ------------------------------------------------------------------ hand-worked golden
def test_golden_forward_with_the_scale_rounded_to_bf16():
    # x = [254, 1] (bf16): dynamic quant mult = 127 / 254 = 0.5, q = [127, 0] (0.5 -> 0, half to even), s_tok = 2
    # acc = q @ W^T = [127 * 1 + 0 * -2, 127 * 127] = [127, 16129]
    # the fp32 scales round to bf16 on load: 0.3 -> 0.30078125, 0.001 -> 0.00099945068359375 (131/128 * 2^-10)
    # y0 = 127 * 0.30078125 * 2 = 76.3984375 -> bf16 (step 0.5 in [64, 128)) 76.5; with the fp32 scale: 76.2 -> 76.0
    # y1 = 16129 * 131/65536 = 32.2402801... -> bf16 (step 0.25 in [32, 64)) 32.25
    layer = W8A8DynamicLinear.from_checkpoint(_tensors(), act_dtype=torch.bfloat16, backend="reference")
    assert layer.scale.dtype == torch.bfloat16 and layer.scale.tolist() == [0.30078125, 0.00099945068359375]
    y = layer(torch.tensor([[254.0, 1.0]], dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.tolist() == [[76.5, 32.25]]
    # the checkpoint's float32 scale itself is kept, so a round trip is exact
    assert torch.equal(layer.checkpoint_tensors()["weight_scale"], _tensors()["weight_scale"])


def test_fp16_model_rounds_the_scale_to_fp16_and_passes_it_in_float32():
    layer = W8A8DynamicLinear.from_checkpoint(_tensors(), act_dtype=torch.float16, backend="reference")
    want = torch.tensor([0.3, 0.001]).half().float()
    assert layer.scale.dtype == torch.float32 and torch.equal(layer.scale, want)
    assert not torch.equal(want, torch.tensor([0.3, 0.001]))  # the rounding is visible


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_is_the_op_composition(dtype):
    lin = _linear()
    layer = W8A8DynamicLinear.from_float(lin, act_dtype=dtype, backend="reference")
    x = torch.randn(3, 5, K).to(dtype)
    q, s = ops.dynamic_quant(x.reshape(-1, K), backend="reference")
    acc = q.long() @ layer.weight_int.long().T
    want = ((acc.float() * layer.weight_scale.view(-1).to(dtype).float()) * s[:, None] + layer.bias.float()).to(dtype)
    assert torch.equal(layer(x).reshape(-1, O), want)
    # the bias was rounded to the model dtype, as vllm-ascend allocates it
    assert layer.bias.dtype == dtype and torch.equal(layer.bias, lin.bias.detach().to(dtype))


def test_rtn_codes_are_taken_against_the_rounded_scale():
    lin = _linear(bias=False)
    layer = W8A8DynamicLinear.from_float(lin, act_dtype=torch.bfloat16)
    w = lin.weight.detach().double()
    scale = (w.abs().amax(1, keepdim=True) / 127).float().bfloat16().double()
    assert torch.equal(layer.weight_scale.double(), scale)  # stored scale = the bf16-rounded one
    want = torch.round(w / scale).clamp(-128, 127).to(torch.int8)
    assert torch.equal(layer.weight_int, want)
    assert (layer.dequantized_weight(torch.float64) - w).abs().max() <= scale.max() * 0.5 + 1e-12


def test_float32_input_and_dtype_casts():
    layer = W8A8DynamicLinear.from_float(_linear(), act_dtype=torch.bfloat16, backend="reference")
    x = torch.randn(4, K)
    y = layer(x)
    assert y.dtype == torch.float32 and torch.equal(y, layer(x.bfloat16()).float())
    layer.half()
    assert layer.act_dtype == torch.float16 and layer.weight_scale.dtype == torch.float32
    assert torch.equal(layer.scale, layer.weight_scale.view(-1).half().float())
    assert layer.bias.dtype == torch.float16
    layer.float()  # a float32 model cast keeps the model dtype the layer computes in
    assert layer.act_dtype == torch.float16 and layer.weight_int.dtype == torch.int8
    with pytest.raises(ValueError, match="x: expected torch.float16"):
        layer(torch.randn(2, K).bfloat16())


def test_gptq_weights_beat_rtn_on_correlated_inputs():
    g = torch.Generator().manual_seed(3)
    lin = _linear(bias=False, seed=4)
    mix = torch.randn(K, K, generator=g) * 0.3 + torch.eye(K)
    x = torch.randn(512, K, generator=g) @ mix
    acc = HessianAccumulator(K)
    acc.add(x)
    rtn = w8a8_dynamic_layer(lin, weights="rtn", act_dtype=torch.bfloat16)
    gptq = w8a8_dynamic_layer(lin, weights="gptq", hessian=acc.h, act_dtype=torch.bfloat16,
                              gptq_block=16)
    ref = x.double() @ lin.weight.detach().double().T
    err = {n: float(((x.double() @ m.dequantized_weight(torch.float64).T - ref) ** 2).sum()) for n, m in
           (("rtn", rtn), ("gptq", gptq))}
    assert err["gptq"] < 0.9 * err["rtn"], err
    assert torch.equal(gptq.weight_scale, rtn.weight_scale)  # same scales; GPTQ moves the codes


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"tensors: missing \['weight_offset'\]"):
        W8A8DynamicLinear.from_checkpoint({k: v for k, v in _tensors().items() if k != "weight_offset"})
    with pytest.raises(ValueError, match=r"tensors: unexpected keys \['deq_scale'\].*static W8A8"):
        W8A8DynamicLinear.from_checkpoint({**_tensors(), "deq_scale": torch.ones(2)})
    with pytest.raises(ValueError, match="weight: expected dtype int8, got int32"):
        W8A8DynamicLinear.from_checkpoint({**_tensors(), "weight": torch.zeros(2, 2, dtype=torch.int32)})
    with pytest.raises(ValueError, match=r"weight_scale: expected shape \[2, 1\], got \[2\]"):
        W8A8DynamicLinear.from_checkpoint({**_tensors(), "weight_scale": torch.ones(2)})
    with pytest.raises(ValueError, match="weight_scale: expected finite values"):
        W8A8DynamicLinear.from_checkpoint({**_tensors(), "weight_scale": torch.tensor([[1.0], [float("inf")]])})
    with pytest.raises(ValueError, match=r"bias: expected shape \[2\]"):
        W8A8DynamicLinear.from_checkpoint({**_tensors(), "bias": torch.ones(3)})
    with pytest.raises(ValueError, match="act_dtype: expected torch.float16 or torch.bfloat16"):
        W8A8DynamicLinear.from_checkpoint(_tensors(), act_dtype=torch.float32)
    with pytest.raises(ValueError, match="weights: expected one of"):
        w8a8_dynamic_layer(_linear(), weights="awq")
    with pytest.raises(ValueError, match=r"hessian: weights='gptq' needs H"):
        w8a8_dynamic_layer(_linear(), weights="gptq")
    layer = W8A8DynamicLinear.from_checkpoint(_tensors(), backend="reference")
    with pytest.raises(ValueError, match=r"x: expected last dim 2"):
        layer(torch.zeros(1, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="x: expected finite activations"):
        layer(torch.tensor([[float("nan"), 1.0]], dtype=torch.bfloat16))


# ------------------------------------------------------------------ the npu backend's calls


def test_npu_call_sequence_as_vllm_ascend(fake):
    lin = _linear()
    npu = W8A8DynamicLinear.from_float(lin, act_dtype=torch.bfloat16, backend="npu")
    ref = W8A8DynamicLinear.from_float(lin, act_dtype=torch.bfloat16, backend="reference")
    assert fake.calls == []
    x = torch.randn(2, 3, K).bfloat16()
    y = npu(x)
    assert fake.ops() == ["npu_dynamic_quant", "npu_quant_matmul"]
    dq, mm = fake.calls
    assert dq.tensors["x"].shape == (6, K) and dq.tensors["x"].dtype == torch.bfloat16
    assert dq.scalars["dst_type"] == torch.int8 and dq.tensors["smooth_scales"] is None
    x1, x2 = mm.tensors["x1"], mm.tensors["x2"]
    assert x1.dtype == torch.int8 and x1.shape == (6, K)
    # the weight transposed to [K, O], contiguous; the scale flattened in the model dtype; the bias into the op
    assert x2.shape == (K, O) and x2.contiguous and torch.equal(x2.value, npu.weight_int.t())
    assert mm.tensors["scale"].dtype == torch.bfloat16 and mm.tensors["scale"].shape == (O,)
    assert mm.tensors["pertoken_scale"].dtype == torch.float32 and mm.tensors["pertoken_scale"].shape == (6,)
    assert torch.equal(mm.tensors["bias"].value, npu.bias) and mm.scalars["output_dtype"] == torch.bfloat16
    assert torch.equal(y, ref(x))
