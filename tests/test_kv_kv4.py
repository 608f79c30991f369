"""KV4, FlatQuant's 4-bit KV cache (docs/kv-cache.md "KV4"): its arithmetic, the cache module, the T_v fold, the
training stand-in, calibration, save and load, and what serve-check and the exporter say about it."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from flatquant_lab.api import quantize, quantize_kv_cache
from flatquant_lab.calibrate.kv4 import FakeKV4, ValueMap, fold_kv
from flatquant_lab.calibrate.kv_cache import calibrate_kv_cache
from flatquant_lab.calibrate.plan import plan_layer
from flatquant_lab.calibrate.state import KVState, LayerState
from flatquant_lab.io import DESCRIPTION_FILE, CheckpointError, load_quantized, save_quantized, serve_check
from flatquant_lab.layers import KV4Cache, QuantizedKVCache
from flatquant_lab.models import decoder_layers, kv_cache_attention_on, kv_caches
from flatquant_lab.ops import kv4_dequantize, kv4_quantize, kv4_roundtrip
from flatquant_lab.recipe import QuantConfig
from flatquant_lab.schemes import KV4, kv_cache_scheme_for
from flatquant_lab.transforms import orthogonal_factor
from tiny_models import BUDGET, CALIB, logits, rel, tiny_model

D = 16  # the tiny models' head_dim
KV4_BUDGET = dict(BUDGET, kv_cache="KV4")


# ------------------------------------------------------------------ arithmetic, values written out by hand
def test_codes_scale_and_zero_written_out_by_hand():
    # scale 7.5 / 15 = 0.5 (exact in fp16), zero 3; 0.25 / 0.5 = 0.5 and 0.75 / 0.5 = 1.5 are ties: to even
    q, scale, zero = kv4_quantize(torch.tensor([[-1.5, 0.25, 0.75, 6.0]]))
    assert q.tolist() == [[0, 3, 5, 15]] and scale.dtype == zero.dtype == torch.float16
    assert scale.item() == 0.5 and zero.item() == 3.0
    assert kv4_dequantize(q, scale, zero, torch.float32).tolist() == [[-1.5, 0.0, 1.0, 6.0]]
    # scale 3 / 15 = 0.2, held in fp16 as 0.199951171875: zero rint(1 / 0.19995) = 5, codes rint(x / s) + 5
    q, scale, zero = kv4_quantize(torch.tensor([[-1.0, 0.0, 0.5, 2.0]]))
    assert scale.item() == 0.199951171875 and zero.item() == 5.0 and q.tolist() == [[0, 5, 8, 15]]
    # clip_max 0.5: xmax 3, scale fp16(4.5 / 15) = 0.300048828125, zero rint(4.9992) = 5; 0.25 / s = 0.833 -> 6,
    # 0.75 / s = 2.4996 -> 7, and 6 / s + 5 = 25 saturates at 15
    q, scale, zero = kv4_quantize(torch.tensor([[-1.5, 0.25, 0.75, 6.0]]), clip_max=0.5)
    assert scale.item() == 0.300048828125 and zero.item() == 5.0
    assert q.tolist() == [[0, 6, 7, 15]]
    # all zeros: the range [-1, 1], scale fp16(2 / 15), zero rint(7.5) = 8, read back as exact zeros
    q, scale, zero = kv4_quantize(torch.zeros(1, 4))
    assert zero.item() == 8.0 and q.tolist() == [[8, 8, 8, 8]]
    assert kv4_dequantize(q, scale, zero, torch.float32).abs().max().item() == 0.0
    # only positive values: xmin is min(rowmin, 0) = 0, so zero is 0 and codes run 0..15
    q, _, zero = kv4_quantize(torch.tensor([[1.0, 2.0, 3.0]]))
    assert zero.item() == 0.0 and q.tolist() == [[5, 10, 15]]


def test_roundtrip_is_quantize_then_dequantize_and_trains_the_clips():
    x = torch.randn(2, 3, 7, D, generator=torch.Generator().manual_seed(0)) * 4
    c_max = torch.tensor(0.9, requires_grad=True)
    c_min = torch.tensor(0.8, requires_grad=True)
    y = kv4_roundtrip(x, c_max, c_min)
    q, s, z = kv4_quantize(x, 0.9, 0.8)
    assert torch.equal(y.detach(), kv4_dequantize(q, s, z, torch.float32))
    (y - x).square().sum().backward()
    assert c_max.grad is not None and c_min.grad is not None
    assert float(c_max.grad) != 0.0 and float(c_min.grad) != 0.0
    with pytest.raises(ValueError, match="^x: expected a float tensor"):
        kv4_quantize(torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="^q: expected uint8"):
        kv4_dequantize(torch.ones(2, 4, dtype=torch.int8), s, z, torch.float32)


# ------------------------------------------------------------------ the cache module
def kv4_module(seed: int = 0, clips=(0.95, 0.9), heads: int = 2) -> KV4Cache:
    t_k = orthogonal_factor(D, "random", seed, dtype=torch.float32) + 0.3 * torch.eye(D)  # not orthogonal
    return KV4Cache(t_k, torch.tensor(clips), torch.tensor([1.0, 1.0]), num_kv_heads=heads, head_dim=D)


def test_the_cache_keeps_q_k_and_quantizes_k_in_the_transformed_basis():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 5, D, generator=g) for _ in range(3))
    cache = kv4_module()
    q2, k2, v2 = cache.apply(q, k, v)
    kt = k @ cache.k_trans
    # q T^{-T} (k T)^T = q k^T: the transform changes what is quantized, not the attention scores
    assert torch.allclose(q2 @ kt.transpose(-1, -2), q @ k.transpose(-1, -2), atol=1e-4)
    assert torch.equal(k2, kv4_roundtrip(kt, cache.k_clip[0], cache.k_clip[1]))
    assert torch.equal(v2, kv4_roundtrip(v, 1.0, 1.0))
    assert torch.equal(cache.roundtrip(k, "k"), k2)


def test_the_module_checks_name_the_tensor():
    eye = torch.eye(D)
    with pytest.raises(ValueError, match=r"^k_trans: expected shape \[16, 16\]"):
        KV4Cache(torch.eye(8), torch.ones(2), torch.ones(2), num_kv_heads=2, head_dim=D)
    with pytest.raises(ValueError, match=r"^v_clip: expected clip ratios in \(0, 1\]"):
        KV4Cache(eye, torch.ones(2), torch.tensor([1.5, 1.0]), num_kv_heads=2, head_dim=D)
    with pytest.raises(ValueError, match="^k_trans: expected an invertible matrix"):
        KV4Cache(torch.zeros(D, D), torch.ones(2), torch.ones(2), num_kv_heads=2, head_dim=D)
    scheme = kv_cache_scheme_for("KV4")
    assert scheme is KV4 and not scheme.served
    good = {"k_proj.kv_cache_trans": eye, "k_proj.kv_cache_clip": torch.ones(2),
            "v_proj.kv_cache_trans": eye, "v_proj.kv_cache_clip": torch.ones(2)}
    scheme.check(good, 2 * D)
    with pytest.raises(ValueError, match=r"^v_proj.kv_cache_clip: expected \[clip_max, clip_min\]"):
        scheme.check({**good, "v_proj.kv_cache_clip": torch.ones(3)}, 2 * D)
    with pytest.raises(ValueError, match="^k_proj.kv_cache_trans: its size 16 must be head_dim"):
        scheme.check(good, 2 * D + 8)
    assert "no 4-bit KV cache" in scheme.serve_problem(good, num_kv_heads=2, head_dim=D)


# ------------------------------------------------------------------ T_v: folded exactly, trained as folded
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_t_v_folds_into_v_proj_and_o_proj_exactly(model_type):
    model = tiny_model(model_type)
    before = logits(model)
    groups = plan_layer(model, 0, QuantConfig(**KV4_BUDGET))
    t_v = orthogonal_factor(D, "random", 3, dtype=torch.float32) + 0.5 * torch.eye(D)  # inverse is not transpose
    state = KVState(torch.eye(D), t_v, torch.full((2,), 4.0), torch.full((2,), 4.0))
    fold_kv(decoder_layers(model)[0], groups, state, torch.float64)
    attn = decoder_layers(model)[0].self_attn
    assert isinstance(attn.kv_cache_quant, KV4Cache) and not kv_cache_attention_on(model)
    assert rel(logits(model), before) < 1e-5  # the model's own attention: the fold alone changes nothing


def test_the_stand_in_computes_what_the_fold_and_the_cache_compute():
    model = tiny_model("qwen2")  # q/k/v biases: v's bias takes T_v too
    layer = decoder_layers(model)[0]
    groups = plan_layer(model, 0, QuantConfig(**KV4_BUDGET))
    g = torch.Generator().manual_seed(5)
    state = KVState(torch.randn(D, D, generator=g) + 3 * torch.eye(D),
                    torch.randn(D, D, generator=g) + 3 * torch.eye(D),
                    torch.tensor([1.5, 2.0]), torch.tensor([3.0, 0.5]))
    fake = FakeKV4(state, D, True, True)
    v, o = layer.self_attn.v_proj, layer.self_attn.o_proj
    mapped = {"v": (ValueMap(fake, "rows").weight(v.weight.float()), ValueMap(fake, "rows").bias(v.bias.float())),
              "o": ValueMap(fake, "columns").weight(o.weight.float())}
    fold_kv(layer, groups, state, torch.float64)
    assert torch.allclose(mapped["v"][0], v.weight, atol=1e-5) and torch.allclose(mapped["v"][1], v.bias, atol=1e-5)
    assert torch.allclose(mapped["o"], o.weight, atol=1e-5)
    cache = layer.self_attn.kv_cache_quant
    q, k, val = (torch.randn(1, 2, 6, D, generator=g) for _ in range(3))
    for a, b in zip(fake.apply(q, k, val), cache.apply(q, k, val)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ calibration, save, load, serve-check
@pytest.fixture(scope="module")
def kv4_models():
    model = tiny_model("qwen2")
    return model, {t: quantize(copy.deepcopy(model), QuantConfig(kv_transforms=t, **KV4_BUDGET), CALIB)
                   for t in ("kv", "none")}


def test_calibration_learns_the_transforms_and_the_clips(kv4_models):
    _, models = kv4_models
    learned, plain = models["kv"], models["none"]
    assert kv_cache_attention_on(learned) and kv_cache_attention_on(plain)
    start = orthogonal_factor(D, "hadamard", dtype=torch.float32)  # the default transform_init
    for prefix, cache in kv_caches(learned).items():
        assert isinstance(cache, KV4Cache), prefix
        assert not torch.allclose(cache.k_trans, start) and not torch.allclose(cache.v_trans, start), prefix
        assert not torch.allclose(cache.k_clip, torch.sigmoid(torch.tensor(4.0)).expand(2)), prefix
    for cache in kv_caches(plain).values():  # kv_transforms="none": identity, the clips learned alone
        assert torch.equal(cache.k_trans, torch.eye(D)) and torch.equal(cache.v_trans, torch.eye(D))
    report = learned.flatquant_report["layers"][0]
    assert set(report["kv_clip"]) == {"k", "v"} and len(report["kv_clip"]["k"]) == 2
    assert learned.flatquant_config.to_dict()["kv_cache"] == "KV4"


def test_saved_with_a_warning_loaded_back_exactly_and_refused_for_serving(kv4_models, tmp_path):
    _, models = kv4_models
    model = models["kv"]
    with pytest.warns(UserWarning, match="kv_cache_type 'KV4': a research mode that vllm-ascend cannot serve"):
        out = save_quantized(model, tmp_path / "kv4")
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    assert desc["kv_cache_type"] == "KV4" and "kv_quant_type" not in desc
    assert desc["model.layers.1.self_attn.k_proj.kv_cache_trans"] == "KV4"
    loaded = load_quantized(out)
    assert kv_cache_attention_on(loaded)
    assert torch.equal(logits(loaded), logits(model))
    with pytest.raises(CheckpointError, match="vLLM would not load this checkpoint at TP 1: kv_cache_type 'KV4': "
                                              "vllm-ascend has no 4-bit KV cache"), pytest.warns(UserWarning):
        save_quantized(model, tmp_path / "claimed", tp_size=1)
    checks = serve_check(out, tp_sizes=[1, 2])
    assert [c.loads for c in checks] == [False, False]
    assert "no 4-bit KV cache" in checks[0].problem


def test_the_quantized_cache_is_what_the_model_attends_through(kv4_models):
    float_model, models = kv4_models
    model = models["kv"]
    caches = kv_caches(model)
    for cache in caches.values():  # clip ratios far below what was learned: the logits must move
        cache.k_clip.fill_(0.3)
    moved = logits(model)
    for cache in caches.values():
        cache.k_clip.fill_(1.0)
    assert rel(moved, logits(model)) > 1e-3
    assert rel(logits(model), logits(float_model)) < 1.0


def test_baselines_need_no_data_and_start_at_clip_one():
    model = quantize(tiny_model("llama"), QuantConfig(method="hadamard", weight_quantizer="rtn", kv_cache="KV4"))
    for cache in kv_caches(model).values():
        assert torch.equal(cache.k_clip, torch.ones(2)) and torch.equal(cache.v_clip, torch.ones(2))
        assert torch.allclose(cache.k_trans @ cache.k_trans.T, torch.eye(D), atol=1e-5)  # a Hadamard factor


def test_a_work_dir_resumes_the_kv_state(tmp_path):
    model = tiny_model("llama")
    cfg = QuantConfig(work_dir=str(tmp_path / "work"), **KV4_BUDGET)
    first = quantize(copy.deepcopy(model), cfg, CALIB)
    again = quantize(copy.deepcopy(model), cfg, CALIB)
    assert all(entry["resumed"] for entry in again.flatquant_report["layers"])
    for (p, a), (_, b) in zip(kv_caches(first).items(), kv_caches(again).items()):
        assert torch.equal(a.k_trans, b.k_trans) and torch.equal(a.v_clip, b.v_clip), p
    state = LayerState.from_tensors({f"kv.{n}": torch.eye(2) for n in KVState.NAMES}, [])
    assert state.kv is not None and LayerState.from_tensors({}, []).kv is None


def test_config_refusals_name_the_setting():
    with pytest.raises(ValueError, match="^kv_transforms: expected 'kv' or 'none' with kv_cache='KV4', 'v' with "
                                         "kv_cache='C8', got 'none' with kv_cache='C8'"):
        QuantConfig(kv_cache="C8", kv_transforms="none")
    with pytest.raises(ValueError, match="^kv_transforms: expected .*, got 'v' with kv_cache=None"):
        QuantConfig(kv_transforms="v")
    with pytest.raises(ValueError, match="^kv_cache_clip: 'search' chooses C8's static scales"):
        QuantConfig(kv_cache="KV4", kv_cache_clip="search")
    with pytest.raises(ValueError, match="^kv_transforms: expected .*, got 'k' with kv_cache='KV4'"):
        QuantConfig(kv_cache="KV4", kv_transforms="k")
    with pytest.raises(ValueError, match="^config: kv_cache='KV4' is learned with the linears"):
        quantize_kv_cache(tiny_model("llama"), CALIB, QuantConfig(kv_cache="KV4"))
    with pytest.raises(ValueError, match="^cache_type: calibrate_kv_cache chooses C8's static scales; 'KV4'"):
        calibrate_kv_cache(tiny_model("llama"), CALIB, cache_type="KV4")
    assert QuantConfig(kv_cache="KV4").schemes.kv_learned == "kv"
    assert QuantConfig(kv_cache="C8").schemes.kv_learned is None
    assert QuantConfig(kv_cache="C8", kv_transforms="v").schemes.kv_learned == "v"
    # KV4 is learned with the linears: a work dir of another cache setting does not resume
    assert QuantConfig(kv_cache="KV4").fingerprint() != QuantConfig().fingerprint()
    assert QuantConfig(kv_cache="C8").fingerprint() == QuantConfig().fingerprint()
    assert QuantConfig(kv_cache="C8", kv_transforms="v").fingerprint() != QuantConfig().fingerprint()


def test_c8_with_t_v_folds_it_and_exports_a_c8_checkpoint_that_serves(tmp_path):
    model = tiny_model("qwen3", head_dim=32)  # vllm-ascend's C8 attention needs head_dim % 32 == 0
    # msModelSlim's recipe: serves at TP 2, and its W8A8 o_proj trains as a float linear with T_v mapped in
    plain = quantize(copy.deepcopy(model), QuantConfig(kv_cache="C8", recipe="msmodelslim", **BUDGET), CALIB)
    with_v = quantize(copy.deepcopy(model), QuantConfig(kv_cache="C8", kv_transforms="v", recipe="msmodelslim",
                                                        **BUDGET), CALIB)
    assert with_v.flatquant_report["kv_cache"]["kv_transforms"] == "v"
    assert all(type(c).__name__ == "QuantizedKVCache" for c in kv_caches(with_v).values())
    assert "kv_clip" not in with_v.flatquant_report["layers"][0]
    # T_v learned and folded: v_proj's int4 weights are not the plain C8 run's
    a, b = (m.model.layers[0].self_attn.v_proj.checkpoint_tensors()["weight"] for m in (plain, with_v))
    assert not torch.equal(a, b)
    out = save_quantized(with_v, tmp_path / "c8v")
    assert json.loads((out / DESCRIPTION_FILE).read_text())["kv_cache_type"] == "C8"
    assert [c.loads for c in serve_check(out, tp_sizes=[1, 2], tokens=2)] == [True, True]


def test_the_demo_counts_kv4_bytes_per_token():
    from flatquant_lab.demo import kv_cache_bytes

    model = tiny_model("llama")  # 2 layers, 2 kv heads, head_dim 16
    assert kv_cache_bytes(model)["kv_bytes_per_token"] == 2 * 2 * 2 * D * 2
    kv4 = kv_cache_bytes(model, "KV4")  # per layer, head and K/V: 8 bytes of codes, fp16 scale and zero
    assert kv4["kv_bytes_per_token"] == 2 * 2 * 2 * (D // 2 + 4)
    assert kv4["kv_vs_bf16"] == pytest.approx((D // 2 + 4) / (2 * D))


# ------------------------------------------------------------------ looking inside (notebook 04's helpers)
def test_capture_views_heads_and_the_clip_sweep(kv4_models):
    from einops import repeat

    from flatquant_lab.numerics import capture_kv, head_table, kv_clip_sweep, transform_views

    model = kv4_models[1]["kv"]
    kv = capture_kv(model, CALIB[:2])
    assert list(kv) == list(kv_caches(model))
    p = "model.layers.1.self_attn"
    assert kv[p]["query"].shape == (2, 4, 32, D) and kv[p]["key"].shape == kv[p]["value"].shape == (2, 2, 32, D)
    cache = kv_caches(model)[p]
    views = transform_views(cache, kv[p]["key"], kv[p]["value"])
    assert torch.equal(views["K after T_k"], kv[p]["key"] @ cache.k_trans)
    assert torch.allclose(views["V before T_v"] @ cache.v_trans, kv[p]["value"], atol=1e-4)
    rows = head_table(views)
    assert len(rows) == 4 * 2 and all(r["max_over_rms"] >= 1 and 0 <= r["kv4_rel_error"] < 1 for r in rows)
    sweep = kv_clip_sweep(cache, **kv[p], clips=[1.0, 0.5])
    assert [r["sweep"] for r in sweep] == ["learned", "no T_k", "K", "K", "V", "V"]
    q, k, v = cache.apply(kv[p]["query"], kv[p]["key"], kv[p]["value"])
    want = torch.nn.functional.scaled_dot_product_attention(
        kv[p]["query"], *(repeat(t, "b h t d -> b (h 2) t d") for t in (kv[p]["key"], kv[p]["value"])), is_causal=True)
    got = torch.nn.functional.scaled_dot_product_attention(
        q, *(repeat(t, "b h t d -> b (h 2) t d") for t in (k, v)), is_causal=True)
    assert sweep[0]["rel_error"] == pytest.approx(float((got - want).norm() / want.norm()), rel=1e-5)
    assert sweep[2]["rel_error"] < sweep[3]["rel_error"]  # clip 0.5 cuts off half of every token's range
    with pytest.raises(ValueError, match=r"^clips: expected clip ratios in \(0, 1\]"):
        kv_clip_sweep(cache, **kv[p], clips=[1.2])
    c8 = QuantizedKVCache(*(torch.ones(2 * D) for _ in range(4)), num_kv_heads=2, head_dim=D)
    with pytest.raises(ValueError, match="^cache: expected a KV4Cache, got QuantizedKVCache"):
        transform_views(c8, kv[p]["key"], kv[p]["value"])


def test_the_stand_in_maps_a_chunk_of_rows_as_the_whole_weight_maps_them():
    g = torch.Generator().manual_seed(9)
    state = KVState(torch.eye(D), torch.randn(D, D, generator=g) + 3 * torch.eye(D), torch.zeros(2), torch.zeros(2))
    fake = FakeKV4(state, D, False, False)
    w = torch.randn(3 * D, 40, generator=g).to(torch.bfloat16)  # v_proj of 3 kv heads; o_proj of 40 rows
    wo = torch.randn(40, 3 * D, generator=g).to(torch.bfloat16)
    for side, weight in (("rows", w), ("columns", wo)):
        vmap = ValueMap(fake, side)
        whole = vmap.weight(weight.float())
        rows = weight.shape[0]
        for r0, r1 in ((0, rows), (5, 21), (D, 2 * D), (D - 1, D + 1), (rows - 3, rows)):
            assert torch.allclose(vmap.weight_rows(weight, r0, r1), whole[r0:r1], atol=1e-6), (side, r0, r1)
