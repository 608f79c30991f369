"""The offline switch: nothing in flatquant_lab reaches the network.

Importing the package changes nothing. Each of the package's own load calls runs inside
:func:`offline`, which switches the Hugging Face libraries (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``,
``TRANSFORMERS_OFFLINE`` and the flags those libraries read them into at import) to offline for
its duration and restores them on exit; model and tokenizer loads also pass ``local_files_only``.
The CLI, which owns its process, sets the variables once at start (:func:`set_offline_env`).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# (module, attribute, variables it is read from) flags the libraries copy from the variables at import
_FLAGS = (("huggingface_hub.constants", "HF_HUB_OFFLINE", ("HF_HUB_OFFLINE",)),
          ("datasets.config", "HF_DATASETS_OFFLINE", ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")),
          ("datasets.config", "HF_HUB_OFFLINE", ("HF_HUB_OFFLINE",)))


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def set_offline_env() -> None:
    """Set the offline variables for the whole process (a user's explicit setting wins): for the CLI."""
    for var in OFFLINE_VARS:
        os.environ.setdefault(var, "1")


@contextlib.contextmanager
def offline():
    """Inside: offline variables set (a user's explicit setting wins) and the flags of already-imported
    Hugging Face libraries on; every variable and flag is put back as it was on exit."""
    # imported before the variables change, so that its flag keeps what the process had (transformers needs it)
    importlib.import_module("huggingface_hub.constants")

    saved_env = {var: os.environ.get(var) for var in OFFLINE_VARS}
    saved_flags = {}
    try:
        set_offline_env()
        for module_name, attr, _ in _FLAGS:
            module = sys.modules.get(module_name)
            if module is not None and hasattr(module, attr):
                saved_flags[module_name, attr] = getattr(module, attr)
                setattr(module, attr, True)
        yield
    finally:
        for module_name, attr, variables in _FLAGS:
            module = sys.modules.get(module_name)
            if module is None or not hasattr(module, attr):
                continue
            # a library first imported inside read our variables: give it what it would have read outside
            outside = any(_truthy(saved_env[v]) for v in variables)
            setattr(module, attr, saved_flags.get((module_name, attr), outside))
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
