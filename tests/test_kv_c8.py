"""vllm-ascend's C8 KV cache as a checkpoint feature (docs/kv-cache.md): the write/read arithmetic against hand
values, the scheme, attaching, save and load (ours and msModelSlim's), serve-check at TP 1, 2, 4 with the scales
split by kv head, and the refusals."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from flatquant_lab.api import quantize
from flatquant_lab.io import DESCRIPTION_FILE, CheckpointError, load_quantized, save_quantized, serve_check
from flatquant_lab.io.serving import kv_cache_shards
from flatquant_lab.layers import QuantizedKVCache
from flatquant_lab.models import attach_kv_cache, detach_kv_cache, kv_caches
from flatquant_lab.ops import kv_cache_dequantize, kv_cache_inverse, kv_cache_quantize
from flatquant_lab.recipe import QuantConfig
from flatquant_lab.schemes import C8, KV_CACHE_SCHEMES, C8KVCache, known_types, kv_cache_scheme_for
from msmodelslim_fixture import c8_scales, write_msmodelslim
from tiny_models import random_quantize, tiny_model

HEAD_DIM = 32  # vllm-ascend's C8 needs head_dim % 32 == 0; the default tiny configs have 16
KV_HEADS = 2
C = KV_HEADS * HEAD_DIM
IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
KEYS = ("k_proj.kv_cache_scale", "k_proj.kv_cache_offset", "v_proj.kv_cache_scale", "v_proj.kv_cache_offset")


def bf16(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bfloat16)


def scales(seed: int, layers: int = 2, shape=(C,)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [0.02 + torch.rand(shape, generator=g) / 10 for _ in range(layers)]


def c8_model(model_type: str, seed: int = 0, groups=("attn", "mlp"), **sizes):
    """A tiny model with head_dim 32, FlatQuant on q/k/v and gate/up (o/down stay float, so every TP that splits the
    heads loads), and C8 scales on every layer."""
    model = random_quantize(tiny_model(model_type, head_dim=HEAD_DIM, **sizes), seed=seed, groups=groups)
    return attach_kv_cache(model, scales(seed + 10), scales(seed + 20, shape=(C, 1)))


def rewrite(path, desc_edit=None, tensor_edit=None):
    """Edit a saved single-file checkpoint in place: its description and/or its tensors."""
    if desc_edit is not None:
        desc = json.loads((path / DESCRIPTION_FILE).read_text())
        desc_edit(desc)
        (path / DESCRIPTION_FILE).write_text(json.dumps(desc))
    if tensor_edit is not None:
        tensors = load_file(str(path / "model.safetensors"))
        tensor_edit(tensors)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


# ------------------------------------------------------------------ the arithmetic, by hand
def test_write_rounds_half_to_even_in_the_model_dtype_and_clamps():
    # scale 0.5: inv = 2 exactly; x * 2 lands on .5 ties that round to the even integer
    x = bf16(1.25, 1.75, -1.25, 0.75, 0.25, 100.0, -100.0, 0.0)
    q = C8KVCache.write(x, bf16(0.5))
    assert q.dtype == torch.int8
    assert q.tolist() == [2, 4, -2, 2, 0, 127, -128, 0]
    away_from_zero = torch.sign(x.float() * 2) * torch.floor((x.float() * 2).abs() + 0.5)
    assert away_from_zero[:5].tolist() == [3, 4, -3, 2, 1]  # what half-away-from-zero would have stored
    # the product is rounded to bf16 before round(): 1.5 * 1.671875 = 2.5078125 is a bf16 tie between 2.5 and
    # 2.515625 and goes to 2.5 (even mantissa), then to 2; computed in float32 it would be 3
    assert kv_cache_quantize(bf16(1.5), bf16(1.671875)).item() == 2
    assert kv_cache_quantize(torch.tensor([1.5]), torch.tensor([1.671875])).item() == 3
    # inv is 1 / scale taken in the model dtype: 1/3 in bf16 is 0.333984375
    assert kv_cache_inverse(torch.tensor([3.0]), torch.bfloat16).item() == 0.333984375


def test_read_is_int8_times_scale_without_the_offset():
    scale, offset = bf16(0.5), bf16(1.0)
    q = C8KVCache.write(bf16(1.25, -1.0), scale, offset)  # 2.5 + 1 = 3.5 -> 4; -2 + 1 = -1
    assert q.tolist() == [4, -1]
    back = C8KVCache.read(q, scale, torch.bfloat16)
    assert back.dtype == torch.bfloat16 and back.tolist() == [2.0, -0.5]  # the offset is never taken off again
    assert kv_cache_dequantize(torch.tensor([-128, 127], dtype=torch.int8), bf16(0.25), torch.bfloat16).tolist() \
        == [-32.0, 31.75]
    symmetric = C8KVCache.read(C8KVCache.write(bf16(1.25, -1.0), scale), scale, torch.bfloat16)
    assert symmetric.tolist() == [1.0, -1.0]


def test_the_cache_module_maps_channel_h_times_head_dim_plus_d():
    heads, d = 2, 4
    k_scale = torch.arange(1, heads * d + 1, dtype=torch.float32) / 8  # channel c has scale (c + 1) / 8
    cache = QuantizedKVCache(k_scale, torch.zeros(1), torch.ones(1), torch.zeros(1), num_kv_heads=heads,
                             head_dim=d, dtype=torch.bfloat16)
    assert cache.v_scale.shape == (heads * d,) and cache.symmetric  # a single value covers every channel
    x = torch.randn(3, heads, 5, d, generator=torch.Generator().manual_seed(0)).bfloat16() * 4
    q = cache.quantize(x, "k")
    for h in range(heads):
        for j in range(d):
            inv = torch.reciprocal(k_scale[h * d + j].bfloat16())
            want = torch.round(x[:, h, :, j] * inv).clamp(-128, 127).to(torch.int8)
            assert torch.equal(q[:, h, :, j], want), (h, j)
    assert torch.equal(cache.dequantize(q, "k", torch.bfloat16),
                       q.bfloat16() * k_scale.bfloat16().view(heads, 1, d))
    with pytest.raises(ValueError, match="which: expected 'k' or 'v'"):
        cache.quantize(x, "q")
    with pytest.raises(ValueError, match=r"k_scale: expected 8 channels \(num_kv_heads 2 x head_dim 4\) or a single "
                                         r"value, got shape \[7\]"):
        QuantizedKVCache(torch.ones(7), torch.zeros(1), torch.ones(1), torch.zeros(1), num_kv_heads=2, head_dim=4)


# ------------------------------------------------------------------ the scheme
def test_c8_is_a_kv_cache_scheme_of_its_own_table():
    assert list(KV_CACHE_SCHEMES) == ["C8", "KV4"] and kv_cache_scheme_for("C8") is C8
    assert "C8" not in known_types()  # not a linear scheme
    assert C8.names == KEYS and C8.description_fields() == {"kv_cache_type": "C8", "kv_quant_type": "C8"}
    assert C8.is_key("model.layers.3.self_attn.v_proj.kv_cache_offset")
    assert not C8.is_key("model.layers.3.self_attn.v_proj.weight_scale")
    assert C8.split_key("model.layers.3.self_attn.k_proj.kv_cache_scale") == ("model.layers.3.self_attn",
                                                                              "k_proj.kv_cache_scale")
    with pytest.raises(ValueError,
                       match=r"kv_cache_type: 'C4' is not a registered KV-cache scheme; known: 'C8', 'KV4'"):
        kv_cache_scheme_for("C4")


def test_scheme_checks_name_the_tensor():
    good = {n: (torch.ones(C) if n.endswith("scale") else torch.zeros(C, 1)) for n in KEYS}
    C8.check(good, C)
    C8.check({**good, "k_proj.kv_cache_scale": torch.tensor([0.5])}, C)  # a single value
    cases = [
        ({"k_proj.kv_cache_scale": torch.ones(C + 1)},
         rf"k_proj\.kv_cache_scale: expected shape \[{C}\] or \[{C}, 1\]"),
        ({"v_proj.kv_cache_offset": torch.zeros(C, dtype=torch.int8)}, r"v_proj\.kv_cache_offset: expected dtype"),
        ({"v_proj.kv_cache_scale": torch.zeros(C)}, r"v_proj\.kv_cache_scale: expected positive scales"),
        ({"k_proj.kv_cache_offset": torch.full((C,), float("nan"))}, r"k_proj\.kv_cache_offset: holds a value that"),
    ]
    for edit, msg in cases:
        with pytest.raises(ValueError, match=msg):
            C8.check({**good, **edit}, C)
    assert C8.serve_problem(good, num_kv_heads=2, head_dim=32) == ""
    assert "head_dim 16 is not a multiple of 32" in C8.serve_problem(good, num_kv_heads=2, head_dim=16)
    assert C8.serve_problem({**good, "v_proj.kv_cache_offset": torch.ones(C)}, num_kv_heads=2,
                            head_dim=32).startswith("v_proj.kv_cache_offset: nonzero offset")


# ------------------------------------------------------------------ attach, save, load
def test_attach_changes_nothing_computed_and_round_trips_through_save_and_load(tmp_path):
    model = c8_model("qwen2")
    caches = kv_caches(model)
    assert list(caches) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(type(m) is QuantizedKVCache and m.k_scale.dtype == torch.float32 for m in caches.values())
    assert not any("kv_cache" in k for k in model.state_dict())  # non-persistent: the state dict is unchanged
    with torch.no_grad():
        before = model(IDS).logits
    out = save_quantized(model, tmp_path / "out")
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    assert desc["kv_cache_type"] == desc["kv_quant_type"] == "C8"
    stored = load_file(str(out / "model.safetensors"))
    for i in range(2):
        for n in KEYS:
            key = f"model.layers.{i}.self_attn.{n}"
            assert desc[key] == "C8" and stored[key].shape == (C,) and stored[key].dtype == torch.float32, key
    assert desc["model.layers.0.self_attn.k_proj.weight"] == "W4A4_FLATQUANT_DYNAMIC"
    assert torch.equal(stored["model.layers.1.self_attn.v_proj.kv_cache_scale"],
                       scales(20, shape=(C, 1))[1].view(-1))
    loaded = load_quantized(out, kv_cache_attention=False)  # the model's own attention: as before saving
    for prefix, cache in kv_caches(loaded).items():
        for name in ("k_scale", "k_offset", "v_scale", "v_offset"):
            assert torch.equal(getattr(cache, name), getattr(caches[prefix], name)), (prefix, name)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, before)
    again = save_quantized(loaded, tmp_path / "again")
    for f in sorted(p.name for p in out.iterdir()):
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    bf = load_quantized(out, dtype=torch.bfloat16)  # held in the model dtype
    assert kv_caches(bf)["model.layers.0.self_attn"].k_scale.dtype == torch.bfloat16


def test_serve_check_cli_reports_the_cache(tmp_path, capsys):
    from flatquant_lab.cli import main

    out = save_quantized(c8_model("qwen3"), tmp_path / "out")
    assert main(["serve-check", str(out), "--tp", "2", "--tp", "4", "--tokens", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("C8 KV cache on 2 layers, scales split by kv head, worst difference 0" in line
                                   for line in lines), lines
    assert main(["serve-check", str(out), "--tp", "2", "--json", "--tokens", "4"]) == 0
    got = json.loads(capsys.readouterr().out)[0]
    assert (got["kv_cache_type"], got["kv_cache_layers"], got["kv_worst_diff"]) == ("C8", 2, 0.0)


def test_a_loaded_quantized_checkpoint_reads_its_cache_in_attention(tmp_path):
    from flatquant_lab.models import kv_cache_attention_on, plain_attention, use_kv_cache_attention

    model = c8_model("llama")
    loaded = load_quantized(save_quantized(model, tmp_path / "out"))
    assert kv_cache_attention_on(loaded)  # on by default: evaluated as decode reads the int8 cache
    with torch.no_grad():
        quantized = loaded(IDS).logits
        assert torch.equal(quantized, use_kv_cache_attention(model)(IDS).logits)
        plain = plain_attention(loaded)(IDS).logits
    assert torch.isfinite(quantized).all() and not torch.equal(quantized, plain)
    assert not kv_cache_attention_on(load_quantized(tmp_path / "out", kv_cache_attention=False))


@pytest.mark.parametrize("recipe", ["w4a4", "msmodelslim", "tp2"])
def test_c8_goes_with_any_linear_recipe(recipe, tmp_path):
    kw = {"w4a4": {}, "msmodelslim": {"recipe": "msmodelslim"}, "tp2": {"tp_size": 2}}[recipe]
    model = quantize(tiny_model("llama", head_dim=HEAD_DIM), QuantConfig(method="rtn", weight_quantizer="rtn", **kw))
    attach_kv_cache(model, scales(1), scales(2))
    out = save_quantized(model, tmp_path / "out", tp_size=kw.get("tp_size"))
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    assert desc["kv_cache_type"] == "C8"
    loads_at = {"w4a4": [1], "msmodelslim": [1, 2, 4], "tp2": [2]}[recipe]
    results = serve_check(out, (1, 2, 4), tokens=4)
    assert [r.tp_size for r in results if r.loads] == loads_at, [r.line() for r in results]
    for r in results:
        if r.loads:
            assert r.kv_cache_type == "C8" and r.kv_cache_layers == 2 and r.kv_worst_diff == 0.0, r.line()


def test_save_refuses_an_asymmetric_cache_and_a_partial_one(tmp_path):
    model = c8_model("llama")
    offset = [torch.zeros(C), torch.zeros(C)]
    offset[1][5] = 1.0
    attach_kv_cache(model, scales(10), scales(20), v_offset=offset)
    with pytest.raises(CheckpointError, match=r"^model\.layers\.1\.self_attn\.v_proj\.kv_cache_offset: nonzero offset "
                                              r"\(max \|offset\| 1\); vllm-ascend writes its C8 cache with the offset "
                                              r"but reads it back as int8 \* scale without it"):
        save_quantized(model, tmp_path / "asym")
    assert not (tmp_path / "asym").exists()
    attach_kv_cache(model, scales(10), scales(20))
    delattr(model.model.layers[0].self_attn, "kv_cache_quant")
    with pytest.raises(CheckpointError, match=r"^model\.layers\.0\.self_attn: carries no KV-cache scales while "
                                              r"model\.layers\.1\.self_attn does"):
        save_quantized(model, tmp_path / "partial")
    detach_kv_cache(model)
    assert kv_caches(model) == {}
    desc = json.loads((save_quantized(model, tmp_path / "none") / DESCRIPTION_FILE).read_text())
    assert "kv_cache_type" not in desc


def test_attach_checks_name_the_layer():
    model = random_quantize(tiny_model("qwen3", head_dim=HEAD_DIM), groups=("attn",))
    with pytest.raises(ValueError, match=r"k_scale: expected one tensor per decoder layer \(2\), got 1"):
        attach_kv_cache(model, scales(0, layers=1), scales(1))
    with pytest.raises(ValueError, match=r"^model\.layers\.1\.self_attn\.v_proj\.kv_cache_scale: expected shape "
                                         rf"\[{C}\] or \[{C}, 1\]"):
        attach_kv_cache(model, scales(0), [torch.ones(C), torch.ones(C - 1)])
    attach_kv_cache(model, torch.full((2, C), 0.1), [torch.tensor(0.2), torch.tensor([0.3])], dtype=torch.bfloat16)
    cache = kv_caches(model)["model.layers.1.self_attn"]
    assert cache.k_scale.dtype == torch.bfloat16 and torch.equal(cache.v_scale, torch.full((C,), 0.3).bfloat16())


# ------------------------------------------------------------------ serve-check and the TP split
def expected_rank_channels(rank: int, tp: int, heads: int, head_dim: int) -> list[int]:
    """SPEC 12, written out: rank r keeps kv heads [r H/tp, (r+1) H/tp) of the [H, head_dim] view, or, with more
    ranks than heads, the head r // (tp / H) it replicates."""
    if tp <= heads:
        own = list(range(rank * heads // tp, (rank + 1) * heads // tp))
    else:
        own = [rank // (tp // heads)]
    return [h * head_dim + d for h in own for d in range(head_dim)]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_serve_check_splits_the_scales_by_kv_head_at_tp_1_2_4(model_type, tmp_path):
    model = c8_model(model_type)
    out = save_quantized(model, tmp_path / "out", tp_size=4)  # save runs vLLM's load at TP 4 first
    results = serve_check(out, (1, 2, 4), tokens=4)
    for r in results:
        assert r.loads and r.worst_rel_diff == 0.0 and r.linears == 10, r.line()
        assert (r.kv_cache_type, r.kv_cache_layers, r.kv_worst_diff) == ("C8", 2, 0.0), r.line()
        assert "C8 KV cache on 2 layers, scales split by kv head" in r.line()
    tensors = load_file(str(out / "model.safetensors"))
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    config = json.loads((out / "config.json").read_text())
    for tp in (1, 2, 4):
        shards = kv_cache_shards(tensors, desc, config, tp)
        assert list(shards) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
        for prefix, ranks in shards.items():
            assert len(ranks) == tp
            for r, part in enumerate(ranks):
                channels = expected_rank_channels(r, tp, KV_HEADS, HEAD_DIM)
                assert len(channels) == (HEAD_DIM if tp > KV_HEADS else C // tp)
                for n in KEYS:
                    assert torch.equal(part[n], tensors[f"{prefix}.{n}"].view(-1)[channels]), (tp, r, n)
    # TP 4 with 2 kv heads: ranks 0 and 1 share head 0, ranks 2 and 3 head 1
    four = kv_cache_shards(tensors, desc, config, 4)["model.layers.0.self_attn"]
    assert torch.equal(four[0]["k_proj.kv_cache_scale"], four[1]["k_proj.kv_cache_scale"])
    assert not torch.equal(four[1]["k_proj.kv_cache_scale"], four[2]["k_proj.kv_cache_scale"])


def test_kv_heads_split_without_replicas(tmp_path):
    heads = 4  # 4 kv heads (no GQA): TP 2 keeps two heads per rank, TP 4 one
    model = random_quantize(tiny_model("qwen3", head_dim=HEAD_DIM, num_key_value_heads=heads), groups=("attn", "mlp"))
    attach_kv_cache(model, scales(3, shape=(heads * HEAD_DIM,)), scales(4, shape=(heads * HEAD_DIM,)))
    out = save_quantized(model, tmp_path / "out")
    tensors = load_file(str(out / "model.safetensors"))
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    config = json.loads((out / "config.json").read_text())
    for tp in (2, 4):
        for r, part in enumerate(kv_cache_shards(tensors, desc, config, tp)["model.layers.1.self_attn"]):
            channels = expected_rank_channels(r, tp, heads, HEAD_DIM)
            assert torch.equal(part["v_proj.kv_cache_scale"],
                               tensors["model.layers.1.self_attn.v_proj.kv_cache_scale"][channels])
    assert all(r.loads and r.kv_worst_diff == 0.0 for r in serve_check(out, (2, 4), tokens=4))


def test_serve_check_reports_a_head_dim_c8_cannot_serve(tmp_path):
    model = random_quantize(tiny_model("llama"), groups=("attn", "mlp"))  # head_dim 16
    attach_kv_cache(model, torch.full((2, 2 * 16), 0.1), torch.full((2, 2 * 16), 0.1))
    out = save_quantized(model, tmp_path / "out")  # the files are well formed; vllm-ascend would not serve them
    for r in serve_check(out, (1, 2), tokens=4):
        assert not r.loads and r.problem == ("kv_cache_type 'C8': head_dim 16 is not a multiple of 32, which "
                                             "vllm-ascend's C8 attention needs"), r.problem
    with pytest.raises(CheckpointError, match="tp_size: vLLM would not load this checkpoint at TP 1: kv_cache_type "
                                              "'C8': head_dim 16"):
        save_quantized(model, tmp_path / "tp1", tp_size=1)


# ------------------------------------------------------------------ msModelSlim's layout
@pytest.mark.parametrize("layout", ["v1", "legacy"])
def test_an_msmodelslim_checkpoint_with_c8_loads_and_serves(layout, tmp_path):
    fm = tiny_model("qwen3", outliers=False, head_dim=HEAD_DIM)
    path = write_msmodelslim(tmp_path / "ckpt", fm, layout=layout, kv_c8=True)
    model = load_quantized(path)
    caches = kv_caches(model)
    assert len(caches) == 2
    for i in range(2):
        cache = caches[f"model.layers.{i}.self_attn"]
        assert cache.k_scale.dtype == torch.bfloat16 and cache.k_scale.shape == (C,)
        assert torch.equal(cache.k_scale, c8_scales(fm, i, "k_proj").view(-1))
        assert torch.equal(cache.v_scale, c8_scales(fm, i, "v_proj").view(-1))
        assert not cache.k_offset.any() and not cache.v_offset.any()
    results = serve_check(path, (1, 2, 4), tokens=4)
    assert all(r.loads and r.kv_cache_layers == 2 and r.kv_worst_diff == 0.0 for r in results), \
        [r.line() for r in results]
    plain = write_msmodelslim(tmp_path / "plain", fm, layout=layout)  # kv_quant_type null: no cache
    assert kv_caches(load_quantized(plain)) == {}


# ------------------------------------------------------------------ refused checkpoints
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_quantized(c8_model("llama"), tmp_path_factory.mktemp("c8") / "good")


def _copy(src, dst):
    import shutil

    return shutil.copytree(src, dst)


def _drop_fields(d):
    del d["kv_cache_type"], d["kv_quant_type"]


def _drop_layer_1(d):
    for n in KEYS:
        d.pop(f"model.layers.1.self_attn.{n}")


REFUSALS = {
    "scales_without_kv_cache_type": (
        _drop_fields, None,
        r"^model\.layers\.0\.self_attn: has KV-cache scales \(model\.layers\.0\.self_attn\.k_proj\.kv_cache_scale\) "
        r"but quant_model_description\.json has no kv_cache_type; vllm-ascend quantizes the cache only with "
        r"\"kv_cache_type\": \"C8\""),
    "kv_cache_type_without_scales": (
        lambda d: [d.pop(k) for k in list(d) if "kv_cache_" in k and "." in k],
        lambda t: [t.pop(k) for k in list(t) if "kv_cache_" in k],
        r"^model\.layers\.0\.self_attn\.k_proj\.kv_cache_scale: missing \(kv_cache_type is 'C8', which needs "
        r"k_proj\.kv_cache_scale, k_proj\.kv_cache_offset, v_proj\.kv_cache_scale, v_proj\.kv_cache_offset in the "
        r"attention of every decoder layer\)"),
    "one_layer_missing": (
        _drop_layer_1, lambda t: [t.pop(f"model.layers.1.self_attn.{n}") for n in KEYS],
        r"^model\.layers\.1\.self_attn\.k_proj\.kv_cache_scale: missing \(kv_cache_type is 'C8'"),
    "asymmetric": (
        None, lambda t: t["model.layers.0.self_attn.k_proj.kv_cache_offset"].fill_(-2.0),
        r"^model\.layers\.0\.self_attn\.k_proj\.kv_cache_offset: nonzero offset \(max \|offset\| 2\)"),
    "wrong_label": (
        lambda d: d.update({"model.layers.1.self_attn.v_proj.kv_cache_scale": "FLOAT"}), None,
        r"^model\.layers\.1\.self_attn\.v_proj\.kv_cache_scale: description says 'FLOAT', expected 'C8'"),
    "bad_shape": (
        None, lambda t: t.update({"model.layers.1.self_attn.k_proj.kv_cache_scale": torch.ones(C, 2)}),
        rf"^model\.layers\.1\.self_attn\.k_proj\.kv_cache_scale: expected shape \[{C}\] or \[{C}, 1\]"),
    "unknown_type": (
        lambda d: d.update(kv_cache_type="C4", kv_quant_type="C4"), None,
        r"^quant_model_description\.json: kv_cache_type: 'C4' is not a registered KV-cache scheme; known: 'C8'"),
    "types_disagree": (
        lambda d: d.update(kv_quant_type="C4"), None,
        r"^quant_model_description\.json: kv_quant_type is 'C4' but kv_cache_type is 'C8'; they must agree"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_load_and_serve_check_refuse_naming_the_layer(case, saved, tmp_path):
    desc_edit, tensor_edit, msg = REFUSALS[case]
    path = rewrite(_copy(saved, tmp_path / case), desc_edit, tensor_edit)
    with pytest.raises(CheckpointError, match=msg):
        load_quantized(path)
    r = serve_check(path, (1,), tokens=2)[0]
    assert not r.loads and r.problem.split(":")[0] in msg.replace("\\", "").replace("^", ""), r.problem


def test_a_square_scale_and_a_single_value_load(saved, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.kv_cache_scale"] = t["model.layers.0.self_attn.k_proj.kv_cache_scale"] \
            .view(C, 1).clone()
        t["model.layers.1.self_attn.v_proj.kv_cache_scale"] = torch.tensor([0.25])

    path = rewrite(_copy(saved, tmp_path / "shapes"), None, edit)
    caches = kv_caches(load_quantized(path))
    assert caches["model.layers.0.self_attn"].k_scale.shape == (C,)
    assert torch.equal(caches["model.layers.1.self_attn"].v_scale, torch.full((C,), 0.25))
    r = serve_check(path, (4,), tokens=2)[0]
    assert r.loads and r.kv_worst_diff == 0.0, r.line()


# ------------------------------------------------------------------ attention through the cache
def _rotate_half(t):
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


def _c8_emulated(t, scale):
    """SPEC 12 written out on [B, H_kv, T, D] in t's dtype: inv = 1 / scale once, codes
    clamp(round(t * inv), -128, 127) (torch.round: half to even), read back as codes * scale."""
    heads, dim = t.shape[1], t.shape[3]
    s = scale.to(t.dtype).view(heads, 1, dim)
    inv = 1 / s
    codes = torch.clamp(torch.round(t * inv), -128, 127).to(torch.int8)
    return codes.to(t.dtype) * s


def _emulated_attention(attn, x, cos, sin, k_scale, v_scale, quantize_kv=True):
    """One decoder layer's attention (eager order of operations), from its own linears and norms."""
    cfg = attn.config
    b, t, _ = x.shape
    d = attn.head_dim
    q = attn.q_proj(x).view(b, t, -1, d)
    k = attn.k_proj(x).view(b, t, -1, d)
    v = attn.v_proj(x).view(b, t, -1, d)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = (q * c) + (_rotate_half(q) * s), (k * c) + (_rotate_half(k) * s)
    if quantize_kv:  # K after RoPE, V as v_proj gives it
        k, v = _c8_emulated(k, k_scale), _c8_emulated(v, v_scale)
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    w = torch.matmul(q, k.transpose(2, 3)) * attn.scaling
    w = w + torch.full((t, t), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(w, v).transpose(1, 2).reshape(b, t, -1)
    return attn.o_proj(out)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_attention_through_the_cache_matches_an_emulation_of_c8(model_type):
    from flatquant_lab.models import kv_cache_attention_on, plain_attention, use_kv_cache_attention

    model = tiny_model(model_type, head_dim=HEAD_DIM).to(torch.bfloat16)
    model.config._attn_implementation = "eager"
    k_scales, v_scales = scales(5), scales(6)
    for ks in k_scales:
        ks[3] = 1e-3  # some channels clamp at -128 / 127
    attach_kv_cache(model, k_scales, v_scales)
    with torch.no_grad():
        plain = model(IDS).logits
    seen = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def pre(mod, args, kwargs, i=i):
            seen[i] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0], kwargs["position_embeddings"])

        def post(mod, args, kwargs, output, i=i):
            seen[i] = (*seen[i], output[0])

        hooks.append(layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_hook(post, with_kwargs=True))
    use_kv_cache_attention(model)
    assert kv_cache_attention_on(model)
    with torch.no_grad():
        quantized = model(IDS).logits
        for i, layer in enumerate(model.model.layers):
            x, (cos, sin), got = seen[i]
            want = _emulated_attention(layer.self_attn, x, cos, sin, k_scales[i], v_scales[i])
            assert torch.equal(got, want), (i, float((got.float() - want.float()).abs().max()))
            unquantized = _emulated_attention(layer.self_attn, x, cos, sin, k_scales[i], v_scales[i], False)
            assert not torch.equal(got, unquantized)
    for h in hooks:
        h.remove()
    assert not torch.equal(quantized, plain)
    plain_attention(model)
    assert not kv_cache_attention_on(model)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, plain)


def test_decode_reads_the_cache_of_the_float_k_and_v_and_float_prefill_skips_it():
    from flatquant_lab.models import plain_attention, use_kv_cache_attention

    model = tiny_model("qwen2", head_dim=HEAD_DIM)  # float32, sdpa
    attach_kv_cache(model, scales(7), scales(8))

    def prefill_then_step():
        out = model(IDS[:, :-1], use_cache=True)
        name = "cache" if "cache" in out else "past_key_values"  # transformers >= 5.2x names it cache
        return model(IDS[:, -1:], use_cache=True, **{name: out[name]}).logits[:, -1]

    with torch.no_grad():
        plain = model(IDS).logits
        use_kv_cache_attention(model)
        every = model(IDS).logits
        # transformers' cache keeps the float K and V: a decode step reads the codes of the originals, as a full
        # forward does
        torch.testing.assert_close(prefill_then_step(), every[:, -1], rtol=1e-5, atol=1e-5)
        use_kv_cache_attention(model, float_prefill=True)
        assert torch.equal(model(IDS).logits, plain)  # a prefill without cached tokens attends on float K, V
        step = prefill_then_step()  # ... and the decode step reads the int8 cache
    assert float((step - plain[:, -1]).abs().max()) > 1e-2
    assert float((step - every[:, -1]).abs().max()) > 1e-2  # its prefix was computed unquantized
    plain_attention(model)
    with pytest.raises(ValueError, match="model: carries no KV-cache scales"):
        use_kv_cache_attention(detach_kv_cache(model))
