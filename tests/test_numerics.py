"""numerics.check_linear / sweep_clip_ratio / sweep_layer_clip_ratio and the `flatquant-lab check` subcommand."""
import json
import math
import sys
import types

import pytest
import torch
from torch import nn

from broken_backends import BROKEN, BROKEN_INT8, LEGITIMATE, LEGITIMATE_INT8
from fake_torch_npu import make_fake_torch_npu
from flatquant_lab import cli, numerics, ops
from flatquant_lab.cli import check as cli_check
from flatquant_lab.kronecker import decompose_dim
from flatquant_lab.layers import W4A4FlatQuantLinear, W8A8DynamicLinear
from flatquant_lab.numerics import (check_linear, check_linear_w8a8, random_problem, sweep_clip_ratio,
                                    sweep_layer_clip_ratio, ulp)
from flatquant_lab.ops import reference as ref
from flatquant_lab.packing import pack_int4, unpack_int4
from flatquant_lab.transforms import orthogonal_factor

K, O, T = 256, 64, 96
N1, N2 = decompose_dim(K)  # (16, 16)


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.delenv("FLATQUANT_BACKEND", raising=False)


@pytest.fixture
def plug():
    """``plug(name, backend)`` registers a backend for one test, the way any backend is plugged in."""
    names = []

    def register(name, backend):
        ops.register_backend(name, backend)
        names.append(name)
        return name

    yield register
    for name in names:
        ops.unregister_backend(name)


def factors(kind, seed=0):
    return orthogonal_factor(N1, kind, seed), orthogonal_factor(N2, kind, seed + 1)


def problem(dtype=torch.bfloat16, kind="hadamard", bias=False, clip=1.0, seed=0, outliers=4, scale=20.0):
    lin, x = random_problem(K, O, T, outlier_channels=outliers, outlier_scale=scale, bias=bias, seed=seed)
    left, right = factors(kind)
    q = W4A4FlatQuantLinear.from_float(lin, left, right, clip_ratio=clip, act_dtype=dtype, backend="reference")
    return q, x.to(dtype), lin


def failed_parts(r):
    return [p.part for p in r.parts if not p.passed]


# ------------------------------------------------------------------ the reference passes, tightly
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["hadamard", "random"])
@pytest.mark.parametrize("bias", [False, True])
def test_reference_passes_on_random_data_with_outliers(dtype, kind, bias):
    q, x, lin = problem(dtype, kind, bias, clip=0.9, seed=3)
    r = check_linear(q, x, lin)
    assert r.passed and r.bound_ok and r.failed_part is None and r.reason == "", r.table()
    assert [p.part for p in r.parts] == list(numerics.PARTS) and all(p.passed and p.compared > 0 for p in r.parts)
    assert r.tie_codes == 0 and r.near_tie_codes > 0  # the reference against itself: not one tie flips
    # no bias: one rounding to the output dtype, so about half an ulp (measured 0.500); with bias up to ~1
    assert r.max_err_ulps <= (0.5001 if not bias else 1.0)
    assert r.max_err_ulps > 0.25  # the comparison is not vacuous: real rounding differences show
    assert r.tokens == T and r.act_dtype == str(dtype).replace("torch.", "")
    assert r.probe_clip_ratios == [float(torch.tensor(0.9, dtype=torch.float32))]  # the checkpoint's float32


def test_clip_ratio_one_also_probes_another_ratio():
    q, x, _ = problem(torch.bfloat16, clip=1.0)
    r = check_linear(q, x)
    assert r.passed and r.probe_clip_ratios == [1.0, numerics.PROBE_CLIP_RATIO]
    assert r.part("scale").compared == 2 * T and r.part("codes").compared == 2 * T * K


def test_a_one_percent_error_in_quant_matmul_is_caught(plug):
    def off(*args, **kwargs):
        y = ref.quant_matmul(*args, **kwargs)
        return (y.float() * (1 + 2**-6)).to(y.dtype)

    q, x, lin = problem(torch.bfloat16)
    q.backend = plug("one-percent-off", types.SimpleNamespace(**{**vars(ref), "quant_matmul": off}))
    r = check_linear(q, x, lin)
    # the unit-scale products show it first; the epilogue and the forward show it too
    assert not r.passed and failed_parts(r) == ["product", "output"]
    out = r.part("output")
    assert "quant_matmul on the reference's codes and scales" in out.reason
    # measured 8.8e-4 off (1 + 2^-6) x exact: the bf16 rounding of the output
    assert out.backend_value == pytest.approx(out.reference_value * (1 + 2**-6), rel=2**-7)


# ------------------------------------------------------------------ the broken backends
@pytest.mark.parametrize("dtype, clip, bias", [(torch.bfloat16, 1.0, False), (torch.float16, 0.9, True)])
@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_backend_is_caught(plug, name, dtype, clip, bias):
    broken = BROKEN[name]
    q, x, lin = problem(dtype, bias=bias, clip=clip)
    q.backend = plug(name, broken.backend)
    assert_caught(check_linear(q, x, lin), broken, name)


def assert_caught(r, broken, name):
    """The report fails, names ``broken.part`` first, with where and both values, in the table and the JSON."""
    assert not r.passed and not r.bound_ok, f"{broken.fault} passed the check"
    assert r.failed_part == broken.part, (broken.fault, r.reason)
    part = r.part(broken.part)
    assert r.reason == part.reason and part.mismatches > 0 and part.token is not None
    assert part.backend_value != part.reference_value
    assert "FAILED" in r.table() and r.reason in r.table()
    d = json.loads(json.dumps(r.to_dict()))
    assert d["passed"] is False and d["failed_part"] == broken.part and d["backend"] == name


@pytest.mark.parametrize("name", sorted(LEGITIMATE))
def test_legitimately_different_backends_pass(plug, name):
    for dtype, clip in ((torch.bfloat16, 1.0), (torch.float16, 0.9)):
        q, x, lin = problem(dtype, clip=clip, kind="random")
        q.backend = plug(f"{name}-{str(dtype)[6:]}", LEGITIMATE[name])
        r = check_linear(q, x, lin)
        assert r.passed, r.reason


def test_swapped_scales_name_the_token_and_both_values(plug):
    q, x, _ = problem(torch.float16, clip=0.9)
    s_ref = ops.kronecker_quant_trace(x.view(-1, N1, N2), q.p1, q.p2, 0.9).scale
    q.backend = plug("swapped", BROKEN["swapped-scales"].backend)
    part = check_linear(q, x).part("scale")
    assert (part.token, part.mismatches) == (2, 2)
    assert part.backend_value == float(s_ref[3]) and part.reference_value == float(s_ref[2])
    assert "first at token 2" in part.reason


def test_offset8_is_named_in_codes_and_pack(plug):
    q, x, _ = problem(torch.bfloat16)
    q.backend = plug("offset8", BROKEN["offset8"].backend)
    r = check_linear(q, x)
    assert failed_parts(r) == ["codes", "pack", "product", "output"]
    assert "offset-8 layout" in r.part("codes").reason and "offset-8 layout" in r.part("pack").reason


def test_fp16_accumulation_is_caught_by_the_probe_not_the_small_layer(plug):
    # K = 256: the layer's partial sums stay below 2048, exact in fp16; the probe's do not
    q, x, _ = problem(torch.bfloat16)
    q.backend = plug("fp16acc", BROKEN["fp16-accumulation"].backend)
    part = check_linear(q, x).part("product")
    assert not part.passed and part.reason.startswith("quant_matmul (probe, unit scales)")


# ------------------------------------------------------------------ the tie allowance
def _flipping(edits):
    """A backend whose kronecker_quant moves the codes at ``edits`` {(token, code): new value}."""
    def kronecker_quant(x, p1, p2, clip_ratio=1.0, dst_dtype=torch.int32):
        out, scale = ref.kronecker_quant(x, p1, p2, clip_ratio=clip_ratio, dst_dtype=dst_dtype)
        vals = unpack_int4(out).reshape(out.shape[0], -1)
        for (tok, idx), v in edits.items():
            vals[tok, idx] = v
        return pack_int4(vals.reshape(out.shape[0], N1, N2)), scale
    return types.SimpleNamespace(**{**vars(ref), "kronecker_quant": kronecker_quant})


def _tie_codes(q, x):
    """Codes whose reference value before rounding sits exactly on a tie, with the other neighbour."""
    tr = ops.kronecker_quant_trace(x.view(-1, N1, N2), q.p1, q.p2, float(q.clip_ratio))
    t, qr = tr.t.double(), tr.q.long()
    on_tie = (t - torch.floor(t) == 0.5) & (qr.abs() < 7)
    idx = on_tie.nonzero().tolist()
    other = {(i, j): int(2 * torch.floor(t[i, j]) + 1 - qr[i, j]) for i, j in idx}  # floor + ceil - q
    return other, tr


def test_tie_flips_up_to_the_bound_pass_and_one_more_fails(plug):
    q, x, lin = problem(torch.float16, clip=0.9)
    r0 = check_linear(q, x)
    allowed = max(1, math.floor(r0.near_tie_codes * numerics.DEFAULT_TIE_SHARE))
    ties, _ = _tie_codes(q, x)
    assert len(ties) > allowed + 1
    picked = list(ties.items())[:allowed + 1]
    q.backend = plug("flips-at-bound", _flipping(dict(picked[:allowed])))
    r = check_linear(q, x, lin)
    assert r.passed and r.tie_codes == allowed, r.reason
    assert r.tie_code_share == pytest.approx(allowed / (T * K))
    assert any("rounding tie (allowed)" in n for n in r.notes)
    q.backend = plug("flips-over-bound", _flipping(dict(picked)))
    r = check_linear(q, x, lin)
    assert not r.passed and r.failed_part == "codes" and "at a rounding tie" in r.reason
    assert f"at most {allowed} allowed" in r.reason


def test_code_off_by_one_away_from_a_tie_fails(plug):
    q, x, lin = problem(torch.float16, clip=0.9)
    tr = ops.kronecker_quant_trace(x.view(-1, N1, N2), q.p1, q.p2, 0.9)
    dist = (tr.t.double() - torch.floor(tr.t.double()) - 0.5).abs()
    dist[tr.q.abs() >= 7] = -1  # keep clear of saturation
    tok, idx = divmod(int(dist.argmax()), K)
    assert float(dist[tok, idx]) > 0.45
    q.backend = plug("off-by-one", _flipping({(tok, idx): int(tr.q[tok, idx]) + 1}))
    r = check_linear(q, x, lin)
    part = r.part("codes")
    assert not r.passed and r.failed_part == "codes" and part.mismatches == 1
    assert (part.token, part.index) == (tok, idx) and part.backend_value == part.reference_value + 1
    assert "away from a rounding tie" in part.reason and f"first at token {tok}, code {idx}" in part.reason


def test_a_flip_near_a_tie_needs_the_window(plug):
    q, x, _ = problem(torch.float16, clip=0.9)
    tr = ops.kronecker_quant_trace(x.view(-1, N1, N2), q.p1, q.p2, 0.9)
    t = tr.t.double()
    dist = (t - torch.floor(t) - 0.5).abs()
    dist[(dist == 0) | (tr.q.abs() >= 7)] = math.inf  # near a tie, not on one; clear of saturation
    tok, idx = divmod(int(dist.argmin()), K)
    assert 0 < float(dist[tok, idx]) <= float(ulp(t[tok, idx] , torch.float16))  # one fp16 step from the tie
    other = int(2 * torch.floor(t[tok, idx]) + 1 - tr.q[tok, idx])
    q.backend = plug("near-tie", _flipping({(tok, idx): other}))
    r = check_linear(q, x)
    assert r.passed and r.tie_codes == 1
    narrow = check_linear(q, x, tie_ulps=0.0)  # only exact ties: this flip is then an error
    assert not narrow.passed and "away from a rounding tie" in narrow.reason
    strict = check_linear(q, x, tie_share=0.0)  # no flips allowed at all
    assert not strict.passed and "at most 0 allowed" in strict.reason


def test_fp32_input_is_rounded_first():
    q, x, lin = problem(torch.float16)
    r = check_linear(q, x.float() * 1.001, lin)
    assert r.passed and r.max_err_ulps <= 0.5001


def test_npu_double_passes_and_every_op_goes_through_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", make_fake_torch_npu())
    q, x, lin = problem(torch.bfloat16)
    q.backend = "npu"
    r = check_linear(q, x, lin)
    assert r.backend == "npu" and r.passed, r.reason
    calls = sys.modules["torch_npu"].ops()
    # kronecker_quant: at the layer's ratio and the probe ratio, and the forward; the packer: the
    # layer's weight and the all-values probe; quant_matmul: two unit-scale products, the epilogue, the forward
    assert calls.count("npu_kronecker_quant") == 3
    assert calls.count("npu_convert_weight_to_int4pack") == 2
    assert calls.count("npu_quant_matmul") == 4
# ------------------------------------------------------------------ the float comparison
def test_transforms_beat_identity_on_outlier_channels():
    # x10 outliers: large enough that a per-token int4 step on raw x wipes out the other channels
    # (identity ~8 dB), small enough that they do not dominate the output (Hadamard ~15 dB)
    lin, x = random_problem(K, O, 128, outlier_channels=4, outlier_scale=10.0, seed=1)
    x = x.bfloat16()
    sqnr = {}
    for kind in ("identity", "hadamard", "random"):
        left, right = factors(kind)
        q = W4A4FlatQuantLinear.from_float(lin, left, right, act_dtype=torch.bfloat16, backend="reference")
        sqnr[kind] = check_linear(q, x, lin).sqnr_db
    assert sqnr["hadamard"] > sqnr["identity"] + 4, sqnr
    assert sqnr["random"] > sqnr["identity"] + 4, sqnr


def test_float_metrics_are_consistent():
    q, x, lin = problem(torch.bfloat16, bias=True)
    r = check_linear(q, x, lin)
    assert r.sqnr_db == pytest.approx(-20 * math.log10(r.rel_err), rel=1e-14)  # measured equal
    assert 0.9 < r.cosine < 1.0  # measured 0.988
    assert 0 < r.max_abs_err
    with torch.no_grad():
        err = (q(x).double() - (x.double() @ lin.weight.double().T + lin.bias.double())).norm(dim=1)
    assert r.worst_token == int(err.argmax())
    assert r.worst_token_err == pytest.approx(float(err.max()), rel=1e-14)  # measured equal


def test_transform_reconstruction_at_full_precision():
    q, x, lin = problem(torch.bfloat16, kind="random")
    r = check_linear(q, x, lin)
    assert r.transform_rel_err < 7e-15 and r.transform_max_abs_err < 1e-13  # measured 7.2e-16 and 1.1e-14
    # a non-orthogonal transform: the fold inverts it, still to float64 accuracy
    left = torch.eye(N1, dtype=torch.float64) + 0.2 * torch.randn(N1, N1, dtype=torch.float64) / N1
    q2 = W4A4FlatQuantLinear.from_float(lin, left, orthogonal_factor(N2), act_dtype=torch.bfloat16,
                                        backend="reference")
    assert check_linear(q2, x, lin).transform_rel_err < 6e-15  # measured 5.7e-16


def test_without_float_layer_those_parts_are_none():
    q, x, _ = problem(torch.bfloat16)
    r = check_linear(q, x)
    assert r.passed
    assert r.sqnr_db is None and r.cosine is None and r.worst_token is None and r.transform_rel_err is None
    assert "n/a" in r.table()


def test_report_table_and_dict():
    q, x, lin = problem(torch.float16, bias=True)
    r = check_linear(q, x, lin)
    text = r.table()
    assert str(r) == text
    for label in ("verdict", "PASSED", "SQNR (dB)", "cosine similarity", "worst token", "relative reconstruction error",
                  "codes differing at a tie", *numerics.PARTS):
        assert label in text
    d = r.to_dict()
    json.dumps(d)  # JSON-ready
    assert d["passed"] is True and d["in_features"] == K and d["has_bias"] is True
    assert [p["part"] for p in d["parts"]] == list(numerics.PARTS)


def test_zero_tokens_in_the_check():
    q, x, lin = problem(torch.bfloat16)
    x[::3] = 0
    r = check_linear(q, x, lin)
    assert r.passed and math.isfinite(r.sqnr_db)


def test_ulp():
    assert ulp(torch.tensor([1.0, 1.5, 0.0, 65504.0, 2.0**-20]), torch.float16).tolist() == \
        [2.0**-10, 2.0**-10, 2.0**-24, 32.0, 2.0**-24]
    assert ulp(torch.tensor([1.0, -3.0, 0.0]), torch.bfloat16).tolist() == [2.0**-7, 2.0**-6, 2.0**-133]


def test_check_linear_bad_inputs():
    q, x, lin = problem(torch.bfloat16)
    with pytest.raises(ValueError, match="qlinear: expected a W4A4FlatQuantLinear"):
        check_linear(lin, x)
    with pytest.raises(ValueError, match="x: expected last dim 256"):
        check_linear(q, x[:, :128])
    with pytest.raises(ValueError, match="x: expected at least one token"):
        check_linear(q, x[:0])
    with pytest.raises(ValueError, match="x: expected a float tensor"):
        check_linear(q, x.int())
    with pytest.raises(ValueError, match=r"float_linear: expected weight shape \[64, 256\]"):
        check_linear(q, x, nn.Linear(K, O + 1))
    with pytest.raises(ValueError, match="tie_ulps: expected a finite float >= 0"):
        check_linear(q, x, tie_ulps=-1)
    with pytest.raises(ValueError, match=r"tie_share: expected a float in \[0, 1\]"):
        check_linear(q, x, tie_share=1.5)


# ------------------------------------------------------------------ sweep
def test_sweep_clip_ratio_returns_the_best_ratio():
    lin, x = random_problem(K, O, T, outlier_channels=4, outlier_scale=20.0, seed=2)
    left, right = factors("hadamard")
    ratios = [1.0, 0.9, 0.8, 0.7]
    res = sweep_clip_ratio(lin, left, right, x.bfloat16(), ratios, act_dtype=torch.bfloat16, backend="reference")
    assert [row.ratio for row in res.rows] == ratios
    best = max(res.rows, key=lambda row: row.sqnr_db)
    assert res.best_ratio == best.ratio
    for row in res.rows:
        assert row.sqnr_db == pytest.approx(-20 * math.log10(row.rel_err), rel=2e-15)  # measured <= 2.2e-16
    # each row is what a layer built with that ratio reports
    q = W4A4FlatQuantLinear.from_float(lin, left, right, clip_ratio=0.8, act_dtype=torch.bfloat16, backend="reference")
    assert res.rows[2].sqnr_db == check_linear(q, x.bfloat16(), lin).sqnr_db
    assert "<- best" in res.table() and json.dumps(res.to_dict())
    assert res.to_dict()["best_ratio"] == res.best_ratio


def test_sweep_bad_inputs():
    lin, x = random_problem(K, O, 4, seed=0)
    left, right = factors("hadamard")
    with pytest.raises(ValueError, match="ratios: clip_ratio: expected a finite float in"):
        sweep_clip_ratio(lin, left, right, x, [1.0, 1.2])
    with pytest.raises(ValueError, match="ratios: expected at least one"):
        sweep_clip_ratio(lin, left, right, x, [])
    with pytest.raises(ValueError, match="float_linear: expected an nn.Linear"):
        sweep_clip_ratio(None, left, right, x, [1.0])
    with pytest.raises(ValueError, match="x: expected a non-empty tensor"):
        sweep_clip_ratio(lin, left, right, x[:, :8], [1.0])


def test_sweep_layer_against_float_is_sweep_clip_ratio():
    q, x, lin = problem(torch.bfloat16, clip=0.7)
    ratios = [1.0, 0.85, 0.7]
    left, right = factors("hadamard")
    ours = sweep_layer_clip_ratio(q, x, ratios, reference=lin)
    built = sweep_clip_ratio(lin, left, right, x, ratios, act_dtype=torch.bfloat16, backend="reference")
    assert ours.rows == built.rows and ours.reference == built.reference == "float layer"
    assert float(q.clip_ratio) == float(torch.tensor(0.7, dtype=torch.float32))  # the layer keeps its own ratio


def test_sweep_layer_default_reference_is_the_layer_without_activation_quantization():
    q, x, lin = problem(torch.bfloat16, bias=True)
    # Weights that are no longer RTN of lin (as after GPTQ): the default reference follows the layer.
    g = torch.Generator().manual_seed(5)
    w = q.weight_int
    flip = torch.rand(w.shape, generator=g) < 0.2
    q.weight_packed.copy_(pack_int4(torch.where(flip, (w + 1).clamp(-8, 7), w)))
    ratios = [1.0, 0.8]
    res = sweep_layer_clip_ratio(q, x, ratios)
    assert res.reference == "layer with unquantized activations" and "against the layer" in res.table()
    # the same reference written out independently: x (in bf16) @ kron(L, R) @ (q_w * s_w)^T + bias
    t = torch.kron(q.left_trans.double(), q.right_trans.double())
    w_hat = unpack_int4(q.weight_packed).double() * q.weight_scale.double().view(-1, 1)
    y_ref = x.double() @ t @ w_hat.T + q.bias.double()
    given = sweep_layer_clip_ratio(q, x, ratios, reference=y_ref.float())
    for a, b in zip(res.rows, given.rows):
        assert a.sqnr_db == pytest.approx(b.sqnr_db, abs=2e-7)  # measured 6.8e-9, 1.6e-8 (the float32 reference)
    # with the weight error taken out of the reference, the activation error alone is smaller
    vs_float = sweep_layer_clip_ratio(q, x, ratios, reference=lin)
    for a, b in zip(res.rows, vs_float.rows):
        assert a.sqnr_db > b.sqnr_db + 3
    y = q(x).double()
    c1 = -20 * math.log10(float((y - y_ref).norm() / y_ref.norm()))
    assert res.rows[0].sqnr_db == pytest.approx(c1, abs=1e-12)  # measured equal; float64 rounding of a log


def test_sweep_layer_reference_uses_the_transforms_the_layer_runs():
    # float32 transforms (another exporter's checkpoint): the layer runs them rounded to bf16
    q, x, _ = problem(torch.bfloat16)
    t = q.checkpoint_tensors()
    g = torch.Generator().manual_seed(3)
    t["left_trans"] = t["left_trans"].float() + 1e-3 * torch.randn(N1, N1, generator=g)
    t["right_trans"] = t["right_trans"].float()
    q32 = W4A4FlatQuantLinear.from_checkpoint(t, backend="reference", act_dtype=torch.bfloat16)
    tr = torch.kron(t["left_trans"].bfloat16().double(), t["right_trans"].bfloat16().double())
    y_ref = x.double() @ tr @ q32.dequantized_weight(torch.float64).T
    res = sweep_layer_clip_ratio(q32, x, [1.0])
    given = sweep_layer_clip_ratio(q32, x, [1.0], reference=y_ref)
    assert res.rows[0].sqnr_db == pytest.approx(given.rows[0].sqnr_db, abs=1e-12)  # measured equal


def test_sweep_layer_on_the_npu_backend(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", make_fake_torch_npu())
    q, x, lin = problem(torch.bfloat16)
    expected = sweep_layer_clip_ratio(q, x, [1.0, 0.9], reference=lin)
    q.backend = "npu"
    res = sweep_layer_clip_ratio(q, x, [1.0, 0.9], reference=lin)
    assert sys.modules["torch_npu"].ops().count("npu_kronecker_quant") == 2
    assert res.rows == expected.rows


def test_sweep_layer_bad_inputs():
    q, x, lin = problem(torch.bfloat16)
    with pytest.raises(ValueError, match="qlinear: expected a W4A4FlatQuantLinear"):
        sweep_layer_clip_ratio(lin, x)
    with pytest.raises(ValueError, match=r"reference: expected an output of shape \[96, 64\]"):
        sweep_layer_clip_ratio(q, x, [1.0], reference=torch.zeros(95, O))
    with pytest.raises(ValueError, match="reference: expected None, an nn.Linear or a tensor"):
        sweep_layer_clip_ratio(q, x, [1.0], reference="float")
    with pytest.raises(ValueError, match="reference: expected weight shape"):
        sweep_layer_clip_ratio(q, x, [1.0], reference=nn.Linear(K, O + 1))
    with pytest.raises(ValueError, match="reference: expected an nn.Linear"):
        sweep_layer_clip_ratio(q, x, [1.0], reference=nn.Conv1d(K, O, 1))
    with pytest.raises(ValueError, match="ratios: clip_ratio"):
        sweep_layer_clip_ratio(q, x, [0.0])
    assert float(q.clip_ratio) == 1.0


# ------------------------------------------------------------------ CLI
def test_cli_check_prints_the_report(capsys, tmp_path):
    out = tmp_path / "report.json"
    rc = cli.main(["check", "--in-features", "256", "--out-features", "32", "--tokens", "24", "--sweep",
                   "--ratios", "1.0", "0.8", "--json", str(out), "--backend", "reference"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "flatquant-lab check: random layer, 24 tokens, 8 outlier channel(s) x 20" in text
    assert "32 x 256, kron 16 x 16, bfloat16" in text
    assert "verdict" in text and "SQNR (dB)" in text and "clip-ratio sweep" in text
    assert "flatquant-lab check: passed (backend reference)" in text
    data = json.loads(out.read_text())
    assert data["report"]["passed"] is True and data["report"]["tokens"] == 24
    assert [row["ratio"] for row in data["sweep"]["rows"]] == [1.0, 0.8]
    assert data["config"]["in_features"] == 256


def test_cli_check_options(capsys):
    rc = cli.main(["check", "--in-features", "192", "--out-features", "8", "--tokens", "5", "--dtype", "fp16",
                   "--transform", "identity", "--outlier-channels", "0", "--bias", "--clip-ratio", "0.75",
                   "--seed", "4"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "8 x 192, kron 12 x 16, float16, clip_ratio 0.75, bias yes" in text


@pytest.mark.parametrize("argv, msg", [
    (["--in-features", "100"], "--in-features: expected a multiple of 8"),
    (["--clip-ratio", "1.5"], "--clip-ratio: clip_ratio: expected a finite float in (0, 1]"),
    (["--in-features", "96"], "--in-features: 96 factors as 8 x 12 (vllm-ascend's pair), which"),
])
def test_cli_check_bad_options(argv, msg):
    with pytest.raises(SystemExit, match=msg.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        cli.main(["check", "--out-features", "8", "--tokens", "2", *argv])


def test_cli_rejects_bad_sizes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["check", "--tokens", "0"])
    assert "argument --tokens: expected an int >= 1, got '0'" in capsys.readouterr().err


def test_random_problem_plants_outliers():
    lin, x = random_problem(64, 8, 200, outlier_channels=3, outlier_scale=50.0, seed=0)
    rms = x.pow(2).mean(0).sqrt()
    assert int((rms > 10).sum()) == 3 and lin.bias is None
    with pytest.raises(ValueError, match="outlier_channels: expected at most in_features"):
        random_problem(8, 8, 2, outlier_channels=9)
    with pytest.raises(ValueError, match="outlier_scale: expected a finite float > 0"):
        random_problem(8, 8, 2, outlier_scale=float("nan"))
    assert 0 < numerics.DEFAULT_TIE_SHARE < 1


def test_non_contiguous_input():
    q, x, lin = problem(torch.bfloat16)
    xt = x.t().contiguous().t()
    assert not xt.is_contiguous()
    r = check_linear(q, xt, lin)
    assert r.passed and r.sqnr_db == check_linear(q, x, lin).sqnr_db


def test_cli_ratios_need_sweep(capsys):
    """--ratios without --sweep used to be ignored silently."""
    with pytest.raises(SystemExit, match="--ratios: only used by the clip-ratio sweep; add --sweep"):
        cli.main(["check", "--in-features", "64", "--out-features", "8", "--tokens", "2", "--ratios", "0.9"])
    assert "flatquant-lab check" not in capsys.readouterr().out  # rejected before any work


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.2", "nan"])
def test_cli_ratios_are_checked_before_any_work(ratio, capsys):
    with pytest.raises(SystemExit, match=r"--ratios: clip_ratio: expected a finite float in \(0, 1\]"):
        cli.main(["check", "--in-features", "64", "--out-features", "8", "--tokens", "2", "--sweep",
                  "--ratios", "1.0", ratio])
    assert "flatquant-lab check" not in capsys.readouterr().out


def test_cli_json_is_written_atomically(tmp_path, monkeypatch, capsys):
    """The report goes to a temp file beside the target and is renamed onto it: a failed write leaves the
    old file whole, and no temp file behind."""
    out = tmp_path / "report.json"
    out.write_text('{"old": true}\n')
    argv = ["check", "--in-features", "64", "--out-features", "8", "--tokens", "2", "--json", str(out)]

    # The text fails half-way through being written: a lone surrogate cannot be encoded as UTF-8.
    monkeypatch.setattr(cli_check.json, "dumps", lambda *args, **kwargs: '{"new": ' + chr(0xD800))
    with pytest.raises(UnicodeEncodeError):
        cli.main(argv)
    assert out.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    monkeypatch.undo()
    inode = out.stat().st_ino
    assert cli.main(argv) == 0
    assert json.loads(out.read_text())["config"]["ratios"] is None
    assert out.stat().st_ino != inode  # replaced, not rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    capsys.readouterr()


def test_report_dict_makes_non_finite_floats_json_strings():
    assert numerics.report._json_float(math.inf) == "inf" and numerics.report._json_float(-math.inf) == "-inf"
    assert numerics.report._json_float(math.nan) == "nan"
    assert numerics.report._json_float(1.5) == 1.5 and numerics.report._json_float(None) is None


# ------------------------------------------------------------------ CLI with a backend under test
def test_cli_check_fails_on_an_out_of_tree_broken_backend(tmp_path, capsys):
    """`--backend package.module:ATTR` plugs in a backend the package does not ship, as a user would."""
    spec = "broken_backends:scale_x1_5"
    out = tmp_path / "report.json"
    try:
        rc = cli.main(["check", "--in-features", "256", "--out-features", "16", "--tokens", "8",
                       "--backend", spec, "--json", str(out)])
    finally:
        ops.unregister_backend(spec)
    text = capsys.readouterr().out
    assert rc == 1
    assert f"flatquant-lab check: FAILED: backend {spec}, part scale: 8 of 8 per-token scales differ" in text
    assert "ratio 1.5" in text
    report = json.loads(out.read_text())["report"]
    assert report["passed"] is False and report["failed_part"] == "scale" and report["backend"] == spec
    assert report["reason"].startswith("8 of 8 per-token scales differ")


def test_cli_check_backend_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("FLATQUANT_BACKEND", "broken_backends:fp16_accumulation")
    try:
        rc = cli.main(["check", "--in-features", "256", "--out-features", "8", "--tokens", "4"])
    finally:
        ops.unregister_backend("broken_backends:fp16_accumulation")
    assert rc == 1 and "part product" in capsys.readouterr().out


@pytest.mark.parametrize("backend, msg", [
    ("cuda", "--backend: backend: expected one of auto, npu, reference, got 'cuda'"),
    ("no_such_module_xyz:BACKEND", "--backend: backend: cannot import module 'no_such_module_xyz'"),
    ("broken_backends:nothing_here", "--backend: backend: module 'broken_backends' has no attribute 'nothing_here'"),
    ("broken_backends:BROKEN", "--backend: backend 'broken_backends:BROKEN': expected a module or namespace"),
])
def test_cli_check_bad_backend(backend, msg, capsys):
    with pytest.raises(SystemExit, match=msg.replace("(", r"\(")):
        cli.main(["check", "--in-features", "64", "--out-features", "8", "--tokens", "2", "--backend", backend])
    assert "flatquant-lab check:" not in capsys.readouterr().out  # rejected before any work


# ------------------------------------------------------------------ the int8 path (W8A8_DYNAMIC)
def problem8(dtype=torch.bfloat16, bias=False, seed=0, tokens=T):
    lin, x = random_problem(K, O, tokens, outlier_channels=4, outlier_scale=20.0, bias=bias, seed=seed)
    q = W8A8DynamicLinear.from_float(lin, act_dtype=dtype, backend="reference")
    return q, x.to(dtype), lin


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_w8a8_reference_passes(dtype, bias):
    q, x, lin = problem8(dtype, bias, seed=3)
    r = check_linear_w8a8(q, x, lin)
    assert isinstance(r, numerics.W8A8Report) and isinstance(r, numerics.CheckReport)
    assert r.passed and r.bound_ok and r.failed_part is None and r.reason == "", r.table()
    assert [p.part for p in r.parts] == list(numerics.PARTS_W8A8) and all(p.passed and p.compared > 0 for p in r.parts)
    probe = numerics.TIE_PROBE_EXPONENTS
    assert r.tie_codes == 0 and r.tie_probe_tokens == len(probe) + 1
    # every probe code but each row's max sits on a tie: K - 1 per tie row, plus the few of the random tokens
    assert r.probe_near_tie_codes == len(probe) * (K - 1) and r.probe_tie_codes == 0
    assert r.near_tie_codes - r.probe_near_tie_codes <= 20  # the random tokens' few: measured 3 .. 16
    assert r.part("scale").compared == T + len(probe) + 1 and r.part("codes").compared == (T + len(probe) + 1) * K
    # one rounding to the output dtype: about half an ulp (measured 0.49999 .. 0.50004, the bias's fp32 rounding)
    assert 0.25 < r.max_err_ulps <= 0.5001
    assert r.weight_scale_dtype == ("bfloat16" if dtype == torch.bfloat16 else "float32")
    assert 0.999 < r.cosine < 1.0 and r.sqnr_db > 25  # measured 0.99969 .. 0.99980 and 30-34 dB
    assert "W8A8_DYNAMIC" in r.table() and "int8 path vs float layer" in r.table()
    d = json.loads(json.dumps(r.to_dict()))
    assert d["passed"] is True and d["tie_probe_tokens"] == len(probe) + 1 and "n1" not in d


@pytest.mark.parametrize("dtype, bias", [(torch.bfloat16, False), (torch.float16, True)])
@pytest.mark.parametrize("name", sorted(BROKEN_INT8))
def test_broken_int8_backend_is_caught(plug, name, dtype, bias):
    broken = BROKEN_INT8[name]
    q, x, lin = problem8(dtype, bias)
    q.backend = plug(name, broken.backend)
    r = check_linear_w8a8(q, x, lin)
    assert_caught(r, broken, name)
    assert r.part(broken.part).index is not None


@pytest.mark.parametrize("name", sorted(LEGITIMATE_INT8))
def test_legitimately_different_int8_backends_pass(plug, name):
    for dtype, bias in ((torch.bfloat16, False), (torch.float16, True)):
        q, x, lin = problem8(dtype, bias, seed=1)
        q.backend = plug(f"{name}-{str(dtype)[6:]}", LEGITIMATE_INT8[name])
        r = check_linear_w8a8(q, x, lin)
        assert r.passed, r.reason


def test_w8a8_token_tie_flips_are_allowed_within_their_bound(plug):
    # fp16, 4096 tokens: the reciprocal multiplier flips a few window codes of the layer's tokens (measured
    # 5 of 24), none of the probe's; without the token allowance that is a failure
    q, x, _ = problem8(torch.float16, seed=2, tokens=4096)
    q.backend = plug("recip", LEGITIMATE_INT8["dq-reciprocal-mult"])
    r = check_linear_w8a8(q, x)
    token_flips = r.tie_codes - r.probe_tie_codes
    assert r.passed and r.probe_tie_codes == 0 and token_flips > 0, r.reason
    assert f"{token_flips} of {r.near_tie_codes - r.probe_near_tie_codes} near a tie" in r.table()
    strict = check_linear_w8a8(q, x, token_tie_share=0.0)
    assert not strict.passed and strict.failed_part == "codes" and "at most 0 allowed" in strict.reason
    with pytest.raises(ValueError, match=r"token_tie_share: expected a float in \[0, 1\]"):
        check_linear_w8a8(q, x, token_tie_share=-0.1)


def test_w8a8_tie_probe_sits_on_exact_ties_under_every_formulation():
    for dtype in (torch.float16, torch.bfloat16):
        probe = numerics.int8._tie_probe(K, dtype)
        assert torch.equal(probe.double(), numerics.int8._tie_probe(K, torch.float64))  # exact in both half dtypes
        tr = ops.dynamic_quant_trace(probe)
        for row, j in enumerate(numerics.TIE_PROBE_EXPONENTS):
            m = torch.tensor(127 * 2.0**j, dtype=torch.float32)
            inv127 = torch.tensor(1.0) / torch.tensor(127.0)
            for mult in (127 / m, 127 * (1 / m), 1 / (m * inv127), 1 / (m / 127)):
                assert float(mult) == 2.0**-j
            t = tr.t[row].double()
            assert bool((t[1:] - torch.floor(t[1:]) == 0.5).all()) and abs(float(t[0])) == 127
        assert bool((tr.q[-1] == 0).all()) and float(tr.scale[-1]) == float(torch.tensor(1.0) / 127)


def test_w8a8_scale_tolerance_covers_max_times_inverse_127():
    # every positive finite fp16 m: 1 / fl(127 / m) and fl(m * fl(1/127)) differ by at most one fp32 ulp
    m = torch.arange(1, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    s1 = 1.0 / (torch.tensor(127.0) / m)
    s2 = m * (torch.tensor(1.0) / torch.tensor(127.0))
    d = (s1.double() - s2.double()).abs() / ulp(s1, torch.float32)
    assert float(d.max()) == 1.0 and float((d > 0).double().mean()) > 0.2  # measured 1.0 and 0.286


def test_w8a8_saturation_never_reaches_minus_128():
    # |x * mult| <= 127 (1 + 2^-24)^2 rounds to 127 at most: a row whose max is negative gives -127
    m = torch.arange(1, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16)
    x = torch.stack([-m, m, m / 2], dim=1)
    q, _ = ops.dynamic_quant(x, backend="reference")
    assert int(q.min()) == -127 and int(q.max()) == 127
    legit = LEGITIMATE_INT8["dq-saturate-127"].dynamic_quant(x)[0]
    assert torch.equal(legit, q)


def test_w8a8_swapped_scales_name_the_token_and_both_values(plug):
    q, x, _ = problem8(torch.float16)
    s_ref = ops.dynamic_quant_trace(x).scale
    q.backend = plug("swapped8", BROKEN_INT8["dq-swapped-scales"].backend)
    r = check_linear_w8a8(q, x)
    part = r.part("scale")
    assert (part.token, part.mismatches) == (2, 2)
    assert part.backend_value == float(s_ref[3]) and part.reference_value == float(s_ref[2])
    assert "first at token 2" in part.reason and "tie probe" not in part.reason


def test_w8a8_half_away_is_named_on_the_probe(plug):
    q, x, _ = problem8(torch.bfloat16)
    q.backend = plug("half-away8", BROKEN_INT8["dq-half-away"].backend)
    r = check_linear_w8a8(q, x)
    part = r.part("codes")
    # the first tie row: -126.5 rounds to -126 (even), half away from zero gives -127
    assert (part.token, part.index, part.backend_value, part.reference_value) == (0, 1, -127.0, -126.0)
    assert "in the tie probe" in part.reason and "more than the bound allows" in " ".join(r.notes)
    # on the layer's random tokens alone it would go unseen: no code of theirs sits on a tie
    tr = ops.dynamic_quant_trace(x)
    assert torch.equal(BROKEN_INT8["dq-half-away"].backend.dynamic_quant(x)[0], tr.q)


def _int8_code_edit(edits):
    def dynamic_quant(x, smooth_scales=None, dst_type=torch.int8):
        q, s = ref.dynamic_quant(x, smooth_scales=smooth_scales, dst_type=dst_type)
        if x.shape[0] == T:  # the layer's tokens, not the probe
            q = q.clone()
            for (tok, idx), v in edits.items():
                q[tok, idx] = v
        return q, s
    return types.SimpleNamespace(**{**vars(ref), "dynamic_quant": dynamic_quant})


def test_w8a8_code_off_by_one_away_from_a_tie_fails(plug):
    q, x, lin = problem8(torch.float16)
    tr = ops.dynamic_quant_trace(x)
    dist = (tr.t.double() - torch.floor(tr.t.double()) - 0.5).abs()
    dist[tr.q.abs() >= 127] = -1
    tok, idx = divmod(int(dist.argmax()), K)
    q.backend = plug("off-by-one8", _int8_code_edit({(tok, idx): int(tr.q[tok, idx]) + 1}))
    r = check_linear_w8a8(q, x, lin)
    part = r.part("codes")
    assert not r.passed and r.failed_part == "codes" and part.mismatches == 1
    assert (part.token, part.index) == (tok, idx) and part.backend_value == part.reference_value + 1
    assert "int8 codes" in part.reason and "away from a rounding tie" in part.reason


def test_w8a8_zero_token_takes_any_finite_scale_but_not_nan(plug):
    q, x, _ = problem8(torch.bfloat16)
    x[5] = 0

    def with_zero_scale(value):
        def dynamic_quant(x, smooth_scales=None, dst_type=torch.int8):
            y, s = ref.dynamic_quant(x, smooth_scales=smooth_scales, dst_type=dst_type)
            s = s.clone()
            s[(x == 0).all(dim=1)] = value
            return y, s
        return types.SimpleNamespace(**{**vars(ref), "dynamic_quant": dynamic_quant})

    q.backend = plug("zero-scale-0", with_zero_scale(0.0))
    assert check_linear_w8a8(q, x).passed
    q.backend = plug("zero-scale-nan", with_zero_scale(math.nan))
    r = check_linear_w8a8(q, x)
    assert not r.passed and r.failed_part == "scale" and r.part("scale").token == 5


def test_w8a8_npu_double_passes_and_every_op_goes_through_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", make_fake_torch_npu())
    q, x, lin = problem8(torch.bfloat16, bias=True)
    q.backend = "npu"
    r = check_linear_w8a8(q, x, lin)
    assert r.backend == "npu" and r.passed, r.reason
    calls = sys.modules["torch_npu"].ops()
    # dynamic_quant: the layer's tokens, the tie probe, the forward; quant_matmul: two unit-scale products,
    # two epilogues, the forward
    assert calls.count("npu_dynamic_quant") == 3 and calls.count("npu_quant_matmul") == 5
    assert "npu_kronecker_quant" not in calls


def test_check_linear_w8a8_bad_inputs():
    q, x, lin = problem8(torch.bfloat16)
    q4, _, _ = problem(torch.bfloat16)
    with pytest.raises(ValueError, match="qlinear: expected a W8A8DynamicLinear, got W4A4FlatQuantLinear"):
        check_linear_w8a8(q4, x)
    with pytest.raises(ValueError, match="a W8A8_DYNAMIC layer: use check_linear_w8a8"):
        check_linear(q, x)
    with pytest.raises(ValueError, match="x: expected last dim 256"):
        check_linear_w8a8(q, x[:, :128])
    with pytest.raises(ValueError, match=r"float_linear: expected weight shape \[64, 256\]"):
        check_linear_w8a8(q, x, nn.Linear(K, O + 1))
    with pytest.raises(ValueError, match=r"tie_share: expected a float in \[0, 1\]"):
        check_linear_w8a8(q, x, tie_share=2.0)
    q2 = W8A8DynamicLinear.from_checkpoint(q.checkpoint_tensors(), act_dtype=torch.bfloat16, tp_size=2)
    with pytest.raises(ValueError, match="qlinear: expected tp_size 1 .* got tp_size 2"):
        check_linear_w8a8(q2, x)


def test_cli_check_w8a8_passes_on_the_reference(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["check", "--scheme", "w8a8_dynamic", "--in-features", "200", "--out-features", "16",
                   "--tokens", "12", "--bias", "--dtype", "fp16", "--backend", "reference", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "flatquant-lab check: passed (backend reference)" in text
    assert "16 x 200, W8A8_DYNAMIC, float16, weight scale float32, bias yes" in text
    data = json.loads(out.read_text())
    assert data["config"]["scheme"] == "w8a8_dynamic" and "clip_ratio" not in data["config"]
    assert data["report"]["passed"] is True and [p["part"] for p in data["report"]["parts"]] == list(numerics.PARTS_W8A8)


def test_cli_check_w8a8_fails_on_an_out_of_tree_broken_backend(tmp_path, capsys):
    spec = "broken_backends:mm_bias_after_rounding"
    out = tmp_path / "r.json"
    try:
        rc = cli.main(["check", "--scheme", "w8a8_dynamic", "--in-features", "256", "--out-features", "16",
                       "--tokens", "8", "--backend", spec, "--json", str(out)])
    finally:
        ops.unregister_backend(spec)
    text = capsys.readouterr().out
    assert rc == 1
    assert f"flatquant-lab check: FAILED: backend {spec}, part output: int8 quant_matmul on the reference's" in text
    report = json.loads(out.read_text())["report"]
    assert report["passed"] is False and report["failed_part"] == "output" and report["backend"] == spec


@pytest.mark.parametrize("flag", [["--clip-ratio", "0.9"], ["--transform", "random"], ["--sweep"],
                                  ["--ratios", "0.9"]])
def test_cli_check_w8a8_refuses_w4a4_options(flag, capsys):
    with pytest.raises(SystemExit, match=f"{flag[0]}: only used with --scheme w4a4_flatquant"):
        cli.main(["check", "--scheme", "w8a8_dynamic", "--tokens", "2", *flag])
    assert "flatquant-lab check:" not in capsys.readouterr().out
