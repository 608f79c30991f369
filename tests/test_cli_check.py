"""`flatquant-lab check --quantized DIR --layer NAME`: one layer of a saved checkpoint, on inputs captured from
calibration text, with the numerics report of the random-layer check."""
import json

import pytest
import torch

from flatquant_lab import cli, ops
from flatquant_lab.api import quantize
from flatquant_lab.io import save_quantized
from flatquant_lab.layers import W4A4FlatQuantLinear, W8A8DynamicLinear
from flatquant_lab.numerics import capture_inputs, dequantized_reference
from flatquant_lab.kronecker import kron_apply
from flatquant_lab.recipe import QuantConfig
from tiny_models import random_quantize, tiny_model, word_tokenizer


@pytest.fixture(autouse=True)
def _no_backend_from_the_environment(monkeypatch):
    monkeypatch.delenv("FLATQUANT_BACKEND", raising=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama in msModelSlim's recipe (W4A4 q/k/v and gate/up, W8A8_DYNAMIC o/down; RTN weights), saved with
    its tokenizer, and a calibration text in its vocabulary."""
    root = tmp_path_factory.mktemp("ckpt")
    model = quantize(tiny_model("llama"), QuantConfig(method="hadamard", weight_quantizer="rtn", recipe="msmodelslim"))
    path = save_quantized(model, root / "tiny", tokenizer=word_tokenizer())
    rng = torch.Generator().manual_seed(3)
    text = root / "calib.txt"
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(4, 256, (600,), generator=rng)))
    return path, text


def test_check_a_w4a4_layer_of_a_checkpoint(checkpoint, tmp_path, capsys):
    path, text = checkpoint
    out = tmp_path / "r.json"
    rc = cli.main(["check", "--quantized", str(path), "--layer", "model.layers.1.self_attn.k_proj", "--calib-data",
                   str(text), "--windows", "3", "--seqlen", "16", "--backend", "reference", "--sweep", "--ratios",
                   "1.0", "0.9", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert (f"flatquant-lab check: model.layers.1.self_attn.k_proj (W4A4_FLATQUANT_DYNAMIC) of {path}, on 48 tokens "
            f"it receives from 3 window(s) of 16 tokens of {text} (seed 0)") in printed
    assert "32 x 64, kron 8 x 8" in printed and "SQNR (dB)" in printed and "transform" in printed
    assert "clip-ratio sweep (against the layer with unquantized activations)" in printed
    assert "flatquant-lab check: passed (backend reference)" in printed
    data = json.loads(out.read_text())
    assert data["report"]["passed"] is True and data["report"]["tokens"] == 48
    assert data["config"]["layer"] == "model.layers.1.self_attn.k_proj" and data["config"]["scheme"] == "w4a4_flatquant"
    assert "in_features" not in data["config"] and [r["ratio"] for r in data["sweep"]["rows"]] == [1.0, 0.9]
    # the full-precision reference is the layer itself: the transform check inverts to float64 rounding
    assert data["report"]["transform_rel_err"] < 1e-12 and data["report"]["sqnr_db"] > 10


def test_check_a_w8a8_layer_of_a_checkpoint_uses_the_int8_report(checkpoint, capsys):
    path, text = checkpoint
    rc = cli.main(["check", "--quantized", str(path), "--layer", "model.layers.0.mlp.down_proj", "--calib-data",
                   str(text), "--windows", "2", "--seqlen", "8"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "model.layers.0.mlp.down_proj (W8A8_DYNAMIC)" in printed and "on 16 tokens" in printed
    assert "64 x 128, W8A8_DYNAMIC" in printed and "flatquant-lab check: passed (backend reference)" in printed
    with pytest.raises(SystemExit, match="--clip-ratio: model.layers.0.mlp.down_proj is a W8A8_DYNAMIC layer"):
        cli.main(["check", "--quantized", str(path), "--layer", "model.layers.0.mlp.down_proj", "--calib-data",
                  str(text), "--clip-ratio", "0.9"])


def test_check_a_checkpoint_layer_on_the_bundled_text_by_default(checkpoint, capsys):
    path, _ = checkpoint
    rc = cli.main(["check", "--quantized", str(path), "--layer", "model.layers.0.mlp.up_proj", "--windows", "1",
                   "--seqlen", "32", "--clip-ratio", "0.8"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "wiki_calib" in printed and "on 32 tokens" in printed and "clip_ratio 0.8" in printed


def test_check_a_checkpoint_layer_fails_on_a_broken_backend(checkpoint, capsys):
    path, text = checkpoint
    spec = "broken_backends:scale_x1_5"
    try:
        rc = cli.main(["check", "--quantized", str(path), "--layer", "model.layers.0.self_attn.q_proj",
                       "--calib-data", str(text), "--windows", "2", "--seqlen", "16", "--backend", spec])
    finally:
        ops.unregister_backend(spec)
    printed = capsys.readouterr().out
    assert rc == 1 and f"flatquant-lab check: FAILED: backend {spec}, part scale" in printed


@pytest.mark.parametrize("layer, msg", [
    ("model.layers.0.self_attn.qq_proj", "--layer: 'model.layers.0.self_attn.qq_proj' is no layer there; the "
                                         "quantized linears of {path} are model.layers.0.self_attn.q_proj, "
                                         "model.layers.0.self_attn.k_proj, "),
    ("lm_head", "--layer: 'lm_head' is a float layer there (no quantized path to check); the quantized linears"),
])
def test_check_an_unknown_layer_lists_valid_names(checkpoint, layer, msg):
    path, text = checkpoint
    with pytest.raises(SystemExit) as err:
        cli.main(["check", "--quantized", str(path), "--layer", layer, "--calib-data", str(text)])
    assert msg.format(path=path) in str(err.value), str(err.value)
    assert "(14 in all)" in str(err.value)


@pytest.mark.parametrize("argv, msg", [
    (["--in-features", "64"], "--in-features: not used with --quantized"),
    (["--scheme", "w8a8_dynamic"], "--scheme: not used with --quantized"),
    (["--transform", "random"], "--transform: not used with --quantized"),
    ([], "--layer: expected the name of a quantized linear"),
    (["--layer", "model.layers.0.self_attn.q_proj", "--ratios", "0.9"], "--ratios: only used by the clip-ratio sweep"),
    (["--layer", "model.layers.0.self_attn.q_proj", "--clip-ratio", "1.5"], "--clip-ratio: clip_ratio: expected"),
])
def test_check_quantized_refuses_options_it_would_ignore(checkpoint, argv, msg):
    path, _ = checkpoint
    with pytest.raises(SystemExit, match=msg.replace("(", r"\(")):
        cli.main(["check", "--quantized", str(path), *argv])


def test_checkpoint_options_need_quantized():
    for argv in (["--layer", "x"], ["--calib-data", "x.txt"], ["--windows", "2"], ["--seqlen", "8"]):
        with pytest.raises(SystemExit, match=f"{argv[0]}: only used with --quantized DIR"):
            cli.main(["check", "--in-features", "64", "--out-features", "8", "--tokens", "2", *argv])


def test_check_quantized_errors_name_the_folder_and_the_text(checkpoint, tmp_path):
    path, _ = checkpoint
    with pytest.raises(SystemExit, match="--quantized: .*no loadable tokenizer"):
        cli.main(["check", "--quantized", str(tmp_path), "--layer", "model.layers.0.self_attn.q_proj"])
    with pytest.raises(SystemExit, match="--calib-data: "):
        cli.main(["check", "--quantized", str(path), "--layer", "model.layers.0.self_attn.q_proj", "--calib-data",
                  str(tmp_path / "missing.txt")])


def test_dequantized_reference_is_the_layer_without_activation_quantization():
    model = random_quantize(tiny_model("qwen2"), clip_ratio=0.9)
    q = model.model.layers[0].self_attn.q_proj  # with a bias
    ids = torch.randint(4, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    x = capture_inputs(model, "model.layers.0.self_attn.q_proj", ids)
    assert x.shape == (16, 64)
    ref = dequantized_reference(q)
    want = kron_apply(x.double(), q.left_trans.double(), q.right_trans.double()) @ q.dequantized_weight(torch.float64).T
    torch.testing.assert_close(ref(x.double()), want + q.bias.double(), rtol=1e-10, atol=1e-10)
    w8 = W8A8DynamicLinear.from_float(torch.nn.Linear(64, 16))
    torch.testing.assert_close(dequantized_reference(w8).weight, w8.dequantized_weight(torch.float64))
    assert isinstance(q, W4A4FlatQuantLinear)


def test_check_a_random_mxfp4_layer_and_catch_a_broken_fp4_backend(capsys):
    from broken_backends_mxfp4 import BROKEN_MXFP4

    argv = ["check", "--scheme", "w4a4_mxfp4_flatquant", "--in-features", "256", "--out-features", "32",
            "--tokens", "16"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "random W4A4_MXFP4_FLATQUANT layer (MXFP4 RTN weights)" in printed
    assert "flatquant-lab check: passed (backend reference)" in printed
    ops.register_backend("broken-nibbles", BROKEN_MXFP4["swapped_nibbles"].backend)
    try:
        assert cli.main([*argv, "--backend", "broken-nibbles"]) == 1
    finally:
        ops.unregister_backend("broken-nibbles")
    assert "FAILED: backend broken-nibbles, part codes" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--clip-ratio: not used with --scheme w4a4_mxfp4_flatquant"):
        cli.main([*argv, "--clip-ratio", "0.9"])
    with pytest.raises(SystemExit, match="--in-features: expected a multiple of 32"):
        cli.main(["check", "--scheme", "w4a4_mxfp4_flatquant", "--in-features", "48"])
