"""Evaluation: lm-eval perplexity runs on the model in memory (``harness``), and token perplexity (``perplexity``).

    from flatquant_lab.eval import evaluate, token_perplexity
    results = evaluate(model, tokenizer, tasks=("wiki_fq_eval",), limit=2)   # lm-eval's results dict
    ppl = token_perplexity(model, tokenizer)                                 # 40 windows of 512 tokens
"""
from __future__ import annotations

from .harness import (
    BUNDLED_TASKS, TASKS_DIR, DatasetUnavailableError, evaluate, format_results, task_manager, write_results,
)
from .perplexity import EVAL_WINDOWS, token_perplexity

__all__ = [
    "BUNDLED_TASKS", "DatasetUnavailableError", "EVAL_WINDOWS", "TASKS_DIR", "evaluate", "format_results",
    "task_manager", "token_perplexity", "write_results",
]
