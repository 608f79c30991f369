"""Which of the official FlatQuant loop's choices help our calibration: layer loss and perplexity per change.

    .venv/bin/python bench/bench_ablation.py layers [--configs a,b] [--num-layers 4]
    .venv/bin/python bench/bench_ablation.py ppl --configs a,b [--weight-quantizer gptq]
    .venv/bin/python bench/bench_ablation.py table

Model: the bundled SmolLM2-135M (``hub.load_model``); data: the demo's calibration windows
(``data.calibration_ids`` on the bundled calib split, seed 0) at the ``fast`` profile (32 x 128 tokens,
2 epochs, lr 5e-3, batch 4), or with ``--profile full`` the full one as it was before 07d465e (64 x 256,
pinned by ``FULL_BEFORE``; 4 epochs at batch 2 from 18d1f0d on, 6 at batch 4 before; the profile itself was
128 x 256 at 2 epochs from 07d465e, row ``defaults_bs2_rel_s128_e2``, and 96 x 256 from 61acbb9; rows in
``ablation_full.json``).
One config per child of the loop below, one after the other, 1 thread (``--threads``).

* ``layers``: the model cut to its first ``--num-layers`` decoder layers (``load_model(num_layers=N)``;
  calibration is layer by layer on full-precision inputs, so layers 0..N-1 learn exactly what they learn in
  the whole model), RTN weights. Per layer the *final layer loss*: ``fake_quant_mse`` of the report, the
  mean MSE between the full-precision layer output and the fake-quant layer built from the learned tensors,
  over all calibration samples, after training (the same measure for every config).
* ``ppl``: the whole model calibrated (weights as ``--weight-quantizer``, the demo uses GPTQ) and its token
  perplexity on the bundled evaluation set (``demo.evaluate_model``); ``fp`` evaluates the float model.
* ``table``: prints what ``results/ablation/ablation.json`` holds.

Configs (``CONFIGS``, each a change to ``BEFORE``): ``today`` is the loop before issue 13; ``svd``, ``loss_norm``, ``wd``, ``fixed`` each
change one thing; ``official_loop`` changes all four; ``*_e6`` train 6 epochs (48 steps, not 16) on the
same data, to see whether a choice pays off with more steps; ``name@seed<N>`` runs with seed N (with the
Hadamard start the seed only orders the batches: the spread of ``today@seed*`` is the noise floor). ``ostart_*`` are the same loops started from the
official code's initial point (random orthogonal factors, both clip factors at logit 4.0, i.e. sigmoid
0.982, instead of Hadamard factors and searched clip ratios); ``*_start`` runs no training (epochs=0).
``norm_*`` (issue 13's quality targets) change budget and starting-point knobs on top of ``loss_norm``: ``bs2``
batch 2, ``alpha<a>`` smooth_alpha, ``qin`` train_inputs="quantized"; ``defaults`` are the defaults of
30aa942 (the MSE layer loss), ``defaults_rel`` today's (``layer_loss="relative"``); ``BEFORE`` pins the
pre-issue-13 values (no end-to-end stage: ``e2e_epochs=0``), so old rows keep their meaning; ``*_e2e*`` rows
run the end-to-end stage (the profile's budget, or the change their name says). The stage's settings are not
in the work dir's fingerprint, so ``--work-dir`` lets e2e variants share one layer-wise run. ``ppl`` rows carry a ``machine`` field (the CPU's model
name; rows from before 136440d had it added by hand, or lack it): compare rows of one machine only (the same run
gave 28.121 and 28.851 at the full profile on two machines). ``--tag T`` keys a row ``name/wq#T``, so a rerun on
another machine keeps the earlier row. Every run merges its rows into the JSON as it is when the row is written
(atomic write), so runs can be made one at a time or side by side. ``ostart_*`` rows measured at 136440d are in
``ablation_ostart_layers.json`` (``layers --out``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flatquant_lab.files import atomic_write_text  # noqa: E402
from flatquant_lab.recipe import QuantConfig  # noqa: E402
from provenance import cpu_model  # noqa: E402  (trained transforms follow the CPU: rows compare within one)

OUT = os.path.join("results", "ablation", "ablation.json")
OUT_FULL = os.path.join("results", "ablation", "ablation_full.json")
MODEL = "smollm2-135m"
PROFILE = "fast"
OFFICIAL_LOOP = dict(factor_param="svd", loss_norm=True, weight_decay=0.01, batch_order="fixed")
OFFICIAL_START = dict(transform_init="random", act_clip_init=4.0, weight_clip_init=4.0)
# The defaults of 30aa942 (issue 13) as changes to BEFORE (batch_size None: the profile's); the defaults_* rows
# build on them.
ISSUE13_DEFAULTS = dict(loss_norm=True, batch_size=None, smooth_alpha=0.5, train_inputs="quantized")
CONFIGS = {
    "today_start": dict(epochs=0),
    "today": {},
    "svd": dict(factor_param="svd"),
    "loss_norm": dict(loss_norm=True),
    "wd": dict(weight_decay=0.01),
    "fixed": dict(batch_order="fixed"),
    "official_loop": OFFICIAL_LOOP,
    "norm_fixed": dict(loss_norm=True, batch_order="fixed"),
    "today_e6": dict(epochs=6),
    "svd_e6": dict(factor_param="svd", epochs=6),
    "norm_fixed_e6": dict(loss_norm=True, batch_order="fixed", epochs=6),
    # not loop choices of the issue, budget knobs of the profile: does the fast profile lack steps?
    "lr1e-2": dict(lr=1e-2),
    "lr2e-2": dict(lr=2e-2),
    "bs2": dict(batch_size=2),
    "norm_bs2": dict(loss_norm=True, batch_size=2),
    # not a loop choice of the official code: train each layer on the quantized model's hidden states
    "norm_qin": dict(loss_norm=True, train_inputs="quantized"),
    # issue 13's quality targets: budget and init knobs on top of loss_norm (the default loop)
    "norm_lr1e-2": dict(loss_norm=True, lr=1e-2),
    "norm_e4": dict(loss_norm=True, epochs=4),
    "norm_minlr0.1": dict(loss_norm=True, min_lr_ratio=0.1),
    "norm_clipmult1": dict(loss_norm=True, clip_lr_mult=1.0),
    "norm_alpha0.5": dict(loss_norm=True, smooth_alpha=0.5),
    "norm_nowclip": dict(loss_norm=True, learn_weight_clip=False),
    "norm_bs2_lr1e-2": dict(loss_norm=True, batch_size=2, lr=1e-2),
    "norm_bs2_e4": dict(loss_norm=True, batch_size=2, epochs=4),
    "norm_bs2_alpha0.5": dict(loss_norm=True, batch_size=2, smooth_alpha=0.5),
    "norm_bs2_lr1e-2_alpha0.5": dict(loss_norm=True, batch_size=2, lr=1e-2, smooth_alpha=0.5),
    "norm_bs2_lr1e-2_alpha0.7": dict(loss_norm=True, batch_size=2, lr=1e-2, smooth_alpha=0.7),
    "norm_bs2_alpha0.6": dict(loss_norm=True, batch_size=2, smooth_alpha=0.6),
    "norm_bs2_alpha0.7": dict(loss_norm=True, batch_size=2, smooth_alpha=0.7),
    "norm_bs2_alpha0.5_qin": dict(loss_norm=True, batch_size=2, smooth_alpha=0.5, train_inputs="quantized"),
    "defaults": ISSUE13_DEFAULTS,  # the defaults of 30aa942 (layer_loss "mse")
    "norm_alpha0.5_e3": dict(loss_norm=True, smooth_alpha=0.5, epochs=3),
    # the full profile's budget (--profile full): does it need its 6 epochs, does batch 2 help it as it did fast?
    "defaults_e4": dict(ISSUE13_DEFAULTS, epochs=4),
    "defaults_bs2_e4": dict(ISSUE13_DEFAULTS, batch_size=2, epochs=4),
    # the layer loss: each token's squared error relative to its target's mean square (QuantConfig.layer_loss)
    "defaults_rel": dict(ISSUE13_DEFAULTS, layer_loss="relative"),
    "defaults_rel_lr1e-2": dict(ISSUE13_DEFAULTS, layer_loss="relative", lr=1e-2),
    "defaults_rel_alpha0.3": dict(ISSUE13_DEFAULTS, layer_loss="relative", smooth_alpha=0.3),
    "defaults_bs2_e4_rel": dict(ISSUE13_DEFAULTS, batch_size=2, epochs=4, layer_loss="relative"),
    # the full profile's steps (2 epochs of 64 batches of 2) on twice the windows: does it lack data?
    "defaults_bs2_rel_s128_e2": dict(ISSUE13_DEFAULTS, batch_size=2, epochs=2, samples=128, layer_loss="relative"),
    # windows of the evaluation's 512 tokens: twice the tokens at the same training cost, or the same tokens
    "defaults_bs2_rel_l512_e2": dict(ISSUE13_DEFAULTS, batch_size=2, epochs=2, seqlen=512, layer_loss="relative"),
    "defaults_bs2_rel_s32_l512_e4": dict(ISSUE13_DEFAULTS, batch_size=2, epochs=4, samples=32, seqlen=512,
                                         layer_loss="relative"),
    # GPTQ's per-row clip: the learned one (learned for RTN) or the best of a grid by output error (648e36b)
    "defaults_rel_gclip": dict(ISSUE13_DEFAULTS, layer_loss="relative", gptq_clip_grid=(1.0, 0.95, 0.9, 0.85, 0.8, 0.75)),
    # the end-to-end stage after the layer-wise one (QuantConfig.e2e_*, calibrate/e2e.py): the profile's budget
    "defaults_rel_e2e": dict(ISSUE13_DEFAULTS, layer_loss="relative", e2e_epochs=None),
    "defaults_rel_e2e_lr1e-2": dict(ISSUE13_DEFAULTS, layer_loss="relative", e2e_epochs=None, e2e_lr=1e-2),
    "defaults_rel_e2e_e8": dict(ISSUE13_DEFAULTS, layer_loss="relative", e2e_epochs=8),
    "defaults_rel_e2e_bs2": dict(ISSUE13_DEFAULTS, layer_loss="relative", e2e_epochs=None, e2e_batch_size=2),
    "defaults_rel_e2e_s64": dict(ISSUE13_DEFAULTS, layer_loss="relative", e2e_epochs=None, e2e_samples=64),
    # GPTQ settings only: with train_inputs="float" these can reuse a loss_norm run's --work-dir
    "norm_damp0.1": dict(loss_norm=True, gptq_damp=0.1),
    "norm_noactorder": dict(loss_norm=True, gptq_act_order=False),
    "ostart_start": dict(OFFICIAL_START, epochs=0),
    "ostart_today": dict(OFFICIAL_START),
    "ostart_svd": dict(OFFICIAL_START, factor_param="svd"),
    "ostart_loss_norm": dict(OFFICIAL_START, loss_norm=True),
    "ostart_wd": dict(OFFICIAL_START, weight_decay=0.01),
    "ostart_fixed": dict(OFFICIAL_START, batch_order="fixed"),
    "ostart_official_loop": dict(OFFICIAL_START, **OFFICIAL_LOOP),
    "ostart_norm_fixed": dict(OFFICIAL_START, loss_norm=True, batch_order="fixed"),
    # today's loop choices (loss_norm, the relative layer loss) from the official start; and all of today's defaults
    "ostart_norm_rel": dict(OFFICIAL_START, loss_norm=True, layer_loss="relative"),
    "ostart_defaults_rel": dict(OFFICIAL_START, **ISSUE13_DEFAULTS, layer_loss="relative"),
    # today's loop (loss_norm, relative loss, the profile's batch 2) on the float inputs the official loop trains on
    "ostart_loop_rel_bs2": dict(OFFICIAL_START, loss_norm=True, layer_loss="relative", batch_size=None),
}


# The loop before issue 13 (the rows are changes to it, whatever QuantConfig's defaults are now).
BEFORE = dict(factor_param="plain", loss_norm=False, weight_decay=0.0, batch_order="shuffle", batch_size=4,
              smooth_alpha=0.3, train_inputs="float", layer_loss="mse", e2e_epochs=0)
# The full profile's windows before 07d465e (128 from then, 96 from 61acbb9): the --profile full rows keep their meaning.
FULL_BEFORE = dict(samples=64)


def config(name: str, weight_quantizer: str, seed: int = 0) -> QuantConfig:
    """``name`` may carry a seed of the batch order / random start: ``today@seed1``."""
    base, _, s = name.partition("@seed")
    if base not in CONFIGS or (s and not s.isdigit()):
        raise SystemExit(f"--configs: unknown {name!r}; expected some of {', '.join(CONFIGS)}, optionally "
                         "followed by @seed<N>")
    return QuantConfig(method="flatquant", profile=PROFILE, weight_quantizer=weight_quantizer,
                       seed=int(s) if s else seed, **{**BEFORE, **(FULL_BEFORE if PROFILE == "full" else {}),
                                                       **CONFIGS[base]})


def load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"model": MODEL, "profile": PROFILE, "layers": {}, "ppl": {}}


def save(path: str, data: dict, kind: str, key: str) -> None:
    """Write row ``data[kind][key]`` into the file as it is now: runs in parallel each add their own rows."""
    data[kind].update({k: v for k, v in load(path)[kind].items() if k != key})
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))


def calibrated(name: str, weight_quantizer: str, num_layers: int | None, work_dir: str | None = None):
    from flatquant_lab.api import quantize
    from flatquant_lab.data import bundled_data_path, calibration_ids
    from flatquant_lab.hub import load_model

    model, tok = load_model(MODEL, num_layers=num_layers)
    cfg = config(name, weight_quantizer)
    if work_dir is not None:  # resume learned tensors (WorkDir refuses another training configuration)
        cfg = cfg.replace(work_dir=work_dir)
    ids = calibration_ids(bundled_data_path("calib"), tok, cfg.data.samples, cfg.data.seqlen, seed=0)
    t0 = time.perf_counter()
    quantize(model, cfg, ids)
    return model, tok, cfg, time.perf_counter() - t0


def run_layers(args, data: dict) -> None:
    for name in args.configs:
        model, _, cfg, seconds = calibrated(name, "rtn", args.num_layers)
        rep = model.flatquant_report["layers"]
        row = {"config": CONFIGS[name.partition("@")[0]], "seed": cfg.seed, "num_layers": args.num_layers,
               "final_layer_loss": [e["fake_quant_mse"] for e in rep],
               "epoch_losses": [e["epoch_losses"] for e in rep],
               "clip_ratios": [e["clip_ratios"] for e in rep],
               "seconds": seconds, "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0]}
        data["layers"][name] = row
        save(args.out, data, "layers", name)
        print(f"{name}: final layer loss {['%.4g' % v for v in row['final_layer_loss']]} ({seconds:.0f} s)",
              flush=True)


def run_ppl(args, data: dict) -> None:
    from flatquant_lab.demo import evaluate_model
    from flatquant_lab.hub import load_model

    for name in args.configs:
        if name == "fp":
            model, tok = load_model(MODEL)
            seconds, cfg_d = 0.0, None
        else:
            model, tok, cfg, seconds = calibrated(name, args.weight_quantizer, None, args.work_dir)
            cfg_d = CONFIGS[name.partition("@")[0]]
        res = evaluate_model(model, tok, limit=args.limit)
        row = {"config": cfg_d, "weight_quantizer": None if name == "fp" else args.weight_quantizer,
               "token_perplexity": res["token_perplexity"], "word_perplexity": res["word_perplexity"],
               "eval_tokens": res["eval_tokens"], "calib_seconds": seconds, "eval_seconds": res["eval_seconds"],
               "limit": args.limit, "work_dir": args.work_dir, "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0],
               "machine": f"{cpu_model()}{' (' + args.tag + ')' if args.tag else ''}"}
        if name != "fp":
            row["final_layer_loss"] = [e["fake_quant_mse"] for e in model.flatquant_report["layers"]]
        key = (name if name == "fp" else f"{name}/{args.weight_quantizer}") + (f"#{args.tag}" if args.tag else "")
        data["ppl"][key] = row
        save(args.out, data, "ppl", key)
        print(f"{key}: token PPL {row['token_perplexity']:.3f} (calib {seconds:.0f} s, eval {res['eval_seconds']:.0f} s)",
              flush=True)
        del model


def format_table(data: dict) -> str:
    """One row per config: final layer loss per layer, its ratio to ``today`` (geometric mean over the
    layers), and where measured the whole model's token perplexity and its ratio to full precision."""
    rows = data["layers"]
    n = max((len(r["final_layer_loss"]) for r in rows.values()), default=0)
    fp = data["ppl"].get("fp", {}).get("token_perplexity")

    def gm_ratio(r, ref):
        if ref is None or len(ref["final_layer_loss"]) != len(r["final_layer_loss"]):
            return None
        return math.exp(sum(math.log(a / b) for a, b in zip(r["final_layer_loss"], ref["final_layer_loss"]))
                        / len(r["final_layer_loss"]))

    head = f"{'config':22} " + " ".join(f"{'L' + str(i):>9}" for i in range(n)) + \
        f" {'x today':>8} {'x ostart':>9} {'s':>5}   {'tokPPL':>8} {'x FP':>6}"
    lines = [head, "-" * len(head)]
    names = [k for k in CONFIGS if k in rows] + sorted(k for k in rows if k not in CONFIGS)
    for name in names:
        r = rows[name]
        base = rows.get("ostart_today" if name.startswith("ostart") else "today")
        if name.partition("@")[0].endswith("_e6"):
            base = rows.get("today_e6")
        if "@seed" in name:  # paired: the same batch orders as today@seedN
            base = rows.get("today@" + name.partition("@")[2])
        x = gm_ratio(r, base)
        xo = gm_ratio(r, rows.get("ostart_official_loop")) if name.startswith("ostart") else None
        pp = [v for k, v in data["ppl"].items() if k.split("/")[0] == name]
        ppl = pp[0]["token_perplexity"] if pp else None
        losses = " ".join(f"{v:9.4g}" for v in r["final_layer_loss"]) + " " * 10 * (n - len(r["final_layer_loss"]))
        lines.append(f"{name:22} {losses} {'-' if x is None else f'{x:.3f}':>8} {'-' if xo is None else f'{xo:.3f}':>9} "
                     f"{r['seconds']:5.0f}   {'-' if ppl is None else f'{ppl:.3f}':>8} "
                     f"{'-' if ppl is None or fp is None else f'{ppl / fp:.3f}':>6}")
    for key, r in data["ppl"].items():
        if key.split("/")[0] not in rows:
            ratio = "" if fp is None else f" x FP {r['token_perplexity'] / fp:.3f}"
            lines.append(f"{key:22} token PPL {r['token_perplexity']:.3f}{ratio} (calib {r['calib_seconds']:.0f} s)")
    lines += ["", "L<i>: final layer loss of decoder layer i (fake-quant MSE after training, RTN weights, first "
              f"{n} layers); x today / x ostart: geometric mean over the layers of the ratio to 'today' "
              "(to 'ostart_today' for ostart_* rows, 'today_e6' for *_e6, 'today@seedN' for *@seedN) / to "
              "'ostart_official_loop'; s: calibration seconds (1 thread, under whatever load the shared machine "
              "had: not comparable between rows); "
              "tokPPL: whole model, weights as run (see ablation.json), x FP: ratio to full precision."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("layers", "ppl", "table"))
    p.add_argument("--configs", default=None, help="comma-separated names of CONFIGS (ppl: also 'fp')")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--weight-quantizer", default="gptq", choices=("rtn", "gptq"))
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N documents only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", default=None, help="ppl: keep (or resume) the learned tensors there; configs "
                   "that differ only in what runs after training (GPTQ settings) may share one")
    p.add_argument("--profile", default="fast", choices=("fast", "full"),
                   help="the calibration budget the configs change (full: rows go to ablation_full.json)")
    p.add_argument("--tag", default=None, help="ppl: appended to the row's key (name/wq#tag) and machine, so that "
                   "a rerun on another machine keeps the earlier row")
    p.add_argument("--out", default=None, help=f"default {OUT} ({OUT_FULL} with --profile full)")
    args = p.parse_args(argv)
    global PROFILE
    PROFILE = args.profile
    if args.out is None:
        args.out = OUT_FULL if PROFILE == "full" else OUT
    torch.set_num_threads(args.threads)
    data = load(args.out)
    if args.what != "table":
        args.configs = (args.configs or ",".join(CONFIGS)).split(",")
        for name in args.configs:
            if not (args.what == "ppl" and name == "fp"):
                config(name, "rtn")  # refuse an unknown name before any work
        (run_layers if args.what == "layers" else run_ppl)(args, data)
    print(format_table(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
