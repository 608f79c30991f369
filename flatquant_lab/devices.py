"""The one definition of where calibration runs: device names, the exact-arithmetic dtype per device,
free and peak memory, and moving nested arguments.

Devices are named as PyTorch names them: ``cpu``, ``cuda``, ``cuda:N``, ``npu``, ``npu:N`` (``npu``
needs ``torch_npu``, which only ``flatquant_lab.ops.npu`` imports; here ``torch.npu`` is looked up
only if something else has registered it).
"""
from __future__ import annotations

import re

import torch

DEVICE_TYPES = ("cpu", "cuda", "npu")
ACTIVATIONS = ("auto", "device", "host")
_DEVICE_RE = re.compile(r"^(cpu|cuda|npu)(?::(\d+))?$")
# Share of the device's free memory that the held activations may take under activations="auto":
# the rest is for one decoder layer, its float32 training copy and the autograd buffers of a step.
AUTO_ACTIVATION_SHARE = 0.4


def check_device(device, name: str = "device") -> str:
    """``device`` (a string or ``torch.device``) as its normalised name, or a ValueError naming ``name``.

    Only the spelling is checked here (``torch.device("npu")`` itself fails until torch_npu is
    imported); :func:`require_available` checks that the device exists and makes the ``torch.device``.
    """
    text = str(device) if isinstance(device, torch.device) else device
    m = _DEVICE_RE.match(text.strip().lower()) if isinstance(text, str) else None
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        raise ValueError(f"{name}: expected 'cpu', 'cuda', 'cuda:N', 'npu' or 'npu:N', got {device!r}")
    return text.strip().lower()


def _type(dev) -> str:
    return dev.type if isinstance(dev, torch.device) else str(dev).split(":")[0]


def _backend_module(dev):
    return getattr(torch, _type(dev), None) if _type(dev) != "cpu" else None


def require_available(device, name: str = "device") -> torch.device:
    """The ``torch.device`` of ``device`` if this process can use it, else a RuntimeError saying what is missing."""
    spec = check_device(device, name)
    kind, _, index = spec.partition(":")
    if kind == "cpu":
        return torch.device("cpu")
    mod = _backend_module(kind)
    if mod is None or not hasattr(mod, "is_available") or not mod.is_available():
        hint = " (import torch_npu first, on an Ascend host)" if kind == "npu" else ""
        raise RuntimeError(f"{name}: {spec!r} requested, but torch.{kind}.is_available() is not True{hint}")
    if index and int(index) >= mod.device_count():
        raise RuntimeError(f"{name}: {spec!r} requested, but only {mod.device_count()} {kind} device(s) exist")
    return torch.device(spec)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (the CPU for a module without any)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def exact_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the steps that want float64 (fold, rounding, GPTQ): float64 on the CPU, float32 on an
    accelerator (NPUs lack float64 linalg; GPUs run it at a fraction of float32's speed)."""
    return torch.float64 if _type(device) == "cpu" else torch.float32


def free_memory(dev: torch.device) -> int | None:
    """Free bytes on an accelerator (``mem_get_info``), or None on the CPU (activations live there anyway)."""
    mod = _backend_module(dev)
    if mod is None or not hasattr(mod, "mem_get_info"):
        return None
    return int(mod.mem_get_info(dev)[0])


def reset_peak(dev: torch.device) -> None:
    mod = _backend_module(dev)
    if mod is not None and hasattr(mod, "reset_peak_memory_stats"):
        mod.reset_peak_memory_stats(dev)


def peak_memory(dev: torch.device) -> tuple[str, int]:
    """``(where, bytes)``: the device's peak allocated memory since the last reset, or the process's peak
    resident set size (``ru_maxrss``, never reset) on the CPU."""
    mod = _backend_module(dev)
    if mod is not None and hasattr(mod, "max_memory_allocated"):
        return _type(dev), int(mod.max_memory_allocated(dev))
    return "host", host_peak_rss()


def host_peak_rss() -> int:
    """Peak resident set size of this process in bytes (0 where ``resource`` is missing)."""
    try:
        import resource
        import sys
    except ImportError:  # Windows
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


# glibc serves allocations above this from mmap, returned to the OS when freed (docs/method.md, 'Host memory
# and glibc').
HOST_MMAP_THRESHOLD = 4 * 2**20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_host_malloc_set = False


def return_freed_host_memory() -> bool:
    """Fix glibc's mmap threshold at ``HOST_MMAP_THRESHOLD`` (process-wide, once, for good), so that freed large
    host tensors leave the resident set. True where it took effect (glibc), False elsewhere. Called only
    when a caller asks (``QuantConfig(release_host_memory=True)``)."""
    global _host_malloc_set
    if _host_malloc_set:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        _host_malloc_set = bool(libc.mallopt(_M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    return _host_malloc_set


def pinned_empty(shape, dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    """An empty host tensor, page-locked when ``dev`` is an accelerator (faster, asynchronous copies)."""
    if _type(dev) != "cpu":
        try:
            return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=True)
        except RuntimeError:  # no pinning on this build or host: pageable memory still works
            pass
    return torch.empty(shape, dtype=dtype, device="cpu")


def to_device(obj, dev: torch.device):
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``dev``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, tuple):
        return tuple(to_device(v, dev) for v in obj)
    if isinstance(obj, list):
        return [to_device(v, dev) for v in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, dev) for k, v in obj.items()}
    return obj
