"""``QuantConfig``: one small dataclass per quantization run (method, weights, profile, options), validated once.

The per-module recipe maps fnmatch patterns of decoder-linear names to schemes; the first pattern (in
order) that matches a name decides its scheme, ``skip`` patterns before all of them (they mean
``"float"``). A linear no pattern matches stays float.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .devices import ACTIVATIONS, check_device
from .dtypes import HALF_DTYPES, check_half

METHODS = ("rtn", "hadamard", "flatquant")
WEIGHT_QUANTIZERS = ("rtn", "gptq")
FACTOR_PARAMS = ("plain", "svd")
BATCH_ORDERS = ("shuffle", "fixed")
TRAIN_INPUTS = ("float", "quantized")
LAYER_LOSSES = ("mse", "relative")
# Calibration budgets. "paper" is FlatQuant's recipe (docs/method.md, 'Profiles'); "full" and "fast" are CPU
# budgets for the bundled 135M model (fast: ~5 minutes of calibration on 2 idle cores, the end-to-end stage
# included; full: 6x its layer-wise training tokens).
PROFILES = {
    # e2e_*: the end-to-end stage after the layer-wise one (calibrate/e2e.py) on the first e2e_samples windows;
    # off at the paper's scale (unmeasured there: it backpropagates through the whole model).
    "paper": dict(samples=128, seqlen=2048, epochs=15, lr=5e-3, batch_size=4,
                  e2e_samples=112, e2e_holdout=16, e2e_epochs=0, e2e_lr=5e-3, e2e_batch_size=4),
    # full: 96 windows x 2 epochs at batch 2, what keeps the full demo, end-to-end stage included, within its
    # 25-minute budget on 2 cores (docs/results.md, 'The main job, full profile' and "The full profile's budget").
    "full": dict(samples=96, seqlen=256, epochs=2, lr=5e-3, batch_size=2,
                 e2e_samples=32, e2e_holdout=8, e2e_epochs=4, e2e_lr=5e-3, e2e_batch_size=4),
    # fast: batch 2, i.e. 32 optimiser steps per layer instead of 16 on the same tokens: measured better at a
    # similar cost (docs/results.md, 'The layer-wise loop: budget and starting point').
    "fast": dict(samples=32, seqlen=128, epochs=2, lr=5e-3, batch_size=2,
                 e2e_samples=24, e2e_holdout=8, e2e_epochs=4, e2e_lr=5e-3, e2e_batch_size=4),
}


FLATQUANT, W8A8_DYNAMIC, FLOAT = "w4a4_flatquant", "w8a8_dynamic", "float"
SCHEMES = (FLATQUANT, W8A8_DYNAMIC, FLOAT)
FALLBACKS = (W8A8_DYNAMIC, FLOAT)  # what a linear FlatQuant cannot serve may take instead
RECIPES = {
    # FlatQuant on every decoder linear (row-parallel layers then load in vLLM at TP 1 only)
    "w4a4": {"*": FLATQUANT},
    # msModelSlim's W4A4 recipe (example/Qwen/w4a4.py): the row-parallel o/down at W8A8_DYNAMIC
    "msmodelslim": {"*.self_attn.o_proj": W8A8_DYNAMIC, "*.mlp.down_proj": W8A8_DYNAMIC, "*": FLATQUANT},
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class QuantConfig:
    """What ``quantize`` does. ``None`` budget fields take the profile's value.

    ``QuantConfig()`` is what every published figure uses and what ``flatquant-lab quantize`` runs by
    default: method ``flatquant``, GPTQ weights, the ``fast`` profile.

    method: ``flatquant`` (learned Kronecker transforms, smoothing, clipping), ``hadamard``
    (fixed QuaRot-style orthogonal factors) or ``rtn`` (identity factors); all three give the same
    ``W4A4FlatQuantLinear`` modules and export format. weight_quantizer: ``gptq`` (needs calibration
    data, for every method) or ``rtn`` (round to nearest; ``rtn``/``hadamard`` then need no data).
    """

    method: str = "flatquant"
    weight_quantizer: str = "gptq"
    profile: str = "fast"
    samples: int | None = None
    seqlen: int | None = None
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    clip_lr_mult: float = 10.0  # clip factors learn 10x faster (FlatQuant)
    min_lr_ratio: float = 1e-3  # cosine schedule ends at lr * this
    transform_init: str = "hadamard"  # starting point of learned factors: hadamard | random | identity
    smooth: bool = True  # learn a per-channel scale d where it folds exactly
    # SmoothQuant-style init of d = max|x|^alpha / max|W|^(1 - alpha) (the official code: 0.3); 0.5 measured best
    # here, moving more of the gate/up and down inputs' range into the weights (docs/results.md).
    smooth_alpha: float = 0.5
    # Clip factors start as a logit (FlatQuant: 4.0, sigmoid 0.982) or "search": the MSE-best ratio
    # on a grid (weights per channel; activations per transform on calibration tokens), which
    # matters when a CPU budget leaves the factors only a few dozen steps to move.
    weight_clip_init: float | str = "search"
    act_clip_init: float | str = "search"
    learn_weight_clip: bool = True
    learn_act_clip: bool = True
    # Training-loop choices of the official FlatQuant code, each ablatable (bench/bench_ablation.py;
    # results/ablation/ablation.json): only loss_norm helped, so only it is on by default.
    # factor_param "plain" learns L, R directly; "svd" learns L = U diag(s) V^T with U, V kept
    # orthogonal (Cayley retraction around the starting factor) and differentiates through the
    # exact inverse V diag(1/s) U^T.
    factor_param: str = "plain"
    # minimise loss / loss.detach() (the official loop): each batch steps as if its loss were 1; the one
    # official-loop choice that measured better here (docs/results.md, "The layer-wise loop: the official
    # code's choices")
    loss_norm: bool = True
    # The layer loss: "mse" over all tokens (the official loop), or "relative": each token's squared error over
    # its target's mean square, averaged over tokens. In SmolLM2-135M from layer 11 on, the first token of a
    # window (an attention sink) has ~3e4x the others' mean square: under "mse" it is 99% of the loss, and the
    # other tokens barely train (docs/method.md, 'Our calibration: the layer-wise stage'; docs/results.md).
    layer_loss: str = "relative"
    weight_decay: float = 0.0  # AdamW's decoupled decay on every learned tensor (official: 0.01)
    batch_order: str = "shuffle"  # shuffle (seeded, per epoch) | fixed (the official loop)
    # What each layer is trained on: "float", the full-precision model's hidden states (the official
    # loop), or "quantized", those of the model quantized so far (layers 0..i-1 as they will serve),
    # against the full-precision model's outputs either way, so a layer learns to undo its
    # predecessors' error. "quantized" holds a third activation buffer and runs each finished layer once
    # more, for a lower perplexity (docs/results.md, 'The layer-wise loop: budget and starting point').
    train_inputs: str = "quantized"
    # The dtype the W4A4 layers compute in (float16 or bfloat16). None: the model's own for a float16 or bfloat16
    # model (vllm-ascend runs its activations in the model dtype), bfloat16 for a float32 model
    # (resolved by quantize: ``for_model``).
    act_dtype: torch.dtype | None = None
    skip: tuple[str, ...] = ()  # fnmatch patterns of module names kept in float
    # A preset name (RECIPES) or a mapping fnmatch pattern -> scheme (SCHEMES), first match wins.
    recipe: str | Mapping[str, str] = "w4a4"
    fallback: str = W8A8_DYNAMIC  # the scheme of a linear the recipe puts on FlatQuant but the NPU op cannot run
    # vLLM tensor-parallel size the export serves at: row-parallel FlatQuant transforms become
    # kron(I_N, L, R) with (n1, n2) = decompose_dim(K / N), each rank's slice quantized on its own
    tp_size: int = 1
    seed: int = 0
    work_dir: str | None = None  # per-layer results, for resuming an interrupted run
    gptq_damp: float = 0.01
    gptq_block: int = 128
    gptq_act_order: bool = True
    # Clip ratios GPTQ tries beside each row's learned one (which was learned for round-to-nearest); each
    # row keeps the candidate whose GPTQ result has the least output error on the calibration inputs
    # (gptq.gptq_clip_search). Costs one more GPTQ pass per candidate. () : the learned clip only. Off by
    # default: it measured no gain for 40% more calibration time (docs/results.md, "GPTQ's per-row clip").
    gptq_clip_grid: tuple[float, ...] = ()
    # The end-to-end stage (calibrate/e2e.py) after every layer is quantized: a per-row multiplier on each
    # W4A4 weight_scale and one clip_ratio per shared input (q/k/v, gate/up: one each, as vLLM loads them),
    # learned on KL(full-precision logits || quantized logits) over the first e2e_samples calibration
    # windows; None: the profile's (docs/method.md, 'The end-to-end stage'; measurements: docs/results.md).
    e2e_samples: int | None = None
    # Calibration windows the stage never trains on (the last ones): it measures KL on them before it starts and
    # after each epoch, and keeps the best state seen, the starting one included (docs/method.md). None: the
    # profile's, at most a quarter of a smaller calibration set.
    e2e_holdout: int | None = None
    e2e_epochs: int | None = None
    e2e_lr: float | None = None
    e2e_batch_size: int | None = None
    e2e_clip_lr_mult: float = 2.0  # the clip logits' lr over e2e_lr
    cann: str = "8.3"  # which CANN's kronecker_quant limits decide what can run on the NPU
    # Where each decoder layer is calibrated (cpu, cuda, cuda:N, npu, npu:N); None: the model's device.
    device: str | None = None
    # Where the layer inputs and targets are held: on the device, on the host (pinned), or "auto"
    # (the device when they fit in a share of its free memory). Results are the same bit for bit.
    activations: str = "auto"
    # Recompute each decoder layer's attention and MLP blocks in the backward pass (checkpointing): a
    # training step's activation peak becomes the larger block's instead of the layer's, for one more
    # forward per step (bench/bench_scale.py measures both). Same results bit for bit. "auto": on when a
    # training step would keep more activations than the layer's weight bytes and more than
    # calibrate.train.RECOMPUTE_MIN_BYTES (counted per layer by one forward; a 7B layer at 2048 tokens: on).
    # The end-to-end stage likewise recomputes each decoder layer (auto: above calibrate.e2e.E2E_RECOMPUTE_MIN_BYTES).
    recompute_blocks: bool | str = "auto"
    # Fix glibc's mmap threshold for the whole process while calibrating on the host, so that freed large
    # tensors leave the resident set (it cannot be undone: devices.return_freed_host_memory; docs/method.md,
    # 'Memory'). Off for library calls, on in `flatquant-lab quantize`, which owns its process.
    release_host_memory: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        if self.weight_quantizer not in WEIGHT_QUANTIZERS:
            raise ValueError(f"weight_quantizer: expected one of {WEIGHT_QUANTIZERS}, got {self.weight_quantizer!r}")
        if self.profile not in PROFILES:
            raise ValueError(f"profile: expected one of {tuple(PROFILES)}, got {self.profile!r}")
        if self.transform_init not in ("hadamard", "random", "identity"):
            raise ValueError(f"transform_init: expected hadamard, random or identity, got {self.transform_init!r}")
        if self.factor_param not in FACTOR_PARAMS:
            raise ValueError(f"factor_param: expected one of {FACTOR_PARAMS}, got {self.factor_param!r}")
        if self.batch_order not in BATCH_ORDERS:
            raise ValueError(f"batch_order: expected one of {BATCH_ORDERS}, got {self.batch_order!r}")
        if self.layer_loss not in LAYER_LOSSES:
            raise ValueError(f"layer_loss: expected one of {LAYER_LOSSES}, got {self.layer_loss!r}")
        if self.train_inputs not in TRAIN_INPUTS:
            raise ValueError(f"train_inputs: expected one of {TRAIN_INPUTS}, got {self.train_inputs!r}")
        if not (isinstance(self.recompute_blocks, bool) or self.recompute_blocks == "auto"):
            raise ValueError(f"recompute_blocks: expected True, False or 'auto', got {self.recompute_blocks!r}")
        for name in ("loss_norm", "gptq_act_order", "release_host_memory"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if not (_is_float(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay: expected a finite float >= 0, got {self.weight_decay!r}")
        if self.act_dtype is not None:
            check_half(self.act_dtype)
        if self.device is not None:
            self.device = check_device(self.device)
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations: expected one of {ACTIVATIONS}, got {self.activations!r}")
        if isinstance(self.skip, str):
            self.skip = (self.skip,)
        self.skip = tuple(self.skip)
        if isinstance(self.recipe, str):
            if self.recipe not in RECIPES:
                raise ValueError(f"recipe: expected a preset {tuple(RECIPES)} or a mapping pattern -> scheme, "
                                 f"got {self.recipe!r}")
        elif isinstance(self.recipe, Mapping):
            if not self.recipe:
                raise ValueError("recipe: expected at least one pattern -> scheme entry, got an empty mapping")
            for pattern, scheme in self.recipe.items():
                if not isinstance(pattern, str) or not pattern:
                    raise ValueError(f"recipe: expected fnmatch patterns (non-empty str) as keys, got {pattern!r}")
                if scheme not in SCHEMES:
                    raise ValueError(f"recipe: {pattern!r} maps to {scheme!r}; expected one of {SCHEMES}")
            self.recipe = dict(self.recipe)
        else:
            raise ValueError(f"recipe: expected a preset {tuple(RECIPES)} or a mapping pattern -> scheme, "
                             f"got {type(self.recipe).__name__}")
        if not _is_int(self.tp_size) or self.tp_size < 1:
            raise ValueError(f"tp_size: expected a positive int (vLLM's --tensor-parallel-size), got {self.tp_size!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback: expected one of {FALLBACKS}, got {self.fallback!r}")
        for name in ("samples", "seqlen", "batch_size", "gptq_block", "e2e_samples", "e2e_holdout", "e2e_batch_size"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        for name in ("epochs", "e2e_epochs"):  # 0: no training (of the layers; of the end-to-end stage)
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 0):
                raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
        for name in ("lr", "e2e_lr"):
            v = getattr(self, name)
            if v is not None and not (_is_float(v) and v > 0):
                raise ValueError(f"{name}: expected a finite float > 0, got {v!r}")
        if not (_is_float(self.e2e_clip_lr_mult) and self.e2e_clip_lr_mult > 0):
            raise ValueError(f"e2e_clip_lr_mult: expected a finite float > 0, got {self.e2e_clip_lr_mult!r}")
        if self.e2e_samples is not None and self.e2e_samples > self.budget("samples"):
            raise ValueError(f"e2e_samples: expected at most the {self.budget('samples')} calibration windows "
                             f"(samples), got {self.e2e_samples}")
        if self.tunes_end_to_end:
            held, train, total = self.budget("e2e_holdout"), self.budget("e2e_samples"), self.budget("samples")
            if train < 1 or train + held > total:
                name = "e2e_samples" if self.e2e_samples is not None else "e2e_holdout"
                raise ValueError(f"{name}: the end-to-end stage holds out {held} of the samples={total} calibration "
                                 f"windows to measure on and trains on {train}; expected at least one to train on and "
                                 "no more than samples in all: give more samples, or e2e_epochs=0 to skip the stage")
        if not (_is_float(self.clip_lr_mult) and self.clip_lr_mult > 0):
            raise ValueError(f"clip_lr_mult: expected a finite float > 0, got {self.clip_lr_mult!r}")
        if not (_is_float(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"min_lr_ratio: expected a float in [0, 1], got {self.min_lr_ratio!r}")
        if not (_is_float(self.smooth_alpha) and 0 <= self.smooth_alpha <= 1):
            raise ValueError(f"smooth_alpha: expected a float in [0, 1], got {self.smooth_alpha!r}")
        if not (_is_float(self.gptq_damp) and self.gptq_damp > 0):
            raise ValueError(f"gptq_damp: expected a finite float > 0 (fraction of the mean Hessian diagonal), "
                             f"got {self.gptq_damp!r}")
        if isinstance(self.gptq_clip_grid, (int, float)) or not all(
                _is_float(c) and 0 < c <= 1 for c in self.gptq_clip_grid):
            raise ValueError(f"gptq_clip_grid: expected a sequence of clip ratios in (0, 1], got {self.gptq_clip_grid!r}")
        self.gptq_clip_grid = tuple(float(c) for c in self.gptq_clip_grid)
        for name in ("act_clip_init", "weight_clip_init"):
            v = getattr(self, name)
            if isinstance(v, str):
                if v != "search":
                    raise ValueError(f"{name}: expected a float logit or 'search', got {v!r}")
            elif not _is_float(v):
                raise ValueError(f"{name}: expected a finite float logit or 'search', got {v!r}")

    @property
    def recipe_rules(self) -> tuple[tuple[str, str], ...]:
        """``(pattern, scheme)`` pairs in match order: the recipe's (a preset's or the mapping's)."""
        rules = RECIPES[self.recipe] if isinstance(self.recipe, str) else self.recipe
        return tuple(rules.items())

    def scheme_for(self, name: str) -> tuple[str, str]:
        """``(scheme, why)`` of the decoder linear ``name``: a skip pattern, else the first recipe pattern
        that matches, else ``"float"``."""
        hit = self.skip_match(name)
        if hit is not None:
            return FLOAT, f"QuantConfig.skip matches {hit!r}"
        for p, scheme in self.recipe_rules:
            if fnmatch.fnmatchcase(name, p):
                return scheme, f"recipe {self.recipe_label} maps {p!r} to {scheme}"
        return FLOAT, f"no pattern of recipe {self.recipe_label} matches it"

    def skip_match(self, name: str) -> str | None:
        """The first ``skip`` pattern that matches ``name``, or None."""
        return next((p for p in self.skip if fnmatch.fnmatchcase(name, p)), None)

    @property
    def recipe_label(self) -> str:
        return repr(self.recipe) if isinstance(self.recipe, str) else "(mapping)"

    def check_recipe(self, names) -> None:
        """Refuse a recipe mapping with a pattern that matches none of ``names`` (the model's decoder linears)."""
        if isinstance(self.recipe, str):
            return  # the presets' patterns are written for every family's layout
        unmatched = [p for p in self.recipe if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise ValueError(f"recipe: {unmatched} match no decoder linear (their names look like "
                             f"{names[-1]!r}; e.g. '*.o_proj' or 'model.layers.0.*')")

    def for_model(self, model) -> QuantConfig:
        """This config with ``act_dtype`` resolved for ``model`` (a copy; ``self`` if it is set already):
        a float16 or bfloat16 model's own dtype, bfloat16 for a float32 model."""
        if self.act_dtype is not None:
            return self
        model_dtype = next(model.parameters()).dtype
        return dataclasses.replace(self, act_dtype=model_dtype if model_dtype in HALF_DTYPES else torch.bfloat16)

    def budget(self, name: str):
        """A budget field (samples, seqlen, epochs, lr, batch_size, e2e_*): the override or the profile's."""
        v = getattr(self, name)
        if v is None and name == "e2e_holdout":  # the profile's, at most a quarter of a smaller calibration set
            return min(PROFILES[self.profile][name], max(1, self.budget("samples") // 4))
        if v is None and name == "e2e_samples":  # the profile's, within what the held-out windows leave
            return min(PROFILES[self.profile][name], self.budget("samples") - self.budget("e2e_holdout"))
        return PROFILES[self.profile][name] if v is None else v

    @property
    def trains(self) -> bool:
        return self.method == "flatquant" and self.budget("epochs") > 0

    @property
    def tunes_end_to_end(self) -> bool:
        """Whether the end-to-end stage runs (FlatQuant's recipe only: the baselines stay what they are)."""
        return self.method == "flatquant" and self.budget("e2e_epochs") > 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["act_dtype"] = None if self.act_dtype is None else str(self.act_dtype).replace("torch.", "")
        d["skip"] = list(self.skip)
        d["gptq_clip_grid"] = list(self.gptq_clip_grid)
        d["recipe"] = self.recipe if isinstance(self.recipe, str) else dict(self.recipe)
        d.update({k: self.budget(k) for k in PROFILES["paper"]})
        return d

    def fingerprint(self) -> str:
        """What decides the learned tensors: a resumed run must match it."""
        d = self.to_dict()
        # skip decides which transforms exist, so it belongs; the weight quantizer runs after the
        # learned tensors are saved, so a resumed run may change it (unless later layers train on the
        # quantized model's states: train_inputs="quantized"). A run may resume on another device.
        # The end-to-end stage runs after every layer's tensors are saved: it may change on a resumed run.
        drop = ["work_dir", "device", "activations", "recompute_blocks", "release_host_memory", "e2e_samples", "e2e_holdout", "e2e_epochs",
                "e2e_lr", "e2e_batch_size", "e2e_clip_lr_mult"]
        if self.train_inputs == "float":
            drop += ["weight_quantizer", "gptq_damp", "gptq_block", "gptq_act_order", "gptq_clip_grid"]
        for k in drop:
            d.pop(k, None)
        return json.dumps(d, sort_keys=True)
