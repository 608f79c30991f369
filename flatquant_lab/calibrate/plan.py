"""The plan of one decoder layer: its transform groups, their sizes, each group's scheme and why.

A group's scheme comes from the recipe (``QuantConfig.scheme_for``); the linears vLLM fuses into
one module (q/k/v, gate/up) must get one scheme, except that a ``skip`` on any of them keeps the
whole fused group float. A group the recipe puts on FlatQuant whose size the NPU op cannot run
takes ``QuantConfig.fallback``.

A ``W4A4_MXFP4_FLATQUANT`` group (recipe scheme ``w4a4_mxfp4_flatquant``) is sized by ``mx_factors`` for the
description's ``max_supported_tp`` (``QuantConfig.mx_max_tp``), whatever ``tp_size``: a row-parallel one has
``L`` block-diagonal over that many blocks (``Group.blocks``), so its export computes the same at every TP size
that divides it.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..kronecker import decompose_dim, npu_supported
from ..layers.w4a4_mxfp4_flatquant import MAX_FACTOR as MX_MAX_FACTOR, mx_factors
from ..models import adapter_for
from ..mxfp4 import GROUP as MX_GROUP
from ..recipe import FLATQUANT, FLOAT, MXFP4, TRANSFORMED, QuantConfig


@dataclass
class Group:
    """One transform of one decoder layer and the linears that share it."""

    name: str  # attn | o | mlp | down
    linears: tuple[str, ...]  # paths inside the decoder layer
    size: int
    n1: int
    n2: int
    smooth_target: str | None  # where d folds: a norm, or the rows of a preceding linear
    kv_tied: tuple[int, int] | None = None  # (num_kv_heads, n_rep) when d is tied across GQA heads
    skip_reason: str = ""  # why the group has no FlatQuant transform (empty when it has one)
    row_parallel: bool = False  # vLLM splits this group's input across tensor-parallel ranks
    scheme: str = FLATQUANT  # w4a4_flatquant | w8a8_dynamic | float | w4a4_mxfp4_flatquant (recipe.SCHEMES)
    fallback: bool = False  # the recipe said FlatQuant, but the NPU op cannot run this size
    tp: int = 1  # diagonal blocks of the transform, kron(I_tp, L, R): QuantConfig.tp_size for row-parallel groups
    blocks: int = 1  # MXFP4: diagonal blocks of L, each learned on its own (mx_max_tp for row-parallel groups)

    @property
    def quantized(self) -> bool:
        """Whether the group has a FlatQuant transform (``scheme`` int4 or MXFP4 FlatQuant)."""
        return not self.skip_reason

    @property
    def mx(self) -> bool:
        """Whether the group is ``W4A4_MXFP4_FLATQUANT`` (MXFP4 quantizers; ``L`` block-diagonal over ``blocks``)."""
        return self.scheme == MXFP4


def plan_layer(model: nn.Module, index: int, cfg: QuantConfig, info=None) -> list[Group]:
    """The transform groups of decoder layer ``index`` (the model family's), with the reason if one stays float."""
    adapter = adapter_for(model)
    info = info or adapter.info(model)
    prefix = adapter.layer_prefix(index)
    groups = []
    for spec in adapter.groups:
        size = adapter.group_size(spec, info)
        # vLLM splits a row-parallel input in tp_size slices; each rank transforms its own with one L, R
        tp = cfg.schemes.tp_size if spec.row_parallel else 1
        n1, n2 = decompose_dim(size // tp) if size % tp == 0 else decompose_dim(size)
        names = [f"{prefix}.{lin}" for lin in spec.linears]
        picks = [cfg.scheme_for(n) for n in names]
        skipped = [hit for hit in map(cfg.skip_match, names) if hit is not None]
        fallback, blocks = False, 1
        if skipped:
            # vllm-ascend fuses q/k/v and gate/up: a fused module is all quantized or all float
            scheme = FLOAT
            together = " (the fused group stays float together)" if len(spec.linears) > 1 else ""
            reason = f"QuantConfig.skip matches {skipped[0]!r}{together}"
        else:
            if len({scheme for scheme, _ in picks}) > 1:
                listing = ", ".join(f"{n} is {scheme}" for n, (scheme, _) in zip(names, picks))
                raise ValueError(f"recipe: {listing}; vLLM loads them as one fused module "
                                 f"({spec.fused_name or spec.name}), so they need one scheme")
            scheme, reason = picks[0]
            if scheme == FLATQUANT:
                support = npu_supported(n1, n2, cfg.schemes.cann)
                why = (f"input size {size} is not divisible by tp_size {tp}" if size % tp else
                       f"input size {size // tp} per rank is not divisible by 8" if tp > 1 and (size // tp) % 8 else
                       f"input size {size} is not divisible by 8" if size % 8 else
                       f"npu_kronecker_quant cannot run {n1}x{n2}: {support.reason}" if not support else "")
                scheme, reason, fallback = (cfg.schemes.fallback, why, True) if why else (FLATQUANT, "", False)
            elif scheme == MXFP4:
                max_tp = cfg.schemes.mx_max_tp
                why, (n1, n2) = mx_plan(size, spec.row_parallel, max_tp)
                blocks = max_tp if spec.row_parallel else 1
                scheme, reason, fallback = (cfg.schemes.fallback, why, True) if why else (MXFP4, "", False)
        kv_tied = (info.num_kv_heads, info.num_heads // info.num_kv_heads) if spec.kv_tied else None
        groups.append(Group(spec.name, spec.linears, size, n1, n2, spec.smooth_target if cfg.train.smooth else None,
                            kv_tied, reason, spec.row_parallel, scheme, fallback, tp if scheme == FLATQUANT else 1,
                            blocks if scheme == MXFP4 else 1))
    return groups


def mx_plan(size: int, row_parallel: bool, max_tp: int) -> tuple[str, tuple[int, int]]:
    """``(why not, (L, R))`` of an MXFP4 group of input ``size``: ``mx_factors`` (``decompose_dim`` for a
    column-parallel group; for a row-parallel one ``R`` sized for ``max_tp`` ranks and ``L`` split into ``max_tp``
    diagonal blocks); ``why`` is ``""`` when the layer can take them."""
    pair = decompose_dim(size)
    if size % MX_GROUP:
        return f"input size {size} is not a multiple of {MX_GROUP} (one E8M0 scale per {MX_GROUP})", pair
    if row_parallel and (size % max_tp or (size // max_tp) % MX_GROUP):
        return (f"input size {size} does not split into mx_max_tp = {max_tp} slices of whole groups of {MX_GROUP} "
                "(each rank quantizes its own slice; a lower mx_max_tp may)"), pair
    try:
        n1, n2 = mx_factors(size, row_parallel, max_tp)
    except ValueError as exc:
        return f"W4A4_MXFP4_FLATQUANT cannot size its transforms: {exc}", pair
    if row_parallel and n1 % max_tp:
        return f"left_trans of size {n1} does not split into mx_max_tp = {max_tp} diagonal blocks", (n1, n2)
    if n2 % 2:
        return f"right_trans size {n2} is odd (two FP4 codes per byte along it)", (n1, n2)
    if max(n1, n2) > MX_MAX_FACTOR:
        return f"factor sizes {n1} x {n2} exceed {MX_MAX_FACTOR}", (n1, n2)
    return "", (n1, n2)


def plan_model(model: nn.Module, cfg: QuantConfig, info=None) -> list[list[Group]]:
    """``plan_layer`` for every decoder layer. Reads only the model's config and module structure, so a
    model on the meta device (no weights) plans the same as the loaded one."""
    adapter = adapter_for(model)
    info = info or adapter.info(model)
    return [plan_layer(model, i, cfg, info) for i in range(info.num_layers)]


def fallback_notice(plans: list[list[Group]], cfg: QuantConfig) -> str:
    """One line: which decoder linears the recipe puts on FlatQuant but take ``cfg.schemes.fallback`` instead,
    why, and in how many layers; ``""`` when there are none."""
    total = sum(len(g.linears) for groups in plans for g in groups)
    causes: dict[str, dict[str, int]] = {}  # reason -> linear path -> layers
    for groups in plans:
        for g in groups:
            if g.fallback:
                for lin in g.linears:
                    causes.setdefault(g.skip_reason, {}).setdefault(lin, 0)
                    causes[g.skip_reason][lin] += 1
    if not causes:
        return ""
    n = sum(c for paths in causes.values() for c in paths.values())
    parts = []
    for why, paths in causes.items():
        where = ", ".join(f"{p} ({c} of {len(plans)} layers)" if c < len(plans) else p for p, c in paths.items())
        parts.append(f"{where} in {'every layer' if all(c == len(plans) for c in paths.values()) else 'those'}, "
                     f"because {why}")
    none = "; none is left on W4A4 FlatQuant" if not flatquant_linears(plans) else ""
    return (f"{n} of {total} decoder linears will be {cfg.schemes.fallback} (the fallback scheme) instead of W4A4 FlatQuant"
            f"{none}: " + "; ".join(parts))


def flatquant_linears(plans: list[list[Group]]) -> int:
    """How many decoder linears the plan puts on W4A4 FlatQuant (int4 or MXFP4)."""
    return sum(len(g.linears) for groups in plans for g in groups if g.scheme in TRANSFORMED)
