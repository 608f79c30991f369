"""Export to / import from the vllm-ascend checkpoint format (docs/checkpoint-format.md)."""
from __future__ import annotations

import copy
import json
import os
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import flatquant_lab.io.save as export_save
from flatquant_lab.io import DESCRIPTION_FILE, FLOAT_TYPE, QUANT_TYPE, CheckpointError, load_quantized, save_quantized
from flatquant_lab.io.format import TOP_LEVEL_FIELDS
from flatquant_lab.kronecker import decompose_dim
from flatquant_lab.layers import W4A4FlatQuantLinear
from flatquant_lab.models import GROUPS, LINEAR_NAMES, linear_weight_bytes, quantized_linear_names
from tiny_models import MODEL_TYPES, TIED, group_factors, random_quantize, tiny_model
from tiny_models import logits as model_logits

IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
logits = partial(model_logits, ids=IDS, float32=False)  # in the model's dtype
QKEYS = ("weight", "weight_scale", "weight_offset", "left_trans", "right_trans", "clip_ratio")


@pytest.fixture(scope="module")
def quantized():
    """One randomly quantized tiny model per type (tests that change a model deep-copy it)."""
    return {mt: random_quantize(tiny_model(mt), seed=0) for mt in MODEL_TYPES}


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    return {mt: save_quantized(m, root / mt) for mt, m in quantized.items()}


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def description(path: Path) -> dict:
    return json.loads((path / DESCRIPTION_FILE).read_text())


def cast_plain_params(model, dtype):
    """A copy with every parameter outside the W4A4 layers cast to ``dtype``.

    What a model loaded in ``dtype`` holds. Not ``Module.to``: that also casts the rotary inv_freq
    buffers (from_pretrained keeps them float32) and W4A4 layers' float32 scales.
    """
    out = copy.deepcopy(model)
    for mod in out.modules():
        if not isinstance(mod, W4A4FlatQuantLinear):
            for p in mod.parameters(recurse=False):
                p.data = p.data.to(dtype)
    return out


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("mt", MODEL_TYPES)
def test_round_trip_is_bit_exact(mt, quantized, saved):
    model = quantized[mt]
    loaded = load_quantized(saved[mt])
    assert not loaded.training
    assert quantized_linear_names(loaded) == quantized_linear_names(model)
    assert len(quantized_linear_names(model)) == 2 * len(LINEAR_NAMES)
    assert torch.equal(logits(loaded), logits(model))
    for name in quantized_linear_names(model):
        a = model.get_submodule(name).checkpoint_tensors()
        b = loaded.get_submodule(name).checkpoint_tensors()
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{name}.{k}"
    if TIED[mt]:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_round_trip_keeps_float_layers(tmp_path):
    # msModelSlim's recipe: FlatQuant on q/k/v and gate/up, o_proj and down_proj left float.
    model = random_quantize(tiny_model("qwen3", seed=3), seed=3, groups=("attn", "mlp"))
    out = save_quantized(model, tmp_path / "out")
    desc = description(out)
    assert desc["model.layers.0.self_attn.o_proj.weight"] == FLOAT_TYPE
    assert desc["model.layers.1.mlp.down_proj.weight"] == FLOAT_TYPE
    assert desc["model.layers.1.mlp.up_proj.weight"] == QUANT_TYPE
    loaded = load_quantized(out)
    assert isinstance(loaded.model.layers[0].self_attn.o_proj, nn.Linear)
    assert torch.equal(logits(loaded), logits(model))


# ------------------------------------------------------------------------------------ the contract
@pytest.mark.parametrize("mt", MODEL_TYPES)
def test_safetensors_keys_shapes_dtypes_match_spec(mt, quantized, saved):
    model = quantized[mt]
    tensors = all_tensors(saved[mt])
    expected = set()
    for name, mod in model.named_modules():
        if isinstance(mod, W4A4FlatQuantLinear):
            o, k = mod.out_features, mod.in_features
            n1, n2 = decompose_dim(k)
            act = mod.act_dtype
            spec = {"weight": ((o, k), torch.int8), "weight_scale": ((o, 1), torch.float32),
                    "weight_offset": ((o, 1), torch.float32), "left_trans": ((n1, n1), act),
                    "right_trans": ((n2, n2), act), "clip_ratio": ((1,), torch.float32)}
            if mod.bias is not None:
                spec["bias"] = ((o,), act)
            for leaf, (shape, dtype) in spec.items():
                t = tensors[f"{name}.{leaf}"]
                assert tuple(t.shape) == shape and t.dtype == dtype, f"{name}.{leaf}"
                expected.add(f"{name}.{leaf}")
            w = tensors[f"{name}.weight"]
            assert int(w.min()) >= -8 and int(w.max()) <= 7
            assert torch.equal(w, mod.weight_int)
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] not in quantized_linear_names(model):
            expected.add(key)
            if key != "lm_head.weight" or not TIED[mt]:
                assert t.dtype == tensors[key].dtype == torch.float32 and torch.equal(t, tensors[key])
    if TIED[mt]:
        expected.discard("lm_head.weight")  # stored once, as Hugging Face does
    assert set(tensors) == expected
    assert ("lm_head.weight" in tensors) == (not TIED[mt])
    has_qkv_bias = mt == "qwen2"
    assert ("model.layers.0.self_attn.q_proj.bias" in tensors) == has_qkv_bias
    assert not any(k.endswith((".weight_packed", ".p1", ".p2")) for k in tensors)


@pytest.mark.parametrize("mt", MODEL_TYPES)
def test_description_maps_every_tensor(mt, quantized, saved):
    desc = description(saved[mt])
    tensors = all_tensors(saved[mt])
    assert desc["model_quant_type"] == QUANT_TYPE and desc["version"] == "1.0.0" and desc["group_size"] == 0
    prefixes = set(quantized_linear_names(quantized[mt]))
    for key in tensors:
        want = QUANT_TYPE if key.rpartition(".")[0] in prefixes else FLOAT_TYPE
        assert desc[key] == want, key
    for prefix in prefixes:
        assert desc[f"{prefix}.weight"] == QUANT_TYPE
    listed = {k for k in desc if k not in TOP_LEVEL_FIELDS}
    # vllm-ascend looks up lm_head.weight even when it is tied (and so not stored).
    assert listed == set(tensors) | ({"lm_head.weight"} if TIED[mt] else set())
    assert desc["lm_head.weight"] == FLOAT_TYPE
    assert desc["model.norm.weight"] == FLOAT_TYPE


@pytest.mark.parametrize("mt", MODEL_TYPES)
def test_fused_shards_carry_identical_transforms(mt, saved):
    tensors = all_tensors(saved[mt])
    for i in range(2):
        for group in ("attn", "mlp"):
            first, *rest = (f"model.layers.{i}.{n}" for n in GROUPS[group])
            for other in rest:
                for leaf in ("left_trans", "right_trans", "clip_ratio"):
                    assert torch.equal(tensors[f"{first}.{leaf}"], tensors[f"{other}.{leaf}"])


def test_save_refuses_fused_shards_with_different_transforms(quantized, tmp_path):
    model = copy.deepcopy(quantized["llama"])
    dense = tiny_model("llama").model.layers[1].self_attn.k_proj
    left, right = group_factors(dense.in_features, seed=999)
    model.model.layers[1].self_attn.k_proj = W4A4FlatQuantLinear.from_float(dense, left, right, clip_ratio=0.9)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1.*k_proj\.left_trans"):
        save_quantized(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    # Same transforms, other clip ratio: refused too.
    model = copy.deepcopy(quantized["llama"])
    model.model.layers[0].mlp.up_proj.set_clip_ratio(0.8)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0.*up_proj\.clip_ratio"):
        save_quantized(model, tmp_path / "out")


def test_save_refuses_mixed_types_in_a_fused_module(quantized, tmp_path):
    model = copy.deepcopy(quantized["qwen2"])
    model.model.layers[0].self_attn.v_proj = tiny_model("qwen2").model.layers[0].self_attn.v_proj
    with pytest.raises(CheckpointError, match=r"model\.layers\.0.*v_proj is FLOAT"):
        save_quantized(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_is_clean_and_names_the_dtype(quantized, tmp_path):
    model = copy.deepcopy(quantized["qwen3"])
    model.config.quantization_config = {"quant_method": "gguf"}  # as GGUF loading leaves it
    out = save_quantized(model, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["architectures"] == ["Qwen3ForCausalLM"]
    assert cfg["dtype"] == cfg["torch_dtype"] == "float32"
    assert hasattr(model.config, "quantization_config")  # the caller's model is untouched


# ------------------------------------------------------------------------------------ dtype
def test_bfloat16_export_round_trips(quantized, tmp_path, recwarn):
    model = quantized["qwen2"]
    out = save_quantized(model, tmp_path / "out", dtype=torch.bfloat16)
    assert not [w for w in recwarn if "transform" in str(w.message)]  # bf16 transforms: lossless
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    tensors = all_tensors(out)
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.self_attn.q_proj.bias"].dtype == torch.bfloat16
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float32
    assert tensors["model.layers.0.self_attn.q_proj.clip_ratio"].dtype == torch.float32
    loaded = load_quantized(out)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(logits(loaded), logits(cast_plain_params(model, torch.bfloat16)))
    # Loading the float32 export in bfloat16 gives the same model.
    again = load_quantized(save_quantized(model, tmp_path / "fp32"), dtype=torch.bfloat16)
    assert torch.equal(logits(again), logits(loaded))


def test_lossy_transform_cast_warns(tmp_path):
    model = random_quantize(tiny_model("llama"), seed=1, groups=("mlp",), act_dtype=torch.float16)
    with pytest.warns(UserWarning, match=r"mlp\.gate_proj\.left_trans \(float16 -> bfloat16\)"):
        save_quantized(model, tmp_path / "out", dtype=torch.bfloat16)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_float32_export_of_a_float16_model_loads_in_float16(tmp_path):
    # fp32 transforms alone would reload as bfloat16 (from_checkpoint's default): the description says fp16.
    model = random_quantize(tiny_model("llama"), seed=1, act_dtype=torch.float16)
    out = save_quantized(model, tmp_path / "out", dtype=torch.float32)
    assert all_tensors(out)["model.layers.0.mlp.up_proj.left_trans"].dtype == torch.float32
    assert description(out)["metadata"] == {"flatquant_lab_act_dtype": "float16"}
    loaded = load_quantized(out)
    assert loaded.model.layers[0].mlp.up_proj.act_dtype == torch.float16
    assert torch.equal(logits(loaded), logits(model))
    # without the entry (another exporter's checkpoint) the transforms' dtype decides, as before
    desc = description(out)
    del desc["metadata"]
    (out / DESCRIPTION_FILE).write_text(json.dumps(desc))
    assert load_quantized(out).model.layers[0].mlp.up_proj.act_dtype == torch.bfloat16
    desc["metadata"] = {"flatquant_lab_act_dtype": "float32"}
    (out / DESCRIPTION_FILE).write_text(json.dumps(desc))
    with pytest.raises(CheckpointError, match="metadata.flatquant_lab_act_dtype is 'float32', expected"):
        load_quantized(out)


def test_lossy_load_dtype_warns(tmp_path):
    model = random_quantize(tiny_model("llama"), seed=1, groups=("mlp",), act_dtype=torch.float16)
    out = save_quantized(model, tmp_path / "out")
    with pytest.warns(UserWarning, match=r"dtype: loading rounds transforms .*mlp\.gate_proj\.left_trans "
                                         r"\(float16 -> bfloat16\) and 7 more") as rec:
        load_quantized(out, dtype=torch.bfloat16)
    assert len([w for w in rec if "loading rounds" in str(w.message)]) == 1


def test_load_dtype_argument_casts(saved):
    loaded = load_quantized(saved["llama"], dtype="float16")
    q = loaded.model.layers[0].self_attn.q_proj
    assert loaded.model.norm.weight.dtype == torch.float16 and q.act_dtype == torch.float16
    assert q.weight_scale.dtype == torch.float32


# ------------------------------------------------------------------------------------ files
def test_sharded_export_round_trips(quantized, tmp_path):
    model = quantized["qwen2"]
    out = save_quantized(model, tmp_path / "out", max_shard_size="20KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = all_tensors(out)
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert torch.equal(logits(load_quantized(out)), logits(model))
    os.remove(out / shards[1])
    with pytest.raises(FileNotFoundError, match=shards[1]):
        load_quantized(out)


def test_bad_max_shard_size(quantized, tmp_path):
    with pytest.raises(ValueError, match="max_shard_size"):
        save_quantized(quantized["llama"], tmp_path / "out", max_shard_size="lots")


@pytest.mark.parametrize("size", ["0.0001KB", "0.0009 kb", "0.0000001MB", "0GB"])
def test_max_shard_size_below_one_byte_is_an_error(quantized, tmp_path, size):
    """It used to become 1 byte silently (one shard per tensor)."""
    with pytest.raises(ValueError, match=r"max_shard_size: expected at least 1 byte, got .* \(less than one byte\)"):
        save_quantized(quantized["llama"], tmp_path / "out", max_shard_size=size)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", [0, -1, True, 1.5, "0", "-1MB", "2 PB", "", "1.5KiB", "2.5B", None])
def test_max_shard_size_must_be_bytes_or_a_hugging_face_size(quantized, tmp_path, size):
    """Sizes are Hugging Face's (ints of bytes, or KB/MB/GB/TB strings); anything else is refused by name."""
    with pytest.raises(ValueError, match="^max_shard_size: expected"):
        save_quantized(quantized["llama"], tmp_path / "out", max_shard_size=size)
    assert not (tmp_path / "out").exists()


def test_failure_mid_write_leaves_no_out_dir(quantized, tmp_path, monkeypatch):
    calls = []

    def flaky(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(export_save, "save_file", flaky)
    with pytest.raises(OSError, match="injected"):
        save_quantized(quantized["llama"], tmp_path / "out", max_shard_size="20KB")
    assert len(calls) == 2
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone too


def test_failed_overwrite_keeps_the_previous_export(quantized, saved, tmp_path, monkeypatch):
    out = shutil.copytree(saved["llama"], tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise RuntimeError("tokenizer failed (injected)")

    class Tok:
        save_pretrained = staticmethod(boom)

    with pytest.raises(RuntimeError, match="injected"):
        save_quantized(quantized["qwen2"], out, tokenizer=Tok(), overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_existing_out_dir_needs_overwrite(quantized, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match=str(out)):
        save_quantized(quantized["llama"], out)
    assert (out / "stale.txt").exists()
    save_quantized(quantized["llama"], out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []
    assert torch.equal(logits(load_quantized(out)), logits(quantized["llama"]))


def test_no_pickle_anywhere(saved, monkeypatch):
    import collections
    import pickle
    import sys

    files = {p.suffix for p in saved["qwen3"].iterdir()}
    assert files == {".json", ".safetensors"}
    # Every unpickler (C or Python, however reached) raises this audit event when it resolves a class,
    # as loading any tensor or module needs. A hook cannot be removed, so it only listens while armed.
    events, armed = [], [True]
    sys.addaudithook(lambda event, args: events.append(args) if armed[0] and event == "pickle.find_class" else None)
    try:
        pickle.loads(pickle.dumps(collections.OrderedDict()))
        assert events, "the audit hook does not see unpickling"
        events.clear()

        def forbidden(*args, **kwargs):
            raise AssertionError("torch.load called: pickle is not allowed")

        monkeypatch.setattr(torch, "load", forbidden)
        monkeypatch.setattr("pickle.load", forbidden)
        monkeypatch.setattr("pickle.loads", forbidden)
        load_quantized(saved["qwen3"])
    finally:
        armed[0] = False
    assert events == [], f"something unpickled while loading: {events[:3]}"


def test_tokenizer_is_saved(quantized, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 256)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    out = save_quantized(quantized["llama"], tmp_path / "out", tokenizer=tok)
    again = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert again("w5 w7")["input_ids"] == tok("w5 w7")["input_ids"]


# ------------------------------------------------------------------------------------ bad checkpoints
def _broken(src: Path, dst: Path, tensors_fn=None, desc_fn=None) -> Path:
    out = shutil.copytree(src, dst)
    if tensors_fn is not None:
        tensors = load_file(str(out / "model.safetensors"))
        tensors_fn(tensors)
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if desc_fn is not None:
        desc = description(out)
        desc_fn(desc)
        (out / DESCRIPTION_FILE).write_text(json.dumps(desc))
    return out


Q = "model.layers.0.self_attn.q_proj"
O = "model.layers.1.self_attn.o_proj"  # not fused: its own transform and clip ratio
BAD = {
    "missing quantized key": (lambda t: t.pop(f"{Q}.weight_scale"), None, rf"{Q}\.weight_scale"),
    "missing float key": (lambda t: t.pop("model.norm.weight"), None, r"model\.norm\.weight"),
    "extra key": (lambda t: t.update({"model.layers.0.extra": torch.zeros(2)}), None, r"model\.layers\.0\.extra"),
    "extra quantized key": (lambda t: t.update({f"{Q}.smooth": torch.zeros(2)}),
                            lambda d: d.update({f"{Q}.smooth": QUANT_TYPE}), rf"{Q}\.smooth"),
    "wrong shape": (lambda t: t.update({f"{Q}.weight_scale": t[f"{Q}.weight_scale"].view(-1)}), None,
                    rf"{Q}\.weight_scale: expected shape \[64, 1\]"),
    "wrong dtype": (lambda t: t.update({f"{Q}.weight_scale": t[f"{Q}.weight_scale"].half()}), None,
                    rf"{Q}\.weight_scale: expected dtype float32"),
    "wrong float dtype": (lambda t: t.update({"model.norm.weight": t["model.norm.weight"].half()}), None,
                          r"model\.norm\.weight: expected dtype float32"),
    "wrong float shape": (lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:32]}), None,
                          r"model\.norm\.weight: expected shape \[64\]"),
    "wrong weight shape": (lambda t: t.update({f"{O}.weight": t[f"{O}.weight"][:32].clone()}), None,
                           rf"{O}\.weight: expected shape \[64, 64\], got \[32, 64\]"),
    "wrong transform size": (lambda t: t.update({f"{O}.left_trans": t[f"{O}.left_trans"][:4, :4].clone()}),
                             None, rf"{O}\.left_trans: expected shape \[8, 8\]"),
    "non-int4 weight": (lambda t: t[f"{Q}.weight"].__setitem__((0, 0), 9), None, rf"{Q}\.weight: expected int4"),
    "bad clip ratio": (lambda t: t[f"{O}.clip_ratio"].fill_(1.5), None, rf"{O}\.clip_ratio: expected .*\(0, 1\]"),
    "tied weight stored": (lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}), None,
                           r"lm_head\.weight: unexpected"),
    "W4A4 without weight_scale": (lambda t: t.pop(f"{Q}.weight_scale"), lambda d: d.pop(f"{Q}.weight_scale"),
                                  rf"{Q}\.weight_scale: missing"),
    "FLOAT but int8": (None, lambda d: d.update({k: FLOAT_TYPE for k in d if k.startswith("model.layers.0.self_attn.")
                                                  and d[k] == QUANT_TYPE}),
                       r"model\.layers\.0\.self_attn\.[qkv]_proj\.weight: description says FLOAT but the tensor is int8"),
    "W4A4 on a float tensor": (None, lambda d: d.update({"model.norm.weight": QUANT_TYPE}), r"model\.norm"),
    "key not in description": (None, lambda d: d.pop("model.layers.1.mlp.down_proj.left_trans"),
                               r"model\.layers\.1\.mlp\.down_proj\.left_trans: stored but not listed"),
    "description lists a missing tensor": (None, lambda d: d.update({"model.layers.0.ghost.weight": FLOAT_TYPE}),
                                           r"model\.layers\.0\.ghost\.weight: listed"),
    "unknown quant type": (None, lambda d: d.update({"model.layers.1.mlp.down_proj.weight": "W4A8_DYNAMIC"}),
                           r"model\.layers\.1\.mlp\.down_proj\.weight: description says 'W4A8_DYNAMIC'"),
    "static W8A8 names the layer": (None, lambda d: d.update({"model.layers.1.mlp.down_proj.weight": "W8A8"}),
                                    r"^model\.layers\.1\.mlp\.down_proj: description says 'W8A8' .*static W8A8"),
    "fused shard types differ": (None, lambda d: d.update({k: FLOAT_TYPE for k in d if ".mlp.up_proj." in k}),
                                 r"model\.layers\.\d.*up_proj.*FLOAT"),
    "fused transforms differ": (lambda t: t[f"{Q}.left_trans"].mul_(-1), None,
                                r"model\.layers\.0: .*_proj\.left_trans differs"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_errors_name_the_tensor(case, saved, tmp_path):
    tensors_fn, desc_fn, pattern = BAD[case]
    out = _broken(saved["llama"], tmp_path / "bad", tensors_fn, desc_fn)
    with pytest.raises(CheckpointError, match=pattern):
        load_quantized(out)


def test_missing_files_are_named(saved, tmp_path):
    out = shutil.copytree(saved["llama"], tmp_path / "a")
    os.remove(out / DESCRIPTION_FILE)
    with pytest.raises(FileNotFoundError, match=DESCRIPTION_FILE):
        load_quantized(out)
    out = shutil.copytree(saved["llama"], tmp_path / "b")
    os.remove(out / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_quantized(out)


# ------------------------------------------------------------------------------------ helpers
def test_linear_weight_bytes(quantized):
    dense = tiny_model("llama")
    per_layer = sum(dense.model.layers[0].get_submodule(n).weight.numel() for n in LINEAR_NAMES)
    # By default the decoder layers' linears only (what W4A4 quantizes): two layers of fp32.
    assert linear_weight_bytes(dense) == 4 * 2 * per_layer
    # With everything, the (tied) lm_head counts too.
    assert linear_weight_bytes(dense, decoder_only=False) == 4 * (2 * per_layer + dense.lm_head.weight.numel())
    q = quantized["llama"]
    small = linear_weight_bytes(q)
    packed = sum(q.get_submodule(n).weight_packed.numel() * 4 for n in quantized_linear_names(q))
    assert packed == 2 * per_layer // 2  # int4: half a byte per weight
    assert packed < small < linear_weight_bytes(dense) / 4
