"""``flatquant-lab check``: a backend's int4 path (``--scheme w4a4_flatquant``, the default), int8 path
(``--scheme w8a8_dynamic``) or MXFP4 path (``--scheme w4a4_mxfp4_flatquant``) on one random layer (with planted outlier channels) against the reference,
op by op; or, with ``--quantized DIR --layer NAME``, one layer of a saved checkpoint on the inputs it receives
from calibration text (the scheme is the layer's own). Exit status 1, with the reason printed, when the verdict
is false."""
from __future__ import annotations

import argparse
import json

import torch

from .. import ops
from ..files import atomic_write_text
from ..kronecker import NPU_MAX_FACTOR, decompose_dim, npu_supported
from ..layers import W4A4FlatQuantLinear, W4A4MXFP4FlatQuantLinear, W8A8DynamicLinear
from ..layers.w4a4_mxfp4_flatquant import mx_factors
from ..mxfp4 import GROUP as MX_GROUP
from ..numerics import (DEFAULT_RATIOS, check_linear, check_linear_mxfp4, check_linear_w8a8, random_problem,
                        sweep_clip_ratio)
from ..transforms import orthogonal_factor
from .args import non_negative_int, positive_int

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SCHEMES = ("w4a4_flatquant", "w8a8_dynamic", "w4a4_mxfp4_flatquant")
# options that only the W4A4 FlatQuant path has (default None, so that giving one with w8a8_dynamic is seen)
_W4A4_ONLY = {"clip_ratio": ("--clip-ratio", 1.0), "transform": ("--transform", "hadamard"),
              "sweep": ("--sweep", False), "ratios": ("--ratios", None)}
# options of the random layer (default None, so that giving one with --quantized is seen)
_RANDOM_ONLY = {"scheme": ("--scheme", "w4a4_flatquant"), "in_features": ("--in-features", 4096),
                "out_features": ("--out-features", 4096), "tokens": ("--tokens", 256), "dtype": ("--dtype", "bf16"),
                "transform": ("--transform", None), "outlier_channels": ("--outlier-channels", 8),
                "outlier_scale": ("--outlier-scale", 20.0), "bias": ("--bias", False)}
# options of a checkpoint's layer (--quantized)
_CHECKPOINT_ONLY = {"layer": ("--layer", None), "calib_data": ("--calib-data", None), "windows": ("--windows", 4),
                    "seqlen": ("--seqlen", 128)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheme", choices=SCHEMES, default=None,
                        help="the random layer checked: W4A4 FlatQuant (kronecker_quant, int4 quant_matmul, the packer), "
                             "W8A8_DYNAMIC (dynamic_quant, int8 quant_matmul) or W4A4_MXFP4_FLATQUANT (the FP4 "
                             "kronecker_quant and quant_matmul, RTN weights under the kernel's scale rule); default "
                             "w4a4_flatquant (with --quantized: the layer's own)")
    parser.add_argument("--in-features", type=positive_int, default=None,
                        help="K (divisible by 8 for w4a4_flatquant, by 32 for w4a4_mxfp4_flatquant); default 4096")
    parser.add_argument("--out-features", type=positive_int, default=None, help="O; default 4096")
    parser.add_argument("--tokens", type=positive_int, default=None, help="number of random tokens; default 256")
    parser.add_argument("--clip-ratio", type=float, default=None,
                        help="activation clip ratio in (0, 1] (w4a4_flatquant; default 1, with --quantized the "
                             "layer's own)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="activation dtype of the random layer; default bf16")
    parser.add_argument("--transform", choices=("hadamard", "random", "identity"), default=None,
                        help="Kronecker factors, w4a4_flatquant (default hadamard; falls back to random orthogonal "
                             "where none exists)")
    parser.add_argument("--outlier-channels", type=non_negative_int, default=None,
                        help="input channels scaled up to plant activation outliers; default 8")
    parser.add_argument("--outlier-scale", type=float, default=None, help="magnitude factor of those channels; "
                        "default 20")
    parser.add_argument("--bias", action="store_true", default=None, help="give the random layer a random bias")
    parser.add_argument("--seed", type=int, default=0,
                        help="the random layer's seed, or where the calibration windows start (--quantized)")
    parser.add_argument("--backend", default=None, metavar="NAME",
                        help="the backend under test: auto, npu, reference, or an out-of-tree one as "
                             "'package.module:ATTR' (a module or namespace with the four ops); "
                             "default: $FLATQUANT_BACKEND, else auto")
    parser.add_argument("--sweep", action="store_true", help="also print a clip-ratio sweep (w4a4_flatquant)")
    parser.add_argument("--ratios", type=float, nargs="+", default=None,
                        help=f"clip ratios in (0, 1] for --sweep (default: {' '.join(f'{r:g}' for r in DEFAULT_RATIOS)})")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the report as JSON")
    ckpt = parser.add_argument_group(
        "a layer of a saved checkpoint",
        "check one layer of a checkpoint (save_quantized, flatquant-lab quantize, msModelSlim's export) on the "
        "inputs it receives while the checkpoint reads calibration text; the full-precision reference is the "
        "layer's own dequantized weights in the input basis (float64)")
    ckpt.add_argument("--quantized", metavar="DIR", default=None,
                      help="the checkpoint folder (with its tokenizer); needs --layer")
    ckpt.add_argument("--layer", metavar="NAME", default=None,
                      help="the quantized linear to check, by module name, e.g. model.layers.0.self_attn.q_proj; "
                           "a W8A8_DYNAMIC layer gets the int8 check")
    ckpt.add_argument("--calib-data", metavar="FILE", default=None,
                      help="text whose tokens feed the checkpoint (.jsonl with a \"text\" field, or a plain text "
                           "file); default: the bundled calibration split")
    ckpt.add_argument("--windows", type=positive_int, default=None,
                      help="calibration windows (at seeded random offsets of the text); default 4")
    ckpt.add_argument("--seqlen", type=positive_int, default=None, help="tokens per window; default 128")


def run(args: argparse.Namespace) -> int:
    if args.quantized is not None:
        return _run_checkpoint(args)
    given = [flag for name, (flag, _) in _CHECKPOINT_ONLY.items() if getattr(args, name) is not None]
    if given:
        raise SystemExit(f"{given[0]}: only used with --quantized DIR (a layer of a saved checkpoint); add "
                         "--quantized, or leave it out")
    for name, (_, default) in _RANDOM_ONLY.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.scheme == "w8a8_dynamic":
        return _run_w8a8(args)
    if args.scheme == "w4a4_mxfp4_flatquant":
        return _run_mxfp4(args)
    for name, (_, default) in _W4A4_ONLY.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    k = args.in_features
    if k % 8:
        raise SystemExit(f"--in-features: expected a multiple of 8 (int4 packing), got {k}")
    ratios = _check_w4a4_options(args)
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
    config = {k_: v for k_, v in vars(args).items() if k_ not in ("json", "quantized", *_CHECKPOINT_ONLY)}
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
    _check_backend(args)
    dtype = _DTYPES[args.dtype]
    lin, x = random_problem(args.in_features, args.out_features, args.tokens, args.outlier_channels,
                            args.outlier_scale, bias=args.bias, seed=args.seed)
    x = x.to(dtype)
    qlin = W8A8DynamicLinear.from_float(lin, act_dtype=dtype, backend=args.backend)
    report = check_linear_w8a8(qlin, x, lin)
    print(f"flatquant-lab check: random W8A8_DYNAMIC layer (RTN int8 weights), {args.tokens} tokens, "
          f"{args.outlier_channels} outlier channel(s) x {args.outlier_scale:g}, seed {args.seed}")
    print(report.table())
    config = {k_: v for k_, v in vars(args).items() if k_ not in ("json", "quantized", *_W4A4_ONLY, *_CHECKPOINT_ONLY)}
    return _finish(args, report, {"config": config, "report": report.to_dict()})


def _run_mxfp4(args: argparse.Namespace) -> int:
    """``--scheme w4a4_mxfp4_flatquant``: a W4A4MXFP4FlatQuantLinear of the random layer (column-parallel factors,
    MXFP4 RTN weights), :func:`check_linear_mxfp4` with the documented defaults of the assumed points."""
    given = [flag for name, (flag, _) in _W4A4_ONLY.items() if name != "transform" and getattr(args, name) not in
             (None, False)]
    if given:
        raise SystemExit(f"{given[0]}: not used with --scheme w4a4_mxfp4_flatquant (whether a clip ratio acts on the "
                         "FP4 path is an assumed point, off by default: docs/mxfp4.md); leave it out")
    args.transform = args.transform or "hadamard"
    _check_backend(args)
    k = args.in_features
    if k % MX_GROUP:
        raise SystemExit(f"--in-features: expected a multiple of {MX_GROUP} (one E8M0 scale per {MX_GROUP}), got {k}")
    n1, n2 = mx_factors(k, row_parallel=False)
    if n2 % 2:
        raise SystemExit(f"--in-features: {k} factors as {n1} x {n2}; right_trans must be even (two FP4 codes a byte)")
    dtype = _DTYPES[args.dtype]
    left = orthogonal_factor(n1, args.transform, seed=args.seed)
    right = orthogonal_factor(n2, args.transform, seed=args.seed + 1)
    lin, x = random_problem(k, args.out_features, args.tokens, args.outlier_channels, args.outlier_scale,
                            bias=args.bias, seed=args.seed)
    x = x.to(dtype)
    qlin = W4A4MXFP4FlatQuantLinear.from_float(lin, left, right, act_dtype=dtype, backend=args.backend)
    report = check_linear_mxfp4(qlin, x, lin)
    print(f"flatquant-lab check: random W4A4_MXFP4_FLATQUANT layer (MXFP4 RTN weights), {args.tokens} tokens, "
          f"{args.outlier_channels} outlier channel(s) x {args.outlier_scale:g}, transform {args.transform}, "
          f"seed {args.seed}")
    print(report.table())
    config = {k_: v for k_, v in vars(args).items()
              if k_ not in ("json", "quantized", "clip_ratio", "sweep", "ratios", *_CHECKPOINT_ONLY)}
    return _finish(args, report, {"config": config, "report": report.to_dict()})


def _check_w4a4_options(args: argparse.Namespace) -> list[float]:
    """Check ``--clip-ratio`` (when given), ``--ratios`` (only with ``--sweep``) and ``--backend`` before any work;
    the sweep's ratios."""
    if args.clip_ratio is not None:
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
    _check_backend(args)
    return ratios


def _check_backend(args: argparse.Namespace) -> None:
    try:
        ops.resolve_backend(args.backend)  # a misspelt name or a spec that does not import fails before any work
    except ValueError as exc:
        raise SystemExit(f"--backend: {exc}") from None


def _run_checkpoint(args: argparse.Namespace) -> int:
    """``--quantized DIR --layer NAME``: that layer, rebuilt from its checkpoint tensors on ``--backend``, checked
    on the inputs it receives while the checkpoint reads ``--windows`` windows of calibration text, against
    :func:`~flatquant_lab.numerics.dequantized_reference` (its own weights, full precision)."""
    from ..data import bundled_data_path, calibration_ids
    from ..hub import load_tokenizer
    from ..io import load_quantized
    from ..models import quantized_linear_names
    from ..numerics import capture_inputs, check_layer, dequantized_reference, sweep_layer_clip_ratio
    from ..schemes import scheme_of

    given = [flag for name, (flag, _) in _RANDOM_ONLY.items() if getattr(args, name) is not None]
    if given:
        raise SystemExit(f"{given[0]}: not used with --quantized (the layer, its sizes, dtype and scheme come from "
                         "the checkpoint; its inputs from the calibration text); leave it out")
    if args.layer is None:
        raise SystemExit("--layer: expected the name of a quantized linear of the --quantized checkpoint, e.g. "
                         "model.layers.0.self_attn.q_proj")
    for name, (_, default) in _CHECKPOINT_ONLY.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    ratios = _check_w4a4_options(args)
    try:
        tok = load_tokenizer(args.quantized)  # cheap, and a folder without one fails before the weights load
    except FileNotFoundError as exc:
        raise SystemExit(f"--quantized: {str(exc).removeprefix('name_or_dir: ')}") from None
    try:
        # "auto" on the CPU: the reference ops, whatever $FLATQUANT_BACKEND names (that backend is the one under
        # test, and only the layer checked runs on it)
        model = load_quantized(args.quantized, backend="auto")
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--quantized: {exc}") from None
    names = quantized_linear_names(model)
    if args.layer not in names:
        shown = names[:6] + (["...", names[-1]] if len(names) > 7 else names[6:])
        what = ("is a float layer there (no quantized path to check)" if args.layer in dict(model.named_modules())
                else "is no layer there")
        raise SystemExit(f"--layer: {args.layer!r} {what}; the quantized linears of {args.quantized} are "
                         f"{', '.join(shown)} ({len(names)} in all)")
    layer = model.get_submodule(args.layer)
    scheme = scheme_of(layer)
    if not scheme.has_clip_ratio:
        extra = [flag for name, (flag, _) in _W4A4_ONLY.items() if getattr(args, name) not in (None, False)]
        if extra:
            raise SystemExit(f"{extra[0]}: {args.layer} is a {scheme.quant_type} layer (no transform, clip ratio or "
                             "sweep); leave it out")
    source = args.calib_data or bundled_data_path("calib")
    try:
        ids = calibration_ids(source, tok, args.windows, args.seqlen, seed=args.seed)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--calib-data: {exc}") from None
    x = capture_inputs(model, args.layer, ids)
    tensors = scheme.tensors_of(layer)
    try:
        # rebuilt from its own tensors, on the backend under test
        qlin = scheme.build(tensors, backend=args.backend, act_dtype=scheme.act_dtype_of(layer),
                            tp_size=scheme.tp_size_of(layer), **{n: getattr(layer, n) for n in scheme.fields})
        if scheme.has_clip_ratio and args.clip_ratio is not None:
            qlin.set_clip_ratio(args.clip_ratio)
        reference = dequantized_reference(qlin)
        report = check_layer(qlin, x, reference)
    except ValueError as exc:
        raise SystemExit(f"--layer: {args.layer}: {exc}") from None
    print(f"flatquant-lab check: {args.layer} ({scheme.quant_type}) of {args.quantized}, on {x.shape[0]} tokens it "
          f"receives from {args.windows} window(s) of {args.seqlen} tokens of {source} (seed {args.seed}); "
          "\"float layer\" below: its own dequantized weights in the input basis, float64")
    print(report.table())
    config = {k_: v for k_, v in vars(args).items() if k_ not in ("json", *_RANDOM_ONLY)}
    config.update(calib_data=str(source), scheme=scheme.recipe_name,
                  clip_ratio=float(qlin.clip_ratio) if scheme.has_clip_ratio else None,
                  ratios=ratios if args.sweep else None)
    out = {"config": config, "report": report.to_dict()}
    if args.sweep:
        sweep = sweep_layer_clip_ratio(qlin, x, ratios)
        print("\nclip-ratio sweep (against the layer with unquantized activations):")
        print(sweep.table())
        out["sweep"] = sweep.to_dict()
    return _finish(args, report, out)


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
