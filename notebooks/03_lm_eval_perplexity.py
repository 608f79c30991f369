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
# # 03 · lm-eval perplexity: float, RTN, Hadamard, FlatQuant, and a model-wide clip ratio
#
# Word perplexity on the bundled held-out Wikipedia articles (lm-eval task `wiki_fq_eval`,
# offline, through `flatquant_lab.eval.evaluate`) for the float model and for three
# W4A4 checkpoints in the vllm-ascend format: RTN (identity transforms), Hadamard (fixed
# orthogonal Kronecker factors) and FlatQuant (learned transforms, smoothing and clipping).
# Saved checkpoints can be passed in; any that is missing is quantized and saved here, with
# `QuantConfig()`'s defaults (GPTQ weights, the `fast` profile) on the calibration text
# `calib_data`: all three get the same weight quantizer, so they differ in their transforms only.
# Then one checkpoint gets every W4A4 layer's clip ratio overridden to the same `r`, for a
# range of `r` (one value for all layers keeps the fused q/k/v and gate/up shards identical).

# %% tags=["parameters"]
model: str = "smollm2-135m"  # float model: alias or local Hugging Face directory
dtype = "auto"  # "auto" (the model's or checkpoint's own, from its config.json), "float32", "bfloat16", "float16"
calib_data = None  # calibration text for checkpoints made here (.jsonl or text file); None: bundled calib split
backend = None  # "npu", "reference", or None: npu on an Ascend host, else reference
threads = None  # torch CPU threads; None: torch's default (on a busy machine, 1 avoids thrashing)
smoke: bool = False  # CI size: 2 layers, 2 documents, 2 ratios, a token calibration budget
rtn_dir = None  # saved W4A4 checkpoints of model (flatquant-lab quantize); None: quantize here
hadamard_dir = None
flatquant_dir = None
work_dir = None  # where checkpoints quantized here are saved; None: outputs/03_lm_eval_perplexity-<smoke|full>
weight_quantizer: str = "gptq"  # int4 weights of a checkpoint made here: "gptq" or "rtn" (QuantConfig()'s default)
profile: str = "fast"  # calibration budget of a checkpoint made here (recipe.PROFILES; QuantConfig()'s default)
task: str = "wiki_fq_eval"  # lm-eval perplexity task (the bundled held-out articles)
limit = None  # evaluate the first limit documents; None: all of them
docs = None  # or these document indices (lm-eval samples), e.g. [1, 2]; not with limit
max_length: int = 512  # lm-eval rolling window
clip_ratios = None  # model-wide clip ratios to sweep; None: 1.0 down to 0.7
sweep_method: str = "hadamard"  # which checkpoint the sweep runs on: rtn, hadamard or flatquant
figure_path = None  # where to save the perplexity-vs-clip-ratio plot (PNG)

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
from flatquant_lab.recipe import PROFILES, QuantConfig
from flatquant_lab.data import bundled_data_path, load_texts
from flatquant_lab.eval import evaluate
from flatquant_lab.io import load_quantized, save_quantized
from flatquant_lab.models import linear_weight_bytes
from flatquant_lab.hub import load_model
from flatquant_lab.notebook import calibration_for, checkpoint_dtype, smoke_budget

METHODS = ("rtn", "hadamard", "flatquant")
saved = {"rtn": rtn_dir, "hadamard": hadamard_dir, "flatquant": flatquant_dir}
if sweep_method not in METHODS:
    raise ValueError(f"sweep_method: expected one of {METHODS}, got {sweep_method!r}")
if profile not in PROFILES:
    raise ValueError(f"profile: expected one of {tuple(PROFILES)}, got {profile!r}")
for pname, pval in (("clip_ratios", clip_ratios), ("docs", docs)):
    if isinstance(pval, str):  # papermill -p passes text; lists go through -y / -f
        raise ValueError(f"{pname}: expected a list, got the string {pval!r}")
clip_ratios = [float(r) for r in (clip_ratios if clip_ratios is not None else (1.0, 0.95, 0.9, 0.85, 0.8, 0.7))]
if not clip_ratios:
    raise ValueError("clip_ratios: expected at least one clip ratio in (0, 1], got none")
ckpt_dtype = checkpoint_dtype(dtype)  # checked here; None: each checkpoint's own
calib_source = calib_data or bundled_data_path("calib")
num_layers = None
if smoke:
    num_layers = 2
    if docs is None and limit is None and task == "wiki_fq_eval":
        # its two shortest articles: whole articles are scored, and the first two hold ~8,000 tokens
        lengths = [len(t) for t in load_texts(bundled_data_path("eval"))]
        docs = sorted(sorted(range(len(lengths)), key=lengths.__getitem__)[:2])
    elif docs is None and limit is None:
        limit = 2
    clip_ratios = clip_ratios[:: max(1, len(clip_ratios) - 1)][:2]  # the two ends
if docs is not None and limit is not None:
    raise ValueError(f"docs: expected None when limit is given (limit={limit!r}, docs={docs!r}); pick one")
select = {"samples": {task: [int(i) for i in docs]}} if docs is not None else {"limit": limit}
docs_label = (f"documents {list(docs)}" if docs is not None else
              "all documents" if limit is None else f"first {limit} documents")
work_dir = os.path.abspath(work_dir) if work_dir else output_folder("03_lm_eval_perplexity")
print(f"task {task}, {docs_label}, clip ratios {clip_ratios}, checkpoints in {work_dir}")

# %% [markdown]
# ## Checkpoints
#
# Each missing checkpoint is made with `quantize` and written with `save_quantized`, exactly
# as `flatquant-lab quantize` would; every evaluation below loads it back with
# `load_quantized`, so what is measured is what vllm-ascend would be given. They go to
# `work_dir`, by default `outputs/03_lm_eval_perplexity-<smoke|full>/` beside this notebook
# (git-ignored, overwritten by the next run): pass them back as `rtn_dir` / `hadamard_dir` /
# `flatquant_dir` to skip quantizing, or delete the folder.

# %%
fmodel, tok = load_model(model, dtype=dtype, num_layers=num_layers)
for method in METHODS:
    if saved[method] is not None:
        continue
    t0 = time.perf_counter()
    m, _ = load_model(model, dtype=dtype, num_layers=num_layers)
    # a smoke run's budget is a token one; the clip grid searches alone would outlast it
    cfg = QuantConfig(method=method, weight_quantizer=weight_quantizer, profile=profile,
                      **(smoke_budget(method) if smoke else {}))
    ids = calibration_for(cfg, calib_source, tok)  # None when cfg uses no data (RTN weights, no training)
    fq.quantize(m, cfg, ids, backend=backend)
    saved[method] = save_quantized(m, os.path.join(work_dir, method), tokenizer=tok, overwrite=True)
    print(f"{method}: quantized ({cfg.weight_quantizer} weights, profile {cfg.profile}, {next(m.parameters()).dtype}, "
          f"calibration text {calib_source if ids is not None else 'none'}) and saved to {saved[method]} "
          f"in {time.perf_counter() - t0:.0f} s")
    del m
print(f"{work_dir}: {folder_mib(work_dir):.0f} MiB of checkpoints (delete the folder when done with them)")
smoke_table(pd.Series({k: str(v) for k, v in saved.items()}, name="checkpoint").to_frame())


# %% [markdown]
# ## Perplexity of each model
#
# `evaluate` runs lm-eval's `simple_evaluate` on the model in memory (rolling windows of
# `max_length` tokens over each whole document) and returns lm-eval's results dict; the
# task reports word perplexity, byte perplexity and bits per byte. Each evaluation shows one
# progress bar, over the tokens it scores.

# %%
def lm_eval_ppl(m, label):
    res = evaluate(m, tok, tasks=(task,), max_length=max_length, progress=label, **select)["results"][task]
    return {"word perplexity": res["word_perplexity,none"], "byte perplexity": res["byte_perplexity,none"],
            "bits per byte": res["bits_per_byte,none"]}


def load_checkpoint(method):
    m = load_quantized(saved[method], backend=backend, dtype=ckpt_dtype).to(device)
    if m.config.num_hidden_layers != fmodel.config.num_hidden_layers:
        raise ValueError(f"{method}_dir: {saved[method]} has {m.config.num_hidden_layers} layers, "
                         f"the float model {fmodel.config.num_hidden_layers}; pass checkpoints of {model}"
                         f"{' (smoke runs keep 2 layers)' if smoke else ''}")
    return m


results, weight_bytes = {}, {}
results["float"] = lm_eval_ppl(fmodel.to(device), "float")
weight_bytes["float"] = linear_weight_bytes(fmodel)
for method in METHODS:
    m = load_checkpoint(method)
    results[f"W4A4 {method}"] = lm_eval_ppl(m, f"W4A4 {method}")
    weight_bytes[f"W4A4 {method}"] = linear_weight_bytes(m)
    del m
smoke_table(pd.DataFrame(results).T)

# %% [markdown]
# ## A model-wide clip-ratio override
#
# Every W4A4 group of one checkpoint gets `fq.set_group_clip_ratio(model, group, r)` (q/k/v
# together, gate/up together, as vLLM loads them); the rest (W8A8_DYNAMIC layers have no clip
# ratio) stays as saved.

# %%
sweep_model = load_checkpoint(sweep_method)
sweep = {}
for r in clip_ratios:
    for g in fq.clip_groups(sweep_model):
        fq.set_group_clip_ratio(sweep_model, g, r)
    sweep[r] = lm_eval_ppl(sweep_model, f"W4A4 {sweep_method}, clip ratio {r:g}")
del sweep_model
sweep_df = pd.DataFrame(sweep).T.rename_axis(index="clip ratio")
smoke_table(sweep_df)

# %%
fig, ax = plt.subplots(figsize=(7.0, 4.2))
ax.plot(sweep_df.index, sweep_df["word perplexity"], marker="o", color="black",
        label=f"W4A4 {sweep_method}, every layer at clip ratio r")
styles = {"float": "tab:green", "W4A4 rtn": "tab:red", "W4A4 hadamard": "tab:orange",
          "W4A4 flatquant": "tab:blue"}
# A model far above the sweep (W4A4 RTN, typically) would squash it: list it, but off the axes.
top = 20 * float(sweep_df["word perplexity"].max())
levels = [float(v) for v in sweep_df["word perplexity"]]
for name, color in styles.items():
    v = results[name]["word perplexity"]
    how = "" if name == "float" else " (its saved clip ratios)"
    label = f"{name}{how}: {v:.4g}" + (" (above the plot)" if v > top else "")
    if v > top:
        ax.plot([], [], ls="--", color=color, label=label)
    else:
        ax.axhline(v, ls="--", color=color, label=label)
        levels.append(v)
ax.set_yscale("log")
ax.set_ylim(min(levels) / 1.5, max(levels) * 1.5)
ax.set_xticks(list(sweep_df.index))
ax.set_xlabel("activation clip ratio r (all W4A4 layers)")
ax.set_ylabel(f"word perplexity, {task} (log)")
ax.set_title(f"{model}{' (2 layers)' if smoke else ''}: {task} perplexity vs clip ratio ({docs_label})",
             fontsize=10)
ax.legend(fontsize=8, loc="best")
ax.grid(alpha=0.3, which="both")
fig.tight_layout()
nb.show_figure(fig, figure_path)  # smoke stamp, atomic save, show

# %% [markdown]
# ## Results

# %%
rows = dict(results)
rows.update({f"W4A4 {sweep_method}, all clip ratios {r:g}": v for r, v in sweep.items()})
table = pd.DataFrame(rows).T
table["x float"] = table["word perplexity"] / results["float"]["word perplexity"]
table["linear weights (MiB)"] = pd.Series({k: v / 2**20 for k, v in weight_bytes.items()})
smoke_table(table.style.format({"word perplexity": "{:.4g}", "byte perplexity": "{:.4f}", "bits per byte": "{:.4f}",
                                "x float": "{:.2f}", "linear weights (MiB)": "{:.1f}"}, na_rep=""))

# %%
print(f"03_lm_eval_perplexity done in {time.perf_counter() - t_start:.1f} s")
