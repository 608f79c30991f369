"""``quantize(model, config, calib_data)``: the one verb, and the ``flatquant-lab quantize`` command."""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from .calibrate import calibrate
from .recipe import TRAINED_KV_CACHES, QuantConfig

log = logging.getLogger(__name__)



def _as_ids(calib_data) -> torch.Tensor | None:
    """Token ids ``[n, seqlen]`` from a tensor or an iterable of such batches."""
    if calib_data is None:
        return None
    if isinstance(calib_data, torch.Tensor):
        batches = [calib_data]
    elif isinstance(calib_data, Iterable):
        batches = list(calib_data)
    else:
        raise ValueError(f"calib_data: expected a LongTensor [n, seqlen] or an iterable of them, got {type(calib_data).__name__}")
    if not batches:
        raise ValueError("calib_data: expected at least one batch of token ids, got none")
    for b in batches:
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"calib_data: expected integer tensors [n, seqlen], got {getattr(b, 'dtype', type(b))} "
                             f"{tuple(getattr(b, 'shape', ()))}")
        if b.shape[1] != batches[0].shape[1]:
            raise ValueError(f"calib_data: all batches need one seqlen, got {batches[0].shape[1]} and {b.shape[1]}")
    return torch.cat(batches).long()


def quantize(model: nn.Module, config: QuantConfig | None = None, calib_data=None, backend: str | None = None,
             after_layer=None, device=None) -> nn.Module:
    """Quantize ``model`` in place to W4A4 FlatQuant (or the schemes ``config.schemes.recipe`` gives) and return it.

    ``device`` (``cpu``, ``cuda``, ``cuda:1``, ``npu``, ``npu:0``; overrides ``config.placement.device``; default:
    the model's device) is where each decoder layer is calibrated; the model itself stays where it is.

    Every decoder linear takes its recipe scheme: ``W4A4FlatQuantLinear``, ``W8A8DynamicLinear`` or
    float (with the default recipe, every one the NPU op can run is FlatQuant); the calibration report
    (losses, clip ratios, what stayed float and why, what data) is left on ``model.flatquant_report``.
    ``calib_data`` must hold at least the config's ``samples`` x ``seqlen`` token ids; the first
    ``samples`` sequences, cut to ``seqlen``, are what calibration runs on (the config records it).
    ``QuantConfig()`` (the default) is FlatQuant with GPTQ weights at the ``fast`` profile: it needs
    ``calib_data``. The W4A4 layers compute in the model's dtype when it is float16 or bfloat16, in
    bfloat16 for a float32 model (``QuantConfig.schemes.act_dtype``). With ``kv_cache="C8"`` in the config, the
    KV cache's static scales are calibrated afterwards on the same windows (:func:`quantize_kv_cache`; its report
    is ``model.flatquant_report["kv_cache"]``), whatever the linears needed. ``kv_cache="KV4"`` (a research mode no
    serving engine runs) learns ``T_k``, ``T_v`` and the KV clips with the linears, layer by layer; ``kv_cache="C8"``
    with ``kv_transforms="v"`` learns ``T_v`` with them (folded into ``v_proj``/``o_proj``: the export serves).
    """
    # act_dtype None: a float16/bfloat16 model's own dtype, bfloat16 for a float32 model
    config = (config or QuantConfig()).for_model(model)
    if device is not None:
        config = config.replace(device=device)  # validated by QuantConfig
    ids = _as_ids(calib_data)
    model.eval()
    # C8 is calibrated after the linears; KV4 (TRAINED_KV_CACHES) is learned with them, inside calibrate
    kv_cache = config.schemes.kv_cache if config.schemes.kv_cache not in TRAINED_KV_CACHES else None
    if kv_cache is not None and ids is None:  # before an hour of calibration, not after it
        raise ValueError(f"calib_data: the {kv_cache} KV cache (QuantConfig kv_cache={kv_cache!r}) is calibrated on "
                         "token ids; expected a LongTensor [n, seqlen], got None")
    # the linears of rtn/rtn read no data: then the ids are the KV cache's alone (no "ignored" warning)
    linear_ids = None if kv_cache is not None and not (config.method == "flatquant"
                                                       or config.weight_quantizer == "gptq") else ids
    report = calibrate(model, config, linear_ids, backend=backend, after_layer=after_layer)
    model.flatquant_report = report.to_dict()
    if kv_cache is not None:
        model.flatquant_report["kv_cache"] = quantize_kv_cache(model, ids, config)
        if config.schemes.kv_learned == "v":
            model.flatquant_report["kv_cache"]["kv_transforms"] = "v"
            log.info("T_v is folded into v_proj and o_proj: the %s checkpoint serves as any other", kv_cache)
    model.flatquant_config = config
    return model


def quantize_kv_cache(model: nn.Module, calib_data, config: QuantConfig | None = None) -> dict:
    """Calibrate ``model``'s KV-cache scales (``config.schemes.kv_cache``, default ``"C8"``) on the calibration
    windows (at most ``config``'s ``samples`` x ``seqlen`` of them) and attach them; returns the calibration's report.

    ``quantize`` calls it after the linears are quantized when the config asks for a KV cache; on its own it works
    on any model (float, W4A4, a loaded checkpoint). The clip: ``config.schemes.kv_cache_clip``
    (docs/kv-cache.md, 'Calibration').
    """
    from .calibrate.kv_cache import calibrate_kv_cache

    config = config or QuantConfig(kv_cache="C8")
    if config.schemes.kv_cache in TRAINED_KV_CACHES:
        raise ValueError(f"config: kv_cache={config.schemes.kv_cache!r} is learned with the linears, not calibrated "
                         "after them; quantize(model, QuantConfig(kv_cache='KV4')) trains it")
    ids = _as_ids(calib_data)
    if ids is None:
        raise ValueError("calib_data: expected a LongTensor [n, seqlen] or an iterable of them, got None")
    schemes = config.schemes
    ids = ids[: config.data.samples, : config.data.seqlen].contiguous()  # the windows the linears were calibrated on
    return calibrate_kv_cache(model, ids, cache_type=schemes.kv_cache or "C8",
                              clip=schemes.kv_cache_clip, batch_size=config.train.batch_size)


@torch.no_grad()
def quantize_weights_only(model: nn.Module) -> nn.Module:
    """W4A16 reference: round every decoder linear's weight to per-channel symmetric int4 and back.

    ``W <- rint(W / s) * s`` with ``s = max|W_row| / 7``; activations stay in float. This is the row
    that W4A4 methods are judged against; it is a fake-quant model, not an export format.
    """
    from .models import adapter_for
    from .quantizers import quantize_weight

    adapter = adapter_for(model)
    adapter.info(model)
    for layer in adapter.decoder_layers(model):
        for path in adapter.linear_names:
            lin = layer.get_submodule(path)
            q, scale = quantize_weight(lin.weight)
            lin.weight.copy_((q.double() * scale.double()).to(lin.weight.dtype))
    return model
