"""Clip-ratio groups: the W4A4 linears of one decoder layer that share one input, hence one ``clip_ratio``.

vllm-ascend loads q/k/v as one fused module (``qkv_proj``) and gate/up as another (``gate_up_proj``), each
with one per-tensor ``clip_ratio``, so the shards of a fused module must hold the same value. A group is
named ``<layer prefix>.<group>`` (``model.layers.3.attn``, ``model.layers.3.mlp``, ``model.layers.3.o``,
``model.layers.3.down``: the adapter's ``GroupSpec`` names, as the end-to-end stage reports its clips), or
by vLLM's fused module name (``model.layers.3.self_attn.qkv_proj``, ``model.layers.3.mlp.gate_up_proj``),
or as ``(3, "attn")``.

    fq.set_group_clip_ratio(model, "model.layers.3.attn", 0.9)     # q, k and v together
    fq.set_group_clip_ratio(model, (3, "mlp"), 0.85)              # gate and up together
"""
from __future__ import annotations

from torch import nn

from .. import ops
from ..schemes import scheme_of


def _has_clip(mod: nn.Module) -> bool:
    scheme = scheme_of(mod)
    return scheme is not None and scheme.has_clip_ratio


def _kind(mod: nn.Module) -> str:
    """A linear's scheme as the messages name it: its description value, or "float"."""
    scheme = scheme_of(mod)
    return scheme.quant_type if scheme is not None and scheme.quantized else "float"


def _group_table(model: nn.Module) -> tuple[dict[str, list[str]], dict[str, str], dict[str, str]]:
    """``(groups, aliases, not_w4a4)``: group name -> its W4A4 linears' full names; fused module name -> group
    name; group name -> why it has no clip ratio (its linears are W8A8_DYNAMIC or float)."""
    from . import adapter_for

    adapter = adapter_for(model)
    groups, aliases, not_w4a4 = {}, {}, {}
    for i, layer in enumerate(adapter.decoder_layers(model)):
        prefix = adapter.layer_prefix(i)
        for g in adapter.groups:
            key = f"{prefix}.{g.name}"
            names = [f"{prefix}.{lin}" for lin in g.linears if _has_clip(layer.get_submodule(lin))]
            if names:
                groups[key] = names
            else:
                kinds = {_kind(layer.get_submodule(lin)) for lin in g.linears}
                not_w4a4[key] = " and ".join(sorted(kinds))
            if g.fused_name:
                parent = g.linears[0].rpartition(".")[0]
                aliases[f"{prefix}.{parent}.{g.fused_name}" if parent else f"{prefix}.{g.fused_name}"] = key
    return groups, aliases, not_w4a4


def clip_groups(model: nn.Module) -> dict[str, list[str]]:
    """Module names of the ``W4A4FlatQuantLinear`` sharing one input (and so one clip), per group:
    ``"model.layers.0.attn" -> [q_proj, k_proj, v_proj]`` (their full names). Groups with no W4A4 linear
    (msModelSlim's W8A8_DYNAMIC o/down, float layers) are left out."""
    return _group_table(model)[0]


def set_group_clip_ratio(model: nn.Module, group, clip_ratio: float) -> list[str]:
    """Set one activation clip ratio on every W4A4 linear of a group (q/k/v together, gate/up together), in
    place; returns the names of the linears set.

    ``group``: ``"model.layers.3.attn"`` (see :func:`clip_groups`), vLLM's fused module name
    (``"model.layers.3.self_attn.qkv_proj"``), or ``(layer_index, group_name)``, e.g. ``(3, "mlp")``.
    ``clip_ratio``: a finite float in (0, 1]. Both are checked before anything changes: an unknown group, a
    group without W4A4 linears, or a ratio outside (0, 1] raises ``ValueError`` naming the parameter.
    """
    c = ops.check_clip_ratio(clip_ratio)  # its message starts with "clip_ratio:"
    groups, aliases, not_w4a4 = _group_table(model)
    if isinstance(group, tuple) and len(group) == 2 and isinstance(group[0], int) and not isinstance(group[0], bool):
        from . import adapter_for

        key = f"{adapter_for(model).layer_prefix(group[0])}.{group[1]}"
    elif isinstance(group, str):
        key = aliases.get(group, group)
    else:
        raise ValueError(f"group: expected a group name such as 'model.layers.0.attn' or (layer_index, group_name), "
                         f"got {group!r}")
    if key in not_w4a4:
        raise ValueError(f"group: {group!r} has no W4A4 FlatQuant linear (its linears are {not_w4a4[key]}, which have "
                         "no activation clip ratio)")
    if key not in groups:
        names = list(groups)
        shown = names[:4] + (["..."] if len(names) > 4 else [])
        kinds = sorted({k.rpartition(".")[2] for k in names})
        raise ValueError(f"group: unknown group {group!r}; this model's groups are {shown} ({len(names)} in all: "
                         f"'<layer prefix>.<group>' with group one of {kinds}, or vLLM's fused module names such as "
                         f"{next(iter(aliases), 'model.layers.0.self_attn.qkv_proj')!r})")
    for name in groups[key]:
        model.get_submodule(name).set_clip_ratio(c)
    return list(groups[key])
