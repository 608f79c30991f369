"""fq.set_group_clip_ratio: one call sets the clip ratio of a fused group (q/k/v; gate/up), as vLLM loads it."""
import pytest
import torch

import flatquant_lab as fq
from tiny_models import random_quantize, tiny_model


def _clips(model, names):
    return [float(model.get_submodule(n).clip_ratio) for n in names]


def test_set_group_clip_ratio_sets_every_member_and_nothing_else():
    model = random_quantize(tiny_model("llama"), clip_ratio=0.9, groups=("attn", "mlp"))  # o/down stay float
    groups = fq.clip_groups(model)
    assert sorted(groups) == ["model.layers.0.attn", "model.layers.0.mlp", "model.layers.1.attn",
                              "model.layers.1.mlp"]
    qkv = [f"model.layers.1.self_attn.{p}_proj" for p in "qkv"]
    assert fq.set_group_clip_ratio(model, "model.layers.1.attn", 0.8) == qkv
    assert _clips(model, qkv) == [float(torch.tensor(0.8, dtype=torch.float32))] * 3
    # vLLM's fused module name, and (layer index, group name), reach the same groups
    gate_up = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert fq.set_group_clip_ratio(model, "model.layers.0.mlp.gate_up_proj", 0.75) == gate_up
    assert fq.set_group_clip_ratio(model, (1, "attn"), 0.7) == qkv
    assert _clips(model, gate_up) == [0.75, 0.75] and _clips(model, qkv) == [pytest.approx(0.7)] * 3
    untouched = groups["model.layers.0.attn"] + groups["model.layers.1.mlp"]
    assert _clips(model, untouched) == [pytest.approx(0.9)] * 5


@pytest.mark.parametrize("group", ["model.layers.7.attn", "model.layers.0.qkv", "self_attn.q_proj", ("0", "attn"), 3])
def test_set_group_clip_ratio_refuses_an_unknown_group(group):
    model = random_quantize(tiny_model("llama"), clip_ratio=0.9)
    with pytest.raises(ValueError, match=r"^group: "):
        fq.set_group_clip_ratio(model, group, 0.8)
    assert {float(m.clip_ratio) for m in model.modules() if isinstance(m, fq.W4A4FlatQuantLinear)} == \
        {float(torch.tensor(0.9))}


def test_set_group_clip_ratio_names_the_groups_it_knows_and_refuses_one_without_w4a4():
    model = random_quantize(tiny_model("qwen2"), groups=("attn", "mlp"))
    with pytest.raises(ValueError, match=r"^group: unknown group 'model.layers.2.attn'; this model's groups are "
                                         r"\['model.layers.0.attn', 'model.layers.0.mlp', "):
        fq.set_group_clip_ratio(model, "model.layers.2.attn", 0.8)
    with pytest.raises(ValueError, match=r"^group: 'model.layers.0.down' has no W4A4 FlatQuant linear \(its linears "
                                         r"are float"):
        fq.set_group_clip_ratio(model, "model.layers.0.down", 0.8)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.01, float("nan"), float("inf"), "0.9", True])
def test_set_group_clip_ratio_refuses_a_ratio_outside_0_1(ratio):
    model = random_quantize(tiny_model("llama"), clip_ratio=0.9)
    with pytest.raises(ValueError, match=r"^clip_ratio: expected a "):
        fq.set_group_clip_ratio(model, "model.layers.0.attn", ratio)
    assert _clips(model, fq.clip_groups(model)["model.layers.0.attn"]) == [pytest.approx(0.9)] * 3
    fq.set_group_clip_ratio(model, "model.layers.0.attn", 1.0)  # the top end is allowed
    assert _clips(model, fq.clip_groups(model)["model.layers.0.attn"]) == [1.0] * 3
