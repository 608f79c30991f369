"""Layer-wise calibration's work dir and budget: an interrupted run resumes to the same model, a work dir
of another configuration, other data or other skips is refused, and calibration runs on exactly the
budget's samples x seqlen.

Tiny random models (``tiny_models``), 8 samples of 32 tokens, 1-2 epochs: fast on 2 shared cores.
"""
from __future__ import annotations

import json

import pytest
import torch

import flatquant_lab.calibrate as cal
from flatquant_lab.api import quantize
from flatquant_lab.calibrate import WorkDir, plan_layer
from tiny_models import (CALIB, HELD, Interrupt, assert_same_state, config, logits, quantized_copy, state,
                         stop_after_layer_0, tiny_model)


def test_learned_state_reads_and_writes_the_work_dir_names(tmp_path):
    """A work dir's flat tensor names (``attn.left``, ``self_attn.q_proj.weight_clip``, ...) read into a
    ``LayerState`` and write back as the same tensors under the same names."""
    fm = tiny_model("qwen2")
    cfg = config(epochs=0, work_dir=str(tmp_path / "work"))
    quantized_copy(fm, cfg)
    groups = plan_layer(fm, 0, cfg.for_model(fm))
    tensors = WorkDir(str(tmp_path / "work"), cfg.for_model(fm), 2).load(0)[0]
    learned = cal.LayerState.from_tensors(tensors, groups)
    assert list(learned.groups) == [g.name for g in groups if g.quantized]
    assert learned.to_tensors().keys() == tensors.keys()
    assert all(torch.equal(v, tensors[k]) for k, v in learned.to_tensors().items())
    assert learned["attn"].weight_clip.keys() == {f"self_attn.{p}_proj" for p in "qkv"}


def test_interrupted_run_resumes_to_the_same_model(tmp_path):
    fm = tiny_model("qwen2")
    work = str(tmp_path / "work")
    full = quantized_copy(fm, config())
    with pytest.raises(Interrupt):
        quantized_copy(fm, config(work_dir=work), after_layer=stop_after_layer_0)
    done = WorkDir(work, config(work_dir=work).for_model(fm), 2)
    assert done.has(0) and not done.has(1)
    seen = []
    resumed = quantized_copy(fm, config(work_dir=work), after_layer=seen.append)
    assert seen == [0, 1]
    assert_same_state(state(resumed), state(full))
    assert torch.equal(logits(resumed), logits(full))
    layers = resumed.flatquant_report["layers"]
    assert [e["resumed"] for e in layers] == [True, False]
    assert layers[0]["epoch_losses"] == full.flatquant_report["layers"][0]["epoch_losses"]


def test_work_dir_of_another_configuration_is_refused(tmp_path):
    fm = tiny_model("llama")
    work = str(tmp_path / "work")
    quantized_copy(fm, config(epochs=1, work_dir=work))
    for other in (dict(epochs=2), dict(lr=1e-3), dict(seed=1), dict(method="hadamard")):
        with pytest.raises(ValueError, match="work_dir") as e:
            quantized_copy(fm, config(**{"epochs": 1, **other}, work_dir=work))
        assert work in str(e.value)


def test_work_dir_calibrated_on_other_data_is_refused(tmp_path):
    """Same config, other token ids: resuming would mix layers learned on two data sets."""
    fm = tiny_model("llama")
    work = str(tmp_path / "work")
    with pytest.raises(Interrupt):
        quantized_copy(fm, config(epochs=1, work_dir=work), after_layer=stop_after_layer_0)
    other = torch.randint(0, 256, CALIB.shape, generator=torch.Generator().manual_seed(99))
    with pytest.raises(ValueError, match="^work_dir: .* calibrated on other data") as e:
        quantized_copy(fm, config(epochs=1, work_dir=work), ids=other)
    assert json.loads((tmp_path / "work" / "run.json").read_text())["calib_ids_sha256"] in str(e.value)
    seen = []
    quantized_copy(fm, config(epochs=1, work_dir=work), after_layer=seen.append)  # the same data resumes
    assert seen == [0, 1]


def test_the_budget_is_what_calibration_runs_on():
    """samples x seqlen of the config select the data (first rows, first tokens) and the report says so."""
    fm = tiny_model("llama")
    big = torch.cat([CALIB, HELD[:, :32]])  # 12 x 32: more rows than the budget's 8
    cfg = config(epochs=1)
    with pytest.warns(UserWarning, match=r"calib_data: 12 x 32 token ids given; .* uses the first 8 x 32"):
        from_big = quantized_copy(fm, cfg, ids=big)
    exact = quantized_copy(fm, cfg, ids=CALIB)
    assert_same_state(state(from_big), state(exact))
    rec = exact.flatquant_report["calibration"]
    assert (rec["samples"], rec["seqlen"]) == (cfg.data.samples, cfg.data.seqlen) == (8, 32)
    assert rec == from_big.flatquant_report["calibration"]
    # seqlen cuts each sequence to its first tokens
    with pytest.warns(UserWarning, match=r"uses the first 8 x 16"):
        short = quantized_copy(fm, config(epochs=1, seqlen=16), ids=CALIB)
    assert short.flatquant_report["calibration"]["seqlen"] == 16
    assert_same_state(state(short), state(quantized_copy(fm, config(epochs=1, seqlen=16), ids=CALIB[:, :16])))


@pytest.mark.parametrize("ids, what", [(CALIB[:6], "6 x 32"), (CALIB[:, :20], "8 x 20")])
def test_less_data_than_the_budget_is_refused(ids, what):
    model = tiny_model("llama")
    before = state(model)
    with pytest.raises(ValueError, match=rf"^calib_data: {what} token ids given, but QuantConfig\(profile='paper', "
                                         r"samples=8, seqlen=32\) calibrates on 8 x 32"):
        quantize(model, config(epochs=1), ids)
    assert_same_state(state(model), before)


def test_work_dir_resumes_across_weight_quantizers(tmp_path):
    """With train_inputs="float" the learned tensors do not depend on the weight quantizer: a GPTQ run may
    reuse an RTN run's."""
    fm = tiny_model("llama")
    work = str(tmp_path / "work")
    quantized_copy(fm, config(epochs=1, work_dir=work, train_inputs="float"))
    resumed = quantized_copy(fm, config(epochs=1, work_dir=work, train_inputs="float", weight_quantizer="gptq"))
    fresh = quantized_copy(fm, config(epochs=1, train_inputs="float", weight_quantizer="gptq"))
    assert [e["resumed"] for e in resumed.flatquant_report["layers"]] == [True, True]
    assert_same_state(state(resumed), state(fresh))


def test_work_dir_written_with_other_skips_is_refused(tmp_path):
    fm = tiny_model("llama")
    work = str(tmp_path / "work")
    quantized_copy(fm, config(epochs=1, work_dir=work, skip=("*.layers.0.self_attn.q_proj",)))
    with pytest.raises(ValueError, match="work_dir"):
        quantized_copy(fm, config(epochs=1, work_dir=work))
