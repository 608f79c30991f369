"""Which linears layer-wise calibration quantizes: skip patterns keep whole fused groups float, the
output head stays float, a down_proj the NPU op cannot run falls back to float, and a skip pattern that
matches nothing is an error.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from flatquant_lab.api import quantize
from flatquant_lab.io import DESCRIPTION_FILE, FLOAT_TYPE, load_quantized, save_quantized
from flatquant_lab.kronecker import decompose_dim, npu_supported
from flatquant_lab.layers import W4A4FlatQuantLinear
from flatquant_lab.models import GROUPS, LINEAR_NAMES, decoder_layers
from flatquant_lab.recipe import QuantConfig
from tiny_models import config, logits, quantized_copy, rel, tiny_model, tiny_model_with


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


def test_a_skip_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"^skip: \['\*\.o_prj'\] match no decoder linear"):
        quantize(tiny_model("llama"), QuantConfig(method="rtn", weight_quantizer="rtn",
                                                   skip=("*.self_attn.o_proj", "*.o_prj")))
