"""lm-eval on the bundled perplexity task with a tiny random Llama, token perplexity, offline errors."""
import json
import math

import pytest
import torch

from flatquant_lab import cli
from flatquant_lab.eval import DatasetUnavailableError, evaluate, token_perplexity
from tiny_models import save_random_llama


@pytest.fixture(scope="module")
def tiny_dir(tokenizer, tmp_path_factory):
    """A 2-layer random Llama with the bundled tokenizer, saved as a local HF model directory."""
    return save_random_llama(tmp_path_factory.mktemp("tiny_llama"), tokenizer, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from flatquant_lab.hub import load_model

    return load_model(tiny_dir)


def test_eval_cli_bundled_task(tiny_dir, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert cli.main(["eval", "--model", str(tiny_dir), "--tasks", "wiki_fq_eval", "--limit", "2",
                     "--max_length", "512", "--output_path", str(out)]) == 0
    table = capsys.readouterr().out
    assert "wiki_fq_eval" in table and "word_perplexity" in table and "bits_per_byte" in table
    res = json.loads(out.read_text())
    assert res["n-samples"]["wiki_fq_eval"]["effective"] == 2
    metrics = res["results"]["wiki_fq_eval"]
    # A random model is bad but finite: bits per byte well above 1, below log2(vocab) per byte.
    assert math.isfinite(metrics["word_perplexity,none"]) and metrics["word_perplexity,none"] > 1
    assert 1 < metrics["bits_per_byte,none"] < math.log2(len(json.loads((tiny_dir / "tokenizer.json").read_text())
                                                                 ["model"]["vocab"]))


def test_token_perplexity(tiny):
    model, tok = tiny
    docs = ["The quick brown fox jumps over the lazy dog. " * 30, "A second document, shorter. " * 20]
    ppl = token_perplexity(model, tok, docs, window=64, max_windows=3, batch_size=2)
    assert math.isfinite(ppl) and ppl > 1
    # Same windows one at a time: batching must not change the number.
    # measured 3.2e-7 apart (batched padding changes the float32 sums)
    assert token_perplexity(model, tok, docs, window=64, max_windows=3) == pytest.approx(ppl, rel=3e-6)
    # A random model over a ~49k vocabulary is close to uniform, nowhere near a trained model.
    assert ppl > 1000
    with pytest.raises(ValueError, match="max_windows"):
        token_perplexity(model, tok, docs, window=64, max_windows=1000)
    with pytest.raises(ValueError, match="window"):
        token_perplexity(model, tok, docs, window=1)


def test_missing_dataset_says_it_cannot_be_downloaded(tiny, tmp_path):
    (tmp_path / "hub_task.yaml").write_text(
        "task: needs_the_hub\n"
        "dataset_path: flatquant-lab-tests/not-on-this-machine\n"
        "output_type: loglikelihood_rolling\n"
        "test_split: test\n"
        "doc_to_text: ''\n"
        "doc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n"
    )
    model, tok = tiny
    with pytest.raises(DatasetUnavailableError, match="cannot be downloaded here") as err:
        evaluate(model, tok, tasks="needs_the_hub", include_path=str(tmp_path), limit=1)
    assert "needs_the_hub" in str(err.value) and "HF_DATASETS_OFFLINE=1" in str(err.value)


def test_evaluate_argument_errors(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="tasks"):
        evaluate(model, tok, tasks=[])
    with pytest.raises(ValueError, match="max_length"):
        evaluate(model, tok, max_length=0)
    with pytest.raises(TypeError, match="model"):
        evaluate(torch.nn.Linear(2, 2), tok)


def test_eval_cli_needs_one_model_source(tiny_dir):
    with pytest.raises(SystemExit, match="exactly one"):
        cli.main(["eval", "--tasks", "wiki_fq_eval"])
    with pytest.raises(SystemExit, match="--backend"):
        cli.main(["eval", "--model", str(tiny_dir), "--backend", "reference"])


def test_eval_cli_loads_a_quantized_dir(tiny_dir, tmp_path):
    """``--quantized DIR`` goes through export.load_quantized and reads the tokenizer saved beside it."""
    import argparse

    import flatquant_lab as fq
    from flatquant_lab.cli import eval as evaluation
    from flatquant_lab.models import quantized_linear_names
    from flatquant_lab.hub import load_model

    model, tok = load_model(tiny_dir)
    fq.save_quantized(fq.quantize(model, fq.QuantConfig(method="rtn", weight_quantizer="rtn")), tmp_path / "q",
                      tokenizer=tok)
    parser = argparse.ArgumentParser()
    evaluation.add_arguments(parser)
    qmodel, qtok = evaluation._load_for_cli(parser.parse_args(["--quantized", str(tmp_path / "q")]))
    assert quantized_linear_names(qmodel)
    assert qtok("hello world")["input_ids"] == tok("hello world")["input_ids"]
    ids = torch.tensor([tok("hello world")["input_ids"]])
    with torch.no_grad():
        assert torch.isfinite(qmodel(ids).logits).all()


@pytest.mark.parametrize("argv, name, msg", [
    (["--limit", "2.7"], "--limit", "expected an int >= 1 (documents per task) or a fraction in (0, 1)"),
    (["--limit", "0"], "--limit", "expected an int >= 1"),
    (["--limit", "-3"], "--limit", "expected an int >= 1"),
    (["--limit", "1.5"], "--limit", "expected an int >= 1"),
    (["--limit", "nan"], "--limit", "expected an int >= 1"),
    (["--limit", "inf"], "--limit", "expected an int >= 1"),
    (["--batch_size", "0"], "--batch-size/--batch_size", "expected an int >= 1, 'auto' or 'auto:N'"),
    (["--batch_size", "-1"], "--batch-size/--batch_size", "expected an int >= 1"),
    (["--batch_size", "2.5"], "--batch-size/--batch_size", "expected an int >= 1"),
    (["--batch_size", "auto:0"], "--batch-size/--batch_size", "expected an int >= 1"),
    (["--batch_size", "max"], "--batch-size/--batch_size", "expected an int >= 1"),
    (["--backend", "cuda"], "--backend", "invalid choice: 'cuda'"),
    (["--dtype", "int8"], "--dtype", "invalid choice: 'int8'"),
    (["--num-layers", "0"], "--num-layers", "expected an int >= 1, got '0'"),
    (["--max_length", "1"], "--max-length/--max_length", "expected an int >= 2"),
    (["--num_fewshot", "-1"], "--num-fewshot/--num_fewshot", "expected an int >= 0"),
    (["--num_fewshot", "x"], "--num-fewshot/--num_fewshot", "expected an int >= 0, got 'x'"),
])
def test_eval_cli_rejects_bad_limit_batch_size_backend(argv, name, msg, capsys):
    """Rejected by argparse, before any model is loaded (the --model folder does not even exist)."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", "--model", "no-such-model-dir", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {name}: " in err and msg in err


def test_eval_cli_limit_batch_size_backend_values():
    """--limit is a count or a fraction, never truncated; --batch_size an int or lm-eval's auto forms."""
    import argparse

    from flatquant_lab import ops
    from flatquant_lab.cli import eval as evaluation

    parser = argparse.ArgumentParser()
    evaluation.add_arguments(parser)
    for text, want in (("3", 3), ("3.0", 3), ("1", 1), ("0.25", 0.25)):
        got = parser.parse_args(["--limit", text]).limit
        assert got == want and type(got) is type(want)
    assert parser.parse_args([]).limit is None
    for text, want in (("1", 1), ("16", 16), ("auto", "auto"), ("auto:4", "auto:4")):
        assert parser.parse_args(["--batch_size", text]).batch_size == want
    assert parser.parse_args([]).batch_size == 1
    assert set(evaluation.BACKEND_CHOICES) == {"auto", *ops.BACKENDS}
    for name in evaluation.BACKEND_CHOICES:
        assert parser.parse_args(["--backend", name]).backend == name


def test_evaluate_shows_one_bar_and_none_of_lm_evals_noise(tiny, tmp_path, monkeypatch, capfd, caplog):
    """Outside a git checkout: no `fatal: not a git repository`, no per-window plain bars, and lm-eval's
    notes about in-memory models and our task loader at DEBUG; one bar that counts every scored token."""
    import logging

    model, tok = tiny
    monkeypatch.chdir(tmp_path)  # lm-eval ran `git describe` here, printing git's fatal line to stderr
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG):
        # document 1: 84 tokens (document 0 has 7838)
        res = evaluate(model, tok, tasks="wiki_fq_eval", samples={"wiki_fq_eval": [1]}, max_length=256,
                       log_samples=True, progress="scoring")
    err = capfd.readouterr().err
    assert "fatal" not in err and "Running loglikelihood" not in err and "it/s" not in err, err[-2000:]
    noisy = [r.getMessage()[:80] for r in caplog.records if r.name.startswith("lm_eval") and r.levelno >= logging.WARNING]
    assert not noisy, noisy
    notes = [r for r in caplog.records if "already-initialized model" in r.getMessage()]
    assert notes and all(r.levelno == logging.DEBUG for r in notes)  # still there for who wants it
    (sample,) = res["samples"]["wiki_fq_eval"]
    n = len(tok(sample["doc"]["text"], add_special_tokens=False).input_ids)
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines and all(ln.startswith("scoring") for ln in lines), lines[:3]
    assert f" {n}/{n} " in lines[-1], (n, lines[-1])
    assert res["git_hash"] is None or res["git_hash"] == evaluate.__globals__["package_git_hash"]()

    evaluate(model, tok, tasks="wiki_fq_eval", samples={"wiki_fq_eval": [1]}, max_length=256, progress=False)
    assert capfd.readouterr().err == ""
    with pytest.raises(TypeError, match="progress: expected True, False or a label"):
        evaluate(model, tok, progress=1)


def test_environment_record_is_gathered_once_per_process(tiny, tmp_path, monkeypatch):
    """lm-eval's environment record (torch's collect_env: pip and subprocesses) is kept in every result
    but gathered once per working directory, not on every evaluation."""
    import lm_eval.evaluator as lm_evaluator

    from flatquant_lab.eval import harness

    model, tok = tiny
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(harness, "_ENV_INFO", {})
    calls = []
    original = lm_evaluator.add_env_info

    def counting(storage):
        calls.append(1)
        original(storage)

    monkeypatch.setattr(lm_evaluator, "add_env_info", counting)
    one_short_doc = {"samples": {"wiki_fq_eval": [1]}, "max_length": 256, "progress": False}
    first = evaluate(model, tok, tasks="wiki_fq_eval", **one_short_doc)
    second = evaluate(model, tok, tasks="wiki_fq_eval", **one_short_doc)
    assert len(calls) == 1 and lm_evaluator.add_env_info is counting  # restored after each call
    assert first["pretty_env_info"] == second["pretty_env_info"] and "PyTorch version" in first["pretty_env_info"]
