"""The checkpoint contract vllm-ascend serves (docs/checkpoint-format.md): names, shapes, dtypes, the description,
the checks.

A saved directory holds:

- ``config.json``: the model's Hugging Face config (no ``quantization_config``; ``dtype`` and
  ``torch_dtype`` name the float dtype; ``architectures`` set so vLLM can pick the model class);
- ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards plus
  ``model.safetensors.index.json``;
- ``quant_model_description.json``: msModelSlim's description file. Every stored tensor key maps
  to ``"W4A4_FLATQUANT_DYNAMIC"`` or ``"W8A8_DYNAMIC"`` (the tensors of a quantized linear of that
  scheme) or ``"FLOAT"``; top-level
  fields ``model_quant_type``, ``version`` and ``group_size`` as msModelSlim writes them, and
  ``metadata.flatquant_lab_act_dtype``, the dtype the W4A4 layers compute in (ignored by
  vllm-ascend, which computes in the model dtype; a load without it goes by the transforms). With tied
  embeddings ``lm_head.weight`` is listed as ``"FLOAT"`` although, as in Hugging Face checkpoints,
  no tensor is stored for it: vllm-ascend looks up ``lm_head.weight`` in the description when it
  builds the LM head and fails with a KeyError when the key is absent;
- the tokenizer files, when a tokenizer is given.

With a quantized KV cache (docs/kv-cache.md) the description's top level also says ``"kv_cache_type": "C8"``
(and ``"kv_quant_type": "C8"``, as msModelSlim writes it), and every decoder layer's attention stores
``<attn>.k_proj.kv_cache_scale``, ``.k_proj.kv_cache_offset``, ``.v_proj.kv_cache_scale`` and
``.v_proj.kv_cache_offset``, each listed as ``"C8"``: all of them or none.

Per quantized linear ``prefix``: the tensors of its scheme (``flatquant_lab/schemes/``, one module per
description value: names, shapes, dtypes and their checks), ``prefix.<name>``, plus an optional ``prefix.bias``.
This module holds what spans a checkpoint: the description, its labels, the fused modules, the tied weights.

Nothing is pickled: tensors go through safetensors, everything else is JSON.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch
from torch import nn

from .. import schemes
from ..dtypes import dtype_name
from ..models import FUSED_MODULES, is_row_parallel
from ..schemes import (
    KV_CACHE_SCHEMES, OPTIONAL, SCHEMES, KVCacheScheme, Scheme, known_text, kv_cache_scheme_for, quantized_schemes,
    scheme_for,
)

# The description values of the built-in schemes, defined by the schemes themselves.
QUANT_TYPE = schemes.W4A4_FLATQUANT_DYNAMIC.quant_type
W8A8_DYNAMIC_TYPE = schemes.W8A8_DYNAMIC.quant_type
FLOAT_TYPE = schemes.FLOAT.quant_type
W8A8_STATIC_TYPE = "W8A8"  # msModelSlim's static W8A8 (quant_bias, deq_scale, input_scale): no scheme here
DESCRIPTION_FILE = "quant_model_description.json"
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# msModelSlim's ascendV1 saver writes version "1.0.0" and group_size 0 for per-channel weights.
DESCRIPTION_VERSION = "1.0.0"
# vllm-ascend switches a quantized KV cache on with kv_cache_type; msModelSlim also writes kv_quant_type.
KV_CACHE_FIELD = "kv_cache_type"
KV_QUANT_FIELD = "kv_quant_type"
TOP_LEVEL_FIELDS = ("model_quant_type", "version", "group_size", "metadata", KV_CACHE_FIELD, KV_QUANT_FIELD)
# Our own entry in the description's metadata: the activation dtype of the W4A4 layers.
ACT_DTYPE_KEY = "flatquant_lab_act_dtype"
# ... and the tensor-parallel size the row-parallel FlatQuant transforms are sized for (1 when absent).
TP_SIZE_KEY = "tp_size"


def is_field(key: str, value) -> bool:
    """Whether a description entry is a top-level field (``model_quant_type``, ``kv_cache_type`` ...),
    not a tensor key: tensor keys are dotted paths with a string type."""
    return key in TOP_LEVEL_FIELDS or not isinstance(value, str) or "." not in key


class CheckpointError(ValueError):
    """A checkpoint (or a model about to be saved) that breaks the vllm-ascend contract."""


def tie_targets(model: nn.Module) -> dict[str, str]:
    """``{tied key: key it aliases}`` for weights Hugging Face does not store (tie_word_embeddings)."""
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers >= 5
    if isinstance(tied, Mapping):
        return dict(tied)
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(text_cfg, "tie_word_embeddings", False):
        return {"lm_head.weight": "model.embed_tokens.weight"}
    return {}


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def is_kv_cache_key(key) -> bool:
    """Whether a checkpoint key names a KV-cache tensor of a registered scheme (``...k_proj.kv_cache_scale``)."""
    return isinstance(key, str) and any(s.is_key(key) for s in KV_CACHE_SCHEMES.values())


def build_description(keys: Iterable[str], quantized: Mapping[str, str] | Iterable[str],
                      tied: Iterable[str] = (), kv_cache: str | None = None) -> dict:
    """msModelSlim's description: top-level fields, then every key -> its quant type.

    ``keys`` are the stored tensor keys, ``quantized`` maps the prefixes of quantized linears to their
    type (a plain iterable means all W4A4_FLATQUANT_DYNAMIC); all of a layer's tensors carry its type.
    ``tied``: tied weights listed as FLOAT but not stored. ``kv_cache``: the KV-cache type (``"C8"``) when the
    keys include its tensors: its top-level fields, and its value for each of them.
    """
    if not isinstance(quantized, Mapping):
        quantized = dict.fromkeys(quantized, QUANT_TYPE)
    present = sorted({scheme_for(t) for t in quantized.values()}, key=lambda s: (s.precedence, s.quant_type))
    # model_quant_type is informational (docs/checkpoint-format.md, 'quant_model_description.json'): the main
    # scheme of the model
    main = present[-1].quant_type if present else FLOAT_TYPE
    desc: dict = {"model_quant_type": main, "version": DESCRIPTION_VERSION, "group_size": 0}
    kv = kv_cache_scheme_for(kv_cache) if kv_cache is not None else None
    if kv is not None:
        desc.update(kv.description_fields())
    for key in keys:
        is_kv = kv is not None and kv.is_key(key)
        desc[key] = kv.cache_type if is_kv else quantized.get(key.rpartition(".")[0], FLOAT_TYPE)
    for key in tied:
        desc.setdefault(key, FLOAT_TYPE)
    return desc


def expect(key: str, t: torch.Tensor, shape=None, dtypes=None) -> None:
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{key}: expected shape {list(shape)}, got {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = " or ".join(dtype_name(d) for d in dtypes)
        raise CheckpointError(f"{key}: expected dtype {names}, got {dtype_name(t.dtype)}")


def _check_labels(prefix: str, scheme: Scheme, tensors: Mapping[str, torch.Tensor], desc: Mapping) -> None:
    kind = scheme.quant_type
    for name in scheme.names:
        key = f"{prefix}.{name}"
        if key not in tensors:
            raise CheckpointError(f"{key}: missing ({prefix}.weight is {kind}, which needs {list(scheme.names)})")
        if desc.get(key) != kind:
            raise CheckpointError(f"{key}: description says {desc.get(key)!r}, expected {kind!r} "
                                  f"(as for {prefix}.weight)")
    # msModelSlim labels a quantized layer's bias FLOAT; vllm-ascend never reads the label. Accept both.
    if f"{prefix}.bias" in tensors and desc.get(f"{prefix}.bias") not in (kind, FLOAT_TYPE):
        raise CheckpointError(f"{prefix}.bias: description says {desc.get(f'{prefix}.bias')!r}, expected {kind!r}")


def saved_tp_size(desc: Mapping) -> int:
    """The tensor-parallel size the description's metadata records (1 when it records none)."""
    meta = desc.get("metadata")
    tp = meta.get(TP_SIZE_KEY, 1) if isinstance(meta, Mapping) else 1
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise CheckpointError(f"{DESCRIPTION_FILE}: metadata.{TP_SIZE_KEY} is {tp!r}, expected a positive int")
    return tp


def layer_tp(prefix: str, tp_size: int) -> int:
    """Blocks of a FlatQuant layer's transform: ``tp_size`` for a row-parallel linear, else 1."""
    return tp_size if is_row_parallel(prefix) else 1


def layer_tensors(prefix: str, scheme: Scheme, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stored tensors of linear ``prefix`` by short name: the scheme's, and the bias when stored."""
    return {n: tensors[f"{prefix}.{n}"] for n in scheme.names + OPTIONAL if f"{prefix}.{n}" in tensors}


def check_layer(prefix: str, scheme: Scheme, tensors: Mapping[str, torch.Tensor], desc: Mapping,
                tp_size: int = 1) -> None:
    """One quantized linear: its keys and labels here, its shapes and dtypes by its scheme (``Scheme.check``); a
    row-parallel linear of a checkpoint made for ``tp_size`` ranks is checked as sized for them."""
    _check_labels(prefix, scheme, tensors, desc)
    try:
        scheme.check(layer_tensors(prefix, scheme, tensors), layer_tp(prefix, tp_size))
    except ValueError as e:  # its messages start with the tensor's short name
        raise CheckpointError(f"{prefix}.{e}") from None


def _check_fused(tensors: Mapping[str, torch.Tensor], desc: Mapping) -> None:
    """One quant type per fused vLLM module and, for FlatQuant, one shared transform and clip ratio."""
    for fused, members in FUSED_MODULES.items():
        suffixes = [f".{m}.weight" for m in members]
        layers = sorted({k[: -len(s)] for k in desc if isinstance(k, str) for s in suffixes if k.endswith(s)})
        for layer in layers:
            present = [m for m in members if f"{layer}.{m}.weight" in desc]
            if len(present) != len(members):
                missing = [f"{layer}.{m}.weight" for m in members if m not in present]
                raise CheckpointError(f"{missing[0]}: missing (vLLM fuses {', '.join(members)} of {layer} "
                                      f"into {fused})")
            types = {m: desc[f"{layer}.{m}.weight"] for m in members}
            if len(set(types.values())) > 1:
                listing = ", ".join(f"{m} is {t}" for m, t in types.items())
                raise CheckpointError(
                    f"{layer}: {listing}; vLLM loads them as one fused module ({fused}), so all must have "
                    "one quant type (quantize all of them or none)"
                )
            shared = scheme_for(types[members[0]]).shared
            first = members[0]
            for m in members[1:]:
                for name in shared:
                    a = tensors.get(f"{layer}.{first}.{name}")
                    b = tensors.get(f"{layer}.{m}.{name}")
                    if a is None or b is None:
                        continue  # reported as a missing key by the per-layer check
                    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                        raise CheckpointError(
                            f"{layer}: {m}.{name} differs from {first}.{name}; vllm-ascend loads {', '.join(members)} "
                            f"as one fused module ({fused}) with a single {name}, so they must share one "
                            "transform and clip ratio"
                        )


def check_checkpoint(tensors: Mapping[str, torch.Tensor], desc: Mapping, tied: Iterable[str] = (),
                     tp_size: int | None = None) -> dict[str, str]:
    """Check tensors against a description (both directions) and docs/checkpoint-format.md; return the
    quantized prefixes and their types.

    ``tied``: keys a description may list as FLOAT without a stored tensor (tied embeddings).
    ``tp_size``: what the row-parallel FlatQuant transforms are sized for (default: the metadata's).
    Raises ``CheckpointError`` naming the first offending tensor (for static ``W8A8``: the layer).
    """
    tied = set(tied)
    if not isinstance(desc, Mapping):
        raise CheckpointError(f"{DESCRIPTION_FILE}: expected a JSON object, got {type(desc).__name__}")
    mqt = desc.get("model_quant_type")
    if mqt is not None and not isinstance(mqt, str):  # informational only (docs/checkpoint-format.md)
        raise CheckpointError(f"{DESCRIPTION_FILE}: model_quant_type is {mqt!r}, expected a string such as "
                              f"{QUANT_TYPE!r}")
    entries = {k: v for k, v in desc.items() if not is_field(k, v) and not is_kv_cache_key(k)}
    present = [SCHEMES[t] for t in dict.fromkeys(entries.values()) if t in SCHEMES]
    # Top-level fields a present scheme reads are its to check; group_size is otherwise msModelSlim's 0
    for scheme in present:
        problem = scheme.fields_problem(desc)
        if problem:
            raise CheckpointError(f"{DESCRIPTION_FILE}: {problem}")
    if not any("group_size" in s.fields for s in present) and desc.get("group_size", 0) not in (0, None):
        raise CheckpointError(f"{DESCRIPTION_FILE}: group_size is {desc['group_size']!r}, expected 0 "
                              "(per-channel weight scales)")
    for key, kind in entries.items():
        if kind == W8A8_STATIC_TYPE and kind not in SCHEMES:
            layer = key.rpartition(".")[0]
            raise CheckpointError(
                f"{layer}: description says {kind!r} for {key} (static W8A8: quant_bias, deq_scale, input_scale); "
                f"flatquant_lab loads only {known_text()} layers"
            )
        if kind not in SCHEMES:
            raise CheckpointError(f"{key}: description says {kind!r}; flatquant_lab handles only {known_text()}")
        if key not in tensors and not (key in tied and kind == FLOAT_TYPE):
            raise CheckpointError(f"{key}: listed in {DESCRIPTION_FILE} as {kind} but no such tensor is stored")
    for key in tensors:
        if key not in entries and not is_kv_cache_key(key):
            raise CheckpointError(f"{key}: stored but not listed in {DESCRIPTION_FILE}")
    layer_schemes = quantized_schemes()
    quantized = {k[: -len(".weight")]: v for k, v in entries.items() if k.endswith(".weight") and v in layer_schemes}
    tp = saved_tp_size(desc) if tp_size is None else tp_size
    for prefix in sorted(quantized):
        check_layer(prefix, layer_schemes[quantized[prefix]], tensors, desc, tp)
    kv_cache_tensors(tensors, desc)
    for key, t in tensors.items():
        if is_kv_cache_key(key):
            continue
        prefix, _, leaf = key.rpartition(".")
        kind = entries[key]
        if kind in layer_schemes and quantized.get(prefix) != kind:
            have = quantized.get(prefix, FLOAT_TYPE)
            raise CheckpointError(f"{key}: description says {kind} but {prefix}.weight is {have}")
        if kind == FLOAT_TYPE and prefix not in quantized and not t.is_floating_point():
            raise CheckpointError(f"{key}: description says {FLOAT_TYPE} but the tensor is {dtype_name(t.dtype)} "
                                  f"(a quantized weight needs a quantized type and its scales)")
        if prefix in quantized and leaf not in layer_schemes[quantized[prefix]].names + OPTIONAL:
            raise CheckpointError(f"{key}: unexpected tensor of {quantized[prefix]} linear {prefix} "
                                  f"(expected {list(layer_schemes[quantized[prefix]].names)} and optional 'bias')")
    _check_fused(tensors, entries)
    return quantized


def _natural(text: str) -> tuple:
    """Sort key putting ``model.layers.2`` before ``model.layers.10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


def kv_cache_tensors(tensors: Mapping[str, torch.Tensor],
                     desc: Mapping) -> tuple[KVCacheScheme | None, dict[str, dict[str, torch.Tensor]]]:
    """The checkpoint's KV-cache scheme and, per attention prefix (``model.layers.N.self_attn``), its tensors by
    short name (docs/kv-cache.md); ``(None, {})`` without one.

    Refused (``CheckpointError`` naming the layer or the tensor): KV-cache tensors without ``kv_cache_type``, a
    ``kv_cache_type`` no scheme handles, one that ``kv_quant_type`` contradicts, a decoder layer (one with a
    ``k_proj``) missing any of the tensors, a tensor of a layer without ``k_proj``, a wrong label, shape, dtype or
    value, and a nonzero offset (vllm-ascend reads the cache back without it).
    """
    field, other = desc.get(KV_CACHE_FIELD), desc.get(KV_QUANT_FIELD)
    found = sorted({k for k in (*tensors, *desc) if is_kv_cache_key(k)}, key=_natural)
    if field is None:
        if found:
            some = next(s for s in KV_CACHE_SCHEMES.values() if s.is_key(found[0]))
            layer, _ = some.split_key(found[0])
            first = next(f"{layer}.{n}" for n in some.names if f"{layer}.{n}" in found)
            raise CheckpointError(
                f"{layer}: has KV-cache scales ({first}) but {DESCRIPTION_FILE} has no {KV_CACHE_FIELD}; "
                f"vllm-ascend quantizes the cache only with \"{KV_CACHE_FIELD}\": \"{some.cache_type}\" at its top "
                "level (add it, or drop the scales)")
        if other is not None:
            raise CheckpointError(f"{DESCRIPTION_FILE}: {KV_QUANT_FIELD} is {other!r} but {KV_CACHE_FIELD} is absent; "
                                  f"vllm-ascend reads only {KV_CACHE_FIELD}")
        return None, {}
    try:
        scheme = kv_cache_scheme_for(field)
    except ValueError as e:
        raise CheckpointError(f"{DESCRIPTION_FILE}: {e}") from None
    if other is not None and other != field:
        raise CheckpointError(f"{DESCRIPTION_FILE}: {KV_QUANT_FIELD} is {other!r} but {KV_CACHE_FIELD} is {field!r}; "
                              "they must agree")
    suffix = f".{scheme.projections[0]}.weight"
    layers = sorted({k[: -len(suffix)] for k in desc if isinstance(k, str) and k.endswith(suffix)}, key=_natural)
    for key in found:
        if not scheme.is_key(key):
            raise CheckpointError(f"{key}: a KV-cache tensor that {KV_CACHE_FIELD} {field!r} does not have")
        prefix = scheme.split_key(key)[0]
        if prefix not in layers:
            raise CheckpointError(f"{key}: KV-cache scale of {prefix}, which has no {scheme.projections[0]}; "
                                  "expected them in the decoder layers' attention")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for prefix in layers:
        parts = {}
        for name in scheme.names:
            key = f"{prefix}.{name}"
            if key not in tensors:
                raise CheckpointError(f"{key}: missing ({KV_CACHE_FIELD} is {field!r}, which needs "
                                      f"{', '.join(scheme.names)} in the attention of every decoder layer)")
            if desc.get(key) != scheme.cache_type:
                raise CheckpointError(f"{key}: description says {desc.get(key)!r}, expected {scheme.cache_type!r} "
                                      f"(as {KV_CACHE_FIELD})")
            parts[name] = tensors[key]
        weight = tensors.get(prefix + suffix)
        try:
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                scheme.check(parts, weight.shape[0])
        except ValueError as e:  # its messages start with the tensor's short name
            raise CheckpointError(f"{prefix}.{e}") from None
        for name, t in parts.items():
            if name.endswith("offset") and bool(t.any()):
                raise CheckpointError(
                    f"{prefix}.{name}: nonzero offset (max |offset| {float(t.abs().max()):g}); vllm-ascend writes its "
                    f"{scheme.cache_type} cache with the offset but reads it back as int8 * scale without it, so only "
                    "a symmetric cache (offset 0) serves consistently")
        groups[prefix] = parts
    return scheme, groups
