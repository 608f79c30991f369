"""``flatquant-lab serve-check DIR --tp N [--tp M ...]``: would vLLM load this checkpoint at TP N, and do
its quantized linears, run rank by rank, match ``load_quantized``? (docs/tensor-parallel.md.)"""
from __future__ import annotations

from pathlib import Path


def _tp(text: str) -> int:
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {v}")
    return v


def add_arguments(p) -> None:
    p.add_argument("dir", type=Path, help="a checkpoint directory (ours or msModelSlim's)")
    p.add_argument("--tp", type=_tp, action="append",
                   help="tensor-parallel size to check (repeatable; default: 1 2 4); the exit code is 1 when one "
                        "of them does not load")
    p.add_argument("--tokens", type=_tp, default=16, help="random tokens per linear for the rank-by-rank check")
    p.add_argument("--cann", default="8.3", choices=("8.1", "8.2", "8.3", "8.5"),
                   help="CANN release whose npu_kronecker_quant limits decide what runs")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args) -> int:
    from ..io.serving import results_json, serve_check

    if not args.dir.is_dir():
        raise SystemExit(f"DIR: {args.dir} is not a directory (expected a checkpoint folder)")
    results = serve_check(args.dir, tuple(args.tp or (1, 2, 4)), tokens=args.tokens, cann=args.cann)
    print(results_json(results) if args.json else "\n".join(r.line() for r in results))
    return 0 if all(r.loads for r in results) else 1
