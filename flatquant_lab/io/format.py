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

Per quantized linear ``prefix`` (``W4A4FlatQuantLinear``): ``weight`` int8 ``[O, K]`` (int4 values,
unpacked), ``weight_scale`` / ``weight_offset`` float32 ``[O, 1]``, ``left_trans`` ``[n1, n1]`` and
``right_trans`` ``[n2, n2]`` with ``(n1, n2) = decompose_dim(K)`` (the sizes vllm-ascend allocates),
``clip_ratio`` float32 ``[1]`` and an optional ``bias`` ``[O]``. Transforms and bias are stored in
the layer's activation dtype (the dtype its kernels run in), or in ``dtype`` when one is given.
Per W8A8_DYNAMIC linear (``W8A8DynamicLinear``, docs/checkpoint-format.md, 'W8A8_DYNAMIC tensors'):
``weight`` int8 ``[O, K]``, ``weight_scale`` / ``weight_offset`` float32 ``[O, 1]`` (msModelSlim's dtype;
any float dtype is read, since vllm-ascend rounds them to the model dtype on load), optional ``bias`` ``[O]``.

Nothing is pickled: tensors go through safetensors, everything else is JSON.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from ..dtypes import FLOAT_DTYPES, dtype_name
from ..kronecker import decompose_dim
from ..layers import CHECKPOINT_KEYS, W8A8_CHECKPOINT_KEYS
from ..models import FUSED_MODULES, is_row_parallel

QUANT_TYPE = "W4A4_FLATQUANT_DYNAMIC"
W8A8_DYNAMIC_TYPE = "W8A8_DYNAMIC"
W8A8_STATIC_TYPE = "W8A8"  # msModelSlim's static W8A8 (quant_bias, deq_scale, input_scale): not loaded here
FLOAT_TYPE = "FLOAT"
# The tensors each quantized layer type stores (plus an optional bias), from its layer class.
LAYER_KEYS = {QUANT_TYPE: CHECKPOINT_KEYS, W8A8_DYNAMIC_TYPE: W8A8_CHECKPOINT_KEYS}
KNOWN_TYPES = (QUANT_TYPE, W8A8_DYNAMIC_TYPE, FLOAT_TYPE)
DESCRIPTION_FILE = "quant_model_description.json"
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# msModelSlim's ascendV1 saver writes version "1.0.0" and group_size 0 for per-channel weights.
DESCRIPTION_VERSION = "1.0.0"
TOP_LEVEL_FIELDS = ("model_quant_type", "version", "group_size", "metadata")
# Our own entry in the description's metadata: the activation dtype of the W4A4 layers.
ACT_DTYPE_KEY = "flatquant_lab_act_dtype"
# ... and the tensor-parallel size the row-parallel FlatQuant transforms are sized for (1 when absent).
TP_SIZE_KEY = "tp_size"
_SHARED_KEYS = ("left_trans", "right_trans", "clip_ratio")


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


def build_description(keys: Iterable[str], quantized: Mapping[str, str] | Iterable[str],
                      tied: Iterable[str] = ()) -> dict:
    """msModelSlim's description: top-level fields, then every key -> its quant type.

    ``keys`` are the stored tensor keys, ``quantized`` maps the prefixes of quantized linears to their
    type (a plain iterable means all W4A4_FLATQUANT_DYNAMIC); all of a layer's tensors carry its type.
    ``tied``: tied weights listed as FLOAT but not stored.
    """
    if not isinstance(quantized, Mapping):
        quantized = dict.fromkeys(quantized, QUANT_TYPE)
    types = set(quantized.values())
    # model_quant_type is informational (docs/checkpoint-format.md, 'quant_model_description.json'): the main
    # scheme of the model
    main = QUANT_TYPE if QUANT_TYPE in types else W8A8_DYNAMIC_TYPE if types else FLOAT_TYPE
    desc: dict = {"model_quant_type": main, "version": DESCRIPTION_VERSION, "group_size": 0}
    for key in keys:
        desc[key] = quantized.get(key.rpartition(".")[0], FLOAT_TYPE)
    for key in tied:
        desc.setdefault(key, FLOAT_TYPE)
    return desc


def expect(key: str, t: torch.Tensor, shape=None, dtypes=None) -> None:
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{key}: expected shape {list(shape)}, got {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = " or ".join(dtype_name(d) for d in dtypes)
        raise CheckpointError(f"{key}: expected dtype {names}, got {dtype_name(t.dtype)}")


def _check_labels(prefix: str, kind: str, tensors: Mapping[str, torch.Tensor], desc: Mapping) -> None:
    for name in LAYER_KEYS[kind]:
        key = f"{prefix}.{name}"
        if key not in tensors:
            raise CheckpointError(f"{key}: missing ({prefix}.weight is {kind}, which needs {list(LAYER_KEYS[kind])})")
        if desc.get(key) != kind:
            raise CheckpointError(f"{key}: description says {desc.get(key)!r}, expected {kind!r} "
                                  f"(as for {prefix}.weight)")
    # msModelSlim labels a quantized layer's bias FLOAT; vllm-ascend never reads the label. Accept both.
    if f"{prefix}.bias" in tensors and desc.get(f"{prefix}.bias") not in (kind, FLOAT_TYPE):
        raise CheckpointError(f"{prefix}.bias: description says {desc.get(f'{prefix}.bias')!r}, expected {kind!r}")


def _weight_shape(prefix: str, tensors: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    w = tensors[f"{prefix}.weight"]
    if w.dim() != 2:
        raise CheckpointError(f"{prefix}.weight: expected an int8 matrix [O, K], got shape {list(w.shape)}")
    expect(f"{prefix}.weight", w, dtypes=(torch.int8,))
    return tuple(w.shape)


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


def _check_quantized(prefix: str, tensors: Mapping[str, torch.Tensor], desc: Mapping, tp_size: int = 1) -> None:
    """docs/checkpoint-format.md, 'W4A4_FLATQUANT_DYNAMIC tensors', for one W4A4 FlatQuant linear: keys, labels,
    shapes and dtypes; a row-parallel linear of a checkpoint made for ``tp_size`` ranks has transforms of
    ``decompose_dim(K / tp_size)``."""
    _check_labels(prefix, QUANT_TYPE, tensors, desc)
    out_f, in_f = _weight_shape(prefix, tensors)
    tp = layer_tp(prefix, tp_size)
    if in_f % (8 * tp):
        raise CheckpointError(f"{prefix}.weight: in-features K = {in_f} must be divisible by 8"
                              + (f" * tp_size = {8 * tp} (int4 packing of each rank's slice)" if tp > 1 else
                                 " (int4 packing)"))
    n1, n2 = decompose_dim(in_f // tp)
    expect(f"{prefix}.weight_scale", tensors[f"{prefix}.weight_scale"], (out_f, 1), (torch.float32,))
    expect(f"{prefix}.weight_offset", tensors[f"{prefix}.weight_offset"], (out_f, 1), (torch.float32,))
    # vllm-ascend allocates left/right_trans from get_decompose_dim(K): any other factor pair fails to load.
    expect(f"{prefix}.left_trans", tensors[f"{prefix}.left_trans"], (n1, n1), FLOAT_DTYPES)
    trans_dtype = tensors[f"{prefix}.left_trans"].dtype
    expect(f"{prefix}.right_trans", tensors[f"{prefix}.right_trans"], (n2, n2), (trans_dtype,))
    expect(f"{prefix}.clip_ratio", tensors[f"{prefix}.clip_ratio"], (1,), (torch.float32,))
    bias = tensors.get(f"{prefix}.bias")
    if bias is not None:
        expect(f"{prefix}.bias", bias, (out_f,), (trans_dtype,))


def _check_w8a8_dynamic(prefix: str, tensors: Mapping[str, torch.Tensor], desc: Mapping, tp_size: int = 1) -> None:
    """docs/checkpoint-format.md, 'W8A8_DYNAMIC tensors', for one W8A8_DYNAMIC linear: int8 weight, per-channel
    scale and offset, optional bias.

    Scales and bias may be any float dtype: msModelSlim writes float32, vllm-ascend rounds them to
    the model dtype on load.
    """
    _check_labels(prefix, W8A8_DYNAMIC_TYPE, tensors, desc)
    out_f, _ = _weight_shape(prefix, tensors)
    for name in ("weight_scale", "weight_offset"):
        expect(f"{prefix}.{name}", tensors[f"{prefix}.{name}"], (out_f, 1), FLOAT_DTYPES)
    if f"{prefix}.bias" in tensors:
        expect(f"{prefix}.bias", tensors[f"{prefix}.bias"], (out_f,), FLOAT_DTYPES)


_LAYER_CHECKS = {QUANT_TYPE: _check_quantized, W8A8_DYNAMIC_TYPE: _check_w8a8_dynamic}


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
            if types[members[0]] != QUANT_TYPE:
                continue
            first = members[0]
            for m in members[1:]:
                for name in _SHARED_KEYS:
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
    if desc.get("group_size", 0) not in (0, None):
        raise CheckpointError(f"{DESCRIPTION_FILE}: group_size is {desc['group_size']!r}, expected 0 "
                              "(per-channel weight scales)")
    entries = {k: v for k, v in desc.items() if not is_field(k, v)}
    for key, kind in entries.items():
        if kind == W8A8_STATIC_TYPE:
            layer = key.rpartition(".")[0]
            raise CheckpointError(
                f"{layer}: description says {kind!r} for {key} (static W8A8: quant_bias, deq_scale, input_scale); "
                f"flatquant_lab loads only {', '.join(map(repr, KNOWN_TYPES))} layers"
            )
        if kind not in KNOWN_TYPES:
            raise CheckpointError(f"{key}: description says {kind!r}; flatquant_lab handles only "
                                  f"{', '.join(map(repr, KNOWN_TYPES))}")
        if key not in tensors and not (key in tied and kind == FLOAT_TYPE):
            raise CheckpointError(f"{key}: listed in {DESCRIPTION_FILE} as {kind} but no such tensor is stored")
    for key in tensors:
        if key not in entries:
            raise CheckpointError(f"{key}: stored but not listed in {DESCRIPTION_FILE}")
    quantized = {k[: -len(".weight")]: v for k, v in entries.items() if k.endswith(".weight") and v in LAYER_KEYS}
    tp = saved_tp_size(desc) if tp_size is None else tp_size
    for prefix in sorted(quantized):
        _LAYER_CHECKS[quantized[prefix]](prefix, tensors, desc, tp)
    for key, t in tensors.items():
        prefix, _, leaf = key.rpartition(".")
        kind = entries[key]
        if kind in LAYER_KEYS and quantized.get(prefix) != kind:
            have = quantized.get(prefix, FLOAT_TYPE)
            raise CheckpointError(f"{key}: description says {kind} but {prefix}.weight is {have}")
        if kind == FLOAT_TYPE and prefix not in quantized and not t.is_floating_point():
            raise CheckpointError(f"{key}: description says {FLOAT_TYPE} but the tensor is {dtype_name(t.dtype)} "
                                  f"(a quantized weight needs a quantized type and its scales)")
        if prefix in quantized and leaf not in LAYER_KEYS[quantized[prefix]] + ("bias",):
            raise CheckpointError(f"{key}: unexpected tensor of {quantized[prefix]} linear {prefix} "
                                  f"(expected {list(LAYER_KEYS[quantized[prefix]])} and optional 'bias')")
    _check_fused(tensors, entries)
    return quantized
