"""How vLLM loads a checkpoint at tensor-parallel size N (docs/tensor-parallel.md), emulated; and ``serve_check``.

Load: column-parallel linears (q/k/v, gate/up) are narrowed along their output rows (k/v by kv head,
rank ``r`` taking head ``r // replicas`` when there are fewer kv heads than ranks); row-parallel ones
(o_proj, down_proj) along their input columns, ``[r K/N, (r+1) K/N)``. Tensors without that dim
(``weight_scale`` of a row-parallel layer, ``left_trans``, ``right_trans``, ``clip_ratio``) are copied
whole after ``assert param.shape == loaded.shape``, where W4A4 FlatQuant allocates its transforms from
``decompose_dim(K per rank)``. A row-parallel bias is added on rank 0 only; the ranks' outputs (in the
output dtype) are summed by an all-reduce, emulated as an fp32 sum rounded once (assumed: HCCL's order
and precision are not known).

``serve_check`` runs every quantized linear rank by rank from the narrowed tensors through the
reference ops, sums, and compares with the layer ``load_quantized(path, tp_size=N)`` builds.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..dtypes import HALF_DTYPES
from ..kronecker import decompose_dim, npu_supported
from ..layers import W4A4FlatQuantLinear, W8A8DynamicLinear
from ..models import is_row_parallel
from ..models.tp import model_split_problem, vllm_sizes
from .format import LAYER_KEYS, QUANT_TYPE, CheckpointError, is_field

log = logging.getLogger(__name__)

_PER_TENSOR = ("left_trans", "right_trans", "clip_ratio")  # FlatQuant's per-tensor parameters: copied whole


@dataclass
class TPCheck:
    """One tensor-parallel size: whether vLLM loads the checkpoint, why not, and the rank-by-rank agreement."""

    tp_size: int
    loads: bool
    problem: str = ""  # the first failing tensor, in words
    worst_rel_diff: float | None = None  # max over quantized linears of ||y_ranks - y_loaded|| / ||y_loaded||
    worst_linear: str = ""
    linears: int = 0

    def line(self) -> str:
        if not self.loads:
            return f"TP {self.tp_size}: does not load: {self.problem}"
        diff = "n/a" if self.worst_rel_diff is None else f"{self.worst_rel_diff:.3g}"
        return (f"TP {self.tp_size}: loads; {self.linears} quantized linears run rank by rank, worst relative "
                f"difference to load_quantized {diff}" + (f" ({self.worst_linear})" if self.worst_linear else ""))


def _shape(t) -> str:
    return str(list(t.shape))


def _layers(desc: Mapping) -> dict[str, str]:
    return {k[: -len(".weight")]: v for k, v in desc.items()
            if not is_field(k, v) and k.endswith(".weight") and v in LAYER_KEYS}


def vllm_load_problem(tensors: Mapping[str, torch.Tensor], desc: Mapping, config: Mapping, tp: int,
                      cann: str = "8.3") -> str:
    """The first reason vLLM (with vllm-ascend) would fail to load or run the checkpoint at TP ``tp``, in
    words; ``""`` when it loads. Checks the shape asserts and splits of docs/tensor-parallel.md, and that each rank's
    FlatQuant transform is one ``npu_kronecker_quant`` runs (CANN ``cann``)."""
    problem = model_split_problem(config, tp)
    if problem:
        return problem
    for prefix, kind in sorted(_layers(desc).items()):
        w = tensors[f"{prefix}.weight"]
        out_f, in_f = w.shape
        if is_row_parallel(prefix):
            if in_f % tp:
                return f"{prefix}.weight: its {in_f} input columns do not split over {tp} ranks"
            k_rank = in_f // tp
        else:
            k_rank = in_f
        if kind != QUANT_TYPE:
            continue  # W8A8_DYNAMIC: every tensor is narrowed or per channel; nothing per-tensor to assert
        n1, n2 = decompose_dim(k_rank)
        for name, want in (("left_trans", (n1, n1)), ("right_trans", (n2, n2))):
            have = tensors[f"{prefix}.{name}"]
            if tuple(have.shape) != want:
                return (f"{prefix}.{name}: vLLM allocates {list(want)} at TP {tp}, the checkpoint has {_shape(have)}"
                        " (vllm-ascend asserts equal shapes and stops with a bare AssertionError)")
        if k_rank % 8:
            return f"{prefix}.weight: each rank's {k_rank} input columns do not pack into int4 words of 8"
        support = npu_supported(n1, n2, cann)
        if not support:
            return (f"{prefix}: each rank's transform is {n1}x{n2}, which npu_kronecker_quant cannot run "
                    f"({support.reason})")
    return ""


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
    names = LAYER_KEYS[kind] + (("bias",) if f"{prefix}.bias" in tensors else ())
    full = {n: tensors[f"{prefix}.{n}"] for n in names}
    out_f, in_f = full["weight"].shape
    if is_row_parallel(prefix):
        k = in_f // tp
        part = {n: (t[:, rank * k:(rank + 1) * k] if n == "weight" else t) for n, t in full.items()}
        if rank != 0:
            part.pop("bias", None)  # vLLM adds a row-parallel bias on rank 0 only
        return part
    rows = _column_rows(prefix, out_f, tp, rank, config)
    return {n: (t if n in _PER_TENSOR else t[rows]) for n, t in full.items()}


def _rank_layer(kind: str, parts: dict, act: torch.dtype):
    if kind == QUANT_TYPE:
        return W4A4FlatQuantLinear.from_checkpoint(parts, backend="reference", act_dtype=act)
    return W8A8DynamicLinear.from_checkpoint(parts, act_dtype=act, backend="reference")


@torch.no_grad()
def ranks_output(prefix: str, kind: str, tensors: Mapping[str, torch.Tensor], x: torch.Tensor, tp: int,
                 config: Mapping) -> torch.Tensor:
    """One linear's output at TP ``tp``, computed rank by rank from the narrowed tensors: row-parallel
    partial outputs summed in fp32 and rounded once; column-parallel ones placed at their rows."""
    act = x.dtype
    out_f, in_f = tensors[f"{prefix}.weight"].shape
    if is_row_parallel(prefix):
        k = in_f // tp
        total = None
        for r in range(tp):
            y = _rank_layer(kind, _rank_tensors(prefix, kind, tensors, tp, r, config), act)(x[:, r * k:(r + 1) * k])
            total = y.float() if total is None else total + y.float()
        return total.to(act)
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
    from .load import _alias_packed, _read_json, _read_tensors, description_path, load_quantized

    path = Path(path)
    for tp in tp_sizes:
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tp_sizes: expected positive ints, got {tp!r}")
    config = _read_json(path / "config.json", "model config")
    desc = _read_json(description_path(path), "msModelSlim description")
    tensors = _read_tensors(path)
    _alias_packed(tensors, desc)
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
            act = layer.act_dtype if layer.act_dtype in HALF_DTYPES else torch.bfloat16
            x = torch.randn(tokens, layer.in_features, generator=g).to(act)
            want = layer(x)
            got = ranks_output(prefix, kind, tensors, x, tp, config)
            rel = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
            if worst is None or rel > worst:
                worst, worst_name = rel, (prefix if rel > 0 else "")
        results.append(TPCheck(tp, True, "", worst, worst_name, len(layers)))
    return results


def results_json(results: Sequence[TPCheck]) -> str:
    return json.dumps([asdict(r) for r in results], indent=1)


__all__ = ["CheckpointError", "TPCheck", "model_split_problem", "ranks_output", "results_json", "serve_check",
           "vllm_load_problem"]
