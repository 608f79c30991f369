"""``save_quantized``: write a model in the vllm-ascend (msModelSlim) layout, atomically, without pickle.

The directory is built beside its target, fsynced and renamed into place, so it appears complete or
not at all. Shards come from ``huggingface_hub.split_torch_state_dict_into_shards`` (Hugging Face's
own names: ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` plus the index).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Mapping

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch import nn

from ..checks import positive_int
from ..dtypes import as_dtype, cast_rounds, dtype_name
from ..layers import KV_CACHE_ATTR
from ..models import attention_prefixes, is_row_parallel, quantized_linear_names
from ..schemes import SCHEMES, kv_cache_scheme_for, kv_cache_scheme_of, scheme_of
from .format import (
    ACT_DTYPE_KEY, CONFIG_FILE, DESCRIPTION_FILE, INDEX_FILE, TP_SIZE_KEY, CheckpointError, build_description,
    check_checkpoint, shares_storage, tie_targets,
)

log = logging.getLogger(__name__)

# Hugging Face's file names: model.safetensors, or model-00001-of-00003.safetensors ... plus the index.
SHARD_PATTERN = "model{suffix}.safetensors"


def _shard_limit(max_shard_size) -> int:
    """``max_shard_size`` in bytes: a positive int, or a string Hugging Face parses (``"2GB"``, ``"500MB"``)."""
    from huggingface_hub.serialization._base import parse_size_to_int

    if isinstance(max_shard_size, str):
        try:
            n = parse_size_to_int(max_shard_size)
        except ValueError as exc:
            raise ValueError(f"max_shard_size: expected a positive int of bytes or a size like '2GB' or "
                             f"'500MB' (units KB, MB, GB, TB), got {max_shard_size!r} ({exc})") from None
        if n < 1:
            raise ValueError(f"max_shard_size: expected at least 1 byte, got {max_shard_size!r} (less than one byte)")
        return n
    if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool) and max_shard_size > 0:
        return max_shard_size
    raise ValueError(f"max_shard_size: expected a positive int of bytes or a size like '2GB' or '500MB', "
                     f"got {max_shard_size!r}")


def checkpoint_state(model: nn.Module,
                     dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to store, in state-dict order, and the quantized linear prefixes with their types
    (``W4A4_FLATQUANT_DYNAMIC``, ``W8A8_DYNAMIC``: each layer's scheme).

    Quantized linears contribute their scheme's tensors (docs/checkpoint-format.md, ``Scheme.tensors_of``); every
    other entry of the state dict is stored as is, except tied weights (stored once, as Hugging Face does).
    ``dtype`` casts the float tensors, transforms and biases included; the float32 scales and clip
    ratios keep their contract dtype. Without ``dtype`` the transforms are stored in the layer's
    activation dtype, which is what its kernels use (it differs from the stored transform dtype
    only after a float32 cast of the model, where the cast back is exact).
    """
    dtype = as_dtype(dtype, optional=True)
    quantized = {name: scheme_of(model.get_submodule(name)).quant_type for name in quantized_linear_names(model)}
    state = model.state_dict()
    ties = tie_targets(model)
    out: dict[str, torch.Tensor] = {}
    lossy: list[str] = []
    done: set[str] = set()
    for key, t in state.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in quantized:
            if prefix in done:
                continue
            done.add(prefix)
            layer, scheme = model.get_submodule(prefix), SCHEMES[quantized[prefix]]
            target = dtype or scheme.act_dtype_of(layer)
            for name, v in scheme.tensors_of(layer).items():
                if target is not None and name in scheme.act_dtype_tensors and v.dtype != target:
                    if name in scheme.folded and cast_rounds(v, target):
                        lossy.append(f"{prefix}.{name} ({dtype_name(v.dtype)} -> {dtype_name(target)})")
                    v = v.to(target)
                out[f"{prefix}.{name}"] = v
            continue
        if key in ties:
            src = state.get(ties[key])
            if src is None:
                raise CheckpointError(f"{key}: tied to {ties[key]}, which the model does not have")
            if not (shares_storage(t, src) and t.shape == src.shape) and not torch.equal(t, src):
                raise CheckpointError(
                    f"{key}: the config ties it to {ties[key]} (tie_word_embeddings) but the two differ; "
                    "a load would silently replace it: untie the config or re-tie the weights"
                )
            continue
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[key] = t
    if lossy:
        warnings.warn(
            f"dtype: casting changed the values of {len(lossy)} transform(s), e.g. {lossy[0]}; the export "
            "will not compute exactly what the in-memory model computes",
            stacklevel=3,
        )
    _, kv = kv_cache_state(model, dtype)
    out.update(kv)
    # safetensors refuses aliased tensors; anything still aliased here is not a declared tie.
    seen: dict[int, str] = {}
    for key, t in out.items():
        if t.numel() == 0:
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.device.type != "meta":
            raise CheckpointError(f"{key}: shares memory with {seen[ptr]} but is not a declared tied weight")
        seen[ptr] = key
    return out, quantized


def kv_cache_state(model: nn.Module, dtype: torch.dtype | None = None) -> tuple[str | None, dict[str, torch.Tensor]]:
    """The model's KV-cache type (``"C8"``) and its tensors under their checkpoint keys, or ``(None, {})``.

    The scales are the :class:`~flatquant_lab.layers.QuantizedKVCache` modules at ``<attention>.kv_cache_quant``
    (``models.attach_kv_cache``); every decoder layer must carry one, all of one type. Stored in their own dtype
    (the model dtype), or in ``dtype`` when given.
    """
    found = {name.rpartition(".")[0]: mod for name, mod in model.named_modules()
             if name.rpartition(".")[2] == KV_CACHE_ATTR}
    if not found:
        return None, {}
    types = {}
    for prefix, mod in found.items():
        scheme = kv_cache_scheme_of(mod)
        if scheme is None:
            raise CheckpointError(f"{prefix}.{KV_CACHE_ATTR}: a {type(mod).__name__} of no registered KV-cache scheme")
        types.setdefault(scheme.cache_type, prefix)
    if len(types) > 1:
        listing = ", ".join(f"{p} is {t}" for t, p in types.items())
        raise CheckpointError(f"model: its attention layers mix KV-cache types ({listing}); a checkpoint has one "
                              "kv_cache_type")
    missing = [p for p in attention_prefixes(model) if p not in found]
    if missing:
        raise CheckpointError(f"{missing[0]}: carries no KV-cache scales while {next(iter(found))} does; "
                              "vllm-ascend quantizes the cache of every layer or of none (attach_kv_cache)")
    scheme = kv_cache_scheme_of(next(iter(found.values())))
    out = {}
    for prefix, mod in found.items():
        for name, t in scheme.tensors_of(mod).items():
            out[f"{prefix}.{name}"] = t.to(dtype) if dtype is not None else t
    return scheme.cache_type, out


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _config_dict(model: nn.Module, float_dtype: torch.dtype) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_json_string"):
        raise ValueError(f"model: expected a Hugging Face model with a config, got {type(model).__name__}")
    cfg = copy.deepcopy(cfg)
    if hasattr(cfg, "quantization_config"):  # left by GGUF loading: the weights are plain floats now
        del cfg.quantization_config
    cfg.architectures = [type(model).__name__]  # vLLM picks the model class from this
    cfg.dtype = float_dtype
    out = json.loads(cfg.to_json_string(use_diff=True))
    out.pop("quantization_config", None)
    # transformers >= 4.56 reads "dtype", older readers (and some vLLM versions) "torch_dtype".
    out["dtype"] = out["torch_dtype"] = dtype_name(float_dtype)
    return out


def _float_dtype(tensors: Mapping[str, torch.Tensor], quantized: Mapping[str, str],
                 dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    found: dict[torch.dtype, str] = {}
    for key, t in tensors.items():
        if key.rpartition(".")[0] not in quantized and t.is_floating_point():
            found.setdefault(t.dtype, key)
    if len(found) > 1:
        listing = ", ".join(f"{k} is {dtype_name(d)}" for d, k in found.items())
        raise ValueError(f"model: its float tensors mix dtypes ({listing}); pass dtype= to save them in one dtype")
    return next(iter(found), torch.float32)


def save_quantized(model: nn.Module, out_dir, tokenizer=None, max_shard_size="2GB", dtype=None,
                   overwrite: bool = False, tp_size: int | None = None) -> Path:
    """Write ``model`` in the vllm-ascend (msModelSlim) format to ``out_dir``; return its path.

    ``dtype`` (float16 / bfloat16 / float32) casts every float tensor, transforms and biases
    included; scales and clip ratios stay float32. Casting transforms that are not exactly
    representable in ``dtype`` warns. The checkpoint is checked before anything is written (fused
    q/k/v and gate/up shards must share type, transforms and clip ratio), written into a temporary
    directory beside ``out_dir``, fsynced, and renamed into place: ``out_dir`` appears complete or
    not at all. An existing ``out_dir`` is an error unless ``overwrite=True``. ``tp_size``: the
    tensor-parallel size the checkpoint must load at in vLLM; vLLM's load (docs/tensor-parallel.md: shape asserts,
    narrowing) is emulated first and a checkpoint that would fail there is refused.

    A model carrying KV-cache scales (``models.attach_kv_cache``; docs/kv-cache.md) gets them written with
    ``"kv_cache_type"``, whatever its linear schemes; an asymmetric cache (a nonzero offset), which vllm-ascend
    would read back wrongly, is refused naming the layer. A KV cache no vllm-ascend build serves (``KV4``) is written
    with a warning saying so, and refused with ``tp_size`` (which claims that vLLM loads it).
    """
    out_dir = Path(out_dir)
    dtype = as_dtype(dtype, optional=True)
    limit = _shard_limit(max_shard_size)
    if tp_size is not None:
        positive_int(tp_size, "tp_size", " or None")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"out_dir: {out_dir} already exists (pass overwrite=True to replace it)")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"out_dir: {out_dir} exists and is not a directory; not replacing it")

    tensors, quantized = checkpoint_state(model, dtype)
    ties = tie_targets(model)
    tied_listed = [k for k in ties if k not in tensors]
    kv_type, _ = kv_cache_state(model)
    if kv_type is not None and not kv_cache_scheme_for(kv_type).served:
        warnings.warn(f"kv_cache_type {kv_type!r}: a research mode that vllm-ascend cannot serve (it has no such KV "
                      "cache); this checkpoint is for load_quantized (notebooks, lm-eval) only", stacklevel=2)
    desc = build_description(tensors, quantized, tied_listed, kv_cache=kv_type)
    for kind in dict.fromkeys(quantized.values()):  # the top-level fields the schemes present record
        scheme = SCHEMES[kind]
        try:
            fields = scheme.description_fields([model.get_submodule(p) for p, k in quantized.items() if k == kind])
        except ValueError as e:
            raise CheckpointError(f"model: {e}") from None
        for name, value in fields.items():
            if name in desc and desc[name] != value and name != "group_size":
                raise CheckpointError(f"model: its {kind} layers record {name} = {value!r}, another scheme "
                                      f"{desc[name]!r}")
            desc[name] = value
    tps = {SCHEMES[k].tp_size_of(model.get_submodule(p)) for p, k in quantized.items() if is_row_parallel(p)}
    if len(tps) > 1:
        raise CheckpointError(f"model: its row-parallel layers are built for tp_size {sorted(tps)}; a checkpoint "
                              "serves at one tensor-parallel size (quantize with one QuantConfig.tp_size)")
    model_tp = tps.pop() if tps else 1
    if tp_size is not None and tp_size != model_tp and any(
            SCHEMES[k].sized_for_tp and is_row_parallel(p) for p, k in quantized.items()):
        raise CheckpointError(f"tp_size: the model's row-parallel FlatQuant transforms are sized for tp_size "
                              f"{model_tp}, not {tp_size}; re-quantize with QuantConfig(tp_size={tp_size})")
    acts = {SCHEMES[k].act_dtype_of(model.get_submodule(p)) for p, k in quantized.items()} - {None}
    if len(acts) == 1:
        # The transforms' stored dtype need not be the one the layers compute in (dtype=float32, or
        # fp32 transforms from another exporter): record it, so that a load computes as saved.
        desc["metadata"] = {ACT_DTYPE_KEY: dtype_name(acts.pop())}
    elif acts:
        warnings.warn(f"model: its quantized layers compute in {sorted(map(dtype_name, acts))}; the checkpoint "
                      "cannot record one activation dtype, so a load takes each layer's from its transforms",
                      stacklevel=2)
    if model_tp > 1:
        desc.setdefault("metadata", {})[TP_SIZE_KEY] = model_tp
    check_checkpoint(tensors, desc, tied_listed)  # refuse before writing anything
    float_dtype = _float_dtype(tensors, quantized, dtype)
    config = _config_dict(model, float_dtype)
    if tp_size is not None:  # the TP size the checkpoint claims: vLLM must be able to load it there
        from .serving import vllm_load_problem

        problem = vllm_load_problem(tensors, desc, config, tp_size, cann="8.5")  # quantize checked the op for its CANN
        if problem:
            raise CheckpointError(f"tp_size: vLLM would not load this checkpoint at TP {tp_size}: {problem}")

    parent = out_dir.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    os.mkdir(tmp)  # mkdir, not mkdtemp: the final directory gets the usual umask permissions
    try:
        split = split_torch_state_dict_into_shards(tensors, filename_pattern=SHARD_PATTERN, max_shard_size=limit)
        for name, keys in split.filename_to_tensors.items():
            part = {k: tensors[k].detach().to("cpu").contiguous() for k in keys}
            save_file(part, str(tmp / name), metadata={"format": "pt"})
        if split.is_sharded:
            _write_json(tmp / INDEX_FILE, {"metadata": split.metadata, "weight_map": split.tensor_to_filename})
        _write_json(tmp / CONFIG_FILE, config)
        _write_json(tmp / DESCRIPTION_FILE, desc)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for root, _, files in os.walk(tmp):
            for f in files:
                _fsync_file(Path(root) / f)
            _fsync_dir(Path(root))
        _replace_dir(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    log.info("saved %d tensors (%d quantized linears) in %d file(s) to %s", len(tensors), len(quantized),
             len(split.filename_to_tensors), out_dir)
    return out_dir


def _replace_dir(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out_dir``; an old ``out_dir`` is moved aside first and removed only after."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    if not overwrite:
        raise FileExistsError(f"out_dir: {out_dir} already exists (pass overwrite=True to replace it)")
    old = out_dir.absolute().parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)
