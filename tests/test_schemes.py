"""The scheme registry (flatquant_lab/schemes/): the built-in schemes, a round trip through each, a scheme
registered here that save and load pick up without any other file changing, and unknown description values."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

import flatquant_lab
from flatquant_lab.dtypes import FLOAT_DTYPES
from flatquant_lab.io import DESCRIPTION_FILE, CheckpointError, check_checkpoint, load_quantized, save_quantized
from flatquant_lab.kronecker import fold_weight
from flatquant_lab.layers import W4A4FlatQuantLinear, W4A4MXFP4FlatQuantLinear, W8A8DynamicLinear
from flatquant_lab.models import decoder_layers, linear_weight_bytes, quantized_linear_names, set_submodule
from flatquant_lab.numerics import check_layer, dequantized_reference
from flatquant_lab.quantizers import quantize_weight
from flatquant_lab.schemes import (
    FLOAT, SCHEMES, W4A4_FLATQUANT_DYNAMIC, W4A4_MXFP4_FLATQUANT, W8A8_DYNAMIC, Scheme, TensorSpec, W8A8DynamicScheme, known_types,
    quantized_schemes, register, scheme_for, scheme_of, unregister,
)
from tiny_models import group_factors, random_linear, random_quantize, tiny_model

O, K = 24, 64
BUILT_IN = ("W4A4_FLATQUANT_DYNAMIC", "W8A8_DYNAMIC", "FLOAT", "W4A4_MXFP4_FLATQUANT")
IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))


_float_linear = partial(random_linear, K, O)


def _tensors(quant_type: str) -> dict[str, torch.Tensor]:
    """One linear's checkpoint tensors of each built-in scheme, with a bias."""
    lin = _float_linear()
    if quant_type == "W4A4_FLATQUANT_DYNAMIC":
        left, right = group_factors(K, seed=3)
        return W4A4FlatQuantLinear.from_float(lin, left, right, clip_ratio=0.9, act_dtype=torch.bfloat16,
                                              backend="reference").checkpoint_tensors()
    if quant_type == "W8A8_DYNAMIC":
        return W8A8DynamicLinear.from_float(lin, act_dtype=torch.bfloat16, backend="reference").checkpoint_tensors()
    if quant_type == "W4A4_MXFP4_FLATQUANT":
        left, right = group_factors(K, seed=3)
        return W4A4MXFP4FlatQuantLinear.from_float(lin, left, right, clip_ratio=0.9, act_dtype=torch.bfloat16,
                                                   backend="reference").checkpoint_tensors()
    return {"weight": lin.weight.detach().clone(), "bias": lin.bias.detach().clone()}


# ------------------------------------------------------------------ the registry
def test_the_registry_lists_exactly_the_built_in_schemes():
    assert known_types() == BUILT_IN
    assert list(SCHEMES) == list(BUILT_IN)
    assert [SCHEMES[t] for t in BUILT_IN] == [W4A4_FLATQUANT_DYNAMIC, W8A8_DYNAMIC, FLOAT, W4A4_MXFP4_FLATQUANT]
    assert list(quantized_schemes()) == ["W4A4_FLATQUANT_DYNAMIC", "W8A8_DYNAMIC", "W4A4_MXFP4_FLATQUANT"]
    # no recipe (calibration) for MXFP4 yet
    assert [s.recipe_name for s in SCHEMES.values()] == ["w4a4_flatquant", "w8a8_dynamic", "float", None]
    for qt, scheme in SCHEMES.items():
        assert isinstance(scheme, Scheme) and scheme.quant_type == qt and scheme_for(qt) is scheme


def test_scheme_of_finds_a_layer_by_its_class():
    w4 = W4A4_FLATQUANT_DYNAMIC.build(_tensors("W4A4_FLATQUANT_DYNAMIC"))
    w8 = W8A8_DYNAMIC.build(_tensors("W8A8_DYNAMIC"))
    assert scheme_of(w4) is W4A4_FLATQUANT_DYNAMIC and scheme_of(w8) is W8A8_DYNAMIC
    assert scheme_of(nn.Linear(4, 4)) is FLOAT
    assert scheme_of(nn.LayerNorm(4)) is None
    assert W4A4_FLATQUANT_DYNAMIC.has_clip_ratio and not W8A8_DYNAMIC.has_clip_ratio


def test_register_refuses_a_second_scheme_for_a_value_or_a_layer_class():
    with pytest.raises(ValueError, match="quant type 'W8A8_DYNAMIC' is already registered"):
        register(W8A8DynamicScheme)

    class Other(W8A8DynamicScheme):
        quant_type = "W8A8_OTHER"

    with pytest.raises(ValueError, match="layer_cls W8A8DynamicLinear already computes 'W8A8_DYNAMIC'"):
        register(Other)
    with pytest.raises(ValueError, match="expected a Scheme subclass"):
        register(W8A8_DYNAMIC)
    assert known_types() == BUILT_IN


def test_unknown_type_strings_are_refused_naming_the_key_and_the_known_types():
    known = "'W4A4_FLATQUANT_DYNAMIC', 'W8A8_DYNAMIC', 'FLOAT', 'W4A4_MXFP4_FLATQUANT'"
    with pytest.raises(ValueError, match=f"quant_type: 'W4A8_DYNAMIC' is not a registered scheme; known: {known}$"):
        scheme_for("W4A8_DYNAMIC")
    key = "model.layers.0.mlp.down_proj.weight"
    with pytest.raises(CheckpointError, match=rf"^{key}: description says 'W4A8_DYNAMIC'; flatquant_lab handles only "
                                              rf"{known}$"):
        check_checkpoint({key: torch.zeros(4, 8)}, {key: "W4A8_DYNAMIC"})


# ------------------------------------------------------------------ each scheme
@pytest.mark.parametrize("quant_type", BUILT_IN)
def test_each_scheme_round_trips(quant_type):
    scheme = scheme_for(quant_type)
    tensors = _tensors(quant_type)
    specs = scheme.tensor_specs(O, K)
    assert list(specs) == [*scheme.names, "bias"] and list(tensors) == list(specs)
    for name, spec in specs.items():
        assert tuple(tensors[name].shape) == spec.shape, name
    scheme.check(tensors)
    layer = scheme.build(tensors, backend="reference")
    assert type(layer) is scheme.layer_cls and scheme_of(layer) is scheme
    back = scheme.tensors_of(layer)
    assert list(back) == list(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    again = scheme.build(back, backend="reference")
    x = torch.randn(5, K).to(torch.bfloat16 if scheme.quantized else tensors["weight"].dtype)
    assert torch.equal(again(x), layer(x))


@pytest.mark.parametrize("quant_type", ["W4A4_FLATQUANT_DYNAMIC", "W8A8_DYNAMIC"])
def test_scheme_check_names_the_tensor(quant_type):
    scheme = scheme_for(quant_type)
    bad = {**_tensors(quant_type), "weight_scale": torch.ones(O)}
    with pytest.raises(ValueError, match=rf"^weight_scale: expected shape \[{O}, 1\], got \[{O}\]$"):
        scheme.check(bad)
    with pytest.raises(ValueError, match=r"^weight: expected an int8 matrix \[O, K\], got shape \[24\]"):
        scheme.check({**_tensors(quant_type), "weight": torch.zeros(O, dtype=torch.int8)})


def test_from_float_builds_what_the_layer_builds_from_the_same_weights():
    lin = _float_linear()
    w8 = W8A8_DYNAMIC.from_float(lin, *quantize_weight(lin.weight.detach(), bits=8, scale_dtype=torch.bfloat16),
                                 act_dtype=torch.bfloat16, backend="reference")
    ref8 = W8A8DynamicLinear.from_float(lin, act_dtype=torch.bfloat16, backend="reference")
    left, right = (t.to(torch.bfloat16) for t in group_factors(K, seed=3))
    q, scale = quantize_weight(fold_weight(lin.weight.detach().double(), left, right))
    w4 = W4A4_FLATQUANT_DYNAMIC.from_float(lin, q, scale, act_dtype=torch.bfloat16, backend="reference",
                                           left_trans=left, right_trans=right, clip_ratio=0.9)
    ref4 = W4A4FlatQuantLinear.from_float(lin, left, right, clip_ratio=0.9, act_dtype=torch.bfloat16,
                                          backend="reference")
    for got, want in ((w8, ref8), (w4, ref4)):
        a, b = got.checkpoint_tensors(), want.checkpoint_tensors()
        assert list(a) == list(b) and all(torch.equal(a[n], b[n]) and a[n].dtype == b[n].dtype for n in a)
    assert FLOAT.from_float(lin, None, None) is lin


def test_tp_shard_narrows_what_vllm_narrows():
    tensors = _tensors("W4A4_FLATQUANT_DYNAMIC")
    rank1 = W4A4_FLATQUANT_DYNAMIC.shard(tensors, rank=1, tp=2)  # row-parallel: input columns, no bias off rank 0
    assert torch.equal(rank1["weight"], tensors["weight"][:, K // 2:]) and "bias" not in rank1
    assert torch.equal(rank1["weight_scale"], tensors["weight_scale"])
    rows = W4A4_FLATQUANT_DYNAMIC.shard(tensors, rank=0, tp=2, rows=slice(0, O // 2))  # column-parallel
    assert torch.equal(rows["weight"], tensors["weight"][:O // 2])
    assert torch.equal(rows["bias"], tensors["bias"][:O // 2])
    assert all(torch.equal(rows[n], tensors[n]) for n in W4A4_FLATQUANT_DYNAMIC.shared)


# ------------------------------------------------------------------ a scheme added by one class and one register()
class ToyFloatLinear(nn.Linear):
    """A float linear stored under its own description value."""


class ToyFloatScheme(Scheme):
    """A FLOAT-like scheme: ``weight`` and ``bias`` as they are, labelled ``TOY_FLOAT``."""

    quant_type = "TOY_FLOAT"
    layer_cls = ToyFloatLinear
    names = ("weight",)
    weight_dtypes = FLOAT_DTYPES
    weight_what = "a float matrix"
    act_dtype_tensors = ("weight", "bias")

    def tensor_specs(self, out_features, in_features, tp_size=1):
        return {"weight": TensorSpec((out_features, in_features), FLOAT_DTYPES),
                "bias": TensorSpec((out_features,), "weight")}

    def build(self, tensors, *, backend=None, act_dtype=None, tp_size=1):
        self.check(tensors)
        w = tensors["weight"]
        layer = ToyFloatLinear(w.shape[1], w.shape[0], bias="bias" in tensors, device=w.device,
                               dtype=act_dtype or w.dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
            if "bias" in tensors:
                layer.bias.copy_(tensors["bias"])
        return layer

    def from_float(self, linear, q=None, scale=None, *, act_dtype=None, backend=None, tp_size=1):
        return self.build(self.tensors_of(linear))

    def tensors_of(self, layer):
        return {"weight": layer.weight.detach(), **({"bias": layer.bias.detach()} if layer.bias is not None else {})}

    def act_dtype_of(self, layer):
        return None

    def tp_size_of(self, layer):
        return 1

    def input_basis_weight(self, layer):
        return layer.weight.detach().cpu().double()

    def load_act_dtype(self, tensors, *, dtype, saved_act, saved_dtype):
        return dtype or saved_dtype


@pytest.fixture
def toy():
    scheme = register(ToyFloatScheme)
    yield scheme
    unregister(ToyFloatScheme.quant_type)


TOY_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # one fused module: one scheme


def test_a_registered_scheme_is_saved_and_loaded_without_touching_other_files(toy, tmp_path):
    model = random_quantize(tiny_model("qwen2"), seed=0)
    layer0 = decoder_layers(model)[0]
    plain = decoder_layers(tiny_model("qwen2"))[0]
    for name in TOY_LINEARS:  # q/k/v biases: the optional bias travels too
        set_submodule(layer0, name, toy.from_float(plain.get_submodule(name)))
    prefixes = [f"model.layers.0.{n}" for n in TOY_LINEARS]
    assert set(prefixes) <= set(quantized_linear_names(model))
    assert linear_weight_bytes(model) > 0
    out = save_quantized(model, tmp_path / "toy")
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    assert desc["model_quant_type"] == "W4A4_FLATQUANT_DYNAMIC"  # the higher precedence of the two present
    for p in prefixes:
        assert desc[f"{p}.weight"] == desc[f"{p}.bias"] == "TOY_FLOAT"
    assert desc["model.layers.1.self_attn.q_proj.weight"] == "W4A4_FLATQUANT_DYNAMIC"

    loaded = load_quantized(out)
    for p in prefixes:
        assert type(loaded.get_submodule(p)) is ToyFloatLinear
    assert type(loaded.get_submodule("model.layers.0.mlp.up_proj")) is W4A4FlatQuantLinear
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    again = save_quantized(loaded, tmp_path / "again")
    for f in sorted(p.name for p in out.iterdir()):
        assert (out / f).read_bytes() == (again / f).read_bytes(), f

    toy_layer = loaded.get_submodule(prefixes[0])
    torch.testing.assert_close(dequantized_reference(toy_layer).weight, toy_layer.weight.double())
    with pytest.raises(ValueError, match=r"qlinear: no op-by-op check for a ToyFloatLinear \(TOY_FLOAT\)"):
        check_layer(toy_layer, torch.randn(2, toy_layer.in_features))

    unregister("TOY_FLOAT")  # the same checkpoint without the scheme: refused, naming the key and the known values
    try:
        with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.[qkv]_proj\.(weight|bias): "
                                                  r"description says 'TOY_FLOAT'; flatquant_lab handles only "
                                                  r"'W4A4_FLATQUANT_DYNAMIC', 'W8A8_DYNAMIC', 'FLOAT', "
                                                  r"'W4A4_MXFP4_FLATQUANT'"):
            load_quantized(out)
    finally:
        register(ToyFloatScheme)


def test_schemes_import_nothing_above_them():
    # layers -> schemes -> models -> calibrate -> io -> eval -> cli: the registry must not pull in a later stage
    root = str(Path(flatquant_lab.__file__).parent.parent)
    code = ("import sys, flatquant_lab.schemes\n"
            "later = ('models', 'calibrate', 'io', 'eval', 'cli', 'numerics', 'api')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[:2][-1] in later and m.startswith('flatquant_lab.')))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout
