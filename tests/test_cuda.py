"""On a CUDA device: layer-wise calibration from the host, offload bit-exact, reference ops bit-exact
(TF32 on or off), no float64 on the device. Skipped where ``torch.cuda.is_available()`` is False."""
from __future__ import annotations

import copy

import pytest
import torch

from flatquant_lab.api import quantize
from flatquant_lab.gptq import HessianAccumulator, gptq_quantize
from flatquant_lab.kronecker import FOLD_FP32_RTOL, fold_weight
from flatquant_lab.layers import W4A4FlatQuantLinear
from flatquant_lab.ops import reference
from flatquant_lab.quantizers import quantize_weight
from flatquant_lab.recipe import QuantConfig
from flatquant_lab.transforms import orthogonal_factor
from test_devices import BUDGET, trapped
from tiny_models import CALIB, state, tiny_model
from tiny_models import assert_same_state as assert_same

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def deterministic_attention():
    """The math SDPA kernel: the fused ones accumulate gradients in a run-dependent order."""
    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled())
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    yield
    torch.backends.cuda.enable_flash_sdp(flags[0])
    torch.backends.cuda.enable_mem_efficient_sdp(flags[1])


@pytest.fixture
def tf32():
    """What a user enabling TF32 does; the reference ops must not care."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before)


def devices_of(model) -> set[str]:
    return {t.device.type for t in model.state_dict().values()}


@pytest.mark.parametrize("wq", ["rtn", "gptq"])
def test_a_host_model_is_calibrated_layer_by_layer_on_cuda(wq):
    model = tiny_model("qwen2")
    cpu = quantize(copy.deepcopy(model), QuantConfig(**{**BUDGET, "weight_quantizer": wq}), CALIB)
    got = quantize(model, QuantConfig(**{**BUDGET, "weight_quantizer": wq}), CALIB, device="cuda")
    assert devices_of(got) == {"cpu"}  # the model stays where it was loaded
    place = got.flatquant_report["placement"]
    assert place["device"] == "cuda" and place["model_device"] == "cpu"
    assert all(e["peak_cuda_bytes"] > 0 for e in got.flatquant_report["layers"])
    for a, b in zip(got.flatquant_report["layers"], cpu.flatquant_report["layers"]):
        assert a["fake_quant_mse"] < 1.5 * b["fake_quant_mse"] + 1e-6
    ids = CALIB[:2]
    with torch.no_grad():
        ref, out = cpu(input_ids=ids).logits.double(), got(input_ids=ids).logits.double()
    assert torch.isfinite(out).all() and float((out - ref).norm() / ref.norm()) < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_on_the_host_or_on_cuda_give_the_same_model(dtype):
    model = tiny_model("llama").to(dtype)
    runs = [quantize(copy.deepcopy(model), QuantConfig(**{**BUDGET, "weight_quantizer": "gptq"}, activations=a), CALIB,
                     device="cuda") for a in ("device", "host")]
    assert [r.flatquant_report["placement"]["activations"] for r in runs] == ["device", "host"]
    assert_same(state(runs[0]), state(runs[1]))


def test_a_cuda_model_is_calibrated_where_it_is():
    model = tiny_model("llama").cuda()
    got = quantize(model, QuantConfig(**BUDGET), CALIB)
    assert devices_of(got) == {"cuda"} and got.flatquant_report["placement"]["device"].startswith("cuda")


def test_calibration_on_cuda_creates_every_tensor_on_a_device():
    model = tiny_model("qwen3")
    got = trapped(lambda: quantize(model, QuantConfig(**{**BUDGET, "weight_quantizer": "gptq"}), CALIB, device="cuda"))
    assert devices_of(got) == {"cpu"}


def test_no_float64_on_cuda(monkeypatch):
    """Every float64 tensor of a calibration on CUDA is on the CPU."""
    seen = []
    real = torch.Tensor.to

    def spy(self, *a, **k):
        out = real(self, *a, **k)
        if out.dtype == torch.float64 and out.device.type == "cuda":
            seen.append(out.shape)
        return out

    monkeypatch.setattr(torch.Tensor, "to", spy)
    acc = HessianAccumulator(64)
    acc.add(torch.randn(10, 64, device="cuda"))
    assert acc.h.dtype == torch.float32 and acc.h.device.type == "cuda"
    quantize(tiny_model("llama"), QuantConfig(**{**BUDGET, "weight_quantizer": "gptq"}), CALIB, device="cuda")
    assert not seen


@pytest.mark.usefixtures("tf32")
def test_reference_ops_are_bit_exact_on_cuda():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(300, 64, 128, generator=g) * 3).bfloat16()
    p1 = orthogonal_factor(64, "random", 1).bfloat16()
    p2 = orthogonal_factor(128, "random", 2).bfloat16()
    q_cpu, s_cpu = reference.kronecker_quant(x, p1, p2, 0.9)
    q_gpu, s_gpu = reference.kronecker_quant(x.cuda(), p1.cuda(), p2.cuda(), 0.9)
    assert torch.equal(q_gpu.cpu(), q_cpu) and torch.equal(s_gpu.cpu(), s_cpu)
    w = torch.randint(-8, 8, (96, 64 * 128), generator=g, dtype=torch.int32)
    wp = reference.convert_weight_to_int4pack(w)
    scale = torch.rand(96, generator=g)
    y_cpu = reference.quant_matmul(q_cpu.view(300, -1), wp.t(), scale, pertoken_scale=s_cpu,
                                   output_dtype=torch.bfloat16)
    y_gpu = reference.quant_matmul(q_gpu.view(300, -1), wp.cuda().t(), scale.cuda(), pertoken_scale=s_gpu,
                                   output_dtype=torch.bfloat16)
    assert torch.equal(y_gpu.cpu(), y_cpu)
    assert torch.get_float32_matmul_precision() == "high"  # restored


@pytest.mark.usefixtures("tf32")
def test_a_w4a4_layer_computes_the_same_on_cuda_and_cpu():
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(1024, 256, bias=True)
    layer = W4A4FlatQuantLinear.from_float(lin, orthogonal_factor(32, "random", 3), orthogonal_factor(32, "random", 4),
                                           clip_ratio=0.9, act_dtype=torch.bfloat16, backend="reference")
    x = torch.randn(5, 7, 1024, generator=g).bfloat16()
    ref = layer(x)
    got = copy.deepcopy(layer).cuda()(x.cuda())
    assert torch.equal(got.cpu(), ref)


def test_fold_and_gptq_on_cuda_stay_close_to_float64():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(384, 64 * 172, generator=g)
    lt, rt = orthogonal_factor(64, "random", 5).bfloat16(), orthogonal_factor(172, "random", 6).bfloat16()
    ref = fold_weight(w.double(), lt, rt)
    got = fold_weight(w.cuda(), lt.cuda(), rt.cuda())
    assert got.dtype == torch.float32 and got.device.type == "cuda"
    err = (got.cpu().double() - ref).abs().amax(1) / ref.abs().amax(1)
    assert float(err.max()) <= FOLD_FP32_RTOL
    x = torch.randn(4096, 512, generator=g) @ torch.randn(512, 512, generator=g)
    wq = torch.randn(128, 512, generator=g)
    _, scale = quantize_weight(wq)
    acc_cpu, acc_gpu = HessianAccumulator(512), HessianAccumulator(512)
    acc_cpu.add(x)
    acc_gpu.add(x.cuda())
    q_cpu = gptq_quantize(wq.double(), acc_cpu.h, scale, block=64)
    q_gpu = gptq_quantize(wq.cuda(), acc_gpu.h, scale.cuda(), block=64)
    assert q_gpu.device.type == "cuda"
    assert float((q_gpu.cpu() != q_cpu).float().mean()) < 0.01


def test_load_quantized_puts_every_tensor_on_cuda(tmp_path):
    from flatquant_lab.io import load_quantized, save_quantized

    model = quantize(tiny_model("qwen2"), QuantConfig(method="rtn", weight_quantizer="rtn"))
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q", device="cuda")
    assert devices_of(loaded) == {"cuda"} and {b.device.type for b in loaded.buffers()} == {"cuda"}
    with torch.no_grad():
        got = loaded(input_ids=CALIB[:2].cuda()).logits.cpu()
        ref = model(input_ids=CALIB[:2]).logits
    assert float((got - ref).norm() / ref.norm()) < 1e-3


def test_the_end_to_end_stage_runs_on_cuda_and_the_model_comes_home():
    """A host model calibrated on CUDA with the end-to-end stage: the whole model goes to the device for the
    stage and back; its KL falls and its logits stay near the CPU run's."""
    model = tiny_model("qwen2")
    cfg = QuantConfig(**{**BUDGET, "profile": "fast", "weight_quantizer": "gptq"}, e2e_epochs=2, recipe="msmodelslim")
    cpu = quantize(copy.deepcopy(model), cfg, CALIB)
    got = quantize(model, cfg, CALIB, device="cuda")
    assert devices_of(got) == {"cpu"}
    kl = got.flatquant_report["e2e"]["kl"]
    assert len(kl) == 2 and all(torch.isfinite(torch.tensor(kl)))
    ids = CALIB[:2]
    with torch.no_grad():
        ref, out = cpu(input_ids=ids).logits.double(), got(input_ids=ids).logits.double()
    assert torch.isfinite(out).all() and float((out - ref).norm() / ref.norm()) < 0.1
