"""Calibration data: the bundled Wikipedia text and random token windows drawn from it.

    from flatquant_lab.data import bundled_data_path, calibration_ids
    ids = calibration_ids(bundled_data_path("calib"), tokenizer, n_samples=32, seqlen=256, seed=0)

The bundled files (``flatquant_lab/eval/tasks/wiki_fq/wiki_{calib,eval}.jsonl``, built by
``flatquant-lab build-data``) and any .jsonl / .json of records are read with the standard library (the
``datasets`` package is needed only for other JSON layouts, or to pass a ``datasets.Dataset``).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .checks import positive_int
from .offline import offline

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "eval" / "tasks" / "wiki_fq"
SPLITS = ("calib", "eval")


def bundled_data_path(split: str) -> Path:
    """Path of the bundled ``wiki_calib.jsonl`` (``split="calib"``) or ``wiki_eval.jsonl`` (``"eval"``)."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    path = DATA_DIR / f"wiki_{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"split: {path} is missing; rebuild it with `flatquant-lab build-data` (make data)")
    return path


def load_jsonl_dataset(path: str | os.PathLike):
    """A local jsonl file as a ``datasets.Dataset`` (never touches the network)."""
    import datasets

    with offline():
        return datasets.load_dataset("json", data_files=str(path), split="train")


def load_texts(source) -> list[str]:
    """Documents from a jsonl/json file (``text`` field), a plain text file (one document), a list
    of strings or a ``datasets.Dataset`` (its ``text`` column, or its only string column)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"source: {str(path)!r} is not a file (expected .jsonl/.json or text)")
        if path.suffix in (".jsonl", ".json"):
            rows = _json_rows(path)
            if rows is None:  # JSON that is not records (e.g. a dict of columns): datasets' reader
                from .extras import require

                require("datasets", "eval", f"reading {path.name} (not one JSON object per record)")
                return _dataset_texts(load_jsonl_dataset(path), f"source {path}")
            return _row_texts(rows, f"source {path}")
        return [path.read_text(encoding="utf-8")]
    if isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        bad = [type(s).__name__ for s in source if not isinstance(s, str)]
        if bad:
            raise TypeError(f"source: expected a list of str, found items of type {sorted(set(bad))}")
        return list(source)
    datasets = sys.modules.get("datasets")  # a Dataset object means datasets is imported already
    if datasets is not None and isinstance(source, datasets.Dataset):
        return _dataset_texts(source, "source")
    raise TypeError(
        f"source: expected a .jsonl/.json/text file path, a list of str or a datasets.Dataset, "
        f"got {type(source).__name__}"
    )


def _json_rows(path: Path) -> list[dict] | None:
    """The records of a .jsonl file (one JSON object per line) or of a .json file holding a list of objects;
    None for any other JSON layout. Read with the standard library (no datasets needed)."""
    text = path.read_text(encoding="utf-8")

    def lines():
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"source: {path} line {n} is not JSON ({exc.msg})") from None
        return rows

    if path.suffix == ".jsonl":
        rows = lines()
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:
            rows = lines()  # JSON lines in a .json file, as datasets reads them
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return None
    return rows


def _row_texts(rows: list[dict], what: str) -> list[str]:
    """The ``text`` field of every record (or their only string field), as ``_dataset_texts`` reads a Dataset."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    if "text" in keys:
        col = "text"
    else:
        strings = [k for k in keys if all(isinstance(r.get(k), str) for r in rows)]
        if len(strings) != 1:
            raise ValueError(f"{what}: expected a 'text' field (or exactly one string field), has {keys}")
        col = strings[0]
    texts = [r.get(col) for r in rows]
    bad = sorted({type(t).__name__ for t in texts if not isinstance(t, str)})
    if bad:
        raise ValueError(f"{what}: expected str in every record's {col!r} field, found {bad}")
    return texts


def _dataset_texts(ds, what: str) -> list[str]:
    cols = ds.column_names
    if "text" in cols:
        col = "text"
    else:
        strings = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        if len(strings) != 1:
            raise ValueError(f"{what}: expected a 'text' column (or exactly one string column), has {cols}")
        col = strings[0]
    return list(ds[col])


def concat_token_ids(texts: Sequence[str], tokenizer, separator: str = "eos") -> torch.Tensor:
    """All documents' token ids in one 1-D tensor, each document followed by the separator.

    ``separator="eos"`` puts the tokenizer's EOS token between documents (``"\\n\\n"`` tokens when it
    has none), so windows that cross a boundary see a document break, not a run-on text.
    """
    if separator == "eos" and tokenizer.eos_token_id is not None:
        sep = [tokenizer.eos_token_id]
    else:
        sep = tokenizer("\n\n" if separator == "eos" else separator, add_special_tokens=False)["input_ids"]
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    ids = [t for doc in encoded for t in (*doc, *sep)]
    return torch.tensor(ids, dtype=torch.long)


def calibration_ids(source, tokenizer, n_samples: int, seqlen: int, seed: int = 0) -> torch.LongTensor:
    """``[n_samples, seqlen]`` token windows at random offsets of the concatenated documents.

    Deterministic for a given ``seed`` (its own ``torch.Generator``; the global RNG is untouched).
    Windows may overlap when ``n_samples * seqlen`` exceeds the text (a warning says so); a text
    shorter than one window is an error, never silently truncated.
    """
    positive_int(n_samples, "n_samples")
    positive_int(seqlen, "seqlen")
    ids = concat_token_ids(load_texts(source), tokenizer)
    total = ids.numel()
    if total < seqlen:
        raise ValueError(
            f"seqlen: the source has {total} tokens, fewer than one window of seqlen={seqlen}; "
            "use a shorter seqlen or more text"
        )
    if n_samples * seqlen > total:
        log.warning("n_samples * seqlen = %d exceeds the %d source tokens: calibration windows will overlap",
                    n_samples * seqlen, total)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
