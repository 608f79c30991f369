"""Where INT4 FlatQuant and MXFP4 FlatQuant differ most: the output error of every decoder linear of two exports.

    .venv/bin/python bench/bench_mxfp4_vs_int4.py --int4 DIR --mxfp4 DIR [--model smollm2-135m] [--threads 1]
        [--windows 4] [--seqlen 512] [--seed 0] [--data FILE] [--top 10] [--json OUT]

``--int4`` and ``--mxfp4`` are exports of the same float model (the demo's ``export-flatquant`` and
``export-flatquant-mxfp4``), ``--model`` that float model (default the bundled one, cut to the exports' layer
count). Each export reads ``--windows`` windows of ``--seqlen`` tokens of the bundled calibration text (or
``--data``), in one batch, through the reference ops; every quantized decoder linear's output is compared, on the
input it receives there (rounded to its activation dtype), with:

* ``err`` (the figure the tables rank): the float model's linear in the layer's input basis,
  ``diag(1 / d_next) W diag(d)``, where ``d`` is the smoothing calibration folded into the norm or the preceding
  linear's rows (so the float weight alone is not the reference) and ``d_next`` that of the group the linear
  feeds (v_proj, up_proj). Where ``d`` folded into a norm (q/k/v, gate/up) it is the ratio of the float model's
  norm weight to the export's, exactly. Where it folded into the rows of a quantized linear (o_proj's into
  v_proj's, down_proj's into up_proj's) it is not stored, and the weights alone cannot tell it apart from a
  per-channel scale error of either linear (only the pair's product is fixed). It is fitted by least squares of
  dequantized input-basis weights on float ones twice, from the preceding linear's rows (``d / s_prev``) and from
  the group's own columns (``d s_own``, pooled over the query heads sharing a kv channel for o_proj), and their
  geometric mean is used for both linears: exact when the two linears' scale errors ``s`` are equal, each then
  counting its own. The printed pair deficit, ``1 - sqrt(cols / rows)`` averaged over channels, is the pair's
  mean scale error per linear, ``1 - sqrt(s_prev s_own)``: an unequal split would move up to that much scale
  error from one linear's ``err`` to the other's;
* ``act``: ``numerics.dequantized_reference`` (the layer's own dequantized weights, float64), i.e. what
  quantizing the activations costs;
* ``wt``: that dequantized reference against the float one on the same input, i.e. what the weights cost.

Each is ``||y - y_ref|| / ||y_ref||`` over all tokens (``numerics.compare.float_metrics``). The tables: per linear
kind (q/k/v/o/gate/up/down) the mean over layers of each figure for both exports and the ratio of the means
MXFP4 / INT4; the ``--top`` linears with the largest MXFP4 / INT4 ratio of ``err``, and with the largest MXFP4
``err``.

The JSON also has each linear's ``weight_scale_deficit``, ``1 - <W_q, W_ref> / ||W_ref||^2`` over its whole
weight (how much smaller the quantized weight is overall).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # provenance, also when imported by path

from flatquant_lab.files import atomic_write_text  # noqa: E402
from flatquant_lab.models import adapter_for  # noqa: E402
from flatquant_lab.numerics import dequantized_reference  # noqa: E402
from flatquant_lab.numerics.compare import float_metrics  # noqa: E402
from flatquant_lab.schemes import scheme_of  # noqa: E402
from provenance import cpu_model, git_commit  # noqa: E402

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
EXPORTS = ("int4", "mxfp4")
FIGURES = ("err", "act", "wt")


# ------------------------------------------------------------------------------------------------ references
def scale_fit(q_ws: list[torch.Tensor], f_ws: list[torch.Tensor], dim: int,
              kv_tied: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Least squares of ``Q_i`` on ``F_i`` scaled per column (``dim=0``: ``Q_i ~ F_i diag(s)``, pooled over the
    pairs) or per row (``dim=1``: ``Q ~ diag(s) F``); ``kv_tied=(kv, rep, head_dim)`` pools the columns of the
    ``rep`` query heads reading one kv channel and returns ``s`` per kv channel. ``s = 1`` where ``F`` is 0."""
    num = sum((q * f).sum(dim) for q, f in zip(q_ws, f_ws))
    den = sum((f * f).sum(dim) for f in f_ws)
    if kv_tied is not None:
        kv, rep, hd = kv_tied
        num, den = num.view(kv, rep, hd).sum(1).reshape(-1), den.view(kv, rep, hd).sum(1).reshape(-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(num))


def is_quantized(module: nn.Module) -> bool:
    scheme = scheme_of(module)
    return scheme is not None and scheme.quantized


def dequantized_references(q_layer: nn.Module, paths) -> dict[str, nn.Linear]:
    """Per quantized linear path of one decoder layer: ``numerics.dequantized_reference`` of it."""
    return {p: dequantized_reference(q_layer.get_submodule(p)) for p in paths if is_quantized(q_layer.get_submodule(p))}


def _norm_ratio(float_layer: nn.Module, q_layer: nn.Module, target: str, size: int) -> torch.Tensor | None:
    """``float weight / export weight`` (float64) of the smoothing target ``target`` when it is a module with a
    weight vector of ``size`` (a norm; the smoothing divided its weight by ``d``), else ``None``."""
    try:
        fw, qw = float_layer.get_submodule(target).weight, q_layer.get_submodule(target).weight
    except AttributeError:
        return None
    if not isinstance(fw, torch.Tensor) or not isinstance(qw, torch.Tensor) or tuple(fw.shape) != (size,) \
            or fw.shape != qw.shape:
        return None
    return fw.detach().cpu().double() / qw.detach().cpu().double()


def _positive(v: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(v) & (v > 0), v, fallback)


@torch.no_grad()
def float_references(float_layer: nn.Module, q_layer: nn.Module, groups, info,
                     deq: dict[str, nn.Linear] | None = None) -> tuple[dict[str, nn.Linear], dict[str, torch.Tensor]]:
    """For one decoder layer: ``(references, d)``: per linear path an ``nn.Linear`` (float64) holding the float
    weight in the quantized layer's input basis, ``diag(1 / d_next) W diag(d)`` and its bias ``/ d_next``; per
    group name the ``d`` its references use, and for a fitted one its two fits as ``"<group>:rows"`` and
    ``"<group>:cols"``.

    ``d`` of a group smoothed into a norm: the norm's float weight over its export weight (exact). Of one smoothed
    into the rows of a preceding linear ``p`` (o_proj: v_proj, down_proj: up_proj): the geometric mean of the
    least-squares fits from ``p``'s rows and from the group's columns (module doc), used for the group's columns
    and as ``p``'s ``1 / d_next``.
    ``deq``: :func:`dequantized_references` of ``q_layer`` when already at hand; a float linear of the export
    enters the fits with its own weight."""
    paths = [p for g in groups for p in g.linears]
    if deq is None:
        deq = dequantized_references(q_layer, paths)
    group_of = {p: g for g in groups for p in g.linears}
    w_f = {p: float_layer.get_submodule(p).weight.detach().cpu().double() for p in paths}
    w_q = {p: deq[p].weight.detach() if p in deq else q_layer.get_submodule(p).weight.detach().cpu().double()
           for p in paths}
    for p in paths:
        if w_q[p].shape != w_f[p].shape:
            raise ValueError(f"model: {p} has weight {list(w_f[p].shape)} in the float model, {list(w_q[p].shape)} "
                             "in the export (expected the export's own float model)")
    heads = (info.num_kv_heads, info.num_heads // info.num_kv_heads, info.head_dim)

    def expand(g, s):  # a per-kv-channel d to the group's input columns
        kv, rep, hd = heads
        return s.view(kv, 1, hd).expand(kv, rep, hd).reshape(-1) if g.kv_tied else s

    def column_fit(g):
        return scale_fit([w_q[p] for p in g.linears], [w_f[p] for p in g.linears], 0, heads if g.kv_tied else None)

    d: dict[str, torch.Tensor] = {}
    row: dict[str, torch.Tensor] = {}  # a preceding linear's path -> the 1 / d of the group it feeds
    for g in groups:
        if g.smooth_target in group_of:
            continue
        size = w_f[g.linears[0]].shape[1]
        ratio = _norm_ratio(float_layer, q_layer, g.smooth_target, size)
        if ratio is None:
            raise ValueError(f"groups: {g.name} is smoothed into {g.smooth_target}, which is neither a linear of "
                             f"the layer nor a weight vector of {size}")
        d[g.name] = _positive(ratio, column_fit(g))  # a zero norm channel: the fit instead
    pending = [g for g in groups if g.name not in d]
    while pending:
        ready = [g for g in pending if group_of[g.smooth_target].name in d]
        if not ready:
            raise ValueError(f"groups: the smoothing targets of {[g.name for g in pending]} form a cycle")
        for g in ready:
            p = g.smooth_target
            f = w_f[p] * d[group_of[p].name][None, :]  # p's rows hold diag(1 / d) W_p diag(d of p's group)
            inv = scale_fit([w_q[p]], [f], 1)
            rows = _positive(1.0 / inv, torch.ones_like(inv))
            cols = _positive(column_fit(g), torch.ones_like(inv))
            both = (rows * cols).sqrt()  # per kv channel for o_proj, as p's rows are
            row[p] = 1.0 / both
            d[g.name], d[f"{g.name}:rows"], d[f"{g.name}:cols"] = expand(g, both), expand(g, rows), expand(g, cols)
        pending = [g for g in pending if g not in ready]
    refs: dict[str, nn.Linear] = {}
    for p in paths:
        w = w_f[p] * d[group_of[p].name][None, :]
        fb = float_layer.get_submodule(p).bias
        if p in row:
            w = w * row[p][:, None]
        ref = nn.Linear(w.shape[1], w.shape[0], bias=fb is not None, dtype=torch.float64)
        ref.weight.copy_(w)
        if fb is not None:
            b = fb.detach().cpu().double()
            ref.bias.copy_(b * row[p] if p in row else b)
        refs[p] = ref.requires_grad_(False)
    return refs, d


# ------------------------------------------------------------------------------------------------ measurement
def _metrics(y: torch.Tensor, ref: nn.Linear, y_plain: torch.Tensor) -> dict:
    """``y`` against ``y_plain`` (``x @ ref.weight^T``) plus ``ref``'s bias."""
    m = float_metrics(y, ref, y_plain)
    return {"rel_err": m["rel_err"], "sqnr_db": m["sqnr_db"], "cosine": m["cosine"]}


@torch.no_grad()
def measure_export(q_model: nn.Module, float_model: nn.Module, ids: torch.Tensor) -> tuple[dict, dict]:
    """``(linears, fits)``: per quantized decoder linear of ``q_model`` (module name) its ``err``, ``act`` and ``wt``
    metrics (module doc) on the inputs it receives while ``q_model`` reads ``ids`` ``[windows, seqlen]`` in one
    batch; per fitted group (``o``, ``down``) its pair deficit (module doc), one per decoder layer."""
    adapter = adapter_for(float_model)
    info = adapter.info(float_model)
    f_layers, q_layers = adapter.decoder_layers(float_model), adapter.decoder_layers(q_model)
    if len(q_layers) != len(f_layers):
        raise ValueError(f"model: the float model has {len(f_layers)} decoder layers, the export {len(q_layers)}")
    results: dict[str, dict] = {}
    fits: dict[str, list[float]] = {}
    held: dict[int, tuple[dict, dict]] = {}  # one decoder layer's references at a time (float64 weights)
    handles = []

    def enter(i):
        def hook(mod, args):
            deq = dequantized_references(q_layers[i], adapter.linear_names)
            refs, d = float_references(f_layers[i], q_layers[i], adapter.groups, info, deq)
            held[i] = (refs, deq)
            for key in [k for k in d if k.endswith(":cols")]:
                g = key.removesuffix(":cols")
                fits.setdefault(g, []).append(float(1 - (d[key] / d[f"{g}:rows"]).sqrt().mean()))
        return hook

    def leave(i):
        def hook(mod, args, out):
            held.pop(i, None)
        return hook

    def linear(i, path):
        name = f"{adapter.layer_prefix(i)}.{path}"

        def hook(mod, args, out):
            scheme = scheme_of(mod)
            x = args[0].reshape(-1, args[0].shape[-1])
            x = x.to(scheme.act_dtype_of(mod) or x.dtype).cpu().double()  # the layer's own input rounding
            y = out.reshape(-1, out.shape[-1]).cpu().double()
            ref, deq = held[i][0][path], held[i][1][path]
            y_ref, y_deq = x @ ref.weight.T, x @ deq.weight.T
            y_deq_b = y_deq + deq.bias if deq.bias is not None else y_deq
            scale = float((deq.weight * ref.weight).sum() / (ref.weight * ref.weight).sum().clamp_min(1e-300))
            results[name] = {"scheme": scheme.quant_type, "tokens": x.shape[0], "err": _metrics(y, ref, y_ref),
                             "act": _metrics(y, deq, y_deq), "wt": _metrics(y_deq_b, ref, y_ref),
                             "weight_scale_deficit": 1.0 - scale}
        return hook

    try:
        for i, layer in enumerate(q_layers):
            handles.append(layer.register_forward_pre_hook(enter(i)))
            handles.append(layer.register_forward_hook(leave(i)))
            for path in adapter.linear_names:
                mod = layer.get_submodule(path)
                if is_quantized(mod):
                    handles.append(mod.register_forward_hook(linear(i, path)))
        q_model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return results, fits


def kind_of(name: str) -> str:
    """``model.layers.3.mlp.gate_proj`` -> ``gate``."""
    return name.rsplit(".", 1)[-1].removesuffix("_proj")


def summarize(per_export: dict[str, dict[str, dict]], top: int = 10) -> dict:
    """Per kind the mean of each figure per export and the ratio of the means; the linears both exports quantize,
    with their ``err`` ratio; the ``top`` ones by that ratio and by MXFP4 ``err``."""
    common = [n for n in per_export["mxfp4"] if n in per_export["int4"]]
    linears = {}
    for n in common:
        a, b = per_export["int4"][n], per_export["mxfp4"][n]
        row = {f"{e}_{f}": per_export[e][n][f]["rel_err"] for e in EXPORTS for f in FIGURES}
        row.update(kind=kind_of(n), int4_scheme=a["scheme"], mxfp4_scheme=b["scheme"],
                   ratio=row["mxfp4_err"] / row["int4_err"] if row["int4_err"] > 0 else float("inf"))
        linears[n] = row
    kinds = {}
    for kind in KINDS + ("all",):
        rows = [r for r in linears.values() if kind in ("all", r["kind"])]
        if not rows:
            continue
        means = {k: sum(r[k] for r in rows) / len(rows) for e in EXPORTS for k in (f"{e}_{f}" for f in FIGURES)}
        means.update({f"ratio_{f}": (means[f"mxfp4_{f}"] / means[f"int4_{f}"] if means[f"int4_{f}"] > 0
                                     else float("inf")) for f in FIGURES})
        kinds[kind] = {"n": len(rows), **means}
    by_ratio = sorted(linears, key=lambda n: linears[n]["ratio"], reverse=True)[:top]
    by_mx = sorted(linears, key=lambda n: linears[n]["mxfp4_err"], reverse=True)[:top]
    only = {e: sorted(set(per_export[e]) - set(common)) for e in EXPORTS}
    return {"linears": linears, "kinds": kinds, "top_ratio": by_ratio, "top_mxfp4": by_mx, "only_in": only}


def format_tables(summary: dict) -> str:
    lines = ["per linear kind: mean over layers of the relative output error (err: against the float linear; "
             "wt: weights only; act: activations only)",
             f"{'kind':<5} {'n':>4} {'INT4 err':>9} {'MXFP4 err':>9} {'MX/INT4':>8}   {'INT4 wt':>8} {'MXFP4 wt':>8} "
             f"{'MX/INT4':>8}   {'INT4 act':>8} {'MXFP4 act':>9} {'MX/INT4':>8}"]
    for kind, k in summary["kinds"].items():
        lines.append(f"{kind:<5} {k['n']:>4} {k['int4_err']:>9.4f} {k['mxfp4_err']:>9.4f} {k['ratio_err']:>8.3f}   "
                     f"{k['int4_wt']:>8.4f} {k['mxfp4_wt']:>8.4f} {k['ratio_wt']:>8.3f}   "
                     f"{k['int4_act']:>8.4f} {k['mxfp4_act']:>9.4f} {k['ratio_act']:>8.3f}")
    linears = summary["linears"]
    width = max([len(n) for n in linears] + [6])

    def table(title: str, names: list[str]) -> list[str]:
        out = ["", title, f"{'linear':<{width}} {'INT4 err':>9} {'MXFP4 err':>9} {'MX/INT4':>8} {'INT4 wt':>8} "
               f"{'MXFP4 wt':>8} {'INT4 act':>8} {'MXFP4 act':>9}"]
        for n in names:
            r = linears[n]
            out.append(f"{n:<{width}} {r['int4_err']:>9.4f} {r['mxfp4_err']:>9.4f} {r['ratio']:>8.3f} "
                       f"{r['int4_wt']:>8.4f} {r['mxfp4_wt']:>8.4f} {r['int4_act']:>8.4f} {r['mxfp4_act']:>9.4f}")
        return out

    lines += table(f"the {len(summary['top_ratio'])} linears with the largest MXFP4 / INT4 ratio of err",
                   summary["top_ratio"])
    lines += table(f"the {len(summary['top_mxfp4'])} linears with the largest MXFP4 err", summary["top_mxfp4"])
    for e in EXPORTS:
        if summary["only_in"][e]:
            lines.append(f"\nquantized only in the {e} export (not compared): {', '.join(summary['only_in'][e])}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the run
def _export_layers(path: Path, name: str) -> int:
    cfg = path / "config.json"
    if not path.is_dir() or not cfg.is_file():
        raise ValueError(f"{name}: {path} is not an export folder (expected a directory with config.json)")
    return int(json.loads(cfg.read_text())["num_hidden_layers"])


def compare_exports(int4: str | os.PathLike, mxfp4: str | os.PathLike, model: str = "smollm2-135m",
                    windows: int = 4, seqlen: int = 512, seed: int = 0, data=None, top: int = 10) -> dict:
    """The whole measurement: both exports on the same token windows, against the float ``model`` cut to their
    layer count; returns :func:`summarize`'s dict plus the per-export metrics (``exports``) and the setup."""
    from flatquant_lab.data import bundled_data_path, calibration_ids
    from flatquant_lab.hub import load_config, load_model
    from flatquant_lab.io import load_quantized

    for name, v in (("windows", windows), ("seqlen", seqlen), ("top", top)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    paths = {"int4": Path(int4), "mxfp4": Path(mxfp4)}
    n_layers = {e: _export_layers(p, e) for e, p in paths.items()}
    if n_layers["int4"] != n_layers["mxfp4"]:
        raise ValueError(f"mxfp4: {n_layers['mxfp4']} decoder layers, the int4 export {n_layers['int4']} "
                         "(expected exports of the same model)")
    _, full = load_config(model)
    if n_layers["int4"] > full:
        raise ValueError(f"model: {model} has {full} decoder layers, the exports {n_layers['int4']}")
    float_model, tok = load_model(model, num_layers=n_layers["int4"])
    source = data if data is not None else bundled_data_path("calib")
    ids = calibration_ids(source, tok, windows, seqlen, seed=seed)
    per_export, seconds, schemes, fits = {}, {}, {}, {}
    for e, p in paths.items():
        t0 = time.perf_counter()
        q_model = load_quantized(p, backend="reference")
        per_export[e], fits[e] = measure_export(q_model, float_model, ids)
        seconds[e] = time.perf_counter() - t0
        counts: dict[str, int] = {}
        for r in per_export[e].values():
            counts[r["scheme"]] = counts.get(r["scheme"], 0) + 1
        schemes[e] = counts
        del q_model
    summary = summarize(per_export, top)
    summary.update(exports={e: {"path": str(paths[e]), "schemes": schemes[e], "seconds": seconds[e],
                                "pair_deficit": fits[e], "linears": per_export[e]} for e in EXPORTS},
                   model=str(model), layers=n_layers["int4"], windows=windows, seqlen=seqlen, seed=seed,
                   data=str(source), tokens=int(ids.numel()))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--int4", required=True, help="the INT4 FlatQuant export (a folder with config.json)")
    p.add_argument("--mxfp4", required=True, help="the MXFP4 FlatQuant export of the same model")
    p.add_argument("--model", default="smollm2-135m", help="their float model: an alias or a local folder")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--windows", type=int, default=4, help="token windows of the text, read in one batch")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    p.add_argument("--seed", type=int, default=0, help="where the windows start (data.calibration_ids)")
    p.add_argument("--data", default=None, help="a text file instead of the bundled calibration split")
    p.add_argument("--top", type=int, default=10, help="rows of the two per-linear tables")
    p.add_argument("--json", metavar="OUT", default=None, help="also write every figure as JSON")
    args = p.parse_args(argv)
    for flag in ("threads", "windows", "seqlen", "top"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag}: expected a positive int, got {getattr(args, flag)}")
    torch.set_num_threads(args.threads)
    header = {"command": shlex.join([sys.executable, *sys.argv] if argv is None else ["bench_mxfp4_vs_int4.py", *argv]),
              "commit": git_commit(), "cpu": cpu_model(), "threads": torch.get_num_threads()}
    for k, v in header.items():
        print(f"{k}: {v}")
    t0 = time.perf_counter()
    try:
        summary = compare_exports(args.int4, args.mxfp4, args.model, args.windows, args.seqlen, args.seed,
                                  args.data, args.top)
    except ValueError as exc:
        msg = str(exc)
        flags = {a.dest for a in p._actions}
        raise SystemExit("--" + msg if msg.split(":", 1)[0] in flags else msg) from None
    exports = summary["exports"]
    print(f"model: {summary['model']} ({summary['layers']} decoder layers); text: {summary['windows']} window(s) of "
          f"{summary['seqlen']} tokens of {summary['data']} (seed {summary['seed']}), {summary['tokens']} tokens")
    for e in EXPORTS:
        kinds = ", ".join(f"{n} {s}" for s, n in exports[e]["schemes"].items())
        print(f"{e}: {exports[e]['path']} ({kinds}; {exports[e]['seconds']:.0f} s)")
    fitted = "; ".join(f"{e} " + ", ".join(f"{g} {sum(v) / len(v):.3g} (max {max(v):.3g})"
                                          for g, v in exports[e]["pair_deficit"].items()) for e in EXPORTS)
    if fitted.strip():
        print("fitted smoothing d of o_proj and down_proj: mean weight scale deficit per linear of v+o and up+down "
              f"(split evenly between the two), mean over layers: {fitted}")
    print()
    print(format_tables(summary))
    summary.update(header, seconds=time.perf_counter() - t0)
    print(f"\ntotal {summary['seconds']:.0f} s")
    if args.json:
        atomic_write_text(args.json, json.dumps(summary, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
