"""How vLLM loads a checkpoint at tensor-parallel size N (docs/tensor-parallel.md), emulated; and ``serve_check``.

Load: column-parallel linears (q/k/v, gate/up) are narrowed along their output rows (k/v by kv head,
rank ``r`` taking head ``r // replicas`` when there are fewer kv heads than ranks); row-parallel ones
(o_proj, down_proj) along their input columns, ``[r K/N, (r+1) K/N)``. Tensors without that dim
(``weight_scale`` of a row-parallel layer, a scheme's per-tensor ``shared`` ones: ``left_trans``,
``right_trans``, ``clip_ratio``) are copied whole after ``assert param.shape == loaded.shape``, where W4A4
FlatQuant allocates its transforms from ``decompose_dim(K per rank)``. Which tensors a scheme narrows and
what its load asserts are the scheme's (``Scheme.shard``, ``Scheme.tp_load_problem``). A row-parallel bias
is added on rank 0 only; the ranks' outputs (in the output dtype) are summed by an all-reduce, emulated as
an fp32 sum rounded once (assumed: HCCL's order and precision are not known).

A quantized KV cache (``kv_cache_type``, docs/kv-cache.md) is loaded whole by every rank, which keeps the
channels of its own kv heads (``KVCacheScheme.shard``; replicas when there are fewer kv heads than ranks).

``serve_check`` runs every quantized linear rank by rank from the narrowed tensors through the
reference ops, sums, and compares with the layer ``load_quantized(path, tp_size=N)`` builds; with a quantized KV
cache it also writes and reads random K and V through each rank's scales and compares them with the loaded
model's, head by head.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..dtypes import HALF_DTYPES
from ..models import is_row_parallel
from ..layers import KV_CACHE_ATTR, sum_over_ranks
from ..models.tp import model_split_problem, vllm_sizes
from ..schemes import SCHEMES, quantized_schemes, rank_kv_heads
from .format import KV_CACHE_FIELD, CheckpointError, is_field, kv_cache_tensors, layer_tensors

log = logging.getLogger(__name__)


@dataclass
class TPCheck:
    """One tensor-parallel size: whether vLLM loads the checkpoint, why not, and the rank-by-rank agreement."""

    tp_size: int
    loads: bool
    problem: str = ""  # the first failing tensor, in words
    worst_rel_diff: float | None = None  # max over quantized linears of ||y_ranks - y_loaded|| / ||y_loaded||
    worst_linear: str = ""
    linears: int = 0
    kv_cache_type: str | None = None  # "C8" when the checkpoint quantizes the KV cache
    kv_cache_layers: int = 0
    kv_worst_diff: float | None = None  # max |rank's cache round trip - loaded model's| over layers, ranks, K and V

    def line(self) -> str:
        if not self.loads:
            return f"TP {self.tp_size}: does not load: {self.problem}"
        diff = "n/a" if self.worst_rel_diff is None else f"{self.worst_rel_diff:.3g}"
        text = (f"TP {self.tp_size}: loads; {self.linears} quantized linears run rank by rank, worst relative "
                f"difference to load_quantized {diff}" + (f" ({self.worst_linear})" if self.worst_linear else ""))
        if self.kv_cache_type:
            kv = "n/a" if self.kv_worst_diff is None else f"{self.kv_worst_diff:.3g}"
            text += (f"; {self.kv_cache_type} KV cache on {self.kv_cache_layers} layers, scales split by kv head, "
                     f"worst difference {kv}")
        return text


def _layers(desc: Mapping) -> dict[str, str]:
    layer_schemes = quantized_schemes()
    return {k[: -len(".weight")]: v for k, v in desc.items()
            if not is_field(k, v) and k.endswith(".weight") and v in layer_schemes}


def vllm_load_problem(tensors: Mapping[str, torch.Tensor], desc: Mapping, config: Mapping, tp: int,
                      cann: str = "8.3") -> str:
    """The first reason vLLM (with vllm-ascend) would fail to load or run the checkpoint at TP ``tp``, in
    words; ``""`` when it loads. Checks the shape asserts and splits of docs/tensor-parallel.md, and that each rank's
    FlatQuant transform is one ``npu_kronecker_quant`` runs (CANN ``cann``)."""
    problem = model_split_problem(config, tp)
    if problem:
        return problem
    for prefix, kind in sorted(_layers(desc).items()):
        scheme = SCHEMES[kind]
        out_f, in_f = scheme.linear_shape(tensors[f"{prefix}.weight"])
        if is_row_parallel(prefix):
            if in_f % tp:
                return f"{prefix}.weight: its {in_f} input columns do not split over {tp} ranks"
            k_rank = in_f // tp
        else:
            k_rank = in_f
        problem = scheme.tp_load_problem(prefix, layer_tensors(prefix, scheme, tensors), k_rank, tp, cann,
                                         **scheme.read_fields(desc))
        if problem:
            return problem
    return kv_cache_problem(tensors, desc, config)


def kv_cache_problem(tensors: Mapping[str, torch.Tensor], desc: Mapping, config: Mapping) -> str:
    """Why vllm-ascend would not serve the checkpoint's quantized KV cache consistently (docs/kv-cache.md: the
    tensors, the field, a symmetric cache, ``head_dim % 32``), in words; ``""`` when it would or there is none."""
    try:
        scheme, groups = kv_cache_tensors(tensors, desc)
    except CheckpointError as e:
        return str(e)
    if scheme is None:
        return ""
    s = vllm_sizes(config)
    for prefix, parts in groups.items():
        problem = scheme.serve_problem(parts, num_kv_heads=s["kv"], head_dim=s["head_dim"])
        if problem:
            named = any(problem.startswith(n + ":") for n in scheme.names)
            return f"{prefix}.{problem}" if named else f"{KV_CACHE_FIELD} {scheme.cache_type!r}: {problem}"
    return ""


def kv_cache_shards(tensors: Mapping[str, torch.Tensor], desc: Mapping, config: Mapping,
                    tp: int) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Per attention prefix, what each of the ``tp`` ranks keeps of its KV-cache tensors (short names): the
    channels of the rank's kv heads in the ``[num_kv_heads, head_dim]`` view; ``{}`` without a quantized cache."""
    scheme, groups = kv_cache_tensors(tensors, desc)
    if scheme is None:
        return {}
    s = vllm_sizes(config)
    return {prefix: [scheme.shard(parts, rank=r, tp=tp, num_kv_heads=s["kv"], head_dim=s["head_dim"])
                     for r in range(tp)] for prefix, parts in groups.items()}


def _column_rows(prefix: str, out_f: int, tp: int, rank: int, config: Mapping) -> slice:
    """Output rows rank ``rank`` holds of a column-parallel linear (k/v by kv head, replicated when few)."""
    s = vllm_sizes(config)
    is_kv = out_f == s["kv"] * s["head_dim"] and (prefix.endswith(".k_proj") or prefix.endswith(".v_proj"))
    if is_kv and s["kv"] < tp:
        head = rank // (tp // s["kv"])
        return slice(head * s["head_dim"], (head + 1) * s["head_dim"])
    per = out_f // tp
    return slice(rank * per, (rank + 1) * per)


def _rank_tensors(prefix: str, kind: str, tensors: Mapping[str, torch.Tensor], tp: int, rank: int,
                  config: Mapping) -> dict[str, torch.Tensor]:
    scheme = SCHEMES[kind]
    full = layer_tensors(prefix, scheme, tensors)
    if is_row_parallel(prefix):
        return scheme.shard(full, rank=rank, tp=tp)
    return scheme.shard(full, rank=rank, tp=tp, rows=_column_rows(prefix, full["weight"].shape[0], tp, rank, config))


def _rank_layer(kind: str, parts: dict, act: torch.dtype):
    return SCHEMES[kind].build(parts, backend="reference", act_dtype=act)


@torch.no_grad()
def ranks_output(prefix: str, kind: str, tensors: Mapping[str, torch.Tensor], x: torch.Tensor, tp: int,
                 config: Mapping) -> torch.Tensor:
    """One linear's output at TP ``tp``, computed rank by rank from the narrowed tensors: row-parallel
    partial outputs summed in fp32 and rounded once; column-parallel ones placed at their rows."""
    act = x.dtype
    out_f, in_f = SCHEMES[kind].linear_shape(tensors[f"{prefix}.weight"])
    if is_row_parallel(prefix):
        k = in_f // tp

        def rank_output(r: int) -> torch.Tensor:  # each rank's layer holds the bias only if vLLM gives it one
            return _rank_layer(kind, _rank_tensors(prefix, kind, tensors, tp, r, config), act)(x[:, r * k:(r + 1) * k])

        return sum_over_ranks(rank_output, tp, None, lambda t: t.to(act)).to(act)
    out = torch.full((x.shape[0], out_f), float("nan"), dtype=act)
    for r in range(tp):
        rows = _column_rows(prefix, out_f, tp, r, config)
        out[:, rows] = _rank_layer(kind, _rank_tensors(prefix, kind, tensors, tp, r, config), act)(x)
    if torch.isnan(out).any():  # a row no rank holds: the split above is wrong for this model
        raise CheckpointError(f"{prefix}: ranks at TP {tp} do not cover all {out_f} output rows")
    return out


def serve_check(path, tp_sizes: Sequence[int] = (1, 2, 4), tokens: int = 16, seed: int = 0,
                cann: str = "8.3") -> list[TPCheck]:
    """Per TP size: does vLLM load the checkpoint at ``path``, and do its quantized linears, run rank by rank
    (reference ops), match the model ``load_quantized(path, tp_size=N)`` builds? Inputs are ``tokens``
    random tokens (``seed``) in each layer's activation dtype."""
    from .load import alias_packed, read_json, read_tensors, description_path, load_quantized

    path = Path(path)
    for tp in tp_sizes:
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tp_sizes: expected positive ints, got {tp!r}")
    config = read_json(path / "config.json", "model config")
    desc = read_json(description_path(path), "msModelSlim description")
    tensors = read_tensors(path)
    alias_packed(tensors, desc)
    layers = _layers(desc)
    results = []
    for tp in tp_sizes:
        problem = vllm_load_problem(tensors, desc, config, tp, cann)
        if problem:
            results.append(TPCheck(tp, False, problem))
            continue
        model = load_quantized(path, backend="reference", tp_size=tp)
        g = torch.Generator().manual_seed(seed)
        worst, worst_name = None, ""
        for prefix, kind in sorted(layers.items()):
            layer = model.get_submodule(prefix)
            act = SCHEMES[kind].act_dtype_of(layer)
            act = act if act in HALF_DTYPES else torch.bfloat16
            x = torch.randn(tokens, layer.in_features, generator=g).to(act)
            want = layer(x)
            got = ranks_output(prefix, kind, tensors, x, tp, config)
            rel = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
            if worst is None or rel > worst:
                worst, worst_name = rel, (prefix if rel > 0 else "")
        kv_type, kv_layers, kv_worst = _kv_cache_ranks(model, tensors, desc, config, tp, tokens, g)
        results.append(TPCheck(tp, True, "", worst, worst_name, len(layers), kv_type, kv_layers, kv_worst))
    return results


@torch.no_grad()
def _kv_cache_ranks(model, tensors, desc, config, tp: int, tokens: int, g: torch.Generator):
    """Random K and V written and read through each rank's share of the scales, against the loaded model's
    cache module on the same heads: ``(cache type, layers, worst max-abs difference)``."""
    shards = kv_cache_shards(tensors, desc, config, tp)
    if not shards:
        return None, 0, None
    scheme, _ = kv_cache_tensors(tensors, desc)
    s = vllm_sizes(config)
    worst = 0.0
    for prefix, ranks in shards.items():
        whole = getattr(model.get_submodule(prefix), KV_CACHE_ATTR)
        dtype = whole.k_scale.dtype
        for which, scale_name in (("k", "k_scale"), ("v", "v_scale")):
            spread = getattr(whole, scale_name).float().view(s["kv"], 1, s["head_dim"])
            x = (torch.randn(1, s["kv"], tokens, s["head_dim"], generator=g) * 100 * spread).to(dtype)
            want = whole.roundtrip(x, which)
            for r, parts in enumerate(ranks):
                heads = rank_kv_heads(r, tp, s["kv"])
                mine = scheme.build(parts, num_kv_heads=len(heads), head_dim=s["head_dim"], dtype=dtype)
                got = mine.roundtrip(x[:, heads.start:heads.stop], which)
                diff = float((got.double() - want[:, heads.start:heads.stop].double()).abs().max())
                worst = max(worst, diff)
    return scheme.cache_type, len(shards), worst


def results_json(results: Sequence[TPCheck]) -> str:
    return json.dumps([asdict(r) for r in results], indent=1)


__all__ = ["CheckpointError", "TPCheck", "kv_cache_problem", "kv_cache_shards", "model_split_problem", "ranks_output",
           "results_json", "serve_check", "vllm_load_problem"]
