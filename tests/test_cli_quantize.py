"""`flatquant-lab quantize`: flags a method would ignore are refused, and a tiny model directory is
quantized with RTN and with FlatQuant from a text file, as ``quantize`` does it in Python.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from flatquant_lab.api import quantize
from flatquant_lab.io import load_quantized
from flatquant_lab.layers import W4A4FlatQuantLinear
from flatquant_lab.recipe import QuantConfig
from tiny_models import logits, tiny_model, write_tiny_model_dir


def test_quantize_cli_rejects_flags_it_would_ignore(tmp_path):
    from flatquant_lab.cli import main

    with pytest.raises(SystemExit, match="--epochs, --calib-data: not used by --method rtn"):
        main(["quantize", "--model", str(tmp_path / "never-loaded"), "--method", "rtn", "--weight-quantizer", "rtn",
              "--out", str(tmp_path / "o"),
              "--epochs", "3", "--calib-data", "x.txt"])
    with pytest.raises(SystemExit, match="--lr: not used by --method hadamard with --weight-quantizer gptq"):
        main(["quantize", "--model", "m", "--method", "hadamard", "--weight-quantizer", "gptq", "--samples", "4",
              "--lr", "0.1", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--e2e-epochs: not used by --method hadamard"):
        main(["quantize", "--model", "m", "--method", "hadamard", "--e2e-epochs", "2", "--out", str(tmp_path / "o")])


def test_quantize_cli_on_a_tiny_model_directory(tmp_path, capsys):
    from flatquant_lab.cli import main
    from flatquant_lab.hub import load_model

    fm = tiny_model("llama")  # (transformers maps a qwen2 config to its own Qwen2Tokenizer class)
    src = tmp_path / "tiny"
    write_tiny_model_dir(src, fm)
    m, tok = load_model(str(src))
    assert torch.equal(logits(m), logits(fm))

    out = tmp_path / "rtn"
    assert main(["quantize", "--model", str(src), "--method", "rtn", "--weight-quantizer", "rtn",
                 "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == str(out) and set(printed["kept_float"]) == {"lm_head"}
    loaded = load_quantized(out)
    assert (out / "tokenizer.json").is_file()
    direct = quantize(copy.deepcopy(fm), QuantConfig(method="rtn", weight_quantizer="rtn"))
    assert torch.equal(logits(loaded), logits(direct))

    # FlatQuant from a text file, with a work dir and a skip
    text = tmp_path / "calib.txt"
    rng = torch.Generator().manual_seed(5)
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(4, 256, (400,), generator=rng)))
    out2 = tmp_path / "fq"
    argv = ["quantize", "--model", str(src), "--out", str(out2), "--calib-data", str(text), "--samples", "4",
            "--seqlen", "16", "--epochs", "1", "--work-dir", str(tmp_path / "work"),
            "--skip", "*.layers.1.mlp.down_proj"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["kept_float"]) == {"model.layers.1.mlp.down_proj", "lm_head"}
    assert len(printed["e2e_kl"]) == 4  # the fast profile's end-to-end stage ran (4 epochs)
    loaded2 = load_quantized(out2)
    assert type(loaded2.model.layers[1].mlp.down_proj) is nn.Linear
    assert type(loaded2.model.layers[0].mlp.down_proj) is W4A4FlatQuantLinear
    assert torch.isfinite(logits(loaded2)).all()
    assert (tmp_path / "work" / "layer_0001.safetensors").is_file()


def test_quantize_cli_kv4_exports_without_a_tp_size_and_says_it_does_not_serve(tmp_path, capsys):
    from flatquant_lab.cli import main
    from flatquant_lab.models import kv_caches

    with pytest.raises(SystemExit, match="--kv-transforms: only used with --kv-cache"):
        main(["quantize", "--model", "m", "--kv-transforms", "none", "--out", str(tmp_path / "o")])
    fm = tiny_model("llama")
    src = tmp_path / "tiny"
    write_tiny_model_dir(src, fm)
    out = tmp_path / "kv4"
    with pytest.warns(UserWarning, match="kv_cache_type 'KV4': a research mode that vllm-ascend cannot serve"):
        # the fixed baselines need no calibration text: T_k, T_v Hadamard, clips 1
        assert main(["quantize", "--model", str(src), "--method", "hadamard", "--weight-quantizer", "rtn",
                     "--kv-cache", "KV4", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["kv_cache"] == "KV4" and printed["kv_transforms"] == "kv"
    caches = kv_caches(load_quantized(out))
    assert len(caches) == 2 and all(torch.equal(c.k_clip, torch.ones(2)) for c in caches.values())
    assert main(["serve-check", str(out), "--tp", "1", "--tokens", "2"]) == 1
    assert "vllm-ascend has no 4-bit KV cache" in capsys.readouterr().out
