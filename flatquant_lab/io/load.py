"""``load_quantized``: rebuild a model from a checkpoint in the vllm-ascend layout (no pickle, no network).

Reads our own exports and msModelSlim's (docs/checkpoint-format.md, "msModelSlim's file names"): the description as
``quant_model_description.json`` or the legacy ``quant_model_description_{type}.json``; weights as
``model.safetensors``, ``quant_model_weights-0000N-of-0000M.safetensors`` or
``quant_model_weight_w4a4_flatquant_dynamic-000NN-of-000MM.safetensors`` shards with or without their
``*.safetensors.index.json``; keys ending in ``weight_packed`` read as ``weight``.
"""
from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file
from torch import nn

from ..checks import positive_int
from ..devices import require_available
from ..dtypes import HALF_DTYPES, as_dtype
from ..models import kv_sizes, set_kv_cache, set_submodule
from ..schemes import Scheme, quantized_schemes
from .format import (
    ACT_DTYPE_KEY, CONFIG_FILE, DESCRIPTION_FILE, INDEX_FILE, SINGLE_FILE, CheckpointError, check_checkpoint,
    expect, is_field, kv_cache_tensors, layer_tensors, layer_tp, saved_tp_size, tie_targets,
)

# msModelSlim's legacy saver names the description after the quant type (docs/checkpoint-format.md,
# "msModelSlim's file names").
LEGACY_DESCRIPTION_GLOB = "quant_model_description_*.json"
SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")
PACKED_ALIAS = "weight_packed"  # msModelSlim's legacy key for ``weight``


def description_path(path: Path) -> Path:
    """``quant_model_description.json``, else the one legacy ``quant_model_description_{type}.json``."""
    main = path / DESCRIPTION_FILE
    if main.is_file():
        return main
    legacy = sorted(path.glob(LEGACY_DESCRIPTION_GLOB))
    if len(legacy) > 1:
        raise CheckpointError(f"path: {path} has no {DESCRIPTION_FILE} and several legacy descriptions "
                              f"({', '.join(p.name for p in legacy)}); keep the one that matches the weights")
    return legacy[0] if legacy else main


def _weight_files(path: Path) -> list[str]:
    """Without an index: ``model.safetensors``, the only ``*.safetensors``, or one complete set of shards."""
    if (path / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if len(files) == 1:
        return files
    shards = [SHARD_RE.match(f) for f in files]
    if files and all(shards):
        sets = {(m["stem"], int(m["n"])) for m in shards}
        if len(sets) == 1:
            (stem, n), = sets
            have = {int(m["i"]) for m in shards}
            if have == set(range(1, n + 1)) and len(files) == n:
                return files
            missing = sorted(set(range(1, n + 1)) - have)
            raise FileNotFoundError(f"path: {path} holds shards of {stem} 'of {n}' but misses number(s) {missing}")
    raise FileNotFoundError(f"path: {path} has no {SINGLE_FILE} or {INDEX_FILE}"
                            + (f" (found {files})" if files else ""))


def alias_packed(tensors: dict, desc: dict) -> None:
    """Rename ``<prefix>.weight_packed`` to ``<prefix>.weight`` in both the tensors and the description."""
    for table, what in ((tensors, "stored"), (desc, f"listed in {DESCRIPTION_FILE}")):
        for key in [k for k in table if isinstance(k, str) and k.endswith("." + PACKED_ALIAS)]:
            new = key[: -len(PACKED_ALIAS)] + "weight"
            if new in table:
                raise CheckpointError(f"{key}: {what} beside {new}; {PACKED_ALIAS} is an alias of weight, "
                                      "so only one may be present")
            table[new] = table.pop(key)


def read_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"path: {path.parent} has no {path.name} ({what})")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path.name}: not valid JSON ({e})") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors file(s) in ``path``, checked against the index when sharded."""
    index_path = path / INDEX_FILE
    if not index_path.is_file():
        others = sorted(path.glob("*.safetensors.index.json"))
        index_path = others[0] if len(others) == 1 else index_path
    if index_path.is_file():
        index = read_json(index_path, "shard index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path.name}: expected a 'weight_map' object")
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = _weight_files(path)
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        file = path / name
        if Path(name).name != name or not file.is_file():
            raise FileNotFoundError(f"{name}: shard listed in {index_path.name} is missing from {path}")
        for key, t in load_file(str(file)).items():
            if key in tensors:
                raise CheckpointError(f"{key}: stored twice (second time in {name})")
            if weight_map is not None and weight_map.get(key) != name:
                raise CheckpointError(f"{key}: stored in {name} but {index_path.name} says {weight_map.get(key)!r}")
            tensors[key] = t
    if weight_map is not None:
        for key in weight_map:
            if key not in tensors:
                raise CheckpointError(f"{key}: listed in {index_path.name} but not stored in {weight_map[key]}")
    return tensors


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the (meta) parameter or buffer ``key``, keeping its kind."""
    owner, _, name = key.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    if name in mod._parameters:
        old = mod._parameters[name]
        mod._parameters[name] = value if isinstance(value, nn.Parameter) else nn.Parameter(
            value, requires_grad=old.requires_grad)
    else:
        mod._buffers[name] = value


def _empty_model(config, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The model of ``config`` with every parameter and buffer on the meta device (no memory, no init),
    except the computed non-persistent buffers (rotary ``inv_freq``): their modules are rebuilt on ``device``."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)
    persistent = set(model.state_dict())
    for name, mod in list(model.named_modules()):
        own = [f"{name}.{b}" if name else b for b, t in mod._buffers.items() if t is not None and t.is_meta]
        if own and not (set(own) & persistent) and not list(mod.parameters(recurse=False)):
            # rotary embeddings: computed from the config alone, in float32 as from_pretrained keeps them
            with torch.device(device):
                set_submodule(model, name, type(mod)(config=getattr(mod, "config", model.config)))
    return model


def load_quantized(path, backend: str | None = None, dtype=None, tp_size: int | None = None,
                   device=None, kv_cache_attention: bool = True) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized` (or any checkpoint in that format).

    Reads ``config.json``, ``quant_model_description.json`` and the safetensors only (no pickle, no
    network). Each linear the description marks with a quantized scheme becomes that scheme's layer
    (``W4A4_FLATQUANT_DYNAMIC``: ``W4A4FlatQuantLinear``, ``W8A8_DYNAMIC``: ``W8A8DynamicLinear``, both with
    ``backend``; :mod:`flatquant_lab.schemes`); the rest are loaded as plain weights; a static ``W8A8`` layer
    is refused, naming it. Missing, extra, mis-shaped or mis-typed tensors (float tensors must have the
    dtype ``config.json`` names) and a description that disagrees with them raise ``CheckpointError``
    naming the tensor.

    A checkpoint with ``"kv_cache_type"`` (docs/kv-cache.md) gets its scales back on every attention module as a
    :class:`~flatquant_lab.layers.QuantizedKVCache` (``models.kv_caches``), in the model dtype; scales without the
    field, the field without the scales of every layer, and a nonzero offset are refused, naming the layer.
    With ``kv_cache_attention`` (the default) its attention then reads K and V through them
    (``models.use_kv_cache_attention``: every forward, as decode reads the int8 cache), so that perplexity and
    lm-eval see the cache's cost; ``False`` leaves the model's own attention (the scales stay attached).

    Without ``dtype`` the result computes bit for bit what the saved model computed (given the
    default attention implementation). ``dtype`` loads the float tensors in another dtype instead,
    as ``from_pretrained(dtype=...)`` would: the model is built in it, quantized layers run in it
    when it is a half type, and their float32 scales and clip ratios stay untouched. Eval mode.

    ``tp_size`` (default: the description's ``metadata.tp_size``, else 1): the row-parallel layers
    compute what vLLM's ``tp_size`` ranks compute, each on its slice of the input, summed as the
    all-reduce (docs/tensor-parallel.md, 'Row-parallel linears'); FlatQuant ones must have transforms sized for
    it, as vLLM asserts.

    The model is built on the meta device and filled tensor by tensor from the files, so the peak host
    memory is about one copy of the checkpoint; every tensor (int4 layers included) goes straight to
    ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``npu``, ``npu:N``; default the CPU).
    """
    from transformers import AutoConfig

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"path: {path} is not a directory")
    dtype = as_dtype(dtype, optional=True)
    dev = require_available(device) if device is not None else torch.device("cpu")
    read_json(path / CONFIG_FILE, "model config")  # a clear error before transformers' own
    desc = read_json(description_path(path), "msModelSlim description")
    tensors = read_tensors(path)
    if isinstance(desc, dict):
        alias_packed(tensors, desc)

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    saved_dtype = as_dtype(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
                                  or torch.float32, name=f"{CONFIG_FILE} dtype")
    # Built directly in the target dtype: Module.to() would also cast the rotary inv_freq buffers,
    # which from_pretrained keeps in float32.
    model = _empty_model(config, dtype or saved_dtype, dev)
    ties = tie_targets(model)
    # The model's sizes first: the checks below take [O, K] from the weight itself.
    layer_schemes = quantized_schemes()
    for key, kind in (desc.items() if isinstance(desc, dict) else ()):
        if not is_field(key, kind) and kind in layer_schemes and key.endswith(".weight") and key in tensors:
            mod = _find(model, key[: -len(".weight")])
            if isinstance(mod, nn.Linear):
                _expect_linear(key, tensors[key], mod, layer_schemes[kind])
    if tp_size is not None:
        positive_int(tp_size, "tp_size", " or None")
    tp = saved_tp_size(desc) if tp_size is None else tp_size
    quantized = check_checkpoint(tensors, desc, tied=ties, tp_size=tp)

    state = model.state_dict()
    used: set[str] = set()
    lossy: list[str] = []
    for prefix in sorted(quantized):
        scheme = layer_schemes[quantized[prefix]]
        keys = [f"{prefix}.{n}" for n in layer_tensors(prefix, scheme, tensors)]
        on_dev = {k: tensors[k].to(dev) for k in keys}  # straight to the device, checked there
        layer = _scheme_layer(model, prefix, scheme, on_dev, backend, dtype, saved_dtype, _saved_act_dtype(desc),
                              lossy, layer_tp(prefix, tp), scheme.read_fields(desc))
        set_submodule(model, prefix, layer)
        used.update(keys)
        for k in keys:  # the host copy goes as soon as the layer is built
            tensors[k] = None
        for key in [k for k in state if k.startswith(prefix + ".")]:
            del state[key]

    with torch.no_grad():
        for key, target in state.items():
            if key in ties:
                continue  # re-tied by the model itself
            if key not in tensors:
                raise CheckpointError(f"{key}: missing (the {type(model).__name__} built from {CONFIG_FILE} has it)")
            t = tensors[key]
            want = saved_dtype if target.is_floating_point() else target.dtype
            expect(key, t, tuple(target.shape), (want,))
            _set_tensor(model, key, t.to(dev, target.dtype))  # no copy on the CPU in the saved dtype
            tensors[key] = None
            used.add(key)
        for key, source in ties.items():  # tied weights share the one loaded parameter again
            _set_tensor(model, key, model.get_parameter(source))
    kv_scheme, kv_groups = kv_cache_tensors(tensors, desc)
    if kv_scheme is not None:  # docs/kv-cache.md: one QuantizedKVCache per attention, in the model dtype
        heads, head_dim = kv_sizes(model)
        for prefix, parts in kv_groups.items():
            if _find(model, prefix) is None:
                raise CheckpointError(f"{prefix}.{kv_scheme.names[0]}: KV-cache scales of {prefix}, which the "
                                      f"{type(model).__name__} built from {CONFIG_FILE} does not have")
            try:
                module = kv_scheme.build({n: t.to(dev) for n, t in parts.items()}, num_kv_heads=heads,
                                         head_dim=head_dim, dtype=dtype or saved_dtype)
            except ValueError as e:
                raise CheckpointError(f"{prefix}.{e}") from None
            set_kv_cache(model, prefix, module)
            used.update(f"{prefix}.{n}" for n in parts)
    if kv_scheme is not None and kv_cache_attention:
        from ..models import use_kv_cache_attention

        use_kv_cache_attention(model)
    if lossy:
        more = f" and {len(lossy) - 1} more" if len(lossy) > 1 else ""
        warnings.warn(f"dtype: loading rounds transforms that the int4 weights were folded with, so the layers "
                      f"carry a small extra error: {lossy[0]}{more}", stacklevel=2)
    extra = [k for k in tensors if k not in used]
    if extra:
        more = f"; {len(extra) - 1} more" if len(extra) > 1 else ""
        raise CheckpointError(f"{extra[0]}: unexpected tensor (the {type(model).__name__} built from "
                              f"{CONFIG_FILE} has no such parameter){more}")
    return model.eval()


def _find(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _saved_act_dtype(desc: Mapping) -> torch.dtype | None:
    meta = desc.get("metadata")
    name = meta.get(ACT_DTYPE_KEY) if isinstance(meta, Mapping) else None
    if name is None:
        return None
    act = getattr(torch, name, None) if isinstance(name, str) else None
    if act not in HALF_DTYPES:
        raise CheckpointError(f"{DESCRIPTION_FILE}: metadata.{ACT_DTYPE_KEY} is {name!r}, expected 'float16' or 'bfloat16'")
    return act


def _expect_linear(key: str, weight: torch.Tensor, linear: nn.Linear, scheme: Scheme) -> None:
    """The stored weight is that of ``linear`` ``[O, K]`` (as the scheme stores it: a packed weight has fewer columns)."""
    want = (linear.out_features, linear.in_features)
    have = tuple(scheme.linear_shape(weight))
    if have == want:
        return
    if have == tuple(weight.shape):
        expect(key, weight, want)
    raise CheckpointError(f"{key}: expected the {scheme.quant_type} weight of a linear {list(want)}, got shape "
                          f"{list(weight.shape)} (that of a linear {list(have)})")


def _linear_of(model: nn.Module, prefix: str, tensors: Mapping[str, torch.Tensor], scheme: Scheme) -> nn.Linear:
    """The float linear a quantized layer replaces, checked against the stored weight shape and bias."""
    linear = _find(model, prefix)
    if not isinstance(linear, nn.Linear):
        raise CheckpointError(f"{prefix}.weight: the description makes {prefix} {scheme.quant_type}, which needs an "
                              f"nn.Linear of {type(model).__name__} (got {type(linear).__name__})")
    _expect_linear(f"{prefix}.weight", tensors[f"{prefix}.weight"], linear, scheme)
    has_bias = f"{prefix}.bias" in tensors
    if linear.bias is not None and not has_bias:
        raise CheckpointError(f"{prefix}.bias: missing ({type(model).__name__}'s {prefix} has a bias)")
    if linear.bias is None and has_bias:
        raise CheckpointError(f"{prefix}.bias: unexpected ({type(model).__name__}'s {prefix} has no bias)")
    return linear


def _scheme_layer(model: nn.Module, prefix: str, scheme: Scheme, tensors: Mapping[str, torch.Tensor], backend,
                  dtype: torch.dtype | None, saved_dtype: torch.dtype, saved_act: torch.dtype | None,
                  lossy: list[str], tp: int = 1, fields: Mapping | None = None) -> nn.Module:
    """The layer of linear ``prefix`` built by its scheme, in the dtype the scheme picks for this load
    (``Scheme.load_act_dtype``); transforms the load's ``dtype`` rounds are added to ``lossy``."""
    _linear_of(model, prefix, tensors, scheme)
    parts = layer_tensors(prefix, scheme, tensors)
    act = scheme.load_act_dtype(parts, dtype=dtype, saved_act=saved_act, saved_dtype=saved_dtype)
    parts, rounded = scheme.cast_for_load(parts, dtype=dtype, act_dtype=act)
    lossy.extend(f"{prefix}.{r}" for r in rounded)
    try:
        return scheme.build(parts, backend=backend, act_dtype=act, tp_size=tp, **(fields or {}))
    except ValueError as e:  # its messages start with the tensor's short name
        raise CheckpointError(f"{prefix}.{e}") from None
