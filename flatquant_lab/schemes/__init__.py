"""Checkpoint schemes: one class per ``quant_model_description.json`` value, registered here.

    scheme = scheme_for("W8A8_DYNAMIC")          # by description value; ValueError naming the known ones
    scheme = scheme_of(model.get_submodule(n))   # by layer (None for modules no scheme computes)
    layer = scheme.build(tensors, backend="reference", act_dtype=torch.bfloat16)

Each scheme (:class:`~flatquant_lab.schemes.base.Scheme`) owns its description value, its tensors' names,
shapes and dtypes and their checks, how its layer is built from them (or from a float linear and integer
weights), how vLLM splits them over tensor-parallel ranks, and which layer computes it. Saving, loading,
calibration, serve-check, the numerics checks and the CLI look schemes up here.

Adding a scheme: a module here with a :class:`Scheme` subclass, and one ``register`` line below.

KV-cache schemes (``"kv_cache_type"`` values, docs/kv-cache.md) are chosen per model, independently of the linear
schemes, and have their own table: a :class:`KVCacheScheme` subclass and one ``register_kv_cache`` line.

    kv = kv_cache_scheme_for("C8")          # ValueError naming the known ones
Place in the import order: layers -> schemes -> models -> calibrate -> io.
"""
from __future__ import annotations

from torch import nn

from .base import (OPTIONAL, KVCacheScheme, Scheme, TensorSpec, TransformScheme, check_specs, expect, matrix_shape,
                   rank_kv_heads)
from .float import FloatScheme
from .kv_c8 import C8KVCache
from .kv_kv4 import KV4KVCache
from .w4a4_flatquant import W4A4FlatQuantScheme
from .w4a4_mxfp4_flatquant import W4A4MXFP4FlatQuantScheme
from .w8a8_dynamic import W8A8DynamicScheme

SCHEMES: dict[str, Scheme] = {}


def _new_entry(scheme_cls, base: type, key: str, table: dict, what: str):
    """``scheme_cls()`` and its ``key`` value, after checking it subclasses ``base`` and the value is a non-empty
    string not yet in ``table`` (``what`` names the value in the message)."""
    if not (isinstance(scheme_cls, type) and issubclass(scheme_cls, base)):
        raise ValueError(f"scheme_cls: expected a {base.__name__} subclass, got {scheme_cls!r}")
    scheme = scheme_cls()
    value = getattr(scheme, key, None)
    if not isinstance(value, str) or not value:
        raise ValueError(f"scheme_cls: {scheme_cls.__name__}.{key} must be a non-empty string, got {value!r}")
    if value in table:
        raise ValueError(f"scheme_cls: {what} {value!r} is already registered ({type(table[value]).__name__})")
    return scheme, value


def register(scheme_cls: type[Scheme]) -> Scheme:
    """Add a scheme (its class, instantiated once) under its ``quant_type``; returns the instance."""
    scheme, qt = _new_entry(scheme_cls, Scheme, "quant_type", SCHEMES, "quant type")
    for other in SCHEMES.values():
        if other.layer_cls is scheme.layer_cls:  # scheme_of would not know which of the two a layer is
            raise ValueError(f"scheme_cls: {scheme_cls.__name__}.layer_cls {scheme.layer_cls.__name__} already "
                             f"computes {other.quant_type!r}")
    SCHEMES[qt] = scheme
    return scheme


def unregister(quant_type: str) -> Scheme:
    """Remove the scheme registered under ``quant_type``; returns it."""
    scheme = scheme_for(quant_type)
    del SCHEMES[quant_type]
    return scheme


def known_types() -> tuple[str, ...]:
    """The registered description values, in registration order."""
    return tuple(SCHEMES)


def known_text() -> str:
    """The registered description values as a message lists them: ``'W4A4_FLATQUANT_DYNAMIC', 'W8A8_DYNAMIC', ...``."""
    return ", ".join(map(repr, SCHEMES))


def scheme_for(quant_type: str) -> Scheme:
    """The scheme of a description value; ``ValueError`` naming it and the known ones."""
    scheme = SCHEMES.get(quant_type) if isinstance(quant_type, str) else None
    if scheme is None:
        raise ValueError(f"quant_type: {quant_type!r} is not a registered scheme; known: {known_text()}")
    return scheme


def scheme_of(module: nn.Module) -> Scheme | None:
    """The scheme whose layer class ``module`` is (the most derived registered class in its MRO), else ``None``."""
    for cls in type(module).__mro__:
        for scheme in SCHEMES.values():
            if scheme.layer_cls is cls:
                return scheme
    return None


def quantized_schemes() -> dict[str, Scheme]:
    """The registered schemes that replace the float linear by their own layer (all but FLOAT), by quant type."""
    return {qt: s for qt, s in SCHEMES.items() if s.quantized}


# ------------------------------------------------------------------ KV-cache schemes
KV_CACHE_SCHEMES: dict[str, KVCacheScheme] = {}


def register_kv_cache(scheme_cls: type[KVCacheScheme]) -> KVCacheScheme:
    """Add a KV-cache scheme (its class, instantiated once) under its ``cache_type``; returns the instance."""
    scheme, ct = _new_entry(scheme_cls, KVCacheScheme, "cache_type", KV_CACHE_SCHEMES, "KV-cache type")
    KV_CACHE_SCHEMES[ct] = scheme
    return scheme


def unregister_kv_cache(cache_type: str) -> KVCacheScheme:
    """Remove the KV-cache scheme registered under ``cache_type``; returns it."""
    scheme = kv_cache_scheme_for(cache_type)
    del KV_CACHE_SCHEMES[cache_type]
    return scheme


def kv_cache_scheme_for(cache_type: str) -> KVCacheScheme:
    """The KV-cache scheme of a ``kv_cache_type`` value; ``ValueError`` naming it and the known ones."""
    scheme = KV_CACHE_SCHEMES.get(cache_type) if isinstance(cache_type, str) else None
    if scheme is None:
        known = ", ".join(map(repr, KV_CACHE_SCHEMES))
        raise ValueError(f"kv_cache_type: {cache_type!r} is not a registered KV-cache scheme; known: {known}")
    return scheme


def kv_cache_scheme_of(module: nn.Module) -> KVCacheScheme | None:
    """The KV-cache scheme whose module ``module`` is, by its ``cache_type``, else ``None``."""
    for scheme in KV_CACHE_SCHEMES.values():
        if isinstance(module, scheme.layer_cls) and getattr(module, "cache_type", None) == scheme.cache_type:
            return scheme
    return None


W4A4_FLATQUANT_DYNAMIC = register(W4A4FlatQuantScheme)
W8A8_DYNAMIC = register(W8A8DynamicScheme)
FLOAT = register(FloatScheme)
W4A4_MXFP4_FLATQUANT = register(W4A4MXFP4FlatQuantScheme)
C8 = register_kv_cache(C8KVCache)
KV4 = register_kv_cache(KV4KVCache)

__all__ = [
    "C8", "C8KVCache", "KV4", "KV4KVCache", "FLOAT", "FloatScheme", "KVCacheScheme", "KV_CACHE_SCHEMES", "OPTIONAL", "SCHEMES", "Scheme",
    "TensorSpec", "TransformScheme", "W4A4FlatQuantScheme", "W4A4MXFP4FlatQuantScheme", "W4A4_FLATQUANT_DYNAMIC", "W4A4_MXFP4_FLATQUANT",
    "W8A8DynamicScheme", "W8A8_DYNAMIC", "check_specs", "expect", "known_text", "known_types", "kv_cache_scheme_for",
    "kv_cache_scheme_of", "matrix_shape", "quantized_schemes", "rank_kv_heads", "register", "register_kv_cache",
    "scheme_for", "scheme_of", "unregister", "unregister_kv_cache",
]
