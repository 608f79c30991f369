"""Device placement on the CPU: no tensor created without a device, offload bit-exact, no float64 where
an accelerator would run, the fold's float32 error bounded. (tests/test_cuda.py runs the same on CUDA.)"""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import flatquant_lab
from flatquant_lab.api import quantize
from flatquant_lab.calibrate import HeldActivations, choose_activations
from flatquant_lab.devices import exact_dtype, require_available
from flatquant_lab.kronecker import FOLD_FP32_RTOL, fold_weight
from flatquant_lab.quantizers import quantize_weight
from flatquant_lab.recipe import QuantConfig
from flatquant_lab.transforms import orthogonal_factor
from tiny_models import CALIB, state, tiny_model, write_tiny_model_dir
from tiny_models import assert_same_state as assert_same

BUDGET = dict(profile="paper", weight_quantizer="rtn", samples=8, seqlen=32, epochs=1, batch_size=4)
PACKAGE = os.path.dirname(flatquant_lab.__file__)
FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.eye, torch.arange, torch.tensor, torch.linspace,
             torch.randn, torch.rand, torch.randint, torch.randperm, torch.as_tensor, torch.logspace}


class FactoryTrap(TorchFunctionMode):
    """Fails on a factory call without ``device=`` made from flatquant_lab's own code (transformers'
    code is not ours to fix); runs under ``torch.set_default_device("meta")``, so one that slipped
    past would make meta tensors and fail at the first value read."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE) and not (func is torch.as_tensor and isinstance(args[0], torch.Tensor)):
                raise AssertionError(f"{func.__name__} without device= at {caller}:{sys._getframe(1).f_lineno}")
        return func(*args, **kwargs)


def trapped(fn):
    torch.set_default_device("meta")
    try:
        with FactoryTrap():
            return fn()
    finally:
        torch.set_default_device(None)


# ================================================================================= factory calls
def test_the_trap_catches_a_factory_call_without_device():
    code = compile("torch.zeros(3)", os.path.join(PACKAGE, "calibrate", "x.py"), "exec")
    with pytest.raises(AssertionError, match="zeros without device="):
        trapped(lambda: exec(code, {"torch": torch}))
    # ... and the meta default alone turns one into a tensor without data
    torch.set_default_device("meta")
    try:
        assert torch.zeros(3).is_meta
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize("mt", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("kw", [dict(weight_quantizer="gptq"), dict(method="hadamard", epochs=None),
                                dict(weight_quantizer="rtn", smooth=False),
                                dict(profile="fast", e2e_epochs=1, recipe="msmodelslim")])  # + the end-to-end stage
def test_a_whole_calibration_creates_every_tensor_on_a_device(mt, kw, tmp_path):
    """calibrate/, gptq.py, layers/ under the trap: a whole run, with a work dir, gives the model of a
    run without the trap, bit for bit."""
    model = tiny_model(mt)
    ids = None if kw.get("method") == "hadamard" else CALIB
    ref = quantize(copy.deepcopy(model), QuantConfig(**{**BUDGET, **kw}), ids)
    cfg = QuantConfig(**{**BUDGET, **kw}, work_dir=str(tmp_path / "w"))
    got = trapped(lambda: quantize(model, cfg, ids))
    assert_same(state(got), state(ref))
    assert all(not t.is_meta for t in got.state_dict().values())


# ================================================================================= offload
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wq", ["rtn", "gptq"])
def test_activations_on_the_host_or_the_device_give_the_same_model(dtype, wq):
    model = tiny_model("llama").to(dtype)
    runs = {}
    for where in ("device", "host", "auto"):
        m = quantize(copy.deepcopy(model), QuantConfig(**{**BUDGET, "weight_quantizer": wq}, activations=where), CALIB)
        runs[where] = (state(m), m.flatquant_report)
    assert runs["host"][1]["placement"]["activations"] == "host"
    assert runs["device"][1]["placement"]["activations"] == "device"
    assert runs["auto"][1]["placement"]["activations"] == "device"  # host and device are one on the CPU
    for where in ("host", "auto"):
        assert_same(runs[where][0], runs["device"][0])
        assert [e["epoch_losses"] for e in runs[where][1]["layers"]] == \
               [e["epoch_losses"] for e in runs["device"][1]["layers"]]
    # held in the model's dtype: 3 buffers of 8 x 32 x 64 (float inputs, targets, quantized inputs)
    place = runs["host"][1]["placement"]
    assert QuantConfig().train_inputs == "quantized"
    assert place["activation_bytes"] == 3 * 8 * 32 * 64 * (4 if dtype == torch.float32 else 2)
    assert place["activation_dtype"] == str(dtype).replace("torch.", "")


def test_held_activations_come_back_in_float32_and_are_written_in_their_dtype():
    held = HeldActivations((3, 2, 4), torch.bfloat16, torch.device("cpu"), on_host=True)
    y = torch.randn(2, 2, 4, generator=torch.Generator().manual_seed(0))
    held.write(1, y)
    got = held[1:3]
    assert got.dtype == torch.float32 and torch.equal(got, y.bfloat16().float())
    got.add_(1.0)  # a batch handed out is a copy: training cannot write into the held inputs
    assert torch.equal(held[1:3], y.bfloat16().float())


@pytest.mark.parametrize("train_inputs, buffers", [("float", 2), ("quantized", 3)])
def test_the_next_layer_reuses_the_buffers(train_inputs, buffers, monkeypatch):
    """Two activation buffers for the whole run (three with the quantized model's inputs), whatever the
    number of layers: the next layer's inputs reuse them in place."""
    made = []
    real = HeldActivations.__init__

    def spy(self, *a, **k):
        made.append(a[0])
        real(self, *a, **k)

    monkeypatch.setattr(HeldActivations, "__init__", spy)
    quantize(tiny_model("qwen2"), QuantConfig(**BUDGET, train_inputs=train_inputs), CALIB)
    assert made == [(8, 32, 64)] * buffers


def test_auto_keeps_activations_on_the_device_only_when_they_fit(monkeypatch):
    import flatquant_lab.calibrate.capture as capture

    cuda = torch.device("cuda")
    monkeypatch.setattr(capture, "free_memory", lambda dev: 10 * 2**30)
    assert choose_activations("auto", 3 * 2**30, cuda) is False
    assert choose_activations("auto", 5 * 2**30, cuda) is True
    assert choose_activations("device", 50 * 2**30, cuda) is False
    assert choose_activations("host", 1, cuda) is True


# ================================================================================= placement settings
@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:1", "npu", "npu:0", " CUDA:0 "])
def test_device_names_are_accepted(name):
    assert QuantConfig(device=name).device == name.strip().lower()


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cpu:0", "cuda:x", "meta", "", 3])
def test_bad_device_names_are_refused(bad):
    with pytest.raises(ValueError, match="device: expected 'cpu', 'cuda', 'cuda:N', 'npu' or 'npu:N'"):
        QuantConfig(device=bad)
    with pytest.raises(ValueError, match="device: expected"):
        quantize(tiny_model("llama"), QuantConfig(**BUDGET), CALIB, device=bad)


def test_bad_activations_setting_is_refused():
    with pytest.raises(ValueError, match="activations: expected one of"):
        QuantConfig(activations="disk")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_a_missing_device_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"device: 'cuda' requested, but torch.cuda.is_available\(\)"):
        quantize(tiny_model("llama"), QuantConfig(**BUDGET), CALIB, device="cuda")
    with pytest.raises(RuntimeError, match=r"device: 'npu:0' requested, but torch.npu.is_available\(\) .*torch_npu"):
        require_available("npu:0")


def test_device_does_not_change_the_fingerprint():
    """A run may resume on another device: the work dir does not refuse it."""
    assert QuantConfig(device="cuda", activations="host").fingerprint() == QuantConfig().fingerprint()


def test_cpu_device_is_the_default_on_a_cpu_model():
    a = quantize(tiny_model("qwen3"), QuantConfig(**BUDGET), CALIB)
    b = quantize(tiny_model("qwen3"), QuantConfig(**BUDGET), CALIB, device="cpu")
    assert_same(state(a), state(b))
    assert b.flatquant_config.device == "cpu" and b.flatquant_report["placement"]["device"] == "cpu"
    assert a.flatquant_report["placement"]["model_device"] == "cpu"
    assert any(k.startswith("peak_host") for k in a.flatquant_report["layers"][0])


# ================================================================================= float64
def test_exact_dtype_is_float64_only_on_the_cpu():
    assert exact_dtype(torch.device("cpu")) == torch.float64
    assert exact_dtype(torch.device("cuda")) == torch.float32
    assert exact_dtype("npu:0") == torch.float32


@pytest.mark.parametrize("size", [(256, 64 * 64), (384, 64 * 172), (128, 86 * 128)])
def test_fold_in_float32_stays_within_its_stated_bound(size):
    """An accelerator folds in float32 (inverse in float64 on the CPU): per row, the error against the
    float64 fold is at most FOLD_FP32_RTOL x the row's max, and few int4 codes move."""
    o, k = size
    n1, n2 = {64 * 64: (64, 64), 64 * 172: (64, 172), 86 * 128: (86, 128)}[k]
    g = torch.Generator().manual_seed(k)
    w = torch.randn(o, k, generator=g) * torch.rand(1, k, generator=g).add(0.05)
    # learned factors: near-orthogonal with a spread of singular values, rounded to bf16
    lt = (orthogonal_factor(n1, "random", 1) @ torch.diag(torch.rand(n1, generator=g, dtype=torch.float64) + 0.5))
    rt = (orthogonal_factor(n2, "random", 2) @ torch.diag(torch.rand(n2, generator=g, dtype=torch.float64) + 0.5))
    lt, rt = lt.bfloat16(), rt.bfloat16()
    ref = fold_weight(w.double(), lt, rt)
    got = fold_weight(w.float(), lt, rt, dtype=torch.float32)
    assert got.dtype == torch.float32 and ref.dtype == torch.float64
    err = (got.double() - ref).abs().amax(1) / ref.abs().amax(1)
    assert float(err.max()) <= FOLD_FP32_RTOL, float(err.max())
    assert float(err.max()) > 0  # a float32 fold is not float64: the bound is what is tested
    q64, _ = quantize_weight(ref)
    q32, _ = quantize_weight(got.double())
    assert float((q64 != q32).float().mean()) < 1e-3


# ================================================================================= reference ops
def test_reference_ops_force_ieee_fp32_matmuls_and_restore_the_setting():
    from flatquant_lab.ops import reference

    seen = []
    real = torch.matmul

    def spy(*a, **k):
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision))
        return real(*a, **k)

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # what a user enabling TF32 does
    try:
        x = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
        p1, p2 = torch.eye(8, dtype=torch.bfloat16), torch.eye(16, dtype=torch.bfloat16)
        torch.matmul = spy
        try:
            reference.kronecker_quant(x, p1, p2)
        finally:
            torch.matmul = real
        assert seen and all(s == ("highest", "ieee") for s in seen)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


# ================================================================================= command line
def test_quantize_cli_loads_in_its_dtype_and_calibrates_on_its_device(tmp_path, capsys):
    from flatquant_lab.cli import main
    from flatquant_lab.io import load_quantized

    src = tmp_path / "tiny"
    write_tiny_model_dir(src, tiny_model("llama"))
    with pytest.raises(SystemExit):
        main(["quantize", "--model", str(src), "--method", "rtn", "--weight-quantizer", "rtn",
              "--out", str(tmp_path / "x"), "--device", "gpu"])
    assert "--device: expected cpu, cuda, cuda:N, npu or npu:N, got 'gpu'" in capsys.readouterr().err
    out = tmp_path / "rtn"
    assert main(["quantize", "--model", str(src), "--method", "rtn", "--weight-quantizer", "rtn", "--out", str(out),
                 "--dtype", "bfloat16",
                 "--device", "cpu"]) == 0
    loaded = load_quantized(out)
    floats = {t.dtype for k, t in loaded.state_dict().items() if t.is_floating_point() and "weight_scale" not in k
              and "weight_offset" not in k and "clip_ratio" not in k}
    assert floats == {torch.bfloat16}


# ================================================================================= loading
def test_load_quantized_fills_a_meta_model_without_copying_the_tensors(tmp_path, monkeypatch):
    """Built on the meta device, filled with the tensors read from the files: the loaded float weights
    are those very tensors (one host copy of the checkpoint), and the model computes what was saved."""
    import flatquant_lab.io.load as load
    from flatquant_lab.io import load_quantized, save_quantized

    model = quantize(tiny_model("qwen2"), QuantConfig(method="rtn", weight_quantizer="rtn"))
    save_quantized(model, tmp_path / "q")
    read = {}
    real = load.read_tensors

    def spy(path):
        out = real(path)
        read.update(out)
        return out

    monkeypatch.setattr(load, "read_tensors", spy)
    loaded = load_quantized(tmp_path / "q", device="cpu")
    from flatquant_lab.layers import W4A4FlatQuantLinear

    int4 = {n for n, m in loaded.named_modules() if isinstance(m, W4A4FlatQuantLinear)}
    plain = [k for k, t in loaded.state_dict().items()
             if k in read and t.is_floating_point() and k.rpartition(".")[0] not in int4]
    assert "model.embed_tokens.weight" in plain and "model.norm.weight" in plain
    for k in plain:
        assert loaded.state_dict()[k].data_ptr() == read[k].data_ptr(), k
    assert not any(t.is_meta for t in loaded.state_dict().values())
    assert not any(b.is_meta for b in loaded.buffers())
    ids = CALIB[:2]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="device: expected"):
        load_quantized(tmp_path / "q", device="tpu")


# ================================================================================= training memory
def _saved_bytes(o: int, k: int, tokens: int, dtype=torch.float32) -> tuple[int, int]:
    """Bytes autograd keeps for one fake-quant linear [o, k] (weight in ``dtype``) on ``tokens`` inputs
    (its weight not counted: the layer holds it anyway), and the bytes of one token-sized float32 tensor."""
    from flatquant_lab.calibrate import FakeQuantLinear, KronTransform, plan_layer

    model = tiny_model("llama")
    g = plan_layer(model, 0, QuantConfig())[0]
    g.size, g.n1, g.n2, g.kv_tied, g.smooth_target = k, 16, k // 16, None, "input_layernorm"
    tr = KronTransform(g, orthogonal_factor(16, "random", 1), orthogonal_factor(k // 16, "random", 2),
                       torch.zeros(k), torch.tensor([3.0]), torch.bfloat16)
    lin = torch.nn.Linear(k, o, bias=False).to(dtype)
    fq = FakeQuantLinear(lin, tr, torch.full((o,), 3.0))
    for p in (tr.left, tr.right, tr.log_smooth, tr.act_clip, fq.weight_clip):
        p.requires_grad_(True)
    lin.weight.requires_grad_(False)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(1, tokens, k, generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fq(x)
    saved.pop(lin.weight.data_ptr(), None)
    y.square().sum().backward()
    assert tr.left.grad is not None and fq.weight_clip.grad is not None and tr.act_clip.grad is not None
    return sum(saved.values()), tokens * k * 4


def test_a_training_step_keeps_two_token_sized_tensors_per_transform():
    """The transform and the activation rounding are recomputed in the backward pass: autograd keeps
    the input and the quantized input, not the five intermediates between them."""
    kept, token_bytes = _saved_bytes(o=16, k=512, tokens=512)
    assert kept <= 2.2 * token_bytes, kept / token_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_training_step_keeps_an_int8_weight_per_linear(dtype):
    """The fold and the weight rounding are recomputed in the backward pass, and the quantized weight is
    kept as int8 codes: what autograd keeps of a fake-quant linear is O x K bytes plus token-sized
    tensors, not the float32 weight (4 O K) nor the fold's half-dozen weight-sized intermediates
    (which, for a 7B layer, are GiBs)."""
    o, k = 512, 512
    kept, token_bytes = _saved_bytes(o=o, k=k, tokens=4, dtype=dtype)
    # int8 codes, then x, the quantized x, the scales and the factors (measured: 3.5 token tensors' worth)
    assert o * k <= kept <= o * k + 4 * token_bytes, (kept - o * k) / token_bytes


def test_the_codes_matmul_has_the_gradient_of_the_float_product():
    """``CodesMatmul`` (int8 codes kept for the backward pass) is ``b @ (codes * s)^T``: its values and
    gradients are those of the plain product (float64 gradcheck)."""
    from flatquant_lab.calibrate.modules import CodesMatmul

    g = torch.Generator().manual_seed(0)
    b = torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 8, generator=g, dtype=torch.float64)
    s = (w.abs().amax(1, keepdim=True) / 7).requires_grad_(True)
    codes = torch.round(w / s.detach()).clamp(-8, 7).requires_grad_(True)
    assert torch.equal(CodesMatmul.apply(b, codes, s), b @ (codes * s).T)
    assert torch.autograd.gradcheck(CodesMatmul.apply, (b, codes, s))


def test_a_half_model_is_calibrated_without_a_float32_copy_of_its_weights(monkeypatch):
    """The layer computes in float32 with its linear weights left in bf16 (upcast per use): the same model,
    bit for bit, as converting the whole layer to float32 (the way before), and no float32 linear weight
    during training."""
    from contextlib import contextmanager

    import flatquant_lab.calibrate as cal

    model = tiny_model("qwen2").to(torch.bfloat16)
    cfg = QuantConfig(**{**BUDGET, "weight_quantizer": "gptq"})
    dtypes, real_train = [], cal.train_layer

    def spy(layer, *a, **k):
        dtypes.extend(m.weight.dtype for m in layer.modules() if isinstance(m, torch.nn.Linear))
        return real_train(layer, *a, **k)

    monkeypatch.setattr(cal, "train_layer", spy)
    got = quantize(copy.deepcopy(model), cfg, CALIB)
    assert dtypes and set(dtypes) == {torch.bfloat16}

    @contextmanager
    def whole_layer_float32(layer, dtype=torch.float32):
        yield layer.to(dtype)

    monkeypatch.setattr(cal, "float_compute", whole_layer_float32)
    dtypes.clear()
    ref = quantize(copy.deepcopy(model), cfg, CALIB)
    assert set(dtypes) == {torch.float32}
    assert_same(state(got), state(ref))
    assert [e["epoch_losses"] for e in got.flatquant_report["layers"]] == \
           [e["epoch_losses"] for e in ref.flatquant_report["layers"]]


@pytest.mark.parametrize("wq", ["rtn", "gptq"])
def test_weights_in_row_chunks_give_the_same_start_and_export(wq, monkeypatch):
    """The clip search, the fold and the rounding a chunk of rows at a time (``memory.CHUNK_BYTES``; a 7B
    linear takes 11 chunks) compute what the whole weight computes, bit for bit (no training here: see
    the next test for the training product)."""
    from flatquant_lab.calibrate import memory

    model = tiny_model("qwen2")
    cfg = QuantConfig(**{**BUDGET, "epochs": 0, "weight_quantizer": wq})
    whole = quantize(copy.deepcopy(model), cfg, CALIB)
    assert memory.row_spans(128, 64) == [(0, 128)]  # the tiny model's linears fit in one chunk
    monkeypatch.setattr(memory, "CHUNK_BYTES", 24 * 64 * 4)  # 24 rows of 64 (6 rows of 256): uneven chunks
    assert memory.row_spans(128, 64)[-1] == (120, 128)
    chunked = quantize(copy.deepcopy(model), cfg, CALIB)
    assert_same(state(chunked), state(whole))


def test_the_training_product_in_row_chunks_is_the_whole_product(monkeypatch):
    """A fake-quant linear's training product per chunk of rows: the same output up to the order of float32
    sums (BLAS may sum one output's dot product in another order for another number of columns: measured
    bit-equal on the CPU of commit 27ef87e, 1-2 of 6,400 outputs one ulp apart on an AMD EPYC with AVX-512 at
    1f7616c), the same gradients up to the order in which the chunks' contributions are summed."""
    from flatquant_lab.calibrate import FakeQuantLinear, KronTransform, memory, plan_layer

    model = tiny_model("llama")
    g = plan_layer(model, 0, QuantConfig())[0]
    k, o = g.size, 200
    x = torch.randn(2, 16, k, generator=torch.Generator().manual_seed(0))
    lin = torch.nn.Linear(k, o, bias=False).to(torch.bfloat16)
    runs = []
    for chunk in (memory.CHUNK_BYTES, 48 * k * 4):
        monkeypatch.setattr(memory, "CHUNK_BYTES", chunk)
        tr = KronTransform(g, orthogonal_factor(g.n1, "random", 1), orthogonal_factor(g.n2, "random", 2),
                           torch.zeros(k), torch.tensor([3.0]), torch.bfloat16)
        fq = FakeQuantLinear(lin, tr, torch.full((o,), 2.0))
        params = [tr.left, tr.right, tr.log_smooth, tr.act_clip, fq.weight_clip]
        for p in params:
            p.requires_grad_(True)
        y = fq(x)
        y.square().sum().backward()
        runs.append((len(fq._spans()), y.detach(), [p.grad for p in params]))
    (n_whole, y_whole, g_whole), (n_chunked, y_chunked, g_chunked) = runs
    assert (n_whole, n_chunked) == (1, 5)
    diff = (y_chunked.float() - y_whole.float()).abs()
    assert int((diff != 0).sum()) <= y_whole.numel() // 100
    assert float(diff.max()) <= 1e-5 * float(y_whole.float().abs().max())
    for a, b in zip(g_chunked, g_whole):
        assert float((a - b).norm() / b.norm()) < 5e-5  # measured: at most 4.5e-6 (the factors)


def test_calibration_on_the_host_fixes_the_malloc_mmap_threshold_when_asked(monkeypatch):
    """On glibc, calibrating on the host with release_host_memory=True fixes the mmap threshold (once) so that
    freed large tensors leave the resident set; elsewhere the call reports that it did nothing. Without it the
    allocator is left alone (a process-wide setting that cannot be undone)."""
    import flatquant_lab.devices as devices

    calls = []
    monkeypatch.setattr(devices, "_host_malloc_set", False)
    real = devices.return_freed_host_memory
    import flatquant_lab.calibrate as cal

    monkeypatch.setattr(cal, "return_freed_host_memory", lambda: calls.append(1) or real())
    quantize(tiny_model("llama"), QuantConfig(**BUDGET), CALIB)
    assert calls == [] and not devices._host_malloc_set
    quantize(tiny_model("llama"), QuantConfig(**BUDGET, release_host_memory=True), CALIB)
    assert calls == [1]
    import platform

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert devices._host_malloc_set and real()


def test_compacting_saved_activations_is_lossless(monkeypatch):
    """Saved float32 activations whose values are exact bf16 (each quantized linear's output) are kept in
    bf16 for the backward pass: the same trained model bit for bit, and some tensors did compact."""
    from flatquant_lab.calibrate import memory

    model = tiny_model("llama")
    # recompute_blocks=False: "auto" counts a step's bytes under hooks of its own, which the spy below would wrap
    cfg = QuantConfig(**BUDGET, recompute_blocks=False)
    monkeypatch.setattr(memory, "COMPACT_MIN_NUMEL", 2**62)  # off
    plain = quantize(copy.deepcopy(model), cfg, CALIB)
    monkeypatch.setattr(memory, "COMPACT_MIN_NUMEL", 1)  # every saved float32 activation is checked
    packed = []
    real_hooks = torch.autograd.graph.saved_tensors_hooks

    def spy_hooks(pack, unpack):
        def spy(t):
            out = pack(t)
            packed.append(out.dtype == torch.bfloat16 and t.dtype == torch.float32)
            return out
        return real_hooks(spy, unpack)

    monkeypatch.setattr(torch.autograd.graph, "saved_tensors_hooks", spy_hooks)
    compact = quantize(copy.deepcopy(model), cfg, CALIB)
    assert sum(packed) > 0 and not all(packed)
    assert_same(state(compact), state(plain))
    assert [e["epoch_losses"] for e in compact.flatquant_report["layers"]] == \
           [e["epoch_losses"] for e in plain.flatquant_report["layers"]]


@pytest.mark.parametrize("mt", ["llama", "qwen3"])
def test_recomputing_blocks_gives_the_same_model(mt, monkeypatch):
    """recompute_blocks=True checkpoints the attention and the MLP of the layer in training: the same
    model bit for bit, with both blocks recomputed in each backward pass."""
    from flatquant_lab.calibrate import memory

    model = tiny_model(mt)
    plain = quantize(copy.deepcopy(model), QuantConfig(**BUDGET), CALIB)
    wrapped, real = [], memory.recompute_blocks

    def spy(blocks, after=None):
        wrapped.append([type(b).__name__ for b in blocks])
        return real(blocks, after)

    import flatquant_lab.calibrate.train as train

    monkeypatch.setattr(train, "recompute_blocks", spy)
    again = quantize(copy.deepcopy(model), QuantConfig(**BUDGET, recompute_blocks=True), CALIB)
    assert [sorted(w) for w in wrapped] == [sorted(["LlamaMLP" if mt == "llama" else "Qwen3MLP",
                                                    "LlamaAttention" if mt == "llama" else "Qwen3Attention"])] * 2
    assert_same(state(again), state(plain))
    assert [e["epoch_losses"] for e in again.flatquant_report["layers"]] == \
           [e["epoch_losses"] for e in plain.flatquant_report["layers"]]
    with pytest.raises(ValueError, match="^recompute_blocks: expected True, False or 'auto'"):
        QuantConfig(recompute_blocks="yes")


def test_saved_bytes_counts_each_kept_tensor_once_as_compaction_keeps_it():
    """saved_bytes counts what autograd saves for backward: exp saves its output, sin its input (the
    same tensor, counted once), a scalar multiply nothing; exact-bf16 float32 tensors count 2 bytes each
    under bf16 (what compact_saved_tensors keeps), others 4; a parameter counts nothing."""
    from flatquant_lab.calibrate.memory import COMPACT_MIN_NUMEL, saved_bytes

    a = torch.randn(1000, requires_grad=True)
    assert saved_bytes(lambda: (a.exp().sin() * 2).sum()) == 4000
    n = COMPACT_MIN_NUMEL
    exact = torch.randn(n).bfloat16().float().requires_grad_(True)
    inexact = (torch.randn(n) + 2**-20).requires_grad_(True)
    w = torch.nn.Parameter(torch.randn(n))
    assert saved_bytes(lambda: (exact * w).sum(), torch.bfloat16) == 2 * n  # w: a parameter
    assert saved_bytes(lambda: inexact.sin().sum(), torch.bfloat16) == 4 * n
    assert saved_bytes(lambda: exact.sin().sum(), None) == 4 * n


def test_auto_recompute_turns_on_when_a_step_keeps_more_than_the_layer(monkeypatch):
    """recompute_blocks="auto" (the default) counts a training step's kept activations once per layer and
    recomputes the blocks when they exceed the layer's weight bytes and RECOMPUTE_MIN_BYTES: off for the
    tiny model as it is, on with the floor lowered below its steps; the model is the same bit for bit."""
    import flatquant_lab.calibrate.train as train
    from flatquant_lab.calibrate import memory

    assert QuantConfig().recompute_blocks == "auto"
    model = tiny_model("llama")
    wrapped, kept, real, count = [], [], memory.recompute_blocks, memory.saved_bytes

    def spy(blocks, after=None):
        wrapped.append(len(blocks))
        return real(blocks, after)

    def spy_count(step, dtype=None):
        kept.append(count(step, dtype))
        return kept[-1]

    monkeypatch.setattr(train, "recompute_blocks", spy)
    monkeypatch.setattr(train, "saved_bytes", spy_count)
    plain = quantize(copy.deepcopy(model), QuantConfig(**BUDGET, recompute_blocks=False), CALIB)
    assert wrapped == [0, 0] and kept == []  # False: nothing counted
    auto = quantize(copy.deepcopy(model), QuantConfig(**BUDGET), CALIB)
    assert wrapped == [0, 0] * 2 and len(kept) == 2 and 0 < max(kept) < train.RECOMPUTE_MIN_BYTES
    weights = sum(t.numel() * t.element_size() for t in model.model.layers[0].parameters())
    assert min(kept) > weights  # the tiny layer's steps keep more than its weights: the floor decided
    monkeypatch.setattr(train, "RECOMPUTE_MIN_BYTES", 0)
    forced = quantize(copy.deepcopy(model), QuantConfig(**BUDGET), CALIB)
    assert wrapped[4:] == [2, 2]
    for other in (auto, forced):
        assert_same(state(other), state(plain))
        assert [e["epoch_losses"] for e in other.flatquant_report["layers"]] == \
               [e["epoch_losses"] for e in plain.flatquant_report["layers"]]
