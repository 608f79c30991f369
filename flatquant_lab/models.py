"""Where the quantizable linears of a decoder-only LM sit, found by module structure.

Supported: Hugging Face causal LMs of the Llama family (Llama, SmolLM2, Mistral-style), Qwen2 and
Qwen3: ``model.model.layers[i]`` with ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``,
``input_layernorm`` and ``post_attention_layernorm``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# The transform groups of one decoder layer: name -> linears that share one transform.
GROUPS = {
    "attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "mlp": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
LINEAR_NAMES = tuple(n for names in GROUPS.values() for n in names)


class UnsupportedModelError(ValueError):
    """The model's structure is not one flatquant_lab knows how to quantize."""


@dataclass(frozen=True)
class ModelInfo:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def _fail(model, why: str):
    raise UnsupportedModelError(
        f"model: {type(model).__name__} is not supported ({why}); supported are Hugging Face causal LMs "
        f"of model_type {', '.join(SUPPORTED_MODEL_TYPES)} (Llama family incl. SmolLM2 and Mistral-style, "
        "Qwen2, Qwen3) with model.model.layers[i].self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported model (raises ``UnsupportedModelError`` otherwise)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        _fail(model, "no model.model.layers")
    return layers


def model_info(model: nn.Module) -> ModelInfo:
    """Check the structure and read the sizes the transforms need."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        _fail(model, f"model_type {mtype!r}")
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        for name in LINEAR_NAMES + ("input_layernorm", "post_attention_layernorm"):
            if not _has(layer, name):
                _fail(model, f"layer {i} has no {name}")
        for name in LINEAR_NAMES:
            if not isinstance(layer.get_submodule(name), nn.Linear):
                _fail(model, f"layers.{i}.{name} is {type(layer.get_submodule(name)).__name__}, not nn.Linear")
    heads = cfg.num_attention_heads
    return ModelInfo(
        model_type=mtype,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=len(layers),
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
    )


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def layer_prefix(i: int) -> str:
    """The state-dict prefix of decoder layer ``i`` (as in the HF checkpoint and vllm-ascend)."""
    return f"model.layers.{i}"


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
