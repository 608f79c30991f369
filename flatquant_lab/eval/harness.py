"""lm-eval with the model in memory, fully offline: the bundled tasks, or any task whose data is cached.

    from flatquant_lab.eval import evaluate
    results = evaluate(model, tokenizer, tasks=("wiki_fq_eval",), limit=2)   # lm-eval's results dict

The bundled tasks ``wiki_fq_eval`` / ``wiki_fq_calib`` (``flatquant_lab/eval/tasks``) read the package's
own jsonl files. Standard lm-eval tasks work only when their dataset is already in the local
Hugging Face datasets cache: nothing is downloaded (the offline switch is set), and a missing dataset
raises :class:`DatasetUnavailableError` saying how to supply it.

One ``tqdm.auto`` bar per call (a widget in Jupyter) replaces lm-eval's plain per-window bars, and
lm-eval's notes about what is expected here (a model passed in memory, a task built from our own
loader) are logged at DEBUG; nothing of lm-eval's reaches stderr unless it is a real warning.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from ..files import atomic_write_text
from ..offline import offline

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
BUNDLED_TASKS = ("wiki_fq_eval", "wiki_fq_calib")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
# lm-eval's warnings that describe exactly how this module calls it: (logger, part of the message).
EXPECTED_NOTES = (
    ("lm_eval.models.huggingface", "`pretrained` model kwarg is not of type `str`"),
    ("lm_eval.models.huggingface", "Passed an already-initialized model through `pretrained`"),
    ("lm_eval.api.task", "Custom kwargs can be passed to `--metadata`"),
)


class DatasetUnavailableError(RuntimeError):
    """An lm-eval task's dataset is not on this machine and cannot be downloaded here."""


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


class _AsDebug(logging.Filter):
    """Re-level lm-eval's expected notes to DEBUG: a handler at WARNING (Python's default) then drops them."""

    def __init__(self, prefixes: Sequence[str]):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if any(p in msg for p in self.prefixes):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def package_git_hash() -> str | None:
    """``git describe --always`` of the checkout holding flatquant_lab, or None (not a git checkout, no git)."""
    try:
        out = subprocess.run(["git", "describe", "--always"], cwd=PACKAGE_DIR, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


@functools.cache
def _hflm_class():
    """lm-eval's HFLM, with its plain tqdm bars off and one ``tqdm.auto`` bar per request type instead."""
    from lm_eval.models.huggingface import HFLM
    from tqdm.auto import tqdm

    class ProgressHFLM(HFLM):
        # Set by evaluate(): whether to show the bar, and a label for it.
        show_progress = True
        progress_label = "lm-eval"
        _bar = None
        _bar_counts_tokens = False

        @contextlib.contextmanager
        def _progress(self, total: int, unit: str):
            self._bar = tqdm(total=total, unit=unit, desc=self.progress_label, disable=not self.show_progress,
                             dynamic_ncols=True)
            self._bar_counts_tokens = unit == "tok"
            try:
                yield self._bar
            finally:
                self._bar.close()
                self._bar = None

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            res = super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
            if self._bar is not None:
                # a request is (cache key, context tokens, continuation tokens); rolling windows are disjoint,
                # so their continuations add up to each document's token count
                self._bar.update(sum(len(r[2]) for r in requests) if self._bar_counts_tokens else len(requests))
            return res

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            total = sum(len(self.tok_encode(req.args[0])) for req in requests)
            with self._progress(total, "tok"):
                return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            with self._progress(len(requests), "req"):
                return super().loglikelihood(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            # HFLM updates its bar inside its loop; ours moves once, at the end, but never prints plain text
            with self._progress(len(requests), "req") as bar:
                out = super().generate_until(requests, disable_tqdm=True)
                bar.update(len(requests))
            return out

    return ProgressHFLM


_ENV_INFO: dict[str, dict] = {}


def _add_env_info_once(add_env_info, storage: dict) -> None:
    """lm-eval's environment record, gathered once per process and working directory: gathering it runs
    torch's collect_env (pip and a dozen subprocesses, ~1.5 s) on every evaluation otherwise."""
    key = os.getcwd()
    if key not in _ENV_INFO:
        record: dict = {}
        add_env_info(record)
        _ENV_INFO[key] = record
    storage.update(copy.deepcopy(_ENV_INFO[key]))


@contextlib.contextmanager
def _quiet_lm_eval():
    """While lm-eval runs: expected notes at DEBUG, no plain bars, no git stderr from the working directory."""
    import datasets
    import lm_eval.api.task as lm_task
    import lm_eval.evaluator as lm_evaluator
    from tqdm import tqdm as plain_tqdm

    filters = {}
    for name, prefix in EXPECTED_NOTES:
        filters.setdefault(name, []).append(prefix)
    attached = [(logging.getLogger(name), _AsDebug(prefixes)) for name, prefixes in filters.items()]
    # lm-eval wraps each task's documents in a plain tqdm with no switch, and asks `git describe` in the
    # working directory without capturing its stderr ("fatal: not a git repository" outside a checkout).
    saved = (lm_task.tqdm, lm_evaluator.get_git_commit_hash, lm_evaluator.add_env_info)
    bars_were_on = datasets.is_progress_bar_enabled()
    lm_task.tqdm = functools.partial(plain_tqdm, disable=True)
    lm_evaluator.get_git_commit_hash = package_git_hash
    lm_evaluator.add_env_info = functools.partial(_add_env_info_once, saved[2])
    datasets.disable_progress_bars()  # "Generating train split" the first time a task is read
    for logger, filt in attached:
        logger.addFilter(filt)
    try:
        yield
    finally:
        for logger, filt in attached:
            logger.removeFilter(filt)
        lm_task.tqdm, lm_evaluator.get_git_commit_hash, lm_evaluator.add_env_info = saved
        if bars_were_on:
            datasets.enable_progress_bars()


def evaluate(model, tokenizer, tasks: Sequence[str] | str = ("wiki_fq_eval",), limit: float | None = None,
             batch_size: int | str = 1, max_length: int = 512, num_fewshot: int | None = None,
             output_path: str | os.PathLike | None = None, include_path=None, log_samples: bool = False,
             bootstrap_iters: int = 0, random_seed: int = 0, progress: bool | str = True,
             **simple_evaluate_kwargs) -> dict:
    """Run lm-eval's ``simple_evaluate`` on the in-memory ``model``; return lm-eval's results dict.

    ``tasks``: names (or one comma-separated string); the bundled ``wiki_fq_eval`` / ``wiki_fq_calib``
    or any lm-eval task whose data is cached locally. ``limit``: documents per task (a float < 1 is a
    fraction). ``max_length``: the rolling-window length for perplexity tasks. ``output_path``: a
    ``.json`` file, or a folder that receives ``results_<time>.json``. ``bootstrap_iters=0`` skips
    lm-eval's bootstrap standard errors (the perplexity metrics have none anyway). ``progress``: one
    ``tqdm.auto`` bar over the scored tokens (True, or a str to label it), or none (False); the git
    hash lm-eval records is flatquant_lab's checkout's (``package_git_hash``).
    """
    from ..extras import require

    lm_eval = require("lm_eval", "eval", "lm-eval evaluation")
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks: expected at least one task name")
    if not hasattr(model, "config"):
        raise TypeError(f"model: expected a Hugging Face causal LM (with .config), got {type(model).__name__}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length: expected an int >= 2, got {max_length!r}")
    if not isinstance(progress, (bool, str)):
        raise TypeError(f"progress: expected True, False or a label (str), got {type(progress).__name__}")
    with offline(), _quiet_lm_eval():
        tm = task_manager(tasks, include_path)
        _load_tasks(tm, tasks)
        lm = _hflm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                           backend="causal")
        lm.show_progress = bool(progress)
        lm.progress_label = progress if isinstance(progress, str) else f"lm-eval {','.join(tasks)}"
        t0 = time.time()
        results = _simple_evaluate(lm_eval, lm, tasks, tm, num_fewshot=num_fewshot, limit=limit,
                                   log_samples=log_samples, bootstrap_iters=bootstrap_iters,
                                   random_seed=random_seed, **simple_evaluate_kwargs)
    log.info("lm-eval %s took %.1f s", tasks, time.time() - t0)
    if output_path is not None:
        write_results(results, output_path)
    return results


def _simple_evaluate(lm_eval, lm, tasks, tm, num_fewshot, limit, log_samples, bootstrap_iters, random_seed,
                     **simple_evaluate_kwargs) -> dict:
    try:
        return lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
            log_samples=log_samples, bootstrap_iters=bootstrap_iters, random_seed=random_seed,
            numpy_random_seed=random_seed, torch_random_seed=random_seed, fewshot_random_seed=random_seed,
            **simple_evaluate_kwargs,
        )
    except Exception as exc:
        if _is_offline_error(exc):
            raise _unavailable(",".join(tasks), exc) from exc
        raise


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
