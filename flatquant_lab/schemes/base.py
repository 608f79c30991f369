"""What one checkpoint scheme defines: its description value, its tensors, their checks, its layer, its TP split.

A scheme is the unit vllm-ascend dispatches on: every tensor of a linear carries the scheme's
``quant_type`` in ``quant_model_description.json`` (docs/checkpoint-format.md), and vllm-ascend builds
that linear's quantization method from it. Here a :class:`Scheme` subclass holds everything one such
value implies; the layer that computes it stays in :mod:`flatquant_lab.layers` and calls the ops.
Checks raise ``ValueError`` whose message starts with the tensor's short name (``weight_scale: ...``);
:mod:`flatquant_lab.io` puts the linear's prefix in front.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
from torch import nn

from ..dtypes import HALF_DTYPES, cast_rounds, dtype_name

# Every scheme's linear may carry a bias [O] beside its own tensors.
OPTIONAL = ("bias",)


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor of a scheme: its shape, and its allowed dtypes or the name of the tensor whose dtype
    it must share."""

    shape: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...] | str


def expect(name: str, t, shape=None, dtypes=None) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``t`` is a tensor of ``shape`` with one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = " or ".join(dtype_name(d) for d in dtypes)
        raise ValueError(f"{name}: expected dtype {names}, got {dtype_name(t.dtype)}")


def check_specs(tensors: Mapping[str, torch.Tensor], specs: Mapping[str, TensorSpec]) -> None:
    """Check each present tensor against its spec, in the specs' order (absent ones are the caller's business)."""
    for name, spec in specs.items():
        if name not in tensors:
            continue
        dtypes = (tensors[spec.dtypes].dtype,) if isinstance(spec.dtypes, str) else spec.dtypes
        expect(name, tensors[name], spec.shape, dtypes)


def matrix_shape(tensors: Mapping[str, torch.Tensor], dtypes: tuple[torch.dtype, ...],
                 what: str) -> tuple[int, int]:
    """``[O, K]`` of ``tensors["weight"]``, after checking it is a matrix (``what`` names the expectation) of
    ``dtypes``."""
    w = tensors["weight"]
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"weight: expected {what} [O, K], got shape {list(getattr(w, 'shape', []))}")
    expect("weight", w, dtypes=dtypes)
    return tuple(w.shape)


class Scheme(ABC):
    """One description value (``quant_type``) and what it implies, from the checkpoint's tensors to the layer.

    Subclass it in one file of this package and register it there (``schemes/__init__.py``); loading, saving,
    checking and serving then handle it. The class attributes describe the tensors; the methods check them,
    build the layer, read them back and split them as vLLM's ranks hold them.
    """

    quant_type: ClassVar[str]  # the value of the scheme's tensors in quant_model_description.json
    layer_cls: ClassVar[type[nn.Module]]  # the module that computes it
    names: ClassVar[tuple[str, ...]]  # the tensors every linear of the scheme stores (plus an optional bias)
    weight_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.int8,)
    weight_what: ClassVar[str] = "an int8 matrix"  # how a malformed weight's error describes the expectation
    recipe_name: ClassVar[str | None] = None  # its name in recipes and the CLI (recipe.SCHEMES), if it has one
    # False only for FLOAT: the model's own parameters, saved and loaded as its state dict holds them
    quantized: ClassVar[bool] = True
    # model_quant_type is the present scheme of highest precedence (docs/checkpoint-format.md: informational)
    precedence: ClassVar[int] = 0
    # Per-tensor parameters: one per fused vLLM module, copied whole to every rank (docs/tensor-parallel.md)
    shared: ClassVar[tuple[str, ...]] = ()
    # Tensors with an input dimension: what vLLM narrows to a row-parallel rank's columns
    input_dim: ClassVar[tuple[str, ...]] = ("weight",)
    # Tensors stored in the layer's activation dtype, or in save_quantized's dtype when one is given
    act_dtype_tensors: ClassVar[tuple[str, ...]] = OPTIONAL
    # Tensors the integer weights were folded with: rounding them leaves the two out of step
    folded: ClassVar[tuple[str, ...]] = ()
    # Whether its row-parallel tensors are sized for one tensor-parallel size (docs/tensor-parallel.md)
    sized_for_tp: ClassVar[bool] = False
    # Top-level description fields it reads (vllm-ascend's defaults when absent); its layers hold them as
    # attributes of the same names, its ``build`` takes them as keyword arguments
    fields: ClassVar[Mapping[str, object]] = {}

    def __repr__(self) -> str:
        return f"<scheme {self.quant_type} ({self.layer_cls.__name__})>"

    @property
    def has_clip_ratio(self) -> bool:
        """Whether its layers carry an activation clip ratio (and so take part in clip groups and sweeps)."""
        return "clip_ratio" in self.names

    # ------------------------------------------------------------------ the checkpoint's tensors
    @abstractmethod
    def tensor_specs(self, out_features: int, in_features: int, tp_size: int = 1) -> dict[str, TensorSpec]:
        """Every tensor of a linear ``[O, K]`` (``names``, then the optional bias) with its shape and dtypes;
        ``tp_size``: the ranks a row-parallel linear's per-rank tensors are sized for."""

    def check(self, tensors: Mapping[str, torch.Tensor], tp_size: int = 1) -> None:
        """Check one linear's tensors (short names, all of ``names`` present) against :meth:`tensor_specs`."""
        out_f, in_f = matrix_shape(tensors, self.weight_dtypes, self.weight_what)
        check_specs(tensors, self.tensor_specs(out_f, in_f, tp_size))

    def linear_shape(self, weight: torch.Tensor) -> tuple[int, int]:
        """``[O, K]`` of the linear whose stored ``weight`` this is (a packed weight stores fewer columns)."""
        return tuple(weight.shape)

    # ------------------------------------------------------------------ top-level description fields
    def description_fields(self, layers) -> dict[str, object]:
        """The top-level fields a checkpoint of ``layers`` (this scheme's) records: one value per field, which
        all of them must share (``ValueError`` naming the field otherwise)."""
        out: dict[str, object] = {}
        for name in self.fields:
            values = {getattr(layer, name) for layer in layers}
            if len(values) > 1:
                raise ValueError(f"{name}: the {self.quant_type} layers hold {sorted(values)}; a checkpoint records "
                                 "one value")
            if values:
                out[name] = values.pop()
        return out

    def fields_problem(self, desc: Mapping) -> str:
        """Why the description's top-level fields do not suit this scheme, in words; ``""`` when they do."""
        return ""

    def read_fields(self, desc: Mapping) -> dict[str, object]:
        """The fields as :meth:`build` takes them: the description's values, else the defaults."""
        return {name: default if desc.get(name) is None else desc[name] for name, default in self.fields.items()}

    def tensors_of(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors ``layer`` stores, by short name, exactly as it was built from them."""
        return layer.checkpoint_tensors()

    # ------------------------------------------------------------------ the layer
    @abstractmethod
    def build(self, tensors: Mapping[str, torch.Tensor], *, backend: str | None = None,
              act_dtype: torch.dtype | None = None, tp_size: int = 1) -> nn.Module:
        """The layer computing these tensors (short names), on ``weight``'s device; ``ValueError`` naming a bad one."""

    @abstractmethod
    def from_float(self, linear: nn.Linear, q: torch.Tensor | None, scale: torch.Tensor | None, *,
                   act_dtype: torch.dtype, backend: str | None = None, tp_size: int = 1, **extra) -> nn.Module:
        """The layer replacing ``linear``, from integer weights ``q`` and their scale already computed (by
        :mod:`flatquant_lab.calibrate`); ``extra``: what else the scheme stores (transforms, clip ratio)."""

    def act_dtype_of(self, layer: nn.Module) -> torch.dtype | None:
        """The half dtype ``layer`` computes in (recorded in the description's metadata), or ``None``."""
        return layer.act_dtype

    def tp_size_of(self, layer: nn.Module) -> int:
        """The ranks ``layer`` computes as (1: one device)."""
        return layer.tp_size

    def weight_bytes(self, layer: nn.Module) -> int:
        """Bytes its weights take in memory as vllm-ascend holds them (the bias not counted)."""
        return sum(t.numel() * t.element_size() for n, t in self.tensors_of(layer).items() if n not in OPTIONAL)

    @abstractmethod
    def input_basis_weight(self, layer: nn.Module) -> torch.Tensor:
        """The float64 ``[O, K]`` weight (CPU) the layer's tensors stand for, in the basis of its input."""

    # ------------------------------------------------------------------ loading
    def load_act_dtype(self, tensors: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None,
                       saved_act: torch.dtype | None, saved_dtype: torch.dtype) -> torch.dtype:
        """The dtype a loaded layer computes in: the requested half ``dtype``, else the one the description records,
        else config.json's when half, else bfloat16 (vllm-ascend's params dtype)."""
        return (dtype if dtype in HALF_DTYPES else saved_act if saved_act is not None
                else saved_dtype if saved_dtype in HALF_DTYPES else torch.bfloat16)

    def cast_for_load(self, tensors: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None,
                      act_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The tensors as :meth:`build` takes them in a load with ``dtype``, and the ones that cast rounded
        (``"left_trans (float16 -> bfloat16)"``)."""
        return dict(tensors), []

    # ------------------------------------------------------------------ tensor parallelism
    def shard(self, tensors: Mapping[str, torch.Tensor], *, rank: int, tp: int,
              rows: slice | None = None) -> dict[str, torch.Tensor]:
        """What rank ``rank`` of ``tp`` holds (docs/tensor-parallel.md). ``rows=None``: a row-parallel linear, its
        ``input_dim`` tensors narrowed to columns ``[r K/tp, (r+1) K/tp)`` and the bias on rank 0 only; else a
        column-parallel one, every tensor but the ``shared`` ones narrowed to ``rows``."""
        if rows is None:
            k = tensors["weight"].shape[1] // tp
            part = {n: (t[:, rank * k:(rank + 1) * k] if n in self.input_dim else t) for n, t in tensors.items()}
            if rank != 0:
                part.pop("bias", None)  # vLLM adds a row-parallel bias on rank 0 only
            return part
        return {n: (t if n in self.shared else t[rows]) for n, t in tensors.items()}

    def tp_load_problem(self, prefix: str, tensors: Mapping[str, torch.Tensor], k_rank: int, tp: int,
                        cann: str) -> str:
        """Why vLLM would not load or run this linear with ``k_rank`` input columns per rank at TP ``tp``, in words
        naming the tensor; ``""`` when it would."""
        return ""


# ---------------------------------------------------------------------------------------------------- KV cache
def rank_kv_heads(rank: int, tp: int, num_kv_heads: int) -> range:
    """The kv heads rank ``rank`` of ``tp`` keeps (docs/tensor-parallel.md): ``[r H/tp, (r+1) H/tp)`` when the heads
    split, else the one head ``r // (tp / H)`` it replicates."""
    if num_kv_heads >= tp:
        per = num_kv_heads // tp
        return range(rank * per, (rank + 1) * per)
    head = rank // (tp // num_kv_heads)
    return range(head, head + 1)


class KVCacheScheme(ABC):
    """One ``kv_cache_type`` value of ``quant_model_description.json`` and what it implies (docs/kv-cache.md).

    A KV-cache scheme is chosen per model, independently of the linear schemes: its tensors belong to each decoder
    layer's attention (``<attn>.k_proj.<leaf>``, ``<attn>.v_proj.<leaf>``, ``attn`` the ``self_attn`` prefix), the
    description switches it on with top-level fields, and its module (``layer_cls``) hangs off the attention
    module. Checks raise ``ValueError`` whose message starts with the tensor's short name (``k_proj.kv_cache_scale:
    ...``); :mod:`flatquant_lab.io` puts the attention prefix in front. Register a subclass with
    ``schemes.register_kv_cache``.
    """

    cache_type: ClassVar[str]  # the value of "kv_cache_type" (and of each of its tensors' entries)
    layer_cls: ClassVar[type[nn.Module]]  # the module an attention layer carries its scales in
    projections: ClassVar[tuple[str, ...]] = ("k_proj", "v_proj")
    leaves: ClassVar[tuple[str, ...]]  # the tensors per projection
    fields: ClassVar[tuple[str, ...]] = ("kv_cache_type",)  # top-level description fields set to cache_type
    served: ClassVar[bool] = True  # False: a research mode no vllm-ascend build runs (saving it warns)

    def __repr__(self) -> str:
        return f"<kv cache scheme {self.cache_type} ({self.layer_cls.__name__})>"

    @property
    def names(self) -> tuple[str, ...]:
        """The short names of one attention layer's tensors: ``k_proj.<leaf>``, ..., ``v_proj.<leaf>``."""
        return tuple(f"{p}.{leaf}" for p in self.projections for leaf in self.leaves)

    def is_key(self, key: str) -> bool:
        """Whether a checkpoint key is one of this scheme's tensors (``...self_attn.k_proj.kv_cache_scale``)."""
        return any(key.endswith("." + n) for n in self.names)

    def split_key(self, key: str) -> tuple[str, str]:
        """``(attention prefix, short name)`` of one of its keys."""
        for n in self.names:
            if key.endswith("." + n):
                return key[: -len(n) - 1], n
        raise ValueError(f"key: {key!r} is not a {self.cache_type} KV-cache tensor")

    def description_fields(self) -> dict[str, str]:
        return dict.fromkeys(self.fields, self.cache_type)

    @abstractmethod
    def check(self, tensors: Mapping[str, torch.Tensor], channels: int) -> None:
        """Check one attention layer's tensors (short names, all present) for ``channels = num_kv_heads *
        head_dim``; ``ValueError`` naming the tensor."""

    @abstractmethod
    def build(self, tensors: Mapping[str, torch.Tensor], *, num_kv_heads: int, head_dim: int,
              dtype: torch.dtype | None = None) -> nn.Module:
        """The module holding these tensors (short names), in ``dtype`` (the model dtype) when given."""

    @abstractmethod
    def tensors_of(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors ``module`` holds, by short name, as a checkpoint stores them."""

    def serve_problem(self, tensors: Mapping[str, torch.Tensor], *, num_kv_heads: int, head_dim: int) -> str:
        """Why vllm-ascend would not serve these tensors (short names) consistently, in words naming the tensor or
        size; ``""`` when it would."""
        return ""

    def shard(self, tensors: Mapping[str, torch.Tensor], *, rank: int, tp: int, num_kv_heads: int,
              head_dim: int) -> dict[str, torch.Tensor]:
        """What rank ``rank`` of ``tp`` keeps of each tensor: the channels of its kv heads (:func:`rank_kv_heads`)
        in the ``[num_kv_heads, head_dim]`` view; a single value stays whole."""
        heads = rank_kv_heads(rank, tp, num_kv_heads)
        out = {}
        for n, t in tensors.items():
            flat = t.reshape(-1)
            if flat.numel() > 1:
                flat = flat.view(num_kv_heads, head_dim)[heads.start:heads.stop].reshape(-1)
            out[n] = flat
        return out


class TransformScheme(Scheme):
    """A scheme whose integer weights carry a learned input transform (``folded``: ``left_trans``,
    ``right_trans``), stored in the model dtype: how a load picks its activation dtype and casts the transforms."""

    def load_act_dtype(self, tensors: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None,
                       saved_act: torch.dtype | None, saved_dtype: torch.dtype) -> torch.dtype:
        """The requested half dtype, else the one the description records, else the transforms' own, else bfloat16
        (what ``from_checkpoint`` picks for float32 transforms)."""
        stored = tensors["left_trans"].dtype
        return (dtype if dtype in HALF_DTYPES else saved_act if saved_act is not None
                else stored if stored in HALF_DTYPES else torch.bfloat16)

    def cast_for_load(self, tensors: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None,
                      act_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], list[str]]:
        parts, rounded = dict(tensors), []
        if dtype is not None:
            for name in self.folded:
                t = parts[name]
                if t.dtype in HALF_DTYPES and cast_rounds(t, dtype):
                    rounded.append(f"{name} ({dtype_name(t.dtype)} -> {dtype_name(dtype)})")
                parts[name] = t.to(dtype)
        if "bias" in parts:
            parts["bias"] = parts["bias"].to(act_dtype)  # added in the activation dtype, as vllm-ascend does
        return parts, rounded
