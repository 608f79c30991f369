"""Llama-family decoder layers (Llama, SmolLM2, Mistral-style): the layout the other families share.

Per layer ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, ``input_layernorm`` and
``post_attention_layernorm``. Four transforms: q/k/v share one (smoothing folded into
``input_layernorm``), o_proj has one (folded into v_proj's rows, tied across the query heads of a
kv head), gate/up share one (``post_attention_layernorm``), down_proj has one (up_proj's rows).
o_proj and down_proj are row-parallel in vLLM.
"""
from __future__ import annotations

from .base import GroupSpec, ModelAdapter

LLAMA_GROUPS = (
    GroupSpec("attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm",
              "hidden_size", fused_name="qkv_proj"),
    GroupSpec("o", ("self_attn.o_proj",), "self_attn.v_proj", "attn_size", row_parallel=True, kv_tied=True),
    GroupSpec("mlp", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "hidden_size",
              fused_name="gate_up_proj"),
    GroupSpec("down", ("mlp.down_proj",), "mlp.up_proj", "intermediate_size", row_parallel=True),
)


class LlamaAdapter(ModelAdapter):
    model_types = ("llama", "mistral")
    description = "Llama family incl. SmolLM2, and Mistral-style"
    groups = LLAMA_GROUPS
    norms = ("input_layernorm", "post_attention_layernorm")
