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
# # 04 · The KV cache at 4 bits: K and V per head before and after `T_k` / `T_v`, and the KV clip
#
# FlatQuant's W4A4KV4 (docs/kv-cache.md, "KV4") keeps K and V in a 4-bit cache, asymmetric per token
# and per head. Two learned `head_dim x head_dim` matrices per layer make that work: `T_k`, applied
# online after RoPE (`q T_k^{-T}`, `k T_k`, so the attention scores do not change), and `T_v`, folded
# into `v_proj` and `o_proj`. Each cache also learns a pair of clip ratios (max, min) for K and for V.
# This is a research mode: vllm-ascend has no 4-bit KV cache and does not serve it.
#
# This notebook quantizes the bundled model with `QuantConfig(kv_cache="KV4")` (W4A4 FlatQuant,
# GPTQ weights, the `fast` profile), or loads a saved KV4 checkpoint, and then for one layer:
# shows how far the channels of each head stick out before and after the transforms, and the
# 4-bit error of each head; sweeps the KV clip ratios of K and of V against the attention-output
# error, with the learned ones marked; and, over a few windows of the evaluation text, measures
# token perplexity with the learned clips, with clip 1 everywhere, and of the float model.
#
# The K and V shown are what the cache receives on calibration-text tokens; perplexity is
# measured on the evaluation split, which nothing here tunes on.

# %% tags=["parameters"]
model: str = "smollm2-135m"  # float model: alias or local Hugging Face directory
dtype = "auto"  # "auto" (the model's or checkpoint's own, from its config.json), "float32", "bfloat16", "float16"
data = None  # evaluation text, for perplexity only (.jsonl or text file); None: bundled eval split
calib_data = None  # calibration text (.jsonl or text file); None: bundled calib split
backend = None  # "npu", "reference", or None: npu on an Ascend host, else reference
threads = None  # torch CPU threads; None: torch's default (on a busy machine, 1 avoids thrashing)
smoke: bool = False  # CI size: 2 layers, a token calibration budget, short windows
quantized_dir = None  # a saved KV4 checkpoint of model (flatquant-lab quantize --kv-cache KV4); None: quantize here:
method: str = "flatquant"  # "flatquant" (learns T_k, T_v and the clips), "hadamard" or "rtn" (fixed, clip 1)
weight_quantizer: str = "gptq"  # "gptq" or "rtn"
profile: str = "fast"  # calibration budget (recipe.PROFILES)
kv_transforms: str = "kv"  # "kv": learn T_k and T_v; "none": identity, the clips alone
layer = None  # the decoder layer to look at; None: the middle one
windows: int = 2  # calibration windows whose K and V are shown
window: int = 256  # tokens per window
clips = None  # KV clip ratios to sweep; None: numerics.DEFAULT_KV_CLIPS
ppl_windows: int = 8  # token perplexity: this many windows of ppl_window tokens of the evaluation text
ppl_window: int = 512
seed: int = 0
figure_path = None  # where to save the per-head figure (PNG)

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

from flatquant_lab.data import bundled_data_path, calibration_ids
from flatquant_lab.eval import token_perplexity
from flatquant_lab.hub import load_model
from flatquant_lab.io import load_quantized
from flatquant_lab.models import kv_caches
from flatquant_lab.notebook import calibration_for, checkpoint_dtype, smoke_budget
from flatquant_lab.numerics import DEFAULT_KV_CLIPS, capture_kv, head_table, kv_clip_sweep, transform_views
from flatquant_lab.recipe import QuantConfig

for pname, pval in (("windows", windows), ("window", window), ("ppl_windows", ppl_windows),
                    ("ppl_window", ppl_window)):
    if isinstance(pval, bool) or not isinstance(pval, int) or pval < 1:
        raise ValueError(f"{pname}: expected a positive int, got {pval!r}")
if isinstance(clips, str):  # papermill -p passes text; lists go through -y / -f
    raise ValueError(f"clips: expected a list of floats in (0, 1], got the string {clips!r}")
clips = [float(c) for c in (clips if clips is not None else DEFAULT_KV_CLIPS)]
if smoke:
    windows, window = min(windows, 1), min(window, 32)
    ppl_windows, ppl_window = min(ppl_windows, 2), min(ppl_window, 128)
    clips = clips[:: max(1, len(clips) // 3)][:3]
eval_source = data or bundled_data_path("eval")
calib_source = calib_data or bundled_data_path("calib")
ckpt_dtype = checkpoint_dtype(dtype)  # checked here; None: the checkpoint's own
num_layers = 2 if smoke else None

# %% [markdown]
# ## Models
#
# The KV4 model reads its 4-bit cache in every forward (`load_quantized` and `quantize` turn that
# attention on); the float model is the perplexity reference.

# %%
if quantized_dir is not None:
    qmodel = load_quantized(quantized_dir, backend=backend, dtype=ckpt_dtype)
    num_layers = qmodel.config.num_hidden_layers
    fmodel, tok = load_model(model, dtype=dtype, num_layers=num_layers)
else:
    fmodel, tok = load_model(model, dtype=dtype, num_layers=num_layers)
    qcfg = QuantConfig(method=method, weight_quantizer=weight_quantizer, profile=profile, seed=seed,
                       kv_cache="KV4", kv_transforms=kv_transforms, **(smoke_budget(method) if smoke else {}))
    qmodel = fq.quantize(copy.deepcopy(fmodel), qcfg, calibration_for(qcfg, calib_source, tok, seed=seed),
                         backend=backend)
    print(f"quantized here: method {qcfg.method}, {qcfg.weight_quantizer} weights, profile {qcfg.profile}, "
          f"KV4 with kv_transforms={kv_transforms!r}, calibration text {calib_source}")
fmodel.to(device)
qmodel.to(device)
caches = kv_caches(qmodel)
if not caches or any(type(c) is not fq.KV4Cache for c in caches.values()):
    raise ValueError(f"quantized_dir: {quantized_dir} holds no KV4 cache (kv_cache_type 'KV4'); "
                     "quantize with --kv-cache KV4")
prefixes = list(caches)
layer = len(prefixes) // 2 if layer is None else int(layer)
if not 0 <= layer < len(prefixes):
    raise ValueError(f"layer: expected 0 to {len(prefixes) - 1}, got {layer}")
prefix = prefixes[layer]
cache = caches[prefix]
print(f"{len(caches)} KV4 caches; looking at {prefix}: {cache}")

# %% [markdown]
# ## K and V per head, before and after the transforms
#
# `max/rms`: the largest channel's abs-max over the RMS of all channels of the head, a measure of
# how far one channel sticks out (a per-token 4-bit grid must span it). The 4-bit error is the
# relative error of the cache's round trip at clip 1 on the same values. K "before" is K after
# RoPE as the model computes it; V "before" is `v T_v^{-1}` (the checkpoint's `v_proj` has `T_v`
# folded in).

# %%
ids = calibration_ids(calib_source, tok, windows, window, seed=seed).to(device)
kv = capture_kv(qmodel, ids)
views = transform_views(cache, kv[prefix]["key"], kv[prefix]["value"])
heads = pd.DataFrame(head_table(views))
display(smoke_table(heads.pivot(index="head", columns="view", values=["max_over_rms", "kv4_rel_error"]).round(3)))

# %%
fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
for ax, (name, x) in zip(axes.flat, views.items()):
    absmax = x.abs().amax(dim=(0, 2))  # [heads, head_dim]: each channel's abs-max over the tokens
    for h in range(absmax.shape[0]):
        ax.plot(absmax[h].cpu().numpy(), label=f"kv head {h}", lw=1)
    ax.set_title(f"{name}: per-channel abs-max")
    ax.set_ylabel("max |x|")
axes[1, 0].set_xlabel("channel within the head")
axes[1, 1].set_xlabel("channel within the head")
axes[0, 0].legend(fontsize=8)
fig.suptitle(f"{prefix}: K and V per head, before and after T_k / T_v")
fig.tight_layout()
nb.show_figure(fig, figure_path)  # smoke stamp, atomic save, show

# %% [markdown]
# ## The KV clip
#
# The attention output of this layer (causal, float32) with K and V through the cache, relative to
# the same attention on the float K and V: first K's clip ratio swept (max and min together, V at
# its learned pair), then V's (K at its learned pair). "learned" is the cache as calibrated; "no
# T_k" quantizes K without its transform (the learned clips).

# %%
sweep = pd.DataFrame(kv_clip_sweep(cache, **kv[prefix], clips=clips))
display(smoke_table(sweep.round(4)))
fixed = sweep[sweep["sweep"].isin(["learned", "no T_k"])].set_index("sweep")["rel_error"]
fig, ax = plt.subplots(figsize=(7.0, 4.2))
for which, marker in (("K", "o"), ("V", "s")):
    part = sweep[sweep["sweep"] == which]
    ax.plot(part["clip"], part["rel_error"], marker=marker, label=f"{which} clip swept")
ax.axhline(fixed["learned"], color="k", ls="--", lw=1, label="learned clips")
ax.axhline(fixed["no T_k"], color="tab:red", ls=":", lw=1, label="learned clips, no T_k")
ax.set_xlabel("clip ratio (max and min)")
ax.set_ylabel("attention output relative error")
ax.set_title(f"{prefix}: KV clip sweep")
ax.legend()
smoke_figure(fig)
plt.show()

# %% [markdown]
# ## Token perplexity with the learned clips and with clip 1
#
# `ppl_windows` windows of the evaluation text. Clip 1 sets every cache's pairs to 1 (no clipping)
# for one measurement and puts the learned ones back.

# %%
learned = {p: (c.k_clip.clone(), c.v_clip.clone()) for p, c in caches.items()}
rows = []
for label in tqdm(["float model", "KV4, learned clips", "KV4, clip 1"], desc="perplexity"):
    target = fmodel if label == "float model" else qmodel
    for p, c in caches.items():
        c.k_clip.copy_(torch.ones(2) if label == "KV4, clip 1" else learned[p][0])
        c.v_clip.copy_(torch.ones(2) if label == "KV4, clip 1" else learned[p][1])
    rows.append({"model": label, "token_ppl": token_perplexity(target, tok, docs=eval_source, window=ppl_window,
                                                               max_windows=ppl_windows)})
for p, c in caches.items():  # the learned clips back
    c.k_clip.copy_(learned[p][0])
    c.v_clip.copy_(learned[p][1])
ppl = pd.DataFrame(rows)
ppl["x float"] = ppl["token_ppl"] / ppl["token_ppl"].iloc[0]
display(smoke_table(ppl.round(4)))
print(f"done in {time.perf_counter() - t_start:.0f} s")
