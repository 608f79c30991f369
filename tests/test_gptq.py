"""GPTQ weights (``flatquant_lab/gptq.py``): a diagonal Hessian gives RTN, correlated inputs are served
better than by RTN, the per-row clip search, and calibration with a GPTQ clip grid.
"""
from __future__ import annotations

import pytest
import torch

from flatquant_lab.gptq import HessianAccumulator, gptq_clip_search, gptq_quantize, output_error
from flatquant_lab.quantizers import QMAX, QMIN, quantize_weight
from tiny_models import CALIB, config, quantized_copy, state, tiny_model


def _weight(o=24, k=64, seed=0):
    return torch.randn(o, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_with_a_diagonal_hessian_is_rtn(act_order):
    w = _weight()
    q_rtn, scale = quantize_weight(w)
    for h in (torch.eye(64, dtype=torch.float64),
              torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1)):
        q = gptq_quantize(w, h, scale, block=16, act_order=act_order)
        assert q.dtype == torch.int8 and torch.equal(q, q_rtn)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_correlated_inputs(act_order):
    g = torch.Generator().manual_seed(2)
    k = 64
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) * 0.3 + torch.eye(k, dtype=torch.float64)
    x = torch.randn(512, k, generator=g, dtype=torch.float64) @ mix  # correlated channels
    x[:, :4] *= 5  # and a few large ones
    acc = HessianAccumulator(k)
    acc.add(x[:256])
    acc.add(x[256:])
    # measured bit-equal; 1e-13 is the float64 rounding of a 512-term sum taken in another order
    assert acc.tokens == 512 and torch.allclose(acc.h, x.T @ x, rtol=1e-13, atol=0)
    w = _weight(k=k)
    q_rtn, scale = quantize_weight(w)
    q = gptq_quantize(w, acc.h, scale, block=16, act_order=act_order)
    assert q.min() >= QMIN and q.max() <= QMAX

    def out_err(qv):
        return float((x @ (w - qv.double() * scale.double()).T).norm())

    assert out_err(q) < 0.8 * out_err(q_rtn), (out_err(q), out_err(q_rtn))


def _correlated_hessian(k=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, k, generator=g, dtype=torch.float64) @ (
        torch.randn(k, k, generator=g, dtype=torch.float64) * 0.3 + torch.eye(k, dtype=torch.float64))
    return x, x.T @ x


def test_output_error_is_the_rows_squared_output_error():
    x, h = _correlated_hessian()
    w = _weight()
    q, scale = quantize_weight(w, torch.full((24,), 0.9))
    want = (x @ (w - q.double() * scale.double()).T).square().sum(0)
    assert torch.allclose(output_error(w, q, scale, h), want, rtol=1e-10)


def test_gptq_clip_search_keeps_each_rows_best_candidate():
    x, h = _correlated_hessian()
    w = _weight()
    w[3] *= 0.0  # an all-zero row: scale 0 under every candidate
    learned = torch.linspace(0.7, 1.0, 24, dtype=torch.float64)
    cands = [learned, 1.0, 0.85, 0.75]
    q, scale = gptq_clip_search(w, h, cands, block=16)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (24, 1)
    per = []
    for c in cands:  # each candidate alone: plain GPTQ with that clip's scale
        _, s_c = quantize_weight(w, c if torch.is_tensor(c) else torch.full((24,), c))
        per.append(output_error(w, gptq_quantize(w, h, s_c, block=16), s_c, h))
    best = torch.stack(per).min(0).values
    got = output_error(w, q, scale, h)
    assert torch.equal(got, best), (got, best)
    # it picks different candidates for different rows here, and beats the learned clip alone in total
    assert got.sum() < 0.97 * per[0].sum()
    assert len({round(float(s / w[i].abs().max() * QMAX), 6) for i, s in enumerate(scale[:, 0]) if i != 3}) > 1
    assert torch.equal(q[3], torch.zeros_like(q[3])) and scale[3, 0] == 0
    with pytest.raises(ValueError, match="^clips"):
        gptq_clip_search(w, h, [])


def test_calibration_with_a_gptq_clip_grid_serves_the_picked_scales():
    # train_inputs="float": both runs learn the same tensors, so only GPTQ's scales and codes may differ
    fm = tiny_model("llama")
    base = quantized_copy(fm, config(epochs=1, train_inputs="float", weight_quantizer="gptq"))
    grid = quantized_copy(fm, config(epochs=1, train_inputs="float", weight_quantizer="gptq",
                                     gptq_clip_grid=(1.0, 0.7)))
    a, b = state(base), state(grid)
    scales = [k for k in a if k.endswith("weight_scale") and "layers" in k]
    assert scales and any(not torch.equal(a[k], b[k]) for k in scales)
    for k in a:
        if k.endswith(("left_trans", "right_trans", "clip_ratio")):
            assert torch.equal(a[k], b[k]), k
    ids = CALIB[:2]
    assert torch.isfinite(grid(ids).logits).all()


def test_gptq_refuses_mismatched_shapes():
    w = _weight()
    _, scale = quantize_weight(w)
    with pytest.raises(ValueError, match="^hessian"):
        gptq_quantize(w, torch.eye(63, dtype=torch.float64), scale)
    with pytest.raises(ValueError, match="^scale"):
        gptq_quantize(w, torch.eye(64, dtype=torch.float64), scale[:-1])
