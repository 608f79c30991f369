"""Benchmarks of the reference ops, measured side by side in one run and reported as ratios.

    .venv/bin/python bench/bench_ops.py [--repeats N] [--tokens T]

Targets: vectorized pack_int4 >= 10x the per-nibble loop; the reference W4A4 forward <= 1.5x an
fp32 nn.Linear; the Kronecker transform <= 10% of the fp32 GEMM; MXFP4 dequantization by byte table >= 2x the
nibble-by-nibble definition (the reference FP4 matmul dequantizes its weight on every call). Each pair is timed
interleaved (A, B, A, B, ...) with time.perf_counter and compared by medians, so load shared by both cancels.
Exit status 1 when any target is missed (so ``make bench`` fails), else 0.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from flatquant_lab import mxfp4, ops  # noqa: E402
from flatquant_lab.kronecker import kron_apply  # noqa: E402
from flatquant_lab.layers import W4A4FlatQuantLinear  # noqa: E402
from flatquant_lab.packing import pack_int4  # noqa: E402
from flatquant_lab.transforms import orthogonal_factor  # noqa: E402
from baselines import dense_kron, mx_dequantize_by_nibbles, pack_int4_loop  # noqa: E402  (slow references)

torch.set_num_threads(2)


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds per callable, timing them in turn ``repeats`` times after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def ms(s: float) -> str:
    return f"{s * 1e3:9.2f} ms"


def bench_pack(repeats: int, loop_rows: int) -> bool:
    out_f, in_f = 4096, 11008
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-8, 8, (out_f, in_f), generator=g, dtype=torch.int8)
    rows = w[:loop_rows]
    assert torch.equal(pack_int4_loop(rows), pack_int4(rows)), "pack_int4 disagrees with the loop"
    t = interleaved({"vec": lambda: pack_int4(w), "loop": lambda: pack_int4_loop(rows)}, repeats)
    loop_full = t["loop"] / loop_rows * out_f
    ratio = loop_full / t["vec"]
    print(f"[pack] int4 weight {out_f} x {in_f} -> int32 {out_f} x {in_f // 8}")
    print(f"  pack_int4 (vectorized, full weight)        {ms(t['vec'])}")
    print(f"  pack_int4_loop (timed on {loop_rows} rows, x {out_f / loop_rows:g}) {ms(loop_full)}"
          f"   ({ms(t['loop'])} for the {loop_rows} rows)")
    ok = ratio >= 10
    print(f"  speed-up: {ratio:8.1f}x   target >= 10x   {verdict(ok)}")
    return ok


def bench_linear(repeats: int, tokens: int) -> tuple[bool, bool]:
    k = o = 4096
    n1 = n2 = 64
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(k, o, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(o, k, generator=g) / k**0.5)
    left, right = orthogonal_factor(n1, "hadamard"), orthogonal_factor(n2, "hadamard")
    qlin = W4A4FlatQuantLinear.from_float(lin, left, right, act_dtype=torch.bfloat16, backend="reference")
    x = torch.randn(tokens, k, generator=g)
    xb = x.bfloat16()
    lf, rf = left.float(), right.float()
    dense = dense_kron(lf, rf)  # [K, K] fp32
    assert torch.allclose(kron_apply(x[:4], lf, rf), x[:4] @ dense, atol=1e-4)

    # pieces of the W4A4 forward, for the breakdown
    p1, p2, c = qlin.p1, qlin.p2, float(qlin.clip_ratio.item())
    xq, s_tok = ops.kronecker_quant(xb.view(-1, n1, n2), p1, p2, clip_ratio=c, backend="reference")
    w_t, w_s = qlin.weight_packed.t(), qlin.weight_scale.view(-1)

    with torch.no_grad():
        t = interleaved({
            "fp32": lambda: lin(x),
            "w4a4": lambda: qlin(xb),
            "kq": lambda: ops.kronecker_quant(xb.view(-1, n1, n2), p1, p2, clip_ratio=c, backend="reference"),
            "qmm": lambda: ops.quant_matmul(xq.view(tokens, k // 8), w_t, w_s, pertoken_scale=s_tok,
                                            output_dtype=torch.bfloat16, backend="reference"),
            "kron": lambda: kron_apply(x, lf, rf),
            "dense": lambda: x @ dense,
        }, repeats)
    gemm = t["fp32"]
    print(f"\n[linear] {o} x {k}, {tokens} tokens; W4A4 reference ops in bf16, fold with 64 x 64 Hadamard factors")
    print(f"  nn.Linear fp32                              {ms(gemm)}   1.00x")
    print(f"  W4A4FlatQuantLinear forward (reference)     {ms(t['w4a4'])}   {t['w4a4'] / gemm:.2f}x")
    print(f"    of which kronecker_quant                  {ms(t['kq'])}   {t['kq'] / gemm:.2f}x")
    print(f"    of which quant_matmul                     {ms(t['qmm'])}   {t['qmm'] / gemm:.2f}x")
    ok_lin = t["w4a4"] / gemm <= 1.5
    print(f"  W4A4 / fp32: {t['w4a4'] / gemm:.3f}x   target <= 1.5x   {verdict(ok_lin)}")
    print(f"\n[transform] fp32, {tokens} tokens x {k}")
    print(f"  kron_apply (64 x 64 factors)                {ms(t['kron'])}")
    print(f"  dense x @ kron(L, R) ({k} x {k})          {ms(t['dense'])}   kron is {t['kron'] / t['dense']:.3f}x of it")
    ok_kron = t["kron"] / gemm <= 0.10
    print(f"  kron_apply / fp32 GEMM: {t['kron'] / gemm:.3f}x   target <= 0.10x   {verdict(ok_kron)}")
    return ok_lin, ok_kron


def bench_mx_dequantize(repeats: int) -> bool:
    out_f, in_f = 4096, 11008
    g = torch.Generator().manual_seed(2)
    packed, scales = mxfp4.quantize_weight_mxfp4(torch.randn(out_f, in_f, generator=g))
    assert torch.equal(mxfp4.dequantize(packed, scales), mx_dequantize_by_nibbles(packed, scales)), \
        "mxfp4.dequantize disagrees with the definition"
    t = interleaved({"table": lambda: mxfp4.dequantize(packed, scales),
                     "nibbles": lambda: mx_dequantize_by_nibbles(packed, scales)}, repeats)
    ratio = t["nibbles"] / t["table"]
    print(f"\n[mxfp4] dequantize an FP4 weight {out_f} x {in_f} to float64")
    print(f"  mxfp4.dequantize (byte table)               {ms(t['table'])}")
    print(f"  nibble by nibble (the definition)           {ms(t['nibbles'])}")
    ok = ratio >= 2
    print(f"  speed-up: {ratio:8.2f}x   target >= 2x   {verdict(ok)}")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--loop-rows", type=int, default=8, help="rows of the weight the slow loop packs")
    args = p.parse_args(argv)
    print(f"bench_ops: torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, median of {args.repeats} interleaved runs")
    if hasattr(os, "getloadavg"):
        # other processes on a small machine delay every parallel region: the ratios move with load
        print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} cpus")
    ok_pack = bench_pack(args.repeats, args.loop_rows)
    ok_lin, ok_kron = bench_linear(args.repeats, args.tokens)
    ok_mx = bench_mx_dequantize(args.repeats)
    if hasattr(os, "getloadavg"):
        print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"summary: pack {verdict(ok_pack)}, W4A4 forward {verdict(ok_lin)}, Kronecker transform {verdict(ok_kron)}, "
          f"MXFP4 dequantize {verdict(ok_mx)}")
    return 0 if all((ok_pack, ok_lin, ok_kron, ok_mx)) else 1


if __name__ == "__main__":
    sys.exit(main())
