"""bench/bench_mxfp4_vs_int4.py on tiny INT4 and MXFP4 FlatQuant exports of one tiny llama: the smoothing scales its
float references undo, the tables, and the command line's header and JSON."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from flatquant_lab.hub import load_model
from flatquant_lab.io import load_quantized, save_quantized
from flatquant_lab.models import adapter_for
from tiny_models import config, quantized_copy, tiny_model, word_tokenizer, write_tiny_model_dir

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_mxfp4_vs_int4.py"
KINDS = ("q", "k", "v", "o", "gate", "up", "down")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_mxfp4_vs_int4", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny llama (head_dim 32, so that o_proj and down_proj split into MXFP4 groups), its INT4 and MXFP4
    FlatQuant exports (smoothing on, which moves its outlier channels into the norms and v/up rows), and a text."""
    root = tmp_path_factory.mktemp("bench_mx")
    model = tiny_model("llama", head_dim=32)
    write_tiny_model_dir(root / "float", model)
    tok = word_tokenizer()
    for name, cfg in (("int4", config(epochs=1)), ("mxfp4", config(epochs=1, recipe="mxfp4"))):
        save_quantized(quantized_copy(model, cfg), root / name, tokenizer=tok)
    g = torch.Generator().manual_seed(5)
    (root / "text.txt").write_text(" ".join(f"w{int(i)}" for i in torch.randint(4, 256, (400,), generator=g)))
    return root


def test_scale_fit_recovers_column_row_and_kv_tied_scales():
    bench = _bench()
    g = torch.Generator().manual_seed(0)
    f = torch.randn(12, 8, generator=g, dtype=torch.float64)
    d = torch.rand(8, generator=g, dtype=torch.float64) + 0.5
    torch.testing.assert_close(bench.scale_fit([f * d], [f], 0), d)
    r = torch.rand(12, generator=g, dtype=torch.float64) + 0.5
    torch.testing.assert_close(bench.scale_fit([r[:, None] * f], [f], 1), r)
    # o_proj's columns: 2 kv channels x 2 query heads x head_dim 2, one scale per kv channel
    dk = torch.tensor([2.0, 3.0, 5.0, 7.0], dtype=torch.float64)
    cols = dk.view(2, 1, 2).expand(2, 2, 2).reshape(-1)
    torch.testing.assert_close(bench.scale_fit([f * cols], [f], 0, (2, 2, 2)), dk)
    assert torch.equal(bench.scale_fit([f[:, :1]], [torch.zeros(12, 1, dtype=torch.float64)], 0),
                       torch.ones(1, dtype=torch.float64))


def test_float_references_undo_the_smoothing(exports):
    bench = _bench()
    fm, _ = load_model(str(exports / "float"))
    adapter = adapter_for(fm)
    info = adapter.info(fm)
    for name in ("int4", "mxfp4"):
        q = load_quantized(exports / name, backend="reference")
        fl, ql = adapter.decoder_layers(fm)[0], adapter.decoder_layers(q)[0]
        refs, d = bench.float_references(fl, ql, adapter.groups, info)
        # q/k/v and gate/up: d read back from the norms exactly, far from 1 on the outlier channels
        for group, norm in (("attn", "input_layernorm"), ("mlp", "post_attention_layernorm")):
            want = fl.get_submodule(norm).weight.double() / ql.get_submodule(norm).weight.double()
            assert torch.equal(d[group], want.detach()), (name, group)
        assert float(d["attn"].max()) > 2.0
        # o_proj: one d per kv channel, the geometric mean of the two fits, close to both
        kv_d = d["o"].view(info.num_kv_heads, -1, info.head_dim)
        assert torch.equal(kv_d, kv_d[:, :1].expand_as(kv_d))
        torch.testing.assert_close(d["o"], (d["o:rows"] * d["o:cols"]).sqrt())
        assert float((d["o:rows"] / d["o:cols"] - 1).abs().max()) < 0.3
        # v_proj's rows carry 1 / d of o_proj's kv channels
        v = fl.self_attn.v_proj.weight.double() * d["attn"][None, :] / kv_d[:, 0].reshape(-1)[:, None]
        torch.testing.assert_close(refs["self_attn.v_proj"].weight, v.detach())


def test_compare_exports_tables_every_linear(exports):
    bench = _bench()
    s = bench.compare_exports(exports / "int4", exports / "mxfp4", model=str(exports / "float"), windows=2,
                              seqlen=32, data=exports / "text.txt", top=3)
    assert s["tokens"] == 64 and s["layers"] == 2
    assert s["exports"]["int4"]["schemes"] == {"W4A4_FLATQUANT_DYNAMIC": 14}
    assert s["exports"]["mxfp4"]["schemes"] == {"W4A4_MXFP4_FLATQUANT": 14}
    assert len(s["linears"]) == 14 and set(s["kinds"]) == set(KINDS) | {"all"}
    for n, r in s["linears"].items():
        for e in ("int4", "mxfp4"):
            # against the smoothed float reference; against the float weight as stored it is 1 to 40 (the outliers)
            assert 0.0 < r[f"{e}_err"] < 0.5 and 0.0 < r[f"{e}_act"] < 0.5 and 0.0 < r[f"{e}_wt"] < 0.5, (n, r)
            assert abs(s["exports"][e]["linears"][n]["weight_scale_deficit"]) < 0.2
        assert math.isclose(r["ratio"], r["mxfp4_err"] / r["int4_err"])
    k = s["kinds"]["o"]
    assert k["n"] == 2 and math.isclose(k["ratio_err"], k["mxfp4_err"] / k["int4_err"])
    assert s["top_ratio"] == sorted(s["linears"], key=lambda n: -s["linears"][n]["ratio"])[:3]
    assert s["top_mxfp4"] == sorted(s["linears"], key=lambda n: -s["linears"][n]["mxfp4_err"])[:3]
    lines = bench.format_tables(s).splitlines()
    assert len(lines) == 2 + 8 + 2 * (3 + 3)  # title, header, 7 kinds and all; two titled tables of 3
    assert all(n in "\n".join(lines) for n in s["top_ratio"] + s["top_mxfp4"])


def test_the_command_line_prints_its_setup_and_writes_json(exports, tmp_path, capsys):
    bench = _bench()
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    try:
        assert bench.main(["--int4", str(exports / "int4"), "--mxfp4", str(exports / "mxfp4"), "--model",
                           str(exports / "float"), "--windows", "1", "--seqlen", "16", "--data",
                           str(exports / "text.txt"), "--threads", "1", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("command: ") and "--int4" in lines[0]
    assert lines[1].startswith("commit: ") and lines[2].startswith("cpu: ") and lines[3] == "threads: 1"
    assert any(line.startswith("kind ") for line in lines)
    data = json.loads(out.read_text())
    assert data["threads"] == 1 and len(data["linears"]) == 14
    with pytest.raises(SystemExit, match="--mxfp4: .* is not an export folder"):
        bench.main(["--int4", str(exports / "int4"), "--mxfp4", str(tmp_path / "none"), "--model",
                    str(exports / "float")])
