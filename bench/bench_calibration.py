"""Cost of FlatQuant calibration per decoder layer: seconds by phase, peak memory, share of the transforms.

    .venv/bin/python bench/bench_calibration.py [--threads N] [--paper-samples S] [--paper-steps K]

The model is a 1-decoder-layer random Llama with SmolLM2-135M's sizes (hidden 576, intermediate 1536,
9 heads, 3 KV heads, head_dim 64, vocab 49152, tied embeddings; fp32), calibrated on random token ids
with ``method="flatquant"``. Three child processes run one after the other, each with its own peak
RSS (``ru_maxrss``, reported absolute and above its value before the first phase, i.e. torch, model
and ids). Phases are timed in wall and in CPU seconds (``time.process_time``): at 1 thread the CPU
seconds are roughly what the phase costs when the process has a core to itself.

* ``fast`` profile (``PROFILES["fast"]``): the whole budget, run for real by calling the phase
  functions of ``calibrate`` in its order (capture, float forward, init, training, fake-quant pass,
  finalize), each timed once; then ``calibrate`` itself on a copy of the same model, as a check that
  the instrumented sequence costs the same and learns the same losses.
* ``paper`` profile (the published recipe, docs/method.md: 128 x 2048 tokens, 15 epochs = 480 steps of
  4 x 2048): capture
  runs on all 128 samples (X and Y are held at full size, Y assembled as ``float_forward`` does); the
  float forward and the fake-quant pass run on ``--paper-samples`` of them and are scaled (their cost
  is linear in the samples); init and finalize (GPTQ included) run for real; ``--paper-steps``
  training steps are timed and the 480 are extrapolated from their median. The output says which
  figures are measured and which extrapolated.
* ``share``: training steps (and no-grad forwards) timed interleaved with the real ``KronTransform``
  and with one whose ``transformed`` skips the two Kronecker matmuls (the smoothing division, the
  roundings and the quantization are kept) and whose ``fold`` skips the multiplication by the
  inverse factors (and so the inverses); share = 1 - t_without / t_with, in wall and in CPU seconds
  (at 1 thread the CPU seconds are the steadier of the two under load). Plus one training step with
  2 threads against 1, interleaved (wall).

Threads: ``--threads`` (default 1). On a shared 2-core machine under load, 2 OpenMP threads wait
for each other at every parallel region and a step can be several times slower than with 1 thread;
the ``[threads]`` line measures that ratio in the same run. Only ratios measured side by side are
comparable between runs; the seconds move with the load average printed at start and end.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flatquant_lab import calibrate as C  # noqa: E402
from flatquant_lab.models import decoder_layers  # noqa: E402
from flatquant_lab.recipe import PROFILES, QuantConfig  # noqa: E402
from flatquant_lab.quantizers import round_to as ste_cast  # noqa: E402

SIZES = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
SMOLLM2_135M_LAYERS = 30
FAST_BUDGET_MINUTES = 10  # the "fast" profile must calibrate the bundled 135M model in at most ~10 minutes on 2 cores
BATCH = PROFILES["paper"]["batch_size"]


# ---------------------------------------------------------------------------- helpers
def interleaved(fns: dict, repeats: int) -> dict:
    """Wall and CPU seconds per callable and repeat, timing them in turn ``repeats`` times after one
    warm-up each: ``{"wall": {name: [...]}, "cpu": {name: [...]}}``."""
    for fn in fns.values():
        fn()
    wall, cpu = {name: [] for name in fns}, {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return {"wall": wall, "cpu": cpu}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def peak_mib() -> float:
    """This process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_model(vocab: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**SIZES, num_hidden_layers=1, vocab_size=vocab, max_position_embeddings=2048,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def random_ids(vocab: int, n: int, seqlen: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(1))


class Clock:
    """Wall and CPU seconds (this process, all threads) per named phase."""

    def __init__(self):
        self.wall, self.cpu = {}, {}

    def __call__(self, name, fn):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        self.wall[name] = time.perf_counter() - w0
        self.cpu[name] = time.process_time() - c0
        return out


def one_step(layer, groups, learned, X, Y, kw, cfg, s=0):
    """One ``train_layer`` call on one batch of ``BATCH`` samples with one epoch: one AdamW step."""
    return lambda: C.train_layer(layer, groups, learned, X[s:s + BATCH], Y[s:s + BATCH], kw, cfg, 0)


@contextlib.contextmanager
def without_kron():
    """``KronTransform`` minus its Kronecker matmuls (bench only): smoothing, roundings, quantization kept."""
    orig_transformed, orig_fold = C.KronTransform.transformed, C.KronTransform.fold

    def transformed(self, x):
        d = self.smooth_in()
        if d is not None and self.group.smooth_target.endswith("layernorm"):
            x = x / d
        x = ste_cast(x, self.act_dtype)
        x = ste_cast(x, self.act_dtype)  # where x @ R is rounded
        return ste_cast(x, torch.float16)  # where L^T (x R) is rounded

    def fold(self, weight):
        d = self.smooth_in()
        return weight * d if d is not None else weight

    C.KronTransform.transformed, C.KronTransform.fold = transformed, fold
    try:
        yield
    finally:
        C.KronTransform.transformed, C.KronTransform.fold = orig_transformed, orig_fold


def patched(fn):
    def run():
        with without_kron():
            return fn()
    return run


# ---------------------------------------------------------------------------- children
def capture_layer0(model, cfg, ids, bs, clk, hw):
    """calibrate()'s start for decoder layer 0: plan its groups, capture its inputs (timed), cast it to fp32."""
    layer = decoder_layers(model)[0]
    torch.manual_seed(cfg.seed)
    groups = C.plan_layer(model, 0, cfg)
    X, kw = clk("capture", lambda: C.capture_layer_inputs(model, ids, bs))
    hw["capture"] = peak_mib()
    layer.float()
    return layer, groups, X, kw


def child_fast(args) -> dict:
    model = make_model(args.vocab)
    cfg = QuantConfig(method="flatquant", weight_quantizer="gptq", profile="fast").for_model(model)
    n, seqlen, bs = cfg.data.samples, cfg.data.seqlen, cfg.train.batch_size
    ids = random_ids(args.vocab, n, seqlen)
    reference = copy.deepcopy(model)  # for calibrate() as a whole, afterwards
    base = peak_mib()
    hw, clk = {}, Clock()
    # calibrate()'s per-layer sequence, each phase timed
    layer, groups, X, kw = capture_layer0(model, cfg, ids, bs, clk, hw)
    Y, stats = clk("float_forward", lambda: C.float_forward(layer, groups, X, kw, bs))
    hw["float fwd"] = peak_mib()
    learned = clk("init", lambda: C.init_learned(layer, groups, cfg, stats, 0))
    hw["init"] = peak_mib()
    learned, losses = clk("train", lambda: C.train_layer(layer, groups, learned, X, Y, kw, cfg, 0))
    hw["training"] = peak_mib()
    clk("fq_rtn", lambda: C.fake_quant_pass(layer, groups, learned, X, Y, kw, cfg, collect=False))
    mse, hess = clk("fq_gptq", lambda: C.fake_quant_pass(layer, groups, learned, X, Y, kw, cfg, collect=True))
    hw["fake-quant"] = peak_mib()
    rtn_layer = copy.deepcopy(layer)
    clk("fin_rtn", lambda copy_=rtn_layer: C.finalize_layer(copy_, groups, learned, cfg, None))
    clk("fin_gptq", lambda: C.finalize_layer(layer, groups, learned, cfg, hess))
    layer.to(torch.float32)
    hw["finalize"] = peak_mib()
    del rtn_layer
    report = clk("calibrate", lambda: C.calibrate(reference, cfg, ids))
    entry = report.layers[0]
    return dict(wall=clk.wall, cpu=clk.cpu, hw=hw, base=base, peak=hw["finalize"], n=n, seqlen=seqlen,
                epochs=cfg.train.epochs, steps=cfg.train.epochs * math.ceil(n / bs),
                calibrate_layer_s=entry["seconds"],
                same=entry["epoch_losses"] == losses and entry["fake_quant_mse"] == mse)


def child_paper(args) -> dict:
    model = make_model(args.vocab)
    cfg = QuantConfig(method="flatquant", weight_quantizer="gptq", profile="paper").for_model(model)
    n, seqlen, bs = cfg.data.samples, cfg.data.seqlen, cfg.train.batch_size
    part = args.paper_samples
    if part % bs or not 0 < part <= n:
        raise SystemExit(f"--paper-samples: expected a multiple of {bs} in (0, {n}], got {part}")
    ids = random_ids(args.vocab, n, seqlen)
    base = peak_mib()
    hw, clk = {}, Clock()
    layer, groups, X, kw = capture_layer0(model, cfg, ids, bs, clk, hw)
    Yp, stats = clk("float_forward", lambda: C.float_forward(layer, groups, X[:part], kw, bs))
    # the full Y, held as float_forward holds it: per-batch outputs in a list, then one torch.cat
    pieces = [Yp[i % part:i % part + bs].clone() for i in range(0, n, bs)]
    Y = torch.cat(pieces)
    del pieces, Yp
    hw["float fwd"] = peak_mib()
    learned = clk("init", lambda: C.init_learned(layer, groups, cfg, stats, 0))
    hw["init"] = peak_mib()
    one = QuantConfig(method="flatquant", weight_quantizer="gptq", profile="paper", epochs=1).for_model(model)
    steps_wall, steps_cpu = [], []
    for k in range(args.paper_steps + 1):  # the first is a warm-up
        clk("step", one_step(layer, groups, learned, X, Y, kw, one, (k * bs) % n))
        steps_wall.append(clk.wall["step"])
        steps_cpu.append(clk.cpu["step"])
    hw["training"] = peak_mib()
    Xp, Yp = X[:part], Y[:part]
    clk("fq_rtn", lambda: C.fake_quant_pass(layer, groups, learned, Xp, Yp, kw, cfg, collect=False))
    _, hess = clk("fq_gptq", lambda: C.fake_quant_pass(layer, groups, learned, Xp, Yp, kw, cfg, collect=True))
    hw["fake-quant"] = peak_mib()
    rtn_layer = copy.deepcopy(layer)
    clk("fin_rtn", lambda copy_=rtn_layer: C.finalize_layer(copy_, groups, learned, cfg, None))
    clk("fin_gptq", lambda: C.finalize_layer(layer, groups, learned, cfg, hess))
    hw["finalize"] = peak_mib()
    return dict(wall=clk.wall, cpu=clk.cpu, hw=hw, base=base, peak=hw["finalize"], n=n, seqlen=seqlen, part=part,
                epochs=cfg.train.epochs, steps=cfg.train.epochs * math.ceil(n / bs),
                steps_wall=steps_wall, steps_cpu=steps_cpu, xy_mib=2 * X.numel() * X.element_size() / 2**20)


def child_share(args) -> dict:
    model = make_model(args.vocab)
    out = {}
    for name, repeats, fwd_repeats in (("fast", args.repeats, args.repeats),
                                       ("paper", args.paper_repeats, args.paper_forward_repeats)):
        if repeats < 1:
            continue
        seqlen = PROFILES[name]["seqlen"]
        cfg = QuantConfig(method="flatquant", weight_quantizer="rtn", profile=name, epochs=1).for_model(model)
        layer = decoder_layers(model)[0]
        groups = C.plan_layer(model, 0, cfg)
        X, kw = C.capture_layer_inputs(model, random_ids(args.vocab, BATCH, seqlen), BATCH)
        Y, stats = C.float_forward(layer, groups, X, kw, BATCH)
        learned = C.init_learned(layer, groups, cfg, stats, 0)
        step = one_step(layer, groups, learned, X, Y, kw, cfg)
        fwd = lambda: C.fake_quant_pass(layer, groups, learned, X, Y, kw, cfg, collect=False)  # noqa: E731
        out[name] = dict(seqlen=seqlen, repeats={"train": repeats, "forward": fwd_repeats},
                         train=interleaved({"with": step, "without": patched(step)}, repeats),
                         forward=interleaved({"with": fwd, "without": patched(fwd)}, fwd_repeats))
        if name == "fast" and args.thread_repeats > 0:
            mine = torch.get_num_threads()
            other = 2 if mine == 1 else 1

            def at(nt, fn=step):
                def run():
                    torch.set_num_threads(nt)
                    try:
                        fn()
                    finally:
                        torch.set_num_threads(mine)
                return run
            th = interleaved({"mine": at(mine), "other": at(other)}, args.thread_repeats)["wall"]
            out["threads"] = dict(mine=mine, other=other, t=th, repeats=args.thread_repeats, seqlen=seqlen)
    return out


CHILDREN = {"fast": child_fast, "paper": child_paper, "share": child_share}


def run_child(name: str, argv: list[str]) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name] + argv
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(f"  child {name!r} failed (exit {proc.returncode}):\n" + "\n".join(proc.stderr.splitlines()[-15:]))
        return None
    res = json.loads(lines[-1][len("RESULT "):])
    res["child_wall"] = wall
    return res


# ---------------------------------------------------------------------------- report
def row(label: str, wall: float, cpu: float, note: str = "") -> None:
    print(f"  {label:44s} {wall:9.2f} {cpu:9.2f}   {note}".rstrip())


def rss_lines(r: dict) -> None:
    marks = ", ".join(f"{k} {v - r['base']:.0f}" for k, v in r["hw"].items())
    print(f"  peak RSS {r['peak']:.0f} MiB absolute, {r['peak'] - r['base']:.0f} MiB above the baseline of "
          f"{r['base']:.0f} MiB (the peak before the first phase: torch, model, ids)")
    print(f"  high-water mark above the baseline after each phase, MiB: {marks}")


def report_fast(r: dict) -> float:
    w, c = r["wall"], r["cpu"]
    common = ("float_forward", "init", "train")
    per = {q: (sum(w[k] for k in common) + w[f"fq_{q}"] + w[f"fin_{q}"],
               sum(c[k] for k in common) + c[f"fq_{q}"] + c[f"fin_{q}"]) for q in ("rtn", "gptq")}
    print(f"\n[fast] profile 'fast': {r['n']} x {r['seqlen']} tokens, {r['epochs']} epochs, batch {BATCH} -> "
          f"{r['steps']} steps of {BATCH * r['seqlen']} tokens")
    print(f"  the whole budget, run for real: calibrate()'s phases in its order, each timed once "
          f"(child {r['child_wall']:.0f} s)")
    print(f"  {'phase':44s} {'wall s':>9s} {'cpu s':>9s}")
    row("capture layer-0 inputs (once per model)", w["capture"], c["capture"])
    row("float forward + stats", w["float_forward"], c["float_forward"])
    row("init (factors, smoothing, clip searches)", w["init"], c["init"])
    row(f"training, {r['steps']} steps", w["train"], c["train"],
        f"{w['train'] / r['steps']:.3f} s/step wall, {c['train'] / r['steps']:.3f} cpu")
    row("fake-quant pass                  (rtn)", w["fq_rtn"], c["fq_rtn"])
    row("fake-quant pass + Hessians       (gptq)", w["fq_gptq"], c["fq_gptq"])
    row("finalize: fold, quantize         (rtn)", w["fin_rtn"], c["fin_rtn"])
    row("finalize: fold, quantize, GPTQ   (gptq)", w["fin_gptq"], c["fin_gptq"])
    row("seconds per layer                (rtn)", *per["rtn"])
    row("seconds per layer                (gptq)", *per["gptq"],
        f"training {w['train'] / per['gptq'][0]:.0%} of it (wall)")
    inst = per["gptq"][0] + w["capture"]
    print(f"  check: calibrate() on a copy of the model, gptq: {w['calibrate']:.2f} s ({r['calibrate_layer_s']:.2f} s "
          f"its layer); the phases above + capture / calibrate() = {inst / w['calibrate']:.2f}x; "
          f"same epoch losses and fake-quant MSE: {r['same']}")
    rss_lines(r)
    return per["gptq"]


def report_paper(r: dict) -> float:
    w, c = r["wall"], r["cpu"]
    sc = r["n"] / r["part"]
    step_w, step_c = statistics.median(r["steps_wall"][1:]), statistics.median(r["steps_cpu"][1:])
    k = len(r["steps_wall"]) - 1
    est = {"float_forward": (w["float_forward"] * sc, c["float_forward"] * sc),
           "train": (r["steps"] * step_w, r["steps"] * step_c),
           "fq_rtn": (w["fq_rtn"] * sc, c["fq_rtn"] * sc), "fq_gptq": (w["fq_gptq"] * sc, c["fq_gptq"] * sc),
           "init": (w["init"], c["init"]), "fin_rtn": (w["fin_rtn"], c["fin_rtn"]),
           "fin_gptq": (w["fin_gptq"], c["fin_gptq"])}
    per = {q: tuple(sum(est[p][i] for p in ("float_forward", "init", "train", f"fq_{q}", f"fin_{q}"))
                    for i in (0, 1)) for q in ("rtn", "gptq")}
    part = f"on {r['part']} of {r['n']} samples, x {sc:g}"
    print(f"\n[paper] profile 'paper' (the published recipe): {r['n']} x {r['seqlen']} tokens, {r['epochs']} epochs, "
          f"batch {BATCH} -> {r['steps']} steps of {BATCH * r['seqlen']} tokens")
    print(f"  M = measured in full, E = extrapolated from what the note says was measured "
          f"(child {r['child_wall']:.0f} s)")
    print(f"  {'phase':44s} {'wall s':>9s} {'cpu s':>9s}")
    row("capture layer-0 inputs (once per model)", w["capture"], c["capture"], f"M, all {r['n']} samples")
    row("float forward + stats", *est["float_forward"], f"E: {w['float_forward']:.2f} s wall {part}")
    row("init (factors, smoothing, clip searches)", *est["init"], "M")
    row(f"training, {r['steps']} steps", *est["train"],
        f"E: {r['steps']} x median of {k} measured steps, {step_w:.2f} s wall, {step_c:.2f} cpu")
    row("fake-quant pass                  (rtn)", *est["fq_rtn"], f"E: {w['fq_rtn']:.2f} s wall {part}")
    row("fake-quant pass + Hessians       (gptq)", *est["fq_gptq"], f"E: {w['fq_gptq']:.2f} s wall {part}")
    row("finalize: fold, quantize         (rtn)", *est["fin_rtn"], "M")
    row("finalize: fold, quantize, GPTQ   (gptq)", *est["fin_gptq"], f"M (on Hessians of {r['part']} samples)")
    row("seconds per layer                (rtn)", *per["rtn"], f"E = {per['rtn'][0] / 3600:.2f} h")
    model_h = per["gptq"][0] * SMOLLM2_135M_LAYERS / 3600
    row("seconds per layer                (gptq)", *per["gptq"], f"E = {per['gptq'][0] / 3600:.2f} h, training "
        f"{est['train'][0] / per['gptq'][0]:.0%} of it; x {SMOLLM2_135M_LAYERS} layers: {model_h:.0f} h")
    print(f"  measured steps, wall s: {', '.join(f'{s:.2f}' for s in r['steps_wall'][1:])} "
          f"(warm-up {r['steps_wall'][0]:.2f})")
    rss_lines(r)
    print(f"  (M: X and Y, {r['n']} x {r['seqlen']} x 576 fp32 each, {r['xy_mib']:.0f} MiB together, held at full "
          f"size;\n  Y assembled as float_forward assembles it: a list of batch outputs, then torch.cat)")
    return per["gptq"][0]


def report_share(r: dict) -> None:
    print("\n[transforms] share of the Kronecker transforms in one call: timed interleaved with the real "
          "KronTransform and with\n  one whose transformed() skips x @ R and L^T (.) and whose fold() skips the "
          "inverse factors (smoothing, roundings,\n  int4 quantization kept); share = 1 - median(without) / "
          "median(with), in wall and in CPU seconds;\n  range: min-max of the per-pair shares (CPU)")
    print(f"  {'call, batch 4 x seqlen':27s} {'with s':>7s} {'without':>8s} {'share':>6s}   "
          f"{'with cpu':>8s} {'without':>8s} {'share':>6s}   {'range (cpu)':15s} repeats")
    for name in ("fast", "paper"):
        if name not in r:
            continue
        s = r[name]
        for kind, label in (("train", "training step"), ("forward", "forward, no grad")):
            ww, wwo, cw, cwo = [statistics.median(s[kind][clock][v]) for clock in ("wall", "cpu")
                                for v in ("with", "without")]
            pairs = [1 - b / a for a, b in zip(s[kind]["cpu"]["with"], s[kind]["cpu"]["without"])]
            print(f"  {label + ', 4 x ' + str(s['seqlen']):27s} {ww:7.3f} {wwo:8.3f} {1 - wwo / ww:6.1%}   "
                  f"{cw:8.3f} {cwo:8.3f} {1 - cwo / cw:6.1%}   {min(pairs):5.1%} - {max(pairs):5.1%}   "
                  f"{s['repeats'][kind]}")
    if "threads" in r:
        th = r["threads"]
        a, b = statistics.median(th["t"]["mine"]), statistics.median(th["t"]["other"])
        print(f"\n[threads] one training step, 4 x {th['seqlen']}, interleaved, median of {th['repeats']}: "
              f"{th['mine']} thread(s) {a:.3f} s, {th['other']} thread(s) {b:.3f} s -> "
              f"{th['other']} / {th['mine']} threads = {b / a:.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads in the children (default 1, see above)")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary of the random model (SmolLM2's: 49152)")
    p.add_argument("--paper-samples", type=int, default=16, help="samples the paper float forward and fake-quant "
                   "pass run on (then scaled to 128)")
    p.add_argument("--paper-steps", type=int, default=3, help="paper training steps timed (after one warm-up)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved repeats at the fast seqlen (median)")
    p.add_argument("--paper-repeats", type=int, default=5,
                   help="interleaved training-step repeats at the paper seqlen (0: skip the paper seqlen)")
    p.add_argument("--paper-forward-repeats", type=int, default=7,
                   help="interleaved no-grad forward repeats at the paper seqlen")
    p.add_argument("--thread-repeats", type=int, default=5, help="interleaved repeats of the threads check (0: skip)")
    p.add_argument("--only", nargs="*", choices=tuple(CHILDREN), default=list(CHILDREN), help="sections to run")
    p.add_argument("--child", choices=tuple(CHILDREN), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        res = CHILDREN[args.child](args)
        print("RESULT " + json.dumps(res))
        return 0

    t0 = time.perf_counter()
    print(f"bench_calibration: torch {torch.__version__}, {args.threads} thread(s), {platform.machine()}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}; a 1-decoder-layer random Llama with "
          f"SmolLM2-135M's sizes (hidden 576, intermediate 1536, 9 / 3 heads x 64, vocab {args.vocab}, fp32), "
          f"random token ids, method flatquant; each section in its own process, one after the other")
    print(f"load average at start: {load()} on {os.cpu_count()} cpus")
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = {}
    for name in args.only:
        print(f"  ... running {name} (load {load()})", flush=True)
        results[name] = run_child(name, passthrough)
    fast_layer = None
    if results.get("fast"):
        fast_layer = report_fast(results["fast"])
    if results.get("paper"):
        report_paper(results["paper"])
    if results.get("share"):
        report_share(results["share"])
    print(f"\nload average at end: {load()}; bench wall {time.perf_counter() - t0:.0f} s")
    if fast_layer is not None:
        wall_min, cpu_min = (v * SMOLLM2_135M_LAYERS / 60 for v in fast_layer)
        print(f"summary: fast profile, gptq: {fast_layer[0]:.1f} s per layer wall ({fast_layer[1]:.1f} s cpu) at "
              f"{args.threads} thread(s); x {SMOLLM2_135M_LAYERS} layers = {wall_min:.1f} min wall ({cpu_min:.1f} min "
              f"cpu) under this load;\n  budget for 'fast', at most {FAST_BUDGET_MINUTES} min on 2 cores: "
              f"{verdict(wall_min <= FAST_BUDGET_MINUTES)} on wall time")
    return 0 if all(results.get(n) for n in args.only) else 1


if __name__ == "__main__":
    sys.exit(main())
