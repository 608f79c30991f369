"""``flatquant-lab`` command line: a thin layer over the package API.

Each subcommand lives in its own module here, which provides ``add_arguments(parser)`` (argument
parsing only) and ``run(args)`` (calls into the package API); a module is imported only when its
subcommand runs, so ``flatquant-lab check`` never loads lm-eval. Flags are ``--hyphen-case``; ``--help`` shows
each one's default; the global ``-v`` and ``--threads`` go before or after the command.

A user's mistake (an API error whose message starts with the parameter it concerns, e.g. ``out_dir: ...``) ends
with one line on stderr naming the flag (``--out: ...``) and exit code 2; ``-v`` also prints its traceback.
Anything else is a bug and keeps its traceback. Logging: this package's INFO lines and every library's
warnings; ``-v``: every library's DEBUG lines too.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
import traceback

from .args import CLIExit, HelpFormatter, UsageError, positive_int

# command -> (its module under flatquant_lab.cli, help); only the command that runs is imported.
COMMANDS = {
    "check": ("check", "report the int4 path of one layer against its references"),
    "quantize": ("quantize", "quantize a Hugging Face model and export it for vllm-ascend"),
    "eval": ("eval", "evaluate a float or quantized model with lm-eval"),
    "serve-check": ("serve_check", "emulate how vLLM loads a checkpoint at tensor-parallel size N, rank by rank"),
    "build-data": ("build_data", "rebuild the bundled wiki_*.jsonl from gensim's Wikipedia test data"),
    "demo": ("demo", "the main job: FP vs W4A16 RTN vs W4A4 RTN / Hadamard / FlatQuant"),
}


# API parameter names as the CLI spells them, for error messages (per command where they differ).
FLAGS = {
    "name_or_dir": "--model", "model": "--model", "num_layers": "--num-layers", "dtype": "--dtype",
    "device": "--device", "out_dir": "--out", "overwrite": "--overwrite", "tp_size": "--tp-size",
    "samples": "--samples", "n_samples": "--samples", "seqlen": "--seqlen", "epochs": "--epochs", "lr": "--lr",
    "e2e_epochs": "--e2e-epochs", "e2e_holdout": "--samples", "work_dir": "--work-dir", "skip": "--skip",
    "recipe": "--recipe", "fallback": "--fallback", "activations": "--activations", "seed": "--seed", "source": "--calib-data",
    "calib_data": "--calib-data", "method": "--method", "weight_quantizer": "--weight-quantizer",
    "profile": "--profile", "tasks": "--tasks", "limit": "--limit", "batch_size": "--batch-size",
    "max_length": "--max-length", "num_fewshot": "--num-fewshot", "output_path": "--output-path",
    "include_path": "--include-path", "backend": "--backend", "threads": "--threads",
}
COMMAND_FLAGS = {"serve-check": {"tp_sizes": "--tp", "tp_size": "--tp", "path": "DIR", "tokens": "--tokens"},
                 "eval": {"path": "--quantized"},
                 "build-data": {"out_dir": "--out-dir", "name_or_dir": "--model"}}
# Errors that are the user's to fix when their message starts with the parameter they concern ("out_dir: ...").
USER_ERRORS = (ValueError, TypeError, FileExistsError, FileNotFoundError, NotADirectoryError, ModuleNotFoundError,
               RuntimeError)
_PARAM = re.compile(r"^(--)?[A-Za-z_][\w.-]*: ")


def as_flags(message: str, command: str) -> str:
    """``message`` with the API's parameter names spelled as this command's flags: ``out_dir: ... (pass
    overwrite=True ...)`` -> ``--out: ... (pass --overwrite ...)``, ``QuantConfig(tp_size=2)`` -> ``--tp-size 2``."""
    flags = {**FLAGS, **COMMAND_FLAGS.get(command, {})}
    message = " ".join(message.split())  # one line
    head, sep, rest = message.partition(": ")
    if sep and head in flags:
        message = f"{flags[head]}: {rest}"
    message = re.sub(r"\bQuantConfig\((\w+)=([^),]+)\)",
                     lambda m: f"{flags[m[1]]} {m[2]}" if m[1] in flags else m[0], message)
    message = re.sub(r"\boverwrite=True\b", flags["overwrite"], message)
    return re.sub(r"(?<![\w-])(\w+)=(?=[\w'\"(\[{-])",
                  lambda m: f"{flags[m[1]]} " if m[1] in flags else m[0], message)


def _setup_logging(verbose: bool) -> None:
    """Our INFO lines (and everyone's warnings) on stderr; with ``-v`` every library's DEBUG lines too. Left
    alone when logging is already set up (a test runner, a notebook, a program calling ``main``)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("flatquant_lab").setLevel(logging.DEBUG if verbose else logging.INFO)


def _global_flags(parser, defaults: bool) -> None:
    """-v and --threads: accepted before the command (``defaults``: the top-level parser) and after it."""
    kw = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, every library's included, and tracebacks of errors", **kw)
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's own; on a busy "
                        "machine 1 is often faster)", **({"default": None} if defaults else kw))


def build_parser(command: str | None = None):
    """``(parser, module)``: the top-level parser with ``command``'s flags added (only that command's module is
    imported), and that module (None without a command)."""
    parser = argparse.ArgumentParser(prog="flatquant-lab", description="W4A4 FlatQuant quantization of LLMs for "
                                     "vllm-ascend: quantize, evaluate, check serving. Global flags (-v, --threads) go "
                                     "before or after the command.",
                                     formatter_class=HelpFormatter)
    _global_flags(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    module = None
    for name, (modname, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name == command:
            module = importlib.import_module(f"{__name__}.{modname}")
            module.add_arguments(p)
            _global_flags(p, defaults=False)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Find the command name first so that only that command's module is imported.
    parser, module = build_parser(next((a for a in argv if a in COMMANDS), None))
    args = parser.parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    _setup_logging(args.verbose)
    try:
        return int(module.run(args) or 0)
    except CLIExit:
        raise
    except SystemExit as exc:  # a command's own "flag: what is wrong" exit
        if not isinstance(exc.code, str):
            raise
        _fail(args, exc.code, exc)
    except UsageError as exc:  # worded for the command line already
        _fail(args, str(exc), exc)
    except USER_ERRORS as exc:
        text = str(exc)
        if not _PARAM.match(text):
            raise  # not worded as a user's mistake: a bug, with its traceback
        _fail(args, as_flags(text, args.command), exc)


def _fail(args, message: str, exc: BaseException):
    """One line on stderr (the traceback too with -v), and exit code 2."""
    prefix = f"flatquant-lab {args.command}: error: "
    line = message if message.startswith("flatquant-lab ") else prefix + message
    if args.verbose:
        traceback.print_exception(exc)
    print(line, file=sys.stderr)
    raise CLIExit(line) from None


if __name__ == "__main__":
    sys.exit(main())
