"""The plan of one decoder layer: its transform groups, their sizes, and which stay in float and why."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from ..kronecker import decompose_dim, npu_supported
from ..models import adapter_for
from ..recipe import QuantConfig

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
    skip_reason: str = ""
    row_parallel: bool = False  # vLLM splits this group's input across tensor-parallel ranks

    @property
    def quantized(self) -> bool:
        return not self.skip_reason


def plan_layer(model: nn.Module, index: int, cfg: QuantConfig, info=None) -> list[Group]:
    """The transform groups of decoder layer ``index`` (the model family's), with the reason if one stays float."""
    adapter = adapter_for(model)
    info = info or adapter.info(model)
    prefix = adapter.layer_prefix(index)
    groups = []
    for spec in adapter.groups:
        size = adapter.group_size(spec, info)
        n1, n2 = decompose_dim(size)
        reason = ""
        support = npu_supported(n1, n2, cfg.cann)
        if size % 8:
            reason = f"input size {size} is not divisible by 8"
        elif not support:
            reason = f"npu_kronecker_quant cannot run {n1}x{n2}: {support.reason}"
        else:
            hit = [p for p in cfg.skip for lin in spec.linears if fnmatch.fnmatchcase(f"{prefix}.{lin}", p)]
            if hit:
                # vllm-ascend fuses q/k/v and gate/up: a fused module is all W4A4 or all float
                reason = f"QuantConfig.skip matches {hit[0]!r}" + (
                    " (the fused group stays float together)" if len(spec.linears) > 1 else "")
        kv_tied = (info.num_kv_heads, info.num_heads // info.num_kv_heads) if spec.kv_tied else None
        groups.append(Group(spec.name, spec.linears, size, n1, n2, spec.smooth_target if cfg.smooth else None,
                            kv_tied, reason, spec.row_parallel))
    return groups
