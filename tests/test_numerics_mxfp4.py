"""The W4A4_MXFP4_FLATQUANT numerics check (flatquant_lab/numerics/mxfp4.py): the reference and legitimately
different backends pass; broken ones are caught by the part that must catch them; a layer whose ranks hold the
wrong diagonal block (or whose left_trans is not block-diagonal) fails ``ranks``."""
from __future__ import annotations

import sys

import pytest
import torch

from flatquant_lab import ops
from flatquant_lab.layers import W4A4MXFP4FlatQuantLinear
from flatquant_lab.layers.w4a4_mxfp4_flatquant import mx_factors
from flatquant_lab.numerics import LAYER_CHECKS, PARTS_MXFP4, check_layer, check_linear, check_linear_mxfp4
from flatquant_lab.numerics import random_problem
from flatquant_lab.transforms import orthogonal_factor
from broken_backends_mxfp4 import BROKEN_MXFP4, LEGITIMATE_MXFP4
from fake_torch_npu import make_fake_torch_npu

K, O, T = 128, 16, 24


def _layer(tp=1, dtype=torch.bfloat16, bias=True, seed=0, backend="reference"):
    lin, x = random_problem(K, O, T, bias=bias, seed=seed)
    n1, n2 = mx_factors(K, True, 4)
    left = torch.block_diag(*[orthogonal_factor(n1 // 4, "random", seed=seed + i) for i in range(4)])
    right = orthogonal_factor(n2, "random", seed=seed + 9)
    layer = W4A4MXFP4FlatQuantLinear.from_float(lin, left, right, clip_ratio=0.9, act_dtype=dtype, backend=backend,
                                                tp_size=tp)
    return layer, lin, x


@pytest.fixture
def plug():
    names = []

    def _plug(name, backend):
        ops.register_backend(name, backend, replace=True)
        if name not in names:
            names.append(name)
        return name

    yield _plug
    for n in names:
        ops.unregister_backend(n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_reference_passes(dtype, tp):
    layer, lin, x = _layer(tp=tp, dtype=dtype)
    report = check_linear_mxfp4(layer, x, lin)
    assert report.passed, report.table()
    assert [p.part for p in report.parts] == list(PARTS_MXFP4)
    assert report.sqnr_db is not None and report.sqnr_db > 5
    assert check_layer(layer, x).passed and LAYER_CHECKS["W4A4_MXFP4_FLATQUANT"] is check_linear_mxfp4
    assert "W4A4_MXFP4_FLATQUANT" in report.table()


@pytest.mark.parametrize("name", sorted(BROKEN_MXFP4))
@pytest.mark.parametrize("tp", [1, 2])
def test_broken_backend_is_caught(plug, name, tp):
    layer, lin, x = _layer(tp=tp)
    layer.backend = plug(f"mx-broken-{name.replace('_', '-')}", BROKEN_MXFP4[name].backend)
    report = check_linear_mxfp4(layer, x, lin)
    assert not report.passed
    assert report.failed_part == BROKEN_MXFP4[name].part, report.table()
    assert report.reason


@pytest.mark.parametrize("name", sorted(LEGITIMATE_MXFP4))
def test_legitimately_different_backends_pass(plug, name):
    for seed in range(3):
        layer, lin, x = _layer(tp=2, seed=seed)
        layer.backend = plug(f"mx-ok-{name.replace('_', '-')}", LEGITIMATE_MXFP4[name])
        report = check_linear_mxfp4(layer, x, lin)
        assert report.passed, report.table()


def test_a_rank_holding_the_wrong_block_fails_ranks():
    layer, lin, x = _layer(tp=2)
    layer.p1_ranks = layer.p1_ranks.flip(0).contiguous()  # rank 0 gets block 1 and vice versa
    report = check_linear_mxfp4(layer, x, lin)
    assert report.failed_part == "ranks" and "its own diagonal block" in report.reason


def test_a_left_trans_that_is_not_block_diagonal_fails_ranks():
    lin, x = random_problem(K, O, T, seed=1)
    n1, n2 = mx_factors(K, True, 4)
    layer = W4A4MXFP4FlatQuantLinear.from_float(lin, orthogonal_factor(n1, "random", seed=2),
                                                orthogonal_factor(n2, "random", seed=3), act_dtype=torch.bfloat16,
                                                tp_size=2)
    assert check_linear_mxfp4(layer, x).failed_part == "ranks"
    whole = W4A4MXFP4FlatQuantLinear.from_float(lin, orthogonal_factor(n1, "random", seed=2),
                                                orthogonal_factor(n2, "random", seed=3), act_dtype=torch.bfloat16)
    assert check_linear_mxfp4(whole, x).passed  # one rank uses the whole transform


def test_the_npu_double_passes(monkeypatch):
    fake = make_fake_torch_npu()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    layer, lin, x = _layer(tp=2, backend="npu")
    report = check_linear_mxfp4(layer, x, lin)
    assert report.passed, report.table()
    assert report.backend == "npu" and {"npu_kronecker_quant", "npu_quant_matmul"} <= set(fake.ops())


def test_the_wrong_check_names_the_right_one():
    layer, _, x = _layer()
    with pytest.raises(ValueError, match=r"a W4A4_MXFP4_FLATQUANT layer: use check_linear_mxfp4"):
        check_linear(layer, x)
    report = check_linear_mxfp4(layer, x)
    assert report.to_dict()["passed"] and report.sqnr_db is None
