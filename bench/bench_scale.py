"""Calibration at real size on the CPU: a LLaMA-2-7B-shaped model, layer by layer from the host.

    .venv/bin/python bench/bench_scale.py [--layers 2] [--samples 2] [--epochs 1] [--batch-size 1] [--recompute-blocks auto|on|off]

The model has LLaMA-2-7B's sizes (hidden 4096, intermediate 11008, 32 heads, vocab 32000, untied
head) with random bf16 weights and ``--layers`` decoder layers. A child process writes it to a
temporary safetensors folder (so its memory is not this process's); this process loads it with
``hub.load_model(dtype=bfloat16)`` and calibrates it (``method="flatquant"``, RTN weights) on random
token ids of ``seqlen`` 2048. Printed: peak host RSS (``ru_maxrss``) against the bytes of the bf16
model and of the held activations, seconds per training step, FLOPs per step (an estimate: 3x the
forward's multiply-adds, counted below, so anyone can divide by an accelerator's throughput), and the
paper recipe (128 x 2048 tokens, 15 epochs, per layer) extrapolated to 32 such layers on this CPU.
Target: peak RSS <= model bytes + held activations + 2 GiB (no float32 copy of the model).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HIDDEN, INTER, HEADS, VOCAB, SEQLEN = 4096, 11008, 32, 32000, 2048
PAPER = dict(samples=128, epochs=15, layers=32)


def write_model(path: str, layers: int) -> None:
    """config.json, a word-level tokenizer and random bf16 weights, one tensor generated at a time."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                      num_hidden_layers=layers, vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=False,
                      rms_norm_eps=1e-5, torch_dtype="bfloat16")
    cfg.save_pretrained(path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(path)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g, device="cpu") * 0.02).bfloat16()

    ones = lambda n: torch.ones(n, dtype=torch.bfloat16, device="cpu")  # noqa: E731
    files = {}
    save_file({"model.embed_tokens.weight": rand(VOCAB, HIDDEN), "model.norm.weight": ones(HIDDEN),
               "lm_head.weight": rand(VOCAB, HIDDEN)}, os.path.join(path, "outer.safetensors"), metadata={"format": "pt"})
    files["outer.safetensors"] = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + f"self_attn.{n}_proj.weight": rand(HIDDEN, HIDDEN) for n in "qkvo"}
        t.update({p + "mlp.gate_proj.weight": rand(INTER, HIDDEN), p + "mlp.up_proj.weight": rand(INTER, HIDDEN),
                  p + "mlp.down_proj.weight": rand(HIDDEN, INTER), p + "input_layernorm.weight": ones(HIDDEN),
                  p + "post_attention_layernorm.weight": ones(HIDDEN)})
        name = f"layer{i}.safetensors"
        save_file(t, os.path.join(path, name), metadata={"format": "pt"})
        files[name] = list(t)
        del t
    index = {"metadata": {}, "weight_map": {k: f for f, keys in files.items() for k in keys}}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)


def _hwm() -> int | None:
    """This process's peak resident set (VmHWM) in bytes since the last :func:`_reset_hwm` (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def step_flops(batch: int, groups) -> float:
    """Multiply-adds x 2 of one training step on ``batch`` x SEQLEN tokens, taken as 3x the forward.

    Forward: the 7 linears (2 T P), attention scores and values (4 T^2 h), each group's transform
    once per token (2 T K (n1 + n2)), and the fold of every weight (2 O K (n1 + n2)), redone each step.
    """
    t = batch * SEQLEN
    linears = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER
    fwd = 2 * t * linears + 4 * batch * SEQLEN**2 * HIDDEN
    for g in groups:
        fwd += 2 * t * g.size * (g.n1 + g.n2)
        out = {"attn": 3 * HIDDEN, "o": HIDDEN, "mlp": 2 * INTER, "down": HIDDEN}[g.name]
        fwd += 2 * out * g.size * (g.n1 + g.n2)
    return 3.0 * fwd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--recompute-blocks", choices=("auto", "on", "off"), default="auto",
                    help="QuantConfig(recompute_blocks=...): checkpoint attention and MLP in training "
                         "(auto, the default: when a step keeps more activations than the layer's weights)")
    ap.add_argument("--write", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.write:
        write_model(args.write, args.layers)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    import flatquant_lab.calibrate as cal
    from flatquant_lab.api import quantize
    from flatquant_lab.calibrate import plan_layer
    from flatquant_lab.devices import host_peak_rss
    from flatquant_lab.hub import load_model
    from flatquant_lab.recipe import QuantConfig

    with tempfile.TemporaryDirectory(prefix="bench_scale.") as d:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--write", d, "--layers", str(args.layers)], check=True)
        write_s = time.perf_counter() - t0
        rss0 = host_peak_rss()
        t0 = time.perf_counter()
        model, _ = load_model(d, dtype=torch.bfloat16)
        load_s, rss_load = time.perf_counter() - t0, host_peak_rss()
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
        ids = torch.randint(3, VOCAB, (args.samples, SEQLEN), generator=torch.Generator().manual_seed(0))
        # profile "paper": its lr and no end-to-end stage, what these figures were measured with
        cfg = QuantConfig(method="flatquant", weight_quantizer="rtn", profile="paper", samples=args.samples,
                          seqlen=SEQLEN, epochs=args.epochs, batch_size=args.batch_size, device="cpu",
                          recompute_blocks={"on": True, "off": False}.get(args.recompute_blocks, "auto"))
        groups = plan_layer(model, 0, cfg)
        train_s, phase_peak = [], {}
        phases = ("capture_layer_inputs", "float_forward", "init_learned", "train_layer", "fake_quant_pass",
                  "finalize_layer")
        real = {n: getattr(cal, n) for n in phases}

        def timed(name):
            def run(*a, **k):
                _reset_hwm()
                t = time.perf_counter()
                out = real[name](*a, **k)
                if name == "train_layer":
                    train_s.append(time.perf_counter() - t)
                hwm = _hwm()
                if hwm is not None:
                    phase_peak[name] = max(phase_peak.get(name, 0), hwm)
                return out
            return run

        for n in phases:
            setattr(cal, n, timed(n))
        import flatquant_lab.calibrate.train as train
        decide, decided, probe_s = train._recompute, [], []

        def deciding(*a, **k):  # recompute_blocks="auto" counts a step's activations with one forward
            t = time.perf_counter()
            decided.append(decide(*a, **k))
            probe_s.append(time.perf_counter() - t)
            return decided[-1]

        train._recompute = deciding
        try:
            t0 = time.perf_counter()
            quantize(model, cfg, ids)
            cal_s = time.perf_counter() - t0
        finally:
            for n in phases:
                setattr(cal, n, real[n])
            train._recompute = decide
    rep = model.flatquant_report
    act_bytes = rep["placement"]["activation_bytes"]
    # clearing VmHWM (per phase) also clears what ru_maxrss reports: the run's peak is the largest of
    # the phase peaks, the load's and the final one
    peak = max([host_peak_rss(), rss_load, *phase_peak.values()])
    steps = args.epochs * -(-args.samples // args.batch_size)
    # the "auto" count runs once per layer, not per step: left out of the step time extrapolated below
    sec_step = (sum(train_s) - sum(probe_s)) / (len(train_s) * steps)
    flops = step_flops(args.batch_size, groups)
    # the paper's recipe: samples x epochs sample-steps per layer; a step's cost is linear in its samples
    paper_s = PAPER["layers"] * PAPER["samples"] * PAPER["epochs"] * sec_step / args.batch_size
    other_s = (cal_s - sum(train_s)) / args.layers  # capture share, float forward, init, fake-quant pass, RTN
    gib = 2**30
    print(f"model: {args.layers} LLaMA-2-7B decoder layers (hidden {HIDDEN}, intermediate {INTER}, {HEADS} heads), "
          f"random bf16; samples {args.samples} x seqlen {SEQLEN}, epochs {args.epochs}, batch {args.batch_size}, "
          f"threads {torch.get_num_threads()}, recompute_blocks {args.recompute_blocks} "
          f"(per layer: {', '.join('on' if d else 'off' for d in decided)})")
    print(f"write checkpoint (child process): {write_s:.1f} s; load_model(dtype=bfloat16): {load_s:.1f} s")
    print(f"model bytes (bf16):          {model_bytes / gib:7.3f} GiB  (one decoder layer {layer_bytes / gib:.3f} GiB)")
    buffers = act_bytes // (args.samples * SEQLEN * HIDDEN * torch.finfo(torch.bfloat16).bits // 8)
    print(f"held activations ({rep['placement']['activation_dtype']}, {buffers} buffers): {act_bytes / gib:7.3f} GiB")
    print(f"peak host RSS before load:   {rss0 / gib:7.3f} GiB; after load {rss_load / gib:.3f} GiB")
    print(f"peak host RSS:               {peak / gib:7.3f} GiB")
    bound = model_bytes + act_bytes + 2 * gib
    print(f"target model + activations + 2 GiB = {bound / gib:.3f} GiB: {'met' if peak <= bound else 'NOT met'} "
          f"(margin {(bound - peak) / gib:+.3f} GiB)")
    if phase_peak:
        print("peak host RSS by phase (VmHWM):", ", ".join(f"{n} {v / gib:.2f} GiB" for n, v in phase_peak.items()))
    print(f"calibration: {cal_s:.1f} s; training {sum(train_s):.1f} s in {len(train_s)} layers x {steps} steps; "
          f"other work {other_s:.1f} s per layer; recompute_blocks decision {sum(probe_s) / len(probe_s):.1f} s per layer")
    print(f"seconds per training step ({args.batch_size} x {SEQLEN} tokens): {sec_step:.1f}")
    print(f"FLOPs per training step (estimate, 3x forward): {flops:.3e}  -> {flops / sec_step / 1e9:.1f} GFLOP/s here")
    print(f"paper recipe (128 x 2048 tokens, 15 epochs) x 32 layers on this CPU, training only: "
          f"{paper_s / 3600:.0f} h ({paper_s / 86400:.1f} days)")
    print("per layer:", json.dumps([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in e.items()
                                     if k in ("layer", "epoch_losses", "fake_quant_mse", "seconds")}
                                    for e in rep["layers"]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
