"""Layer-wise calibration (``calibrate`` / ``quantize``): accuracy ordering, fidelity of the int4
layers to the trained fake-quant forward, determinism, resumption, skips, refusals, GPTQ, the CLI.

Everything runs on the tiny random models of ``tiny_models`` (hidden 64, 2 layers) with a few
calibration samples of 32 tokens and 1-2 epochs, so that the file stays fast on 2 shared cores.
Calibration and held-out ids are random tokens drawn from different generators.
"""
from __future__ import annotations

import copy
import importlib
import json
import math

import pytest
import torch
from torch import nn

from flatquant_lab import calibrate as cal
from flatquant_lab import ops
from flatquant_lab.api import quantize
from flatquant_lab.calibrate import FakeQuantLinear, WorkDir, calibrate, install_fake_quant, plan_layer
from flatquant_lab.recipe import QuantConfig
from flatquant_lab.io import DESCRIPTION_FILE, FLOAT_TYPE, QUANT_TYPE, load_quantized, save_quantized
from flatquant_lab.gptq import HessianAccumulator, gptq_clip_search, gptq_quantize, output_error
from flatquant_lab.kronecker import decompose_dim, npu_supported
from flatquant_lab.layers import W4A4FlatQuantLinear
from flatquant_lab.models import GROUPS, LINEAR_NAMES, UnsupportedModelError, decoder_layers
from flatquant_lab.packing import unpack_int4
from flatquant_lab.quantizers import QMAX, QMIN, quant_act_reference, quantize_weight, weight_scale
from tiny_models import (MODEL_TYPES, OUTLIER_CHANNELS, OUTLIER_SCALES, Interrupt, stop_after_layer_0, tiny_config,
                         tiny_model)

CALIB = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(123))
HELD = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(7))
# 2 batches of 4 x 32 tokens, 2 epochs; the paper profile (no end-to-end stage) and RTN weights
BUDGET = dict(profile="paper", weight_quantizer="rtn", samples=8, seqlen=32, epochs=2, batch_size=4)
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def config(**kw) -> QuantConfig:
    kw = {**BUDGET, **kw}
    if kw.get("method", "flatquant") != "flatquant":
        kw.pop("epochs")  # only flatquant trains (an epochs override elsewhere warns)
    return QuantConfig(**kw)


def logits(model, ids=HELD) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of ``a`` against the reference ``b``."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def quantized_copy(model, cfg: QuantConfig, ids=CALIB, **kw):
    needs_data = cfg.method == "flatquant" or cfg.weight_quantizer == "gptq"
    return quantize(copy.deepcopy(model), cfg, ids if needs_data else None, **kw)


def logit_error(float_model, ref_logits, **cfg_kw) -> float:
    return rel(logits(quantized_copy(float_model, config(**cfg_kw))), ref_logits)


def state(model) -> dict[str, torch.Tensor]:
    """Every tensor that defines the model: its state dict (W4A4 buffers included)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def hidden_outlier_model(model_type: str, seed: int = 0, factor: float = 0.25) -> nn.Module:
    """``tiny_model(outliers=False)`` with outlier channels that leave its function unchanged.

    For every q/k/v and gate/up input, channels ``OUTLIER_CHANNELS`` of the preceding RMSNorm
    weight are multiplied by ``s = factor * OUTLIER_SCALES`` (5x, 8.75x, 12.5x) and the same
    columns of the consuming linears divided by ``s``: the float model computes the same function
    (to fp32 rounding), but per-token int4 activation quantization now meets channels 5-12x the
    rest, with small weights on them, as in real LLMs. (``tiny_model``'s own outliers also scale
    the embedding and are *not* compensated in the weights: there the outlier channels dominate
    every linear's output, which changes what the baselines are measured on; see
    ``test_flatquant_beats_both_baselines_on_tiny_model``.)
    """
    model = tiny_model(model_type, seed=seed, outliers=False)
    with torch.no_grad():
        for layer in decoder_layers(model):
            pairs = ((layer.input_layernorm, GROUPS["attn"]), (layer.post_attention_layernorm, GROUPS["mlp"]))
            for norm, names in pairs:
                for ch, s in zip(OUTLIER_CHANNELS, OUTLIER_SCALES):
                    norm.weight[ch] *= s * factor
                    for name in names:
                        layer.get_submodule(name).weight[:, ch] /= s * factor
    return model


def tiny_model_with(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random model of ``tiny_config(model_type)`` with some config fields changed."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


# ==================================================================================== 1. accuracy
@pytest.mark.parametrize("mt", MODEL_TYPES)
def test_flatquant_beats_hadamard_beats_rtn(mt):
    """Final-logit error on held-out ids, same calibration ids for every method:
    FlatQuant < Hadamard < RTN with RTN weights, and FlatQuant < Hadamard with GPTQ weights.

    Model: ``hidden_outlier_model`` (function-preserving outlier channels, 5-12.5x). Measured on
    seeds 0-3 of all three families: RTN 0.61-0.87, Hadamard 0.42-0.55, FlatQuant 0.27-0.35
    (GPTQ: Hadamard 0.33-0.45, FlatQuant 0.24-0.34). A trained result, so the orderings must hold by
    far more than CPU kinds move it: on an AMD EPYC (1 thread, seed 0) FlatQuant/Hadamard is 0.60-0.63x
    (RTN weights) and 0.68-0.73x (GPTQ), Hadamard/RTN 0.60-0.71x, inside the Intel Xeon ranges above: the
    gaps are the method's (at least 27%), not a training run's luck.
    """
    fm = hidden_outlier_model(mt)
    reference = logits(fm)
    # the function is unchanged: measured 3.2e-7 to 3.7e-7 (llama, qwen2, qwen3)
    assert rel(logits(tiny_model(mt, outliers=False)), reference) < 4e-6
    err = {(m, w): logit_error(fm, reference, method=m, weight_quantizer=w)
           for m, w in (("rtn", "rtn"), ("hadamard", "rtn"), ("flatquant", "rtn"),
                        ("hadamard", "gptq"), ("flatquant", "gptq"))}
    msg = ", ".join(f"{m}/{w}={e:.3f}" for (m, w), e in err.items())
    assert err["flatquant", "rtn"] < err["hadamard", "rtn"] < err["rtn", "rtn"], msg
    assert err["flatquant", "gptq"] < err["hadamard", "gptq"], msg


@pytest.mark.parametrize("mt", MODEL_TYPES)
def test_flatquant_beats_both_baselines_on_tiny_model(mt):
    """``tiny_model`` as it is (embedding and norm outliers, not compensated in the weights).

    FlatQuant beats both baselines (measured on seeds 0-3: FlatQuant 0.24-0.37, RTN 0.39-0.77,
    Hadamard 0.50-0.79; with GPTQ weights FlatQuant 0.18-0.36, Hadamard 0.26-0.48). Hadamard vs
    RTN is NOT ordered on this model (Hadamard was worse in 9 of those 12 cases). Probable reason:
    its outliers are not compensated in the weights, so they dominate the outputs of the linears
    they feed (with identity factors the int4 activation error on the q/k/v input is only ~5%
    despite a max/rms of 7), and a rotation gains little there while it costs elsewhere. The
    Hadamard < RTN ordering is checked on ``hidden_outlier_model`` above instead. On an AMD EPYC
    (1 thread, seed 0) FlatQuant/best baseline is 0.38-0.54x (RTN weights) and FlatQuant/Hadamard
    0.47-0.70x (GPTQ): margins of at least 30%, not a training run's luck.
    """
    fm = tiny_model(mt)
    reference = logits(fm)
    err = {(m, w): logit_error(fm, reference, method=m, weight_quantizer=w)
           for m, w in (("rtn", "rtn"), ("hadamard", "rtn"), ("flatquant", "rtn"),
                        ("hadamard", "gptq"), ("flatquant", "gptq"))}
    msg = ", ".join(f"{m}/{w}={e:.3f}" for (m, w), e in err.items())
    assert err["flatquant", "rtn"] < min(err["hadamard", "rtn"], err["rtn", "rtn"]), msg
    assert err["flatquant", "gptq"] < err["hadamard", "gptq"], msg


# ==================================================================================== 2. fidelity
@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """Per model type, built on first use (per worker): the float model, the same model calibrated
    with FlatQuant (RTN weights, ``work_dir``), the learned tensors per layer read back from the
    work dir, and a deep copy of the float model running the fake-quant stand-ins built from them
    (``plan_layer`` run before anything was installed)."""
    cache = {}

    def get(mt):
        if mt not in cache:
            fm = tiny_model(mt)
            # act_dtype resolved for the model (bfloat16 for this float32 one), as quantize does
            cfg = config(work_dir=str(tmp_path_factory.mktemp(f"work_{mt}"))).for_model(fm)
            fake = copy.deepcopy(fm)
            n = len(decoder_layers(fake))
            plans = [plan_layer(fake, i, cfg) for i in range(n)]
            q = quantize(copy.deepcopy(fm), cfg, CALIB)
            work = WorkDir(cfg.work_dir, cfg, n)
            learned = [work.load(i)[0] for i in range(n)]
            for i, layer in enumerate(decoder_layers(fake)):
                install_fake_quant(layer, plans[i], learned[i], cfg)
            cache[mt] = dict(float=fm, quantized=q, fake=fake, learned=learned, cfg=cfg)
        return cache[mt]

    return get


@pytest.mark.parametrize("mt", MODEL_TYPES)
def test_quantized_layers_carry_the_learned_tensors(mt, calibrated):
    c = calibrated(mt)
    model, cfg = c["quantized"], c["cfg"]
    for i, layer in enumerate(decoder_layers(model)):
        learned = c["learned"][i]
        for name in LINEAR_NAMES:
            assert type(layer.get_submodule(name)) is W4A4FlatQuantLinear, f"layers.{i}.{name}"
        for g, names in GROUPS.items():
            mods = [layer.get_submodule(n) for n in names]
            clip = torch.sigmoid(learned[f"{g}.act_clip"])
            assert clip.dtype == torch.float32
            first = mods[0]
            # the stored clip ratio is exactly sigmoid(learned factor), in float32
            assert torch.equal(first.clip_ratio, clip), (i, g)
            assert torch.equal(first.left_trans, learned[f"{g}.left"].to(cfg.act_dtype)), (i, g)
            assert torch.equal(first.right_trans, learned[f"{g}.right"].to(cfg.act_dtype)), (i, g)
            assert first.act_dtype == cfg.act_dtype
            for m in mods[1:]:  # q/k/v (gate/up) are one fused module in vllm-ascend
                for t in ("left_trans", "right_trans", "clip_ratio"):
                    assert torch.equal(getattr(m, t), getattr(first, t)), (i, g, t)
        # the norm-folded smoothing: the norm weight now holds w / d
        f_layer = decoder_layers(c["float"])[i]
        for g, norm in (("attn", "input_layernorm"), ("mlp", "post_attention_layernorm")):
            d = learned[f"{g}.log_smooth"].double().exp()
            want = f_layer.get_submodule(norm).weight.double() / d
            assert rel(layer.get_submodule(norm).weight, want) < 1e-7, (i, norm)  # measured <= 4.3e-8
    report = model.flatquant_report
    assert [e["layer"] for e in report["layers"]] == [0, 1]
    for e in report["layers"]:
        assert len(e["epoch_losses"]) == BUDGET["epochs"] and all(math.isfinite(x) for x in e["epoch_losses"])
        assert e["resumed"] is False and math.isfinite(e["fake_quant_mse"])
        learned = c["learned"][e["layer"]]
        assert e["clip_ratios"] == {g: float(torch.sigmoid(learned[f"{g}.act_clip"])) for g in GROUPS}


def _linear_inputs(model) -> dict[tuple[int, str], torch.Tensor]:
    """The input each decoder linear of ``model`` sees on HELD."""
    seen, handles = {}, []
    for i, layer in enumerate(decoder_layers(model)):
        for name in LINEAR_NAMES:
            handles.append(layer.get_submodule(name).register_forward_pre_hook(
                lambda _m, args, key=(i, name): seen.__setitem__(key, args[0].detach().clone())))
    try:
        logits(model)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("mt", MODEL_TYPES)
def test_int4_codes_match_the_fake_quant_forward(mt, calibrated):
    """Each int4 linear, given the input its fake-quant stand-in saw, makes the same roundings.

    Activation side: the int4 codes of ``ops.kronecker_quant`` equal those of the trained forward's
    ``b = L^T (x / d) R`` (rounded as the kernel rounds); weight side: ``weight_int`` equals
    ``rint(fold(W * d) / s)`` and ``weight_scale`` equals ``s``. They can only differ at rounding
    ties, by one step: the fake forward folds and sums in float32 (and multiplies the dequantized
    values), the export folds in float64 and the ops sum integers. Measured on these seeds: no code
    of 73728 weight and 131072 activation codes per family differs (with 1 and 2 threads), scales
    are equal, and the outputs agree to <= 4.1e-5 relative (a flipped code would give ~2e-3).
    """
    c = calibrated(mt)
    qlayers, flayers = decoder_layers(c["quantized"]), decoder_layers(c["fake"])
    inputs = _linear_inputs(c["fake"])
    act_diff = act_total = w_diff = w_total = 0
    with torch.no_grad():
        for (i, name), x in inputs.items():
            fq, ql = flayers[i].get_submodule(name), qlayers[i].get_submodule(name)
            assert isinstance(fq, FakeQuantLinear)
            tr = fq.transform
            # weights
            wf = tr.fold(fq.linear.weight.float())
            s = weight_scale(wf, torch.sigmoid(fq.weight_clip))
            codes = torch.clamp(torch.round(wf / s), QMIN, QMAX)
            wdiff = (codes - ql.weight_int.float()).abs()
            assert wdiff.max() <= 1, (i, name)
            w_diff += int(wdiff.count_nonzero())
            w_total += wdiff.numel()
            if fq.out_div is not None:  # v_proj / up_proj rows carry the next group's 1 / d
                s = s / fq.out_div.log_smooth.exp()[:, None]
            assert rel(ql.weight_scale, s) < 2e-6, (i, name)  # measured <= 1.8e-7 over the 42 linears
            # activations: the int4 layer sees x / d where the smoothing folds into a norm
            d = tr.smooth_in()
            x_int4 = x / d if tr.group.smooth_target.endswith("layernorm") else x
            b = tr.transformed(x)
            q_fake, s_fake = quant_act_reference(b.reshape(-1, ql.in_features), float(tr.clip_ratio()))
            xq, s_tok = ops.kronecker_quant(x_int4.reshape(-1, ql.n1, ql.n2).to(ql.act_dtype), ql.p1, ql.p2,
                                            clip_ratio=float(ql.clip_ratio))
            q_int4 = unpack_int4(xq).reshape(q_fake.shape).float()
            adiff = (q_fake - q_int4).abs()
            assert adiff.max() <= 1, (i, name)
            act_diff += int(adiff.count_nonzero())
            act_total += adiff.numel()
            # per-token scales: measured equal in all 42 linears (a last-bit max|b| would differ by ~1e-3)
            assert torch.equal(s_tok, s_fake), (i, name)
            # the outputs, same input
            tr.clear_cache()
            assert rel(ql(x_int4), fq(x)) < 4e-4, (i, name)  # measured 1e-10 to 4.1e-5 over the 42 linears
    # measured: no code differs (of 73728 weight and 131072 activation codes per family, 1 and 2 threads)
    assert w_diff == 0, f"{w_diff} of {w_total} weight codes differ"
    assert act_diff == 0, f"{act_diff} of {act_total} activation codes differ"


@pytest.mark.parametrize("mt", MODEL_TYPES)
def test_int4_model_logits_follow_the_fake_quant_model(mt, calibrated):
    """Whole-model logits, int4 layers vs the fake-quant model built from the learned tensors.

    Most tokens' logits agree bit for bit (median per-token difference usually 0). But these tiny
    random models amplify any perturbation (casting the float model to bf16 alone moves their
    logits by 1.4-10%), and one code flipped at a rounding tie (previous test) propagates through
    attention to later tokens: measured over 3 seeds x 2 held-out sets per family, the relative
    difference ranged from 1e-8 to 2.7e-2, against 0.21-0.36 for the quantization error itself.
    So the claim here is the gross one (well below the quantization error); the exact-rounding
    claim is the per-linear test above. A ~1e-4 bound would be flaky.
    """
    c = calibrated(mt)
    fake, q = logits(c["fake"]), logits(c["quantized"])
    ref = logits(c["float"])
    quant_err = rel(q, ref)
    # measured here 4.0e-3 (llama), 2.2e-6 (qwen2), 2.1e-6 (qwen3); up to 2.7e-2 on other seeds (above)
    assert rel(q, fake) < 0.04 < 0.25 * quant_err, (rel(q, fake), quant_err)
    assert (q.argmax(-1) == fake.argmax(-1)).float().mean() >= 0.99  # measured 1.0: all 128 tokens agree


@pytest.mark.parametrize("mt", ["llama", "qwen2"])  # tied and untied embeddings
def test_calibrated_model_saves_and_loads_bit_exact(mt, calibrated, tmp_path):
    model = calibrated(mt)["quantized"]
    out = save_quantized(model, tmp_path / "out")
    loaded = load_quantized(out)
    assert torch.equal(logits(loaded), logits(model))
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    for i in range(2):
        for name in LINEAR_NAMES:
            assert desc[f"model.layers.{i}.{name}.weight"] == QUANT_TYPE
    assert desc.get("lm_head.weight", FLOAT_TYPE) == FLOAT_TYPE


# ==================================================================================== 3. determinism
def test_deterministic_under_a_seed():
    a = state(quantized_copy(tiny_model("qwen2"), config()))
    b = state(quantized_copy(tiny_model("qwen2"), config()))
    assert_same_state(a, b)


def test_another_seed_gives_another_model():
    # With the default Hadamard start the seed only orders the batches (2 batches x 2 epochs here:
    # seeds 0 and 1 happen to pick the same order and give identical tensors). A random start
    # depends on the seed by construction.
    a = state(quantized_copy(tiny_model("qwen2"), config(transform_init="random", seed=0)))
    b = state(quantized_copy(tiny_model("qwen2"), config(transform_init="random", seed=1)))
    c = state(quantized_copy(tiny_model("qwen2"), config(transform_init="random", seed=0)))
    assert_same_state(a, c)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert any(k.endswith("left_trans") for k in differ) and any(k.endswith(".weight_packed") for k in differ)


def test_training_moves_every_learned_tensor(tmp_path):
    """Every learned tensor (factors, smoothing, clip factors) gets gradient and moves from its start."""
    fm = tiny_model("qwen3")
    quantized_copy(fm, config(epochs=0, work_dir=str(tmp_path / "init")))
    quantized_copy(fm, config(epochs=1, work_dir=str(tmp_path / "trained")))
    for i in range(2):
        init = WorkDir(str(tmp_path / "init"), config(epochs=0).for_model(fm), 2).load(i)[0]
        trained, losses = WorkDir(str(tmp_path / "trained"), config(epochs=1).for_model(fm), 2).load(i)
        assert init.keys() == trained.keys() and len(losses) == 1
        for k in init:
            assert torch.isfinite(trained[k]).all(), k
            assert not torch.equal(init[k], trained[k]), f"layer {i}: {k} did not move"


# ==================================================================================== 4. resumption
def test_learned_state_reads_and_writes_the_work_dir_names(tmp_path):
    """A work dir's flat tensor names (``attn.left``, ``self_attn.q_proj.weight_clip``, ...) read into a
    ``LayerState`` and write back as the same tensors under the same names."""
    fm = tiny_model("qwen2")
    cfg = config(epochs=0, work_dir=str(tmp_path / "work"))
    quantized_copy(fm, cfg)
    groups = plan_layer(fm, 0, cfg.for_model(fm))
    tensors = WorkDir(str(tmp_path / "work"), cfg.for_model(fm), 2).load(0)[0]
    learned = cal.LayerState.from_tensors(tensors, groups)
    assert list(learned.groups) == [g.name for g in groups if g.quantized]
    assert learned.to_tensors().keys() == tensors.keys()
    assert all(torch.equal(v, tensors[k]) for k, v in learned.to_tensors().items())
    assert learned["attn"].weight_clip.keys() == {f"self_attn.{p}_proj" for p in "qkv"}


def test_interrupted_run_resumes_to_the_same_model(tmp_path):
    fm = tiny_model("qwen2")
    work = str(tmp_path / "work")
    full = quantized_copy(fm, config())
    with pytest.raises(Interrupt):
        quantized_copy(fm, config(work_dir=work), after_layer=stop_after_layer_0)
    done = WorkDir(work, config(work_dir=work).for_model(fm), 2)
    assert done.has(0) and not done.has(1)
    seen = []
    resumed = quantized_copy(fm, config(work_dir=work), after_layer=seen.append)
    assert seen == [0, 1]
    assert_same_state(state(resumed), state(full))
    assert torch.equal(logits(resumed), logits(full))
    layers = resumed.flatquant_report["layers"]
    assert [e["resumed"] for e in layers] == [True, False]
    assert layers[0]["epoch_losses"] == full.flatquant_report["layers"][0]["epoch_losses"]


def test_work_dir_of_another_configuration_is_refused(tmp_path):
    fm = tiny_model("llama")
    work = str(tmp_path / "work")
    quantized_copy(fm, config(epochs=1, work_dir=work))
    for other in (dict(epochs=2), dict(lr=1e-3), dict(seed=1), dict(method="hadamard")):
        with pytest.raises(ValueError, match="work_dir") as e:
            quantized_copy(fm, config(**{"epochs": 1, **other}, work_dir=work))
        assert work in str(e.value)


def test_work_dir_calibrated_on_other_data_is_refused(tmp_path):
    """Same config, other token ids: resuming would mix layers learned on two data sets."""
    fm = tiny_model("llama")
    work = str(tmp_path / "work")
    with pytest.raises(Interrupt):
        quantized_copy(fm, config(epochs=1, work_dir=work), after_layer=stop_after_layer_0)
    other = torch.randint(0, 256, CALIB.shape, generator=torch.Generator().manual_seed(99))
    with pytest.raises(ValueError, match="^work_dir: .* calibrated on other data") as e:
        quantized_copy(fm, config(epochs=1, work_dir=work), ids=other)
    assert json.loads((tmp_path / "work" / "run.json").read_text())["calib_ids_sha256"] in str(e.value)
    seen = []
    quantized_copy(fm, config(epochs=1, work_dir=work), after_layer=seen.append)  # the same data resumes
    assert seen == [0, 1]


def test_the_budget_is_what_calibration_runs_on():
    """samples x seqlen of the config select the data (first rows, first tokens) and the report says so."""
    fm = tiny_model("llama")
    big = torch.cat([CALIB, HELD[:, :32]])  # 12 x 32: more rows than the budget's 8
    cfg = config(epochs=1)
    with pytest.warns(UserWarning, match=r"calib_data: 12 x 32 token ids given; .* uses the first 8 x 32"):
        from_big = quantized_copy(fm, cfg, ids=big)
    exact = quantized_copy(fm, cfg, ids=CALIB)
    assert_same_state(state(from_big), state(exact))
    rec = exact.flatquant_report["calibration"]
    assert (rec["samples"], rec["seqlen"]) == (cfg.data.samples, cfg.data.seqlen) == (8, 32)
    assert rec == from_big.flatquant_report["calibration"]
    # seqlen cuts each sequence to its first tokens
    with pytest.warns(UserWarning, match=r"uses the first 8 x 16"):
        short = quantized_copy(fm, config(epochs=1, seqlen=16), ids=CALIB)
    assert short.flatquant_report["calibration"]["seqlen"] == 16
    assert_same_state(state(short), state(quantized_copy(fm, config(epochs=1, seqlen=16), ids=CALIB[:, :16])))


@pytest.mark.parametrize("ids, what", [(CALIB[:6], "6 x 32"), (CALIB[:, :20], "8 x 20")])
def test_less_data_than_the_budget_is_refused(ids, what):
    model = tiny_model("llama")
    before = state(model)
    with pytest.raises(ValueError, match=rf"^calib_data: {what} token ids given, but QuantConfig\(profile='paper', "
                                         r"samples=8, seqlen=32\) calibrates on 8 x 32"):
        quantize(model, config(epochs=1), ids)
    assert_same_state(state(model), before)


def test_work_dir_resumes_across_weight_quantizers(tmp_path):
    """With train_inputs="float" the learned tensors do not depend on the weight quantizer: a GPTQ run may
    reuse an RTN run's."""
    fm = tiny_model("llama")
    work = str(tmp_path / "work")
    quantized_copy(fm, config(epochs=1, work_dir=work, train_inputs="float"))
    resumed = quantized_copy(fm, config(epochs=1, work_dir=work, train_inputs="float", weight_quantizer="gptq"))
    fresh = quantized_copy(fm, config(epochs=1, train_inputs="float", weight_quantizer="gptq"))
    assert [e["resumed"] for e in resumed.flatquant_report["layers"]] == [True, True]
    assert_same_state(state(resumed), state(fresh))


def test_work_dir_written_with_other_skips_is_refused(tmp_path):
    fm = tiny_model("llama")
    work = str(tmp_path / "work")
    quantized_copy(fm, config(epochs=1, work_dir=work, skip=("*.layers.0.self_attn.q_proj",)))
    with pytest.raises(ValueError, match="work_dir"):
        quantized_copy(fm, config(epochs=1, work_dir=work))


# ==================================================================================== 5. skips
@pytest.mark.parametrize("pattern, group, method", [
    ("*.layers.0.self_attn.q_proj", "attn", "flatquant"),
    ("model.layers.1.mlp.up_proj", "mlp", "hadamard"),
])
def test_skip_keeps_the_whole_fused_group_float(pattern, group, method, tmp_path, caplog):
    fm = tiny_model("qwen2")
    layer_index = int(pattern.split("layers.")[1][0])
    # information, not a warning: the user asked for it (issue 10: "kept in float" lines looked like warnings)
    with caplog.at_level("INFO", logger="flatquant_lab.calibrate"):
        model = quantized_copy(fm, config(epochs=1, method=method, skip=(pattern,)))
    skipped = model.flatquant_report["skipped"]
    names = [f"model.layers.{layer_index}.{n}" for n in GROUPS[group]]
    assert set(skipped) == {*names, "lm_head"}
    reasons = {skipped[n] for n in names}
    assert len(reasons) == 1
    reason = reasons.pop()
    assert pattern in reason and "fused" in reason
    warned = [r.getMessage() for r in caplog.records if "kept in float" in r.getMessage()]
    assert {r.levelname for r in caplog.records if "kept in float" in r.getMessage()} == {"INFO"}
    assert len(warned) == 1 and reason in warned[0] and all(n in warned[0] for n in names), warned
    for i, layer in enumerate(decoder_layers(model)):
        for n in LINEAR_NAMES:
            mod = layer.get_submodule(n)
            if f"model.layers.{i}.{n}" in names:
                assert type(mod) is nn.Linear, n
            else:
                assert type(mod) is W4A4FlatQuantLinear, n
    if group == "attn":  # q and k keep their float weights (v_proj's rows take o_proj's 1 / d)
        for n in ("self_attn.q_proj", "self_attn.k_proj"):
            f = decoder_layers(fm)[0].get_submodule(n)
            assert torch.equal(decoder_layers(model)[0].get_submodule(n).weight, f.weight)
    assert type(model.lm_head) is nn.Linear
    assert torch.isfinite(logits(model)).all()
    out = save_quantized(model, tmp_path / "out")
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    for n in names:
        assert desc[f"{n}.weight"] == FLOAT_TYPE
    assert torch.equal(logits(load_quantized(out)), logits(model))


def test_lm_head_stays_float_and_is_reported():
    model = quantized_copy(tiny_model("qwen2"), config(method="rtn"))
    assert type(model.lm_head) is nn.Linear
    assert set(model.flatquant_report["skipped"]) == {"lm_head"}
    assert "output head" in model.flatquant_report["skipped"]["lm_head"]


@pytest.mark.parametrize("intermediate, reason", [
    (96, "npu_kronecker_quant cannot run 8x12: " + npu_supported(8, 12).reason),  # 96 = 8 x 12, 12 % 8 != 0
    (100, "input size 100 is not divisible by 8"),
])
def test_down_proj_the_npu_cannot_run_stays_float_with_fallback_float(intermediate, reason, tmp_path):
    # (the default fallback, W8A8_DYNAMIC, is tested in test_recipe.py)
    if intermediate == 96:
        assert decompose_dim(96) == (8, 12) and not npu_supported(8, 12)
    fm = tiny_model_with("llama", intermediate_size=intermediate)
    model = quantized_copy(fm, config(epochs=1, fallback="float"))
    skipped = model.flatquant_report["skipped"]
    assert skipped == {"model.layers.0.mlp.down_proj": reason, "model.layers.1.mlp.down_proj": reason,
                       "lm_head": skipped["lm_head"]}
    for layer in decoder_layers(model):
        assert type(layer.mlp.down_proj) is nn.Linear
        for n in LINEAR_NAMES:
            if n != "mlp.down_proj":
                assert type(layer.get_submodule(n)) is W4A4FlatQuantLinear, n
    out = logits(model)
    assert torch.isfinite(out).all() and rel(out, logits(fm)) < 1.0  # the quantization error: measured 0.24-0.26
    saved = save_quantized(model, tmp_path / "out")
    assert json.loads((saved / DESCRIPTION_FILE).read_text())["model.layers.0.mlp.down_proj.weight"] == FLOAT_TYPE
    assert torch.equal(logits(load_quantized(saved)), out)


# ==================================================================================== 6. refusals
def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256, n_positions=64)).eval()


@pytest.mark.parametrize("make", [_gpt2, lambda: nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))],
                         ids=["gpt2", "sequential"])
@pytest.mark.parametrize("method", ["rtn", "flatquant"])
def test_unsupported_models_are_refused(make, method):
    model = make()
    with pytest.raises(UnsupportedModelError) as e:
        quantize(model, config(method=method), CALIB)
    msg = str(e.value)
    assert msg.startswith("model:") and type(model).__name__ in msg
    for t in SUPPORTED:
        assert t in msg
    assert isinstance(e.value, ValueError)


def test_already_quantized_model_is_refused():
    model = quantized_copy(tiny_model("llama"), config(method="rtn"))
    with pytest.raises(UnsupportedModelError, match="W4A4FlatQuantLinear, not nn.Linear"):
        quantize(model, config(method="rtn"))


# ==================================================================================== 8. memory
def test_calibration_does_not_copy_the_model(monkeypatch):
    """No deep copy of a module or tensor while calibrating (transformers deep-copies small dicts),
    and the model is changed in place: same embedding tensor, same decoder layer objects."""
    real = copy.deepcopy

    def guarded(obj, *args, **kwargs):
        if isinstance(obj, (nn.Module, torch.Tensor)):
            raise AssertionError(f"calibrate deep-copied a {type(obj).__name__}")
        return real(obj, *args, **kwargs)

    # a `from copy import deepcopy` in any calibrate module would bypass the patch
    for name in ("", ".capture", ".finalize", ".initialize", ".modules", ".plan", ".train", ".workdir"):
        assert not hasattr(importlib.import_module(cal.__name__ + name), "deepcopy"), name
    cfgs = (config(epochs=1), config(epochs=1, weight_quantizer="gptq"), config(method="hadamard"))
    models = [tiny_model("qwen2") for _ in cfgs]
    monkeypatch.setattr(copy, "deepcopy", guarded)
    for cfg, model in zip(cfgs, models):
        embed, layers = model.get_input_embeddings().weight, list(decoder_layers(model))
        quantize(model, cfg, None if cfg.method == "hadamard" else CALIB)
        assert model.get_input_embeddings().weight is embed
        assert all(a is b for a, b in zip(decoder_layers(model), layers))
        assert type(decoder_layers(model)[1].mlp.down_proj) is W4A4FlatQuantLinear


# ==================================================================================== 9. bad inputs
@pytest.mark.parametrize("cfg_kw", [dict(method="flatquant"), dict(method="rtn", weight_quantizer="gptq"),
                                    dict(method="hadamard", weight_quantizer="gptq")])
def test_calibration_data_is_required(cfg_kw):
    model = tiny_model("llama")
    before = state(model)
    with pytest.raises(ValueError, match="^calib_data"):
        quantize(model, config(**cfg_kw))
    assert_same_state(state(model), before)  # refused before touching the model


@pytest.mark.parametrize("bad", [
    CALIB.float(),                      # wrong dtype
    CALIB[0],                           # 1-D
    CALIB[None],                        # 3-D
    [CALIB[:4], CALIB[:4, :16]],        # batches of different seqlen
    [],                                 # nothing
    "some text",                        # not token ids
    [CALIB[:4].tolist()],               # lists, not tensors
])
def test_bad_calibration_data_is_refused(bad):
    with pytest.raises(ValueError, match="^calib_data"):
        quantize(tiny_model("llama"), config(), bad)


def test_calibrate_refuses_non_long_ids():
    with pytest.raises(ValueError, match="^calib_data"):
        calibrate(tiny_model("llama"), config(), CALIB.to(torch.int32))


def test_int32_ids_and_batches_are_accepted():
    a = quantize(tiny_model("llama"), config(epochs=1), CALIB.to(torch.int32))
    b = quantize(tiny_model("llama"), config(epochs=1), [CALIB[:4], CALIB[4:]])
    assert_same_state(state(a), state(b))


@pytest.mark.parametrize("kw, name", [
    (dict(method="gptq"), "method"),
    (dict(method="FlatQuant"), "method"),
    (dict(profile="slow"), "profile"),
    (dict(weight_quantizer="awq"), "weight_quantizer"),
    (dict(samples=0), "samples"),
    (dict(samples=-4), "samples"),
    (dict(samples=2.5), "samples"),
    (dict(seqlen=0), "seqlen"),
    (dict(batch_size=0), "batch_size"),
    (dict(epochs=-1), "epochs"),
    (dict(lr=0.0), "lr"),
    (dict(transform_init="eye"), "transform_init"),
    (dict(act_dtype=torch.float32), "act_dtype"),
    (dict(act_clip_init="max"), "act_clip_init"),
    (dict(act_clip_init=float("nan")), "act_clip_init"),
    (dict(weight_clip_init=float("inf")), "weight_clip_init"),
    (dict(lr=float("inf")), "lr"),
    (dict(samples=True), "samples"),
    (dict(gptq_block=0), "gptq_block"),
    (dict(gptq_damp=0.0), "gptq_damp"),
    (dict(smooth_alpha=1.5), "smooth_alpha"),
    (dict(min_lr_ratio=-0.1), "min_lr_ratio"),
    (dict(clip_lr_mult=float("nan")), "clip_lr_mult"),
    (dict(gptq_clip_grid=(1.0, 0.0)), "gptq_clip_grid"),
    (dict(gptq_clip_grid=(1.1,)), "gptq_clip_grid"),
    (dict(gptq_clip_grid=0.9), "gptq_clip_grid"),
])
def test_bad_config_values_name_the_parameter(kw, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        QuantConfig(**kw)


# ==================================================================================== 10. GPTQ
def _weight(o=24, k=64, seed=0):
    return torch.randn(o, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_with_a_diagonal_hessian_is_rtn(act_order):
    w = _weight()
    q_rtn, scale = quantize_weight(w)
    for h in (torch.eye(64, dtype=torch.float64),
              torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1)):
        q = gptq_quantize(w, h, scale, block=16, act_order=act_order)
        assert q.dtype == torch.int8 and torch.equal(q, q_rtn)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_correlated_inputs(act_order):
    g = torch.Generator().manual_seed(2)
    k = 64
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) * 0.3 + torch.eye(k, dtype=torch.float64)
    x = torch.randn(512, k, generator=g, dtype=torch.float64) @ mix  # correlated channels
    x[:, :4] *= 5  # and a few large ones
    acc = HessianAccumulator(k)
    acc.add(x[:256])
    acc.add(x[256:])
    # measured bit-equal; 1e-13 is the float64 rounding of a 512-term sum taken in another order
    assert acc.tokens == 512 and torch.allclose(acc.h, x.T @ x, rtol=1e-13, atol=0)
    w = _weight(k=k)
    q_rtn, scale = quantize_weight(w)
    q = gptq_quantize(w, acc.h, scale, block=16, act_order=act_order)
    assert q.min() >= QMIN and q.max() <= QMAX

    def out_err(qv):
        return float((x @ (w - qv.double() * scale.double()).T).norm())

    assert out_err(q) < 0.8 * out_err(q_rtn), (out_err(q), out_err(q_rtn))


def _correlated_hessian(k=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, k, generator=g, dtype=torch.float64) @ (
        torch.randn(k, k, generator=g, dtype=torch.float64) * 0.3 + torch.eye(k, dtype=torch.float64))
    return x, x.T @ x


def test_output_error_is_the_rows_squared_output_error():
    x, h = _correlated_hessian()
    w = _weight()
    q, scale = quantize_weight(w, torch.full((24,), 0.9))
    want = (x @ (w - q.double() * scale.double()).T).square().sum(0)
    assert torch.allclose(output_error(w, q, scale, h), want, rtol=1e-10)


def test_gptq_clip_search_keeps_each_rows_best_candidate():
    x, h = _correlated_hessian()
    w = _weight()
    w[3] *= 0.0  # an all-zero row: scale 0 under every candidate
    learned = torch.linspace(0.7, 1.0, 24, dtype=torch.float64)
    cands = [learned, 1.0, 0.85, 0.75]
    q, scale = gptq_clip_search(w, h, cands, block=16)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (24, 1)
    per = []
    for c in cands:  # each candidate alone: plain GPTQ with that clip's scale
        _, s_c = quantize_weight(w, c if torch.is_tensor(c) else torch.full((24,), c))
        per.append(output_error(w, gptq_quantize(w, h, s_c, block=16), s_c, h))
    best = torch.stack(per).min(0).values
    got = output_error(w, q, scale, h)
    assert torch.equal(got, best), (got, best)
    # it picks different candidates for different rows here, and beats the learned clip alone in total
    assert got.sum() < 0.97 * per[0].sum()
    assert len({round(float(s / w[i].abs().max() * QMAX), 6) for i, s in enumerate(scale[:, 0]) if i != 3}) > 1
    assert torch.equal(q[3], torch.zeros_like(q[3])) and scale[3, 0] == 0
    with pytest.raises(ValueError, match="^clips"):
        gptq_clip_search(w, h, [])


def test_calibration_with_a_gptq_clip_grid_serves_the_picked_scales():
    # train_inputs="float": both runs learn the same tensors, so only GPTQ's scales and codes may differ
    fm = tiny_model("llama")
    base = quantized_copy(fm, config(epochs=1, train_inputs="float", weight_quantizer="gptq"))
    grid = quantized_copy(fm, config(epochs=1, train_inputs="float", weight_quantizer="gptq",
                                     gptq_clip_grid=(1.0, 0.7)))
    a, b = state(base), state(grid)
    scales = [k for k in a if k.endswith("weight_scale") and "layers" in k]
    assert scales and any(not torch.equal(a[k], b[k]) for k in scales)
    for k in a:
        if k.endswith(("left_trans", "right_trans", "clip_ratio")):
            assert torch.equal(a[k], b[k]), k
    ids = CALIB[:2]
    assert torch.isfinite(grid(ids).logits).all()


def test_gptq_refuses_mismatched_shapes():
    w = _weight()
    _, scale = quantize_weight(w)
    with pytest.raises(ValueError, match="^hessian"):
        gptq_quantize(w, torch.eye(63, dtype=torch.float64), scale)
    with pytest.raises(ValueError, match="^scale"):
        gptq_quantize(w, torch.eye(64, dtype=torch.float64), scale[:-1])


# ==================================================================================== 11. CLI
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2 match tiny_config's pad/bos/eos


def _write_tiny_model_dir(path, model):
    """``save_pretrained`` plus a word-level tokenizer over 256 ids (hub.load_model needs one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), 256)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    model.save_pretrained(path)
    fast.save_pretrained(path)


def test_a_skip_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"^skip: \['\*\.o_prj'\] match no decoder linear"):
        quantize(tiny_model("llama"), QuantConfig(method="rtn", weight_quantizer="rtn",
                                                   skip=("*.self_attn.o_proj", "*.o_prj")))


def test_half_model_needs_its_own_act_dtype():
    with pytest.raises(ValueError, match="^act_dtype: the model is torch.float16"):
        quantize(tiny_model("llama").half(), QuantConfig(method="rtn", weight_quantizer="rtn",
                                                          act_dtype=torch.bfloat16))
    model = quantize(tiny_model("llama").half(), QuantConfig(method="rtn", weight_quantizer="rtn",
                                                             act_dtype=torch.float16))
    q = model.model.layers[0].self_attn.q_proj
    assert q.act_dtype == torch.float16 and q.left_trans.dtype == torch.float16


def test_unused_calibration_inputs_warn():
    with pytest.warns(UserWarning, match="calib_data: method='rtn'.*ignored"):
        quantize(tiny_model("llama"), QuantConfig(method="rtn", weight_quantizer="rtn"), CALIB)
    with pytest.warns(UserWarning, match="epochs, lr: only method='flatquant' trains"):
        quantize(tiny_model("llama"), QuantConfig(method="hadamard", weight_quantizer="rtn", epochs=2, lr=1e-3))


def test_quantize_cli_rejects_flags_it_would_ignore(tmp_path):
    from flatquant_lab.cli import main

    with pytest.raises(SystemExit, match="--epochs, --calib-data: not used by --method rtn"):
        main(["quantize", "--model", str(tmp_path / "never-loaded"), "--method", "rtn", "--weight-quantizer", "rtn",
              "--out", str(tmp_path / "o"),
              "--epochs", "3", "--calib-data", "x.txt"])
    with pytest.raises(SystemExit, match="--lr: not used by --method hadamard with --weight-quantizer gptq"):
        main(["quantize", "--model", "m", "--method", "hadamard", "--weight-quantizer", "gptq", "--samples", "4",
              "--lr", "0.1", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--e2e-epochs: not used by --method hadamard"):
        main(["quantize", "--model", "m", "--method", "hadamard", "--e2e-epochs", "2", "--out", str(tmp_path / "o")])


def test_quantize_cli_on_a_tiny_model_directory(tmp_path, capsys):
    from flatquant_lab.cli import main
    from flatquant_lab.hub import load_model

    fm = tiny_model("llama")  # (transformers maps a qwen2 config to its own Qwen2Tokenizer class)
    src = tmp_path / "tiny"
    _write_tiny_model_dir(src, fm)
    m, tok = load_model(str(src))
    assert torch.equal(logits(m), logits(fm))

    out = tmp_path / "rtn"
    assert main(["quantize", "--model", str(src), "--method", "rtn", "--weight-quantizer", "rtn",
                 "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == str(out) and set(printed["kept_float"]) == {"lm_head"}
    loaded = load_quantized(out)
    assert (out / "tokenizer.json").is_file()
    direct = quantize(copy.deepcopy(fm), QuantConfig(method="rtn", weight_quantizer="rtn"))
    assert torch.equal(logits(loaded), logits(direct))

    # FlatQuant from a text file, with a work dir and a skip
    text = tmp_path / "calib.txt"
    rng = torch.Generator().manual_seed(5)
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(4, 256, (400,), generator=rng)))
    out2 = tmp_path / "fq"
    argv = ["quantize", "--model", str(src), "--out", str(out2), "--calib-data", str(text), "--samples", "4",
            "--seqlen", "16", "--epochs", "1", "--work-dir", str(tmp_path / "work"),
            "--skip", "*.layers.1.mlp.down_proj"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["kept_float"]) == {"model.layers.1.mlp.down_proj", "lm_head"}
    assert len(printed["e2e_kl"]) == 4  # the fast profile's end-to-end stage ran (4 epochs)
    loaded2 = load_quantized(out2)
    assert type(loaded2.model.layers[1].mlp.down_proj) is nn.Linear
    assert type(loaded2.model.layers[0].mlp.down_proj) is W4A4FlatQuantLinear
    assert torch.isfinite(logits(loaded2)).all()
    assert (tmp_path / "work" / "layer_0001.safetensors").is_file()
