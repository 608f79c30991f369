"""``QuantConfig``: what ``quantize`` does, composed of one small frozen config per concern.

``QuantConfig(method, weight_quantizer, profile, seed, ...)`` takes every setting by its flat name
(``samples=``, ``gptq_block=``, ``e2e_epochs=``, ``device=`` ...) or whole parts (``gptq=GPTQConfig(...)``)
and resolves the profile's budget at construction: nothing is left ``None`` to resolve later. The parts:

- ``data`` (:class:`CalibrationSet`): how many calibration windows, how long;
- ``schemes`` (:class:`SchemeRecipe`): which checkpoint scheme each decoder linear gets, and how it serves
  (with the MXFP4 options of ``W4A4_MXFP4_FLATQUANT`` groups, docs/mxfp4.md);
- ``train`` (:class:`LayerwiseTraining`): the FlatQuant transform and its layer-wise training;
- ``gptq`` (:class:`GPTQConfig`): the GPTQ weight quantizer;
- ``e2e`` (:class:`EndToEndConfig`): the end-to-end stage;
- ``placement`` (:class:`Placement`): where calibration runs and what it keeps in memory.

The recipe maps fnmatch patterns of decoder-linear names to schemes; the first pattern (in order) that
matches a name decides its scheme, ``skip`` patterns before all of them (they mean ``"float"``). A linear
no pattern matches stays float. Why each default is what it is: docs/method.md; measurements: docs/results.md.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .checks import boolean, float_in, is_finite_float, non_negative_int, one_of, positive_float, positive_int
from .devices import ACTIVATIONS, check_device
from .dtypes import HALF_DTYPES, check_half, dtype_name
from .mxfp4 import SCALE_RULES as MX_SCALE_RULES

METHODS = ("rtn", "hadamard", "flatquant")
WEIGHT_QUANTIZERS = ("rtn", "gptq")
FACTOR_PARAMS = ("plain", "svd")
BATCH_ORDERS = ("shuffle", "fixed")
TRAIN_INPUTS = ("float", "quantized")
LAYER_LOSSES = ("mse", "relative")
# Calibration budgets: "paper" is FlatQuant's recipe (its end-to-end stage off: unmeasured at that scale);
# "full" and "fast" are CPU budgets for the bundled 135M model (docs/method.md, 'Profiles').
PROFILES = {
    "paper": dict(samples=128, seqlen=2048, epochs=15, lr=5e-3, batch_size=4,
                  e2e_samples=112, e2e_holdout=16, e2e_epochs=0, e2e_lr=5e-3, e2e_batch_size=4),
    "full": dict(samples=96, seqlen=256, epochs=2, lr=5e-3, batch_size=2,
                 e2e_samples=32, e2e_holdout=8, e2e_epochs=4, e2e_lr=5e-3, e2e_batch_size=4),
    "fast": dict(samples=32, seqlen=128, epochs=2, lr=5e-3, batch_size=2,
                 e2e_samples=24, e2e_holdout=8, e2e_epochs=4, e2e_lr=5e-3, e2e_batch_size=4),
}


FLATQUANT, W8A8_DYNAMIC, FLOAT = "w4a4_flatquant", "w8a8_dynamic", "float"
MXFP4 = "w4a4_mxfp4_flatquant"  # W4A4_MXFP4_FLATQUANT (Ascend 950): FlatQuant with MXFP4 quantizers
SCHEMES = (FLATQUANT, W8A8_DYNAMIC, FLOAT, MXFP4)
TRANSFORMED = (FLATQUANT, MXFP4)  # the schemes whose groups learn a Kronecker transform
FALLBACKS = (W8A8_DYNAMIC, FLOAT)  # what a linear FlatQuant cannot serve may take instead
RECIPES = {
    # FlatQuant on every decoder linear (row-parallel layers then load in vLLM at TP 1 only)
    "w4a4": {"*": FLATQUANT},
    # msModelSlim's W4A4 recipe (example/Qwen/w4a4.py): the row-parallel o/down at W8A8_DYNAMIC
    "msmodelslim": {"*.self_attn.o_proj": W8A8_DYNAMIC, "*.mlp.down_proj": W8A8_DYNAMIC, "*": FLATQUANT},
}
# KV-cache types quantize can produce (docs/kv-cache.md; schemes.KV_CACHE_SCHEMES holds them): C8 calibrated after the
# linears, its scales chosen as KV_CACHE_CLIPS says (calibrate/kv_cache.py); KV4 trained with them (calibrate/kv4.py)
KV_CACHE_TYPES = ("C8", "KV4")
KV_CACHE_CLIPS = ("max", "search")
# The KV transforms the layer-wise stage learns, per cache: KV4 T_k and T_v ("kv", the paper's) or none (identity,
# its clips learned alone); C8 T_v alone ("v": folded into v_proj/o_proj, so the export still serves)
KV_TRANSFORMS_OF = {"KV4": ("kv", "none"), "C8": ("v",)}
KV_TRANSFORMS = ("kv", "none", "v")
TRAINED_KV_CACHES = ("KV4",)  # learned with the linears in the layer-wise loss, not calibrated after them
# The MXFP4 presets (Ascend 950 only), apart from the int4 ones above that the A2/A3 NPUs serve
MX_RECIPES = {
    # W4A4_MXFP4_FLATQUANT on every decoder linear (row-parallel transforms TP-aware up to mx_max_tp)
    "mxfp4": {"*": MXFP4},
}
PRESETS = {**RECIPES, **MX_RECIPES}
# mx_max_tp 4: vllm-ascend's default max_supported_tp (layers.w4a4_mxfp4_flatquant.DEFAULT_MAX_TP)
MX_DEFAULTS = {"mx_scale_rule": "kernel", "mx_apply_clip": False, "mx_max_tp": 4}


def _frozen_set(obj, name, value) -> None:
    object.__setattr__(obj, name, value)  # normalising a field of a frozen dataclass in __post_init__


def _clip_init(value, name: str):
    if isinstance(value, str):
        if value != "search":
            raise ValueError(f"{name}: expected a float logit or 'search', got {value!r}")
    elif not is_finite_float(value):
        raise ValueError(f"{name}: expected a finite float logit or 'search', got {value!r}")
    return value


@dataclass(frozen=True)
class CalibrationSet:
    """The calibration windows every data-driven stage reads: ``samples`` windows of ``seqlen`` tokens."""

    samples: int = PROFILES["fast"]["samples"]
    seqlen: int = PROFILES["fast"]["seqlen"]

    def __post_init__(self):
        positive_int(self.samples, "samples")
        positive_int(self.seqlen, "seqlen")


@dataclass(frozen=True)
class SchemeRecipe:
    """Which checkpoint scheme each decoder linear gets, and what the export serves at."""

    recipe: str | Mapping[str, str] = "w4a4"  # a preset (RECIPES) or fnmatch pattern -> scheme, first match wins
    skip: tuple[str, ...] = ()  # fnmatch patterns of linears kept in float, before the recipe
    fallback: str = W8A8_DYNAMIC  # for a linear the recipe puts on FlatQuant but the NPU op cannot run
    tp_size: int = 1  # vLLM's tensor-parallel size: row-parallel transforms become kron(I_N, L, R)
    # The dtype the W4A4 layers compute in; None until quantize resolves it for the model (for_model):
    # the model's own half dtype (vllm-ascend computes in it), bfloat16 for a float32 model.
    act_dtype: torch.dtype | None = None
    cann: str = "8.3"  # which CANN's kronecker_quant limits decide what can run on the NPU
    # A quantized KV cache calibrated after the linears (None: the cache stays in the model dtype), and its
    # scales: per-channel max|x| / 127 ("max", msModelSlim's) or that times a searched clip ("search"; it lowers the
    # attention error but not the bundled model's perplexity, docs/kv-cache.md)
    kv_cache: str | None = None
    kv_cache_clip: str = "max"
    # The KV transforms learned with the linears (KV_TRANSFORMS_OF): None is "kv" for KV4 and none for C8
    kv_transforms: str | None = None
    # W4A4_MXFP4_FLATQUANT groups (docs/mxfp4.md): the weight quantizer's scale rule, whether the activation
    # clip ratio acts on the FP4 path (assumed not: then none is learned), and the description's max_supported_tp
    mx_scale_rule: str = MX_DEFAULTS["mx_scale_rule"]
    mx_apply_clip: bool = MX_DEFAULTS["mx_apply_clip"]
    mx_max_tp: int = MX_DEFAULTS["mx_max_tp"]

    def __post_init__(self):
        one_of(self.kv_cache, "kv_cache", (None,) + KV_CACHE_TYPES)
        one_of(self.kv_cache_clip, "kv_cache_clip", KV_CACHE_CLIPS)
        if self.kv_cache in TRAINED_KV_CACHES:
            if self.kv_cache_clip != "max":
                raise ValueError(f"kv_cache_clip: {self.kv_cache_clip!r} chooses C8's static scales; "
                                 f"kv_cache={self.kv_cache!r} learns its clip ratios with the linears (leave it 'max')")
        if self.kv_transforms is not None:
            allowed = KV_TRANSFORMS_OF.get(self.kv_cache, ())
            if self.kv_transforms not in allowed:
                choices = ", ".join(f"{' or '.join(map(repr, v))} with kv_cache={k!r}"
                                    for k, v in KV_TRANSFORMS_OF.items())
                raise ValueError(f"kv_transforms: expected {choices}, got {self.kv_transforms!r} with "
                                 f"kv_cache={self.kv_cache!r}")
        _frozen_set(self, "skip", (self.skip,) if isinstance(self.skip, str) else tuple(self.skip))
        if isinstance(self.recipe, str):
            if self.recipe not in PRESETS:
                raise ValueError(f"recipe: expected a preset {tuple(RECIPES)}, an MXFP4 preset {tuple(MX_RECIPES)} "
                                 f"or a mapping pattern -> scheme, got {self.recipe!r}")
        elif isinstance(self.recipe, Mapping):
            if not self.recipe:
                raise ValueError("recipe: expected at least one pattern -> scheme entry, got an empty mapping")
            for pattern, scheme in self.recipe.items():
                if not isinstance(pattern, str) or not pattern:
                    raise ValueError(f"recipe: expected fnmatch patterns (non-empty str) as keys, got {pattern!r}")
                if scheme not in SCHEMES:
                    raise ValueError(f"recipe: {pattern!r} maps to {scheme!r}; expected one of {SCHEMES}")
            _frozen_set(self, "recipe", dict(self.recipe))
        else:
            raise ValueError(f"recipe: expected a preset {tuple(RECIPES)}, an MXFP4 preset {tuple(MX_RECIPES)} "
                             f"or a mapping pattern -> scheme, got {type(self.recipe).__name__}")
        positive_int(self.tp_size, "tp_size", " (vLLM's --tensor-parallel-size)")
        one_of(self.fallback, "fallback", FALLBACKS)
        if self.act_dtype is not None:
            check_half(self.act_dtype)
        one_of(self.mx_scale_rule, "mx_scale_rule", MX_SCALE_RULES)
        boolean(self.mx_apply_clip, "mx_apply_clip")
        positive_int(self.mx_max_tp, "mx_max_tp", " (the description's max_supported_tp)")

    @property
    def rules(self) -> tuple[tuple[str, str], ...]:
        """``(pattern, scheme)`` pairs in match order: the recipe's (a preset's or the mapping's)."""
        return tuple((PRESETS[self.recipe] if isinstance(self.recipe, str) else self.recipe).items())

    @property
    def kv_learned(self) -> str | None:
        """What the layer-wise stage learns for the KV cache: ``"kv"`` or ``"none"`` with KV4 (its clips, and T_k, T_v
        with ``"kv"``, the default), ``"v"`` with C8 and ``kv_transforms="v"`` (T_v alone); ``None`` when nothing is
        learned there (no cache, or C8 alone: its scales are calibrated after the linears)."""
        if self.kv_cache in TRAINED_KV_CACHES:
            return self.kv_transforms or "kv"
        return self.kv_transforms

    @property
    def uses_mxfp4(self) -> bool:
        """Whether a pattern of the recipe names W4A4_MXFP4_FLATQUANT."""
        return any(scheme == MXFP4 for _, scheme in self.rules)

    @property
    def label(self) -> str:
        return repr(self.recipe) if isinstance(self.recipe, str) else "(mapping)"

    def skip_match(self, name: str) -> str | None:
        """The first ``skip`` pattern that matches ``name``, or None."""
        return next((p for p in self.skip if fnmatch.fnmatchcase(name, p)), None)

    def scheme_for(self, name: str) -> tuple[str, str]:
        """``(scheme, why)`` of the decoder linear ``name``: a skip pattern, else the first recipe pattern
        that matches, else ``"float"``."""
        hit = self.skip_match(name)
        if hit is not None:
            return FLOAT, f"QuantConfig.skip matches {hit!r}"
        for p, scheme in self.rules:
            if fnmatch.fnmatchcase(name, p):
                return scheme, f"recipe {self.label} maps {p!r} to {scheme}"
        return FLOAT, f"no pattern of recipe {self.label} matches it"

    def check(self, names) -> None:
        """Refuse a recipe mapping with a pattern that matches none of ``names`` (the model's decoder linears)."""
        if isinstance(self.recipe, str):
            return  # the presets' patterns are written for every family's layout
        unmatched = [p for p in self.recipe if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise ValueError(f"recipe: {unmatched} match no decoder linear (their names look like "
                             f"{names[-1]!r}; e.g. '*.o_proj' or 'model.layers.0.*')")


@dataclass(frozen=True)
class LayerwiseTraining:
    """The FlatQuant transform of each linear's input and its layer-wise training (docs/method.md)."""

    epochs: int = PROFILES["fast"]["epochs"]  # 0: the starting transforms, untrained
    lr: float = PROFILES["fast"]["lr"]
    batch_size: int = PROFILES["fast"]["batch_size"]
    clip_lr_mult: float = 10.0  # clip factors learn 10x faster (FlatQuant)
    min_lr_ratio: float = 1e-3  # the cosine schedule ends at lr * this
    transform_init: str = "hadamard"  # hadamard | random | identity
    smooth: bool = True  # learn a per-channel scale d where it folds exactly
    smooth_alpha: float = 0.5  # d = max|x|^alpha / max|W|^(1 - alpha) at the start (docs/results.md)
    # a logit, or "search": the MSE-best ratio on a grid, for budgets that leave the factors few steps
    weight_clip_init: float | str = "search"
    act_clip_init: float | str = "search"
    learn_weight_clip: bool = True
    learn_act_clip: bool = True
    factor_param: str = "plain"  # "plain" learns L, R; "svd" learns U diag(s) V^T (docs/method.md)
    loss_norm: bool = True  # minimise loss / loss.detach(), as the official loop (docs/results.md)
    layer_loss: str = "relative"  # "mse", or each token's error over its target's mean square (docs/method.md)
    weight_decay: float = 0.0  # AdamW's decoupled decay (official: 0.01)
    batch_order: str = "shuffle"  # shuffle (seeded, per epoch) | fixed (the official loop)
    # what each layer trains on: the float model's hidden states, or the quantized-so-far model's (docs/method.md)
    train_inputs: str = "quantized"

    def __post_init__(self):
        non_negative_int(self.epochs, "epochs")
        positive_float(self.lr, "lr")
        positive_int(self.batch_size, "batch_size")
        positive_float(self.clip_lr_mult, "clip_lr_mult")
        float_in(self.min_lr_ratio, "min_lr_ratio")
        if self.transform_init not in ("hadamard", "random", "identity"):
            raise ValueError(f"transform_init: expected hadamard, random or identity, got {self.transform_init!r}")
        for name in ("smooth", "learn_weight_clip", "learn_act_clip", "loss_norm"):
            boolean(getattr(self, name), name)
        float_in(self.smooth_alpha, "smooth_alpha")
        _clip_init(self.weight_clip_init, "weight_clip_init")
        _clip_init(self.act_clip_init, "act_clip_init")
        one_of(self.factor_param, "factor_param", FACTOR_PARAMS)
        one_of(self.layer_loss, "layer_loss", LAYER_LOSSES)
        if not (is_finite_float(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay: expected a finite float >= 0, got {self.weight_decay!r}")
        one_of(self.batch_order, "batch_order", BATCH_ORDERS)
        one_of(self.train_inputs, "train_inputs", TRAIN_INPUTS)


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's int4 weights (``weight_quantizer="gptq"``): damping, block size, column order, clip candidates."""

    damp: float = 0.01  # a fraction of the mean Hessian diagonal
    block: int = 128
    act_order: bool = True
    # clip ratios tried beside each row's learned one, the least output error kept: () off (docs/results.md)
    clip_grid: tuple[float, ...] = ()

    def __post_init__(self):
        positive_float(self.damp, "gptq_damp", " (fraction of the mean Hessian diagonal)")
        positive_int(self.block, "gptq_block")
        boolean(self.act_order, "gptq_act_order")
        if isinstance(self.clip_grid, (int, float)) or not all(
                is_finite_float(c) and 0 < c <= 1 for c in self.clip_grid):
            raise ValueError(f"gptq_clip_grid: expected a sequence of clip ratios in (0, 1], got {self.clip_grid!r}")
        _frozen_set(self, "clip_grid", tuple(float(c) for c in self.clip_grid))


@dataclass(frozen=True)
class EndToEndConfig:
    """The end-to-end stage (calibrate/e2e.py): weight-scale multipliers and shared clip ratios (int4), the
    transforms (MXFP4) learned on KL(full precision || quantized) over ``samples`` windows, guarded by the last
    ``holdout`` windows."""

    samples: int = PROFILES["fast"]["e2e_samples"]
    holdout: int = PROFILES["fast"]["e2e_holdout"]
    epochs: int = PROFILES["fast"]["e2e_epochs"]  # 0: no end-to-end stage
    lr: float = PROFILES["fast"]["e2e_lr"]
    batch_size: int = PROFILES["fast"]["e2e_batch_size"]
    clip_lr_mult: float = 2.0  # the clip logits' lr over lr
    transform_lr_mult: float = 0.1  # the MXFP4 transforms' corrections (A, B of L (I + A), R (I + B)): lr over lr

    def __post_init__(self):
        non_negative_int(self.samples, "e2e_samples")  # 0 only where the stage does not run (QuantConfig checks)
        positive_int(self.holdout, "e2e_holdout")
        non_negative_int(self.epochs, "e2e_epochs")
        positive_float(self.lr, "e2e_lr")
        positive_int(self.batch_size, "e2e_batch_size")
        positive_float(self.clip_lr_mult, "e2e_clip_lr_mult")
        positive_float(self.transform_lr_mult, "e2e_transform_lr_mult")


@dataclass(frozen=True)
class Placement:
    """Where each decoder layer is calibrated and what is kept where: the learned tensors are the same."""

    device: str | None = None  # cpu, cuda, cuda:N, npu, npu:N; None: the model's device
    activations: str = "auto"  # layer inputs and targets on the device, the host (pinned), or "auto"
    recompute_blocks: bool | str = "auto"  # checkpoint attention and MLP blocks (docs/method.md, 'Memory')
    release_host_memory: bool = False  # fix glibc's mmap threshold, process-wide (docs/method.md)
    work_dir: str | None = None  # per-layer results, for resuming an interrupted run

    def __post_init__(self):
        if self.device is not None:
            _frozen_set(self, "device", check_device(self.device))
        one_of(self.activations, "activations", ACTIVATIONS)
        if not (isinstance(self.recompute_blocks, bool) or self.recompute_blocks == "auto"):
            raise ValueError(f"recompute_blocks: expected True, False or 'auto', got {self.recompute_blocks!r}")
        boolean(self.release_host_memory, "release_host_memory")


# Each flat setting name (what QuantConfig takes and to_dict writes, in this order) -> (part, field).
_PARTS = {"data": CalibrationSet, "schemes": SchemeRecipe, "train": LayerwiseTraining, "gptq": GPTQConfig,
          "e2e": EndToEndConfig, "placement": Placement}
FLAT_NAMES = {
    "samples": ("data", "samples"), "seqlen": ("data", "seqlen"),
    **{n: ("train", n) for n in ("epochs", "lr", "batch_size", "clip_lr_mult", "min_lr_ratio", "transform_init",
                                 "smooth", "smooth_alpha", "weight_clip_init", "act_clip_init", "learn_weight_clip",
                                 "learn_act_clip", "factor_param", "loss_norm", "layer_loss", "weight_decay",
                                 "batch_order", "train_inputs")},
    "act_dtype": ("schemes", "act_dtype"), "skip": ("schemes", "skip"), "recipe": ("schemes", "recipe"),
    "fallback": ("schemes", "fallback"), "tp_size": ("schemes", "tp_size"), "seed": (None, "seed"),
    "work_dir": ("placement", "work_dir"),
    **{f"gptq_{n}": ("gptq", n) for n in ("damp", "block", "act_order", "clip_grid")},
    **{f"e2e_{n}": ("e2e", n)
       for n in ("samples", "holdout", "epochs", "lr", "batch_size", "clip_lr_mult", "transform_lr_mult")},
    "cann": ("schemes", "cann"), "kv_cache": ("schemes", "kv_cache"), "kv_cache_clip": ("schemes", "kv_cache_clip"),
    "kv_transforms": ("schemes", "kv_transforms"),
    **{n: ("schemes", n) for n in MX_DEFAULTS},
    **{n: ("placement", n) for n in ("device", "activations", "recompute_blocks", "release_host_memory")},
}


@dataclass(frozen=True, init=False)
class QuantConfig:
    """What ``quantize`` does: a method, a weight quantizer, a profile, a seed, and the six parts above.

    ``QuantConfig()`` is what every published figure uses and what ``flatquant-lab quantize`` runs by
    default: method ``flatquant``, GPTQ weights, the ``fast`` profile.

    method: ``flatquant`` (learned Kronecker transforms, smoothing, clipping), ``hadamard``
    (fixed QuaRot-style orthogonal factors) or ``rtn`` (identity factors); all three give the same
    ``W4A4FlatQuantLinear`` modules and export format. weight_quantizer: ``gptq`` (needs calibration
    data, for every method) or ``rtn`` (round to nearest; ``rtn``/``hadamard`` then need no data).
    Any other setting by its flat name (``FLAT_NAMES``: ``samples=8``, ``e2e_epochs=0``, ``device="npu"``) or as
    a whole part (``gptq=GPTQConfig(block=64)``); a part's unset budget fields come from the profile.
    """

    method: str
    weight_quantizer: str
    profile: str
    seed: int
    data: CalibrationSet
    schemes: SchemeRecipe
    train: LayerwiseTraining
    gptq: GPTQConfig
    e2e: EndToEndConfig
    placement: Placement
    # the flat names set explicitly (not from the profile or a default): what a warning may name
    given: frozenset = dataclasses.field(default=frozenset(), compare=False, repr=False)

    def __init__(self, method: str = "flatquant", weight_quantizer: str = "gptq", profile: str = "fast",
                 seed: int = 0, *, _given: frozenset | None = None, **settings):
        one_of(method, "method", METHODS)
        one_of(weight_quantizer, "weight_quantizer", WEIGHT_QUANTIZERS)
        one_of(profile, "profile", PROFILES)
        if not (isinstance(seed, int) and not isinstance(seed, bool)):
            raise ValueError(f"seed: expected an int, got {seed!r}")
        unknown = sorted(set(settings) - set(FLAT_NAMES) - set(_PARTS))
        if unknown:
            raise TypeError(f"QuantConfig: unknown setting(s) {unknown}; expected a part {tuple(_PARTS)} or one of "
                            f"{tuple(FLAT_NAMES)}")
        if settings.get("e2e_samples") is not None:
            positive_int(settings["e2e_samples"], "e2e_samples")
        flat = {part: {} for part in _PARTS}
        for name, value in settings.items():
            if name in FLAT_NAMES and value is not None or name in ("act_dtype", "device", "work_dir", "kv_cache"):
                part, fld = FLAT_NAMES[name]
                flat[part][fld] = value
        given = {part: settings[part] for part in _PARTS if settings.get(part) is not None}
        for part, obj in given.items():
            if not isinstance(obj, _PARTS[part]):
                raise TypeError(f"{part}: expected a {_PARTS[part].__name__}, got {type(obj).__name__}")
        budget = PROFILES[profile]

        def build(part, **profile_fields):
            if part in given:
                return dataclasses.replace(given[part], **flat[part]) if flat[part] else given[part]
            return _PARTS[part](**{**profile_fields, **flat[part]})

        data = build("data", samples=budget["samples"], seqlen=budget["seqlen"])
        train = build("train", epochs=budget["epochs"], lr=budget["lr"], batch_size=budget["batch_size"])
        # the profile's held-out and training windows, within a smaller calibration set (a quarter held out)
        e2e_given = {**({f: getattr(given["e2e"], f) for f in ("samples", "holdout")} if "e2e" in given else {}),
                     **flat["e2e"]}
        held = e2e_given.get("holdout", min(budget["e2e_holdout"], max(1, data.samples // 4)))
        e2e = build("e2e", samples=max(0, min(budget["e2e_samples"], data.samples - held)),
                    holdout=held, epochs=budget["e2e_epochs"], lr=budget["e2e_lr"],
                    batch_size=budget["e2e_batch_size"])
        if _given is None:
            _given = {n for n, v in settings.items() if n in FLAT_NAMES and v is not None}
            _given |= {n for n, (part, _) in FLAT_NAMES.items() if part in given}
        for name, value in (("method", method), ("weight_quantizer", weight_quantizer), ("profile", profile),
                            ("seed", seed), ("data", data), ("schemes", build("schemes")), ("train", train),
                            ("gptq", build("gptq")), ("e2e", e2e), ("placement", build("placement")),
                            ("given", frozenset(_given))):
            object.__setattr__(self, name, value)
        if "samples" in e2e_given and e2e.samples > data.samples:
            raise ValueError(f"e2e_samples: expected at most the {data.samples} calibration windows "
                             f"(samples), got {e2e.samples}")
        if self.tunes_end_to_end and (e2e.samples < 1 or e2e.samples + e2e.holdout > data.samples):
            name = "e2e_samples" if "samples" in e2e_given else "e2e_holdout"
            raise ValueError(f"{name}: the end-to-end stage holds out {e2e.holdout} of the samples={data.samples} "
                             f"calibration windows to measure on and trains on {e2e.samples}; "
                             "expected at least one to train on and no more than samples in all: give more "
                             "samples, or e2e_epochs=0 to skip the stage")

    @classmethod
    def fast(cls, **settings) -> QuantConfig:
        """The ``fast`` profile (the default): minutes on the bundled model's CPU budget."""
        return cls(profile="fast", **settings)

    @classmethod
    def full(cls, **settings) -> QuantConfig:
        """The ``full`` profile: 12x the fast profile's training tokens."""
        return cls(profile="full", **settings)

    @classmethod
    def paper(cls, **settings) -> QuantConfig:
        """FlatQuant's published recipe: 128 windows of 2048 tokens, 15 epochs (hours per layer on a CPU)."""
        return cls(profile="paper", **settings)

    def __getattr__(self, name: str):
        """A setting by its flat name (``cfg.samples`` is ``cfg.data.samples``)."""
        if name in FLAT_NAMES and FLAT_NAMES[name][0] is not None:
            part, fld = FLAT_NAMES[name]
            return getattr(object.__getattribute__(self, part), fld)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def replace(self, **changes) -> QuantConfig:
        """A copy with ``changes`` (flat names or parts) applied; the rest stays as it is here."""
        parts = {part: getattr(self, part) for part in _PARTS}
        top = {n: changes.pop(n, getattr(self, n)) for n in ("method", "weight_quantizer", "profile", "seed")}
        given = set(self.given) | {n for n, v in changes.items() if n in FLAT_NAMES and v is not None}
        for part in _PARTS:
            if part in changes:
                parts[part] = changes.pop(part)
                given |= {n for n, (p, _) in FLAT_NAMES.items() if p == part}
        return QuantConfig(**top, **parts, **changes, _given=frozenset(given))

    def for_model(self, model) -> QuantConfig:
        """This config with ``act_dtype`` resolved for ``model`` (a copy; ``self`` if it is set already):
        a float16 or bfloat16 model's own dtype, bfloat16 for a float32 model."""
        if self.schemes.act_dtype is not None:
            return self
        model_dtype = next(model.parameters()).dtype
        return self.replace(act_dtype=model_dtype if model_dtype in HALF_DTYPES else torch.bfloat16)

    # recipe lookups, kept on the config for its callers
    def scheme_for(self, name: str) -> tuple[str, str]:
        return self.schemes.scheme_for(name)

    def skip_match(self, name: str) -> str | None:
        return self.schemes.skip_match(name)

    def check_recipe(self, names) -> None:
        self.schemes.check(names)

    @property
    def trains(self) -> bool:
        return self.method == "flatquant" and self.train.epochs > 0

    @property
    def tunes_end_to_end(self) -> bool:
        """Whether the end-to-end stage runs (FlatQuant's recipe only: the baselines stay what they are)."""
        return self.method == "flatquant" and self.e2e.epochs > 0

    def to_dict(self) -> dict:
        """Every setting by its flat name, resolved (what demo.json and work_dir record)."""
        d = {"method": self.method, "weight_quantizer": self.weight_quantizer, "profile": self.profile}
        for name, (part, fld) in FLAT_NAMES.items():
            d[name] = self.seed if part is None else getattr(getattr(self, part), fld)
        d["act_dtype"] = None if d["act_dtype"] is None else dtype_name(d["act_dtype"])
        d["skip"] = list(d["skip"])
        d["gptq_clip_grid"] = list(d["gptq_clip_grid"])
        d["recipe"] = d["recipe"] if isinstance(d["recipe"], str) else dict(d["recipe"])
        if d["kv_cache"] is None:  # a config without a quantized KV cache records what it always did
            del d["kv_cache"], d["kv_cache_clip"]
        if d["kv_transforms"] is None:
            del d["kv_transforms"]
        if not self.schemes.uses_mxfp4:  # a config without MXFP4 groups records what it always did
            for name, default in {**MX_DEFAULTS, "e2e_transform_lr_mult": EndToEndConfig.transform_lr_mult}.items():
                if d[name] == default:
                    del d[name]
        return d

    def fingerprint(self) -> str:
        """What decides the learned tensors: a resumed run must match it."""
        d = self.to_dict()
        # Placement never changes the learned tensors; the end-to-end stage runs after every layer's tensors
        # are saved; the weight quantizer runs after them too, unless later layers train on its output.
        drop = ["work_dir", "device", "activations", "recompute_blocks", "release_host_memory", "e2e_samples",
                "e2e_holdout", "e2e_epochs", "e2e_lr", "e2e_batch_size", "e2e_clip_lr_mult", "e2e_transform_lr_mult",
                "kv_cache", "kv_cache_clip"]  # C8 is calibrated after everything else
        if self.schemes.kv_learned is not None:  # KV4, or C8's T_v: learned with the linears
            drop = drop[:-2]
        if self.train.train_inputs == "float":
            drop += ["weight_quantizer", "gptq_damp", "gptq_block", "gptq_act_order", "gptq_clip_grid"]
        for k in drop:
            d.pop(k, None)
        return json.dumps(d, sort_keys=True)
