"""Calibration for W4A4_MXFP4_FLATQUANT (docs/mxfp4.md, "Calibration"): the MXFP4 fake quantizer, the training
stand-ins of an MXFP4 group, MXFP4 GPTQ, and tiny models calibrated with the ``mxfp4`` recipe through save, load
and serve-check.

What is asserted are guarantees (bit equalities, shapes, block structure, determinism at a fixed seed), never that
training lowered a loss: on a few random tokens that depends on chance.
"""
from __future__ import annotations

import json

import pytest
import torch

from flatquant_lab import mxfp4, ops
from flatquant_lab.calibrate import plan_layer
from flatquant_lab.calibrate.e2e import MxTransformTuning, TunableMXFP4
from flatquant_lab.calibrate.modules import FakeQuantLinear, KronTransform, mx_options
from flatquant_lab.calibrate.plan import Group
from flatquant_lab.gptq import gptq_quantize_mxfp4
from flatquant_lab.io import DESCRIPTION_FILE, load_quantized, save_quantized, serve_check
from flatquant_lab.layers import W4A4FlatQuantLinear, W4A4MXFP4FlatQuantLinear
from flatquant_lab.layers.w4a4_mxfp4_flatquant import DEFAULT_MAX_TP, block_diagonal_problem, mx_factors
from flatquant_lab.models import is_row_parallel
from flatquant_lab.quantizers import fake_quant_mx
from flatquant_lab.recipe import MX_DEFAULTS, MX_RECIPES, MXFP4, QuantConfig
from flatquant_lab.transforms import orthogonal_factor
from tiny_models import (Interrupt, assert_same_state, config, logits, quantized_copy, random_linear, state,
                         stop_after_layer_0, tiny_model, write_tiny_model_dir)

SIZES = dict(head_dim=32)  # hidden 64, intermediate 128: o_proj and down_proj take 128 = 4 ranks x 32


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def awkward(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Values spread over many binades, with exact E2M1 ties, an all-zero group and a group past 6x its scale."""
    x = torch.randn(*shape, generator=gen(seed)) * torch.exp2(torch.randint(-6, 7, shape, generator=gen(seed + 1)))
    x[..., :32] = 0.0
    x[..., 32:64] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25] * 4)  # every rounding tie
    x[..., 64] = 7.0  # ratio 7 under exponent 0: saturates to 6
    return x.to(dtype)


# ============================================================================ the fake quantizer
@pytest.mark.parametrize("rule", mxfp4.SCALE_RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantizer_equals_quantize_then_dequantize_bit_for_bit(rule, dtype):
    x = awkward((6, 128), seed=3, dtype=dtype)
    opts = mxfp4.MxOptions(scale_rule=rule)
    mq = mxfp4.quantize_groups(x, opts)
    stored = mxfp4.dequantize(mxfp4.pack_fp4(mq.codes), mq.scales)  # float64, exact
    fq = fake_quant_mx(x, opts)
    assert fq.dtype == dtype and torch.equal(fq.double(), stored)
    assert torch.equal(mxfp4.quantize_dequantize(x, opts).double(), stored)


def test_fake_quantizer_equals_the_fp4_kronecker_quant_of_the_reference():
    x = (torch.randn(9, 8, 16, generator=gen(1)) * 4).to(torch.bfloat16)
    p1 = orthogonal_factor(8, "random", seed=2).to(torch.bfloat16)
    p2 = orthogonal_factor(16, "random", seed=3).to(torch.bfloat16)
    codes, scales = ops.reference.kronecker_quant_mx(x, p1, p2)
    b = torch.matmul(p1.float(), torch.bmm(x.float(), p2.float().expand(9, 16, 16))).reshape(9, -1)
    assert torch.equal(fake_quant_mx(b).double(), mxfp4.dequantize(codes.reshape(9, -1), scales))


def test_fake_quantizer_gradient_is_straight_through_and_clip_only_acts_when_asked():
    x = awkward((4, 96), seed=5).requires_grad_(True)
    g = torch.randn(4, 96, generator=gen(6))
    fake_quant_mx(x).backward(g)
    assert torch.equal(x.grad, g)
    w = torch.randn(3, 64, generator=gen(7))
    assert torch.equal(fake_quant_mx(w, clip=0.5), fake_quant_mx(w))  # apply_clip off: clip unused
    clipped = fake_quant_mx(w, mxfp4.MxOptions(apply_clip=True), clip=0.5)
    assert torch.equal(clipped.double(), mxfp4.dequantize(*(lambda q: (mxfp4.pack_fp4(q.codes), q.scales))(
        mxfp4.quantize_groups(w, mxfp4.MxOptions(apply_clip=True), clip=0.5))))
    assert not torch.equal(clipped, fake_quant_mx(w))


# ============================================================================ the stand-ins of one group
def _down_group() -> Group:
    return Group("down", ("mlp.down_proj",), 128, *mx_factors(128, True, 4), None, scheme=MXFP4, blocks=4,
                 row_parallel=True)


def test_the_stand_in_computes_what_the_served_layer_computes():
    g = _down_group()
    assert (g.n1, g.n2) == (16, 8)
    left = torch.block_diag(*[orthogonal_factor(4, "random", seed=j) for j in range(4)]).float()
    left = left + 0.1 * torch.eye(16)  # not orthogonal: the fold's inverse matters
    right = orthogonal_factor(8, "random", seed=9).float()
    tr = KronTransform(g, left, right, None, torch.tensor([float("inf")]), torch.bfloat16,
                       mx=mx_options(QuantConfig(recipe="mxfp4")))
    lin = random_linear(128, 48, seed=3)
    fq = FakeQuantLinear(lin, tr, torch.full((48,), float("inf")), learn_clip=False)
    x = torch.randn(20, 128, generator=gen(1)) * 3
    with torch.no_grad():
        y = fq(x)
        lt, rt = tr.factors()
        served = W4A4MXFP4FlatQuantLinear.from_float(lin, lt, rt, act_dtype=torch.bfloat16)
        codes, scales = ops.reference.kronecker_quant_mx(x.to(torch.bfloat16).view(-1, 16, 8), served.p1, served.p2)
        assert torch.equal(tr.quantized_input(x).double(), mxfp4.dequantize(codes.view(20, -1), scales))
        assert torch.equal(fq._codes[1].double(), served.dequantized_weight(torch.float64))
        assert torch.equal(y, served(x))


def test_left_is_learned_as_independent_diagonal_blocks():
    g = _down_group()
    left = torch.block_diag(*[orthogonal_factor(4, "random", seed=j) for j in range(4)]).float()
    tr = KronTransform(g, left, torch.eye(8), None, torch.tensor([float("inf")]), torch.bfloat16,
                       mx=mx_options(QuantConfig(recipe="mxfp4")))
    assert [tuple(p.shape) for p in tr.factor_parameters()] == [(4, 4, 4), (8, 8)]
    assert not tr.act_clip.requires_grad
    lin = random_linear(128, 16, seed=4)
    fq = FakeQuantLinear(lin, tr, torch.full((16,), float("inf")), learn_clip=False)
    opt = torch.optim.AdamW(tr.factor_parameters(), lr=0.05)
    for step in range(3):
        loss = fq(torch.randn(8, 128, generator=gen(step))).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained, _ = tr.matrices()
    assert not torch.equal(trained, left) and block_diagonal_problem(trained, 4) == ""
    assert block_diagonal_problem(tr.inverse_t()[0].detach(), 4) == ""


# ============================================================================ GPTQ
def test_gptq_with_an_identity_hessian_is_round_to_nearest():
    w = awkward((10, 96), seed=11).double()
    for rule in mxfp4.SCALE_RULES:
        q, s = gptq_quantize_mxfp4(w, torch.eye(96, dtype=torch.float64), damp=1e-6,
                                   options=mxfp4.MxOptions(scale_rule=rule))
        rq, rs = mxfp4.quantize_weight_mxfp4(w, scale_rule=rule)
        assert torch.equal(q, rq) and torch.equal(s, rs), rule


def test_gptq_fixes_each_groups_scales_from_its_updated_columns():
    w = torch.randn(12, 128, generator=gen(2), dtype=torch.float64)
    x = torch.randn(256, 128, generator=gen(3), dtype=torch.float64) @ (torch.eye(128, dtype=torch.float64)
                                                                        + 0.3 * torch.randn(128, 128, generator=gen(4), dtype=torch.float64))
    q, s = gptq_quantize_mxfp4(w, x.T @ x, block=40)  # rounded up to 64: no group straddles a block
    assert q.shape == (12, 64) and s.shape == (12, 4) and s.dtype == torch.uint8
    # the first group sees no feedback yet: its scales are round to nearest's
    assert torch.equal(s[:, 0], mxfp4.quantize_weight_mxfp4(w)[1][:, 0])
    assert torch.equal((q, s)[1], gptq_quantize_mxfp4(w, x.T @ x, block=64)[1])  # same blocks of 32, same result
    assert not torch.equal(q, mxfp4.quantize_weight_mxfp4(w)[0])


def test_gptq_scales_are_what_the_layer_stores(monkeypatch):
    from flatquant_lab.calibrate import finalize

    seen = []

    def recording(*args, **kwargs):
        out = gptq_quantize_mxfp4(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(finalize, "gptq_quantize_mxfp4", recording)
    model = tiny_model("qwen2", **SIZES)
    q = quantized_copy(model, config(recipe="mxfp4", weight_quantizer="gptq", epochs=1))
    assert len(seen) == 2 * 4  # 2 layers x (q/k/v, o, gate/up, down)
    layer = q.model.layers[1]
    k, v = layer.self_attn.k_proj, layer.self_attn.v_proj
    packed, scales = seen[4]  # layer 1's q/k/v, stacked along the rows
    rows = [layer.self_attn.q_proj.out_features, k.out_features, v.out_features]
    for mod, p, s in zip((layer.self_attn.q_proj, k, v), packed.split(rows), scales.split(rows)):
        assert torch.equal(mod.weight, p) and torch.equal(mod.weight_scale, s)


# ============================================================================ the plan and the recipe
def test_plan_sizes_groups_for_max_supported_tp():
    model = tiny_model("llama", **SIZES)
    groups = {g.name: g for g in plan_layer(model, 0, QuantConfig(recipe="mxfp4"))}
    assert all(g.scheme == MXFP4 and g.quantized and g.tp == 1 for g in groups.values())
    assert (groups["attn"].n1, groups["attn"].n2, groups["attn"].blocks) == (8, 8, 1)
    assert (groups["o"].n1, groups["o"].n2, groups["o"].blocks) == (16, 8, 4)
    assert (groups["down"].n1, groups["down"].n2, groups["down"].blocks) == (16, 8, 4)
    two = {g.name: g for g in plan_layer(model, 0, QuantConfig(recipe="mxfp4", mx_max_tp=2))}
    assert (two["o"].n1, two["o"].n2, two["o"].blocks) == mx_factors(128, True, 2) + (2,)
    # head_dim 16: o_proj takes 64, 16 per rank at TP 4, not whole groups of 32: the fallback scheme
    small = {g.name: g for g in plan_layer(tiny_model("llama"), 0, QuantConfig(recipe="mxfp4"))}
    assert small["attn"].scheme == MXFP4 and small["o"].scheme == "w8a8_dynamic" and small["o"].fallback


def test_recipe_preset_config_and_cli():
    from flatquant_lab.cli.quantize import _recipe

    assert MX_RECIPES["mxfp4"] == {"*": MXFP4} and MX_DEFAULTS["mx_max_tp"] == DEFAULT_MAX_TP
    cfg = QuantConfig(recipe="mxfp4")
    assert cfg.scheme_for("model.layers.0.mlp.down_proj")[0] == MXFP4
    d = cfg.to_dict()
    assert (d["mx_scale_rule"], d["mx_apply_clip"], d["mx_max_tp"]) == ("kernel", False, 4)
    assert "mx_scale_rule" not in QuantConfig().to_dict()  # configs without MXFP4 record what they always did
    assert "mx_max_tp" in QuantConfig(mx_max_tp=2).to_dict()
    assert QuantConfig(recipe="mxfp4").fingerprint() != QuantConfig(recipe="mxfp4", mx_scale_rule="ocp").fingerprint()
    assert _recipe("mxfp4") == "mxfp4"
    with pytest.raises(ValueError, match="mx_scale_rule"):
        QuantConfig(recipe="mxfp4", mx_scale_rule="nearest")


def test_refusals_before_any_work():
    model = tiny_model("llama", **SIZES)
    with pytest.raises(ValueError, match="tp_size: 2 exceeds mx_max_tp = 1"):
        quantized_copy(model, config(recipe="mxfp4", mx_max_tp=1, tp_size=2))
    with pytest.raises(ValueError, match="tp_size: 2 does not divide mx_max_tp = 3"):
        quantized_copy(model, config(recipe="mxfp4", mx_max_tp=3, tp_size=2))
    with pytest.raises(ValueError, match="factor_param: W4A4_MXFP4_FLATQUANT groups learn plain"):
        quantized_copy(model, config(recipe="mxfp4", factor_param="svd"))


# ============================================================================ tiny models end to end
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_calibrated_model_saves_loads_and_serves_at_tp_1_2_4(model_type, tmp_path):
    model = tiny_model(model_type, **SIZES)
    q = quantized_copy(model, config(recipe="mxfp4", weight_quantizer="gptq"))
    mods = {n: m for n, m in q.named_modules() if isinstance(m, W4A4MXFP4FlatQuantLinear)}
    assert len(mods) == 2 * 7 and not any(isinstance(m, W4A4FlatQuantLinear) for m in q.modules())
    assert torch.isfinite(logits(q)).all()
    for name, m in mods.items():
        assert m.max_supported_tp == 4 and m.weight_scale.shape == (m.out_features, m.in_features // 32)
        if is_row_parallel(name):  # TP-aware by construction: block-diagonal over max_supported_tp blocks
            assert (m.n1, m.n2) == mx_factors(m.in_features, True, 4)
            assert block_diagonal_problem(m.left_trans, 4) == "", name
        else:
            assert (m.n1, m.n2) == mx_factors(m.in_features, False)
        assert float(m.clip_ratio) == 1.0  # mx_apply_clip off: no clip
    out = save_quantized(q, tmp_path / "mx")
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    assert desc["max_supported_tp"] == 4 and desc["group_size"] == 32
    assert desc["model.layers.0.mlp.down_proj.weight"] == "W4A4_MXFP4_FLATQUANT"
    loaded = load_quantized(out)
    assert torch.equal(logits(loaded), logits(q))
    results = serve_check(out, (1, 2, 4), tokens=6)
    assert [r.loads for r in results] == [True, True, True], [r.line() for r in results]
    assert all(r.worst_rel_diff == 0.0 for r in results), [r.line() for r in results]


def test_calibration_is_deterministic_at_a_fixed_seed():
    model = tiny_model("qwen3", **SIZES)
    cfg = config(recipe="mxfp4", weight_quantizer="gptq")
    a, b = quantized_copy(model, cfg), quantized_copy(model, cfg)
    assert_same_state(state(a), state(b))
    assert a.flatquant_report["layers"][0]["epoch_losses"] == b.flatquant_report["layers"][0]["epoch_losses"]
    assert len(a.flatquant_report["layers"][0]["epoch_losses"]) == 2
    start = quantized_copy(model, cfg.replace(epochs=0))  # the Hadamard start, untrained: training moved it
    left, left0 = a.model.layers[0].mlp.down_proj.left_trans, start.model.layers[0].mlp.down_proj.left_trans
    assert block_diagonal_problem(left0, 4) == "" and not torch.equal(left, left0)


def test_baselines_use_fixed_transforms():
    model = tiny_model("llama", **SIZES)
    rtn = quantized_copy(model, config(recipe="mxfp4", method="rtn"))
    had = quantized_copy(model, config(recipe="mxfp4", method="hadamard"))
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        r, h = rtn.model.layers[0].get_submodule(name), had.model.layers[0].get_submodule(name)
        assert torch.equal(r.left_trans.float(), torch.eye(r.n1)) and torch.equal(r.right_trans.float(), torch.eye(r.n2))
        hl = h.left_trans.double()
        blocks = 4 if "q_proj" not in name else 1
        assert block_diagonal_problem(hl, blocks) == ""
        assert torch.allclose(hl @ hl.T, torch.eye(h.n1, dtype=torch.float64), atol=1e-2)  # bf16-rounded Hadamard
        # RTN of the folded weight under the kernel rule: what the layer's own from_float computes
        ref = W4A4MXFP4FlatQuantLinear.from_float(model.model.layers[0].get_submodule(name), r.left_trans,
                                                  r.right_trans, act_dtype=torch.bfloat16)
        assert torch.equal(ref.weight, r.weight) and torch.equal(ref.weight_scale, r.weight_scale)


# ============================================================================ the end-to-end stage
@pytest.mark.parametrize("tp_size, bias, act_dtype", [(1, False, torch.bfloat16), (1, True, torch.float16),
                                                      (2, True, torch.bfloat16), (4, False, torch.bfloat16)])
def test_twin_computes_the_fp4_path(tp_size, bias, act_dtype):
    """The end-to-end twin of an MXFP4 layer, its corrections at zero, is the layer's forward (any TP size, bias or
    not) up to the float32 order of its matmul (the reference forms it in float64): measured bit-equal on at least
    99% of outputs, the rest within one step of the dtype."""
    lin = random_linear(128, 48, seed=7, bias=bias)
    left = torch.block_diag(*[orthogonal_factor(8, "random", seed=8 + j) for j in range(4)])  # over 4 ranks
    right = orthogonal_factor(4, "random", seed=13)
    m = W4A4MXFP4FlatQuantLinear.from_float(lin, left, right, act_dtype=act_dtype, tp_size=tp_size)
    x = (torch.randn(3, 40, 128, generator=gen(9)) * torch.exp2(torch.randint(-3, 4, (128,), generator=gen(10)))
         ).to(act_dtype)
    twin = TunableMXFP4(m, MxTransformTuning(m.left_trans, m.right_trans, 4, act_dtype), mx_options(QuantConfig())[0])
    with torch.no_grad():
        want, got = m(x), twin(x)
    assert got.dtype == want.dtype == act_dtype and got.shape == want.shape
    diff = (got.float() - want.float()).abs()
    step = want.float().abs().clamp_min(1e-3) * torch.finfo(act_dtype).eps
    assert bool((diff <= step * 1.01).all()), float((diff / step).max())
    assert float((diff == 0).float().mean()) >= 0.99


def test_twin_gradients_reach_both_corrections_and_keep_the_blocks():
    lin = random_linear(128, 48, seed=3)
    left = torch.block_diag(*[orthogonal_factor(8, "random", seed=20 + j) for j in range(4)])
    m = W4A4MXFP4FlatQuantLinear.from_float(lin, left, orthogonal_factor(4, "random", seed=30),
                                            act_dtype=torch.bfloat16)
    tuning = MxTransformTuning(m.left_trans, m.right_trans, 4, torch.bfloat16)
    assert tuple(tuning.a.shape) == (4, 8, 8) and tuple(tuning.b.shape) == (4, 4)
    twin = TunableMXFP4(m, tuning, mx_options(QuantConfig())[0])
    twin(torch.randn(2, 16, 128, generator=gen(4))).float().square().mean().backward()
    for p in (tuning.a, tuning.b):
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and float(p.grad.abs().sum()) > 0
    with torch.no_grad():
        tuning.a.fill_(0.01)
        tuning.b.fill_(0.01)
    moved, right = tuning.matrices()
    assert block_diagonal_problem(moved, 4) == "" and not torch.equal(moved, m.left_trans.float())
    assert torch.equal(moved, moved.to(torch.bfloat16).float()) and torch.equal(right, right.to(torch.bfloat16).float())


def _tuned(model, start: bool = True, **kw):
    """``model`` calibrated with the ``mxfp4`` recipe and 2 end-to-end epochs, and (``start``) without them."""
    cfg = config(recipe="mxfp4", profile="fast", samples=8, seqlen=32, epochs=1, e2e_epochs=2, e2e_samples=4,
                 e2e_holdout=2, e2e_lr=2e-2, **kw)
    return quantized_copy(model, cfg), quantized_copy(model, cfg.replace(e2e_epochs=0)) if start else None


@pytest.mark.parametrize("mt", ["llama", "qwen2"])
def test_the_stage_tunes_only_the_transforms_and_every_tp_size_still_loads(mt, keep_last_epoch, tmp_path):
    on, off = _tuned(tiny_model(mt, **SIZES))
    rep = on.flatquant_report["e2e"]
    assert rep["kept_epoch"] == 2 and rep["scale_multiplier_range"] is None and rep["clip_ratios"] == {}
    assert rep["transform_change"]["left_trans"] > 0 and rep["transform_change"]["right_trans"] > 0
    a, b = state(off), state(on)
    changed = {k.rsplit(".", 1)[1] for k in a if not torch.equal(a[k], b[k])}
    assert changed == {"left_trans", "right_trans"}, changed
    mods = {n: m for n, m in on.named_modules() if isinstance(m, W4A4MXFP4FlatQuantLinear)}
    assert len(mods) == 14
    for name, m in mods.items():
        assert torch.equal(m.p1, m.left_trans.t().to(m.act_dtype))
        assert torch.equal(m.p2, m.right_trans.to(m.act_dtype))
        if is_row_parallel(name):
            assert block_diagonal_problem(m.left_trans, 4) == "", name
    for layer in on.model.layers:  # q/k/v share one pair, gate/up another, as vLLM's fused modules load them
        for first, *others in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            parent = layer.self_attn if first == "q_proj" else layer.mlp
            for side in ("left_trans", "right_trans"):
                assert all(torch.equal(getattr(parent.get_submodule(first), side),
                                       getattr(parent.get_submodule(o), side)) for o in others), (first, side)
    out = save_quantized(on, tmp_path / "mx")
    assert torch.equal(logits(load_quantized(out)), logits(on))
    results = serve_check(out, (1, 2, 4), tokens=6)
    assert [r.loads for r in results] == [True, True, True], [r.line() for r in results]
    assert all(r.worst_rel_diff == 0.0 for r in results), [r.line() for r in results]


def test_recomputing_each_layer_tunes_the_same_fp4_transforms(keep_last_epoch):
    """recompute_blocks=True (each decoder layer recomputed in the backward pass, as a 7B model needs) gives the FP4
    twins' transforms bit for bit as the plain step does, and the same training KL."""
    model = tiny_model("llama", **SIZES)
    plain, _ = _tuned(model, start=False, recompute_blocks=False)
    again, _ = _tuned(model, start=False, recompute_blocks=True)
    assert again.flatquant_report["e2e"]["recompute_layers"] is True
    assert plain.flatquant_report["e2e"]["kl"] == again.flatquant_report["e2e"]["kl"]
    assert_same_state(state(plain), state(again))


def test_a_stage_that_cannot_improve_returns_the_layer_wise_fp4_model_bit_for_bit(spoil_every_epoch):
    """Every epoch made worse on purpose (both corrections pushed to 0.3): the guard keeps the start, and the
    model is the layer-wise one exactly."""
    def spoil(m):
        if isinstance(m, TunableMXFP4):
            m.tuning.a.fill_(0.3)
            m.tuning.b.fill_(0.3)

    spoil_every_epoch(spoil)
    on, off = _tuned(tiny_model("llama", **SIZES))
    rep = on.flatquant_report["e2e"]
    assert rep["kept_epoch"] == 0 and all(v > rep["heldout_kl"][0] for v in rep["heldout_kl"][1:])
    a, b = state(off), state(on)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_guard_never_hands_back_a_worse_fp4_model():
    on, _ = _tuned(tiny_model("qwen3", **SIZES), start=False)
    rep = on.flatquant_report["e2e"]
    assert rep["heldout_kl"][rep["kept_epoch"]] == min(rep["heldout_kl"])
    assert rep["heldout_kl_after"] <= rep["heldout_kl_before"]
    assert (rep["heldout_kl_after"] < rep["heldout_kl_before"]) == (rep["kept_epoch"] > 0)


def test_act_clip_with_apply_clip_is_searched_and_not_trained():
    model = tiny_model("llama", **SIZES)
    q = quantized_copy(model, config(recipe="mxfp4", mx_apply_clip=True))
    clips = q.flatquant_report["layers"][0]["clip_ratios"]
    assert set(clips) == {"attn", "o", "mlp", "down"} and all(0.5 < c <= 1.0 for c in clips.values())
    assert float(q.model.layers[0].mlp.down_proj.clip_ratio) == pytest.approx(clips["down"])
    # the search's winner is the start, and training leaves it as it was
    untrained = quantized_copy(model, config(recipe="mxfp4", mx_apply_clip=True, epochs=0))
    assert untrained.flatquant_report["layers"][0]["clip_ratios"] == clips


def test_quantize_cli_with_the_mxfp4_recipe(tmp_path, capsys):
    from flatquant_lab.api import quantize
    from flatquant_lab.cli import main

    fm = tiny_model("llama", **SIZES)
    src = tmp_path / "tiny"
    write_tiny_model_dir(src, fm)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(4, 256, (400,), generator=gen(5))))
    out = tmp_path / "mx"
    assert main(["quantize", "--model", str(src), "--out", str(out), "--recipe", "mxfp4", "--calib-data", str(text),
                 "--samples", "4", "--seqlen", "16", "--epochs", "1", "--e2e-epochs", "0", "--mx-max-tp", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == str(out) and printed["fallbacks"] == {}
    assert json.loads((out / DESCRIPTION_FILE).read_text())["max_supported_tp"] == 2
    loaded = load_quantized(out)
    mods = [m for m in loaded.modules() if isinstance(m, W4A4MXFP4FlatQuantLinear)]
    assert len(mods) == 2 * 7 and block_diagonal_problem(loaded.model.layers[0].mlp.down_proj.left_trans, 2) == ""
    # the same as quantize in Python with that config on the same windows (RTN baseline: no data needed)
    assert main(["quantize", "--model", str(src), "--out", str(tmp_path / "rtn"), "--recipe", "mxfp4",
                 "--method", "rtn", "--weight-quantizer", "rtn"]) == 0
    direct = quantize(tiny_model("llama", **SIZES), QuantConfig(method="rtn", weight_quantizer="rtn", recipe="mxfp4"))
    assert torch.equal(logits(load_quantized(tmp_path / "rtn")), logits(direct))


def test_an_interrupted_run_resumes_to_the_same_model(tmp_path):
    fm = tiny_model("qwen2", **SIZES)
    work = str(tmp_path / "work")
    cfg = config(recipe="mxfp4", weight_quantizer="gptq")
    full = quantized_copy(fm, cfg)
    with pytest.raises(Interrupt):
        quantized_copy(fm, cfg.replace(work_dir=work), after_layer=stop_after_layer_0)
    resumed = quantized_copy(fm, cfg.replace(work_dir=work))
    assert [e["resumed"] for e in resumed.flatquant_report["layers"]] == [True, False]
    assert_same_state(state(resumed), state(full))
    with pytest.raises(ValueError, match="work_dir"):  # the MXFP4 options are part of what a resume must match
        quantized_copy(fm, cfg.replace(work_dir=work, mx_scale_rule="ocp"))
