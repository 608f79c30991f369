"""``flatquant-lab demo``: the main job (FP vs W4A16 RTN vs W4A4 RTN / Hadamard / FlatQuant)."""
from __future__ import annotations

from pathlib import Path

from ..demo import ALL_METHODS, DEMO_PROFILES, format_table, run_demo
from .args import device_arg, non_negative_int, positive_int


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model alias or local Hugging Face directory, loaded in its "
                   "own dtype (config.json; the bundled smollm2-135m GGUF: float32)")
    p.add_argument("--profile", default="fast", choices=DEMO_PROFILES,
                   help="FlatQuant calibration budget: fast (minutes) or full (12x the training tokens)")
    p.add_argument("--out", default="results", help="where demo.json, demo.png and the export go")
    p.add_argument("--methods", nargs="+", default=None, choices=ALL_METHODS,
                   help="default: all but the MXFP4 rows (mxfp4_rtn, mxfp4_hadamard, flatquant_mxfp4) and the KV4 "
                        "rows (flatquant_kv4, flatquant_kv4_notrans) for --profile fast; without the two serving rows "
                        "for full")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="evaluate on the first N documents only (default: all)")
    p.add_argument("--docs", type=non_negative_int, nargs="+", default=None,
                   help="evaluate on these documents only (lm-eval sample indices; not with --limit)")
    p.add_argument("--num-layers", type=positive_int, default=None,
                   help="truncate the model to its first N layers (smoke runs; default: all)")
    p.add_argument("--samples", type=positive_int, default=None, help="calibration samples (default: the --profile's)")
    p.add_argument("--seqlen", type=positive_int, default=None, help="calibration seqlen (default: the --profile's)")
    p.add_argument("--epochs", type=non_negative_int, default=None,
                   help="training epochs per layer (default: the --profile's)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="lm-eval batch size")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and of training")
    p.add_argument("--device", type=device_arg, default=None,
                   help="where each decoder layer is calibrated: cpu, cuda, cuda:N, npu, npu:N (default: cpu)")


def run(args) -> int:
    summary = run_demo(args.model, args.profile, args.out, args.methods, args.limit, args.num_layers,
                       args.batch_size, args.seed, args.samples, args.epochs, args.seqlen,
                       device=args.device, docs=args.docs)
    print()
    print(format_table(summary))
    print(f"\nwrote {Path(args.out) / 'demo.json'} and {Path(args.out) / 'demo.png'} "
          f"({summary['total_seconds'] / 60:.1f} min)")
    return 0
