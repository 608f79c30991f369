"""What a decoder layer learns, per transform group: typed, so that no stage spells tensor names.

``GroupState``: the Kronecker factors ``L``, ``R``, the activation clip logit ``a`` (clip ``sigmoid(a)``), the
smoothing ``log d`` where the group has one, and each linear's per-row weight clip logits.
``KVState``: a layer's KV4 cache (``kv_cache="KV4"``): ``T_k``, ``T_v`` and the clip logit pairs of K and V.
``LayerState``: group name -> ``GroupState`` for the layer's FlatQuant groups, and its ``KVState``. The flat tensor
names (``attn.left``, ``self_attn.q_proj.weight_clip``, ...) exist only at the work-dir boundary
(:meth:`LayerState.to_tensors`, :meth:`LayerState.from_tensors`), so a work dir written before still resumes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .plan import Group


@dataclass(frozen=True)
class GroupState:
    """The learned tensors of one transform group (float32, on the layer's device)."""

    left: torch.Tensor  # L [n1, n1]
    right: torch.Tensor  # R [n2, n2]
    act_clip: torch.Tensor  # [1], the activation clip logit: clip ratio sigmoid(act_clip)
    weight_clip: dict[str, torch.Tensor] = field(default_factory=dict)  # linear path -> [out_features] logits
    log_smooth: torch.Tensor | None = None  # log d over the group's input channels; None: no smoothing

    def clip_ratio(self) -> float:
        """``sigmoid(act_clip)`` as a Python float: what the quantized layers and the report hold."""
        return float(torch.sigmoid(self.act_clip).item())

    def to(self, device) -> GroupState:
        return GroupState(self.left.to(device), self.right.to(device), self.act_clip.to(device),
                          {p: c.to(device) for p, c in self.weight_clip.items()},
                          None if self.log_smooth is None else self.log_smooth.to(device))

    def to_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The work-dir names of this group ``name``'s tensors (the linears' clips under their own paths)."""
        out = {f"{name}.left": self.left, f"{name}.right": self.right}
        if self.log_smooth is not None:
            out[f"{name}.log_smooth"] = self.log_smooth
        out[f"{name}.act_clip"] = self.act_clip
        out.update({f"{path}.weight_clip": clip for path, clip in self.weight_clip.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], group: Group) -> GroupState:
        return cls(tensors[f"{group.name}.left"], tensors[f"{group.name}.right"], tensors[f"{group.name}.act_clip"],
                   {path: tensors[f"{path}.weight_clip"] for path in group.linears},
                   tensors.get(f"{group.name}.log_smooth"))


@dataclass(frozen=True)
class KVState:
    """The learned KV4 tensors of one attention layer (float32): ``T_k``, ``T_v`` (``[head_dim, head_dim]``) and the
    clip logits ``[a_max, a_min]`` of K and of V (clip ratios ``sigmoid(a)``)."""

    t_k: torch.Tensor
    t_v: torch.Tensor
    k_clip: torch.Tensor
    v_clip: torch.Tensor

    NAMES = ("t_k", "t_v", "k_clip", "v_clip")

    def clip_ratios(self) -> dict[str, list[float]]:
        """``{"k": [clip_max, clip_min], "v": [...]}`` as Python floats (the report's ``kv_clip``)."""
        return {w: torch.sigmoid(getattr(self, f"{w}_clip")).tolist() for w in ("k", "v")}

    def to(self, device) -> KVState:
        return KVState(*(getattr(self, n).to(device) for n in self.NAMES))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {f"kv.{n}": getattr(self, n) for n in self.NAMES}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> KVState | None:
        """The state a work dir holds, ``None`` where it holds none (a run without KV4)."""
        if "kv.t_k" not in tensors:
            return None
        return cls(*(tensors[f"kv.{n}"] for n in cls.NAMES))


@dataclass(frozen=True)
class LayerState:
    """The learned state of one decoder layer: group name -> ``GroupState`` (its FlatQuant groups only)."""

    groups: dict[str, GroupState] = field(default_factory=dict)
    kv: KVState | None = None  # the KV4 cache's tensors (kv_cache="KV4"), else None

    def __getitem__(self, name: str) -> GroupState:
        return self.groups[name]

    def __contains__(self, name: str) -> bool:
        return name in self.groups

    def to(self, device) -> LayerState:
        return LayerState({name: g.to(device) for name, g in self.groups.items()},
                          None if self.kv is None else self.kv.to(device))

    def clip_ratios(self) -> dict[str, float]:
        """Group name -> activation clip ratio (the report's ``clip_ratios``)."""
        return {name: g.clip_ratio() for name, g in self.groups.items()}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The flat tensor dict a work dir holds (the same names as every earlier version wrote)."""
        out = {}
        for name, g in self.groups.items():
            out.update(g.to_tensors(name))
        if self.kv is not None:
            out.update(self.kv.to_tensors())
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], groups: list[Group]) -> LayerState:
        """Read a work dir's flat tensor dict back, for the FlatQuant groups of ``groups``."""
        return cls({g.name: GroupState.from_tensors(tensors, g) for g in groups if g.quantized},
                   KVState.from_tensors(tensors))

    @classmethod
    def of(cls, learned: LayerState | dict[str, torch.Tensor], groups: list[Group]) -> LayerState:
        """``learned`` as a ``LayerState``: one already is; a flat tensor dict (as ``WorkDir.load`` returns) is read."""
        return learned if isinstance(learned, LayerState) else cls.from_tensors(learned, groups)
