"""Layer inputs and full-precision outputs: what each decoder layer is trained and checked on."""
from __future__ import annotations

import torch
from torch import nn

from ..models import decoder_layers

STAT_TOKENS = 2048  # tokens kept per group for the initial clip search


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int):
    """Hidden states entering decoder layer 0 (float32 ``[n, seqlen, hidden]``) and its kwargs per batch size."""
    layers = decoder_layers(model)
    states, kwargs_by_bs = [], {}

    def hook(_mod, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        states.append(hs.detach().float())
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kwargs_by_bs.setdefault(hs.shape[0], kw)
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[start:start + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(states), kwargs_by_bs


def batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each batch of ``batch_size`` samples out of ``n``."""
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def run_layer(layer, x, kwargs):
    """A decoder layer's hidden-state output (transformers returns a tuple or a tensor, by version)."""
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def float_forward(layer, groups, X, kwargs_by_bs, batch_size):
    """Full-precision outputs, and per group the input channels' abs-max plus a token sample."""
    stats, handles = {}, []
    n_batches = len(batches(X.shape[0], batch_size))
    for g in groups:
        if not g.quantized:
            continue
        st = stats[g.name] = {"absmax": None, "sample": []}

        def hook(_m, args, st=st):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            am = x.abs().amax(0)
            st["absmax"] = am if st["absmax"] is None else torch.maximum(st["absmax"], am)
            stride = max(1, x.shape[0] * n_batches // STAT_TOKENS)
            st["sample"].append(x[::stride])

        handles.append(layer.get_submodule(g.linears[0]).register_forward_pre_hook(hook))
    try:
        Y = torch.cat([run_layer(layer, X[s:e], kwargs_by_bs[e - s]) for s, e in batches(X.shape[0], batch_size)])
    finally:
        for h in handles:
            h.remove()
    for st in stats.values():
        st["sample"] = torch.cat(st["sample"])[:STAT_TOKENS]
    return Y.float(), stats
