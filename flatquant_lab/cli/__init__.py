"""``flatquant-lab`` command line: a thin layer over the package API.

Each subcommand lives in its own module here, which provides ``add_arguments(parser)`` (argument
parsing only) and ``run(args)`` (calls into the package API); a module is imported only when its
subcommand runs, so ``flatquant-lab check`` never loads lm-eval. Flags are ``--hyphen-case``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command -> (its module under flatquant_lab.cli, help); only the command that runs is imported.
COMMANDS = {
    "check": ("check", "report the int4 path of one layer against its references"),
    "quantize": ("quantize", "quantize a Hugging Face model and export it for vllm-ascend"),
    "eval": ("eval", "evaluate a float or quantized model with lm-eval"),
    "serve-check": ("serve_check", "emulate how vLLM loads a checkpoint at tensor-parallel size N, rank by rank"),
    "build-data": ("build_data", "rebuild the bundled wiki_*.jsonl from gensim's Wikipedia test data"),
    "demo": ("demo", "the main job: FP vs W4A16 RTN vs W4A4 RTN / Hadamard / FlatQuant"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="flatquant-lab", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own; on a busy machine 1 is often faster)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Parse the command name first so that only that command's module is imported.
    wanted = next((a for a in argv if a in COMMANDS), None)
    modules = {}
    for name, (modname, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            modules[name] = importlib.import_module(f"{__name__}.{modname}")
            modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: expected a positive int, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
