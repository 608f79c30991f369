"""``flatquant-lab build-data``: rebuild the bundled wiki_*.jsonl from gensim's Wikipedia test data."""
from __future__ import annotations

from pathlib import Path

from ..wikidata import DATA_DIR, EVAL_START, N_EVAL, build


def add_arguments(parser) -> None:
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR,
                        help="where to write wiki_calib.jsonl and wiki_eval.jsonl (default: the package's copy)")
    parser.add_argument("--eval-start", type=int, default=EVAL_START,
                        help="first evaluation article (0-based, page order)")
    parser.add_argument("--n-eval", type=int, default=N_EVAL,
                        help="evaluation articles from there on; all other articles are for calibration")
    parser.add_argument("--model", default="smollm2-135m",
                        help="tokenizer used to check the token counts (alias or local model dir); "
                             "'none' skips the check")


def run(args) -> int:
    tokenizer = None
    if args.model and args.model.lower() != "none":
        from ..hub import load_tokenizer, resolve

        tokenizer = load_tokenizer(resolve(args.model))
    stats = build(args.out_dir, args.eval_start, args.n_eval, tokenizer)
    for name, s in stats.items():
        print(f"wiki_{name}.jsonl: " + ", ".join(f"{v:,} {k}" for k, v in s.items()))
    return 0
