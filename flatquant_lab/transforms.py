"""Fixed orthogonal Kronecker factors (the QuaRot-style baseline and FlatQuant's starting point).

Hadamard matrices come from Sylvester's doubling (``2^k``), Paley's first construction (``q + 1``
for a prime ``q = 3 mod 4``) and Kronecker products of those; other sizes get a seeded random
orthogonal matrix. All are scaled to be orthonormal: ``H H^T = I``. They are built on the CPU in
float64 (the same factors whatever the device) and moved to ``device`` at the end.
"""
from __future__ import annotations

import functools

import torch


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    f = 2
    while f * f <= n:
        if n % f == 0:
            return False
        f += 1
    return True


def _paley1(q: int) -> torch.Tensor:
    """Paley I: a +-1 Hadamard matrix of order ``q + 1`` for a prime ``q = 3 mod 4``."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in residues else -1 for i in range(1, q)]
    qm = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64,
                      device="cpu")
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64, device="cpu")  # skew conference matrix
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = qm
    return s + torch.eye(q + 1, dtype=torch.float64, device="cpu")


@functools.lru_cache(maxsize=None)
def _hadamard_pm1(n: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix of order ``n`` from the constructions above, or None."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64, device="cpu")
    if n % 4 and n != 2:
        return None
    if (n - 1) % 4 == 3 and _is_prime(n - 1):
        return _paley1(n - 1)
    if n % 2 == 0:
        half = _hadamard_pm1(n // 2)
        if half is not None:
            return torch.cat([torch.cat([half, half], 1), torch.cat([half, -half], 1)], 0)
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """Orthonormal Hadamard matrix ``H / sqrt(n)`` (float64) when one is constructible, else None."""
    h = _hadamard_pm1(n)
    return None if h is None else h / n**0.5


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """Seeded Haar-random orthogonal matrix (float64, CPU), QR of a Gaussian with the sign fix."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64, device="cpu"))
    return q * torch.sign(torch.diagonal(r))


def orthogonal_factor(n: int, kind: str = "hadamard", seed: int = 0, device=None,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """One Kronecker factor: ``identity``, ``hadamard`` (random orthogonal where none exists) or ``random``;
    built in float64 on the CPU, then cast to ``dtype`` and moved to ``device`` (default: the CPU)."""
    if kind == "identity":
        f = torch.eye(n, dtype=torch.float64, device="cpu")
    elif kind == "hadamard":
        h = hadamard(n)
        f = h if h is not None else random_orthogonal(n, seed)
    elif kind == "random":
        f = random_orthogonal(n, seed)
    else:
        raise ValueError(f"kind: expected 'identity', 'hadamard' or 'random', got {kind!r}")
    return f.to(dtype=dtype, device=device if device is not None else "cpu")
