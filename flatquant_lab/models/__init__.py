"""Model-family adapters: one module per family, registered here; nothing else knows a layout.

    adapter = adapter_for(model)                # raises UnsupportedModelError for other models
    for i, layer in enumerate(adapter.decoder_layers(model)): ...
    adapter.groups                              # GroupSpec: linears sharing a transform, fold targets

Adding a family: a module here with a :class:`ModelAdapter` subclass, and one line in ``ADAPTERS``.
"""
from __future__ import annotations

from torch import nn

from ..schemes import scheme_of
from .base import GroupSpec, ModelAdapter, ModelInfo, UnsupportedModelError, layer_prefix, supported_text
from .clip import clip_groups, set_group_clip_ratio
from .llama import LLAMA_GROUPS, LlamaAdapter
from .qwen2 import Qwen2Adapter
from .qwen3 import Qwen3Adapter

ADAPTERS: tuple[ModelAdapter, ...] = (LlamaAdapter(), Qwen2Adapter(), Qwen3Adapter())
SUPPORTED_MODEL_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)

# The Llama layout's groups, by name (all registered families share it today).
GROUPS = {g.name: g.linears for g in LLAMA_GROUPS}
LINEAR_NAMES = tuple(n for names in GROUPS.values() for n in names)
# vLLM fused module -> its shards, over every registered family.
FUSED_MODULES = {name: shards for a in ADAPTERS for name, shards in a.fused_modules.items()}
# Paths (inside a decoder layer) of the linears vLLM splits along their input (RowParallelLinear).
ROW_PARALLEL_LINEARS = tuple(sorted({n for a in ADAPTERS for g in a.groups if g.row_parallel for n in g.linears}))


def is_row_parallel(prefix: str) -> bool:
    """Whether the linear at state-dict ``prefix`` (``model.layers.0.self_attn.o_proj``) is row-parallel in vLLM."""
    return any(prefix.endswith("." + n) for n in ROW_PARALLEL_LINEARS)

__all__ = [
    "ADAPTERS", "FUSED_MODULES", "GROUPS", "ROW_PARALLEL_LINEARS", "is_row_parallel", "GroupSpec", "LINEAR_NAMES",
    "attach_kv_cache", "attention_prefixes", "detach_kv_cache", "kv_cache_attention_on", "kv_caches", "kv_sizes",
    "plain_attention", "recording_attention", "set_kv_cache", "use_kv_cache_attention",
    "ModelAdapter", "ModelInfo",
    "SUPPORTED_MODEL_TYPES", "UnsupportedModelError", "adapter_for", "clip_groups", "decoder_layers", "layer_prefix",
    "linear_weight_bytes", "model_info", "quantized_linear_names", "set_group_clip_ratio", "set_submodule",
]


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s family (by ``config.model_type``)."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    for a in ADAPTERS:
        if mtype in a.model_types:
            return a
    raise UnsupportedModelError(f"model: {type(model).__name__} is not supported (model_type {mtype!r}); "
                                f"{supported_text()}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported model (raises ``UnsupportedModelError`` otherwise)."""
    return adapter_for(model).decoder_layers(model)


def model_info(model: nn.Module) -> ModelInfo:
    """Check the structure and read the sizes the transforms need."""
    return adapter_for(model).info(model)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def quantized_linear_names(model: nn.Module) -> list[str]:
    """Module names of every quantized linear (a layer of a registered scheme other than FLOAT: ``W4A4FlatQuantLinear``,
    ``W8A8DynamicLinear``), in module order."""
    return [name for name, mod in model.named_modules() if (s := scheme_of(mod)) is not None and s.quantized]


def linear_weight_bytes(model: nn.Module, decoder_only: bool = True) -> int:
    """Bytes the linear layers' weights take in memory (by default only the decoder layers' linears,
    the ones W4A4 quantizes; ``decoder_only=False`` adds the rest, e.g. ``lm_head``), each as its scheme
    counts it (``Scheme.weight_bytes``).

    ``nn.Linear``: its ``weight`` (bias not counted). ``W4A4FlatQuantLinear``: the packed int4
    weight, ``weight_scale``, ``weight_offset``, ``left_trans``, ``right_trans`` and ``clip_ratio``
    (bias not counted; the derived copies ``p1``/``p2`` are not counted either, as vllm-ascend keeps
    one copy of each transform). ``W8A8DynamicLinear``: the int8 weight, its scale and offset as the
    model dtype holds them (vllm-ascend's allocation).
    """
    total = 0
    root = decoder_layers(model) if decoder_only else model
    for mod in root.modules():
        scheme = scheme_of(mod)
        if scheme is not None:
            total += scheme.weight_bytes(mod)
    return total


# last: these use adapter_for and decoder_layers above
from .kv_cache import (  # noqa: E402
    attach_kv_cache, attention_prefixes, detach_kv_cache, kv_caches, kv_sizes, set_kv_cache,
)
from .kv_attention import (kv_cache_attention_on, plain_attention, recording_attention,  # noqa: E402
                           use_kv_cache_attention)
