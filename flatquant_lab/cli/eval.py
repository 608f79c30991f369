"""``flatquant-lab eval``: a float or quantized model through lm-eval (model in memory, offline).

Flags are ``--hyphen-case``; lm-eval's own spellings (``--batch_size``, ``--max_length``,
``--num_fewshot``, ``--output_path``, ``--include_path``, ``--log_samples``) are accepted too.
"""
from __future__ import annotations

import time
from pathlib import Path

from .. import ops
from ..eval import EVAL_WINDOWS, evaluate, format_results, token_perplexity
from .args import (
    DTYPE_CHOICES, UsageError, batch_size_arg, device_arg, int_at_least, limit_arg, non_negative_int, positive_int,
)

# What flatquant_lab.ops resolves: "auto" (npu for tensors on an NPU) or one of its backends.
BACKEND_CHOICES = ("auto", *ops.BACKENDS)


def add_arguments(parser) -> None:
    src = parser.add_argument_group("model")
    src.add_argument("--model", help="model alias (smollm2-135m) or local Hugging Face model directory")
    src.add_argument("--quantized", metavar="DIR",
                     help="a quantized model saved by flatquant-lab (loaded with flatquant_lab.io.load_quantized; "
                          "its tokenizer is read from the same folder)")
    src.add_argument("--backend", default=None, choices=BACKEND_CHOICES,
                     help="backend of the quantized linears for --quantized (default: load_quantized's, "
                          "i.e. $FLATQUANT_BACKEND, else auto)")
    src.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                     help="model dtype; auto: for --model the one its config.json declares (float32 if none; the "
                          "bundled smollm2-135m GGUF: float32), for --quantized the saved one")
    src.add_argument("--device", type=device_arg, default=None,
                     help="where the model is loaded and run: cpu, cuda, cuda:N, npu, npu:N (default: cpu)")
    src.add_argument("--num-layers", type=positive_int, default=None,
                     help="keep only the first N decoder layers of --model (quick checks; default: all)")
    ev = parser.add_argument_group("lm-eval (same names as the lm_eval CLI)")
    ev.add_argument("--tasks", default="wiki_fq_eval",
                    help="comma-separated task names (default wiki_fq_eval; also wiki_fq_calib, or any lm-eval "
                         "task whose dataset is already cached locally)")
    ev.add_argument("--limit", type=limit_arg, default=None,
                    help="documents per task: an int >= 1, or a fraction in (0, 1) of each task's documents; "
                         "for quick checks only")
    ev.add_argument("--batch-size", "--batch_size", type=batch_size_arg, default=1,
                    help="batch size: an int >= 1, 'auto', or 'auto:N' (lm-eval re-detects it N times)")
    ev.add_argument("--max-length", "--max_length", type=int_at_least(2), default=512, help="context window for perplexity tasks")
    ev.add_argument("--num-fewshot", "--num_fewshot", type=non_negative_int, default=None, help="few-shot examples (not used by perplexity)")
    ev.add_argument("--output-path", "--output_path", default=None, help="a .json file or a folder for the results")
    ev.add_argument("--include-path", "--include_path", default=None, help="extra folder of task YAML files")
    ev.add_argument("--log-samples", "--log_samples", action="store_true", help="keep per-document outputs in the results")
    ev.add_argument("--token-perplexity", action="store_true",
                    help="also print token perplexity (40 windows of 512 of the bundled eval set, as in "
                         "docs/results.md, 'The first exploration')")


def _load_for_cli(args):
    from ..hub import load_tokenizer

    if bool(args.model) == bool(args.quantized):
        raise UsageError("--model/--quantized: give exactly one of --model ALIAS|DIR or --quantized DIR")
    if args.quantized:
        from ..io import load_quantized

        qdir = Path(args.quantized)
        if not qdir.is_dir():
            raise UsageError(f"--quantized: {qdir} is not a directory")
        if args.num_layers is not None:
            raise UsageError("--num-layers: applies to --model only")
        tokenizer = load_tokenizer(qdir)  # before the weights: a folder without one fails at once
        model = load_quantized(qdir, backend=args.backend, dtype=None if args.dtype == "auto" else args.dtype,
                               device=args.device)
        return model, tokenizer
    from ..hub import load_model

    if args.backend is not None:
        raise UsageError("--backend: applies to --quantized only")
    return load_model(args.model, dtype=args.dtype, num_layers=args.num_layers, device=args.device)


def run(args) -> int:
    from ..extras import require

    require("lm_eval", "eval", "flatquant-lab eval")  # before the model loads
    model, tokenizer = _load_for_cli(args)
    results = evaluate(model, tokenizer, tasks=args.tasks, limit=args.limit, batch_size=args.batch_size,
                       max_length=args.max_length, num_fewshot=args.num_fewshot, output_path=args.output_path,
                       include_path=args.include_path, log_samples=args.log_samples)
    print(format_results(results))
    if args.token_perplexity:
        t0 = time.time()
        ppl = token_perplexity(model, tokenizer, window=512, max_windows=EVAL_WINDOWS)
        print(f"token perplexity (bundled eval set, {EVAL_WINDOWS} windows of 512): {ppl:.4f} "
              f"[{time.time() - t0:.0f} s]")
    return 0
