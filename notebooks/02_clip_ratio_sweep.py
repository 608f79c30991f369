# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Activation clip ratio: per-layer sweep, choice, and a tuned checkpoint
#
# `npu_kronecker_quant` scales each token by `max |b| * c / 7`: a clip ratio `c < 1` clips the
# largest values and gives every other value a finer grid. Each W4A4 layer stores its `c`
# (`clip_ratio`, float32 `[1]`); vllm-ascend loads q/k/v and gate/up as one fused module each,
# so those shards must share one ratio.
#
# This notebook quantizes the bundled model as `QuantConfig()` does by default (FlatQuant, GPTQ
# weights, the `fast` profile; `method="hadamard"` is much quicker), or loads a saved W4A4
# checkpoint of any method (RTN, Hadamard, FlatQuant), then: explores one layer interactively
# (layer, ratio, backend); sweeps every quantized linear over a grid of ratios (SQNR heatmap);
# picks one ratio per fused group and sets it with `fq.set_group_clip_ratio` (q/k/v together,
# gate/up together); measures token perplexity before and after; and writes the tuned checkpoint
# with `save_quantized(..., overwrite=True)` (atomic) **only if perplexity did not get worse**
# (otherwise it says so, with both figures, and writes it to `<output_dir>-worse` instead).
#
# **Tuning data and evaluation data never meet.** The clip ratios are chosen on activations of
# calibration-set tokens (`flatquant_lab.data.calibration_ids` on the bundled `calib` split, or
# on `calib_data`); perplexity is measured on the evaluation split (`data`), which nothing in
# this notebook tunes on. The two bundled splits hold different Wikipedia articles.

# %% tags=["parameters"]
model: str = "smollm2-135m"  # float model: alias or local Hugging Face directory
dtype = "auto"  # "auto" (the model's or checkpoint's own, from its config.json), "float32", "bfloat16", "float16"
data = None  # evaluation text, for perplexity only (.jsonl or text file); None: bundled eval split
calib_data = None  # calibration text (.jsonl or text file), the only text tuned on here; None: bundled calib split
backend = None  # "npu", "reference", or None: npu on an Ascend host, else reference
threads = None  # torch CPU threads; None: torch's default (on a busy machine, 1 avoids thrashing)
smoke: bool = False  # CI size: 2 layers, 3 ratios, a short perplexity slice
quantized_dir = None  # a saved W4A4 checkpoint of model (any method); None: quantize here, on calib_data, with:
method: str = "flatquant"  # "flatquant", "hadamard" or "rtn"; these three as QuantConfig() defaults them
weight_quantizer: str = "gptq"  # "gptq" or "rtn"
profile: str = "fast"  # calibration budget (recipe.PROFILES)
output_dir = None  # the tuned checkpoint, if perplexity did not get worse (else <output_dir>-worse); None:
#                    outputs/02_clip_ratio_sweep-<smoke|full>/clip_tuned
ratios = None  # clip ratios to sweep; None: 1.0 down to 0.6
tokens: int = 256  # calibration tokens of activations per linear for the sweep: tokens / calib_seqlen windows
calib_seqlen: int = 128  # length of each calibration window (taken at random offsets, seeded)
seed: int = 0
ppl_windows: int = 8  # token perplexity before/after: this many windows of ppl_window tokens
ppl_window: int = 512
figure_path = None  # where to save the heatmap (PNG), e.g. "../docs/img/02_clip_ratio_heatmap.png"

# %%
import os
import time

import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import Markdown, display
from tqdm.auto import tqdm

import flatquant_lab as fq
from flatquant_lab.notebook import SMOKE_NOTICE, folder_mib, setup

# backend, threads and smoke checked; logging as information; FLATQUANT_BACKEND set for layers built below
nb = setup(backend=backend, threads=threads, smoke=smoke)
backend, device, on_ascend = nb.backend, nb.device, nb.on_ascend
smoke_figure, smoke_table, output_folder = nb.smoke_figure, nb.smoke_table, nb.output_folder
if figure_path is not None:
    figure_path = os.path.abspath(figure_path)
    os.makedirs(os.path.dirname(figure_path), exist_ok=True)
t_start = nb.started
print(nb.banner())
if smoke:
    display(Markdown(f"**{SMOKE_NOTICE}**"))

# %%
import copy

import ipywidgets as widgets

from flatquant_lab.recipe import QuantConfig
from flatquant_lab.data import bundled_data_path, calibration_ids
from flatquant_lab.notebook import calibration_for, checkpoint_dtype, smoke_budget
from flatquant_lab.eval import token_perplexity
from flatquant_lab.io import load_quantized, save_quantized
from flatquant_lab.models import quantized_linear_names
from flatquant_lab.hub import load_model
from flatquant_lab.models import GROUPS
from flatquant_lab.numerics import DEFAULT_RATIOS, check_linear, sweep_layer_clip_ratio

if isinstance(ratios, str):  # papermill -p passes text; lists go through -y / -f
    raise ValueError(f"ratios: expected a list of floats in (0, 1], got the string {ratios!r}")
ratios = [float(r) for r in (ratios if ratios is not None else DEFAULT_RATIOS)]
if not ratios:
    raise ValueError("ratios: expected at least one clip ratio in (0, 1], got none")
if smoke:
    ratios = ratios[:: max(1, len(ratios) // 3)][:3]
    tokens, calib_seqlen = min(tokens, 64), min(calib_seqlen, 32)
    ppl_windows, ppl_window = min(ppl_windows, 2), min(ppl_window, 128)
for pname, pval in (("tokens", tokens), ("calib_seqlen", calib_seqlen)):
    if isinstance(pval, bool) or not isinstance(pval, int) or pval < 1:
        raise ValueError(f"{pname}: expected a positive int, got {pval!r}")
if tokens % calib_seqlen:
    raise ValueError(f"tokens: expected a multiple of calib_seqlen={calib_seqlen} (whole windows), got {tokens}")
eval_source = data or bundled_data_path("eval")
calib_source = calib_data or bundled_data_path("calib")
paths = all(isinstance(v, (str, os.PathLike)) for v in (eval_source, calib_source))
if paths and os.path.realpath(eval_source) == os.path.realpath(calib_source):
    raise ValueError(f"calib_data: {calib_source} is the evaluation text too; tuning on it would make the "
                     "perplexity below meaningless. Pass a separate calibration text, or None for the bundled one")
ckpt_dtype = checkpoint_dtype(dtype)  # checked here; None: the checkpoint's own
num_layers = 2 if smoke else None

# %% [markdown]
# ## Models
#
# The W4A4 model is what gets swept and tuned; the float model is the perplexity reference.
# Each linear is swept on the inputs it sees inside the W4A4 model, against itself with
# unquantized activations (`sweep_layer_clip_ratio`'s default reference:
# `kron_apply(x, L, R) @ W_hat^T`, its own int4 weights). That isolates the error the clip
# ratio trades, and works for any checkpoint: FlatQuant's smoothing is folded into the norms,
# so its layers' inputs are not the float model's, and GPTQ weights are not RTN of the float
# ones.

# %%
if quantized_dir is not None:
    qmodel = load_quantized(quantized_dir, backend=backend, dtype=ckpt_dtype)
    num_layers = qmodel.config.num_hidden_layers
    fmodel, tok = load_model(model, dtype=dtype, num_layers=num_layers)
else:
    fmodel, tok = load_model(model, dtype=dtype, num_layers=num_layers)
    qcfg = QuantConfig(method=method, weight_quantizer=weight_quantizer, profile=profile, seed=seed,
                       **(smoke_budget(method) if smoke else {}))
    qmodel = fq.quantize(copy.deepcopy(fmodel), qcfg, calibration_for(qcfg, calib_source, tok, seed=seed),
                         backend=backend)
    print(f"quantized here: method {qcfg.method}, {qcfg.weight_quantizer} weights, profile {qcfg.profile}, "
          f"{next(fmodel.parameters()).dtype}, calibration text {calib_source}")
fmodel.to(device)
qmodel.to(device)
# Only W4A4 FlatQuant layers have an activation clip ratio; W8A8_DYNAMIC ones (msModelSlim's o/down) do not.
names = [n for n in quantized_linear_names(qmodel) if isinstance(qmodel.get_submodule(n), fq.W4A4FlatQuantLinear)]
others = [n for n in quantized_linear_names(qmodel) if n not in names]
if not names:
    raise ValueError(f"quantized_dir: {quantized_dir} holds no W4A4 layers")
print(f"{len(names)} W4A4 linears in {qmodel.config.num_hidden_layers} layers; "
      f"clip ratios now: {sorted({round(float(qmodel.get_submodule(n).clip_ratio), 4) for n in names})}"
      + (f"; {len(others)} W8A8_DYNAMIC linears (no clip ratio) left as they are" if others else ""))

# %% [markdown]
# ## Calibration activations
#
# Each W4A4 linear's input, recorded by forward pre-hooks while the W4A4 model reads
# `tokens / calib_seqlen` windows of the calibration text. Everything tuned below (the live
# readout, the sweep, the choice) sees only these activations.

# %%
calib_ids = calibration_ids(calib_source, tok, tokens // calib_seqlen, calib_seqlen, seed=seed)
acts, hooks = {}, []
for n in names:
    hooks.append(qmodel.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: acts.__setitem__(n, args[0].detach().reshape(-1, args[0].shape[-1]).float())))
try:
    with torch.no_grad():
        qmodel(calib_ids.to(device))
finally:
    for h in hooks:
        h.remove()
print(f"captured {calib_ids.numel()} calibration-set tokens ({calib_ids.shape[0]} windows of {calib_seqlen}) "
      f"for each of {len(acts)} linears")

# %% [markdown]
# ## One layer, live
#
# Pick a layer, a clip ratio and a backend: the readout is that layer's SQNR at the ratio (on a
# copy; the model is not touched) and `check_linear`'s verdict on its int4 path, the curve its
# SQNR over a fine grid of ratios. The controls need a live kernel (JupyterLab); a saved copy of
# the notebook keeps the readout of the values it was saved with.

# %%
grid = [round(float(r), 3) for r in torch.linspace(0.5, 1.0, 6 if smoke else 26)]
backends = ["reference"] + (["npu"] if on_ascend else [])
_probes, _curves = {}, {}


def probe(name, be):
    # A copy of the model's layer on backend be, so that the slider never changes the model.
    if (name, be) not in _probes:
        q = qmodel.get_submodule(name)
        _probes[name, be] = fq.W4A4FlatQuantLinear.from_checkpoint(
            q.checkpoint_tensors(), backend=be, act_dtype=q.act_dtype).to(device)
    return _probes[name, be]


def sqnr_curve(name, be):
    if (name, be) not in _curves:
        res = sweep_layer_clip_ratio(probe(name, be), acts[name], grid)
        _curves[name, be] = [row.sqnr_db for row in res.rows]
    return _curves[name, be]


def show(name, ratio, be):
    p = probe(name, be)
    p.set_clip_ratio(ratio)
    (row,) = sweep_layer_clip_ratio(p, acts[name], [ratio]).rows
    rep = check_linear(p, acts[name])
    print(f"{'[smoke run: numbers meaningless] ' if smoke else ''}"
          f"{name} at clip ratio {ratio:.3f} on {rep.backend}: SQNR {row.sqnr_db:.2f} dB, "
          f"relative error {row.rel_err:.4f} (against unquantized activations); int4 path within its "
          f"bound of the dequantized reference: {rep.bound_ok}")
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    ax.plot(grid, sqnr_curve(name, be), marker=".", label="SQNR vs unquantized activations")
    ax.plot([ratio], [row.sqnr_db], "o", color="tab:red", label=f"clip ratio {ratio:.3f}")
    ax.set_xlabel("activation clip ratio")
    ax.set_ylabel("SQNR (dB)")
    ax.set_title(name, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    smoke_figure(fig)
    plt.show()


layer_dd = widgets.Dropdown(options=names, value=names[-1], description="layer")
ratio_sl = widgets.FloatSlider(value=1.0, min=0.5, max=1.0, step=0.01, description="clip ratio",
                               continuous_update=False, readout_format=".2f")
backend_dd = widgets.Dropdown(options=backends, value=backend, description="backend")
# interactive_output draws the readout once now, then again whenever a control changes
live = widgets.interactive_output(show, {"name": layer_dd, "ratio": ratio_sl, "be": backend_dd})
display(widgets.VBox([widgets.HBox([layer_dd, ratio_sl, backend_dd]), live]))

# %% [markdown]
# ## Every linear, every ratio
#
# `sweep_layer_clip_ratio` per linear: SQNR of the W4A4 layer at each ratio against itself with
# unquantized activations, on that linear's captured inputs (the layer keeps its ratio). One
# panel per linear kind; a dot marks each row's best.

# %%
rows = {}
for n in tqdm(names, desc="sweep"):
    rows[n] = [row.sqnr_db for row in sweep_layer_clip_ratio(qmodel.get_submodule(n), acts[n], ratios).rows]
sqnr = pd.DataFrame.from_dict(rows, orient="index", columns=ratios)
sqnr.columns.name = "clip ratio"

kinds = [m for members in GROUPS.values() for m in members]
layer_ids = sorted({int(n.split(".")[2]) for n in names})
vmin, vmax = float(sqnr.min().min()), float(sqnr.max().max())
fig, axes = plt.subplots(1, len(kinds), figsize=(2.0 * len(kinds) + 1.2, 1.6 + 0.22 * len(layer_ids)),
                         sharey=True, squeeze=False, layout="constrained")
for ax, kind in zip(axes[0], kinds):
    block = sqnr.reindex([f"model.layers.{i}.{kind}" for i in layer_ids])
    im = ax.imshow(block.to_numpy(dtype=float), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax,
                   interpolation="nearest")
    best = block.to_numpy(dtype=float).argmax(1)
    ax.plot(best, range(len(layer_ids)), "o", color="white", markersize=3)
    ax.set_title(kind.split(".")[-1], fontsize=10)
    ax.set_xticks(range(len(ratios)))
    ax.set_xticklabels([f"{r:g}" for r in ratios], rotation=90, fontsize=8)
    ax.set_xlabel("clip ratio", fontsize=9)
axes[0, 0].set_yticks(range(len(layer_ids)))
axes[0, 0].set_yticklabels(layer_ids, fontsize=7)
axes[0, 0].set_ylabel("decoder layer")
fig.colorbar(im, ax=axes[0].tolist(), label="SQNR vs unquantized activations (dB)", fraction=0.03, pad=0.02)
fig.suptitle(f"W4A4 SQNR per linear and activation clip ratio ({tokens} calibration tokens each; dot: best)",
             fontsize=11)
nb.show_figure(fig, figure_path)  # smoke stamp, atomic save, show

# %% [markdown]
# ## One ratio per fused group
#
# q/k/v and gate/up must share one clip ratio (vllm-ascend loads each set as one module), so
# each group (`fq.clip_groups`: `model.layers.3.attn` -> q/k/v, `model.layers.3.mlp` -> gate/up;
# o_proj and down_proj are groups of one) takes the ratio with the highest mean SQNR over its
# members. `fq.set_group_clip_ratio(model, group, ratio)` sets a group's members in one call.

# %%
groups = fq.clip_groups(qmodel)  # group -> its W4A4 linears (what was swept)
choice = {g: float(sqnr.loc[members].mean(axis=0).idxmax()) for g, members in groups.items()}
ratio_of = {n: choice[g] for g, members in groups.items() for n in members}  # per linear
at_choice = pd.Series({n: sqnr.loc[n, r] for n, r in ratio_of.items()})
at_first = sqnr[ratios[0]]
print(f"mean SQNR over {len(ratio_of)} linears in {len(choice)} groups: {at_first.mean():.2f} dB at clip ratio "
      f"{ratios[0]:g}, {at_choice.mean():.2f} dB at the chosen ratios")
# layer x group: the ratio each fused module gets
table = pd.Series({(int(g.split(".")[2]), g.rpartition(".")[2]): r for g, r in choice.items()}).unstack()
smoke_table(table.reindex(columns=[g for g in GROUPS if g in table.columns]).rename_axis(index="layer",
                                                                                      columns="group"))


# %% [markdown]
# ## Perplexity before and after, and the tuned checkpoint
#
# Token perplexity (`flatquant_lab.eval.token_perplexity`: the first `ppl_windows`
# windows of `ppl_window` tokens of the evaluation text, which the ratios were not tuned on)
# with the ratios as loaded and with the chosen ones; the float model for reference. The chosen
# ratios are set on the model with `fq.set_group_clip_ratio`, one call per group.
#
# The tuned checkpoint is written to `output_dir` **only if the evaluation perplexity did not get
# worse**. If it got worse, the notebook says so with both figures and writes the checkpoint to
# `<output_dir>-worse` instead, for inspection: nothing at `output_dir` is ever a checkpoint that
# this tuning made worse (an earlier run's checkpoint there is left as it was). Either is written
# with `save_quantized(..., overwrite=True)`, which writes a temporary folder and renames it into
# place: by default into `outputs/02_clip_ratio_sweep-<smoke|full>/clip_tuned` beside this
# notebook (git-ignored; load it with `load_quantized`, pass it to notebook 03, or delete it).

# %%
def ppl(m):
    return token_perplexity(m, tok, eval_source, window=ppl_window, max_windows=ppl_windows)


ppl_fp = ppl(fmodel)
ppl_before = ppl(qmodel)
for g, r in choice.items():
    fq.set_group_clip_ratio(qmodel, g, r)  # every member of the group: one clip_ratio per vLLM fused module
ppl_after = ppl(qmodel)
worse = not ppl_after <= ppl_before  # a NaN counts as worse
smoke_table(pd.DataFrame({"token perplexity (evaluation set)": {
    "float": ppl_fp, "W4A4, ratios as loaded": ppl_before, "W4A4, chosen ratios": ppl_after}}))

# %%
out_dir = os.path.abspath(output_dir or os.path.join(output_folder("02_clip_ratio_sweep"), "clip_tuned"))
target = out_dir + "-worse" if worse else out_dir
mark = " [smoke run: numbers meaningless]" if smoke else ""
if worse:
    print(f"evaluation-set perplexity got WORSE with the chosen clip ratios: {ppl_before:.6g} -> {ppl_after:.6g} "
          f"(float {ppl_fp:.6g}){mark}. The tuned checkpoint is NOT written to {out_dir}; it goes to {target} "
          "for inspection only.")
save_quantized(qmodel, target, tokenizer=tok, overwrite=True)
reloaded = load_quantized(target, backend=backend)
stored = {n: float(reloaded.get_submodule(n).clip_ratio) for n in names}
mismatch = [n for n in names if stored[n] != float(torch.tensor(ratio_of[n], dtype=torch.float32))]
if mismatch:
    raise AssertionError(f"{target}: clip ratios of {mismatch[:3]} did not round-trip")
print(f"wrote {target} ({folder_mib(target):.0f} MiB) with {len(set(choice.values()))} distinct clip ratios"
      + ("" if worse else f"; evaluation-set perplexity {ppl_before:.6g} -> {ppl_after:.6g}, not worse "
                          f"(float {ppl_fp:.6g}){mark}"))

# %%
print(f"02_clip_ratio_sweep done in {time.perf_counter() - t_start:.1f} s")
