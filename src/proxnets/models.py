"""Named models for ``proxnets train`` / ``proxnets eval``.

Each method package exports ``MODELS: dict[name, factory]`` where
``factory(input_shape, num_classes, **options) -> proxnets.engine.Trainable``. This registry
gathers them; names are unique across methods.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from proxnets.engine.loop import Trainable

__all__ = ["model_registry", "build_model"]

METHOD_PACKAGES = ("proxnets.capsules", "proxnets.convex", "proxnets.pmp", "proxnets.equilibrium", "proxnets.stable")


def model_registry() -> dict[str, Callable[..., Trainable]]:
    out: dict[str, Callable[..., Trainable]] = {}
    for pkg in METHOD_PACKAGES:
        models = getattr(importlib.import_module(pkg), "MODELS", {})
        for name, factory in models.items():
            if name in out:
                raise RuntimeError(f"model name {name!r} is registered twice (second time by {pkg})")
            out[name] = factory
    return out


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **options) -> Trainable:
    registry = model_registry()
    if name not in registry:
        raise ValueError(f"model: expected one of {sorted(registry)}, got {name!r}")
    trainable = registry[name](tuple(input_shape), num_classes, **options)
    if isinstance(trainable, dict):
        trainable = Trainable(**trainable)
    return trainable
