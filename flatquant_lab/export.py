"""Export to, and import from, the checkpoint format vllm-ascend serves (SPEC section 1).

A saved directory holds:

- ``config.json``: the model's Hugging Face config (no ``quantization_config``; ``dtype`` and
  ``torch_dtype`` name the float dtype; ``architectures`` set so vLLM can pick the model class);
- ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards plus
  ``model.safetensors.index.json``;
- ``quant_model_description.json``: msModelSlim's description file. Every stored tensor key maps
  to ``"W4A4_FLATQUANT_DYNAMIC"`` (the tensors of a quantized linear) or ``"FLOAT"``; top-level
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

Nothing is pickled: tensors go through safetensors, everything else is JSON.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .kronecker import decompose_dim
from .linear import CHECKPOINT_KEYS, HALF_DTYPES, W4A4FlatQuantLinear, cast_rounds
from .models import GROUPS, decoder_layers, set_submodule

log = logging.getLogger(__name__)

QUANT_TYPE = "W4A4_FLATQUANT_DYNAMIC"
FLOAT_TYPE = "FLOAT"
DESCRIPTION_FILE = "quant_model_description.json"
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# msModelSlim's ascendV1 saver writes version "1.0.0" and group_size 0 for per-channel weights.
DESCRIPTION_VERSION = "1.0.0"
TOP_LEVEL_FIELDS = ("model_quant_type", "version", "group_size", "metadata")
# Our own entry in the description's metadata: the activation dtype of the W4A4 layers.
ACT_DTYPE_KEY = "flatquant_lab_act_dtype"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# vLLM fuses these shards into one module (qkv_proj, gate_up_proj): one quant type, and for
# FlatQuant one left_trans / right_trans / clip_ratio (vllm-ascend loads them as per-tensor params).
FUSED_MODULES = {"qkv_proj": GROUPS["attn"], "gate_up_proj": GROUPS["mlp"]}
_SHARED_KEYS = ("left_trans", "right_trans", "clip_ratio")

__all__ = [
    "CheckpointError", "save_quantized", "load_quantized", "quantized_linear_names", "linear_weight_bytes",
    "checkpoint_state", "build_description", "check_checkpoint",
]


class CheckpointError(ValueError):
    """A checkpoint (or a model about to be saved) that breaks the vllm-ascend contract."""


# ---------------------------------------------------------------------------------------------- helpers
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _as_float_dtype(dtype, name: str = "dtype") -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected float16, bfloat16 or float32 (or None), got {dtype!r}")
    return dtype


def quantized_linear_names(model: nn.Module) -> list[str]:
    """Module names of every ``W4A4FlatQuantLinear`` in ``model``, in module order."""
    return [name for name, mod in model.named_modules() if isinstance(mod, W4A4FlatQuantLinear)]


def linear_weight_bytes(model: nn.Module, decoder_only: bool = True) -> int:
    """Bytes the linear layers' weights take in memory (by default only the decoder layers' linears,
    the ones W4A4 quantizes; ``decoder_only=False`` adds the rest, e.g. ``lm_head``).

    ``nn.Linear``: its ``weight`` (bias not counted). ``W4A4FlatQuantLinear``: the packed int4
    weight, ``weight_scale``, ``weight_offset``, ``left_trans``, ``right_trans`` and ``clip_ratio``
    (bias not counted; the derived copies ``p1``/``p2`` are not counted either, as vllm-ascend keeps
    one copy of each transform).
    """
    total = 0
    root = decoder_layers(model) if decoder_only else model
    for mod in root.modules():
        if isinstance(mod, W4A4FlatQuantLinear):
            for name in ("weight_packed", "weight_scale", "weight_offset", "left_trans", "right_trans", "clip_ratio"):
                t = getattr(mod, name)
                total += t.numel() * t.element_size()
        elif isinstance(mod, nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
    return total


def _tie_targets(model: nn.Module) -> dict[str, str]:
    """``{tied key: key it aliases}`` for weights Hugging Face does not store (tie_word_embeddings)."""
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers >= 5
    if isinstance(tied, Mapping):
        return dict(tied)
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(text_cfg, "tie_word_embeddings", False):
        return {"lm_head.weight": "model.embed_tokens.weight"}
    return {}


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# ---------------------------------------------------------------------------------------------- save side
def checkpoint_state(model: nn.Module, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The tensors to store, in state-dict order, and the set of quantized linear prefixes.

    Quantized linears contribute their SPEC section 1 tensors (``checkpoint_tensors``); every other
    entry of the state dict is stored as is, except tied weights (stored once, as Hugging Face does).
    ``dtype`` casts the float tensors, transforms and biases included; the float32 scales and clip
    ratios keep their contract dtype. Without ``dtype`` the transforms are stored in the layer's
    activation dtype, which is what its kernels use (it differs from the stored transform dtype
    only after a float32 cast of the model, where the cast back is exact).
    """
    dtype = _as_float_dtype(dtype)
    quantized = set(quantized_linear_names(model))
    state = model.state_dict()
    ties = _tie_targets(model)
    out: dict[str, torch.Tensor] = {}
    lossy: list[str] = []
    done: set[str] = set()
    for key, t in state.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in quantized:
            if prefix in done:
                continue
            done.add(prefix)
            layer = model.get_submodule(prefix)
            target = dtype or layer.act_dtype
            for name, v in layer.checkpoint_tensors().items():
                if name in ("left_trans", "right_trans", "bias") and v.dtype != target:
                    if name != "bias" and cast_rounds(v, target):
                        lossy.append(f"{prefix}.{name} ({_dtype_name(v.dtype)} -> {_dtype_name(target)})")
                    v = v.to(target)
                out[f"{prefix}.{name}"] = v
            continue
        if key in ties:
            src = state.get(ties[key])
            if src is None:
                raise CheckpointError(f"{key}: tied to {ties[key]}, which the model does not have")
            if not (_shares_storage(t, src) and t.shape == src.shape) and not torch.equal(t, src):
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


def build_description(keys: Iterable[str], quantized: Iterable[str], tied: Iterable[str] = ()) -> dict:
    """msModelSlim's description: top-level fields, then every key -> its quant type.

    ``keys`` are the stored tensor keys, ``quantized`` the prefixes of quantized linears (all their
    tensors are W4A4_FLATQUANT_DYNAMIC), ``tied`` tied weights that are listed as FLOAT but not stored.
    """
    quantized = set(quantized)
    desc: dict = {
        "model_quant_type": QUANT_TYPE if quantized else FLOAT_TYPE,
        "version": DESCRIPTION_VERSION,
        "group_size": 0,
    }
    for key in keys:
        desc[key] = QUANT_TYPE if key.rpartition(".")[0] in quantized else FLOAT_TYPE
    for key in tied:
        desc.setdefault(key, FLOAT_TYPE)
    return desc


# ---------------------------------------------------------------------------------------------- validation
def _expect(key: str, t: torch.Tensor, shape=None, dtypes=None) -> None:
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{key}: expected shape {list(shape)}, got {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = " or ".join(_dtype_name(d) for d in dtypes)
        raise CheckpointError(f"{key}: expected dtype {names}, got {_dtype_name(t.dtype)}")


def _check_quantized(prefix: str, tensors: Mapping[str, torch.Tensor], desc: Mapping) -> None:
    """SPEC section 1 for one quantized linear: keys, labels, shapes and dtypes."""
    for name in CHECKPOINT_KEYS:
        key = f"{prefix}.{name}"
        if key not in tensors:
            raise CheckpointError(f"{key}: missing ({prefix}.weight is {QUANT_TYPE}, which needs {list(CHECKPOINT_KEYS)})")
        if desc.get(key) != QUANT_TYPE:
            raise CheckpointError(f"{key}: description says {desc.get(key)!r}, expected {QUANT_TYPE!r} "
                                  f"(as for {prefix}.weight)")
    w = tensors[f"{prefix}.weight"]
    if w.dim() != 2:
        raise CheckpointError(f"{prefix}.weight: expected an int8 matrix [O, K], got shape {list(w.shape)}")
    out_f, in_f = w.shape
    _expect(f"{prefix}.weight", w, dtypes=(torch.int8,))
    if in_f % 8:
        raise CheckpointError(f"{prefix}.weight: in-features K = {in_f} must be divisible by 8 (int4 packing)")
    n1, n2 = decompose_dim(in_f)
    _expect(f"{prefix}.weight_scale", tensors[f"{prefix}.weight_scale"], (out_f, 1), (torch.float32,))
    _expect(f"{prefix}.weight_offset", tensors[f"{prefix}.weight_offset"], (out_f, 1), (torch.float32,))
    # vllm-ascend allocates left/right_trans from get_decompose_dim(K): any other factor pair fails to load.
    _expect(f"{prefix}.left_trans", tensors[f"{prefix}.left_trans"], (n1, n1), FLOAT_DTYPES)
    trans_dtype = tensors[f"{prefix}.left_trans"].dtype
    _expect(f"{prefix}.right_trans", tensors[f"{prefix}.right_trans"], (n2, n2), (trans_dtype,))
    _expect(f"{prefix}.clip_ratio", tensors[f"{prefix}.clip_ratio"], (1,), (torch.float32,))
    bias = tensors.get(f"{prefix}.bias")
    if bias is not None:
        _expect(f"{prefix}.bias", bias, (out_f,), (trans_dtype,))
        # msModelSlim labels a quantized layer's bias FLOAT; vllm-ascend never reads the label. Accept both.
        if desc.get(f"{prefix}.bias") not in (QUANT_TYPE, FLOAT_TYPE):
            raise CheckpointError(f"{prefix}.bias: description says {desc.get(f'{prefix}.bias')!r}, "
                                  f"expected {QUANT_TYPE!r}")


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


def check_checkpoint(tensors: Mapping[str, torch.Tensor], desc: Mapping, tied: Iterable[str] = ()) -> set[str]:
    """Check tensors against a description (both directions) and SPEC section 1; return quantized prefixes.

    ``tied``: keys a description may list as FLOAT without a stored tensor (tied embeddings).
    Raises ``CheckpointError`` naming the first offending tensor.
    """
    tied = set(tied)
    if not isinstance(desc, Mapping):
        raise CheckpointError(f"{DESCRIPTION_FILE}: expected a JSON object, got {type(desc).__name__}")
    mqt = desc.get("model_quant_type")
    if mqt not in (QUANT_TYPE, FLOAT_TYPE):
        raise CheckpointError(f"{DESCRIPTION_FILE}: model_quant_type is {mqt!r}, expected {QUANT_TYPE!r} "
                              f"(or {FLOAT_TYPE!r} for an unquantized model)")
    if desc.get("group_size", 0) not in (0, None):
        raise CheckpointError(f"{DESCRIPTION_FILE}: group_size is {desc['group_size']!r}, expected 0 "
                              "(per-channel weight scales)")
    for key, kind in desc.items():
        if key in TOP_LEVEL_FIELDS:
            continue
        if kind not in (QUANT_TYPE, FLOAT_TYPE):
            raise CheckpointError(f"{key}: description says {kind!r}; flatquant_lab handles only "
                                  f"{QUANT_TYPE!r} and {FLOAT_TYPE!r}")
        if key not in tensors and not (key in tied and kind == FLOAT_TYPE):
            raise CheckpointError(f"{key}: listed in {DESCRIPTION_FILE} as {kind} but no such tensor is stored")
    for key in tensors:
        if key not in desc:
            raise CheckpointError(f"{key}: stored but not listed in {DESCRIPTION_FILE}")
    quantized = {k[: -len(".weight")] for k, v in desc.items()
                 if k.endswith(".weight") and v == QUANT_TYPE and k not in TOP_LEVEL_FIELDS}
    for prefix in sorted(quantized):
        _check_quantized(prefix, tensors, desc)
    for key, t in tensors.items():
        prefix, _, leaf = key.rpartition(".")
        if desc[key] == QUANT_TYPE and prefix not in quantized:
            raise CheckpointError(f"{key}: description says {QUANT_TYPE} but {prefix}.weight is not {QUANT_TYPE}")
        if desc[key] == FLOAT_TYPE and prefix not in quantized and not t.is_floating_point():
            raise CheckpointError(f"{key}: description says {FLOAT_TYPE} but the tensor is {_dtype_name(t.dtype)} "
                                  f"(a quantized weight needs {QUANT_TYPE} and its scales)")
        if prefix in quantized and leaf not in CHECKPOINT_KEYS + ("bias",):
            raise CheckpointError(f"{key}: unexpected tensor of quantized linear {prefix} "
                                  f"(expected {list(CHECKPOINT_KEYS)} and optional 'bias')")
    _check_fused(tensors, desc)
    return quantized


# ---------------------------------------------------------------------------------------------- files
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _parse_size(size) -> int:
    """``2GB`` (decimal units as in Hugging Face), ``512MiB`` (binary), or an int of bytes.

    A fractional byte count is a limit, so it rounds down (``1.5KiB`` -> 1536, ``2.5B`` -> 2); below one
    byte is an error. The arithmetic is exact (``2.01KB`` is 2010 bytes; floats gave 2009).
    """
    from fractions import Fraction

    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
        if m and m.group(2) in _SIZE_UNITS and Fraction(m.group(1)) > 0:
            n = int(Fraction(m.group(1)) * _SIZE_UNITS[m.group(2)])
            if n < 1:
                raise ValueError(f"max_shard_size: expected at least 1 byte, got {size!r} (less than one byte)")
            return n
    raise ValueError(f"max_shard_size: expected a positive int of bytes or a size like '2GB' or '500MiB', got {size!r}")


def _shard(tensors: Mapping[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Greedy split in key order; a tensor larger than ``limit`` gets a shard of its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and used + n > limit:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += n
    return shards


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
    out["dtype"] = out["torch_dtype"] = _dtype_name(float_dtype)
    return out


def _float_dtype(tensors: Mapping[str, torch.Tensor], quantized: set[str], dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    found: dict[torch.dtype, str] = {}
    for key, t in tensors.items():
        if key.rpartition(".")[0] not in quantized and t.is_floating_point():
            found.setdefault(t.dtype, key)
    if len(found) > 1:
        listing = ", ".join(f"{k} is {_dtype_name(d)}" for d, k in found.items())
        raise ValueError(f"model: its float tensors mix dtypes ({listing}); pass dtype= to save them in one dtype")
    return next(iter(found), torch.float32)


def save_quantized(model: nn.Module, out_dir, tokenizer=None, max_shard_size="2GB", dtype=None,
                   overwrite: bool = False) -> Path:
    """Write ``model`` in the vllm-ascend (msModelSlim) format to ``out_dir``; return its path.

    ``dtype`` (float16 / bfloat16 / float32) casts every float tensor, transforms and biases
    included; scales and clip ratios stay float32. Casting transforms that are not exactly
    representable in ``dtype`` warns. The checkpoint is checked before anything is written (fused
    q/k/v and gate/up shards must share type, transforms and clip ratio), written into a temporary
    directory beside ``out_dir``, fsynced, and renamed into place: ``out_dir`` appears complete or
    not at all. An existing ``out_dir`` is an error unless ``overwrite=True``.
    """
    out_dir = Path(out_dir)
    dtype = _as_float_dtype(dtype)
    limit = _parse_size(max_shard_size)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"out_dir: {out_dir} already exists (pass overwrite=True to replace it)")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"out_dir: {out_dir} exists and is not a directory; not replacing it")

    tensors, quantized = checkpoint_state(model, dtype)
    ties = _tie_targets(model)
    tied_listed = [k for k in ties if k not in tensors]
    desc = build_description(tensors, quantized, tied_listed)
    acts = {model.get_submodule(p).act_dtype for p in quantized}
    if len(acts) == 1:
        # The transforms' stored dtype need not be the one the layers compute in (dtype=float32, or
        # fp32 transforms from another exporter): record it, so that a load computes as saved.
        desc["metadata"] = {ACT_DTYPE_KEY: _dtype_name(acts.pop())}
    elif acts:
        warnings.warn(f"model: its W4A4 layers compute in {sorted(map(_dtype_name, acts))}; the checkpoint "
                      "cannot record one activation dtype, so a load takes each layer's from its transforms",
                      stacklevel=2)
    check_checkpoint(tensors, desc, tied_listed)  # refuse before writing anything
    float_dtype = _float_dtype(tensors, quantized, dtype)
    config = _config_dict(model, float_dtype)

    parent = out_dir.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    os.mkdir(tmp)  # mkdir, not mkdtemp: the final directory gets the usual umask permissions
    try:
        shards = _shard(tensors, limit)
        if len(shards) == 1:
            names = [SINGLE_FILE]
        else:
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for name, keys in zip(names, shards):
            part = {k: tensors[k].detach().to("cpu").contiguous() for k in keys}
            save_file(part, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in keys})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
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
             len(shards), out_dir)
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


# ---------------------------------------------------------------------------------------------- load side
def _read_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"path: {path.parent} has no {path.name} ({what})")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path.name}: not valid JSON ({e})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors file(s) in ``path``, checked against the index when sharded."""
    index_path = path / INDEX_FILE
    if not index_path.is_file():
        others = sorted(path.glob("*.safetensors.index.json"))
        index_path = others[0] if len(others) == 1 else index_path
    if index_path.is_file():
        index = _read_json(index_path, "shard index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path.name}: expected a 'weight_map' object")
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = [SINGLE_FILE] if (path / SINGLE_FILE).is_file() else sorted(p.name for p in path.glob("*.safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(f"path: {path} has no {SINGLE_FILE} or {INDEX_FILE}"
                                    + (f" (found {files})" if files else ""))
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


def load_quantized(path, backend: str | None = None, dtype=None) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized` (or any checkpoint in that format).

    Reads ``config.json``, ``quant_model_description.json`` and the safetensors only (no pickle, no
    network). Layers the description marks ``W4A4_FLATQUANT_DYNAMIC`` become
    ``W4A4FlatQuantLinear`` (with ``backend``); the rest are loaded as plain weights. Missing, extra,
    mis-shaped or mis-typed tensors (float tensors must have the dtype ``config.json`` names) and a
    description that disagrees with them raise ``CheckpointError`` naming the tensor.

    Without ``dtype`` the result computes bit for bit what the saved model computed (given the
    default attention implementation). ``dtype`` loads the float tensors in another dtype instead,
    as ``from_pretrained(dtype=...)`` would: the model is built in it, quantized layers run in it
    when it is a half type, and their float32 scales and clip ratios stay untouched. Eval mode.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"path: {path} is not a directory")
    dtype = _as_float_dtype(dtype)
    _read_json(path / CONFIG_FILE, "model config")  # a clear error before transformers' own
    desc = _read_json(path / DESCRIPTION_FILE, "msModelSlim description")
    tensors = _read_tensors(path)

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    saved_dtype = _as_float_dtype(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
                                  or torch.float32, name=f"{CONFIG_FILE} dtype")
    # Built directly in the target dtype: Module.to() would also cast the rotary inv_freq buffers,
    # which from_pretrained keeps in float32.
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype or saved_dtype)
    ties = _tie_targets(model)
    # The model's sizes first: the checks below take [O, K] from the weight itself.
    for key, kind in desc.items():
        if kind == QUANT_TYPE and key.endswith(".weight") and key in tensors:
            mod = _find(model, key[: -len(".weight")])
            if isinstance(mod, nn.Linear):
                _expect(key, tensors[key], (mod.out_features, mod.in_features))
    quantized = check_checkpoint(tensors, desc, tied=ties)

    state = model.state_dict()
    used: set[str] = set()
    lossy: list[str] = []
    for prefix in sorted(quantized):
        layer = _quantized_layer(model, prefix, tensors, backend, dtype, _saved_act_dtype(desc), lossy)
        set_submodule(model, prefix, layer)
        used.update(f"{prefix}.{n}" for n in CHECKPOINT_KEYS + ("bias",) if f"{prefix}.{n}" in tensors)
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
            _expect(key, t, tuple(target.shape), (want,))
            target.copy_(t)  # casts when dtype was given
            used.add(key)
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


def _quantized_layer(model: nn.Module, prefix: str, tensors: Mapping[str, torch.Tensor], backend,
                     dtype: torch.dtype | None, saved_act: torch.dtype | None = None,
                     lossy: list[str] | None = None) -> W4A4FlatQuantLinear:
    linear = _find(model, prefix)
    if not isinstance(linear, nn.Linear):
        raise CheckpointError(f"{prefix}.weight: the description quantizes {prefix}, which is not an "
                              f"nn.Linear of {type(model).__name__} (got {type(linear).__name__})")
    _expect(f"{prefix}.weight", tensors[f"{prefix}.weight"], (linear.out_features, linear.in_features))
    has_bias = f"{prefix}.bias" in tensors
    if linear.bias is not None and not has_bias:
        raise CheckpointError(f"{prefix}.bias: missing ({type(model).__name__}'s {prefix} has a bias)")
    if linear.bias is None and has_bias:
        raise CheckpointError(f"{prefix}.bias: unexpected ({type(model).__name__}'s {prefix} has no bias)")
    parts = {n: tensors[f"{prefix}.{n}"] for n in CHECKPOINT_KEYS + (("bias",) if has_bias else ())}
    stored = parts["left_trans"].dtype
    # The activation dtype: the requested half dtype, else the one the description records, else the
    # transforms' own, else bfloat16 (from_checkpoint's default for float32 transforms).
    act = (dtype if dtype in HALF_DTYPES else saved_act if saved_act is not None
           else stored if stored in HALF_DTYPES else torch.bfloat16)
    if dtype is not None:
        for name in ("left_trans", "right_trans"):
            t = parts[name]
            if t.dtype in HALF_DTYPES and cast_rounds(t, dtype) and lossy is not None:
                lossy.append(f"{prefix}.{name} ({_dtype_name(t.dtype)} -> {_dtype_name(dtype)})")
            parts[name] = t.to(dtype)
    if has_bias:
        parts["bias"] = parts["bias"].to(act)  # added in the activation dtype, as vllm-ascend does
    try:
        return W4A4FlatQuantLinear.from_checkpoint(parts, backend=backend, act_dtype=act)
    except ValueError as e:  # its messages start with the tensor's short name
        raise CheckpointError(f"{prefix}.{e}") from None
