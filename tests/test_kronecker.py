"""Kronecker factor sizes, application and the weight fold (docs/checkpoint-format.md, 'Factor sizes';
docs/ascend-ops.md)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from baselines import dense_kron
from flatquant_lab.kronecker import (
    decompose_dim, fold_weight, kron_apply, kron_inverse_t, npu_supported,
)
from flatquant_lab.transforms import hadamard, orthogonal_factor, random_orthogonal


def vllm_get_decompose_dim(n: int, max_iter: int = 10_000):
    """Port of vllm-ascend's ``get_decompose_dim`` with an iteration cap (None when it hits it).

    The original is ``a = ceil(sqrt(n)); while True: b = sqrt(a^2 - n); if b is whole: break; a += 1``
    and returns ``(a - b, a + b)``; for ``n % 4 == 2`` it never ends.
    """
    a = int(math.sqrt(n))
    if a * a < n:
        a += 1
    for _ in range(max_iter):
        tmp = a * a - n
        b = int(math.sqrt(tmp))
        if b * b == tmp:
            return a - b, a + b
        a += 1
    return None


# ------------------------------------------------------------------ decompose_dim
@pytest.mark.parametrize("k, pair", [
    (4096, (64, 64)), (11008, (86, 128)), (14336, (112, 128)), (896, (28, 32)), (4864, (64, 76)),
])
def test_decompose_dim_spec_examples(k, pair):
    assert decompose_dim(k) == pair
    assert vllm_get_decompose_dim(k) == pair


def test_decompose_dim_agrees_with_vllm_loop_wherever_it_ends():
    ended = 0
    for k in range(1, 4097):
        # a climbs from ceil(sqrt(k)) to at most (k + 1) / 2 (the pair (1, k) or (2, k / 2)),
        # so k // 2 + 2 steps suffice wherever the loop ends
        expect = vllm_get_decompose_dim(k, max_iter=k // 2 + 2)
        if k % 4 == 2:
            assert expect is None, k  # the loop has no same-parity pair to find
            continue
        assert expect is not None, k
        assert decompose_dim(k) == expect, k
        ended += 1
    assert ended == 4096 - 1024


@pytest.mark.parametrize("k, pair", [(40, (4, 10)), (56, (4, 14)), (72, (6, 12)), (12, (2, 6))])
def test_decompose_dim_takes_same_parity_pair_not_nearest(k, pair):
    # (5, 8), (7, 8), (8, 9), (3, 4) are closer to square, but vllm-ascend sizes the checkpoint's
    # left_trans/right_trans with the a^2 - b^2 pair, so ours must match it.
    assert decompose_dim(k) == pair == vllm_get_decompose_dim(k)


@pytest.mark.timeout(60)  # a hang guard (the vllm loop would never end here), not a timing
@pytest.mark.parametrize("k, pair", [
    (6, (2, 3)), (2 * 7919, (2, 7919)), (4 * 10**6 + 2, (6, 666667)),
    (7919, (1, 7919)), (2_147_483_647, (1, 2_147_483_647)), (999_999_937, (1, 999_999_937)),
])
def test_decompose_dim_ends_for_k_mod_4_eq_2_and_primes(k, pair):
    assert decompose_dim(k) == pair
    n1, n2 = decompose_dim(k)
    assert n1 * n2 == k and n1 <= n2


@pytest.mark.parametrize("k", [0, -4, 4.0, True, "64", None])
def test_decompose_dim_bad_k(k):
    with pytest.raises(ValueError, match="k: expected a positive int"):
        decompose_dim(k)


# ------------------------------------------------------------------ npu_supported
def test_npu_supported_ok():
    for n1, n2 in [(64, 64), (86, 128), (112, 128), (28, 32)]:
        s = npu_supported(n1, n2)
        assert s and s.ok and s.reason == ""


def test_npu_supported_n2_not_multiple_of_8():
    s = npu_supported(64, 76)
    assert not s
    assert "n2=76" in s.reason and "divisible by 8" in s.reason


def test_npu_supported_size_limit_depends_on_cann():
    s = npu_supported(128, 148)  # 18944 = Qwen2.5-7B's intermediate size: both limits fail
    assert not s
    assert "exceed 128" in s.reason and "CANN 8.3" in s.reason and "n2=148" in s.reason
    s = npu_supported(136, 136)
    assert not s and "exceed 128" in s.reason and "divisible" not in s.reason
    assert npu_supported(136, 136, cann="8.5")
    assert not npu_supported(128, 264, cann="8.5")


def test_npu_supported_both_problems_reported():
    s = npu_supported(130, 132, cann="8.1")
    assert "divisible by 8" in s.reason and "exceed 128" in s.reason


def test_npu_supported_bad_cann():
    with pytest.raises(ValueError, match="cann: expected one of"):
        npu_supported(64, 64, cann="9.0")


# ------------------------------------------------------------------ kron_apply and the fold
small_dims = st.integers(1, 6)


@settings(max_examples=60, deadline=None)
@given(n1=small_dims, n2=small_dims, lead=st.lists(st.integers(0, 3), max_size=2), seed=st.integers(0, 2**31 - 1))
def test_kron_apply_equals_the_dense_kronecker_product(n1, n2, lead, seed):
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(n1, n1, generator=g, dtype=torch.float64)
    right = torch.randn(n2, n2, generator=g, dtype=torch.float64)
    x = torch.randn(*lead, n1 * n2, generator=g, dtype=torch.float64)
    got = kron_apply(x, left, right)
    want = x @ dense_kron(left, right)
    assert got.shape == x.shape
    # measured max |got - want| 5.3e-15 to 7.1e-15 over 6 x 60 draws
    torch.testing.assert_close(got, want, rtol=0, atol=7e-14)


def test_kron_apply_row_major_token_layout():
    # T(x) = vec(L^T X R) with X = x.view(n1, n2) row-major: check one token by hand.
    left = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    right = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)  # X = [[1, 2], [3, 4]]
    # L^T X = [[1, 2], [5, 8]];  (L^T X) R swaps the columns: [[2, 1], [8, 5]]
    assert kron_apply(x, left, right).tolist() == [2.0, 1.0, 8.0, 5.0]


@settings(max_examples=40, deadline=None)
@given(n1=small_dims, n2=small_dims, out=st.integers(1, 5), tokens=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_fold_then_transform_equals_float_layer(n1, n2, out, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    # Well-conditioned but not orthogonal factors, so that the inverse in the fold matters.
    left = torch.eye(n1, dtype=torch.float64) + 0.3 * torch.randn(n1, n1, generator=g, dtype=torch.float64) / n1
    right = torch.eye(n2, dtype=torch.float64) + 0.3 * torch.randn(n2, n2, generator=g, dtype=torch.float64) / n2
    w = torch.randn(out, n1 * n2, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, n1 * n2, generator=g, dtype=torch.float64)
    folded = fold_weight(w, left, right)
    assert folded.dtype == torch.float64
    got = kron_apply(x, left, right) @ folded.T
    torch.testing.assert_close(got, x @ w.T, rtol=0, atol=5e-14)  # measured max abs 3.6e-15 to 5.3e-15 (6 x 40 draws)


def test_fold_weight_of_half_factors_uses_their_exact_values():
    # from_float rounds L, R to the act dtype first; the fold must invert those rounded values.
    n1, n2 = 4, 8
    left = random_orthogonal(n1, 1).to(torch.bfloat16)
    right = random_orthogonal(n2, 2).to(torch.bfloat16)
    w = torch.randn(3, n1 * n2, dtype=torch.float64)
    x = torch.randn(5, n1 * n2, dtype=torch.float64)
    got = kron_apply(x, left.double(), right.double()) @ fold_weight(w, left, right).T
    torch.testing.assert_close(got, x @ w.T, rtol=0, atol=4e-14)  # measured max abs 3.6e-15


def test_kron_inverse_t():
    left, right = random_orthogonal(3, 0) * 2, torch.randn(4, 4, dtype=torch.float64) + 4 * torch.eye(4, dtype=torch.float64)
    li, ri = kron_inverse_t(left, right)
    eye = dense_kron(left, right) @ dense_kron(li, ri).T
    torch.testing.assert_close(eye, torch.eye(12, dtype=torch.float64), rtol=0, atol=4e-15)  # measured 3.3e-16


def test_kron_apply_bad_shapes():
    x = torch.zeros(2, 12)
    with pytest.raises(ValueError, match="left: expected a square matrix"):
        kron_apply(x, torch.zeros(3, 4), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="right: expected a square matrix"):
        kron_apply(x, torch.zeros(3, 3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"x: last dim 12 must equal n1 \* n2 = 2 \* 4 = 8"):
        kron_apply(x, torch.zeros(2, 2), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="x: last dim"):
        fold_weight(torch.zeros(3, 10), torch.eye(3), torch.eye(4))


# ------------------------------------------------------------------ transforms
@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 16, 20, 24, 44, 64, 68, 128])
def test_hadamard_orthonormal(n):
    h = hadamard(n)
    assert h is not None and h.dtype == torch.float64 and h.shape == (n, n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=2e-14)  # measured <= 1.8e-15
    # a scaled +-1 matrix
    torch.testing.assert_close(h.abs(), torch.full((n, n), n**-0.5, dtype=torch.float64), rtol=0, atol=1e-15)  # measured <= 1.1e-16


@pytest.mark.parametrize("n", [3, 6, 28, 76])
def test_hadamard_none_where_not_constructible(n):
    assert hadamard(n) is None


@pytest.mark.parametrize("kind", ["identity", "hadamard", "random"])
@pytest.mark.parametrize("n", [28, 64, 76])
def test_orthogonal_factor_orthonormal(kind, n):
    f = orthogonal_factor(n, kind, seed=3)
    torch.testing.assert_close(f @ f.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=8e-15)  # measured <= 7.8e-16


def test_orthogonal_factor_seeded_and_bad_kind():
    assert torch.equal(orthogonal_factor(28, "random", 5), orthogonal_factor(28, "random", 5))
    assert not torch.equal(orthogonal_factor(28, "random", 5), orthogonal_factor(28, "random", 6))
    with pytest.raises(ValueError, match="kind: expected"):
        orthogonal_factor(8, "dct")


def test_kron_apply_gradients_match_the_explicit_product():
    # calibration learns L and R through kron_apply
    g = torch.Generator().manual_seed(4)
    left = torch.randn(4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    right = torch.randn(8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 32, generator=g, dtype=torch.float64, requires_grad=True)
    kron_apply(x, left, right).square().sum().backward()
    l2, r2, x2 = (t.detach().clone().requires_grad_() for t in (left, right, x))
    (x2 @ dense_kron(l2, r2)).square().sum().backward()
    for a, b in ((left, l2), (right, r2), (x, x2)):
        torch.testing.assert_close(a.grad, b.grad, rtol=3e-12, atol=5e-12)  # measured: max abs 4.6e-13, rel 3.4e-13


def test_kron_apply_one_token_and_no_tokens():
    left, right = random_orthogonal(2, 0), random_orthogonal(8, 1)
    x = torch.randn(16, dtype=torch.float64)
    torch.testing.assert_close(kron_apply(x, left, right), x @ dense_kron(left, right), rtol=0, atol=5e-15)  # measured 4.4e-16
    assert kron_apply(torch.zeros(0, 3, 16, dtype=torch.float64), left, right).shape == (0, 3, 16)
