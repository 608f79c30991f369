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
# # 01 · What "flat" means: one W4A4 layer before and after the Kronecker transform
#
# The W4A4 path quantizes every token's activations to int4 with **one scale per token**
# (`max |b| * c / 7`). A few outlier channels set that scale, and every other channel of the
# token is left with a handful of the 16 levels. FlatQuant multiplies each token by a
# Kronecker-factored matrix, `x -> x @ kron(L, R)` (folded into the weights as
# `W @ kron(L, R)^-T`, so the layer's result is unchanged in exact arithmetic), which spreads
# the outliers' energy over all channels: the per-channel magnitudes become *flat*.
#
# This notebook takes one linear of the bundled model (its real input activations, captured
# with a forward hook on a short text) or a random layer with planted outlier channels, and
# compares three transforms: identity (plain RTN), a fixed Hadamard (QuaRot-style) and a
# transform calibrated with FlatQuant for this layer. Then `check_linear` reports the int4
# path against the dequantized reference and against the float layer.

# %% tags=["parameters"]
model: str = "smollm2-135m"  # model alias or local Hugging Face directory (flatquant_lab.hub.load_model)
dtype = "auto"  # model dtype: "auto" (the model's own, from its config.json), "float32", "bfloat16" or "float16"
data = None  # text for the activations (.jsonl with a "text" field, or a text file); None: bundled eval split
calib_data = None  # text for calibrating the FlatQuant transform (.jsonl or text file); None: bundled calib split
backend = None  # "npu", "reference", or None: npu on an Ascend host, else reference
threads = None  # torch CPU threads; None: torch's default (on a busy machine, 1 avoids thrashing)
smoke: bool = False  # CI size: 2 layers, 64 tokens, a token calibration budget
source: str = "model"  # "model": a real layer's inputs; "random": random tokens with planted outliers
layer: int = 0  # decoder layer, for source "model"
linear: str = "mlp.down_proj"  # linear inside that layer; down_proj inputs are heavy-tailed (docs/results.md)
tokens: int = 256  # tokens of activations
calibrate: bool = True  # also learn a FlatQuant transform for this layer (source "model" only)
weight_quantizer: str = "gptq"  # that layer's int4 weights: "gptq" or "rtn" (QuantConfig()'s default: gptq)
profile: str = "fast"  # its calibration budget (recipe.PROFILES; QuantConfig()'s default: fast)
calib_samples = None  # calibration windows x tokens, and epochs, for that transform; None: the profile's
calib_seqlen = None
calib_epochs = None
outlier_channels: int = 8  # source "random": how many input channels are scaled up, and by how much
outlier_scale: float = 20.0
random_in_features: int = 1536  # source "random": layer size
random_out_features: int = 576
seed: int = 0
figure_path = None  # where to save the main figure (PNG), e.g. "../docs/img/01_activation_flatness.png"

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
from flatquant_lab.recipe import QuantConfig
from flatquant_lab.data import bundled_data_path, concat_token_ids, load_texts
from flatquant_lab.hub import load_model
from flatquant_lab.kronecker import decompose_dim, kron_apply
from flatquant_lab.models import GROUPS, LINEAR_NAMES
from flatquant_lab.notebook import calibration_for, smoke_budget
from flatquant_lab.numerics import check_linear, random_problem
from flatquant_lab.transforms import orthogonal_factor

if source not in ("model", "random"):
    raise ValueError(f"source: expected 'model' or 'random', got {source!r}")
if source == "model" and linear not in LINEAR_NAMES:
    raise ValueError(f"linear: expected one of {list(LINEAR_NAMES)}, got {linear!r}")
if smoke:
    tokens = min(tokens, 64)
num_layers = 2 if smoke else layer + 1  # later layers are never needed
if source == "model" and not (isinstance(layer, int) and 0 <= layer < num_layers):
    raise ValueError(f"layer: expected an int in [0, {num_layers - 1}]"
                     f"{' (smoke runs keep 2 layers)' if smoke else ''}, got {layer!r}")

# %% [markdown]
# ## The layer and its input activations
#
# With `source="model"` a forward pre-hook on the chosen linear records what it receives
# while the (float) model reads the first `tokens` tokens of the text.

# %%
if source == "model":
    fmodel, tok = load_model(model, dtype=dtype, num_layers=num_layers)
    fmodel.to(device)
    name = f"model.layers.{layer}.{linear}"
    float_lin = fmodel.get_submodule(name)
    ids = concat_token_ids(load_texts(data or bundled_data_path("eval")), tok)[:tokens]
    captured = []
    hook = float_lin.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            fmodel(ids[None].to(device))
    finally:
        hook.remove()
    x = captured[0].reshape(-1, float_lin.in_features).float().cpu()
else:
    float_lin, x = random_problem(random_in_features, random_out_features, tokens,
                                  outlier_channels, outlier_scale, seed=seed)
    float_lin.to(device)
    name = f"random {random_out_features}x{random_in_features} layer"
n1, n2 = decompose_dim(float_lin.in_features)
print(f"{name}: {tuple(float_lin.weight.shape)}, kron {n1}x{n2}; activations {tuple(x.shape)}, "
      f"max |x| {x.abs().max():.3g}, rms {x.pow(2).mean().sqrt():.3g}")

# %% [markdown]
# ## Three transforms
#
# Identity and Hadamard factors come from `flatquant_lab.transforms.orthogonal_factor`. The
# calibrated transform is FlatQuant's (`quantize(..., QuantConfig(method="flatquant"))`, with
# `QuantConfig()`'s defaults: GPTQ weights and the `fast` profile, on the calibration text `calib_data`)
# on a model truncated after this layer, with every other linear kept in float (`skip`) and
# smoothing off, so that the quantized layer reads exactly the float model's activations. The
# identity and Hadamard layers get round-to-nearest weights (`from_float`); pass
# `weight_quantizer="rtn"` to give the calibrated one the same.

# %%
layers = {}  # transform name -> W4A4FlatQuantLinear built from the float layer
for kind, label in (("identity", "identity (RTN)"), ("hadamard", "Hadamard")):
    left, right = orthogonal_factor(n1, kind, seed), orthogonal_factor(n2, kind, seed + 1)
    layers[label] = fq.W4A4FlatQuantLinear.from_float(float_lin.cpu(), left, right, backend=backend)
float_lin.to(device)

if source == "model" and calibrate:
    group = next(g for g, members in GROUPS.items() if linear in members)
    skip = [f"model.layers.{j}.*" for j in range(layer)]
    skip += [f"model.layers.{layer}.{m}" for g, members in GROUPS.items() if g != group for m in members]
    budget = {k: v for k, v in dict(samples=calib_samples, seqlen=calib_seqlen, epochs=calib_epochs).items()
              if v is not None}
    if smoke:  # a token budget; the clip-ratio grid searches alone cost more than the whole smoke run
        budget = smoke_budget("flatquant")
    cfg = QuantConfig(method="flatquant", weight_quantizer=weight_quantizer, profile=profile, smooth=False,
                      skip=tuple(skip), seed=seed, **budget)
    cmodel, ctok = load_model(model, dtype=dtype, num_layers=layer + 1)
    fq.quantize(cmodel, cfg, calibration_for(cfg, calib_data or bundled_data_path("calib"), ctok, seed=seed),
                backend=backend)
    layers["FlatQuant (calibrated)"] = cmodel.get_submodule(name).cpu()
    rep = cmodel.flatquant_report["layers"][layer]
    # What the layer holds (its float32 clip_ratio buffer): the end-to-end stage may have moved the layer-wise value.
    held = float(layers["FlatQuant (calibrated)"].clip_ratio)
    learned = rep["clip_ratios"][group]
    print(f"calibrated {group} transform of layer {layer} ({cfg.weight_quantizer} weights, profile {cfg.profile}) "
          f"in {rep['seconds']:.1f} s; epoch losses {[round(v, 4) for v in rep['epoch_losses']]}; "
          f"clip ratio the layer holds {held:.4g}"
          + (f" (the layer-wise stage's {learned:.4g}, tuned end to end)" if f"{learned:.4g}" != f"{held:.4g}" else ""))
    del cmodel

# What the op quantizes: each token times kron(L, R) with the factors the layer holds.
transformed = {label: kron_apply(x.double(), q.left_trans.double(), q.right_trans.double())
               for label, q in layers.items()}

def token_peak_to_rms(v):
    """Mean over tokens of max|v_t| / rms(v_t): 1 is perfectly flat; the int4 grid hates large values."""
    return float((v.abs().amax(-1) / v.pow(2).mean(-1).sqrt().clamp_min(1e-30)).mean())

flatness = {label: token_peak_to_rms(v) for label, v in transformed.items()}
smoke_table(pd.Series(flatness, name="per-token max/rms").to_frame())

# %% [markdown]
# ## Per-channel magnitude before and after
#
# Each panel plots, per input channel, the largest and the mean `|value|` over the captured
# tokens. Before the transform a few channels tower over the rest; after it the profile is
# flat, so one per-token int4 scale suits every channel.

# %%
fig, axes = plt.subplots(1, len(transformed), figsize=(4.2 * len(transformed), 3.6), sharey=True,
                         squeeze=False)
for ax, (label, v) in zip(axes[0], transformed.items()):
    ch = torch.arange(v.shape[1])
    ax.plot(ch, v.abs().amax(0), lw=0.7, color="tab:red", label="max over tokens")
    ax.plot(ch, v.abs().mean(0), lw=0.7, color="tab:blue", label="mean over tokens")
    ax.set_title(f"{label}\nper-token max/rms {flatness[label]:.1f}", fontsize=10)
    ax.set_xlabel("input channel")
axes[0, 0].set_ylabel("|activation|")
axes[0, 0].legend(loc="upper right", fontsize=8)
fig.suptitle(f"{name}: per-channel activation magnitude ({x.shape[0]} tokens)", fontsize=11)
fig.tight_layout()
nb.show_figure(fig, figure_path)  # smoke stamp, atomic save, show

# %% [markdown]
# ## Histograms: activations and weights
#
# Per transform (columns): the activation values it hands to the int4 quantizer (log
# counts), the float weights it folds to (`fold_weight(W, L, R)`, what gets quantized) and
# the int4 codes the W4A4 layer stores (`weight_int`, -8..7). Flatter inputs to the int4 grid
# use more of its 16 levels.

# %%
from flatquant_lab.kronecker import fold_weight

labels = list(layers)
w = float_lin.weight.detach().cpu()
fig, axes = plt.subplots(3, len(labels), figsize=(3.8 * len(labels), 8.4), squeeze=False)
for j, label in enumerate(labels):
    q = layers[label]
    axes[0, j].hist(transformed[label].flatten().numpy(), bins=120, color="tab:blue")
    axes[0, j].set_yscale("log")
    axes[0, j].set_title(f"{label}\nactivations", fontsize=10)
    folded = fold_weight(w, q.left_trans.double(), q.right_trans.double())
    axes[1, j].hist(folded.flatten().numpy(), bins=120, color="tab:orange")
    axes[1, j].set_title("weights in the transformed basis", fontsize=10)
    codes = torch.bincount(q.weight_int.flatten().long() + 8, minlength=16)
    axes[2, j].bar(torch.arange(-8, 8).numpy(), codes.numpy(), color="tab:green")
    axes[2, j].set_title("int4 weight codes", fontsize=10)
    axes[0, j].set_xlabel("value")
    axes[1, j].set_xlabel("value")
    axes[2, j].set_xlabel("int4 value")
axes[0, 0].set_ylabel("count (log)")
axes[1, 0].set_ylabel("count")
axes[2, 0].set_ylabel("count")
fig.tight_layout()
smoke_figure(fig)
plt.show()

# %% [markdown]
# ## `check_linear`: the int4 path against its references
#
# Per transform: (a) the int4 path (`ops.kronecker_quant` + `ops.quant_matmul` on the chosen
# backend) against a float64 dequantized reference, with an error bound of about half an
# output ulp; (b) the int4 path against the float layer (SQNR, cosine, relative error);
# (c) the transform alone at full precision (it must cancel to float64 rounding). The table
# shows each report whole, one column per transform; below it, the last one as `check_linear`
# prints it.

# %%
reports = {}
for label, q in tqdm(layers.items(), desc="check_linear"):
    reports[label] = check_linear(q.to(device), x.to(device), float_lin)
# Every field of each report, one column per transform.
smoke_table(pd.DataFrame({label: r.to_dict() for label, r in reports.items()}))

# %%
last = list(reports)[-1]
print(f"full report, {last}{' (smoke run: numbers meaningless)' if smoke else ''}:\n")
print(reports[last].table())

# %%
print(f"01_numerics done in {time.perf_counter() - t_start:.1f} s")
