"""``flatquant-lab check``: a backend's int4 path (``--scheme w4a4_flatquant``, the default) or int8 path
(``--scheme w8a8_dynamic``) on one random layer (with planted outlier channels) against the reference,
op by op; exit status 1, with the reason printed, when the verdict is false."""
from __future__ import annotations

import argparse
import json

import torch

from .. import ops
from ..files import atomic_write_text
from ..kronecker import NPU_MAX_FACTOR, decompose_dim, npu_supported
from ..layers import W4A4FlatQuantLinear, W8A8DynamicLinear
from ..numerics import DEFAULT_RATIOS, check_linear, check_linear_w8a8, random_problem, sweep_clip_ratio
from ..transforms import orthogonal_factor
from .args import non_negative_int, positive_int

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SCHEMES = ("w4a4_flatquant", "w8a8_dynamic")
# options that only the W4A4 FlatQuant path has (default None, so that giving one with w8a8_dynamic is seen)
_W4A4_ONLY = {"clip_ratio": ("--clip-ratio", 1.0), "transform": ("--transform", "hadamard"),
              "sweep": ("--sweep", False), "ratios": ("--ratios", None)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheme", choices=SCHEMES, default="w4a4_flatquant",
                        help="the layer checked: W4A4 FlatQuant (kronecker_quant, int4 quant_matmul, the packer) "
                             "or W8A8_DYNAMIC (dynamic_quant, int8 quant_matmul)")
    parser.add_argument("--in-features", type=positive_int, default=4096, help="K (divisible by 8 for w4a4_flatquant)")
    parser.add_argument("--out-features", type=positive_int, default=4096, help="O")
    parser.add_argument("--tokens", type=positive_int, default=256, help="number of random tokens")
    parser.add_argument("--clip-ratio", type=float, default=None,
                        help="activation clip ratio in (0, 1] (w4a4_flatquant; default 1)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="activation dtype")
    parser.add_argument("--transform", choices=("hadamard", "random", "identity"), default=None,
                        help="Kronecker factors, w4a4_flatquant (default hadamard; falls back to random orthogonal "
                             "where none exists)")
    parser.add_argument("--outlier-channels", type=non_negative_int, default=8,
                        help="input channels scaled up to plant activation outliers")
    parser.add_argument("--outlier-scale", type=float, default=20.0, help="magnitude factor of those channels")
    parser.add_argument("--bias", action="store_true", help="give the layer a random bias")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None, metavar="NAME",
                        help="the backend under test: auto, npu, reference, or an out-of-tree one as "
                             "'package.module:ATTR' (a module or namespace with the four ops); "
                             "default: $FLATQUANT_BACKEND, else auto")
    parser.add_argument("--sweep", action="store_true", help="also print a clip-ratio sweep (w4a4_flatquant)")
    parser.add_argument("--ratios", type=float, nargs="+", default=None,
                        help=f"clip ratios in (0, 1] for --sweep (default: {' '.join(f'{r:g}' for r in DEFAULT_RATIOS)})")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the report as JSON")


def run(args: argparse.Namespace) -> int:
    if args.scheme == "w8a8_dynamic":
        return _run_w8a8(args)
    for name, (_, default) in _W4A4_ONLY.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    k = args.in_features
    if k % 8:
        raise SystemExit(f"--in-features: expected a multiple of 8 (int4 packing), got {k}")
    try:
        ops.check_clip_ratio(args.clip_ratio)
    except ValueError as exc:
        raise SystemExit(f"--clip-ratio: {exc}") from None
    if args.ratios is not None and not args.sweep:
        raise SystemExit("--ratios: only used by the clip-ratio sweep; add --sweep, or leave --ratios out")
    ratios = list(DEFAULT_RATIOS) if args.ratios is None else args.ratios
    for r in ratios:
        try:
            ops.check_clip_ratio(r)
        except ValueError as exc:
            raise SystemExit(f"--ratios: {exc}") from None
    try:
        ops.resolve_backend(args.backend)  # a misspelt name or a spec that does not import fails before any work
    except ValueError as exc:
        raise SystemExit(f"--backend: {exc}") from None
    dtype = _DTYPES[args.dtype]
    n1, n2 = decompose_dim(k)
    support = npu_supported(n1, n2, cann=max(NPU_MAX_FACTOR, key=NPU_MAX_FACTOR.get))  # most permissive release
    if not support:
        raise SystemExit(f"--in-features: {k} factors as {n1} x {n2} (vllm-ascend's pair), which "
                         f"npu_kronecker_quant cannot take: {support.reason}")
    left = orthogonal_factor(n1, args.transform, seed=args.seed)
    right = orthogonal_factor(n2, args.transform, seed=args.seed + 1)
    lin, x = random_problem(k, args.out_features, args.tokens, args.outlier_channels, args.outlier_scale,
                            bias=args.bias, seed=args.seed)
    x = x.to(dtype)  # the layer's input dtype: the float reference sees the same rounded tokens
    qlin = W4A4FlatQuantLinear.from_float(lin, left, right, clip_ratio=args.clip_ratio, act_dtype=dtype,
                                          backend=args.backend)
    report = check_linear(qlin, x, lin)
    print(f"flatquant-lab check: random layer, {args.tokens} tokens, {args.outlier_channels} outlier "
          f"channel(s) x {args.outlier_scale:g}, transform {args.transform}, seed {args.seed}")
    print(report.table())
    config = {k_: v for k_, v in vars(args).items() if k_ not in ("json",)}
    config["ratios"] = ratios if args.sweep else None
    out = {"config": config, "report": report.to_dict()}
    if args.sweep:
        sweep = sweep_clip_ratio(lin, left, right, x, ratios, act_dtype=dtype, backend=args.backend)
        print("\nclip-ratio sweep (against the float layer):")
        print(sweep.table())
        out["sweep"] = sweep.to_dict()
    return _finish(args, report, out)


def _run_w8a8(args: argparse.Namespace) -> int:
    """``--scheme w8a8_dynamic``: an RTN int8 W8A8DynamicLinear of the random layer, :func:`check_linear_w8a8`."""
    given = [flag for name, (flag, _) in _W4A4_ONLY.items() if getattr(args, name) not in (None, False)]
    if given:
        raise SystemExit(f"{given[0]}: only used with --scheme w4a4_flatquant (W8A8_DYNAMIC has no transform, "
                         "clip ratio or sweep); leave it out")
    try:
        ops.resolve_backend(args.backend)
    except ValueError as exc:
        raise SystemExit(f"--backend: {exc}") from None
    dtype = _DTYPES[args.dtype]
    lin, x = random_problem(args.in_features, args.out_features, args.tokens, args.outlier_channels,
                            args.outlier_scale, bias=args.bias, seed=args.seed)
    x = x.to(dtype)
    qlin = W8A8DynamicLinear.from_float(lin, act_dtype=dtype, backend=args.backend)
    report = check_linear_w8a8(qlin, x, lin)
    print(f"flatquant-lab check: random W8A8_DYNAMIC layer (RTN int8 weights), {args.tokens} tokens, "
          f"{args.outlier_channels} outlier channel(s) x {args.outlier_scale:g}, seed {args.seed}")
    print(report.table())
    config = {k_: v for k_, v in vars(args).items() if k_ not in ("json", *_W4A4_ONLY)}
    return _finish(args, report, {"config": config, "report": report.to_dict()})


def _finish(args: argparse.Namespace, report, out: dict) -> int:
    """Write ``--json``, print the verdict; the exit status: 1 when it failed."""
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    if not report.passed:
        print(f"\nflatquant-lab check: FAILED: backend {report.backend}, part {report.failed_part}: {report.reason}")
        return 1
    print(f"\nflatquant-lab check: passed (backend {report.backend})")
    return 0
