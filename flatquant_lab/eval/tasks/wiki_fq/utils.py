"""Loader and metrics of the ``wiki_fq_*`` perplexity tasks (lm-eval, fully offline).

The documents are the jsonl files beside this file (built by ``flatquant-lab build-data``), read
with ``datasets``' local json builder; nothing is downloaded. The metrics follow lm-eval's
``wikitext`` task: word perplexity, byte perplexity and bits per byte of each whole document,
scored with ``loglikelihood_rolling``.
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
SPLITS = ("calib", "eval")


def load(split: str = "eval", **_metadata):
    """``DatasetDict({"test": ...})`` of ``wiki_<split>.jsonl``; lm-eval passes the task metadata too."""
    import datasets

    from flatquant_lab.offline import offline

    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    path = HERE / f"wiki_{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"split: {path} is missing; rebuild it with `flatquant-lab build-data`")
    with offline():
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    return datasets.DatasetDict({"test": ds})


def doc_to_target(doc) -> str:
    return doc["text"]


def process_results(doc, results):
    (loglikelihood,) = results
    text = doc["text"]
    words = len(text.split())
    nbytes = len(text.encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, nbytes),
        "bits_per_byte": (loglikelihood, nbytes),
    }
