"""A researcher's first day: a bf16 model stays bf16 from load to export, one set of defaults, --help shows
them, and every mistake the export or serving would refuse is one line and exit code 2, before any work."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flatquant_lab import hub
from flatquant_lab.cli import COMMANDS, as_flags, build_parser, main
from flatquant_lab.cli.args import CLIExit, HelpFormatter
from flatquant_lab.recipe import QuantConfig
from tiny_models import tiny_config, write_tiny_model_dir

# The float tensors a W4A4 / W8A8 export keeps in float32 whatever the model dtype: the scales and clip ratios.
FLOAT32_BY_CONTRACT = ("weight_scale", "weight_offset", "clip_ratio")
TINY_BUDGET = ["--samples", "4", "--seqlen", "16", "--epochs", "1", "--e2e-epochs", "0"]


def _model_dir(path: Path, dtype=torch.bfloat16, **overrides) -> Path:
    """A tiny Llama saved with save_pretrained in ``dtype`` (its config.json says so), with a tokenizer."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(dtype)
    write_tiny_model_dir(path, model)
    return path


def _calib_text(path: Path, tokens: int = 400) -> Path:
    rng = torch.Generator().manual_seed(5)
    path.write_text(" ".join(f"w{int(i)}" for i in torch.randint(4, 256, (tokens,), generator=rng)))
    return path


def _fails(argv, capsys) -> str:
    """Run the CLI on ``argv``: it must exit 2 with exactly one line on stderr (no traceback); that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2, (exc.value.code, err)
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# ============================================================================================ dtype
def test_auto_dtype_reads_the_config(tmp_path):
    bf16 = _model_dir(tmp_path / "bf16")
    model, _ = hub.load_model(bf16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert hub.load_model(bf16, dtype="float32")[0].dtype == torch.float32  # float32 only when asked
    cfg = json.loads((bf16 / "config.json").read_text())
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = "float16"  # what transformers < 4.56 writes
    (bf16 / "config.json").write_text(json.dumps(cfg))
    assert hub.model_dtype(bf16) == torch.float16
    cfg.pop("torch_dtype")
    (bf16 / "config.json").write_text(json.dumps(cfg))
    assert hub.model_dtype(bf16) == torch.float32  # none declared: float32, as transformers loads it


def test_act_dtype_follows_a_half_model():
    from flatquant_lab.api import quantize
    from tiny_models import tiny_model

    assert QuantConfig().act_dtype is None
    for dtype, act in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                       (torch.float32, torch.bfloat16)):
        model = quantize(tiny_model("llama").to(dtype), QuantConfig(method="rtn", weight_quantizer="rtn"))
        assert model.flatquant_config.act_dtype == act
        assert model.model.layers[0].self_attn.q_proj.act_dtype == act
    with pytest.raises(ValueError, match="^act_dtype: the model is torch.float16"):  # an explicit mismatch
        quantize(tiny_model("llama").half(), QuantConfig(method="rtn", weight_quantizer="rtn",
                                                         act_dtype=torch.bfloat16))


def test_a_bf16_model_is_calibrated_and_exported_in_bf16(tmp_path, capsys):
    src = _model_dir(tmp_path / "src")
    out = tmp_path / "out"
    calib = str(_calib_text(tmp_path / "c.txt"))
    argv = ["quantize", "--model", str(src), "--out", str(out), "--calib-data", calib, *TINY_BUDGET]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["dtype"] == "bfloat16"
    dtypes = {}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for key in f.keys():
            dtypes[key] = f.get_slice(key).get_dtype()
    floats = {k: d for k, d in dtypes.items() if d in ("F32", "F16", "BF16")}
    f32 = sorted(k for k, d in floats.items() if d == "F32")
    assert all(k.rsplit(".", 1)[-1] in FLOAT32_BY_CONTRACT for k in f32), f32[:5]  # no float32 weight copy
    assert {d for k, d in floats.items() if k not in f32} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # int4 linears in a bf16 export: smaller than the bf16 input, and far from a float32 copy's size
    size_in = (src / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").stat().st_size < size_in
    loaded = __import__("flatquant_lab").load_quantized(out)
    assert loaded.model.layers[0].self_attn.q_proj.act_dtype == torch.bfloat16
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16


def test_the_bundled_gguf_model_stays_float32():
    """"auto" for the GGUF alias: float32, what it is dequantized to and what the published figures ran on."""
    pytest.importorskip("gguf")
    assert hub.model_dtype("smollm2-135m") == torch.float32


# ============================================================================================ defaults
def test_one_set_of_defaults():
    cfg = QuantConfig()
    assert (cfg.method, cfg.weight_quantizer, cfg.profile) == ("flatquant", "gptq", "fast")
    parser, _ = build_parser("quantize")
    args = parser.parse_args(["quantize", "--model", "m", "--out", "o"])
    assert (args.method, args.weight_quantizer, args.profile) == (cfg.method, cfg.weight_quantizer, cfg.profile)
    assert args.dtype == "auto" and args.fallback == cfg.fallback and args.tp_size == cfg.tp_size
    assert args.seed == cfg.seed and args.activations == cfg.activations


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_every_default(command):
    parser, _ = build_parser(command)
    target = parser
    if command is not None:
        target = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
        target = target.choices[command]
    fmt = HelpFormatter(prog="flatquant-lab")
    for action in target._actions:
        if not action.option_strings or action.nargs == 0 or action.required or action.dest == "help":
            continue
        assert "default" in fmt._get_help_string(action).lower(), (command, action.option_strings)


def test_global_flags_before_or_after_the_command(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        parser, _ = build_parser("serve-check")
        for argv in (["--threads", "1", "-v", "serve-check", "d"], ["serve-check", "d", "--threads", "1", "-v"]):
            args = parser.parse_args(argv)
            assert args.threads == 1 and args.verbose is True
        args = parser.parse_args(["serve-check", "d"])
        assert args.threads is None and args.verbose is False
    finally:
        torch.set_num_threads(before)


def test_a_long_run_says_so_after_its_first_layer(caplog, monkeypatch):
    import flatquant_lab.calibrate as calibrate
    from flatquant_lab.api import quantize
    from tiny_models import tiny_model

    monkeypatch.setattr(calibrate, "LONG_RUN_SECONDS", -1.0)
    with caplog.at_level(logging.WARNING, logger="flatquant_lab.calibrate"):
        quantize(tiny_model("llama"), QuantConfig(method="rtn", weight_quantizer="rtn"))
    said = [r.getMessage() for r in caplog.records if "will take about" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("calibration of 2 layers will take about"), said


# ============================================================================================ mistakes
def test_mistakes_fail_fast_in_one_line(tmp_path, capsys, monkeypatch):
    src = _model_dir(tmp_path / "src")
    calib = str(_calib_text(tmp_path / "c.txt"))
    base = ["quantize", "--model", str(src), "--calib-data", calib, *TINY_BUDGET]

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the mistake was found")

    monkeypatch.setattr(hub, "load_model", no_weights)
    (tmp_path / "exists").mkdir()
    line = _fails([*base, "--out", str(tmp_path / "exists")], capsys)
    assert line.endswith(f"--out: {tmp_path / 'exists'} already exists; pass --overwrite to replace it, or choose "
                         "another --out")
    line = _fails([*base, "--out", str(tmp_path / "o"), "--tp-size", "3"], capsys)
    assert "--tp-size: vLLM cannot split 4 attention heads over 3 ranks (given --tp-size 3); sizes that split this " \
           "model: 1, 2, 4" in line
    short = tmp_path / "short.txt"
    short.write_text("w5 w6 w7")
    line = _fails(["quantize", "--model", str(src), "--out", str(tmp_path / "o"), "--calib-data", str(short)], capsys)
    assert f"--calib-data: {short} has 4 tokens, fewer than one calibration window of --seqlen 128" in line
    line = _fails([*base, "--out", str(tmp_path / "o"), "--calib-data", str(tmp_path / "nope.txt")], capsys)
    assert line.startswith("flatquant-lab quantize: error: --calib-data: ")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in src.iterdir():
        if f.name in ("config.json", "model.safetensors"):
            (bare / f.name).write_bytes(f.read_bytes())
    line = _fails(["quantize", "--model", str(bare), "--out", str(tmp_path / "o")], capsys)
    assert "--model: " in line and "has no loadable tokenizer" in line
    line = _fails(["quantize", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], capsys)
    assert "--model: " in line and "neither a model alias" in line
    line = _fails(["quantize", "--model", str(src), "--out", str(tmp_path / "o"), "--num-layers", "7"], capsys)
    assert "--num-layers: expected an int in [1, 2]" in line
    assert not (tmp_path / "o").exists()


def test_a_model_with_no_flatquant_linear_needs_accept_fallback(tmp_path, capsys, caplog):
    # hidden 320 = 16 x 20 and intermediate 1088: npu_kronecker_quant runs none of their sizes
    src = _model_dir(tmp_path / "h320", hidden_size=320, intermediate_size=1088, head_dim=80)
    argv = ["quantize", "--model", str(src), "--out", str(tmp_path / "o"), "--method", "rtn",
            "--weight-quantizer", "rtn"]
    line = _fails(argv, capsys)
    assert ("--model: 14 of 14 decoder linears will be w8a8_dynamic (the fallback scheme) instead of W4A4 "
            "FlatQuant; none is left on W4A4 FlatQuant: self_attn.q_proj, ") in line
    assert "Pass --accept-fallback" in line
    with caplog.at_level(logging.WARNING, logger="flatquant_lab.calibrate"):
        assert main([*argv, "--accept-fallback"]) == 0
    notices = [r.getMessage() for r in caplog.records if "instead of W4A4 FlatQuant" in r.getMessage()]
    assert len(notices) == 1  # once, up front
    linears = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
    assert set(json.loads(capsys.readouterr().out)["fallbacks"]) == {f"model.layers.{i}.{p}" for i in range(2)
                                                                    for p in linears}


def test_verbose_shows_the_traceback(tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    with pytest.raises(CLIExit):
        main(["quantize", "-v", "--model", "m", "--out", str(tmp_path / "exists")])
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].endswith("choose another --out")


def test_api_names_become_flags():
    assert as_flags("out_dir: x already exists (pass overwrite=True to replace it)", "quantize") == \
        "--out: x already exists (pass --overwrite to replace it)"
    assert as_flags("tp_size: sized for 2; re-quantize with QuantConfig(tp_size=4)", "quantize") == \
        "--tp-size: sized for 2; re-quantize with --tp-size 4"
    assert as_flags("tp_sizes: expected positive ints", "serve-check") == "--tp: expected positive ints"


def test_serve_check_exits_1_when_a_size_does_not_load(tmp_path, capsys):
    from flatquant_lab.api import quantize
    from flatquant_lab.io import save_quantized
    from tiny_models import tiny_model

    model = quantize(tiny_model("llama"), QuantConfig(method="rtn", weight_quantizer="rtn"))
    out = save_quantized(model, tmp_path / "q")
    assert main(["serve-check", str(out), "--tp", "1", "--tokens", "2"]) == 0
    assert main(["serve-check", str(out), "--tp", "1", "--tp", "3", "--tokens", "2"]) == 1
    assert "TP 3: does not load" in capsys.readouterr().out
    line = _fails(["serve-check", str(tmp_path / "none")], capsys)
    assert line.endswith("DIR: " + str(tmp_path / "none") + " is not a directory (expected a checkpoint folder)")


def test_a_real_process_prints_one_line_and_exits_2(tmp_path):
    (tmp_path / "exists").mkdir()
    run = subprocess.run([sys.executable, "-m", "flatquant_lab.cli", "quantize", "--model", "m", "--out",
                          str(tmp_path / "exists")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"flatquant-lab quantize: error: --out: {tmp_path / 'exists'} already exists; pass --overwrite to replace it, "
        "or choose another --out"]


def test_missing_extra_names_it():
    from flatquant_lab.extras import require

    with pytest.raises(ModuleNotFoundError, match=r"^no_such_mod: x needs .*pip install 'flatquant_lab\[eval\]'"):
        require("no_such_mod", "eval", "x")
