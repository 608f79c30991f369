"""Mixed checkpoints: W4A4_FLATQUANT_DYNAMIC, W8A8_DYNAMIC and FLOAT in one model, saved by us and
written in msModelSlim's layouts (docs/checkpoint-format.md, "msModelSlim's file names") by
tests/msmodelslim_fixture.py, not by our saver."""
from __future__ import annotations

import copy
import json
import os
from functools import partial

import pytest
import torch
from torch import nn

from flatquant_lab.api import quantize
from flatquant_lab.io import DESCRIPTION_FILE, CheckpointError, load_quantized, save_quantized
from flatquant_lab.layers import W4A4FlatQuantLinear, W8A8DynamicLinear
from flatquant_lab.models import LINEAR_NAMES, decoder_layers, set_submodule
from flatquant_lab.numerics import sweep_layer_clip_ratio
from flatquant_lab.recipe import QuantConfig
from msmodelslim_fixture import FLATQUANT, W8A8_DYNAMIC, msmodelslim_tensors, write_msmodelslim
from tiny_models import rel, tiny_model
from tiny_models import logits as model_logits

HELD = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(7))
logits = partial(model_logits, ids=HELD)
W8A8_NAMES = ("self_attn.o_proj", "mlp.down_proj")


def expected_model(fm: nn.Module) -> nn.Module:
    """The model the fixture describes, built by hand: bf16 floats, each layer from its own tensors."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_config(copy.deepcopy(fm.config), dtype=torch.bfloat16)
    ref.load_state_dict({k: v.to(torch.bfloat16) for k, v in fm.state_dict().items()})
    tensors, desc = msmodelslim_tensors(fm)
    for key, kind in desc.items():
        if not key.endswith(".weight") or kind not in (FLATQUANT, W8A8_DYNAMIC):
            continue
        prefix = key[: -len(".weight")]
        parts = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.rpartition(".")[0] == prefix}
        if kind == FLATQUANT:
            layer = W4A4FlatQuantLinear.from_checkpoint(parts, act_dtype=torch.bfloat16, backend="reference")
        else:
            layer = W8A8DynamicLinear.from_checkpoint(parts, act_dtype=torch.bfloat16, backend="reference")
        set_submodule(ref, prefix, layer)
    return ref.eval()


@pytest.fixture(scope="module")
def float_models():
    return {t: tiny_model(t, outliers=False) for t in ("llama", "qwen2")}  # int4 on random factors: no outliers


LAYOUTS = {
    "v1 two shards": dict(layout="v1", shards=2),
    "v1 one shard": dict(layout="v1", shards=1),
    "v1 shards without index": dict(layout="v1", shards=3, index=False),
    "legacy with weight_packed": dict(layout="legacy", shards=2, weight_packed=True),
    "legacy one file without index": dict(layout="legacy", shards=1, index=False),
}


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_msmodelslim_checkpoint_loads_every_layout(layout, model_type, float_models, tmp_path):
    fm = float_models[model_type]
    path = write_msmodelslim(tmp_path / "ckpt", fm, **LAYOUTS[layout])
    assert not (path / "model.safetensors").exists() and not (path / "config.json").read_text().count("quantization")
    model = load_quantized(path, backend="reference")
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        for n in LINEAR_NAMES:
            mod = layer.get_submodule(n)
            if last and n.startswith("mlp."):
                assert type(mod) is nn.Linear and mod.weight.dtype == torch.bfloat16, n  # FLOAT
            elif n in W8A8_NAMES:
                assert type(mod) is W8A8DynamicLinear and mod.act_dtype == torch.bfloat16, n
            else:
                assert type(mod) is W4A4FlatQuantLinear, n
    # vllm-ascend rounds the float32 W8A8 scales to the model dtype on load: that is what runs
    tensors, _ = msmodelslim_tensors(fm)
    o = layers[0].self_attn.o_proj
    fp32_scale = tensors["model.layers.0.self_attn.o_proj.weight_scale"]
    assert torch.equal(o.weight_scale, fp32_scale) and torch.equal(o.scale, fp32_scale.view(-1).bfloat16())
    assert not torch.equal(o.scale.float(), fp32_scale.view(-1))
    got = logits(model)
    assert torch.equal(got, logits(expected_model(fm)))
    # the fixture is a real quantization of the float model (a wrong fold would give errors near 1)
    assert rel(got, logits(fm)) < 0.5
    x = torch.randn(64, fm.config.hidden_size, generator=torch.Generator().manual_seed(2)).bfloat16()
    for path, bound in (("self_attn.q_proj", 0.35), ("self_attn.o_proj", 0.02)):
        f = decoder_layers(fm)[0].get_submodule(path)
        with torch.no_grad():
            err = rel(layers[0].get_submodule(path)(x).float(), f(x.float()))
        assert err < bound, (path, err)


def test_static_w8a8_is_refused_naming_the_layer(float_models, tmp_path):
    prefix = "model.layers.1.self_attn.o_proj"
    path = write_msmodelslim(tmp_path / "ckpt", float_models["llama"], static_w8a8=prefix)
    with pytest.raises(CheckpointError, match=rf"^{prefix}: description says 'W8A8' .*static W8A8"):
        load_quantized(path)


def test_missing_shard_without_index_is_named(float_models, tmp_path):
    path = write_msmodelslim(tmp_path / "ckpt", float_models["llama"], shards=3, index=False)
    os.remove(path / "quant_model_weights-00002-of-00003.safetensors")
    with pytest.raises(FileNotFoundError, match=r"misses number\(s\) \[2\]"):
        load_quantized(path)


def test_two_legacy_descriptions_are_refused(float_models, tmp_path):
    path = write_msmodelslim(tmp_path / "ckpt", float_models["llama"], layout="legacy")
    (path / "quant_model_description_w8a8_dynamic.json").write_text("{}")
    with pytest.raises(CheckpointError, match="several legacy descriptions"):
        load_quantized(path)


def test_weight_and_weight_packed_together_are_refused(float_models, tmp_path):
    from safetensors.torch import load_file, save_file

    path = write_msmodelslim(tmp_path / "ckpt", float_models["llama"], layout="legacy", shards=1, index=False,
                             weight_packed=True)
    file = next(path.glob("*.safetensors"))
    t = load_file(str(file))
    key = "model.layers.0.self_attn.q_proj.weight"
    t[key] = t[key + "_packed"].clone()
    save_file(t, str(file))
    with pytest.raises(CheckpointError, match=rf"{key}_packed: stored beside {key}"):
        load_quantized(path)


def test_clip_ratio_sweep_of_a_loaded_msmodelslim_checkpoint(float_models, tmp_path):
    fm = float_models["llama"]
    model = load_quantized(write_msmodelslim(tmp_path / "ckpt", fm), backend="reference")
    q = decoder_layers(model)[0].self_attn.q_proj
    x = torch.randn(32, q.in_features, generator=torch.Generator().manual_seed(1))
    res = sweep_layer_clip_ratio(q, x, ratios=(1.0, 0.9, 0.7))
    assert [r.ratio for r in res.rows] == [1.0, 0.9, 0.7] and res.best_ratio in (1.0, 0.9, 0.7)
    assert len({r.rel_err for r in res.rows}) == 3  # each ratio computes something different
    before = logits(model)
    q.set_clip_ratio(0.6)
    assert not torch.equal(logits(model), before)


def test_msmodelslim_checkpoint_round_trips_through_our_saver(float_models, tmp_path):
    fm = float_models["qwen2"]
    model = load_quantized(write_msmodelslim(tmp_path / "ckpt", fm), backend="reference")
    out = save_quantized(model, tmp_path / "ours")
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    assert desc["model.layers.0.self_attn.o_proj.weight"] == "W8A8_DYNAMIC"
    assert desc["model.layers.0.self_attn.o_proj.weight_scale"] == "W8A8_DYNAMIC"
    assert desc["model.layers.1.mlp.down_proj.weight"] == "FLOAT"
    assert desc["model_quant_type"] == "W4A4_FLATQUANT_DYNAMIC"
    again = load_quantized(out, backend="reference")
    assert torch.equal(logits(again), logits(model))
    # the float32 scales msModelSlim wrote survive exactly
    o = "model.layers.0.self_attn.o_proj"
    assert torch.equal(again.get_submodule(o).weight_scale, model.get_submodule(o).weight_scale)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_msmodelslim_recipe_export_loads_bit_exact(model_type, float_models, tmp_path):
    fm = float_models[model_type]
    model = quantize(copy.deepcopy(fm), QuantConfig(method="rtn", weight_quantizer="rtn", recipe="msmodelslim"))
    out = save_quantized(model, tmp_path / "out")
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    for i in range(2):
        for n in LINEAR_NAMES:
            want = "W8A8_DYNAMIC" if n in W8A8_NAMES else "W4A4_FLATQUANT_DYNAMIC"
            assert desc[f"model.layers.{i}.{n}.weight"] == want
            assert desc[f"model.layers.{i}.{n}.weight_scale"] == want
    assert "model.layers.0.self_attn.o_proj.left_trans" not in desc
    loaded = load_quantized(out)
    assert type(loaded.model.layers[0].self_attn.o_proj) is W8A8DynamicLinear
    assert torch.equal(logits(loaded), logits(model))
