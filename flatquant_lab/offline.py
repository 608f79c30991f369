"""The one offline switch: nothing in flatquant_lab reaches the network.

The Hugging Face libraries read ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` / ``TRANSFORMERS_OFFLINE``
once, at import time, so :func:`set_offline_env` runs when this module is imported (import it before
transformers, datasets or lm-eval); :func:`force_offline` also flips the flags of libraries that were
imported earlier.
"""
from __future__ import annotations

import os

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def set_offline_env() -> None:
    """Set the offline variables (a user's explicit setting wins)."""
    for var in OFFLINE_VARS:
        os.environ.setdefault(var, "1")


def force_offline() -> None:
    """Offline mode even if ``datasets`` / ``huggingface_hub`` were imported before the variables were set."""
    set_offline_env()
    import huggingface_hub.constants as hub_constants

    hub_constants.HF_HUB_OFFLINE = True
    try:
        import datasets  # an optional dependency (the eval extra)
    except ModuleNotFoundError:
        return
    datasets.config.HF_DATASETS_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True


set_offline_env()
