"""C8 KV-cache calibration (calibrate/kv_cache.py): the scales against an independent max over the K and V that
transformers' own cache holds, offsets 0, the clip search never worse than the max scales on the error it
minimises, quantize/save/load with the cache read in attention, the config field and the CLI flag, and the
numerics check of a C8 implementation against deliberately broken ones."""
from __future__ import annotations

import json

import pytest
import torch

from flatquant_lab.api import quantize, quantize_kv_cache
from flatquant_lab.calibrate.kv_cache import calibrate_kv_cache, channel_scales
from flatquant_lab.io import DESCRIPTION_FILE, load_quantized, save_quantized
from flatquant_lab.models import kv_cache_attention_on, kv_caches, plain_attention, use_kv_cache_attention
from flatquant_lab.numerics import check_kv_cache, check_kv_cache_module
from flatquant_lab.recipe import QuantConfig
from broken_backends import BROKEN_KV
from tiny_models import MODEL_TYPES, tiny_model

HEAD_DIM = 32
IDS = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
EVAL_IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def _independent_max(model, ids):
    """Per-channel max |K| (after RoPE) and |V| of every layer, from the K and V transformers' cache keeps."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = out["past_key_values"] if "past_key_values" in out else out["cache"]
    maxes = []
    for layer in cache.layers:
        k, v = layer.keys, layer.values  # [B, H, T, D]
        maxes.append((k.abs().amax(dim=(0, 2)).reshape(-1), v.abs().amax(dim=(0, 2)).reshape(-1)))
    return maxes


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_max_scales_equal_an_independent_max_and_offsets_are_zero(model_type):
    model = tiny_model(model_type, head_dim=HEAD_DIM)
    want = _independent_max(model, IDS)
    report = calibrate_kv_cache(model, IDS, clip="max", batch_size=3)  # batches of 3 and 1: the max spans both
    caches = kv_caches(model)
    assert len(caches) == len(want) == 2 and report["clip"] == "max"
    for (k_max, v_max), cache in zip(want, caches.values()):
        assert cache.k_scale.dtype == torch.float32 and cache.symmetric
        assert torch.equal(cache.k_offset, torch.zeros(64)) and torch.equal(cache.v_offset, torch.zeros(64))
        assert torch.equal(cache.k_scale, (k_max / 127).clamp_min(torch.finfo(torch.float32).eps))
        assert torch.equal(cache.v_scale, (v_max / 127).clamp_min(torch.finfo(torch.float32).eps))
    assert not kv_cache_attention_on(model)  # attaching changes nothing computed


def test_a_silent_channel_gets_the_float32_epsilon():
    scale = channel_scales(torch.tensor([0.0, 127.0, 1e-9]))
    assert scale.tolist() == [torch.finfo(torch.float32).eps, 1.0, torch.finfo(torch.float32).eps]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("granularity", ["head", "channel"])
def test_the_search_never_raises_the_attention_error_it_minimises(model_type, granularity):
    model = tiny_model(model_type, head_dim=HEAD_DIM)
    plain = calibrate_kv_cache(model, IDS, clip="max")
    maxes = {p: (c.k_scale.clone(), c.v_scale.clone()) for p, c in kv_caches(model).items()}
    report = calibrate_kv_cache(model, IDS, clip="search", granularity=granularity)
    assert calibrate_kv_cache(tiny_model(model_type, head_dim=HEAD_DIM), IDS)["clip"] == "max"  # the default
    assert report["grid"][0] == 1.0 and report["search_windows"] == 4
    improved = False
    for row, max_row, (prefix, cache) in zip(report["layers"], plain["layers"], kv_caches(model).items()):
        assert row["rel_error_max"] == pytest.approx(max_row["rel_error"], rel=1e-12)  # the same windows
        assert row["rel_error"] <= row["rel_error_max"]
        improved |= row["rel_error"] < row["rel_error_max"]
        # K: the max scale times the clip of its kv head
        k_max, v_max = maxes[prefix]
        clip_k = torch.tensor(row["k_clip"]).repeat_interleave(HEAD_DIM)
        assert torch.equal(cache.k_scale, channel_scales(k_max * 127, clip_k))
        assert bool((cache.v_scale <= v_max).all()) and cache.symmetric
    assert improved or granularity == "head"  # per channel, V always finds something on these random models


def test_calibration_leaves_the_attention_as_it_was_and_bypasses_an_existing_cache():
    model = tiny_model("qwen3", head_dim=HEAD_DIM)
    first = calibrate_kv_cache(model, IDS, clip="max")
    use_kv_cache_attention(model)
    name = model.config._attn_implementation
    again = calibrate_kv_cache(model, IDS, clip="max")  # observes float K and V, not the cache's read-back
    assert model.config._attn_implementation == name
    assert [r["rel_error"] for r in again["layers"]] == [r["rel_error"] for r in first["layers"]]


def test_bad_arguments_name_themselves():
    model = tiny_model("llama", head_dim=HEAD_DIM)
    with pytest.raises(ValueError, match="^clip: expected one of"):
        calibrate_kv_cache(model, IDS, clip="mse")
    with pytest.raises(ValueError, match="^granularity: expected one of"):
        calibrate_kv_cache(model, IDS, granularity="token")
    with pytest.raises(ValueError, match=r"^grid: expected clip factors in \(0, 1\]"):
        calibrate_kv_cache(model, IDS, grid=(1.0, 1.5))
    with pytest.raises(ValueError, match="^calib_ids: expected a LongTensor"):
        calibrate_kv_cache(model, IDS.float())
    with pytest.raises(ValueError, match="C4"):
        calibrate_kv_cache(model, IDS, cache_type="C4")


# ------------------------------------------------------------------ the config field, quantize, save and load
def test_the_config_field_leaves_configs_without_it_unchanged():
    base = QuantConfig()
    assert "kv_cache" not in base.to_dict() and "kv_cache_clip" not in base.to_dict()
    c8 = QuantConfig(kv_cache="C8")
    assert c8.schemes.kv_cache == c8.kv_cache == "C8" and c8.kv_cache_clip == "max"
    assert c8.to_dict()["kv_cache"] == "C8" and c8.to_dict()["kv_cache_clip"] == "max"
    assert c8.fingerprint() == base.fingerprint()  # calibrated after every learned tensor
    assert c8.replace(kv_cache=None) == base
    with pytest.raises(ValueError, match=r"^kv_cache: expected one of \(None, 'C8', 'KV4'\)"):
        QuantConfig(kv_cache="C4")
    with pytest.raises(ValueError, match="^kv_cache_clip: expected one of"):
        QuantConfig(kv_cache="C8", kv_cache_clip="mse")


@pytest.mark.parametrize("recipe", ["w4a4", "msmodelslim"])
def test_a_quantized_model_with_c8_saves_and_loads_with_the_cache_read_in_attention(recipe, tmp_path):
    model = tiny_model("qwen2", head_dim=HEAD_DIM)
    cfg = QuantConfig(method="rtn", weight_quantizer="rtn", recipe=recipe, kv_cache="C8", kv_cache_clip="search",
                      samples=4, seqlen=24)
    quantize(model, cfg, IDS)
    report = model.flatquant_report["kv_cache"]
    assert report["cache_type"] == "C8" and report["clip"] == "search" and len(report["layers"]) == 2
    assert len(kv_caches(model)) == 2
    use_kv_cache_attention(model)
    out = save_quantized(model, tmp_path / "out")
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    assert desc["kv_cache_type"] == "C8"
    assert "flatquant_kv_cache" not in (out / "config.json").read_text()  # the wrapper's name is not saved
    loaded = load_quantized(out)
    assert kv_cache_attention_on(loaded)
    with torch.no_grad():
        want = model(EVAL_IDS).logits
        assert torch.equal(loaded(EVAL_IDS).logits, want)
        assert not torch.equal(plain_attention(loaded)(EVAL_IDS).logits, want)


def test_quantize_refuses_a_kv_cache_without_data_and_quantize_kv_cache_works_alone():
    model = tiny_model("llama", head_dim=HEAD_DIM)
    with pytest.raises(ValueError, match="^calib_data: the C8 KV cache"):
        quantize(model, QuantConfig(method="rtn", weight_quantizer="rtn", kv_cache="C8"))
    report = quantize_kv_cache(model, [IDS[:2], IDS[2:]], QuantConfig(kv_cache="C8"))
    assert report["clip"] == "max" and report["windows"] == 4 and len(kv_caches(model)) == 2


def test_the_quantize_cli_takes_kv_cache(tmp_path, capsys):
    from flatquant_lab.cli import main
    from tiny_models import write_tiny_model_dir

    src = tmp_path / "tiny"
    write_tiny_model_dir(src, tiny_model("llama", head_dim=HEAD_DIM))
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(src), "--method", "rtn", "--weight-quantizer", "rtn", "--samples", "2",
                 "--seqlen", "16", "--kv-cache", "C8", "--kv-cache-clip", "max", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["kv_cache"] == "C8" and printed["kv_cache_clip"] == "max"
    assert printed["kv_attention_rel_error"] == printed["kv_attention_rel_error_max_scales"]
    assert json.loads((out / DESCRIPTION_FILE).read_text())["kv_cache_type"] == "C8"
    with pytest.raises(SystemExit):
        main(["quantize", "--model", str(src), "--out", str(tmp_path / "x"), "--kv-cache-clip", "max"])
    assert "--kv-cache-clip: not used without --kv-cache" in capsys.readouterr().err


def test_lm_eval_evaluates_a_loaded_c8_checkpoint_through_the_cache(tmp_path):
    from flatquant_lab.eval import evaluate
    from flatquant_lab.hub import resolve
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve("smollm2-135m")), local_files_only=True)
    model = tiny_model("llama", head_dim=HEAD_DIM, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=None, max_position_embeddings=1024)
    quantize(model, QuantConfig(method="rtn", weight_quantizer="rtn", kv_cache="C8", samples=4, seqlen=24),
             torch.randint(0, len(tok), (4, 24), generator=torch.Generator().manual_seed(2)))
    loaded = load_quantized(save_quantized(model, tmp_path / "out", tokenizer=tok))

    def word_ppl():
        res = evaluate(loaded, tok, limit=1, max_length=64, progress=False)
        return res["results"]["wiki_fq_eval"]["word_perplexity,none"]

    through_cache = word_ppl()
    assert kv_cache_attention_on(loaded)  # the harness keeps the model (and its attention) as it is
    plain_attention(loaded)
    assert word_ppl() != through_cache


# ------------------------------------------------------------------ numerics: an implementation's write, read, split
def test_the_reference_passes_and_a_loaded_cache_is_checked_on_its_scales():
    for heads in (1, 2, 3, 4):
        r = check_kv_cache(num_kv_heads=heads, head_dim=HEAD_DIM)
        assert r.passed and r.failed_part is None, r.table()
    model = tiny_model("qwen3", head_dim=HEAD_DIM)
    calibrate_kv_cache(model, IDS, clip="max")
    r = check_kv_cache_module(next(iter(kv_caches(model).values())))
    assert r.passed and r.dtype == "float32" and r.tp_sizes == [1, 2, 4, 6, 8], r.table()
    assert json.loads(json.dumps(r.to_dict()))["passed"] is True


@pytest.mark.parametrize("name", sorted(BROKEN_KV))
def test_each_broken_c8_implementation_fails_at_its_part(name):
    broken = BROKEN_KV[name]
    # 4 kv heads: TP 2 splits them two per rank (a strided split differs); TP 8 replicates each on two ranks
    r = check_kv_cache(broken.backend, num_kv_heads=4, head_dim=HEAD_DIM, tp_sizes=(2, 8))
    assert not r.passed and r.failed_part == broken.part, (name, r.table())
    assert r.part(broken.part).mismatches > 0 and r.reason
    assert all(p.passed for p in r.parts if p.part != broken.part), r.table()


def test_a_strided_shard_is_caught_at_tp_2_and_a_half_away_write_on_ties():
    r = check_kv_cache(BROKEN_KV["kv-shard-strided"].backend, num_kv_heads=4, head_dim=HEAD_DIM, tp_sizes=(2,))
    assert r.failed_part == "shard" and r.reason.startswith("TP 2 rank 0"), r.reason
    r = check_kv_cache(BROKEN_KV["kv-write-half-away"].backend, num_kv_heads=2, head_dim=HEAD_DIM)
    assert r.reason.startswith("write of exact half-way values"), r.reason
