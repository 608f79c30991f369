"""Whether vLLM can split a model over tensor-parallel ranks, from its config alone (docs/tensor-parallel.md)."""
from __future__ import annotations

from typing import Mapping


def vllm_sizes(config: Mapping) -> dict:
    """The sizes vLLM splits at TP N: attention heads, kv heads, head_dim and the MLP's intermediate size."""
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return {"heads": heads, "kv": kv, "head_dim": head_dim, "intermediate": config["intermediate_size"]}


def model_split_problem(config: Mapping, tp: int) -> str:
    """Why vLLM cannot split a model of ``config`` (a config.json mapping) over ``tp`` ranks; ``""`` if it can.

    Heads and the intermediate size split evenly; kv heads split evenly, or are replicated when fewer than ``tp``.
    """
    s = vllm_sizes(config)
    if s["heads"] % tp:
        return f"vLLM cannot split {s['heads']} attention heads over {tp} ranks"
    if s["kv"] >= tp and s["kv"] % tp:
        return f"vLLM cannot split {s['kv']} kv heads over {tp} ranks"
    if s["kv"] < tp and tp % s["kv"]:
        return f"vLLM cannot replicate {s['kv']} kv heads over {tp} ranks"
    if s["intermediate"] % tp:
        return f"vLLM cannot split intermediate size {s['intermediate']} over {tp} ranks"
    return ""
