"""The training loop's options (issue 13): the SVD parametrisation of the factors, the normalised loss,
weight decay, the batch order. Each option is wired, deterministic and resumable, and the SVD
parametrisation trains the very function the plain one (and so the int4 path) computes.

Tiny random models of ``tiny_models`` (hidden 64, 2 layers), 8 x 32 random calibration tokens.
"""
from __future__ import annotations

import copy

import pytest
import torch

from flatquant_lab.api import quantize
from flatquant_lab.calibrate import KronTransform, plan_layer
from flatquant_lab.calibrate.modules import SVDFactor, cayley
from flatquant_lab.recipe import QuantConfig
from tiny_models import CALIB, Interrupt, config, state, stop_after_layer_0, tiny_model

OFFICIAL_LOOP = dict(factor_param="svd", loss_norm=True, weight_decay=0.01, batch_order="fixed")
BEFORE = dict(factor_param="plain", loss_norm=False, weight_decay=0.0, batch_order="shuffle",
              train_inputs="float", layer_loss="mse")  # the loop before


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def eye_err(m: torch.Tensor) -> float:
    return float((m - torch.eye(m.shape[0], dtype=m.dtype)).abs().max())


# ============================================================================ SVD parametrisation
def test_cayley_is_orthogonal_and_the_identity_at_zero():
    assert torch.equal(cayley(torch.zeros(6, 6)), torch.eye(6))
    p = torch.randn(6, 6, generator=gen(0), dtype=torch.float64) * 3  # far from the identity
    q = cayley(p)
    assert eye_err(q @ q.T) < 1e-12 and eye_err(q) > 0.5
    # only the strictly lower triangle matters (the map is onto the rotations reachable from I)
    assert torch.equal(q, cayley(torch.tril(p, -1)))


def test_svd_factor_starts_at_its_start_and_inverts_exactly():
    start = torch.randn(8, 8, generator=gen(1), dtype=torch.float64) + 3 * torch.eye(8, dtype=torch.float64)
    f = SVDFactor(start)
    with torch.no_grad():
        u, s, v = f.parts()
    assert float((u @ torch.diag(s) @ v.T - start).abs().max()) < 1e-5 * float(start.abs().max())
    with torch.no_grad():  # anywhere the optimiser may take it
        for p in (f.p_u, f.p_v, f.log_s):
            p.add_(torch.randn(p.shape, generator=gen(2)))
        u, s, v = f.parts()
    assert eye_err(u @ u.T) < 1e-5 and eye_err(v @ v.T) < 1e-5
    m = u @ torch.diag(s) @ v.T
    inv_t = u @ torch.diag(1 / s) @ v.T  # no matrix inverse taken
    assert eye_err(m.T @ inv_t) < 1e-4 * float(s.max() / s.min())


def test_svd_factor_refuses_a_singular_start():
    with pytest.raises(ValueError, match="^start: expected an invertible factor"):
        SVDFactor(torch.diag(torch.tensor([1.0, 0.0, 2.0])))


def _attn_group():
    model = tiny_model("llama")
    g = next(g for g in plan_layer(model, 0, config()) if g.name == "attn")
    w = model.model.layers[0].self_attn.q_proj.weight.detach().float()
    return g, w


def _perturbed_svd_transform(g, act_dtype):
    left = torch.linalg.qr(torch.randn(g.n1, g.n1, generator=gen(3)))[0]
    right = torch.linalg.qr(torch.randn(g.n2, g.n2, generator=gen(4)))[0]
    log_d = 0.3 * torch.randn(g.size, generator=gen(5))
    tr = KronTransform(g, left, right, log_d, torch.tensor([2.0]), act_dtype, param="svd")
    with torch.no_grad():  # somewhere training could have taken it: rotated, stretched
        for p in tr.factor_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen(6)))
    return tr, log_d


@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16])
def test_svd_forward_is_the_plain_forward_of_its_matrices(act_dtype):
    """The SVD-parametrised transform computes bit for bit what the plain one built from its matrices
    computes (the activation side and the folded weight), so what it trains is what ``finalize`` exports."""
    g, w = _attn_group()
    tr, log_d = _perturbed_svd_transform(g, act_dtype)
    left, right = tr.matrices()
    assert eye_err(left @ left.T) > 1e-2  # no longer orthogonal: the check covers the inverse
    plain = KronTransform(g, left, right, log_d, torch.tensor([2.0]), act_dtype)
    x = torch.randn(3, 5, g.size, generator=gen(7))
    with torch.no_grad():
        assert torch.equal(tr.transformed(x), plain.transformed(x))
        assert torch.equal(tr.fold(w), plain.fold(w))
    with torch.enable_grad():  # also the training forward
        assert torch.equal(tr.fold(w), plain.fold(w))


def test_svd_gradients_are_the_chain_rule_of_the_plain_ones():
    """With no rounding (float32 act dtype) the SVD transform's gradients equal the plain transform's
    gradient wrt ``L`` pulled back through ``L = U0 C(P_u) diag(exp(log_s)) (V0 C(P_v))^T``: the exact
    inverse ``U diag(1/s) V^T`` carries the weight side's gradient."""
    g, w = _attn_group()
    tr, log_d = _perturbed_svd_transform(g, torch.float32)
    left, right = tr.matrices()
    plain = KronTransform(g, left, right, log_d, torch.tensor([2.0]), torch.float32)
    x = torch.randn(4, g.size, generator=gen(8))
    cw = torch.randn(w.shape, generator=gen(9))
    cx = torch.randn(4, g.size, generator=gen(10))

    def loss(t):
        return (t.fold(w) * cw).sum() + (t.transformed(x) * cx).sum()

    loss(plain).backward()
    loss(tr).backward()
    f = tr.left_svd
    for name in ("p_u", "log_s", "p_v"):
        params = {"p_u": f.p_u, "log_s": f.log_s, "p_v": f.p_v}
        leaf = params[name].detach().clone().requires_grad_(True)
        params[name] = leaf
        mat = f.u0 @ cayley(params["p_u"]) @ torch.diag(params["log_s"].exp()) @ (f.v0 @ cayley(params["p_v"])).T
        (want,) = torch.autograd.grad((mat * plain.left.grad).sum(), leaf)
        got = getattr(f, name).grad
        assert float((got - want).norm() / want.norm()) < 1e-3, name
    # the smoothing gets the same gradient either way
    assert float((tr.log_smooth.grad - plain.log_smooth.grad).norm() / plain.log_smooth.grad.norm()) < 1e-3


# ============================================================================ the loop's options
@pytest.mark.parametrize("option", [dict(factor_param="svd"), dict(loss_norm=True), dict(weight_decay=0.05),
                                    dict(batch_order="fixed"), dict(train_inputs="quantized"),
                                    dict(layer_loss="relative")],
                         ids=lambda d: next(iter(d)))
def test_each_option_changes_the_training_and_is_deterministic(option):
    fm = tiny_model("qwen2")
    base = state(quantize(copy.deepcopy(fm), config(transform_init="random", **BEFORE), CALIB))
    a = quantize(copy.deepcopy(fm), config(transform_init="random", **{**BEFORE, **option}), CALIB)
    b = quantize(copy.deepcopy(fm), config(transform_init="random", **{**BEFORE, **option}), CALIB)
    assert same_state(state(a), state(b))
    assert not same_state(state(a), base)
    for e in a.flatquant_report["layers"]:  # the logged losses are the layer loss, also under loss_norm
        assert len(e["epoch_losses"]) == 2 and all(0 < v != 1.0 for v in e["epoch_losses"])


def test_relative_layer_loss_counts_every_token_alike():
    """``relative``: a token 1000x larger with the same relative error weighs as much as the others (under
    ``mse`` it is all the loss); identical outputs give 0 under both."""
    from flatquant_lab.calibrate.train import layer_loss

    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 8, 16, generator=g)
    y[:, 0] *= 1000.0  # an attention-sink token
    out = y * (1 + 0.01 * torch.randn(2, 8, 16, generator=g))
    per_token = ((out - y).square().mean(-1) / y.square().mean(-1))
    assert torch.allclose(layer_loss(out, y, "relative"), per_token.mean(), rtol=1e-6)
    assert float(layer_loss(y, y, "relative")) == 0.0 == float(layer_loss(y, y, "mse"))
    sink_share = (out - y)[:, 0].square().sum() / (out - y).square().sum()
    assert float(sink_share) > 0.99  # what mse optimises: nearly the sink token alone
    assert float(per_token[:, 0].sum() / per_token.sum()) < 0.5


def _shuffled_orders(seed: int) -> list[list[int]]:
    """The batch orders train_layer draws for layer 0 with 2 batches x 2 epochs under ``seed``."""
    g = torch.Generator().manual_seed(seed * 1_000_003)
    return [torch.randperm(2, generator=g).tolist() for _ in range(2)]


def test_fixed_batch_order_ignores_the_seed():
    """With the Hadamard start the seed only orders the batches: a fixed order makes seeds agree,
    where the shuffled order (a seed drawing another order) does not."""
    other = next(s for s in range(1, 50) if _shuffled_orders(s) != _shuffled_orders(0))
    fm = tiny_model("llama")
    run = {(order, seed): state(quantize(copy.deepcopy(fm), config(batch_order=order, seed=seed), CALIB))
           for order in ("fixed", "shuffle") for seed in (0, other)}
    assert same_state(run["fixed", 0], run["fixed", other])
    assert not same_state(run["shuffle", 0], run["shuffle", other])


def test_official_loop_resumes_to_the_same_model(tmp_path):
    fm = tiny_model("qwen3")
    work = str(tmp_path / "work")
    full = state(quantize(copy.deepcopy(fm), config(**OFFICIAL_LOOP), CALIB))
    with pytest.raises(Interrupt):
        quantize(copy.deepcopy(fm), config(work_dir=work, **OFFICIAL_LOOP), CALIB, after_layer=stop_after_layer_0)
    resumed = quantize(copy.deepcopy(fm), config(work_dir=work, **OFFICIAL_LOOP), CALIB)
    assert [e["resumed"] for e in resumed.flatquant_report["layers"]] == [True, False]
    assert same_state(state(resumed), full)
    # another loop is another configuration: its work dir is refused
    with pytest.raises(ValueError, match="^work_dir"):
        quantize(copy.deepcopy(fm), config(work_dir=work, **{**OFFICIAL_LOOP, "weight_decay": 0.0}), CALIB)


def _layer1_io(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder layer 1's input and output on CALIB, run in the calibration's batches of 4."""
    xs, ys = [], []
    layer = model.model.layers[1]
    h_in = layer.register_forward_pre_hook(lambda _m, a, k: xs.append((a[0] if a else k["hidden_states"]).clone()),
                                           with_kwargs=True)
    h_out = layer.register_forward_hook(lambda _m, a, k, o: ys.append((o[0] if isinstance(o, tuple) else o).clone()),
                                        with_kwargs=True)
    try:
        with torch.no_grad():
            for s in range(0, CALIB.shape[0], 4):
                model(input_ids=CALIB[s:s + 4], use_cache=False)
    finally:
        h_in.remove()
        h_out.remove()
    return torch.cat(xs), torch.cat(ys)


def test_quantized_inputs_are_the_quantized_model_so_far(monkeypatch):
    """train_inputs="quantized": layer 1 trains on what the served (int4) layer 0 outputs, against the
    full-precision model's layer-1 outputs; with "float" on the full-precision model's inputs."""
    import flatquant_lab.calibrate as cal

    seen, real = [], cal.train_layer

    def spy(layer, groups, learned, X, Y, *a, **k):
        seen.append((X[0:X.shape[0]].clone(), Y[0:Y.shape[0]].clone()))
        return real(layer, groups, learned, X, Y, *a, **k)

    monkeypatch.setattr(cal, "train_layer", spy)
    fm = tiny_model("llama")
    x_f, y_f = _layer1_io(fm)
    q = quantize(copy.deepcopy(fm), config(train_inputs="quantized"), CALIB)
    x_q, _ = _layer1_io(q)
    assert len(seen) == 2
    assert torch.equal(seen[1][0], x_q) and not torch.equal(x_q, x_f)
    assert torch.equal(seen[1][1], y_f)
    seen.clear()
    quantize(copy.deepcopy(fm), config(train_inputs="float"), CALIB)
    assert torch.equal(seen[1][0], x_f) and torch.equal(seen[1][1], y_f)


def test_quantized_inputs_resume_and_tie_the_weight_quantizer(tmp_path):
    """A resumed run gives the same model; since later layers learn from the quantized ones, a work dir
    of another weight quantizer is refused (with float inputs it may change)."""
    fm = tiny_model("qwen3")
    work = str(tmp_path / "work")
    kw = dict(train_inputs="quantized", weight_quantizer="gptq")
    full = state(quantize(copy.deepcopy(fm), config(**kw), CALIB))
    with pytest.raises(Interrupt):
        quantize(copy.deepcopy(fm), config(work_dir=work, **kw), CALIB, after_layer=stop_after_layer_0)
    resumed = quantize(copy.deepcopy(fm), config(work_dir=work, **kw), CALIB)
    assert [e["resumed"] for e in resumed.flatquant_report["layers"]] == [True, False]
    assert same_state(state(resumed), full)
    with pytest.raises(ValueError, match="^work_dir"):
        quantize(copy.deepcopy(fm), config(work_dir=work, train_inputs="quantized", weight_quantizer="rtn"), CALIB)
    work2 = str(tmp_path / "work2")
    quantize(copy.deepcopy(fm), config(work_dir=work2, train_inputs="float", weight_quantizer="gptq"), CALIB)
    quantize(copy.deepcopy(fm), config(work_dir=work2, train_inputs="float", weight_quantizer="rtn"), CALIB)


@pytest.mark.parametrize("kw, name", [
    (dict(factor_param="cayley"), "factor_param"),
    (dict(batch_order="random"), "batch_order"),
    (dict(loss_norm=1), "loss_norm"),
    (dict(train_inputs="fp"), "train_inputs"),
    (dict(layer_loss="l1"), "layer_loss"),
    (dict(gptq_act_order=1), "gptq_act_order"),
    (dict(weight_decay=-0.01), "weight_decay"),
    (dict(weight_decay=float("nan")), "weight_decay"),
    (dict(weight_decay=True), "weight_decay"),
])
def test_bad_loop_options_name_the_parameter(kw, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        QuantConfig(**kw)
