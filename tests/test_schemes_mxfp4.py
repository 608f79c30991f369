"""The W4A4_MXFP4_FLATQUANT scheme and layer (docs/mxfp4.md): tensors and checks, TP-aware row-parallel
transforms (the same computation at every tp <= max_supported_tp), save -> load -> serve-check at TP 1, 2, 4 and
the refusal above max_supported_tp, a checkpoint in msModelSlim's layout, and the NPU path through the double."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from flatquant_lab import mxfp4, ops
from flatquant_lab.io import DESCRIPTION_FILE, CheckpointError, check_checkpoint, load_quantized, save_quantized
from flatquant_lab.io import serve_check
from flatquant_lab.io.save import checkpoint_state
from flatquant_lab.kronecker import decompose_dim
from flatquant_lab.layers import W4A4MXFP4FlatQuantLinear
from flatquant_lab.layers.w4a4_mxfp4_flatquant import block_diagonal_problem, mx_factors
from flatquant_lab.models import GROUPS, decoder_layers, is_row_parallel, set_submodule
from flatquant_lab.schemes import W4A4_MXFP4_FLATQUANT, scheme_for, scheme_of
from flatquant_lab.transforms import orthogonal_factor
from fake_torch_npu import make_fake_torch_npu
from tiny_models import tiny_config

QT = "W4A4_MXFP4_FLATQUANT"
O, K = 24, 128
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def _linear(o=O, k=K, bias=True, seed=0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, o, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(o, k, generator=g) / k**0.5)
        if bias:
            lin.bias.copy_(torch.randn(o, generator=g))
    return lin


def _factors(k: int, row_parallel: bool, max_tp: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random orthogonal factors of the scheme's sizes; a row-parallel left factor block-diagonal over max_tp."""
    n1, n2 = mx_factors(k, row_parallel, max_tp)
    if row_parallel:
        b = n1 // max_tp
        left = torch.block_diag(*[orthogonal_factor(b, "random", seed=seed + 10 * i) for i in range(max_tp)])
    else:
        left = orthogonal_factor(n1, "random", seed=seed)
    return left, orthogonal_factor(n2, "random", seed=seed + 1)


def _row_layer(tp=1, max_tp=4, seed=0, **kw) -> W4A4MXFP4FlatQuantLinear:
    left, right = _factors(K, True, max_tp, seed)
    return W4A4MXFP4FlatQuantLinear.from_float(_linear(seed=seed), left, right, clip_ratio=0.9,
                                               act_dtype=torch.bfloat16, backend="reference", tp_size=tp,
                                               max_supported_tp=max_tp, **kw)


# ------------------------------------------------------------------ the scheme and its tensors
def test_the_scheme_is_registered_with_its_tensors():
    scheme = scheme_for(QT)
    assert scheme is W4A4_MXFP4_FLATQUANT and scheme.layer_cls is W4A4MXFP4FlatQuantLinear
    assert scheme.has_clip_ratio and scheme.fields == {"group_size": 32, "max_supported_tp": 4}
    specs = scheme.tensor_specs(O, K)
    assert {n: s.shape for n, s in specs.items()} == {
        "weight": (O, K // 2), "weight_scale": (O, K // 32), "left_trans": (8, 8), "right_trans": (16, 16),
        "clip_ratio": (1,), "bias": (O,)}
    assert specs["weight"].dtypes == (torch.uint8,) and specs["weight_scale"].dtypes == (torch.uint8,)
    assert scheme.linear_shape(torch.zeros(O, K // 2, dtype=torch.uint8)) == (O, K)


def test_factor_sizes_column_and_row_parallel():
    assert mx_factors(4096, False) == (64, 64)
    assert mx_factors(4096, True, 4) == (4096 // 32, 32)  # decompose_dim(1024) = (32, 32)
    assert mx_factors(11008, True, 4) == (128, 86)  # decompose_dim(2752) = (32, 86)
    assert mx_factors(128, True, 4) == (16, 8) and decompose_dim(32) == (4, 8)


def test_layer_round_trips_through_its_tensors():
    left, right = _factors(K, False)
    layer = W4A4MXFP4FlatQuantLinear.from_float(_linear(), left, right, clip_ratio=0.9, act_dtype=torch.bfloat16,
                                                backend="reference")
    assert scheme_of(layer) is W4A4_MXFP4_FLATQUANT
    tensors = W4A4_MXFP4_FLATQUANT.tensors_of(layer)
    assert list(tensors) == [*W4A4_MXFP4_FLATQUANT.names, "bias"]
    W4A4_MXFP4_FLATQUANT.check(tensors)
    again = W4A4_MXFP4_FLATQUANT.build(tensors, backend="reference")
    x = torch.randn(5, K).to(torch.bfloat16)
    assert torch.equal(again(x), layer(x)) and again(x).dtype == torch.bfloat16


def test_the_layer_approximates_the_float_linear_and_calls_ops_only(monkeypatch):
    lin = _linear()
    layer = _row_layer()
    x = torch.randn(64, K, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, want = layer(x), lin(x)
    err = float((y.double() - want.double()).norm() / want.double().norm())
    assert y.dtype == torch.float32 and err < 0.25  # FP4 on both sides: a coarse but faithful product
    calls = []
    real_kq, real_qm = ops.kronecker_quant, ops.quant_matmul
    monkeypatch.setattr(ops, "kronecker_quant", lambda *a, **k: calls.append("kq") or real_kq(*a, **k))
    monkeypatch.setattr(ops, "quant_matmul", lambda *a, **k: calls.append("qm") or real_qm(*a, **k))
    layer(x)
    assert calls == ["kq", "qm"]


def test_from_float_scale_rules_differ_and_from_codes_rebuilds():
    lin = _linear()
    left, right = _factors(K, False)
    layers = {r: W4A4_MXFP4_FLATQUANT.from_float(lin, act_dtype=torch.bfloat16, left_trans=left, right_trans=right,
                                                 scale_rule=r) for r in mxfp4.SCALE_RULES}
    assert not torch.equal(layers["kernel"].weight_scale, layers["msmodelslim"].weight_scale)
    k = layers["kernel"]
    again = W4A4_MXFP4_FLATQUANT.from_float(lin, k.weight, k.weight_scale, act_dtype=torch.bfloat16,
                                            left_trans=k.left_trans, right_trans=k.right_trans, clip_ratio=1.0)
    assert all(torch.equal(a, b) for a, b in zip(again.checkpoint_tensors().values(), k.checkpoint_tensors().values()))
    # the weight the tensors stand for, in the input basis, is close to the float weight
    w = W4A4_MXFP4_FLATQUANT.input_basis_weight(k)
    w_fp = lin.weight.detach().double()
    assert float((w - w_fp).norm() / w_fp.norm()) < 0.15


def test_check_names_the_tensor():
    tensors = _row_layer().checkpoint_tensors()
    with pytest.raises(ValueError, match=r"^weight_scale: expected shape \[24, 4\], got \[24, 2\]$"):
        W4A4_MXFP4_FLATQUANT.check({**tensors, "weight_scale": tensors["weight_scale"][:, :2]})
    with pytest.raises(ValueError, match=r"^weight: expected a uint8 matrix of packed FP4 codes \[O, K\]"):
        W4A4_MXFP4_FLATQUANT.check({**tensors, "weight": torch.zeros(O, dtype=torch.uint8)})
    with pytest.raises(ValueError, match=r"^weight: expected dtype uint8, got int8$"):
        W4A4_MXFP4_FLATQUANT.check({**tensors, "weight": tensors["weight"].to(torch.int8)})
    with pytest.raises(ValueError, match=r"^left_trans: sizes 8 x 8 must multiply to K = 128$"):
        W4A4_MXFP4_FLATQUANT.check({**tensors, "left_trans": torch.eye(8, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match=r"weight_scale: 1 code\(s\) 0xFF \(E8M0 NaN\)"):
        bad = tensors["weight_scale"].clone()
        bad[0, 0] = 0xFF
        W4A4_MXFP4_FLATQUANT.build({**tensors, "weight_scale": bad})


# ------------------------------------------------------------------ TP-aware by construction
@pytest.mark.parametrize("tp", [2, 4])
def test_every_tp_up_to_max_computes_the_whole_layer(tp):
    whole = _row_layer(tp=1)
    ranks = _row_layer(tp=tp)
    x = torch.randn(9, K, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    # the quantized activations: the whole token's codes and scales are the ranks' side by side
    xq, s = ops.kronecker_quant(x.view(-1, whole.n1, whole.n2), whole.p1, whole.p2, dst_dtype=ops.FLOAT4_E2M1_X2)
    k = K // tp
    parts = [ops.kronecker_quant(x[:, r * k:(r + 1) * k].contiguous().view(-1, whole.n1 // tp, whole.n2),
                                 ranks.p1_ranks[r], ranks.p2, dst_dtype=ops.FLOAT4_E2M1_X2) for r in range(tp)]
    assert torch.equal(xq.view(9, -1), torch.cat([p[0].view(9, -1) for p in parts], dim=1))
    assert torch.equal(s, torch.cat([p[1] for p in parts], dim=1))
    # the outputs: the same exact group sums, only the ranks' partial outputs are rounded to bf16 before the sum
    y1, yt = whole(x), ranks(x)
    torch.testing.assert_close(yt.float(), y1.float(), rtol=tp * 2**-8, atol=tp * 2**-8 * float(y1.abs().max()))
    exact = sum(mxfp4.dequantize(p[0].view(9, -1), p[1]) @ mxfp4.dequantize(
        ranks.weight[:, r * k // 2:(r + 1) * k // 2], ranks.weight_scale[:, r * k // 32:(r + 1) * k // 32]).T
        for r, p in enumerate(parts))
    assert torch.equal(y1, exact.float().to(torch.bfloat16) + whole.bias)  # bias in the output dtype


def test_shard_gives_each_rank_its_diagonal_block():
    tensors = _row_layer().checkpoint_tensors()
    part = W4A4_MXFP4_FLATQUANT.shard(tensors, rank=1, tp=2)
    assert torch.equal(part["left_trans"], tensors["left_trans"][8:, 8:])
    assert torch.equal(part["weight"], tensors["weight"][:, 32:]) and torch.equal(part["weight_scale"],
                                                                                    tensors["weight_scale"][:, 2:])
    assert torch.equal(part["right_trans"], tensors["right_trans"]) and "bias" not in part
    assert "bias" in W4A4_MXFP4_FLATQUANT.shard(tensors, rank=0, tp=2)
    rows = W4A4_MXFP4_FLATQUANT.shard(tensors, rank=0, tp=2, rows=slice(0, O // 2))  # column-parallel
    assert torch.equal(rows["weight_scale"], tensors["weight_scale"][:O // 2])
    assert torch.equal(rows["left_trans"], tensors["left_trans"])


def test_tp_load_problem_refuses_above_max_and_non_block_diagonal():
    tensors = _row_layer().checkpoint_tensors()
    p = "model.layers.0.self_attn.o_proj"
    assert W4A4_MXFP4_FLATQUANT.tp_load_problem(p, tensors, K // 4, 4, "8.5") == ""
    assert "TP 8 exceeds max_supported_tp = 4" in W4A4_MXFP4_FLATQUANT.tp_load_problem(p, tensors, K // 8, 8, "8.5")
    assert "exceeds max_supported_tp = 2" in W4A4_MXFP4_FLATQUANT.tp_load_problem(p, tensors, K // 4, 4, "8.5",
                                                                                 max_supported_tp=2)
    dense = {**tensors, "left_trans": orthogonal_factor(16, "random", seed=5).to(torch.bfloat16)}
    assert W4A4_MXFP4_FLATQUANT.tp_load_problem(p, dense, K, 1, "8.5") == ""  # one rank uses all of it
    msg = W4A4_MXFP4_FLATQUANT.tp_load_problem(p, dense, K // 2, 2, "8.5")
    assert "not block-diagonal over max_supported_tp = 4 blocks" in msg
    col = {**tensors, "left_trans": torch.eye(8, dtype=torch.bfloat16), "right_trans": torch.eye(16, dtype=torch.bfloat16)}
    assert "a row-parallel W4A4_MXFP4_FLATQUANT linear of K = 128 has transforms 16 x 8" in \
        W4A4_MXFP4_FLATQUANT.tp_load_problem(p, col, K // 2, 2, "8.5")
    assert block_diagonal_problem(tensors["left_trans"], 4) == ""


def test_tp_load_problem_refuses_a_tp_that_does_not_divide_max():
    k = 192  # L = 24: four learned blocks of 6; at TP 3 each rank would take a block of 8
    left, right = _factors(k, True, 4)
    layers = {tp: W4A4MXFP4FlatQuantLinear.from_float(_linear(k=k), left, right, act_dtype=torch.bfloat16,
                                                      backend="reference", tp_size=tp) for tp in (1, 2, 3)}
    tensors = layers[1].checkpoint_tensors()
    p = "model.layers.0.mlp.down_proj"
    assert W4A4_MXFP4_FLATQUANT.tp_load_problem(p, tensors, k // 2, 2, "8.5") == ""
    msg = W4A4_MXFP4_FLATQUANT.tp_load_problem(p, tensors, k // 3, 3, "8.5")
    assert msg.startswith(f"{p}.left_trans: TP 3 does not divide max_supported_tp = 4: "), msg
    assert "(24 / 3 rows) would cut across the 4 learned blocks of 6" in msg
    # a column-parallel linear keeps its whole transform on every rank, and one rank uses all of it
    col_l, col_r = _factors(k, False)
    col = W4A4MXFP4FlatQuantLinear.from_float(_linear(k=k), col_l, col_r, act_dtype=torch.bfloat16).checkpoint_tensors()
    assert W4A4_MXFP4_FLATQUANT.tp_load_problem("model.layers.0.mlp.up_proj", col, k, 3, "8.5") == ""
    assert W4A4_MXFP4_FLATQUANT.tp_load_problem(p, tensors, k, 1, "8.5") == ""
    # why: TP 2 computes the whole layer up to the output rounding, TP 3 another transform
    x = torch.randn(16, k, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y1 = layers[1](x).double()

    def rel(tp: int) -> float:
        return float((layers[tp](x).double() - y1).norm() / y1.norm())

    assert rel(2) < 0.01 and rel(3) > 0.05, (rel(2), rel(3))


def test_the_layer_refuses_tp_above_max():
    with pytest.raises(ValueError, match=r"tp_size: 4 exceeds max_supported_tp = 2"):
        _row_layer(tp=4, max_tp=2)


# ------------------------------------------------------------------ a tiny model through save, load, serve-check
def _tiny_mx_model(max_tp: int = 4, seed: int = 0, **sizes) -> nn.Module:
    """A tiny qwen2 (hidden 128, so that every row-parallel rank at TP 4 holds whole groups of 32) with every
    decoder linear W4A4_MXFP4_FLATQUANT: one transform per fused module, row-parallel ones block-diagonal;
    ``sizes`` replace config sizes."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("qwen2", **{"hidden_size": 128, "intermediate_size": 256, "head_dim": 32, **sizes})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    for i, layer in enumerate(decoder_layers(model)):
        for g, names in enumerate(GROUPS.values()):
            first = layer.get_submodule(names[0])
            row = is_row_parallel(f"model.layers.{i}.{names[0]}")
            left, right = _factors(first.in_features, row, max_tp, seed=100 * i + 10 * g)
            for name in names:
                q = W4A4MXFP4FlatQuantLinear.from_float(layer.get_submodule(name), left, right, clip_ratio=0.9,
                                                        act_dtype=torch.bfloat16, max_supported_tp=max_tp)
                set_submodule(layer, name, q)
    return model


def test_save_load_serve_check_at_tp_1_2_4(tmp_path):
    model = _tiny_mx_model()
    out = save_quantized(model, tmp_path / "mx")
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    assert desc["model_quant_type"] == QT and desc["group_size"] == 32 and desc["max_supported_tp"] == 4
    assert desc["model.layers.0.self_attn.o_proj.weight_scale"] == QT
    loaded = load_quantized(out)
    o_proj = loaded.get_submodule("model.layers.0.self_attn.o_proj")
    assert type(o_proj) is W4A4MXFP4FlatQuantLinear and o_proj.max_supported_tp == 4
    assert (o_proj.n1, o_proj.n2) == (16, 8)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    again = save_quantized(loaded, tmp_path / "again")
    for f in sorted(p.name for p in out.iterdir()):
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    results = serve_check(out, (1, 2, 4), tokens=6)
    assert [r.loads for r in results] == [True, True, True], [r.line() for r in results]
    assert all(r.worst_rel_diff == 0.0 for r in results), [r.line() for r in results]
    # every layer computes the same at every tp (up to the bf16 rounding of the ranks' partial outputs; through
    # the whole model FP4 code flips amplify such last-bit differences, so the check is per layer)
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    with torch.no_grad():
        for tp in (2, 4):
            other = load_quantized(out, tp_size=tp)
            assert other.get_submodule("model.layers.0.mlp.up_proj").tp_size == 1
            for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"):
                a, b = loaded.get_submodule(name), other.get_submodule(name)
                assert b.tp_size == tp
                xi = x[:, :a.in_features]
                ya = a(xi).float()
                torch.testing.assert_close(b(xi).float(), ya, rtol=0, atol=tp * 2**-8 * float(ya.abs().max()))


def test_refused_above_max_supported_tp(tmp_path):
    out = save_quantized(_tiny_mx_model(max_tp=2), tmp_path / "mx2")
    assert json.loads((out / DESCRIPTION_FILE).read_text())["max_supported_tp"] == 2
    r1, r2, r4 = serve_check(out, (1, 2, 4), tokens=4)
    assert r1.loads and r2.loads and not r4.loads
    assert "TP 4 exceeds max_supported_tp = 2" in r4.problem
    with pytest.raises(CheckpointError, match="tp_size: 4 exceeds max_supported_tp = 2"):
        load_quantized(out, tp_size=4)


def test_serve_check_refuses_a_tp_that_does_not_divide_max_supported_tp(tmp_path, capsys):
    """6 heads, 3 kv heads and intermediate 576 split over 3 ranks, and each rank's slices are whole groups of 32,
    but TP 3 does not divide max_supported_tp = 4: each rank's block of left_trans cuts across the learned ones."""
    from flatquant_lab.cli import main

    model = _tiny_mx_model(hidden_size=192, intermediate_size=576, num_attention_heads=6, num_key_value_heads=3)
    out = save_quantized(model, tmp_path / "mx")
    r1, r3 = serve_check(out, (1, 3), tokens=4)
    assert r1.loads and not r3.loads, [r.line() for r in (r1, r3)]
    assert r3.problem.startswith("model.layers.0.mlp.down_proj.left_trans: TP 3 does not divide "
                                 "max_supported_tp = 4: "), r3.problem
    assert main(["serve-check", str(out), "--tp", "1", "--tp", "3", "--tokens", "2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("TP 1: loads") and lines[1].startswith(
        "TP 3: does not load: model.layers.0.mlp.down_proj.left_trans: TP 3 does not divide max_supported_tp = 4")


def test_the_description_fields_are_checked():
    model = _tiny_mx_model()
    tensors, quantized = checkpoint_state(model)
    from flatquant_lab.io.format import build_description

    desc = build_description(tensors, quantized, ["lm_head.weight"] if "lm_head.weight" not in tensors else [])
    desc.update(group_size=32, max_supported_tp=4)
    check_checkpoint(tensors, desc)
    with pytest.raises(CheckpointError, match="group_size is 16; W4A4_MXFP4_FLATQUANT groups 32 values"):
        check_checkpoint(tensors, {**desc, "group_size": 16})
    with pytest.raises(CheckpointError, match="max_supported_tp is 0, expected a positive int"):
        check_checkpoint(tensors, {**desc, "max_supported_tp": 0})
    del desc["group_size"], desc["max_supported_tp"]  # vllm-ascend's defaults: 32 and 4
    check_checkpoint(tensors, desc)


def test_a_checkpoint_in_msmodelslims_layout_loads(tmp_path):
    """msModelSlim's v1 names (quant_model_weights-0000N-of-0000M.safetensors and its index), biases labelled FLOAT,
    bfloat16 float tensors and config, top-level fields as vllm-ascend reads them (SPEC sections 13 and 15)."""
    model = _tiny_mx_model(seed=1)
    tensors, quantized = checkpoint_state(model, dtype=torch.bfloat16)
    out = tmp_path / "msmodelslim"
    out.mkdir()
    desc = {"model_quant_type": QT, "version": "1.0.0", "group_size": 32, "max_supported_tp": 4,
            "kv_quant_type": None, "fa_quant_type": None}
    for key in tensors:
        prefix, _, leaf = key.rpartition(".")
        desc[key] = (QT if leaf != "bias" else "FLOAT") if prefix in quantized else "FLOAT"
    keys = list(tensors)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"quant_model_weights-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, str(out / name))
        weight_map.update(dict.fromkeys(part, name))
    (out / "quant_model_weights.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / DESCRIPTION_FILE).write_text(json.dumps(desc))
    cfg = json.loads(model.config.to_json_string())
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    cfg["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(cfg))
    loaded = load_quantized(out)
    for prefix in quantized:
        layer = loaded.get_submodule(prefix)
        assert type(layer) is W4A4MXFP4FlatQuantLinear and layer.act_dtype == torch.bfloat16
        got, want = layer.checkpoint_tensors(), model.get_submodule(prefix).checkpoint_tensors()
        assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in got), prefix
    x = torch.randn(3, 128).to(torch.bfloat16)
    name = "model.layers.1.self_attn.o_proj"
    assert torch.equal(loaded.get_submodule(name)(x), model.get_submodule(name)(x))
    assert [r.loads for r in serve_check(out, (1, 2, 4), tokens=4)] == [True, True, True]


# ------------------------------------------------------------------ the NPU backend through the double
def test_the_layer_on_the_npu_backend_equals_the_reference(monkeypatch):
    fake = make_fake_torch_npu()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    for tp in (1, 2):
        ref = _row_layer(tp=tp)
        npu = _row_layer(tp=tp)
        npu.backend = "npu"
        assert torch.equal(npu(x), ref(x))
    assert fake.ops() == ["npu_kronecker_quant", "npu_quant_matmul"] * 3
    kq = fake.calls[-2]
    assert kq.tensors["x"].shape == (5, 8, 8) and kq.tensors["p1"].shape == (8, 8)  # rank 1's diagonal block
    assert kq.scalars["dst_dtype"] is fake.float4_e2m1fn_x2


def test_layers_disagreeing_on_max_supported_tp_are_not_saved(tmp_path):
    model = _tiny_mx_model()
    decoder_layers(model)[1].self_attn.o_proj.max_supported_tp = 2
    with pytest.raises(CheckpointError, match=r"model: max_supported_tp: the W4A4_MXFP4_FLATQUANT layers hold \[2, 4\]"):
        save_quantized(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
