"""Does an implementation of vllm-ascend's C8 KV cache (a backend, a vllm-ascend build) compute what the checkpoint
means? ``check_kv_cache(impl)`` compares its three parts with the reference (docs/kv-cache.md, 'What vllm-ascend
computes', 'Tensor parallelism'), each on the reference's own inputs, so a fault is pinned on the part that made it:

  ``write``  int8 codes of K or V: ``clamp(round(x * (1 / scale) + offset), -128, 127)`` in the model dtype, half to
             even (probes: exact half-way values, values past the int8 range, random values, a nonzero offset);
  ``read``   ``int8 * scale`` in the model dtype, **without** the offset (probed with a nonzero offset);
  ``shard``  what rank ``r`` of ``tp`` keeps of the four tensors: the channels of its kv heads (replicas when
             ``tp > num_kv_heads``), checked at every TP size that splits the heads, and its share of a write and
             read of K against the whole cache's on the same heads.

``impl`` is any object with ``write(x, scale, offset)`` (``x`` channels last ``[..., C]``, per-channel ``scale`` and
``offset`` ``[C]``; int8 codes back), ``read(q, scale, offset, dtype)`` and optionally ``shard(tensors, *, rank,
tp, num_kv_heads, head_dim)`` (``tensors``: the checkpoint's short names, ``k_proj.kv_cache_scale`` ...):
:data:`REFERENCE` is the reference's. The report has one verdict, ``passed``, and names the first failing part,
where and both values.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch

from ..dtypes import dtype_name
from ..schemes import C8, rank_kv_heads
from ..schemes.kv_c8 import C8KVCache
from .report import PartCheck, PartsReport

KV_PARTS = ("write", "read", "shard")
DEFAULT_TP_SIZES = (1, 2, 3, 4, 6, 8)


def _reference_read(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, dtype: torch.dtype):
    return C8KVCache.read(q, scale, dtype)  # the offset is written with but never read


REFERENCE = types.SimpleNamespace(write=C8KVCache.write, read=_reference_read, shard=C8.shard)


@dataclass
class KVCacheReport(PartsReport):
    """What :func:`check_kv_cache` found; ``table()`` renders it, ``to_dict()`` is JSON-ready."""

    cache_type: str
    num_kv_heads: int
    head_dim: int
    dtype: str
    tp_sizes: list[int]
    passed: bool  # THE verdict: every part passed
    failed_part: str | None
    reason: str
    parts: list[PartCheck] = field(default_factory=list)

    def table(self) -> str:
        head = (f"{self.cache_type} KV cache, {self.num_kv_heads} kv heads x head_dim {self.head_dim}, {self.dtype}, "
                f"TP {','.join(map(str, self.tp_sizes))}: {'PASS' if self.passed else 'FAIL'}")
        rows = [f"  {p.part:6} {'ok' if p.passed else 'FAIL'} {p.mismatches}/{p.compared} differ"
                + (f"  {p.reason}" if p.reason else "") for p in self.parts]
        return "\n".join([head, *rows])

    def __str__(self) -> str:
        return self.table()


def _compare(part: str, got, want, what: str) -> PartCheck:
    """Exact comparison of ``got`` with ``want`` (same shape); the first difference, flat index, named."""
    if not isinstance(got, torch.Tensor):
        return PartCheck(part, False, reason=f"{what}: expected a tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
        return PartCheck(part, False, compared=want.numel(), mismatches=want.numel(),
                         reason=f"{what}: expected {want.dtype} {list(want.shape)}, got {got.dtype} {list(got.shape)}")
    bad = (got != want).reshape(-1)
    n = int(bad.sum())
    if n == 0:
        return PartCheck(part, True, compared=want.numel())
    i = int(bad.nonzero()[0])
    row, col = divmod(i, want.shape[-1]) if want.dim() else (0, i)
    g, w = float(got.reshape(-1)[i]), float(want.reshape(-1)[i])
    return PartCheck(part, False, compared=want.numel(), mismatches=n, token=row, index=col, backend_value=g,
                     reference_value=w, reason=f"{what}: {n} of {want.numel()} values differ; first at row {row}, "
                                               f"channel {col}: {g:g}, reference {w:g}")


def _merge(part: str, checks: list[PartCheck]) -> PartCheck:
    """One part's verdict over several probes: the first failure's details, the counts summed."""
    compared = sum(c.compared for c in checks)
    mismatches = sum(c.mismatches for c in checks)
    failed = next((c for c in checks if not c.passed), None)
    if failed is None:
        return PartCheck(part, True, compared=compared)
    return PartCheck(part, False, compared=compared, mismatches=mismatches, token=failed.token, index=failed.index,
                     backend_value=failed.backend_value, reference_value=failed.reference_value,
                     reason=failed.reason)


def _probe_scales(heads: int, head_dim: int, g: torch.Generator) -> torch.Tensor:
    """Per-channel scales that differ from head to head and channel to channel (a wrong head shows)."""
    return (0.01 + torch.rand(heads * head_dim, generator=g) / 10) * (1 + torch.arange(heads * head_dim) % 7)


def _tp_sizes(heads: int, tp_sizes) -> list[int]:
    """The TP sizes that split ``heads`` kv heads (a whole number per rank, or whole replicas)."""
    return [tp for tp in tp_sizes if heads % tp == 0 or tp % heads == 0]


@torch.no_grad()
def check_kv_cache(impl=REFERENCE, cache: torch.nn.Module | None = None, *, num_kv_heads: int | None = None,
                   head_dim: int | None = None, dtype: torch.dtype | None = None, tp_sizes=DEFAULT_TP_SIZES,
                   tokens: int = 64, seed: int = 0) -> KVCacheReport:
    """Compare ``impl``'s C8 write, read and TP split with the reference; returns a :class:`KVCacheReport`.

    ``cache``: a layer's :class:`~flatquant_lab.layers.QuantizedKVCache` (a loaded checkpoint's), whose scales are
    probed besides synthetic ones (then ``num_kv_heads``, ``head_dim`` and ``dtype`` default to its); without it,
    ``num_kv_heads`` and ``head_dim`` are needed and ``dtype`` defaults to bfloat16. ``tp_sizes``: those that split the kv heads are checked (an
    ``impl`` without ``shard`` is not). ``tokens`` random tokens per probe, from ``seed``.
    """
    if cache is not None:
        num_kv_heads = num_kv_heads or cache.num_kv_heads
        head_dim = head_dim or cache.head_dim
        dtype = cache.k_scale.dtype if dtype is None else dtype
    dtype = dtype or torch.bfloat16
    if not num_kv_heads or not head_dim:
        raise ValueError("num_kv_heads, head_dim: expected both (or a cache module to take them from)")
    heads, dim = int(num_kv_heads), int(head_dim)
    channels = heads * dim
    g = torch.Generator().manual_seed(seed)
    scales = [_probe_scales(heads, dim, g).to(dtype)]
    if cache is not None:
        scales += [cache.k_scale.to(dtype), cache.v_scale.to(dtype)]
    zero = torch.zeros(channels, dtype=dtype)
    offset = torch.full((channels,), 3.0, dtype=dtype)

    # write: exact ties (scale a power of two, so 1 / scale and x * inv are exact: x * inv = n + 1/2), the ends
    # of the int8 range and beyond, random values at each probe scale, and a nonzero offset
    pow2 = torch.full((channels,), 0.5, dtype=dtype)
    halves = torch.arange(-130, 130, dtype=torch.float32) + 0.5
    ties = (halves[:, None] * 0.5).expand(-1, channels).to(dtype)
    writes = [(ties, pow2, zero, "write of exact half-way values"),
              (ties, pow2, offset, "write of half-way values with offset 3")]
    for i, s in enumerate(scales):
        x = (torch.randn(tokens, channels, generator=g) * 60 * s.float()).to(dtype)
        writes.append((x, s, zero, f"write at probe scales {i}"))
    write_checks = []
    for x, s, off, what in writes:
        try:
            got = impl.write(x, s, off)
        except Exception as e:  # noqa: BLE001 - a failing implementation is a finding, not a crash
            got = e
        if isinstance(got, Exception):
            write_checks.append(PartCheck("write", False, reason=f"{what}: raised {type(got).__name__}: {got}"))
        else:
            write_checks.append(_compare("write", got, REFERENCE.write(x, s, off), what))
    parts = [_merge("write", write_checks)]

    # read: random codes over the whole int8 range, read with a nonzero offset (which the read must ignore)
    read_checks = []
    for i, s in enumerate(scales):
        q = torch.randint(-128, 128, (tokens, channels), generator=g, dtype=torch.int8)
        what = f"read at probe scales {i} with offset 3"
        try:
            got = impl.read(q, s, offset, dtype)
        except Exception as e:  # noqa: BLE001
            read_checks.append(PartCheck("read", False, reason=f"{what}: raised {type(e).__name__}: {e}"))
            continue
        read_checks.append(_compare("read", got, _reference_read(q, s, offset, dtype), what))
    parts.append(_merge("read", read_checks))

    # shard: every rank's four tensors, and its share of a write and read of K, against the whole cache's
    checked = _tp_sizes(heads, tp_sizes) if getattr(impl, "shard", None) is not None else []
    shard_checks = []
    for s in scales:
        tensors = {"k_proj.kv_cache_scale": s, "k_proj.kv_cache_offset": zero,
                   "v_proj.kv_cache_scale": s.flip(0), "v_proj.kv_cache_offset": zero}
        x = (torch.randn(tokens, channels, generator=g) * 60 * s.float()).to(dtype)
        whole = REFERENCE.read(REFERENCE.write(x, s, zero), s, zero, dtype).view(tokens, heads, dim)
        for tp in checked:
            for rank in range(tp):
                where = f"TP {tp} rank {rank}"
                want = REFERENCE.shard(tensors, rank=rank, tp=tp, num_kv_heads=heads, head_dim=dim)
                try:
                    got = impl.shard(tensors, rank=rank, tp=tp, num_kv_heads=heads, head_dim=dim)
                except Exception as e:  # noqa: BLE001
                    shard_checks.append(PartCheck("shard", False, reason=f"{where}: raised {type(e).__name__}: {e}"))
                    continue
                for name in tensors:
                    shard_checks.append(_compare("shard", got.get(name), want[name].reshape(-1),
                                                 f"{where} {name}") if name in got else
                                        PartCheck("shard", False, reason=f"{where}: no {name} in the rank's share"))
                mine = got.get("k_proj.kv_cache_scale")
                if isinstance(mine, torch.Tensor) and mine.numel() % dim == 0 and mine.numel() > 0:
                    hs = rank_kv_heads(rank, tp, heads)
                    xs = x.view(tokens, heads, dim)[:, hs.start:hs.stop].reshape(tokens, -1)
                    if xs.shape[1] == mine.numel():
                        back = REFERENCE.read(REFERENCE.write(xs, mine, None), mine, None, dtype)
                        shard_checks.append(_compare("shard", back, whole[:, hs.start:hs.stop].reshape(tokens, -1),
                                                     f"{where} K written and read with its share of the scales"))
    parts.append(_merge("shard", shard_checks) if checked else PartCheck("shard", True))
    failed = next((p for p in parts if not p.passed), None)
    return KVCacheReport(cache_type="C8", num_kv_heads=heads, head_dim=dim, dtype=dtype_name(dtype),
                         tp_sizes=checked, passed=failed is None, failed_part=failed.part if failed else None,
                         reason=failed.reason if failed else "", parts=parts)


__all__ = ["DEFAULT_TP_SIZES", "KVCacheReport", "KV_PARTS", "REFERENCE", "check_kv_cache"]
