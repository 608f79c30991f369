"""MXFP4 arithmetic: E2M1 elements with one E8M0 exponent per group of 32 (docs/mxfp4.md).

An element code is four bits, bit 3 the sign and bits 0-2 an index into :data:`E2M1_GRID`
``{0, 0.5, 1, 1.5, 2, 3, 4, 6}``; two codes share a byte, the even-indexed element in the low nibble.
A scale code ``e`` (uint8, E8M0) stands for ``2^(e - 127)``; 0xFF is NaN. A group of 32 consecutive
values along the last dim shares one scale: value ``= grid[idx] * (-1)^sign * 2^(e - 127)``.

Three rules pick a group's exponent and round its elements (:data:`SCALE_RULES`):

- ``"kernel"`` (the default, the FP4 ``npu_kronecker_quant`` kernel as read, *assumed*): the values are
  rounded to bfloat16 first; ``shared_exp = floor(log2(amax_bf16)) - 2``; elements ``x / 2^shared_exp``
  in bfloat16, then to E2M1 round half to even; ratios above 6 saturate to 6 (*assumed*);
- ``"ocp"`` (OCP MX v1.0, what ``npu_dynamic_mx_quant`` documents): the same exponent rule on the values as
  given (no bfloat16 step), elements rounded half to even, clamped to 6;
- ``"msmodelslim"`` (msModelSlim's weight quantizer): ``shared_exp = floor(log2(amax * 8/7)) - 2``, elements
  rounded half away from zero, clipped to 6.

Every rule clamps the E8M0 code at 0 (a group whose exponent would fall below ``2^-127`` uses ``2^-127``) and
gives an all-zero group code 0. Nothing here knows about backends; :mod:`flatquant_lab.ops` builds on it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

GROUP = 32  # elements per shared exponent (the description's group_size)
E8M0_BIAS = 127
E8M0_NAN = 0xFF
E2M1_MAX = 6.0
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
SIGN_BIT = 0x8
SCALE_RULES = ("kernel", "ocp", "msmodelslim")
# The dtypes torch_npu's FP4 ops name; torch releases without them get the name as a string.
FLOAT4_E2M1_X2 = getattr(torch, "float4_e2m1fn_x2", "float4_e2m1fn_x2")
FLOAT8_E8M0 = getattr(torch, "float8_e8m0fnu", "float8_e8m0fnu")


@dataclass(frozen=True)
class MxOptions:
    """The points no source settled (docs/mxfp4.md), with the defaults SPEC section 15 assumes.

    ``scale_rule``: one of :data:`SCALE_RULES`. ``saturate``: ratios that round past 6 become 6; ``False``
    raises instead (to see whether a result depends on the assumption). ``apply_clip``: whether the
    activation clip ratio scales the group maximum on the FP4 path (the kernel source read does not use it).
    ``round_intermediate``: whether ``x @ p2`` is rounded to the input dtype before ``p1 @ .`` (the int4
    kernel does; the FP4 kernel as read keeps fp32 products until the single bfloat16 rounding).
    """

    scale_rule: str = "kernel"
    saturate: bool = True
    apply_clip: bool = False
    round_intermediate: bool = False

    def __post_init__(self):
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"scale_rule: expected one of {', '.join(SCALE_RULES)}, got {self.scale_rule!r}")
        for name in ("saturate", "apply_clip", "round_intermediate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")


DEFAULT_OPTIONS = MxOptions()


def _check_groups(x: torch.Tensor, name: str) -> None:
    if x.dim() == 0 or x.shape[-1] % GROUP:
        raise ValueError(f"{name}: last dim must be a multiple of {GROUP} (one E8M0 scale per {GROUP} values), "
                         f"got shape {tuple(x.shape)}")


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """``floor(log2(a))`` exactly for positive finite ``a`` (int32; subnormals included), 0 where ``a == 0``."""
    _, exp = torch.frexp(a)
    return torch.where(a > 0, exp - 1, torch.zeros_like(exp)).to(torch.int32)


def round_e2m1(r: torch.Tensor, half_even: bool = True, saturate: bool = True) -> torch.Tensor:
    """Ratios ``r`` rounded to the E2M1 grid (same dtype, float): steps of 0.5 below 2, 1 below 4, 2 above.

    Ties go to the even code (``half_even``) or away from zero. A magnitude that rounds above 6 becomes 6
    with ``saturate``; without it a ``ValueError`` says how many did.
    """
    mag = r.abs().double()
    step = torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0)).to(mag.dtype)
    units = mag / step  # exact: division by a power of two
    units = torch.round(units) if half_even else torch.floor(units + 0.5)
    q = units * step
    over = q > E2M1_MAX
    if bool(over.any()):
        if not saturate:
            raise ValueError(f"r: {int(over.sum())} ratio(s) round above {E2M1_MAX:g}, which E2M1 cannot hold "
                             "(saturate=False)")
        q = q.clamp(max=E2M1_MAX)
    return torch.copysign(q, r.double()).to(r.dtype)


def e2m1_codes(q: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, 0..15) of values already on the grid: sign bit 3 (kept for -0), magnitude index."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float64, device=q.device)
    mag = q.abs().double()
    idx = torch.searchsorted(grid, mag.contiguous())
    if bool((idx >= len(E2M1_GRID)).any()) or not torch.equal(grid[idx.clamp(max=len(E2M1_GRID) - 1)], mag):
        raise ValueError("q: expected values on the E2M1 grid {0, 0.5, 1, 1.5, 2, 3, 4, 6} (with signs)")
    sign = torch.signbit(q).to(torch.uint8) * SIGN_BIT
    return idx.to(torch.uint8) | sign


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """The float32 values of E2M1 codes (uint8, 0..15)."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=codes.device)
    c = codes.to(torch.int64)
    mag = grid[c & 0x7]
    return torch.where((c & SIGN_BIT) != 0, -mag, mag)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Two E2M1 codes per byte along the last dim: element ``2i`` in the low nibble, ``2i + 1`` in the high."""
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise ValueError(f"codes: last dim must be even (two codes per byte), got shape {tuple(codes.shape)}")
    if codes.dtype != torch.uint8 or (codes.numel() and int(codes.max()) > 0xF):
        raise ValueError("codes: expected uint8 codes in [0, 15]")
    pairs = codes.unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """The codes ``[..., 2n]`` (uint8) of packed bytes ``[..., n]`` (low nibble first)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed: expected uint8 bytes, got {packed.dtype}")
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def e8m0_values(scales: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``2^(e - 127)`` of E8M0 codes (uint8), NaN for 0xFF, in ``dtype`` (float64 holds every one exactly)."""
    e = scales.to(torch.int32)
    v = torch.ldexp(torch.ones(e.shape, dtype=torch.float64, device=e.device), (e - E8M0_BIAS).double())
    return torch.where(e == E8M0_NAN, torch.full_like(v, float("nan")), v).to(dtype)


@functools.lru_cache(maxsize=None)
def _byte_values(device: torch.device) -> torch.Tensor:
    """``[256, 2]`` float64: the two E2M1 values of every byte, low nibble first."""
    b = torch.arange(256, dtype=torch.uint8)
    return torch.stack((e2m1_values(b & 0xF), e2m1_values(b >> 4)), dim=-1).double().to(device)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Values ``[..., K]`` of packed codes ``[..., K/2]`` and their scales ``[..., K/32]`` (exact in float64)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed: expected uint8 bytes, got {packed.dtype}")
    # one table lookup per byte rather than unpacking the nibbles: the same values, faster (bench/bench_ops.py)
    vals = _byte_values(packed.device)[packed.long()].flatten(-2)
    _check_groups(vals, "packed")
    if tuple(scales.shape) != (*vals.shape[:-1], vals.shape[-1] // GROUP):
        raise ValueError(f"scales: expected shape {[*vals.shape[:-1], vals.shape[-1] // GROUP]}, "
                         f"got {list(scales.shape)}")
    return (vals.unflatten(-1, (-1, GROUP)) * e8m0_values(scales)[..., None]).flatten(-2).to(dtype)


class MxQuant(tuple):
    """``(codes, scales, ratios)`` of :func:`quantize_groups`: unpacked uint8 codes ``[..., K]``, uint8 E8M0
    codes ``[..., K/32]`` and the rounded ratios (float) the codes stand for."""

    __slots__ = ()

    def __new__(cls, codes, scales, ratios):
        return super().__new__(cls, (codes, scales, ratios))

    codes = property(lambda self: self[0])
    scales = property(lambda self: self[1])
    ratios = property(lambda self: self[2])


def working_values(x: torch.Tensor, options: MxOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """What a rule quantizes: ``x`` rounded to bfloat16 (``"kernel"``: the kernel's products are bfloat16 before
    anything else), else ``x`` in float64. Refuses non-finite values."""
    v = x.to(torch.bfloat16) if options.scale_rule == "kernel" else x.double()
    if not bool(torch.isfinite(v).all()):
        raise ValueError("x: expected finite values (an MXFP4 group maximum must be finite)")
    return v


def shared_codes(v: torch.Tensor, options: MxOptions = DEFAULT_OPTIONS, clip: float = 1.0) -> torch.Tensor:
    """E8M0 codes (int32 ``[..., K/32]``) of working values ``v[..., K]`` (:func:`working_values`) under
    ``options.scale_rule``, clamped at 0, 0 for an all-zero group; ``clip`` scales each group maximum first
    (only when ``options.apply_clip``)."""
    _check_groups(v, "v")
    amax = v.unflatten(-1, (-1, GROUP)).abs().amax(dim=-1)
    if options.apply_clip and clip != 1.0:
        amax = (amax.float() * clip).to(amax.dtype)  # assumed: one rounding to the working dtype
    if options.scale_rule == "msmodelslim":
        shared = floor_log2(amax.double() * (8.0 / 7.0)) - 2
    else:  # frexp on the maximum itself (bfloat16 widened exactly to float32; float64 as it is)
        shared = floor_log2(amax.float() if amax.dtype == torch.bfloat16 else amax) - 2
    code = (shared + E8M0_BIAS).clamp(min=0)
    return torch.where(amax == 0, torch.zeros_like(code), code)


def element_ratios(v: torch.Tensor, code: torch.Tensor, options: MxOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """Working values ``v`` divided by ``2^(code - 127)`` (``code`` broadcast against ``v``: the exponent that is
    stored, after the clamp) and rounded to E2M1 under ``options``; same dtype as ``v``."""
    exp = code.to(torch.int32) - E8M0_BIAS
    if options.scale_rule == "kernel":
        # x / 2^e in bfloat16: exact but where it under- or overflows bfloat16
        ratio = (v.float() * torch.ldexp(torch.ones_like(exp, dtype=torch.float32), -exp.float())).to(torch.bfloat16)
    else:
        ratio = torch.ldexp(v, -exp.double())
    return round_e2m1(ratio, half_even=options.scale_rule != "msmodelslim", saturate=options.saturate)


def quantize_groups(x: torch.Tensor, options: MxOptions = DEFAULT_OPTIONS, clip: float = 1.0) -> MxQuant:
    """Quantize ``x[..., K]`` per group of 32 along the last dim under ``options.scale_rule``.

    ``clip`` multiplies each group maximum before the exponent is taken (only when ``options.apply_clip``).
    """
    _check_groups(x, "x")
    v = working_values(x, options)
    code = shared_codes(v, options, clip)
    q = element_ratios(v.unflatten(-1, (-1, GROUP)), code.unsqueeze(-1), options).flatten(-2)
    return MxQuant(e2m1_codes(q), code.to(torch.uint8), q)


def quantize_dequantize(x: torch.Tensor, options: MxOptions = DEFAULT_OPTIONS, clip: float = 1.0) -> torch.Tensor:
    """``x[..., K]`` quantized per 32 (:func:`quantize_groups`) and multiplied back by its scales, in float32:
    what :func:`dequantize` gives of the stored codes and scales (exact, barring float32 overflow)."""
    _check_groups(x, "x")
    v = working_values(x, options)
    code = shared_codes(v, options, clip).unsqueeze(-1)
    q = element_ratios(v.unflatten(-1, (-1, GROUP)), code, options)
    scale = torch.ldexp(torch.ones(code.shape, dtype=torch.float32, device=x.device), (code - E8M0_BIAS).float())
    return (q.float() * scale).flatten(-2)


def quantize_weight_mxfp4(weight: torch.Tensor, scale_rule: str = "kernel",
                          saturate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN MXFP4 weights: ``weight[O, K]`` -> ``(packed uint8 [O, K/2], E8M0 uint8 [O, K/32])`` per 32 along K."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight: expected a float matrix [O, K], got {getattr(weight, 'shape', weight)}")
    mq = quantize_groups(weight.detach(), MxOptions(scale_rule=scale_rule, saturate=saturate))
    return pack_fp4(mq.codes), mq.scales
