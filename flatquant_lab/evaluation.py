"""Evaluate a float or quantized model, offline: lm-eval with the model in memory, and token perplexity.

    from flatquant_lab.evaluation import evaluate, token_perplexity
    results = evaluate(model, tokenizer, tasks=("wiki_fq_eval",), limit=2)   # lm-eval's results dict
    ppl = token_perplexity(model, tokenizer, bundled_data_path("eval"))      # SPEC section 9's windowing

CLI: ``flatquant-lab eval --model smollm2-135m --tasks wiki_fq_eval [--limit N]`` or
``flatquant-lab eval --quantized out/ --backend reference``; prints lm-eval's table.

The bundled tasks ``wiki_fq_eval`` / ``wiki_fq_calib`` (``flatquant_lab/tasks``) read the package's
own jsonl files. Standard lm-eval tasks work only when their dataset is already in the local
Hugging Face datasets cache: nothing is downloaded (the offline switches are set here), and a
missing dataset raises :class:`DatasetUnavailableError` saying how to supply it.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

# The Hugging Face libraries read these once, at import time: set them before any is imported.
for _var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from . import ops  # noqa: E402
from ._io import atomic_write_text  # noqa: E402

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
BUNDLED_TASKS = ("wiki_fq_eval", "wiki_fq_calib")
# SPEC section 9's windowing: 40 non-overlapping windows of 512 tokens (20,440 predicted tokens). Its
# figures came from another split of these pages (held out after page 74; ours is articles 75-79 only),
# so numbers measured here are comparable among themselves, not to its table.
SPEC_WINDOWS = 40


class DatasetUnavailableError(RuntimeError):
    """An lm-eval task's dataset is not on this machine and cannot be downloaded here."""


def _force_offline() -> None:
    """Offline mode even if datasets / huggingface_hub were imported before the variables were set."""
    import datasets
    import huggingface_hub.constants as hub_constants

    datasets.config.HF_DATASETS_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    hub_constants.HF_HUB_OFFLINE = True


# ---------------------------------------------------------------------------------- token perplexity
@torch.no_grad()
def token_perplexity(model, tokenizer, docs=None, window: int = 512, max_windows: int | None = SPEC_WINDOWS,
                     batch_size: int = 1) -> float:
    """Perplexity over non-overlapping ``window``-token windows of the concatenated documents.

    ``docs``: what :func:`flatquant_lab.data.load_texts` takes (a jsonl/text path, a list of str, a
    ``datasets.Dataset``); ``None`` means the bundled eval set. Documents are joined with the EOS
    token, the first ``max_windows`` full windows are scored (``None``: all of them; the incomplete
    tail is never scored), and the result is ``exp(mean NLL)`` over every predicted token
    (``window - 1`` per window). The default, 40 windows of 512, is SPEC section 9's windowing
    (on our split of the pages, so not its numbers).
    """
    from .data import bundled_data_path, concat_token_ids, load_texts

    for name, val in (("window", window), ("batch_size", batch_size)):
        if isinstance(val, bool) or not isinstance(val, int) or val < (2 if name == "window" else 1):
            raise ValueError(f"{name}: expected an int >= {2 if name == 'window' else 1}, got {val!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                    or max_windows < 1):
        raise ValueError(f"max_windows: expected a positive int or None, got {max_windows!r}")
    ids = concat_token_ids(load_texts(bundled_data_path("eval") if docs is None else docs), tokenizer)
    n = ids.numel() // window
    if n == 0:
        raise ValueError(f"docs: {ids.numel()} tokens, fewer than one window of {window}")
    if max_windows is not None:
        if max_windows > n:
            raise ValueError(f"max_windows: the documents give only {n} windows of {window} tokens, "
                             f"{max_windows} were asked for")
        n = max_windows
    windows = ids[: n * window].view(n, window)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for start in tqdm(range(0, n, batch_size), desc="token perplexity", unit="batch"):
            batch = windows[start:start + batch_size].to(device)
            out = model(input_ids=batch)
            logits = out.logits if hasattr(out, "logits") else out[0]
            # float32 log-softmax: a half-precision model's logits would lose the small probabilities.
            nll += F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   batch[:, 1:].reshape(-1), reduction="sum").item()
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    ppl = math.exp(nll / count)
    log.info("token perplexity %.4f over %d predicted tokens (%d windows of %d)", ppl, count, n, window)
    return ppl


def _model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# --------------------------------------------------------------------------------------- lm-eval
def task_manager(tasks: Sequence[str], include_path=None):
    """A TaskManager that knows ``tasks``: only the bundled tasks (fast) when that is enough,
    else lm-eval's full index (about 10 s to build) plus ours and ``include_path``."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + ([str(p) for p in include_path] if isinstance(include_path, (list, tuple))
                                else [str(include_path)] if include_path else [])
    tm = TaskManager(include_path=paths, include_defaults=False)
    if all(t in tm.all_tasks for t in tasks):
        return tm
    tm = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise ValueError(f"tasks: unknown lm-eval task(s) {unknown}; the bundled ones are {list(BUNDLED_TASKS)}; "
                         "others must be lm-eval tasks or YAML under --include_path")
    return tm


def _is_offline_error(exc: BaseException) -> bool:
    markers = ("OfflineModeIsEnabled", "is not cached", "Couldn't reach", "offline mode", "LocalEntryNotFound",
               "DatasetNotFound", "outgoing traffic has been disabled")
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = type(exc).__name__
        if isinstance(exc, ConnectionError) or name in ("OfflineModeIsEnabled", "LocalEntryNotFoundError",
                                                        "DatasetNotFoundError"):
            return True
        if any(m in str(exc) for m in markers):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _unavailable(task: str, exc: BaseException) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"tasks: the dataset of lm-eval task {task!r} is not available on this machine and cannot be "
        f"downloaded here (no network; HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 are set). "
        "To supply it, copy the dataset into the Hugging Face datasets cache (HF_HOME / HF_DATASETS_CACHE, as "
        "created by `datasets.load_dataset` on a machine with access), or write a task YAML whose dataset is "
        "local (e.g. `dataset_path: json` with `dataset_kwargs: {data_files: ...}`) and pass its folder as "
        f"--include_path; the bundled tasks {list(BUNDLED_TASKS)} need nothing. (original error: {exc})"
    )


def _load_tasks(tm, tasks: Sequence[str]) -> None:
    """Instantiate each task once up front, so that a missing dataset is reported by task name."""
    for name in tasks:
        try:
            tm.load([name])
        except Exception as exc:
            if _is_offline_error(exc):
                raise _unavailable(name, exc) from exc
            raise


def evaluate(model, tokenizer, tasks: Sequence[str] | str = ("wiki_fq_eval",), limit: float | None = None,
             batch_size: int | str = 1, max_length: int = 512, num_fewshot: int | None = None,
             output_path: str | os.PathLike | None = None, include_path=None, log_samples: bool = False,
             bootstrap_iters: int = 0, random_seed: int = 0, **simple_evaluate_kwargs) -> dict:
    """Run lm-eval's ``simple_evaluate`` on the in-memory ``model``; return lm-eval's results dict.

    ``tasks``: names (or one comma-separated string); the bundled ``wiki_fq_eval`` / ``wiki_fq_calib``
    or any lm-eval task whose data is cached locally. ``limit``: documents per task (a float < 1 is a
    fraction). ``max_length``: the rolling-window length for perplexity tasks. ``output_path``: a
    ``.json`` file, or a folder that receives ``results_<time>.json``. ``bootstrap_iters=0`` skips
    lm-eval's bootstrap standard errors (the perplexity metrics have none anyway).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    _force_offline()
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks: expected at least one task name")
    if not hasattr(model, "config"):
        raise TypeError(f"model: expected a Hugging Face causal LM (with .config), got {type(model).__name__}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length: expected an int >= 2, got {max_length!r}")
    tm = task_manager(tasks, include_path)
    _load_tasks(tm, tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
              backend="causal")
    t0 = time.time()
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
            log_samples=log_samples, bootstrap_iters=bootstrap_iters, random_seed=random_seed,
            numpy_random_seed=random_seed, torch_random_seed=random_seed, fewshot_random_seed=random_seed,
            **simple_evaluate_kwargs,
        )
    except Exception as exc:
        if _is_offline_error(exc):
            raise _unavailable(",".join(tasks), exc) from exc
        raise
    log.info("lm-eval %s took %.1f s", tasks, time.time() - t0)
    if output_path is not None:
        write_results(results, output_path)
    return results


def write_results(results: dict, output_path) -> Path:
    """Write lm-eval's results as JSON, atomically; a folder gets ``results_<time>.json``."""
    from lm_eval.utils import handle_non_serializable

    path = Path(output_path)
    if path.suffix != ".json":
        path = path / f"results_{time.strftime('%Y-%m-%dT%H-%M-%S')}.json"
    atomic_write_text(path, json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    log.info("results written to %s", path)
    return path


def format_results(results: dict) -> str:
    """lm-eval's markdown table(s) for a results dict."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


# ------------------------------------------------------------------------------------------- CLI
# What flatquant_lab.ops resolves: "auto" (npu for tensors on an NPU) or one of its backends.
BACKEND_CHOICES = ("auto", *ops.BACKENDS)


def _limit_arg(text: str) -> int | float:
    """lm-eval's ``limit``: a document count (int >= 1) or a fraction in (0, 1) of each task."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if math.isfinite(v) and 0.0 < v < 1.0:
        return v
    if math.isfinite(v) and v >= 1.0 and v == int(v):
        return int(v)
    raise argparse.ArgumentTypeError(f"expected an int >= 1 (documents per task) or a fraction in (0, 1), "
                                     f"got {text!r}")


def _batch_size_arg(text: str) -> int | str:
    """lm-eval's ``batch_size``: an int >= 1, ``auto``, or ``auto:N`` (N an int >= 1)."""
    head, sep, tail = text.partition(":")
    if head == "auto" and (not sep or (tail.isdigit() and int(tail) >= 1)):
        return text
    if not sep and text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected an int >= 1, 'auto' or 'auto:N' with N an int >= 1, got {text!r}")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}")
        return v
    return parse


def add_arguments(parser) -> None:
    src = parser.add_argument_group("model")
    src.add_argument("--model", help="model alias (smollm2-135m) or local Hugging Face model directory")
    src.add_argument("--quantized", metavar="DIR",
                     help="a quantized model saved by flatquant-lab (loaded with flatquant_lab.export.load_quantized; "
                          "its tokenizer is read from the same folder)")
    src.add_argument("--backend", default=None, choices=BACKEND_CHOICES,
                     help="backend of the quantized linears for --quantized (default: load_quantized's, "
                          "i.e. $FLATQUANT_BACKEND, else auto)")
    src.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                     help="model dtype, e.g. float32, bfloat16 (default: float32 for --model, the saved one "
                          "for --quantized)")
    src.add_argument("--num_layers", type=_int_at_least(1), default=None,
                     help="keep only the first N decoder layers of --model (quick checks)")
    ev = parser.add_argument_group("lm-eval (same names as the lm_eval CLI)")
    ev.add_argument("--tasks", default="wiki_fq_eval",
                    help="comma-separated task names (default wiki_fq_eval; also wiki_fq_calib, or any lm-eval "
                         "task whose dataset is already cached locally)")
    ev.add_argument("--limit", type=_limit_arg, default=None,
                    help="documents per task: an int >= 1, or a fraction in (0, 1) of each task's documents; "
                         "for quick checks only")
    ev.add_argument("--batch_size", type=_batch_size_arg, default=1,
                    help="batch size: an int >= 1, 'auto', or 'auto:N' (lm-eval re-detects it N times)")
    ev.add_argument("--max_length", type=_int_at_least(2), default=512, help="context window for perplexity tasks")
    ev.add_argument("--num_fewshot", type=_int_at_least(0), default=None, help="few-shot examples (not used by perplexity)")
    ev.add_argument("--output_path", default=None, help="a .json file or a folder for the results")
    ev.add_argument("--include_path", default=None, help="extra folder of task YAML files")
    ev.add_argument("--log_samples", action="store_true", help="keep per-document outputs in the results")
    ev.add_argument("--token_perplexity", action="store_true",
                    help="also print token perplexity (40 windows of 512 of the bundled eval set, SPEC section 9's windowing)")


def _load_for_cli(args):
    from transformers import AutoTokenizer

    if bool(args.model) == bool(args.quantized):
        raise SystemExit("flatquant-lab eval: give exactly one of --model ALIAS|DIR or --quantized DIR")
    if args.quantized:
        from .export import load_quantized

        qdir = Path(args.quantized)
        if not qdir.is_dir():
            raise SystemExit(f"flatquant-lab eval: --quantized {qdir} is not a directory")
        if args.num_layers is not None:
            raise SystemExit("flatquant-lab eval: --num_layers applies to --model only")
        model = load_quantized(qdir, backend=args.backend, dtype=args.dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(qdir), local_files_only=True)
        return model, tokenizer
    from .hub import load_model

    if args.backend is not None:
        raise SystemExit("flatquant-lab eval: --backend applies to --quantized only")
    return load_model(args.model, dtype=args.dtype or torch.float32, num_layers=args.num_layers)


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
