"""What a C8 KV cache costs the bundled model in token perplexity, with max scales and with searched clips.

    .venv/bin/python bench/bench_kv_cache.py [--threads 1] [--windows 20] [--docs 1 2 3] [--out kv.json]

The float model (smollm2-135m as the demo loads it, float32) is evaluated without a quantized cache, then with
C8 scales calibrated by ``calibrate_kv_cache`` on the bundled calibration text (seed 0) in several ways, each
with ``use_kv_cache_attention`` on (every forward reads K and V through the int8 cache, as decode does):

* ``max``: per-channel ``max|x| / 127`` (msModelSlim's rule) on 32 windows of 128 tokens (the fast profile's);
* ``search-head``, ``search-channel``: the clip searched per kv head (V per channel) on the same windows;
* ``max-512``, ``search-head-512``: on 16 windows of 512 tokens (the search on the first 4 of them).

Two evaluations per row: token perplexity over the first ``--windows`` non-overlapping 512-token windows of the
bundled evaluation set (``eval.perplexity.token_perplexity``, the issue's windowing) and lm-eval's rolling
log-likelihood over the documents ``--docs`` (``demo.evaluate_model``, as the demo's table computes it).
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--docs", type=int, nargs="*", default=[1, 2, 3])
    p.add_argument("--rows", nargs="*", default=["none", "max", "search-head", "search-channel", "max-512",
                                                    "search-head-512"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from flatquant_lab.calibrate.kv_cache import calibrate_kv_cache
    from flatquant_lab.data import bundled_data_path, calibration_ids
    from flatquant_lab.demo import evaluate_model
    from flatquant_lab.eval.perplexity import token_perplexity
    from flatquant_lab.hub import load_model
    from flatquant_lab.models import detach_kv_cache, plain_attention, use_kv_cache_attention

    model, tok = load_model("smollm2-135m")
    settings = {"max": ("max", "head", 32, 128, 32), "search-head": ("search", "head", 32, 128, 32),
                "search-channel": ("search", "channel", 32, 128, 32), "max-512": ("max", "head", 16, 512, 4),
                "search-head-512": ("search", "head", 16, 512, 4)}
    results = {}
    for row in args.rows:
        plain_attention(detach_kv_cache(model))
        calib = None
        if row != "none":
            clip, granularity, n, seqlen, search = settings[row]
            ids = calibration_ids(bundled_data_path("calib"), tok, n, seqlen, seed=0)
            report = calibrate_kv_cache(model, ids, clip=clip, granularity=granularity, search_windows=search)
            use_kv_cache_attention(model)
            err = [(r["rel_error_max"], r["rel_error"]) for r in report["layers"]]
            calib = {"seconds": report["seconds"], "mean_rel_error_max": sum(e[0] for e in err) / len(err),
                     "mean_rel_error": sum(e[1] for e in err) / len(err),
                     "k_clips": [r["k_clip"] for r in report["layers"]],
                     "v_clips": [r["v_clip"] for r in report["layers"]]}
        t0 = time.perf_counter()
        ppl = token_perplexity(model, tok, window=512, max_windows=args.windows)
        t1 = time.perf_counter()
        docs = evaluate_model(model, tok, docs=args.docs)
        results[row] = {"token_ppl_windows": ppl, "windows_seconds": t1 - t0,
                        "docs_token_ppl": docs["token_perplexity"], "docs_tokens": docs["eval_tokens"],
                        "calibration": calib}
        base = results.get("none")
        rel = (lambda a, b: f"{100 * (a / b - 1):+.3f}%") if base else (lambda a, b: "")
        print(f"{row:16} windows PPL {ppl:.4f} {rel(ppl, base['token_ppl_windows']) if base else ''}  "
              f"docs PPL {docs['token_perplexity']:.4f} "
              f"{rel(docs['token_perplexity'], base['docs_token_ppl']) if base else ''}  "
              + (f"attn err {calib['mean_rel_error_max']:.3g} -> {calib['mean_rel_error']:.3g}, "
                 f"calib {calib['seconds']:.0f} s" if calib else ""), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
