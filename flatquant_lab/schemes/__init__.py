"""Checkpoint schemes: one class per ``quant_model_description.json`` value, registered here.

    scheme = scheme_for("W8A8_DYNAMIC")          # by description value; ValueError naming the known ones
    scheme = scheme_of(model.get_submodule(n))   # by layer (None for modules no scheme computes)
    layer = scheme.build(tensors, backend="reference", act_dtype=torch.bfloat16)

Each scheme (:class:`~flatquant_lab.schemes.base.Scheme`) owns its description value, its tensors' names,
shapes and dtypes and their checks, how its layer is built from them (or from a float linear and integer
weights), how vLLM splits them over tensor-parallel ranks, and which layer computes it. Saving, loading,
calibration, serve-check, the numerics checks and the CLI look schemes up here.

Adding a scheme: a module here with a :class:`Scheme` subclass, and one ``register`` line below.
Place in the import order: layers -> schemes -> models -> calibrate -> io.
"""
from __future__ import annotations

from torch import nn

from .base import OPTIONAL, Scheme, TensorSpec, check_specs, expect, matrix_shape
from .float import FloatScheme
from .w4a4_flatquant import W4A4FlatQuantScheme
from .w8a8_dynamic import W8A8DynamicScheme

SCHEMES: dict[str, Scheme] = {}


def register(scheme_cls: type[Scheme]) -> Scheme:
    """Add a scheme (its class, instantiated once) under its ``quant_type``; returns the instance."""
    if not (isinstance(scheme_cls, type) and issubclass(scheme_cls, Scheme)):
        raise ValueError(f"scheme_cls: expected a Scheme subclass, got {scheme_cls!r}")
    scheme = scheme_cls()
    qt = getattr(scheme, "quant_type", None)
    if not isinstance(qt, str) or not qt:
        raise ValueError(f"scheme_cls: {scheme_cls.__name__}.quant_type must be a non-empty string, got {qt!r}")
    if qt in SCHEMES:
        raise ValueError(f"scheme_cls: quant type {qt!r} is already registered ({type(SCHEMES[qt]).__name__})")
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


W4A4_FLATQUANT_DYNAMIC = register(W4A4FlatQuantScheme)
W8A8_DYNAMIC = register(W8A8DynamicScheme)
FLOAT = register(FloatScheme)

__all__ = [
    "FLOAT", "FloatScheme", "OPTIONAL", "SCHEMES", "Scheme", "TensorSpec", "W4A4FlatQuantScheme",
    "W4A4_FLATQUANT_DYNAMIC", "W8A8DynamicScheme", "W8A8_DYNAMIC", "check_specs", "expect", "known_text",
    "known_types", "matrix_shape", "quantized_schemes", "register", "scheme_for", "scheme_of", "unregister",
]
