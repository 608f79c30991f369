"""Checkpoints in the format vllm-ascend serves: the contract (``format``), ``save``, ``load``.

    from flatquant_lab.io import save_quantized, load_quantized
"""
from __future__ import annotations

from .format import (
    DESCRIPTION_FILE, FLOAT_TYPE, QUANT_TYPE, CheckpointError, build_description, check_checkpoint,
)
from .load import load_quantized
from .save import checkpoint_state, save_quantized
from .serving import TPCheck, serve_check, vllm_load_problem

__all__ = [
    "CheckpointError", "DESCRIPTION_FILE", "FLOAT_TYPE", "QUANT_TYPE", "build_description", "check_checkpoint",
    "checkpoint_state", "load_quantized", "save_quantized", "serve_check", "TPCheck", "vllm_load_problem",
]
