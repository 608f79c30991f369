"""What ``quantize`` / ``calibrate`` accept and refuse: unsupported or already quantized models,
calibration data, config values, act_dtype of a half model; and the model is changed in place, never copied.
"""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

from flatquant_lab import calibrate as cal
from flatquant_lab.api import quantize
from flatquant_lab.calibrate import calibrate
from flatquant_lab.layers import W4A4FlatQuantLinear
from flatquant_lab.models import UnsupportedModelError, decoder_layers
from flatquant_lab.recipe import QuantConfig
from tiny_models import CALIB, assert_same_state, config, quantized_copy, state, tiny_model

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


# ==================================================================================== refusals
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


# ==================================================================================== memory
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


# ==================================================================================== bad inputs
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
