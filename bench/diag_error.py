"""Where the calibrated model's perplexity gap comes from: one calibration, then cheap variants of it.

    .venv/bin/python bench/diag_error.py --config loss_norm [--windows 10] [--out results/ablation/diag.json]

One whole-model calibration (``bench_ablation.CONFIGS[--config]``, fast profile, GPTQ weights; its learned
tensors kept in ``--work-dir`` so that a rerun skips training), then the token perplexity of
``flatquant_lab.eval.perplexity.token_perplexity`` on the first ``--windows`` windows of 512 tokens of the
bundled evaluation set (a subset: the same measure for every variant, not the demo's lm-eval figure) for:

* ``fp`` / ``quant``: the float model / the calibrated model as it serves;
* ``float:<group>``: that group (attn = q/k/v, o, mlp = gate/up, down) in float in every layer, the rest as served;
* ``wonly`` / ``aonly``: every FlatQuant linear with float activations and its int4 weights
  (``(x T) @ W_hat^T``) / with int4 activations and float folded weights (``Q4(x T) @ ((W * d) T^{-T})^T``),
  which splits the error into a weight and an activation part;
* ``float_layers:<a>-<b>``: decoder layers a..b as in the float model, the rest as served.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
from einops import rearrange
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flatquant_lab.files import atomic_write_text  # noqa: E402
from flatquant_lab.kronecker import fold_weight, kron_apply  # noqa: E402
from flatquant_lab.layers import W4A4FlatQuantLinear  # noqa: E402
from flatquant_lab.models.llama import LLAMA_GROUPS  # noqa: E402
from flatquant_lab.quantizers import fake_quant_act  # noqa: E402

import bench_ablation  # noqa: E402


class Probe(nn.Module):
    """One served linear with a switchable computation (``mode``): as served, float, weight-only, act-only."""

    mode: dict = {}  # group name -> "quant" | "float" | "wonly" | "aonly" (class-wide switch)

    def __init__(self, q: W4A4FlatQuantLinear, weight: torch.Tensor, bias, d: torch.Tensor | None,
                 d_out: torch.Tensor | None, group: str):
        super().__init__()
        self.q, self.group = q, group
        # the smoothed float weight diag(1 / d_out) W diag(d): d_out is the next group's smoothing folded into
        # these rows (v_proj, up_proj), so that the float linear feeds the next one what it expects
        w = weight.double() * (d.double() if d is not None else 1.0)
        if d_out is not None:
            w = w / d_out.double()[:, None]
            bias = None if bias is None else bias.double() / d_out.double()
        lt, rt = q.left_trans.double(), q.right_trans.double()
        self.register_buffer("w_smooth", w.float())
        self.register_buffer("w_folded", fold_weight(w, lt, rt, blocks=q.tp_size).float())  # (W d) T^{-T}
        self.register_buffer("w_hat", q.dequantized_weight())
        self.register_buffer("bias_f", None if bias is None else bias.float())
        self.lt, self.rt = q.left_trans.float(), q.right_trans.float()

    def forward(self, x):
        mode = Probe.mode.get(self.group, "quant")
        if mode == "quant":
            return self.q(x)
        x = x.float()
        if mode == "float":  # the layer's input is x / d (d folded upstream): (x / d) (W d)^T = x W^T
            y = x @ self.w_smooth.T
        else:
            b = kron_apply(x, self.lt, self.rt, blocks=self.q.tp_size)
            if mode == "wonly":
                y = b @ self.w_hat.T
            else:
                bq = fake_quant_act(b.unflatten(-1, (self.q.tp_size, -1)), float(self.q.clip_ratio)).flatten(-2)
                y = bq @ self.w_folded.T
        return y if self.bias_f is None else y + self.bias_f


def smoothing(learned: dict, group: str, kv: int, rep: int) -> torch.Tensor | None:
    """``d`` over the group's input channels, expanded across the query heads of a kv head (as ``smooth_in``)."""
    t = learned.get(f"{group}.log_smooth")
    if t is None:
        return None
    d = t.double().exp()
    if group == "o":
        d = rearrange(d, "(kv hd) -> kv hd", kv=kv).repeat_interleave(rep, dim=0).flatten()
    return d


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="loss_norm")
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--layer-blocks", type=int, default=6, help="restore this many consecutive layers at a time")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--out", default=os.path.join("results", "ablation", "diag.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from flatquant_lab.eval.perplexity import token_perplexity
    from flatquant_lab.hub import load_model
    from flatquant_lab.calibrate.workdir import WorkDir

    work = args.work_dir or f"/tmp/diag_wd_{args.config}"
    cfg = bench_ablation.config(args.config, "gptq")
    fm, tok = load_model(bench_ablation.MODEL)
    rows = {}

    def ev(name):
        t0 = time.perf_counter()
        rows[name] = token_perplexity(qm, tok, max_windows=args.windows)
        print(f"{name:24} token PPL {rows[name]:.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)

    qm = fm
    ev("fp")
    from flatquant_lab.api import quantize
    from flatquant_lab.data import bundled_data_path, calibration_ids

    qm = copy.deepcopy(fm)
    ids = calibration_ids(bundled_data_path("calib"), tok, cfg.data.samples, cfg.data.seqlen, seed=0)
    t0 = time.perf_counter()
    quantize(qm, cfg.replace(work_dir=work), ids)
    print(f"calibrated in {time.perf_counter() - t0:.0f} s", flush=True)
    ev("quant")
    info = fm.config
    kv, rep = info.num_key_value_heads, info.num_attention_heads // info.num_key_value_heads
    n = info.num_hidden_layers
    wd = WorkDir(work, cfg, n)
    groups_of = {lin: g.name for g in LLAMA_GROUPS for lin in g.linears}
    rows_of = {g.smooth_target: g.name for g in LLAMA_GROUPS if not g.smooth_target.endswith("layernorm")}
    for i in range(n):
        learned, _ = wd.load(i)
        ql, fl = qm.model.layers[i], fm.model.layers[i]
        for lin, gname in groups_of.items():
            q = ql.get_submodule(lin)
            if not isinstance(q, W4A4FlatQuantLinear):
                continue
            f = fl.get_submodule(lin)
            parent, _, leaf = lin.rpartition(".")
            t = learned.get(f"{rows_of[lin]}.log_smooth") if lin in rows_of else None
            setattr(ql.get_submodule(parent), leaf, Probe(q, f.weight.detach(), f.bias, smoothing(learned, gname, kv, rep),
                                                          None if t is None else t.double().exp(), gname))
    for mode in ("wonly", "aonly"):
        Probe.mode = {g.name: mode for g in LLAMA_GROUPS}
        ev(mode)
    for g in LLAMA_GROUPS:
        Probe.mode = {g.name: "float"}
        ev(f"float:{g.name}")
    Probe.mode = {}
    for a in range(0, n, args.layer_blocks):
        b = min(n, a + args.layer_blocks) - 1
        saved = [qm.model.layers[i] for i in range(a, b + 1)]
        for i in range(a, b + 1):
            qm.model.layers[i] = fm.model.layers[i]
        ev(f"float_layers:{a}-{b}")
        for i, layer in zip(range(a, b + 1), saved):
            qm.model.layers[i] = layer
    data = {}
    if os.path.exists(args.out):
        with open(args.out) as fh:
            data = json.load(fh)
    data[args.config] = {"windows": args.windows, "window": 512, "token_perplexity": rows}
    atomic_write_text(args.out, json.dumps(data, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
