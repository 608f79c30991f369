"""The main job end to end on the bundled model truncated to two decoder layers (CI-sized)."""
import json
import math

import pytest

from flatquant_lab import cli
from flatquant_lab.demo import METHODS, TASK
from flatquant_lab.io import load_quantized
from flatquant_lab.layers import W4A4FlatQuantLinear

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo")]


def test_demo_pipeline_end_to_end(tmp_path, capsys, caplog):
    out = tmp_path / "results"
    # documents 1 and 2: the two shortest (84 + 437 tokens; document 0 alone has 7838)
    argv = ["demo", "--num-layers", "2", "--docs", "1", "2", "--samples", "4", "--seqlen", "64", "--epochs", "1",
            "--out", str(out)]
    with caplog.at_level("INFO", logger="flatquant_lab.demo"):
        assert cli.main(argv) == 0
    assert "=== W4A4 FlatQuant, TP-3-aware ===" in [r.getMessage() for r in caplog.records]  # its TP size filled in
    printed = capsys.readouterr().out
    # the table: one row per method, then the checks
    for label in ("full precision", "W4A16 RTN", "W4A4 RTN", "W4A4 Hadamard", "W4A4 FlatQuant",
                  "W4A4 FlatQuant + W8A8 o/down (msModelSlim recipe)", "W4A4 FlatQuant, TP-3-aware"):
        assert label in printed
    assert "word PPL" in printed and "check flatquant_below_w4a16_rtn" in printed
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["results"]) == set(METHODS)
    for method, row in summary["results"].items():
        assert math.isfinite(row["word_perplexity"]) and row["word_perplexity"] > 1, method
        assert math.isfinite(row["token_perplexity"]) and row["eval_documents"] == 2, method
    assert summary["profile"] == "fast" and summary["settings"]["task"] == TASK
    assert summary["settings"]["docs"] == [1, 2] and summary["results"]["fp"]["eval_tokens"] == 84 + 437
    # the quantized rows hold int4 linears: about an eighth of fp32, a quarter of bf16, plus scales
    for method in ("rtn", "hadamard", "flatquant"):
        assert summary["results"][method]["linear_bytes_vs_bf16"] < 0.3  # measured 0.262
    # W8A8 o/down: q/k/v and gate/up weights in int4 (2.32M), o and down in int8 (1.22M): 0.336 of bf16
    # from the weights alone, plus scales and transforms (measured 0.344)
    assert 0.336 < summary["results"]["flatquant_msmodelslim"]["linear_bytes_vs_bf16"] < 0.35
    # which TP sizes each export loads at (SmolLM2: 9 heads, 3 kv heads, so never 2 or 4; docs/tensor-parallel.md)
    serves = {m: summary["results"][m]["serves_at_tp"] for m in ("flatquant", "flatquant_msmodelslim", "flatquant_tp")}
    assert serves == {"flatquant": [1], "flatquant_msmodelslim": [1, 3], "flatquant_tp": [3]}, serves
    assert (out / "demo.png").stat().st_size > 1000

    # the FlatQuant export loads (no pickle) and evaluates to the same perplexity through lm-eval
    from flatquant_lab.demo import evaluate_model

    model = load_quantized(out / "export-flatquant")
    assert any(isinstance(m, W4A4FlatQuantLinear) for m in model.modules())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "export-flatquant"), local_files_only=True)
    row = evaluate_model(model, tok, docs=[1, 2])
    assert row["word_perplexity"] == summary["results"]["flatquant"]["word_perplexity"]  # measured equal


def test_demo_rejects_bad_arguments(tmp_path):
    from flatquant_lab.demo import run_demo

    with pytest.raises(ValueError, match="profile"):
        run_demo(profile="huge", out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="methods"):
        run_demo(methods=("fp", "awq"), out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="docs: expected None when limit"):
        run_demo(limit=2, docs=[1], out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="docs: expected a non-empty list"):
        run_demo(docs=[-1], out_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"docs: .* in \[0, 5\)"):
        run_demo(docs=[1, 5], out_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_demo_plot_is_written_atomically_with_an_ordinary_mode(tmp_path):
    """demo.png goes through flatquant_lab.files.save_figure: replaced whole, mode 0644 (mkstemp's is 0600)."""
    from flatquant_lab.demo import LABELS, _plot

    summary = {"model": "tiny", "profile": "fast",
               "results": {m: {"label": LABELS[m], "token_perplexity": 10.0 + i} for i, m in enumerate(METHODS)}}
    path = tmp_path / "demo.png"
    path.write_bytes(b"old")
    inode = path.stat().st_ino
    _plot(summary, path)
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_ino != inode
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["demo.png"]


def test_checks_apply_each_profile_its_own_target():
    from flatquant_lab.demo import _checks

    res = {m: {"token_perplexity": v, "linear_bytes_vs_bf16": 0.26}
           for m, v in (("fp", 20.0), ("rtn_w4a16", 40.0), ("rtn", 9000.0), ("hadamard", 100.0), ("flatquant", 28.0))}
    key = "flatquant_at_most_1.25x_fp_full_profile"
    assert key not in _checks(res, "fast")
    assert _checks(res, "fast")["flatquant_at_most_1.35x_fp_fast_profile"] is False  # 28 / 20 = 1.4
    res["flatquant"]["token_perplexity"] = 25.0
    assert _checks(res, "full")[key] is True and all(_checks(res, "full").values())
    res["flatquant"]["token_perplexity"] = 25.1
    assert _checks(res, "full")[key] is False
    del res["fp"]
    assert _checks(res, "full")[key] is None


def test_the_kv_cache_targets_are_checked_where_their_rows_ran():
    from flatquant_lab.demo import _checks

    res = {m: {"token_perplexity": v, "linear_bytes_vs_bf16": 0.26}
           for m, v in (("fp", 20.0), ("flatquant", 26.0), ("flatquant_msmodelslim", 25.0))}
    assert not any(k.startswith(("c8_", "kv4_")) for k in _checks(res))  # no KV-cache row, no KV-cache check
    res["flatquant_msmodelslim_c8"] = {"token_perplexity": 25.12}  # +0.48%
    res["flatquant_kv4"] = {"token_perplexity": 26.8}  # +3.08% over 26
    res["flatquant_kv4_notrans"] = {"token_perplexity": 27.0}
    checks = _checks(res)
    assert checks["c8_at_most_0.5pct_over_msmodelslim"] is True
    assert checks["kv4_at_most_3pct_over_flatquant"] is False and checks["kv4_below_kv4_without_transforms"] is True
    res["flatquant_msmodelslim_c8"]["token_perplexity"] = 25.13
    del res["flatquant_kv4_notrans"]
    checks = _checks(res)
    assert checks["c8_at_most_0.5pct_over_msmodelslim"] is False and checks["kv4_below_kv4_without_transforms"] is None


def test_the_mxfp4_targets_are_checked_where_its_flatquant_row_ran():
    from flatquant_lab.demo import _checks

    res = {m: {"token_perplexity": v, "linear_bytes_vs_bf16": 0.26}
           for m, v in (("fp", 20.0), ("mxfp4_rtn", 80.0), ("mxfp4_hadamard", 50.0))}
    assert not any(k.startswith("mxfp4_") for k in _checks(res))  # no MXFP4 FlatQuant row, no MXFP4 check
    res["flatquant_mxfp4"] = {"token_perplexity": 28.7}
    checks = _checks(res)
    assert checks["mxfp4_flatquant_below_mxfp4_rtn_and_hadamard"] is True
    assert checks["mxfp4_flatquant_at_most_10pct_over_flatquant"] is None  # no INT4 row to compare with
    res["flatquant"] = {"token_perplexity": 26.0, "linear_bytes_vs_bf16": 0.26}  # 28.7 / 26 = 1.104
    assert _checks(res)["mxfp4_flatquant_at_most_10pct_over_flatquant"] is False
    res["flatquant"]["token_perplexity"] = 26.1  # 1.0996
    assert _checks(res)["mxfp4_flatquant_at_most_10pct_over_flatquant"] is True
    res["mxfp4_hadamard"]["token_perplexity"] = 28.0
    assert _checks(res)["mxfp4_flatquant_below_mxfp4_rtn_and_hadamard"] is False
    del res["mxfp4_rtn"], res["mxfp4_hadamard"]
    assert _checks(res)["mxfp4_flatquant_below_mxfp4_rtn_and_hadamard"] is None
