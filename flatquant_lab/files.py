"""Atomic file writes: a temp file in the target's own folder, then ``os.replace`` onto the target.

A reader (or a crash half-way) sees either the old file or the complete new one, never a torn one.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _temp_beside(path: Path, suffix: str = "") -> str:
    """A new, closed, empty temp file in ``path``'s folder (created if missing); its name is returned."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    return tmp


def _replace(tmp: str, path: Path) -> None:
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600; give it an ordinary file's mode
    os.replace(tmp, path)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename); return the path."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; return the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def save_figure(fig, path, **savefig_kwargs) -> Path:
    """``fig.savefig(path, **savefig_kwargs)``, atomically; return the path.

    The temp file keeps ``path``'s extension, so matplotlib picks the same format it would for ``path``.
    """
    path = Path(path)
    if not path.name:
        raise ValueError(f"path: expected a file path for the figure, got {str(path)!r}")
    tmp = _temp_beside(path, suffix=path.suffix)
    try:
        fig.savefig(tmp, **savefig_kwargs)
        _replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
