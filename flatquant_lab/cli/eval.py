"""``flatquant-lab eval``: a float or quantized model through lm-eval (model in memory, offline).

Flags are ``--hyphen-case``; lm-eval's own spellings (``--batch_size``, ``--max_length``,
``--num_fewshot``, ``--output_path``, ``--include_path``, ``--log_samples``) are accepted too.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import ops
from ..eval import SPEC_WINDOWS, evaluate, format_results, token_perplexity
from .args import batch_size_arg, device_arg, int_at_least, limit_arg, non_negative_int, positive_int

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
    src.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                     help="model dtype, e.g. float32, bfloat16 (default: float32 for --model, the saved one "
                          "for --quantized)")
    src.add_argument("--device", type=device_arg, default=None,
                     help="where the model is loaded and run: cpu, cuda, cuda:N, npu, npu:N (default: cpu)")
    src.add_argument("--num-layers", type=positive_int, default=None,
                     help="keep only the first N decoder layers of --model (quick checks)")
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
                    help="also print token perplexity (40 windows of 512 of the bundled eval set, SPEC section 9's windowing)")


def _load_for_cli(args):
    from transformers import AutoTokenizer

    if bool(args.model) == bool(args.quantized):
        raise SystemExit("flatquant-lab eval: give exactly one of --model ALIAS|DIR or --quantized DIR")
    if args.quantized:
        from ..io import load_quantized

        qdir = Path(args.quantized)
        if not qdir.is_dir():
            raise SystemExit(f"flatquant-lab eval: --quantized {qdir} is not a directory")
        if args.num_layers is not None:
            raise SystemExit("flatquant-lab eval: --num-layers applies to --model only")
        model = load_quantized(qdir, backend=args.backend, dtype=args.dtype, device=args.device)
        tokenizer = AutoTokenizer.from_pretrained(str(qdir), local_files_only=True)
        return model, tokenizer
    from ..hub import load_model

    if args.backend is not None:
        raise SystemExit("flatquant-lab eval: --backend applies to --quantized only")
    return load_model(args.model, dtype=args.dtype or torch.float32, num_layers=args.num_layers, device=args.device)


def run(args) -> int:
    model, tokenizer = _load_for_cli(args)
    results = evaluate(model, tokenizer, tasks=args.tasks, limit=args.limit, batch_size=args.batch_size,
                       max_length=args.max_length, num_fewshot=args.num_fewshot, output_path=args.output_path,
                       include_path=args.include_path, log_samples=args.log_samples)
    print(format_results(results))
    if args.token_perplexity:
        t0 = time.time()
        ppl = token_perplexity(model, tokenizer, window=512, max_windows=SPEC_WINDOWS)
        print(f"token perplexity (bundled eval set, {SPEC_WINDOWS} windows of 512): {ppl:.4f} "
              f"[{time.time() - t0:.0f} s]")
    return 0
