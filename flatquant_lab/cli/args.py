"""Argument types shared by the subcommands: each rejects bad input at parse time, naming what was expected."""
from __future__ import annotations

import argparse
import math


def int_at_least(low: int):
    """An ``argparse`` type: an int >= ``low``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}")
        return v
    parse.__name__ = f"int>={low}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def limit_arg(text: str) -> int | float:
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


def batch_size_arg(text: str) -> int | str:
    """lm-eval's ``batch_size``: an int >= 1, ``auto``, or ``auto:N`` (N an int >= 1)."""
    head, sep, tail = text.partition(":")
    if head == "auto" and (not sep or (tail.isdigit() and int(tail) >= 1)):
        return text
    if not sep and text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected an int >= 1, 'auto' or 'auto:N' with N an int >= 1, got {text!r}")


def device_arg(text: str) -> str:
    """A device name: ``cpu``, ``cuda``, ``cuda:N``, ``npu`` or ``npu:N`` (whether it exists is checked on use)."""
    from ..devices import check_device

    try:
        return check_device(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N, npu or npu:N, got {text!r}") from None


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default: ``(default: X)`` after its help, unless the help already says
    what the default is (``default:`` in its text); switches (``store_true``) are off unless given."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or action.default is argparse.SUPPRESS or action.nargs == 0
                or action.required):
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text  # a required positional has no default
        default = action.default
        if default is None:
            return text + " (default: none)"
        if isinstance(default, (list, tuple)):
            return text + f" (default: {' '.join(map(str, default)) or 'none'})"
        return text + " (default: %(default)s)"


class UsageError(ValueError):
    """A mistake in what the user asked for, worded with CLI flags: one line on stderr and exit code 2."""


class CLIExit(SystemExit):
    """Exit code 2 after a one-line error on stderr; ``str()`` is that line (what tests match on)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message
