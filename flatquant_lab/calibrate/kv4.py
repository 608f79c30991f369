"""KV4 in the layer-wise stage (``kv_cache="KV4"``, docs/kv-cache.md "KV4"): FlatQuant's ``T_k``, ``T_v`` and the clip
pairs of K and V, trained with the layer's linears on the same loss, then folded and attached. With C8 and
``kv_transforms="v"``, ``T_v`` alone, trained against a C8 stand-in and folded (C8's scales are calibrated after).

- ``T_k`` acts online after RoPE (``q T_k^{-T}``, ``k T_k``): the attention's KV-cache module applies it.
- ``T_v`` is folded into ``v_proj``'s rows per kv head (``W_h <- T_v^T W_h``, ``b_h <- b_h T_v``) and its inverse into
  ``o_proj``'s columns per query head (``W_o[:, h] <- W_o[:, h] T_v^{-T}``): exact in real arithmetic, and the
  int4 weights are quantized after the fold, so training maps the weights before their fake quantizer too.
- K and V: asymmetric 4 bits per token and head, ``clip = sigmoid(a)`` for the max and the min (logits start at
  4.0, the official code's), learned at the clip learning rate.
- C8 with ``T_v`` (``kv_learned == "v"``): K and V through int8 with symmetric per-channel scales ``max |x| / 127``
  over the batch (the static max scales calibration picks later, taken per batch), ``T_v`` learned, ``T_k = I``.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from einops import rearrange
from torch import nn

from ..layers import KV_CACHE_ATTR, KV4Cache, kv4_attention_inputs
from ..models import kv_sizes
from ..quantizers import round_ste
from ..recipe import QuantConfig
from ..transforms import orthogonal_factor
from .plan import Group
from .state import KVState

CLIP_LOGIT_INIT = 4.0  # sigmoid(4) = 0.982, where FlatQuant's learned KV clipping starts


def attention_paths(groups: list[Group]) -> tuple[str, str, str]:
    """``(attention, v_proj, o_proj)`` paths inside a decoder layer, from its groups' linears."""
    paths = [lin for g in groups for lin in g.linears]
    v = next((p for p in paths if p.endswith(".v_proj")), None)
    o = next((p for p in paths if p.endswith(".o_proj")), None)
    if v is None or o is None or v.rpartition(".")[0] != o.rpartition(".")[0]:
        raise ValueError(f"kv_cache: the KV transforms need a v_proj and an o_proj in one attention module, got "
                         f"linears {paths}")
    return v.rpartition(".")[0], v, o


def head_sizes(layer: nn.Module, groups: list[Group]) -> tuple[int, int]:
    """``(num_kv_heads, head_dim)`` of the layer's attention, from the model config it holds."""
    return kv_sizes(layer.get_submodule(attention_paths(groups)[0]))


@torch.no_grad()
def init_kv_state(layer: nn.Module, groups: list[Group], cfg: QuantConfig, layer_index: int) -> KVState | None:
    """The starting KV state: ``T_k``, ``T_v`` of the method's kind (identity with ``kv_transforms="none"``; ``T_k``
    identity with ``"v"``), clip logits 4.0 for FlatQuant, ``+inf`` (clip 1) for the fixed baselines and for C8
    (which has none); ``None`` when the layer-wise stage learns nothing of the cache."""
    learned = cfg.schemes.kv_learned
    if learned is None:
        return None
    _, head_dim = head_sizes(layer, groups)
    dev = next(layer.parameters()).device
    if learned == "none":
        kind = "identity"
    else:
        kind = {"rtn": "identity", "hadamard": "hadamard"}.get(cfg.method, cfg.train.transform_init)
    seed = cfg.seed * 100003 + layer_index * 17 + 15
    t_k, t_v = (orthogonal_factor(head_dim, "identity" if learned == "v" and j == 0 else kind, seed + j, device=dev,
                                  dtype=torch.float32) for j in (0, 1))
    logit = CLIP_LOGIT_INIT if cfg.method == "flatquant" and learned != "v" else float("inf")
    return KVState(t_k, t_v, torch.full((2,), logit, device=dev), torch.full((2,), logit, device=dev))


class ValueMap:
    """``T_v`` folded into ``v_proj`` (``rows``) or, inverted, into ``o_proj`` (``columns``), as a function of the
    weight: what a linear's stand-in multiplies before its fake quantizer."""

    def __init__(self, kv, side: str):  # kv: anything with t_v and head_dim (a FakeKV4 while training)
        self.kv, self.side = kv, side

    def version(self) -> int:
        return self.kv.t_v._version

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        d = self.kv.head_dim
        if self.side == "rows":  # v_proj: W_h <- T_v^T W_h per kv head
            return rearrange(torch.einsum("de,hdk->hek", self.kv.t_v, rearrange(w, "(h d) k -> h d k", d=d)),
                             "h e k -> (h e) k")
        inv = torch.linalg.inv(self.kv.t_v)  # o_proj: W[:, h] <- W[:, h] T_v^{-T} per query head
        return rearrange(torch.einsum("ohd,ed->ohe", rearrange(w, "o (h d) -> o h d", d=d), inv), "o h e -> o (h e)")

    def weight_rows(self, w: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of :meth:`weight` of ``w`` (any float dtype; computed in ``T_v``'s), mapping and casting no
        more of ``w`` than they need: their own rows for ``o_proj`` (its rows map independently), the whole kv heads
        they lie in for ``v_proj``."""
        dtype = self.kv.t_v.dtype
        if self.side != "rows":
            return self.weight(w[r0:r1].to(dtype))
        d = self.kv.head_dim
        h0 = r0 // d * d
        return self.weight(w[h0:-(-r1 // d) * d].to(dtype))[r0 - h0:r1 - h0]

    def bias(self, b: torch.Tensor | None) -> torch.Tensor | None:
        if b is None or self.side != "rows":
            return b
        return (rearrange(b, "(h d) -> h d", d=self.kv.head_dim) @ self.kv.t_v).flatten()


class MappedLinear(nn.Module):
    """A float linear (``W8A8_DYNAMIC`` or float group while training) computing with its ``ValueMap``-ed weight."""

    def __init__(self, linear: nn.Module, weight_map: ValueMap):
        super().__init__()
        self.linear, self.weight_map = linear, weight_map

    def forward(self, x):
        bias = self.linear.bias
        return nn.functional.linear(x, self.weight_map.weight(self.linear.weight.float()),
                                    self.weight_map.bias(None if bias is None else bias.float()))


def c8_batch_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """``x`` (``[B, H, T, D]``) through int8 with symmetric per-channel scales ``max |x| / 127`` over the batch and
    its tokens, rounded straight-through: C8's write and read with max scales, the scales taken per batch."""
    xf = x.float()
    scale = (xf.detach().abs().amax(dim=(0, 2), keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).eps)
    return (round_ste(xf / scale).clamp(-128, 127) * scale).to(x.dtype)


class FakeKV4(nn.Module):
    """The training stand-in of :class:`~flatquant_lab.layers.KV4Cache`: ``T_k``, ``T_v`` (float32 parameters, plain;
    ``T_k^{-T}`` by ``linalg.inv``) and the clip logit pairs; ``apply`` computes what the KV4 cache computes, with
    straight-through rounding. ``cache="C8"``: K and V through :func:`c8_batch_roundtrip`, ``T_v`` alone learned."""

    def __init__(self, state: KVState, head_dim: int, learn_transforms: bool, learn_clips: bool, cache: str = "KV4"):
        super().__init__()
        self.head_dim, self.cache = head_dim, cache
        self.t_k = nn.Parameter(state.t_k.float().clone(), requires_grad=learn_transforms)
        self.t_v = nn.Parameter(state.t_v.float().clone(), requires_grad=learn_transforms)
        self.k_clip = nn.Parameter(state.k_clip.float().clone(), requires_grad=learn_clips)
        self.v_clip = nn.Parameter(state.v_clip.float().clone(), requires_grad=learn_clips)

    def transform_parameters(self) -> list[nn.Parameter]:
        return [self.t_v] if self.cache == "C8" else [self.t_k, self.t_v]

    def clip_parameters(self) -> list[nn.Parameter]:
        return [] if self.cache == "C8" else [self.k_clip, self.v_clip]

    def apply(self, query, key, value):
        if self.cache == "C8":
            return query, c8_batch_roundtrip(key), c8_batch_roundtrip(value)
        inv_t = torch.linalg.inv(self.t_k).transpose(0, 1)
        return kv4_attention_inputs(query, key, value, self.t_k, inv_t, torch.sigmoid(self.k_clip),
                                    torch.sigmoid(self.v_clip))

    def state(self) -> KVState:
        return KVState(*(p.detach().clone() for p in (self.t_k, self.t_v, self.k_clip, self.v_clip)))


def install_kv(layer: nn.Module, groups: list[Group], state: KVState, learn: bool, learn_transforms: bool,
               cache: str = "KV4") -> FakeKV4:
    """Put a ``FakeKV4`` on the layer's attention (the KV-cache attention calls it) and map ``v_proj``/``o_proj``
    by its ``T_v``: a fake-quant linear gets the map before its quantizer, a float one is wrapped."""
    from .modules import FakeQuantLinear, RowDivLinear  # modules installs this: imported when it runs

    attn, v, o = attention_paths(groups)
    _, head_dim = head_sizes(layer, groups)
    fake = FakeKV4(state, head_dim, learn and learn_transforms, learn and cache != "C8", cache)
    setattr(layer.get_submodule(attn), KV_CACHE_ATTR, fake)
    for path, side in ((v, "rows"), (o, "columns")):
        mod, wmap = layer.get_submodule(path), ValueMap(fake, side)
        if isinstance(mod, FakeQuantLinear):
            mod.weight_map = wmap
        elif isinstance(mod, RowDivLinear):
            mod.linear = MappedLinear(mod.linear, wmap)
        else:
            parent = layer.get_submodule(path.rpartition(".")[0])
            setattr(parent, path.rpartition(".")[2], MappedLinear(mod, wmap))
    return fake


def kv_stand_in(layer: nn.Module) -> FakeKV4 | None:
    """The layer's ``FakeKV4``, if one is installed."""
    return next((m for m in layer.modules() if isinstance(m, FakeKV4)), None)


def uninstall_kv(layer: nn.Module) -> None:
    """Remove the layer's ``FakeKV4`` (the maps go with the stand-ins that hold them)."""
    for mod in layer.modules():
        if isinstance(getattr(mod, KV_CACHE_ATTR, None), FakeKV4):
            delattr(mod, KV_CACHE_ATTR)


@torch.no_grad()
def fold_kv(layer: nn.Module, groups: list[Group], state: KVState, xd: torch.dtype, attach: bool = True) -> None:
    """Fold ``T_v`` into the float ``v_proj`` and ``o_proj`` (in ``xd``, kept in float32 until they are quantized) and,
    with ``attach``, give the attention its :class:`~flatquant_lab.layers.KV4Cache` (``T_k`` and the clip ratios)."""
    attn, v, o = attention_paths(groups)
    heads, head_dim = head_sizes(layer, groups)
    exact = SimpleNamespace(t_v=state.t_v.to(xd), head_dim=head_dim)
    for path, side in ((v, "rows"), (o, "columns")):
        lin = layer.get_submodule(path)
        wmap = ValueMap(exact, side)
        wd = torch.promote_types(lin.weight.dtype, torch.float32)
        lin.weight.data = wmap.weight(lin.weight.to(xd)).to(wd)
        if lin.bias is not None:
            lin.bias.data = wmap.bias(lin.bias.to(xd)).to(wd)
    if not attach:
        return
    cache = KV4Cache(state.t_k, torch.sigmoid(state.k_clip), torch.sigmoid(state.v_clip), state.t_v,
                     num_kv_heads=heads, head_dim=head_dim)
    setattr(layer.get_submodule(attn), KV_CACHE_ATTR, cache.to(state.t_k.device))
