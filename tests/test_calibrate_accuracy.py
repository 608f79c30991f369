"""Layer-wise calibration (``calibrate`` / ``quantize``): accuracy ordering, fidelity of the int4
layers to the trained fake-quant forward, determinism.

Everything runs on the tiny random models of ``tiny_models`` (hidden 64, 2 layers) with a few
calibration samples of 32 tokens and 1-2 epochs, so that the file stays fast on 2 shared cores.
Calibration and held-out ids are random tokens drawn from different generators.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from flatquant_lab import ops
from flatquant_lab.api import quantize
from flatquant_lab.calibrate import FakeQuantLinear, WorkDir, install_fake_quant, plan_layer
from flatquant_lab.io import DESCRIPTION_FILE, FLOAT_TYPE, QUANT_TYPE, load_quantized, save_quantized
from flatquant_lab.layers import W4A4FlatQuantLinear
from flatquant_lab.models import GROUPS, LINEAR_NAMES, decoder_layers
from flatquant_lab.packing import unpack_int4
from flatquant_lab.quantizers import QMAX, QMIN, quant_act_reference, weight_scale
from tiny_models import (BUDGET, CALIB, MODEL_TYPES, OUTLIER_CHANNELS, OUTLIER_SCALES, assert_same_state, config,
                         logits, quantized_copy, rel, state, tiny_model)


def logit_error(float_model, ref_logits, **cfg_kw) -> float:
    return rel(logits(quantized_copy(float_model, config(**cfg_kw))), ref_logits)


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


# ==================================================================================== accuracy
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


# ==================================================================================== fidelity
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


# ==================================================================================== determinism
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
