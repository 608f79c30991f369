"""Qwen2 / Qwen2.5: the Llama layout, with biases on q/k/v (the bias divides with v_proj's rows)."""
from __future__ import annotations

from .llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    model_types = ("qwen2",)
    description = "Qwen2, Qwen2.5"
