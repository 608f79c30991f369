"""What an adapter says about a model family: where its decoder layers and linears are, which
linears share one input transform, where a smoothing scale folds, and which linears vLLM splits
along their input under tensor parallelism (row-parallel)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Which size a transform group's input has (ModelInfo field names).
INPUT_SIZES = ("hidden_size", "attn_size", "intermediate_size")


class UnsupportedModelError(ValueError):
    """The model's structure is not one flatquant_lab knows how to quantize."""


@dataclass(frozen=True)
class GroupSpec:
    """Linears of one decoder layer that share one input, hence one transform and one clip ratio."""

    name: str  # short name, e.g. attn | o | mlp | down
    linears: tuple[str, ...]  # paths inside the decoder layer
    smooth_target: str  # a norm (its weight divides by d) or the linear producing the input (its rows do)
    input_size: str  # one of INPUT_SIZES
    row_parallel: bool = False  # vLLM RowParallelLinear: each TP rank sees 1/N of the input
    kv_tied: bool = False  # d folds into v_proj's rows: one d per kv channel, shared by its query heads
    fused_name: str | None = None  # the vLLM module the linears are fused into (qkv_proj, gate_up_proj)

    def __post_init__(self):
        if self.input_size not in INPUT_SIZES:
            raise ValueError(f"input_size: expected one of {INPUT_SIZES}, got {self.input_size!r}")


@dataclass(frozen=True)
class ModelInfo:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def attn_size(self) -> int:
        """Input size of o_proj: the concatenated heads."""
        return self.num_heads * self.head_dim


def layer_prefix(i: int) -> str:
    """The state-dict prefix of decoder layer ``i`` (as in the HF checkpoint and vLLM)."""
    return f"model.layers.{i}"


def has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


class ModelAdapter:
    """Base adapter for Hugging Face causal LMs with ``model.model.layers[i]``; a family subclasses it."""

    model_types: tuple[str, ...] = ()
    description: str = ""
    groups: tuple[GroupSpec, ...] = ()
    norms: tuple[str, ...] = ()  # norms every decoder layer must have (smoothing folds into some)
    attention: str = "self_attn"  # the attention module inside a decoder layer (it carries the KV-cache scales)

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g.linears)

    @property
    def fused_modules(self) -> dict[str, tuple[str, ...]]:
        """vLLM fused module name -> the checkpoint linears loaded into it."""
        return {g.fused_name: g.linears for g in self.groups if g.fused_name}

    def group(self, name: str) -> GroupSpec:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def fail(self, model: nn.Module, why: str):
        raise UnsupportedModelError(f"model: {type(model).__name__} is not supported ({why}); {supported_text()}")

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        layers = getattr(getattr(model, "model", None), "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            self.fail(model, "no model.model.layers")
        return layers

    def layer_prefix(self, i: int) -> str:
        """The state-dict prefix of decoder layer ``i`` (as in the HF checkpoint and vLLM)."""
        return layer_prefix(i)

    def info(self, model: nn.Module) -> ModelInfo:
        """Check the structure (every decoder layer has the linears and norms) and read the sizes."""
        cfg = model.config
        layers = self.decoder_layers(model)
        for i, layer in enumerate(layers):
            for name in self.linear_names + self.norms:
                if not has_submodule(layer, name):
                    self.fail(model, f"layer {i} has no {name}")
            for name in self.linear_names:
                mod = layer.get_submodule(name)
                if not isinstance(mod, nn.Linear):
                    self.fail(model, f"layers.{i}.{name} is {type(mod).__name__}, not nn.Linear")
        heads = cfg.num_attention_heads
        return ModelInfo(
            model_type=cfg.model_type,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=len(layers),
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        )

    def group_size(self, group: GroupSpec, info: ModelInfo) -> int:
        return getattr(info, group.input_size)


def supported_text() -> str:
    from . import ADAPTERS

    parts = [f"{', '.join(a.model_types)} ({a.description})" for a in ADAPTERS]
    return "supported model_types: " + "; ".join(parts)
