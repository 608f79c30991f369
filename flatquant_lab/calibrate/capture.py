"""Layer inputs and full-precision outputs: what each decoder layer is trained and checked on, and where
they are held (device placement and offload).

The inputs and targets of the current layer live in two buffers ``[n, seqlen, hidden]`` in the
model's dtype (bf16/fp16 for a half model; float32 for a float32 model, as before), on the device or
on the host. A layer's full-precision outputs are written into the target buffer, which then
becomes the next layer's input buffer; the old input buffer takes the next targets (two copies, never
three). Batches travel to the device as float32, where the layer is calibrated in float32.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..devices import AUTO_ACTIVATION_SHARE, free_memory, module_device, pinned_empty, to_device
from ..models import decoder_layers

log = logging.getLogger(__name__)

STAT_TOKENS = 2048  # tokens kept per group for the initial clip search


class _Stop(Exception):
    pass


class HeldActivations:
    """``[n, seqlen, hidden]`` hidden states held in ``dtype`` on ``device`` or on the host.

    ``held[s:e]`` is that batch on ``device`` in float32 (no copy when it is already there in float32,
    exactly as a plain tensor slice); ``held.write(s, y)`` stores a batch (rounded to ``dtype``).
    """

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, on_host: bool):
        self.device, self.on_host = device, on_host
        self.buf = pinned_empty(shape, dtype, device) if on_host else torch.empty(shape, dtype=dtype, device=device)

    @property
    def shape(self) -> torch.Size:
        return self.buf.shape

    @property
    def nbytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()

    def __getitem__(self, index) -> torch.Tensor:
        if self.on_host:  # a fresh device copy per batch; non_blocking: overlaps with compute when pinned
            return self.buf[index].to(self.device, torch.float32, non_blocking=True, copy=True)
        return self.buf[index].to(torch.float32)

    def write(self, start: int, y: torch.Tensor) -> None:
        self.buf[start:start + y.shape[0]].copy_(y)


def choose_activations(setting: str, nbytes: int, device: torch.device) -> bool:
    """Whether the two activation buffers (``nbytes`` together) go to the host: ``setting`` is
    ``device``, ``host`` or ``auto`` (the device when they take at most AUTO_ACTIVATION_SHARE of its
    free memory; on the CPU host and device are one)."""
    if setting == "host":  # on the CPU too: the same copies as on an accelerator (tests compare the two)
        return True
    if setting == "device" or device.type == "cpu":
        return False
    free = free_memory(device)
    on_host = free is None or nbytes > AUTO_ACTIVATION_SHARE * free
    log.info("activations: %.2f GiB held on the %s (%s free on %s)", nbytes / 2**30, "host" if on_host else "device",
             "unknown" if free is None else f"{free / 2**30:.1f} GiB", device)
    return on_host


def _outer_modules(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """The modules beside the decoder layers in the model's body (embeddings, rotary, final norm)."""
    body = getattr(model, "model", None)
    if not isinstance(body, nn.Module):
        return [model]
    return [m for m in body.children() if m is not layers]


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int, device: torch.device | None = None,
                         dtype: torch.dtype | None = None, on_host: bool = False):
    """Hidden states entering decoder layer 0 as :class:`HeldActivations`, and its kwargs per batch size
    (on ``device``). The modules before layer 0 run on ``device`` for this and go back afterwards."""
    layers = decoder_layers(model)
    device = device if device is not None else module_device(model)
    dtype = dtype if dtype is not None else torch.float32
    held, kwargs_by_bs = None, {}
    outer = _outer_modules(model, layers)
    homes = [module_device(m) for m in outer]

    def hook(_mod, args, kwargs):
        nonlocal held
        hs = args[0] if args else kwargs["hidden_states"]
        if held is None:
            held = HeldActivations((ids.shape[0], *hs.shape[1:]), dtype, device, on_host)
        held.write(start, hs.detach())
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kwargs_by_bs.setdefault(hs.shape[0], to_device(kw, device))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for m in outer:
            m.to(device)
        for start in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        for m, home in zip(outer, homes):
            m.to(home)
    return held, kwargs_by_bs


def batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each batch of ``batch_size`` samples out of ``n``."""
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def run_layer(layer, x, kwargs):
    """A decoder layer's hidden-state output (transformers returns a tuple or a tensor, by version)."""
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def float_forward(layer, groups, X, kwargs_by_bs, batch_size, Y=None):
    """Full-precision outputs (written into ``Y``, a :class:`HeldActivations` like ``X``; a new
    float32 tensor when ``Y`` is None), and per group the input channels' abs-max plus a token sample."""
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
        outs = []
        for s, e in batches(X.shape[0], batch_size):
            out = run_layer(layer, X[s:e], kwargs_by_bs[e - s])
            if Y is None:
                outs.append(out)
            else:
                Y.write(s, out)
    finally:
        for h in handles:
            h.remove()
    for st in stats.values():
        st["sample"] = torch.cat(st["sample"])[:STAT_TOKENS]
    return (torch.cat(outs).float() if Y is None else Y), stats


@torch.no_grad()
def propagate(layer, X: HeldActivations, kwargs_by_bs, batch_size, dtype) -> None:
    """``X <- layer(X)`` batch by batch, in place (a batch's output depends on that batch only), the
    layer run in ``dtype`` (the model's, as it serves)."""
    for s, e in batches(X.shape[0], batch_size):
        X.write(s, run_layer(layer, X[s:e].to(dtype), kwargs_by_bs[e - s]))
