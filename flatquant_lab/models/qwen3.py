"""Qwen3: the Llama layout plus per-head ``q_norm`` / ``k_norm`` after q_proj / k_proj.

Those norms act after the projections, per head, on q and k only: the input transform of q/k/v and
the smoothing folded into v_proj's rows (o_proj's) are unaffected.
"""
from __future__ import annotations

from .llama import LlamaAdapter


class Qwen3Adapter(LlamaAdapter):
    model_types = ("qwen3",)
    description = "Qwen3 (dense)"
