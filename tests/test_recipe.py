"""Per-module recipes: presets, mappings, fused modules, the fallback for sizes the NPU op cannot run,
and calibrate building W8A8DynamicLinear (RTN or GPTQ) where the recipe says so."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatquant_lab.api import quantize
from flatquant_lab.calibrate import finalize, plan_layer
from flatquant_lab.kronecker import npu_supported
from flatquant_lab.layers import W4A4FlatQuantLinear, W8A8DynamicLinear
from flatquant_lab.models import LINEAR_NAMES, decoder_layers
from flatquant_lab.recipe import RECIPES, QuantConfig
from tiny_models import CALIB, logits, rel, tiny_model, tiny_model_with, write_tiny_model_dir

BUDGET = dict(profile="paper", weight_quantizer="rtn", samples=8, seqlen=32, batch_size=4)


# ------------------------------------------------------------------ the config
def test_presets_and_mapping_resolve_first_match_wins():
    cfg = QuantConfig(recipe="msmodelslim")
    assert cfg.scheme_for("model.layers.3.self_attn.o_proj")[0] == "w8a8_dynamic"
    assert cfg.scheme_for("model.layers.3.mlp.down_proj")[0] == "w8a8_dynamic"
    assert cfg.scheme_for("model.layers.3.self_attn.q_proj")[0] == "w4a4_flatquant"
    assert QuantConfig().scheme_for("model.layers.0.mlp.down_proj")[0] == "w4a4_flatquant"  # "w4a4", the default
    m = QuantConfig(recipe={"model.layers.0.*": "float", "*.down_proj": "w8a8_dynamic"})
    assert m.scheme_for("model.layers.0.mlp.down_proj")[0] == "float"  # the first pattern wins
    assert m.scheme_for("model.layers.1.mlp.down_proj")[0] == "w8a8_dynamic"
    assert m.scheme_for("model.layers.1.mlp.up_proj") == ("float", "no pattern of recipe (mapping) matches it")
    # skip comes before every recipe pattern, as "float"
    s = QuantConfig(recipe="msmodelslim", skip=("*.layers.1.*",))
    assert s.scheme_for("model.layers.1.self_attn.o_proj") == ("float", "QuantConfig.skip matches '*.layers.1.*'")
    assert QuantConfig(recipe="msmodelslim").to_dict()["recipe"] == "msmodelslim"
    assert set(RECIPES) == {"w4a4", "msmodelslim"}


@pytest.mark.parametrize("kw, match", [
    (dict(recipe="msmodelslim2"), r"recipe: expected a preset \('w4a4', 'msmodelslim'\)"),
    (dict(recipe={"*": "w4a8"}), r"recipe: '\*' maps to 'w4a8'; expected one of"),
    (dict(recipe={}), "recipe: expected at least one pattern"),
    (dict(recipe=["*"]), "recipe: expected a preset .* got list"),
    (dict(fallback="w4a4_flatquant"), r"fallback: expected one of \('w8a8_dynamic', 'float'\)"),
])
def test_bad_recipes(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kw)


def test_a_fused_module_split_across_schemes_is_refused():
    cfg = QuantConfig(recipe={"*.k_proj": "w8a8_dynamic", "*": "w4a4_flatquant"})
    with pytest.raises(ValueError, match=r"recipe: model.layers.0.self_attn.q_proj is w4a4_flatquant, "
                                         r"model.layers.0.self_attn.k_proj is w8a8_dynamic, .* \(qkv_proj\)"):
        plan_layer(tiny_model("llama"), 0, cfg)


def test_a_recipe_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"recipe: \['\*\.o_prj'\] match no decoder linear"):
        quantize(tiny_model("llama"), QuantConfig(method="rtn", weight_quantizer="rtn",
                                                   recipe={"*.o_prj": "float", "*": "w4a4_flatquant"}))


# ------------------------------------------------------------------ plans
def test_fallback_for_a_size_the_npu_op_cannot_run(caplog):
    # intermediate 96 = 8 x 12: n2 % 8 != 0, so down_proj cannot take FlatQuant
    fm = tiny_model_with("llama", intermediate_size=96)
    reason = "npu_kronecker_quant cannot run 8x12: " + npu_supported(8, 12).reason
    down = {g.name: g for g in plan_layer(fm, 0, QuantConfig())}["down"]
    assert (down.scheme, down.fallback, down.skip_reason, down.quantized) == ("w8a8_dynamic", True, reason, False)
    down_f = {g.name: g for g in plan_layer(fm, 0, QuantConfig(fallback="float"))}["down"]
    assert (down_f.scheme, down_f.skip_reason) == ("float", reason)
    with caplog.at_level("WARNING", logger="flatquant_lab.calibrate"):
        model = quantize(copy.deepcopy(fm), QuantConfig(method="rtn", weight_quantizer="rtn"))
    rep = model.flatquant_report
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert rep["fallbacks"] == {n: reason for n in names}
    assert set(rep["skipped"]) == {"lm_head"}
    warned = [r.getMessage() for r in caplog.records if "instead of W4A4 FlatQuant" in r.getMessage()]
    assert warned == [f"2 of 14 decoder linears will be w8a8_dynamic (the fallback scheme) instead of W4A4 FlatQuant: "
                      f"mlp.down_proj in every layer, because {reason}"]  # once, for the whole model
    for layer in decoder_layers(model):
        assert type(layer.mlp.down_proj) is W8A8DynamicLinear
        assert type(layer.mlp.up_proj) is W4A4FlatQuantLinear
    assert torch.isfinite(logits(model)).all() and rel(logits(model), logits(fm)) < 1.0
    floats = quantize(copy.deepcopy(fm), QuantConfig(method="rtn", weight_quantizer="rtn", fallback="float"))
    assert set(floats.flatquant_report["skipped"]) == {*names, "lm_head"}
    assert all(type(layer.mlp.down_proj) is nn.Linear for layer in decoder_layers(floats))


# ------------------------------------------------------------------ calibrate with the msModelSlim recipe
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_msmodelslim_recipe_builds_w8a8_on_o_and_down(model_type):
    fm = tiny_model(model_type)
    model = quantize(copy.deepcopy(fm), QuantConfig(recipe="msmodelslim", epochs=1, **BUDGET), CALIB)
    for layer in decoder_layers(model):
        for n in LINEAR_NAMES:
            want = W8A8DynamicLinear if n in ("self_attn.o_proj", "mlp.down_proj") else W4A4FlatQuantLinear
            assert type(layer.get_submodule(n)) is want, n
    schemes = model.flatquant_report["schemes"]
    assert schemes["model.layers.1.mlp.down_proj"] == "w8a8_dynamic"
    assert schemes["model.layers.1.mlp.gate_proj"] == "w4a4_flatquant"
    assert set(model.flatquant_report["skipped"]) == {"lm_head"}
    assert set(model.flatquant_report["layers"][0]["clip_ratios"]) == {"attn", "mlp"}  # no transform on o/down
    # int8 on o/down is closer to float than int4 everywhere. Compared without training (method "rtn": identity
    # transforms, round-to-nearest), so that the claim is the arithmetic's, not a training run's: measured 0.88x
    # (llama) and 0.83x (qwen2) of the all-W4A4 error (AMD EPYC, 1 thread; trained with one epoch it was 0.96x
    # for llama, too close to call across machines).
    untrained = {**BUDGET, "method": "rtn"}
    w8 = quantize(copy.deepcopy(fm), QuantConfig(recipe="msmodelslim", **untrained))
    w4 = quantize(copy.deepcopy(fm), QuantConfig(**untrained))
    assert rel(logits(w8), logits(fm)) < rel(logits(w4), logits(fm)), \
        "int8 on o/down should be closer to float than int4 everywhere"


def test_w8a8_gptq_weights_come_from_the_layer_inputs(monkeypatch):
    fm = tiny_model("llama")
    seen = []
    real = finalize.w8a8_dynamic_layer

    def spy(linear, weights="rtn", hessian=None, **kw):
        seen.append((weights, None if hessian is None else tuple(hessian.shape)))
        return real(linear, weights=weights, hessian=hessian, **kw)

    monkeypatch.setattr(finalize, "w8a8_dynamic_layer", spy)
    cfg = QuantConfig(method="rtn", weight_quantizer="gptq", recipe="msmodelslim", samples=8, seqlen=32, batch_size=4)
    model = quantize(copy.deepcopy(fm), cfg, CALIB)
    # o_proj's input is [.., 64] (4 heads x 16), down_proj's [.., 128]; two layers
    assert seen == [("gptq", (64, 64)), ("gptq", (128, 128))] * 2
    rtn = quantize(copy.deepcopy(fm), QuantConfig(method="rtn", weight_quantizer="rtn", recipe="msmodelslim"))
    o_g = decoder_layers(model)[0].self_attn.o_proj
    o_r = decoder_layers(rtn)[0].self_attn.o_proj
    assert torch.equal(o_g.weight_scale, o_r.weight_scale) and not torch.equal(o_g.weight_int, o_r.weight_int)


# ------------------------------------------------------------------ the CLI
def test_quantize_cli_recipe(tmp_path, capsys):
    import json


    from flatquant_lab.cli import main
    from flatquant_lab.io import DESCRIPTION_FILE, load_quantized

    fm = tiny_model("llama")
    src = tmp_path / "tiny"
    write_tiny_model_dir(src, fm)
    out = tmp_path / "mix"
    assert main(["quantize", "--model", str(src), "--method", "rtn", "--weight-quantizer", "rtn",
                 "--recipe", "msmodelslim", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["kept_float"]) == {"lm_head"} and printed["fallbacks"] == {}
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    assert desc["model.layers.0.mlp.down_proj.weight"] == "W8A8_DYNAMIC"
    assert desc["model.layers.0.mlp.up_proj.weight"] == "W4A4_FLATQUANT_DYNAMIC"
    assert type(load_quantized(out).model.layers[1].self_attn.o_proj) is W8A8DynamicLinear
    # a JSON mapping; the fused q/k/v all float
    out2 = tmp_path / "map"
    assert main(["quantize", "--model", str(src), "--method", "rtn", "--weight-quantizer", "rtn", "--out", str(out2),
                 "--recipe",
                 '{"*.self_attn.[qkv]_proj": "float", "*": "w4a4_flatquant"}']) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["kept_float"]) == {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkv"} | {
        "lm_head"}
    with pytest.raises(SystemExit):
        main(["quantize", "--model", str(src), "--out", str(tmp_path / "x"), "--recipe", "w8a8"])
    assert "expected a preset (w4a4, msmodelslim)" in capsys.readouterr().err


def test_config_is_composed_of_small_frozen_parts_resolved_at_construction():
    import dataclasses

    from flatquant_lab.recipe import FLAT_NAMES, PROFILES, EndToEndConfig, GPTQConfig, Placement

    cfg = QuantConfig()
    assert QuantConfig.fast() == cfg and QuantConfig.full() == QuantConfig(profile="full")
    assert QuantConfig.paper(samples=4, e2e_epochs=0).data.samples == 4
    # every budget field is a value, the profile's, not None
    for part in (cfg.data, cfg.train, cfg.e2e):
        assert all(getattr(part, f.name) is not None for f in dataclasses.fields(part))
    fast = PROFILES["fast"]
    assert (cfg.data.samples, cfg.data.seqlen, cfg.train.epochs, cfg.e2e.samples, cfg.e2e.holdout) == \
        (fast["samples"], fast["seqlen"], fast["epochs"], fast["e2e_samples"], fast["e2e_holdout"])
    for part in (cfg.data, cfg.schemes, cfg.train, cfg.gptq, cfg.e2e, cfg.placement, cfg):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(part, dataclasses.fields(part)[0].name, None)
    # flat names and parts say the same; a part may be given whole, flat names apply on top of it
    both = QuantConfig(gptq=GPTQConfig(block=64, damp=0.1), gptq_damp=0.05, e2e=EndToEndConfig(epochs=0))
    assert (both.gptq.block, both.gptq.damp, both.gptq_block, both.e2e.epochs) == (64, 0.05, 64, 0)
    assert all(getattr(both, n) == getattr(getattr(both, p), f) for n, (p, f) in FLAT_NAMES.items() if p)
    with pytest.raises(TypeError, match="gptq: expected a GPTQConfig"):
        QuantConfig(gptq=Placement())
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['gptq_blocks'\]"):
        QuantConfig(gptq_blocks=64)
    # replace keeps what was set explicitly (warnings name only those)
    cfg2 = QuantConfig(method="rtn", epochs=3).replace(device="cpu")
    assert cfg2.placement.device == "cpu" and cfg2.given == {"epochs", "device"} and cfg2.method == "rtn"
    assert QuantConfig().given == frozenset()


def test_each_validation_rule_is_one_helper():
    from flatquant_lab import checks

    assert checks.positive_int(3, "n") == 3
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(ValueError, match=r"^n: expected a positive int, got "):
            checks.positive_int(bad, "n")
    with pytest.raises(ValueError, match=r"^k: expected an int >= 0, got -1"):
        checks.non_negative_int(-1, "k")
    with pytest.raises(ValueError, match=r"^lr: expected a finite float > 0, got nan"):
        checks.positive_float(float("nan"), "lr")
    with pytest.raises(ValueError, match=r"^p: expected a float in \[0, 1\], got 1.5"):
        checks.float_in(1.5, "p")
    with pytest.raises(ValueError, match=r"^mode: expected one of \('a', 'b'\), got 'c'"):
        checks.one_of("c", "mode", ("a", "b"))
    with pytest.raises(ValueError, match=r"^flag: expected a bool, got 1"):
        checks.boolean(1, "flag")
